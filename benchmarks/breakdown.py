"""Where the time of `bench`'s dense step goes, part by part, beside plain timm training.

    python -m benchmarks.breakdown --arch resnet50 --size 64 --batch_size 4 --threads 1

The dense step of `spark-me bench` (benchmarks.variants) is cut at its part boundaries with
`detach().requires_grad_()`, so that each part's forward and backward are timed on their own:
encoder, densify, decoder, loss; then the LAMB step over all parameters. One round times, in this
order and in one process: every part of the cut step, the whole (uncut) dense step, plain timm's
training step (`forward_features` + backward + LAMB) and timm's LAMB with foreach=False vs
foreach=True on the dense model's parameters and gradients. Medians over the rounds, so a shared
host's load hits every column alike; the sum of the parts next to the whole step shows what the
cuts cost.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from timm.optim import Lamb
from torch import Tensor

import spark_me
from benchmarks.encoder import seconds
from benchmarks.variants import bench_step, loss_cells, timm_step

log = logging.getLogger("spark_me.bench")
CPU = torch.device("cpu")


def _cut(tensors: list[Tensor]) -> list[Tensor]:
    return [t.detach().requires_grad_() for t in tensors]


def part_seconds(model, images: Tensor, active: Tensor, clock=time.perf_counter) -> dict[str, float]:
    """Seconds of forward + backward per part of the dense step [encoder, densify, decoder, loss].

    The parts run forwards in order, then backwards in reverse, each timed on its own."""
    seen = torch.ones_like(active)
    spent: dict[str, float] = {}

    def timed(name: str, fn):
        t0 = clock()
        out = fn()
        spent[name] = spent.get(name, 0.0) + clock() - t0
        return out

    feats = timed("encoder", lambda: model.encode(images, seen))
    feats_in = _cut(feats)
    dens = timed("densify", lambda: model.densify(feats_in, seen, images.shape[-2:]))
    dens_in = _cut(dens)
    pred = timed("decoder", lambda: model.decode(dens_in))
    (pred_in,) = _cut([pred])
    loss = timed("loss", lambda: model.loss(images, pred_in, loss_cells(active)))
    timed("loss", loss.backward)
    timed("decoder", lambda: torch.autograd.backward(pred, pred_in.grad))
    timed("densify", lambda: torch.autograd.backward(dens, [d.grad for d in dens_in]))
    timed("encoder", lambda: torch.autograd.backward(feats, [f.grad for f in feats_in]))
    return spent


def count(params) -> int:
    return sum(p.numel() for p in params)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--mask_ratio", type=float, default=0.6)
    p.add_argument("--decoder_width", type=int, default=768)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: this process's CPU time (user + system), which a busy host's other processes do not "
        "stretch; with one thread it is the work done",
    )
    args = p.parse_args(argv)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.size, args.size)
    active = spark_me.random_mask(args.batch_size, args.size, args.size, args.mask_ratio)
    dense = bench_step("dense", args.arch, images, active, args.decoder_width)
    plain = timm_step(args.arch, images)
    model, params = dense.model, list(dense.model.parameters())
    lambs = {flag: Lamb(params, lr=1e-4, foreach=flag) for flag in (False, True)}
    dense.full_step(), plain.full_step()  # warm-up
    rows: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        dense.optimizer.zero_grad(set_to_none=True)
        parts = part_seconds(model, images, active, clock)
        parts["LAMB step (foreach=False)"] = seconds(dense.optimizer.step, CPU, clock)
        for flag, lamb in lambs.items():  # the gradients of the cut step are still there
            parts[f"  timm Lamb foreach={flag}"] = seconds(lamb.step, CPU, clock)
        parts["whole dense step"] = seconds(dense.full_step, CPU, clock)
        parts["plain timm step"] = seconds(plain.full_step, CPU, clock)
        parts["  of which timm LAMB"] = seconds(plain.optimizer.step, CPU, clock)
        for name, value in parts.items():
            rows.setdefault(name, []).append(value)
    med = {name: statistics.median(values) for name, values in rows.items()}
    whole = med["whole dense step"]
    log.info(
        "%s %d px batch %d, decoder width %d, %d threads, %s clock, median of %d rounds (encoder %.1f M, "
        "densify+decoder %.1f M parameters)",
        args.arch,
        args.size,
        args.batch_size,
        args.decoder_width,
        torch.get_num_threads(),
        args.clock,
        args.rounds,
        count(model.encoder.parameters()) / 1e6,
        (count(params) - count(model.encoder.parameters())) / 1e6,
    )
    log.info("| part | s | share of the whole dense step |")
    log.info("|---|---|---|")
    for name, value in med.items():
        log.info("| %s | %.4f | %.0f %% |", name.strip(), value, 100 * value / whole)
    cut = sum(med[k] for k in ("encoder", "densify", "decoder", "loss", "LAMB step (foreach=False)"))
    log.info("| sum of the cut parts | %.4f | %.0f %% |", cut, 100 * cut / whole)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
