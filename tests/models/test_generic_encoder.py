"""The generic path's contract: one's own nn.Module as it is, shared and pruned; one-line refusals of
ops without sparse semantics; SparK, pretraining and the export on top of it.

(The numerics of every tested timm family against the independent masked-dense oracle are in
test_generic.py.)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import spark_me
from spark_me import cli
from spark_me.models.masked_dense import masked_dense_features
from spark_me.sparse.sync_batchnorm import convert_sync_batchnorm
from spark_me.sparse.value import UnsupportedOp

from ..engine.conftest import TINY_RUN

STAGES = ["stem", "stage2", "stage3", "stage4"]


class TinyCNN(nn.Module):
    """A plain CNN of one's own (the README's example): stem to stride 4, then three stride-2 stages."""

    def __init__(self, width: int = 8):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
            )

        self.stem = nn.Sequential(block(3, width, 2), block(width, width, 2))
        self.stage2 = block(width, 2 * width, 2)
        self.stage3 = block(2 * width, 4 * width, 2)
        self.stage4 = block(4 * width, 8 * width, 2)
        self.head = nn.Linear(8 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage4(self.stage3(self.stage2(self.stem(x))))
        return self.head(x.mean((2, 3)))


def test_own_module_is_run_shared_and_pruned() -> None:
    torch.manual_seed(0)
    model = TinyCNN().double()
    keys_before = set(model.state_dict())
    encoder = spark_me.create_encoder(model, stages=STAGES, dataflow="rules")
    assert encoder.model is model and encoder.dropped == ["head"] and encoder.channels == (8, 16, 32, 64)
    assert set(encoder.state_dict()) == {k for k in keys_before if not k.startswith("head.")}
    assert {id(p) for p in encoder.parameters()} == {id(p) for p in model.parameters()}  # no copy

    images = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    everything = torch.ones(2, 2, 3, dtype=torch.bool)
    model.eval()
    dense = []
    hooks = [model.get_submodule(s).register_forward_hook(lambda m, i, o: dense.append(o)) for s in STAGES]
    model.stage4(model.stage3(model.stage2(model.stem(images))))
    for h in hooks:
        h.remove()
    for ours, theirs in zip(encoder(images, everything), dense, strict=True):  # mask 0 == the dense model
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)

    active = everything.clone()
    active[0, 1] = False
    active[1, :, 1:] = False
    maps = encoder(images, active)
    for m, stride in zip(maps, (4, 8, 16, 32), strict=True):
        visible = active.repeat_interleave(32 // stride, 1).repeat_interleave(32 // stride, 2)
        assert m.shape[-2:] == visible.shape[-2:]
        assert bool((m.permute(1, 0, 2, 3)[:, ~visible] == 0).all())  # nothing at masked sites


class ListCNN(nn.Module):
    """Stages in a ModuleList (iterated, never called), a block after the last stage, heads in a
    ModuleList that never run: only the last two are removed."""

    def __init__(self):
        super().__init__()
        widths = (8, 16, 32, 64)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1))
        self.stages = nn.ModuleList(
            [nn.Conv2d(a, b, 3, 2, 1) for a, b in zip(widths[:-1], widths[1:], strict=True)]
            + [nn.Conv2d(64, 64, 3, 1, 1)]
        )
        self.heads = nn.ModuleList([nn.Linear(64, 10), nn.Linear(64, 2)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        for stage in self.stages:
            x = F.relu(stage(x))
        return [head(x.mean((2, 3))) for head in self.heads]


def test_modules_in_lists_are_kept_when_they_run_and_dropped_when_they_do_not() -> None:
    torch.manual_seed(0)
    model = ListCNN().double()
    reference = copy.deepcopy(model)
    stages = ["stem", "stages.0", "stages.1", "stages.2"]
    encoder = spark_me.create_encoder(model, stages=stages, dataflow="rules")
    assert encoder.dropped == ["stages.3", "heads"]
    assert {k.rpartition(".")[0] for k in encoder.state_dict()} == {
        "stem.0",
        "stem.2",
        "stages.0",
        "stages.1",
        "stages.2",
    }
    images = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    active = torch.tensor([[[1, 0, 1], [1, 1, 0]], [[0, 1, 1], [1, 0, 0]]], dtype=torch.bool)
    want = masked_dense_features(reference, stages, images, active)
    for ours, theirs in zip(encoder(images, active), want, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


class FunctionalCNN(nn.Module):
    """`proj` is never called: its weight and bias go to F.conv2d in the model's own forward."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, 4)
        self.proj = nn.Conv2d(8, 8, 3, 2, 1)
        self.s8, self.s16, self.s32 = nn.Identity(), nn.Conv2d(8, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.s8(F.conv2d(self.stem(x), self.proj.weight, self.proj.bias, 2, 1))
        return self.s32(self.s16(x))


def test_a_module_whose_parameters_are_used_without_calling_it_is_kept() -> None:
    torch.manual_seed(0)
    model = FunctionalCNN().double()
    reference = copy.deepcopy(model)
    stages = ["stem", "s8", "s16", "s32"]
    encoder = spark_me.create_encoder(model, stages=stages, dataflow="rules")
    assert encoder.dropped == [] and "proj.weight" in encoder.state_dict()
    images = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    active = torch.tensor([[[1, 0, 1], [1, 1, 0]], [[0, 1, 1], [1, 0, 0]]], dtype=torch.bool)
    want = masked_dense_features(reference, stages, images, active)
    for ours, theirs in zip(encoder(images, active), want, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_spark_trains_every_parameter_of_a_generic_encoder() -> None:
    torch.manual_seed(0)
    encoder = spark_me.create_encoder(TinyCNN(), stages=STAGES, dataflow="rules")
    model = spark_me.SparK(encoder, decoder_width=64)
    assert isinstance(model.densify_norms[0], nn.BatchNorm2d)  # a BN model densifies through BN
    model(torch.randn(2, 3, 64, 64)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


def _with(op: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """TinyCNN whose stage3 runs `op` (in a module named 'mid') before its conv."""

    class Op(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return op(x)

    model = TinyCNN()
    model.stage3 = nn.Sequential(nn.Sequential(), model.stage3)
    model.stage3[0].add_module("mid", Op())
    return model


def _dw(x: torch.Tensor) -> torch.Tensor:
    """A 3x3 depthwise kernel for x's channels."""
    return torch.ones(x.shape[1], 1, 3, 3)


@pytest.mark.parametrize(
    "op, named",
    [
        (lambda x: F.pad(x, (0, 1, 0, 1))[..., :-1, :-1], "F.pad"),
        (lambda x: torch.flip(x, (3,)), "torch.flip"),
        (lambda x: F.conv2d(x, _dw(x), padding=2, dilation=2, groups=x.shape[1]), "dilated"),
        (lambda x: F.conv2d(x, _dw(x), padding=0, groups=x.shape[1]), "padding 0"),
        (lambda x: x.flatten(2).mean(2)[:, :, None, None] * x, "flatten"),
        (lambda x: F.interpolate(x, scale_factor=2, mode="bilinear")[..., ::2, ::2], "bilinear"),
        (lambda x: x.permute(0, 1, 3, 2), "permute"),
        (lambda x: x.mean(), "mean over dims"),
        (lambda x: x[:, :, 1:], "indexing dim 2"),
        (lambda x: F.linear(x, torch.eye(x.shape[-1])), "F.linear over the width"),
        (lambda x: F.layer_norm(x[:, : x.shape[-1]], x.shape[-1:]), "layer_norm"),  # over W, with W == C
    ],
)  # fmt: skip
def test_an_op_without_sparse_form_is_refused_at_creation_in_one_line(op, named: str) -> None:
    with pytest.raises(UnsupportedOp) as err:
        spark_me.create_encoder(_with(op), stages=STAGES)
    message = str(err.value)
    assert "\n" not in message and named in message and "TinyCNN" in message
    assert "'stage3.0.mid'" in message  # the module that called it


def test_refusals_of_whole_models(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="no stage at reduction .4, 8, 32."):
        spark_me.create_encoder("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="unknown architecture 'resnet5000': not a timm model"):
        spark_me.create_encoder("resnet5000")
    caplog.set_level(logging.ERROR)
    assert (
        cli.main(["pretrain", *TINY_RUN, "--arch", "tf_efficientnet_b0", "--output_dir", str(tmp_path)]) == 1
    )
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "F.pad" in errors[0] and "'conv_stem'" in errors[0], errors
    assert not list(tmp_path.glob("*.pth"))


def test_convert_sync_batchnorm_leaves_the_models_batchnorms_to_the_handler() -> None:
    encoder = spark_me.create_encoder(TinyCNN(), stages=STAGES)
    model = convert_sync_batchnorm(spark_me.SparK(encoder, decoder_width=64))
    assert encoder.sync_group is None  # the world
    assert type(encoder.model.stem[0][1]) is nn.BatchNorm2d and encoder.stem is encoder.model.stem
    assert model.encoder is encoder


def test_pretrain_a_timm_family_and_export(tmp_path: Path) -> None:
    arch = "mobilenetv3_large_100"
    assert (
        cli.main(["pretrain", *TINY_RUN, "--arch", arch, "--epochs", "1", "--output_dir", str(tmp_path)]) == 0
    )
    state = torch.load(tmp_path / "timm-last.pth", weights_only=True)
    result = timm.create_model(arch, num_classes=0).load_state_dict(state, strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) == {"conv_head.weight", "conv_head.bias"}
    assert (
        cli.main(["reconstruct", str(tmp_path / "checkpoint-last.pth"), "-o", str(tmp_path / "r.png")]) == 0
    )
    assert (tmp_path / "r.png").stat().st_size > 0


def test_pretrain_ones_own_module(tmp_path: Path) -> None:
    spec = f"{__name__}:TinyCNN"
    argv = ["pretrain", *TINY_RUN, "--model", spec, "--stages", ",".join(STAGES), "--epochs", "1"]
    assert cli.main([*argv, "--output_dir", str(tmp_path)]) == 0
    state = torch.load(tmp_path / "timm-last.pth", weights_only=True)
    assert set(state) == {k for k in TinyCNN().state_dict() if not k.startswith("head.")}
    TinyCNN().load_state_dict(state, strict=False)  # one's own model takes its weights back
