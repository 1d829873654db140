"""Sparse ResNet encoders with and without BN -> ReLU folded into the next op: memory and time.

    python -m benchmarks.fold_bn_relu --archs resnet50 resnet152 --amp none bf16 \
        --out benchmarks/results/cpu-sweep-bf16/fold-bn-relu.json

Before / after of the fold (spark_me/sparse/bn_relu.py): the same encoder, weights, images and mask
run `fold_bn_relu=True` and `False`, interleaved in one process (median of `--repeats` forward +
backward after a warm-up that tunes the dataflows), beside the masked-dense reference's saved
activations (the memory target is sparse <= 0.5x masked-dense). Saved activations are counted
as in benchmarks.encoder (each storage once, parameters and their autocast copies excluded).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import time

log = logging.getLogger("spark_me.bench.fold_bn_relu")


def compare(arch: str, batch: int, size: int, ratio: float, amp: str, repeats: int) -> dict:
    """Saved MiB and median seconds of the folded and layer-by-layer encoders, and the masked-dense
    reference's saved MiB."""
    import timm
    import torch

    import spark_me
    from benchmarks.encoder import AMP, saved_mib, sparse_loss
    from spark_me.models.reference import MaskedDenseEncoder

    torch.manual_seed(0)
    encoders = {fold: spark_me.create_encoder(arch, fold_bn_relu=fold) for fold in (True, False)}
    encoders[False].load_state_dict(encoders[True].state_dict())
    timm_model = timm.create_model(arch, num_classes=0)
    timm_model.load_state_dict(encoders[True].state_dict(), strict=False)
    masked = MaskedDenseEncoder(timm_model)
    images = torch.randn(batch, 3, size, size)
    active = spark_me.random_mask(batch, size, size, ratio)
    autocast = torch.autocast("cpu", dtype=getattr(torch, AMP[amp])) if AMP[amp] else contextlib.nullcontext()

    def masked_loss():
        with autocast:
            return sum(f.float().sum() for f in masked(images, active))

    variants = {
        name: sparse_loss(encoders[fold], images, active, autocast)
        for name, fold in (("folded", True), ("layer_by_layer", False))
    }
    for fn in variants.values():
        fn().backward()  # warm-up: tunes the dataflows
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn().backward()
            times[name].append(time.perf_counter() - start)
    params = [p for m in (*encoders.values(), timm_model) for p in m.parameters()]
    saved = {name: saved_mib(fn, params) for name, fn in variants.items()}
    saved["masked_dense"] = saved_mib(masked_loss, params)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    return {
        "arch": arch, "batch": batch, "size": size, "mask_ratio": ratio, "amp": amp,
        "seconds": seconds, "all_seconds": times, "saved_mib": saved,
        "memory_vs_masked_dense": {name: saved[name] / saved["masked_dense"] for name in variants},
        "time_folded_vs_layer_by_layer": seconds["folded"] / seconds["layer_by_layer"],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from benchmarks.machine import add_shape_args, announce, write_result

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["resnet50"])
    p.add_argument("--amp", nargs="+", default=["none"], choices=["none", "bf16"])
    add_shape_args(p, repeats=5)
    args = p.parse_args(argv)
    announce(log)
    rows = []
    for arch in args.archs:
        for amp in args.amp:
            row = compare(arch, args.batch_size, args.size, args.ratio, amp, args.repeats)
            rows.append(row)
            mem, sec = row["memory_vs_masked_dense"], row["seconds"]
            log.info(
                "%s %s b%d: saved vs masked-dense x%.2f folded, x%.2f layer by layer; "
                "fwd+bwd %.3f s folded, %.3f s layer by layer (x%.3f)",
                arch, amp, args.batch_size, mem["folded"], mem["layer_by_layer"], sec["folded"],
                sec["layer_by_layer"], row["time_folded_vs_layer_by_layer"],
            )  # fmt: skip
    if args.out:
        write_result(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
