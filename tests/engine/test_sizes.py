"""The disk estimate is what a run writes, and a run writes no duplicate files."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from spark_me import cli
from spark_me.engine.config import PretrainConfig
from spark_me.engine.pretrain import build_model
from spark_me.engine.sizes import checkpoint_sizes, numbered_kept, run_bytes

from .conftest import TINY_RUN


def test_sizes_count_weights_buffers_and_two_lamb_moments() -> None:
    model = build_model(PretrainConfig(arch="resnet18", decoder_width=64))
    sizes = checkpoint_sizes(model)
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert sizes.weights == 4 * params + buffers and sizes.optimizer == 2 * 4 * params
    assert sizes.timm == sum(t.numel() * t.element_size() for t in model.encoder.state_dict().values())


@pytest.mark.parametrize(
    ("epochs", "save_every", "keep_last", "kept"),
    [(1, 50, 3, 0), (100, 50, 3, 2), (200, 10, 3, 3), (200, 10, 0, 20), (5, 0, 3, 0), (2, 1, 1, 1)],
)
def test_numbered_checkpoints_kept(epochs: int, save_every: int, keep_last: int, kept: int) -> None:
    assert numbered_kept(epochs, save_every, keep_last) == kept


def test_one_epoch_writes_no_duplicates_and_what_the_start_line_said(tmp_path: Path, caplog) -> None:
    """The issue's case: one epoch with --save_every 50 left checkpoint-0001 beside an identical
    checkpoint-last. Now only the -last pair is written, and its size is the estimate's."""
    with caplog.at_level(logging.INFO):
        code = cli.main(
            ["pretrain", "--output_dir", str(tmp_path), *TINY_RUN, "--epochs", "1", "--save_every", "50"]
        )
    assert code == 0
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["checkpoint-last.pth", "timm-last.pth"]
    sizes = checkpoint_sizes(build_model(PretrainConfig(arch="resnet18", decoder_width=64)))
    for name, expected in (("checkpoint-last.pth", sizes.checkpoint), ("timm-last.pth", sizes.timm)):
        actual = (tmp_path / name).stat().st_size
        assert expected <= actual <= expected * 1.01 + 200_000, (name, actual, expected)  # pickle framing
    total = run_bytes(sizes, 1, 50, 3)
    assert f"disk ~{total / 2**20:.0f} MiB" in caplog.text
    assert (
        "resnet18 at 64 px, mask 0.6 | 12 images x 1 repeat, batch 4: 3 steps/epoch x 1 epochs = 3 steps"
        in caplog.text
    )
    assert "warmup: 2 of 3 steps (1 epochs: --warmup_epochs, cut to leave one step after it)" in caplog.text
