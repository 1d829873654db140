"""Checkpoints: atomic, resumable, loadable with `torch.load(weights_only=True)`.

output_dir/checkpoint-last.pth       full state after the last finished epoch
output_dir/checkpoint-{epoch}.pth    every `save_every` epochs, the newest `keep_last` kept
output_dir/timm-last.pth, timm-{epoch}.pth   the encoder alone, in timm's layout (for fine-tuning)
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from converters.io import NotACheckpoint, load_state, save_state
from converters.timm_format import encoder_state, to_timm

log = logging.getLogger(__name__)

NUMBERED = re.compile(r"checkpoint-(\d+)\.pth$")


def save(output_dir: Path, state: dict, epoch: int, numbered: bool, keep_last: int) -> Path:
    """`state` holds model/optimizer/scaler/epoch/step/config; writes the timm export beside it."""
    output_dir = Path(output_dir)
    config = state["config"]
    if config.get("model"):  # one's own module (--model): its own keys, no timm twin to check against
        timm_state = {k: v.detach().clone() for k, v in encoder_state(state["model"]).items()}
    else:
        timm_state = to_timm(state["model"], config["arch"], **config.get("model_kwargs", {}))
    names = ["last"] + ([f"{epoch:04d}"] if numbered else [])
    for name in names:
        save_state(state, output_dir / f"checkpoint-{name}.pth")
        save_state(timm_state, output_dir / f"timm-{name}.pth")
    if numbered and keep_last > 0:
        for old in sorted(numbered_checkpoints(output_dir))[:-keep_last]:
            old.unlink(missing_ok=True)
            (output_dir / old.name.replace("checkpoint-", "timm-")).unlink(missing_ok=True)
    return output_dir / "checkpoint-last.pth"


def numbered_checkpoints(output_dir: Path) -> list[Path]:
    return sorted(
        (p for p in Path(output_dir).glob("checkpoint-*.pth") if NUMBERED.search(p.name)),
        key=lambda p: int(NUMBERED.search(p.name)[1]),
    )


def latest(output_dir: Path) -> Path | None:
    """The checkpoint of the most advanced run state in output_dir (for --auto_resume)."""
    candidates = [
        p for p in [Path(output_dir) / "checkpoint-last.pth", *numbered_checkpoints(output_dir)] if p.exists()
    ]
    best, best_step = None, -1
    for path in candidates:
        try:
            step = int(torch.load(path, map_location="cpu", weights_only=True)["step"])
        except Exception as err:  # a damaged file must not stop the resume from an older one
            log.warning("ignoring unreadable checkpoint %s (%s)", path, err)
            continue
        if step > best_step:
            best, best_step = path, step
    return best


def load(path: str | Path) -> dict:
    """A full pretraining state; any other file fails with a one-line `NotACheckpoint`."""
    state = load_state(path)
    missing = [k for k in ("model", "optimizer", "epoch", "step", "config") if k not in state]
    if missing:
        raise NotACheckpoint(
            f"{path} is not a full pretraining checkpoint (missing {', '.join(missing)}); "
            "to start from encoder weights use --init_weight"
        )
    return state
