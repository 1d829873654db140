"""The dataflow tuner: forced, rules, measured choices, and its JSON cache."""

from __future__ import annotations

import json

import pytest
import torch

from spark_me.sparse.dataflows import SparseOp, candidates
from spark_me.sparse.geometry import layout_of
from spark_me.sparse.layers import SparseConv2d, SparseDepthwiseConv2d
from spark_me.sparse.tensor import sparsify
from spark_me.sparse.tuner import DataflowTuner, rule


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


def test_bad_mode_is_refused_and_a_bad_cache_is_set_aside(tmp_path, caplog) -> None:
    """A damaged or foreign cache is renamed (kept, not deleted), with a warning, and the tuner
    starts empty (it measures again); load() itself still refuses such a file."""
    with pytest.raises(ValueError, match="unknown dataflow mode 'fastest'"):
        DataflowTuner("fastest")
    cache = tmp_path / "dataflows.json"
    for n, content in enumerate(
        ["not json", json.dumps({"choices": {"k": "warp"}}), json.dumps([1, 2]), '{"choices": {"k": "blo'], 1
    ):
        cache.write_text(content)
        with pytest.raises(ValueError):
            DataflowTuner().load(cache)
        tuner = DataflowTuner("auto", cache_file=cache)
        assert tuner.choices == {} and not cache.exists()
        kept = tmp_path / ("dataflows.json.unusable" + (f"-{n}" if n > 1 else ""))
        assert kept.read_text() == content
        assert f"kept as {kept.name}, the dataflows are measured again" in caplog.text
    good = {"choices": {"k": "block"}, "timings": {}}
    cache.write_text(json.dumps(good))
    assert DataflowTuner("auto", cache_file=cache).choices == {"k": "block"} and cache.exists()
