"""The dense step cut into parts is the same computation as the uncut one (the cuts only let each
part be timed on its own), and the breakdown command reports every part."""

from __future__ import annotations

import logging

import pytest
import torch

import spark_me
from benchmarks.breakdown import main, part_seconds
from benchmarks.variants import bench_step, step_loss


def test_the_cut_step_gives_the_uncut_step_s_gradients(gen) -> None:
    images = torch.randn(2, 3, 64, 64, generator=gen)
    active = spark_me.random_mask(2, 64, 64, 0.6, generator=gen)
    model = bench_step("dense", "resnet18", images, active, decoder_width=32).model.double()
    images = images.double()
    model.eval()  # BN in eval: two passes over the same batch are then the same function
    step_loss(model, "dense", images, active).backward()
    whole = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    spent = part_seconds(model, images, active)
    assert set(spent) == {"encoder", "densify", "decoder", "loss"} and all(t > 0 for t in spent.values())
    cut = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert cut.keys() == whole.keys()  # (the mask tokens: not used by a dense encoder's step)
    for name, grad in cut.items():
        assert torch.allclose(grad, whole[name], rtol=1e-10, atol=1e-14), name
    assert any(p.grad.abs().max() > 0 for n, p in model.named_parameters() if n.startswith("encoder."))


def test_the_command_reports_every_part(caplog: pytest.LogCaptureFixture) -> None:
    args = ["--arch", "resnet18", "--size", "64", "--batch_size", "1", "--decoder_width", "32"]
    with caplog.at_level(logging.INFO, logger="spark_me.bench"):
        assert main([*args, "--rounds", "1", "--clock", "cpu"]) == 0
    for part in (
        "encoder",
        "densify",
        "decoder",
        "loss",
        "LAMB step",
        "timm Lamb foreach=True",
        "plain timm step",
    ):
        assert f"| {part}" in caplog.text, part
