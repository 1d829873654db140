"""Encoder forward+backward: sparse vs masked-dense vs dense, interleaved in one process.

    python -m benchmarks.encoder --archs resnet50 convnext_tiny --ratios 0.6 --amp none bf16

The targets of the sparse engine are ratios of these times, so the variants run interleaved
(sparse, masked-dense, dense, sparse, ...) in one process with the same weights, images and mask,
and the median of each is reported: on a shared CPU, timings taken minutes apart move by 10-20 %.
The first call of the sparse encoder tunes its dataflows (not timed: warm-up). Prints one line
per configuration and the per-layer dataflow table; `--out` also writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import time
from pathlib import Path

log = logging.getLogger("spark_me.bench.encoder")

AMP = {"none": None, "bf16": "bfloat16", "fp16": "float16"}


def seconds(fn, device, clock=time.perf_counter) -> float:
    """Seconds of `fn()` by `clock` (wall time, or `time.process_time`: this process's CPU time,
    which other processes on a busy host do not stretch), the device synchronised before and after."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - start


def saved_mib(loss_fn, params) -> float:
    """MiB of activations autograd keeps for the backward of `loss_fn()` (each storage once,
    parameters excluded): the memory an encoder's training step holds at its peak, measured the
    same way on CPU and GPU without allocator noise. Low-precision copies of the parameters
    (autocast's bf16/fp16 weight casts, which every variant makes once per step whatever the
    batch) are parameters too, not activations: without this a bf16 ResNet-152 at batch 2 counts
    ~115 MiB of weight copies in every variant."""
    import torch

    skip = {p.untyped_storage().data_ptr() for p in params}
    param_ids = {id(p) for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and not parameter_copy(t, param_ids):
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn()
    return sum(seen.values()) / 2**20


def sparse_loss(encoder, images, active, autocast):
    """A loss function: the sum of a sparse encoder's four feature maps on `images` under `active`
    (in `autocast`), what the encoder benchmarks differentiate."""
    import spark_me

    def loss():
        with autocast:
            feats = encoder.forward_sparse(spark_me.sparsify(images, active))
        return sum(f.F.float().sum() for f in feats)

    return loss


# autograd nodes that only cast or re-view their one input
_CAST_OR_VIEW = {"ToCopyBackward0", "ViewBackward0", "TBackward0", "PermuteBackward0", "UnsafeViewBackward0",
                 "ReshapeAliasBackward0", "AsStridedBackward0"}  # fmt: skip


def parameter_copy(t, param_ids: set[int]) -> bool:
    """Whether `t` is a parameter only cast and/or re-viewed (e.g. autocast's bf16 weight copy)."""
    fn = t.grad_fn
    while fn is not None and type(fn).__name__ in _CAST_OR_VIEW:
        fn = fn.next_functions[0][0]
    return fn is not None and id(getattr(fn, "variable", None)) in param_ids and t.grad_fn is not None


def compare(arch: str, ratio: float, batch: int, size: int, amp: str, repeats: int, device: str,
            dataflow: str = "auto", generic: bool = True) -> dict:  # fmt: skip
    """Median fwd+bwd seconds of the encoders, interleaved, and the sparse dataflow table.

    Variants: `sparse` (what `create_encoder(arch)` builds), `masked_dense` (SparK's emulation: the
    hand-written reference for ResNet / ConvNeXt, the masked-dense TorchFunctionMode for the other
    families), `dense` (the timm model on the whole image) and, for the hand-written families with
    `generic`, `generic` (the same timm model run by the generic path, same weights).
    """
    import timm
    import torch

    import spark_me
    from benchmarks.machine import cpu
    from spark_me.models.masked_dense import masked_dense_features, stage_outputs
    from spark_me.models.reference import MaskedDenseEncoder
    from spark_me.models.registry import is_hand_written

    dev = torch.device(device)
    torch.manual_seed(0)
    sparse = spark_me.create_encoder(arch, dataflow=dataflow).to(dev)
    hand = is_hand_written(arch)
    if hand:
        timm_model = timm.create_model(arch, num_classes=0).to(dev)
        timm_model.load_state_dict(sparse.state_dict(), strict=False)
        masked = MaskedDenseEncoder(timm_model)
        stages = [f"layer{i}" for i in (1, 2, 3, 4)] if arch.startswith("resnet") else [
            f"stages.{i}" for i in range(4)
        ]  # fmt: skip
    else:
        timm_model, stages = sparse.model, sparse.stage_names  # the same module, run densely
    channels_last = dev.type == "cuda"  # what a GPU user runs; on the CPU it made no difference
    if channels_last:
        timm_model.to(memory_format=torch.channels_last)
    images = torch.randn(batch, 3, size, size, device=dev)
    active = (
        spark_me.random_mask(batch, size, size, ratio, device=dev)
        if ratio > 0
        else torch.ones(batch, size // 32, size // 32, dtype=torch.bool, device=dev)
    )
    autocast = (
        torch.autocast(dev.type, dtype=getattr(torch, AMP[amp])) if AMP[amp] else contextlib.nullcontext()
    )

    def loss_masked():
        x = images.contiguous(memory_format=torch.channels_last) if channels_last else images
        with autocast:
            feats = masked(x, active) if hand else masked_dense_features(timm_model, stages, x, active)
        return sum(f.float().sum() for f in feats)

    def loss_dense():
        with autocast:
            feats = stage_outputs(timm_model, stages, images)
        return sum(f.float().sum() for f in feats)

    variants = {"sparse": sparse_loss(sparse, images, active, autocast), "masked_dense": loss_masked,
                "dense": loss_dense}  # fmt: skip
    if hand and generic:
        twin = spark_me.create_encoder(arch, dataflow=dataflow, generic=True).to(dev)
        twin.load_state_dict(sparse.state_dict())
        variants["generic"] = sparse_loss(twin, images, active, autocast)
    for fn in variants.values():  # warm-up; the sparse ones tune their dataflows here
        fn().backward()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(seconds(lambda f=fn: f().backward(), dev))
    params = list(sparse.parameters()) + list(timm_model.parameters())
    saved = {name: saved_mib(fn, params) for name, fn in variants.items()}
    med = {name: statistics.median(t) for name, t in times.items()}
    row = {
        "arch": arch,
        "path": "hand-written" if hand else "generic",
        "mask_ratio": ratio,
        "batch": batch,
        "size": size,
        "amp": amp,
        "device": str(dev),
        "cpu": cpu(),
        "seconds": med,
        "all_seconds": times,
        "saved_for_backward_mib": saved,
        "sparse_vs_masked_dense": med["masked_dense"] / med["sparse"],
        "memory_vs_masked_dense": saved["sparse"] / saved["masked_dense"],
        "sparse_vs_dense": med["dense"] / med["sparse"],
        "dataflows": [list(row) for row in sparse.dataflow_table()],
    }
    if "generic" in med:
        row["generic_vs_hand_written"] = med["generic"] / med["sparse"]
    return row


def compare_steps(
    arch: str, ratio: float, batch: int, size: int, amp: str, repeats: int, device: str,
    decoder_width: int = 768,
) -> dict:  # fmt: skip
    """Median seconds of whole SparK steps (zero_grad, forward, backward, LAMB), the three variants
    interleaved: the decoder, densify, loss and optimiser are the same code in all three."""
    import torch
    from timm.optim import Lamb

    import spark_me
    from benchmarks.variants import build

    dev = torch.device(device)
    autocast = (
        torch.autocast(dev.type, dtype=getattr(torch, AMP[amp])) if AMP[amp] else contextlib.nullcontext()
    )
    images = torch.randn(batch, 3, size, size, device=dev)
    active = spark_me.random_mask(batch, size, size, ratio, device=dev)
    steps = {}
    for variant in ("sparse", "masked_dense", "dense"):
        torch.manual_seed(0)
        model = build(variant, arch, decoder_width=decoder_width, mask_ratio=ratio).to(dev)
        optimizer = Lamb(model.parameters(), lr=1e-4)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = model(images, active)
            loss.backward()
            optimizer.step()

        steps[variant] = step
    for fn in steps.values():  # warm-up (the sparse encoder tunes its dataflows here)
        fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            times[name].append(seconds(fn, dev))
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "arch": arch, "mask_ratio": ratio, "batch": batch, "size": size, "amp": amp, "device": str(dev),
        "step_seconds": med, "all_step_seconds": times,
        "step_sparse_vs_masked_dense": med["masked_dense"] / med["sparse"],
        "step_sparse_vs_dense": med["dense"] / med["sparse"],
    }  # fmt: skip


def describe(row: dict) -> str:
    """One log line's worth of a `compare` or `compare_steps` row."""
    if "step_seconds" in row:
        s = row["step_seconds"]
        return (
            f"step sparse {s['sparse']:.2f} s  masked-dense {s['masked_dense']:.2f} s"
            f"  dense {s['dense']:.2f} s"
            f"  sparse vs masked-dense x{row['step_sparse_vs_masked_dense']:.2f}"
            f"  vs dense x{row['step_sparse_vs_dense']:.2f}"
        )
    s, mib = row["seconds"], row["saved_for_backward_mib"]
    return (
        f"sparse {s['sparse']:.3f} s  masked-dense {s['masked_dense']:.3f} s  dense {s['dense']:.3f} s"
        f"  sparse vs masked-dense x{row['sparse_vs_masked_dense']:.2f}"
        f"  vs dense x{row['sparse_vs_dense']:.2f}"
        f"  saved activations x{row['memory_vs_masked_dense']:.2f}"
        f" ({mib['sparse']:.0f} / {mib['masked_dense']:.0f} MiB)"
        + (f"  generic / hand-written {row['generic_vs_hand_written']:.3f}" if "generic" in s else "")
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["resnet50", "convnext_tiny"])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.6])
    p.add_argument("--amp", nargs="+", default=["none", "bf16"], choices=list(AMP))
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dataflow", default="auto", help="auto, rules, block, dense, gemm, fused or me")
    p.add_argument("--device", default=None)
    p.add_argument("--layers", action="store_true", help="print the per-layer dataflow table")
    p.add_argument(
        "--no-generic", dest="generic", action="store_false",
        help="hand-written families: do not also time the generic path on the same model",
    )  # fmt: skip
    p.add_argument("--step", action="store_true", help="whole SparK steps (decoder, loss, LAMB) instead")
    p.add_argument("--decoder_width", type=int, default=768, help="with --step: SparK's decoder width")
    p.add_argument("--out", type=Path, default=None, help="write results JSON here")
    args = p.parse_args(argv)
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from benchmarks.machine import cpu, cpu_line

    log.info("on %s", cpu_line(cpu()))
    rows = []
    for arch in args.archs:
        for amp in args.amp:
            for ratio in args.ratios:
                if args.step:
                    row = compare_steps(
                        arch, ratio, args.batch_size, args.size, amp, args.repeats, device, args.decoder_width
                    )
                else:
                    row = compare(
                        arch, ratio, args.batch_size, args.size, amp, args.repeats, device, args.dataflow,
                        args.generic,
                    )  # fmt: skip
                rows.append(row)
                log.info("%-15s amp %-4s mask %.2f: %s", arch, amp, ratio, describe(row))
                for name, op, flow in row.get("dataflows", []) if args.layers else []:
                    log.info("    %-32s %-28s %s", name, op, flow)
                if args.out:  # after every row: partial results survive an interruption
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(rows, indent=1))
    if args.out and not args.step:
        from benchmarks.plots import plot_encoder_speedup

        plot_encoder_speedup(rows, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
