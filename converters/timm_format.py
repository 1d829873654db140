"""Sparse encoder state_dict <-> dense timm state_dict.

spark-me's sparse layers keep torch's parameter layout (conv weights [out, in, k, k], biases [C],
GRN [C]), so for its own checkpoints the conversion is a checked, key-for-key copy. State dicts in
MinkowskiEngine's layout (kernels [k*k, in, out], depthwise [k*k, C], biases [1, C], GRN [1,1,1,C]),
e.g. from other ME-based code after renaming, are re-laid out on the way in.

Checks are loud: every missing or unexpected key is named; timm's classifier (`fc.*`, `head.*`)
is reported as dropped on import and left to timm's initialisation on export.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from spark_me.sparse.layout import me_depthwise_to_conv_weight, me_kernel_to_conv_weight

log = logging.getLogger(__name__)

# timm classifier parameters: not part of a SparK encoder
HEAD = re.compile(r"^(fc|head|classifier)\.")
# wrappers around a model's keys in checkpoints: DDP, torch.compile
WRAPPERS = ("module.", "_orig_mod.")


class KeyMismatchError(ValueError):
    """The state_dict does not fit the architecture. The message is one line (counts and a few
    keys); `differ` maps each kind of difference ("missing", "unexpected", "of another shape") to
    every offending key, for a caller that wants them all."""

    def __init__(self, message: str, differ: dict[str, list[str]] | None = None) -> None:
        super().__init__(message)
        self.differ = differ or {}


def expected_shapes(arch: str, **model_kwargs) -> dict[str, torch.Size]:
    """Keys and shapes of `create_encoder(arch)` (built on the meta device: no memory, no time)."""
    return dict(_shapes(arch, tuple(sorted(model_kwargs.items()))))


@functools.lru_cache(maxsize=64)
def _shapes(arch: str, model_kwargs: tuple) -> tuple[tuple[str, torch.Size], ...]:
    from spark_me.models.registry import create_encoder, is_hand_written

    # Hand-written encoders build on the meta device (no memory, no time); the generic path runs
    # its model once at construction to find the modules after the last stage, so it needs real
    # tensors (a second or so).
    device = torch.device("meta") if is_hand_written(arch) else torch.device("cpu")
    with device:
        encoder = create_encoder(arch, dataflow="rules", **dict(model_kwargs))
    return tuple((k, v.shape) for k, v in encoder.state_dict().items())


def encoder_state(checkpoint: Mapping[str, object]) -> dict[str, Tensor]:
    """The encoder's tensors from a full pretraining checkpoint, a SparK model or an encoder state_dict."""
    state = checkpoint
    for key in ("model", "state_dict", "module"):
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    if not all(isinstance(v, Tensor) for v in state.values()):
        raise KeyMismatchError(
            "no state_dict of tensors found (looked at the top level, 'model', 'state_dict')"
        )
    stripped = {}
    for key, value in state.items():
        for prefix in WRAPPERS:
            key = key.removeprefix(prefix)
        stripped[key] = value
    if any(k.startswith("encoder.") for k in stripped):  # a SparK model: keep the encoder only
        return {k.removeprefix("encoder."): v for k, v in stripped.items() if k.startswith("encoder.")}
    return stripped


def _relayout(key: str, value: Tensor, shape: torch.Size) -> Tensor:
    """Bring a tensor in ME layout to torch layout when the shapes say it is one."""
    if value.shape == shape:
        return value
    if (
        len(shape) == 4
        and shape[1] == 1
        and value.dim() == 2
        and value.shape == (shape[2] * shape[3], shape[0])
    ):
        return me_depthwise_to_conv_weight(value, shape[-1])
    if len(shape) == 4 and value.dim() in (2, 3):
        converted = me_kernel_to_conv_weight(value, shape[-1])
        if converted.shape == shape:
            return converted
    if value.numel() == shape.numel() and value.dim() > len(shape) and all(s == 1 for s in value.shape[:-1]):
        return value.reshape(shape)  # [1, C] biases, [1, 1, 1, C] GRN
    raise KeyMismatchError(f"{key}: shape {tuple(value.shape)} does not fit {tuple(shape)}")


