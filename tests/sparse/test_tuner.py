"""The dataflow tuner: forced, rules, measured choices, and its JSON cache."""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import pytest
import torch

from spark_me.sparse import dataflows
from spark_me.sparse.dataflows import SparseOp, candidates
from spark_me.sparse.geometry import layout_of
from spark_me.sparse.layers import SparseConv2d, SparseDepthwiseConv2d, SparseMaxPool2d
from spark_me.sparse.me_dataflow import supports as me_supports
from spark_me.sparse.tensor import sparsify
from spark_me.sparse.tuner import DataflowTuner, rule

DELAY = 0.05  # seconds a "slow" dataflow sleeps: far above the tiny ops' time (about 1 ms)


class Recorder:
    """The tuner's runner seam: runs the real dataflow, records its name, and sleeps first for the
    names in `slow` (a fake dataflow that is measurably slower)."""

    def __init__(self, slow: tuple[str, ...] = ()):
        self.slow = set(slow)
        self.calls: list[str] = []

    def __call__(self, name: str, op: SparseOp, x, weight, bias):
        self.calls.append(name)
        if name in self.slow:
            time.sleep(DELAY)
        return dataflows.run(name, op, x, weight, bias)


def sample(gen, stride: int = 4, channels: int = 8):
    active = torch.rand(2, 2, 3, generator=gen) < 0.6
    active[:, 0, 0] = True
    b = 32 // stride
    return sparsify(torch.randn(2, channels, 2 * b, 3 * b, generator=gen), active, stride=stride)


def test_rule_table_prefers_blocks_where_the_halo_is_cheap(gen) -> None:
    conv3 = SparseOp("conv", 3, 1, 8, 8)
    dw7 = SparseOp("depthwise", 7, 1, 8, 8)
    assert rule(conv3, layout_of(sample(gen, 4))) == "block"  # 8x8 blocks: (10/8)^2 = 1.56
    assert rule(conv3, layout_of(sample(gen, 16))) == "dense"  # 2x2 blocks: 4x
    assert rule(dw7, layout_of(sample(gen, 8))) == "dense"  # 4x4 blocks, halo 3: 6.25x
    assert rule(SparseOp("conv", 2, 2, 8, 8), layout_of(sample(gen, 16))) == "block"  # no halo


def test_auto_measures_every_candidate_once_and_caches(gen, tmp_path) -> None:
    x = sample(gen)
    conv = SparseConv2d(8, 8, 3)
    cache = tmp_path / "dataflows.json"
    conv.tuner = DataflowTuner("auto", cache_file=cache)
    conv(x)
    (key,) = conv.tuner.timings
    assert set(conv.tuner.timings[key]) == set(candidates(conv.op))
    best = min(conv.tuner.timings[key], key=conv.tuner.timings[key].get)
    assert conv.last_dataflow == conv.tuner.choices[key] == best
    conv(x)  # no second measurement
    assert len(conv.tuner.timings) == 1
    again = DataflowTuner("auto", cache_file=cache)  # persisted
    assert again.choices == conv.tuner.choices
    with torch.autocast("cpu", dtype=torch.bfloat16):  # dtype is part of the key
        conv(x)
    assert len(conv.tuner.choices) == 2 and any("bfloat16" in k for k in conv.tuner.choices)


def test_tuning_leaves_parameters_without_gradients(gen) -> None:
    conv = SparseDepthwiseConv2d(8, 7)
    conv.tuner = DataflowTuner("auto")
    conv(sample(gen))
    assert conv.weight.grad is None and conv.bias.grad is None


def test_forced_dataflow_applies_where_it_can(gen) -> None:
    x = sample(gen)
    tuner = DataflowTuner("gemm")
    conv, dw = SparseConv2d(8, 8, 3), SparseDepthwiseConv2d(8, 3)
    conv.tuner = dw.tuner = tuner
    conv(x), dw(x)
    assert conv.last_dataflow == "gemm"
    assert dw.last_dataflow == rule(dw.op, layout_of(x))  # no gemm for depthwise


def test_bad_mode_and_bad_cache_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown dataflow mode 'fastest'"):
        DataflowTuner("fastest")
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    with pytest.raises(ValueError, match="not a dataflow cache"):
        DataflowTuner(cache_file=bad)
    bad.write_text(json.dumps({"choices": {"k": "warp"}}))
    with pytest.raises(ValueError, match="unknown dataflows"):
        DataflowTuner(cache_file=bad)


@pytest.mark.parametrize("fast", ["block", "dense", "gemm"])
def test_auto_times_the_dataflow_it_names(gen, fast: str) -> None:
    """Every candidate but `fast` sleeps: only if each timing is that of the dataflow it is recorded
    for does `fast` win (whatever the real dataflows' speeds), and each runs warm-up + repeats.
    Best of 3, so a busy host would have to stall the tiny fast op 3 times to upset it."""
    conv = SparseConv2d(8, 8, 3)
    slow = tuple(n for n in candidates(conv.op) if n != fast)
    recorder = Recorder(slow)
    conv.tuner = DataflowTuner("auto", repeats=3, runner=recorder)
    conv(sample(gen))
    (key,) = conv.tuner.timings
    timings = conv.tuner.timings[key]
    assert Counter(recorder.calls) == {n: 4 for n in candidates(conv.op)}
    assert all(timings[n] >= DELAY for n in slow), timings
    assert conv.last_dataflow == conv.tuner.choices[key] == fast, timings


