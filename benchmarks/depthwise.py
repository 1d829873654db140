"""Depthwise convs of a timm CNN, one layer at a time: every dataflow, forward and forward+backward.

    python -m benchmarks.depthwise --archs convnext_tiny efficientnet_b0 --out benchmarks/results/cpu-dw

For each distinct depthwise conv of the arch (kernel, stride, channels, input stride: found by
running the dense model once with hooks), the layer's input is sparsified at the given mask ratio
and each variant runs interleaved in one process (variant A, B, C, A, B, C, ...), median of
`--repeats` after a warm-up:

- ``block`` / ``dense``: the dataflows as they are (backward: `depthwise.maps_backward`);
- ``block-aten`` / ``dense-aten``: the same with aten's convolution_backward (the code before);
- ``fused``: the fused C++ gather dataflow;
- ``k ...``: the ``block`` dataflow's dense kernels alone on its gathered maps (forward conv,
  grad-input, grad-weight; new and aten's): the "backward no slower than a forward" check.

`--inductor` adds torch.compile of the plain gather-sum definition (forward only, the dropped
candidate; its compile time is reported). Records the CPU model, its bf16/AMX flags and threads.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from unittest import mock

log = logging.getLogger("spark_me.bench.depthwise")


def depthwise_layers(arch: str, size: int) -> list[dict]:
    """Distinct depthwise convs of `arch`: kernel, stride, channels and the stride of their input."""
    import timm
    import torch

    model = timm.create_model(arch, pretrained=False).eval()
    found: dict[tuple, dict] = {}

    def hook(module, inputs, _output):
        x = inputs[0]
        k, s, c = module.kernel_size[0], module.stride[0], module.in_channels
        key = (k, s, c, size // x.shape[-1])
        entry = found.setdefault(
            key, {"kernel": k, "stride": s, "channels": c, "in_stride": key[3], "count": 0}
        )
        entry["count"] += 1

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels:
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return list(found.values())


def _aten_maps_backward(grad, g, weight, stride, padding, needs):
    import torch

    return torch.ops.aten.convolution_backward(
        grad, g, weight, [weight.shape[0]] if needs[2] else None, [stride] * 2, [padding] * 2, [1, 1],
        False, [0, 0], weight.shape[0], list(needs),
    )  # fmt: skip


def bench_layer(
    layer: dict,
    batch: int,
    size: int,
    ratio: float,
    repeats: int,
    inductor: bool,
    clock=time.perf_counter,
    amp: str = "none",
) -> dict:
    """Median (and min) ms of every variant on one layer; `amp` "bf16": the dataflows under CPU
    autocast (the dense-kernel-only and inductor variants are then left out)."""
    import torch

    from spark_me.sparse import dataflows, depthwise
    from spark_me.sparse.ops import SparseOp
    from spark_me.sparse.tensor import sparsify

    gen = torch.Generator().manual_seed(0)
    c, k, s, in_stride = layer["channels"], layer["kernel"], layer["stride"], layer["in_stride"]
    grid = size // 32
    active = torch.rand(batch, grid, grid, generator=gen) >= ratio
    side = size // in_stride
    x = sparsify(torch.randn(batch, c, side, side, generator=gen), active, stride=in_stride)
    op = SparseOp("depthwise", k, s, c, c)
    weight = torch.randn(c, 1, k, k, generator=gen, requires_grad=True)
    bias = torch.randn(c, generator=gen, requires_grad=True)
    feats = x.F.detach().requires_grad_(True)
    probe = type(x)(feats, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)

    def fwd_bwd(name: str, aten: bool = False):
        def run():
            patch = mock.patch.object(depthwise, "maps_backward", _aten_maps_backward) if aten else None
            if patch:
                patch.start()
            try:
                out, _ = dataflows.run(name, op, probe, weight, bias)
                out.backward(torch.ones_like(out))
            finally:
                if patch:
                    patch.stop()

        return run

    def fwd(name: str):
        def run():
            with torch.no_grad():
                dataflows.run(name, op, probe, weight, bias)

        return run

    variants = {
        **(_map_kernels(op, probe, weight) if amp == "none" else {}),
        "block": fwd_bwd("block"),
        "block-aten": fwd_bwd("block", aten=True),
        "dense": fwd_bwd("dense"),
        "dense-aten": fwd_bwd("dense", aten=True),
        "fused": fwd_bwd("fused"),
        "fwd block": fwd("block"),
        "fwd dense": fwd("dense"),
        "fwd fused": fwd("fused"),
    }
    result: dict = {"layer": layer, "sites": len(feats)}
    if inductor and amp == "none":
        variants["fwd inductor"], result["inductor_compile_s"] = _inductor_variant(op, probe, weight, bias)
    if amp == "bf16":
        variants = {n: _autocast(fn) for n, fn in variants.items()}
    times: dict[str, list[float]] = {n: [] for n in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in variants.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    result["ms"] = {n: round(statistics.median(t) * 1e3, 3) for n, t in times.items()}
    result["min_ms"] = {n: round(min(t) * 1e3, 3) for n, t in times.items()}
    return result


def _autocast(fn):
    import torch

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fn()

    return run


def _map_kernels(op, x, weight) -> dict:
    """The dense kernels of the ``block`` dataflow alone, on its gathered maps: forward conv,
    grad-input and grad-weight as `depthwise.maps_backward` computes them, and aten's grad-weight."""
    import torch
    import torch.nn.functional as F

    from spark_me.sparse import dataflows, depthwise
    from spark_me.sparse.geometry import layout_of

    src = layout_of(x)
    dst = src.geometry.layout(src.stride * op.stride)
    flow = dataflows._Block(op, src, dst)
    w = weight.detach()
    maps = flow.gather(x.F.detach())
    grad = torch.randn_like(F.conv2d(maps, w, None, op.stride, 0, 1, op.in_channels))
    grad = grad.contiguous(memory_format=torch.channels_last)
    c = op.in_channels

    def aten(mask):
        return lambda: torch.ops.aten.convolution_backward(
            grad, maps, w, None, [op.stride] * 2, [0, 0], [1, 1], False, [0, 0], c, mask
        )

    return {
        "k fwd": lambda: F.conv2d(maps, w, None, op.stride, 0, 1, c),
        "k grad-in": lambda: depthwise.maps_backward(grad, maps, w, op.stride, 0, (True, False, False)),
        "k grad-w": lambda: depthwise.maps_backward(grad, maps, w, op.stride, 0, (False, True, False)),
        "k aten grad-in": aten([True, False, False]),
        "k aten grad-w": aten([False, True, False]),
    }