def closest_arch(keys: Iterable[str]) -> str | None:
    """The registered architecture whose key set overlaps `keys` most (for error messages)."""
    from spark_me.models.registry import is_hand_written, list_encoders

    keys = set(keys)
    # hand-written encoders build on the meta device in milliseconds, generic ones take about a
    # second each: an exact match among the former spares building all of the latter
    archs = sorted(list_encoders(), key=lambda a: not is_hand_written(a))
    scores = {}
    for a in archs:
        scores[a] = len(keys & set(expected_shapes(a))) / len(keys | set(expected_shapes(a)))
        if scores[a] == 1.0:
            return a
    best = max(scores, key=scores.get, default=None)
    return best if best and scores[best] > 0.5 else None


def _check(
    state: Mapping[str, Tensor], expected: Mapping[str, torch.Size], arch: str, allow_missing: Iterable[str]
) -> None:
    allowed = set(allow_missing)
    missing = sorted(k for k in expected if k not in state and k not in allowed)
    unexpected = sorted(k for k in state if k not in expected)
    if missing or unexpected:
        reshaped = sorted(k for k in expected if k in state and not _fits(state[k], expected[k]))
        differ = {"missing": missing, "unexpected": unexpected, "of another shape": reshaped}
        raise KeyMismatchError(mismatch_line(arch, differ, closest_arch(state.keys())), differ)


def _fits(value: Tensor, shape: torch.Size) -> bool:
    try:
        _relayout("", value, shape)
    except KeyMismatchError:
        return False
    return True


def _some(keys: list[str], shown: int = 3) -> str:
    return ", ".join(keys[:shown]) + (", ..." if len(keys) > shown else "")


def mismatch_line(arch: str, differ: dict[str, list[str]], guess: str | None) -> str:
    """One line (a log line, not a report): how many keys differ and how (`differ`: kind -> keys),
    a few of each, and which registered architecture the keys look like, so that a wrong --arch
    says what to pass instead."""
    parts = [f"{kind} {len(keys)} ({_some(keys)})" for kind, keys in differ.items() if keys]
    if guess and guess != arch:
        parts.append(f"the keys look like {guess}, not {arch} (pass --arch {guess})")
    else:
        parts.append("a different depth/width? keys to drop: --allow-missing KEY ... (allow_missing=[...])")
    count = sum(len(keys) for keys in differ.values())
    return f"state_dict does not match {arch!r}: {count} keys differ: " + "; ".join(parts)


def to_timm(
    state_dict: Mapping[str, object], arch: str, allow_missing: Iterable[str] = (), **model_kwargs
) -> dict[str, Tensor]:
    """Sparse encoder (or full SparK checkpoint) -> timm `arch` state_dict without the classifier.

    `timm.create_model(arch).load_state_dict(result, strict=False)` then misses exactly the
    classifier keys (`fc.*` / `head.*`), which stay at timm's initialisation.
    """
    state = encoder_state(state_dict)
    expected = expected_shapes(arch, **model_kwargs)
    _check(state, expected, arch, allow_missing)
    return {k: _relayout(k, state[k], expected[k]).detach().clone() for k in expected if k in state}


def from_timm(
    state_dict: Mapping[str, object], arch: str, allow_missing: Iterable[str] = (), **model_kwargs
) -> dict[str, Tensor]:
    """timm state_dict (supervised weights, SparK "timm style" or FCMAE checkpoints as timm loads
    them) -> sparse encoder state_dict, loadable with `strict=True`. The classifier is dropped (logged)."""
    state = encoder_state(state_dict)
    dropped = sorted(k for k in state if HEAD.match(k))
    state = {k: v for k, v in state.items() if not HEAD.match(k)}
    expected = expected_shapes(arch, **model_kwargs)
    _check(state, expected, arch, allow_missing)  # a refused file gets its one line and nothing else
    if dropped:
        log.info("dropping the classifier: %s", ", ".join(dropped))
    return {k: _relayout(k, state[k], expected[k]).detach().clone() for k in expected if k in state}