def test_rules_mode_never_measures(gen) -> None:
    x = sample(gen)
    recorder = Recorder()
    tuner = DataflowTuner("rules", runner=recorder)
    layers = [
        SparseConv2d(8, 8, 3),
        SparseConv2d(8, 8, 3, 2),
        SparseDepthwiseConv2d(8, 7),
        SparseMaxPool2d(3, 2, 8),
    ]
    for layer in layers:
        layer.tuner = tuner
        layer(x)
        assert layer.last_dataflow == rule(layer.op, layout_of(x))
    assert recorder.calls == [] and tuner.timings == {}
    assert len(tuner.choices) == len(layers)


def test_keys_separate_device_dtype_block_and_size(gen) -> None:
    def layout(stride: int, cells_h: int, cells_w: int):
        b = 32 // stride
        x = torch.randn(2, 8, cells_h * b, cells_w * b, generator=gen)
        return layout_of(sparsify(x, torch.ones(2, cells_h, cells_w, dtype=torch.bool), stride))

    op = SparseOp("conv", 3, 1, 8, 8)
    base = layout(4, 1, 2)  # 4 blocks of 8x8: 256 sites
    same_size_other_block = layout(8, 2, 4)  # 16 blocks of 4x4: 256 sites too
    other_size = layout(4, 4, 4)  # 32 blocks of 8x8: 2048 sites
    assert same_size_other_block.num_sites == base.num_sites
    cpu, f32 = torch.device("cpu"), torch.float32
    keys = [
        DataflowTuner.key(op, base, f32, cpu),
        DataflowTuner.key(op, base, f32, torch.device("cuda")),
        DataflowTuner.key(op, base, torch.bfloat16, cpu),
        DataflowTuner.key(op, same_size_other_block, f32, cpu),
        DataflowTuner.key(op, other_size, f32, cpu),
        DataflowTuner.key(SparseOp("conv", 3, 1, 8, 16), base, f32, cpu),
    ]
    assert len(set(keys)) == len(keys), keys
    assert DataflowTuner.key(op, layout(4, 1, 2), f32, cpu) == keys[0]  # the same case finds its key


def test_a_choice_for_another_device_is_not_used(gen) -> None:
    x = sample(gen)
    conv = SparseConv2d(8, 8, 3)
    recorder = Recorder()
    conv.tuner = DataflowTuner("auto", repeats=1, runner=recorder)
    conv.tuner.choices[DataflowTuner.key(conv.op, layout_of(x), torch.float32, torch.device("cuda"))] = "me"
    conv(x)
    assert Counter(recorder.calls) == {n: 2 for n in candidates(conv.op)}
    assert conv.last_dataflow != "me"


def test_a_loaded_cache_is_used_without_measuring(gen, tmp_path) -> None:
    x = sample(gen)
    conv, dw = SparseConv2d(8, 8, 3), SparseDepthwiseConv2d(8, 7)
    cache = tmp_path / "dataflows.json"
    conv.tuner = dw.tuner = DataflowTuner("auto", cache_file=cache, repeats=1)
    conv(x), dw(x)
    data = json.loads(cache.read_text())
    assert len(data["choices"]) == 2
    # plant choices the measurement would hardly make: the slow reference, and the other candidate
    planted = {
        k: "me" if k.startswith("conv") else next(n for n in candidates(dw.op) if n != v)
        for k, v in data["choices"].items()
    }
    cache.write_text(json.dumps({"choices": planted}))
    recorder = Recorder()
    conv.tuner = dw.tuner = DataflowTuner("auto", cache_file=cache, runner=recorder)
    conv(x), dw(x)
    assert recorder.calls == []
    assert {conv.last_dataflow, dw.last_dataflow} == set(planted.values())


@pytest.mark.parametrize(
    ("op", "flow"),
    [
        (SparseOp("depthwise", 7, 1, 8, 8), "gemm"),
        (SparseOp("maxpool", 3, 2, 8, 8), "gemm"),
        (SparseOp("conv", 3, 1, 8, 16, groups=2), "gemm"),
        (SparseOp("conv", 3, 1, 8, 16, groups=2), "me"),
        (SparseOp("avgpool", 3, 2, 8, 8, count_include_pad=False), "block"),
        (SparseOp("avgpool", 3, 2, 8, 8), "me"),
    ],
    ids=repr,
)
def test_a_cached_dataflow_that_cannot_run_the_op_is_refused_at_load(gen, tmp_path, op, flow) -> None:
    key = DataflowTuner.key(op, layout_of(sample(gen)), torch.float32, torch.device("cpu"))
    cache = tmp_path / "dataflows.json"
    cache.write_text(json.dumps({"choices": {key: flow}}))
    with pytest.raises(ValueError, match=re.escape(f"dataflow '{flow}' cannot run {op!r}")):
        DataflowTuner(cache_file=cache)
    for ok in [*candidates(op), *(["me"] if me_supports(op) else [])]:  # what can run it loads
        cache.write_text(json.dumps({"choices": {key: ok}}))
        assert DataflowTuner(cache_file=cache).choices == {key: ok}
    cache.write_text(json.dumps({"choices": {"warp drive": "block"}}))
    with pytest.raises(ValueError, match="not a dataflow cache"):
        DataflowTuner(cache_file=cache)