def _inductor_variant(op, x, weight, bias):
    """torch.compile of the plain definition, dynamic in the number of sites; (callable, compile s)."""
    import torch

    from spark_me.sparse.geometry import layout_of

    src = layout_of(x)
    windows = src.window_index(op.halo, op.kernel_size, op.stride)
    columns = weight.detach().reshape(op.in_channels, -1).t().contiguous()

    def definition(feats, index, w, b):
        padded = torch.cat([feats, feats.new_zeros(1, feats.shape[1])])
        return (padded[index] * w).sum(1) + b

    compiled = torch.compile(definition, dynamic=True)
    feats = x.F.detach()
    start = time.perf_counter()
    compiled(feats, windows, columns, bias.detach())
    compile_s = time.perf_counter() - start

    def run():
        with torch.no_grad():
            compiled(feats, windows, columns, bias.detach())

    return run, round(compile_s, 2)


def _before():
    """The code before issue 21: aten's depthwise backward, no ``fused`` candidate."""
    from contextlib import ExitStack

    from spark_me.sparse import depthwise

    stack = ExitStack()
    stack.enter_context(mock.patch.object(depthwise, "maps_backward", _aten_maps_backward))
    stack.enter_context(mock.patch.object(depthwise, "native_available", lambda: False))
    return stack


