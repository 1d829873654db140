"""`--weights` for fine-tuning and probes: a pretraining checkpoint, a timm export or timm weights.

All three hold the backbone under timm's own keys (spark-me's sparse encoders keep timm's names and
layouts, see converters/README.md), so the file is checked against the dense timm model itself,
which works for any timm CNN without building a sparse encoder. The backbone must match key for key
and shape for shape, or the file is refused in one line before anything trains. The classifier
(`fc.*`, `head.*`, `classifier.*`) is taken where the file has it in the right shape (a fine-tuned
export of the same classes) and otherwise left at its initialisation; both are logged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from converters.io import load_state
from converters.timm_format import HEAD, KeyMismatchError, encoder_state

log = logging.getLogger(__name__)

COUNTERS = ("num_batches_tracked",)  # BatchNorm step counters: not weights, may be absent


@dataclass
class SourceWeights:
    path: Path
    state: dict[str, Tensor]  # timm keys
    kind: str  # what the file is, for the log
    model_kwargs: dict = field(default_factory=dict)  # architecture kwargs of a pretraining run


def read_weights(path: str | Path, arch: str) -> SourceWeights:
    """The tensors of `path` under timm's keys; refuses a file made for another architecture."""
    path = Path(path)
    content = load_state(path)  # missing file / not weights: one-line errors
    config = content.get("config") if isinstance(content.get("config"), Mapping) else None
    if config and isinstance(config.get("arch"), str) and config["arch"] != arch:
        raise ValueError(
            f"--weights {path} was trained as {config['arch']}, not --arch {arch} "
            f"(pass --arch {config['arch']})"
        )
    try:
        state = encoder_state(content)
    except KeyMismatchError as err:
        raise ValueError(f"--weights {path}: {err}") from err
    if config and "mask_ratio" in config:
        kind = f"spark-me pretraining checkpoint, epoch {int(content.get('epoch', -1)) + 1}"
    elif config:
        kind = f"spark-me fine-tuning checkpoint, epoch {int(content.get('epoch', -1)) + 1}"
    else:
        kind = "timm weights"
    kwargs = dict(config.get("model_kwargs") or {}) if config else {}
    return SourceWeights(path, state, kind, kwargs)


def is_head(key: str, model: nn.Module) -> bool:
    """True for classifier keys: the model's `pretrained_cfg['classifier']` and fc/head/classifier."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return bool(HEAD.match(key)) or any(key.startswith(name + ".") for name in names)


def load_into(model: nn.Module, source: SourceWeights, arch: str) -> list[str]:
    """Copy the backbone (all of it, or refuse) and a fitting classifier; returns the keys loaded."""
    target = model.state_dict()
    trunk = [k for k in target if not is_head(k, model)]
    missing = [k for k in trunk if k not in source.state and not k.endswith(COUNTERS)]
    wrong = [k for k in trunk if k in source.state and source.state[k].shape != target[k].shape]
    unknown = [k for k in source.state if k not in target and not is_head(k, model)]
    if missing or wrong or unknown:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the {len(trunk)} backbone tensors missing (e.g. {missing[0]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} of another shape (e.g. {k}: {tuple(source.state[k].shape)} in the file, "
                f"{tuple(target[k].shape)} in {arch})"
            )
        if unknown:
            parts.append(f"{len(unknown)} not in {arch} (e.g. {unknown[0]})")
        raise ValueError(
            f"--weights {source.path} does not fit --arch {arch}: {'; '.join(parts)} "
            "(another architecture, depth or width?)"
        )
    loaded = [k for k in target if k in source.state and source.state[k].shape == target[k].shape]
    merged = {**target, **{k: source.state[k] for k in loaded}}
    model.load_state_dict(merged, strict=True)
    kept = [k for k in target if k not in loaded and not k.endswith(COUNTERS)]
    unused = [k for k in source.state if k not in target or k not in loaded]
    log.info("loaded %d of %d tensors from %s (%s)", len(loaded), len(target), source.path, source.kind)
    log.debug("loaded: %s", ", ".join(loaded))
    if kept:
        log.info("left at initialisation: %s", ", ".join(kept))
    if unused:
        log.info("not used from the file: %s", ", ".join(unused))
    return loaded