def bench_encoder(arch: str, batch: int, size: int, ratio: float, repeats: int, clock) -> dict:
    """Sparse encoder fwd+bwd (own tuner each), before vs after, plus masked-dense, interleaved."""
    import contextlib

    import timm
    import torch

    import spark_me
    from spark_me.models.reference import MaskedDenseEncoder

    torch.manual_seed(0)
    encoders = {"before": spark_me.create_encoder(arch), "after": spark_me.create_encoder(arch)}
    encoders["after"].load_state_dict(encoders["before"].state_dict())
    timm_model = timm.create_model(arch, num_classes=0)
    timm_model.load_state_dict(encoders["before"].state_dict(), strict=False)
    try:
        masked = MaskedDenseEncoder(timm_model)
    except TypeError:  # no masked-dense reference for this family yet: sparse before/after only
        masked = None
    images = torch.randn(batch, 3, size, size)
    active = spark_me.random_mask(batch, size, size, ratio)

    def sparse(name):
        def run():
            with _before() if name == "before" else contextlib.nullcontext():
                feats = encoders[name].forward_sparse(spark_me.sparsify(images, active))
                sum(f.F.sum() for f in feats).backward()

        return run

    def masked_dense():
        sum(f.sum() for f in masked(images, active)).backward()

    variants = {"sparse before": sparse("before"), "sparse after": sparse("after")}
    if masked is not None:
        variants["masked-dense"] = masked_dense
    for fn in variants.values():  # warm-up: each sparse encoder tunes its dataflows here
        fn()
    times: dict[str, list[float]] = {n: [] for n in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    med = {n: round(statistics.median(t), 4) for n, t in times.items()}
    depthwise_rows = [list(r) for r in encoders["after"].dataflow_table() if "depthwise" in str(r)]
    return {"arch": arch, "seconds": med, "all_seconds": times, "depthwise_dataflows_after": depthwise_rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=["convnext_tiny", "efficientnet_b0"])
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--ratio", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: CPU seconds of the process (time.process_time), immune to the descheduling that "
        "dominates wall-clock times on a crowded host; meaningful with --threads 1",
    )
    parser.add_argument("--amp", choices=("none", "bf16"), default="none", help="layers under CPU autocast")
    parser.add_argument("--encoder", action="store_true", help="whole sparse encoders, before vs after")
    parser.add_argument("--inductor", action="store_true", help="also time torch.compile's gather-sum")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    from benchmarks import machine
    from spark_me.sparse import depthwise, native

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    start = time.perf_counter()
    native.build("depthwise_kernels")
    env = machine.cpu() | {"torch": torch.__version__, "clock": args.clock}
    env["native_build_or_cache_s"] = round(time.perf_counter() - start, 2)
    env["native"] = depthwise.native_available()
    log.info("%s", env)
    rows = []
    for arch in args.archs if args.encoder else ():
        row = bench_encoder(arch, args.batch_size, args.size, args.ratio, args.repeats, clock)
        log.info("%s encoder fwd+bwd s: %s", arch, row["seconds"])
        rows.append(row)
    for arch in args.archs if not args.encoder else ():
        for layer in depthwise_layers(arch, args.size):
            row = {"arch": arch} | bench_layer(
                layer, args.batch_size, args.size, args.ratio, args.repeats, args.inductor, clock, args.amp
            )
            ms = row["ms"]
            k, s, c = layer["kernel"], layer["stride"], layer["channels"]
            times = " ".join(f"{n} {v:.2f}" for n, v in ms.items())
            log.info(
                "%s dw%dx%d/%d c%d @s%d x%d: %s", arch, k, k, s, c, layer["in_stride"], layer["count"], times
            )
            rows.append(row)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        args.out.write_text(json.dumps({"env": env, "settings": settings, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
