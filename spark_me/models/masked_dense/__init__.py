"""The masked-dense reference for ANY CNN: the plain dense model, run under a TorchFunctionMode that
gives every torch op SparK's sparse semantics, densely (the oracle of tests/models/test_generic.py
and the masked-dense baseline of the benchmarks for the generic families).

Why: the generic sparse path (a tensor subclass over MinkowskiEngine) must be checked against
something built independently of it. This oracle shares no code with spark_me's sparse or model code:
it runs the model's own unmodified forward on ordinary dense tensors and lets each torch function
act as if masked sites did not exist.

Which tensors are spatial feature maps is decided by identity, not by shape: the (zero-masked) input
images are declared a map, and a tensor is a map exactly when an op with a rule below produced it
from a map. The mode records, for each such tensor object, where its batch / height / width axes
are (`Axes`), so channels-first [B, C, H, W], channels-last [B, H, W, C] and channel shuffles are
all followed. Weights, pooled vectors, running statistics and scalars are never maps, even when
their shape happens to look like one (a [B, C, 1, 1] gate vs the stride-32 map of a 32 px image).

Invariant: every map is exactly 0 at masked sites. The rules (mask at stride s = each stride-32 cell
repeated 32/s times):
- pointwise ops and activations: per site; masked inputs read as 1 (so no inf/NaN, value or grad,
  can arise there), output re-zeroed; other operands must be constant over the spatial axes;
- conv2d / avg_pool2d / nearest interpolate: dense op on the zero-filled map (masked = 0), output
  re-zeroed; max pools read masked sites as -inf;
- batch_norm in training: statistics (and torch's running-stat update) over the visible sites of the
  whole batch; eval: affine; group_norm: per image over its visible sites; layer_norm / rms_norm /
  linear over channel axes only: per site;
- mean / sum / amax / amin / norm over both spatial axes, adaptive pools to 1: per image over visible
  sites (mean divides by the visible count); over channel axes only: per site;
- cat / split / chunk / channel indexing / permute / transpose / reshape that keep the batch and
  spatial axes intact: followed. Anything else touching a map raises `Unsupported`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .axes import CHANNELS_FIRST, Axes, Unsupported
from .rules import RULES, op_name

__all__ = [
    "MaskedDenseMode",
    "MaskedDenseModel",
    "Unsupported",
    "masked_dense_features",
    "stage_modules_of",
    "stage_outputs",
]

PATCH = 32
STRIDES = (4, 8, 16, 32)


class _StopForward(Exception):
    """Raised by the hook of the last stage module: nothing after it is needed (nor must run)."""


class MaskedDenseMode(TorchFunctionMode):
    """Applies the sparse semantics densely for the mask `active` [B, H/32, W/32] bool (True = visible)."""

    def __init__(self, active: Tensor):
        super().__init__()
        if active.dtype != torch.bool or active.ndim != 3:
            raise ValueError(
                f"active must be a [B, h, w] bool mask, got {active.dtype} {tuple(active.shape)}"
            )
        self.active = active
        self.modules: list[str] = []  # paths of the modules being run, innermost last (for errors)
        self._maps: dict[int, tuple[Tensor, Axes]] = {}  # id -> (the map itself, its axes)
        self._grids: dict[tuple[int, torch.device], Tensor] = {}
        self._signatures: dict[Callable, inspect.Signature | None] = {}

    # --- which tensors are maps ------------------------------------------------------------------
    def axes(self, t: object) -> Axes | None:
        if not isinstance(t, Tensor):
            return None
        entry = self._maps.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else None

    def tag(self, t: Tensor, axes: Axes) -> Tensor:
        self.grid(t, axes)  # validates the batch size and the stride
        self._maps[id(t)] = (t, axes)
        return t

    def enter(self, x: Tensor, axes: Axes = CHANNELS_FIRST) -> Tensor:
        """Declare `x` (e.g. the images [B, 3, H, W]) a map: its masked sites are zeroed."""
        return self.masked(x, axes)

    # --- masks -------------------------------------------------------------------------------------
    def grid(self, t: Tensor, axes: Axes) -> Tensor:
        """[B, H', W'] bool visibility at the resolution of map `t`."""
        b, gh, gw = self.active.shape
        h, w = t.shape[axes.height], t.shape[axes.width]
        if t.ndim != axes.ndim or t.shape[axes.batch] != b:
            raise Unsupported(f"a map of shape {tuple(t.shape)} does not match axes {axes} and batch {b}")
        r = h // gh
        if r < 1 or h != r * gh or w != r * gw or PATCH % r:
            raise Unsupported(f"spatial size {h}x{w} is no stride of the {gh}x{gw} grid of {PATCH} px cells")
        key = (r, t.device)
        if key not in self._grids:
            cells = self.active.to(t.device)
            self._grids[key] = cells.repeat_interleave(r, 1).repeat_interleave(r, 2)
        return self._grids[key]

    def mask(self, t: Tensor, axes: Axes) -> Tensor:
        """Bool visibility broadcastable to map `t` (size 1 along its channel axes)."""
        grid = self.grid(t, axes)
        order = sorted(range(3), key=lambda i: axes.sites[i])
        shape = [1] * axes.ndim
        for i in range(3):
            shape[axes.sites[i]] = grid.shape[i]
        return grid.permute(order).reshape(shape)

    def masked(self, y: Tensor, axes: Axes) -> Tensor:
        """`y` with masked sites set to exactly 0, recorded as a map."""
        if not isinstance(y, Tensor) or y.ndim != axes.ndim:
            raise Unsupported(f"expected a {axes.ndim}-d map, got {type(y).__name__}")
        return self.tag(torch.where(self.mask(y, axes), y, y.new_zeros(())), axes)

    def signature(self, func: Callable) -> inspect.Signature | None:
        if func not in self._signatures:
            try:
                self._signatures[func] = inspect.signature(func)
            except (TypeError, ValueError):
                self._signatures[func] = None
        return self._signatures[func]

    # --- dispatch ----------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not any(self.axes(t) is not None for t in tree_flatten((args, kwargs))[0]):
            return func(*args, **kwargs)  # weights, pooled vectors, scalars: plain torch
        where = f" (module '{self.modules[-1]}')" if self.modules else ""
        rule = RULES.get(func)
        if rule is None:
            raise Unsupported(f"masked-dense oracle: no rule for {op_name(func)} on a spatial map{where}")
        try:
            return rule(self, func, args, kwargs)
        except Unsupported as e:
            raise Unsupported(f"masked-dense oracle, {op_name(func)}{where}: {e}") from None


# --- public API ----------------------------------------------------------------------------------------
def stage_modules_of(model: nn.Module) -> list[str]:
    """The last module of each of the reductions 4, 8, 16, 32 in timm's `model.feature_info`."""
    info = model.feature_info
    entries = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
    names = []
    for reduction in STRIDES:
        found = [e["module"] for e in entries if e["reduction"] == reduction]
        if not found:
            raise ValueError(f"{type(model).__name__}.feature_info has no module at reduction {reduction}")
        names.append(found[-1])
    return names


@contextmanager
def _module_scope(model: nn.Module, mode: MaskedDenseMode) -> Iterator[None]:
    """Keeps `mode.modules` as the stack of module paths being run, for error messages."""
    handles = []
    for path, module in model.named_modules():

        def enter(module: nn.Module, inputs: tuple, path: str = path or "<root>") -> None:
            mode.modules.append(path)

        def leave(module: nn.Module, inputs: tuple, output: object) -> None:  # None: output unchanged
            mode.modules.pop()

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave, always_call=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def stage_outputs(model: nn.Module, stage_modules: list[str], images: Tensor) -> list[Tensor]:
    """The outputs of `stage_modules` when `model.forward_features` (or `model`) runs on `images`,
    taken with forward hooks; the forward stops right after the last one (so nothing after it runs,
    nor updates statistics). On plain tensors: the dense model's stage maps."""
    captured: dict[str, Tensor] = {}

    def capture(name: str, output: object) -> None:
        captured[name] = output
        if name == stage_modules[-1] and len(captured) == len(stage_modules):
            raise _StopForward

    handles = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: capture(n, o))
        for n in stage_modules
    ]
    forward = getattr(model, "forward_features", model)
    try:
        forward(images)
        raise RuntimeError(f"the forward ended before the stage modules {stage_modules} had all run")
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return [captured[n] for n in stage_modules]


class MaskedDenseModel(nn.Module):
    """Any CNN run SparK's masked-dense way, with the sparse encoders' contract (the masked-dense
    baseline of the benchmarks for the generic families): `forward(images, active)` -> 4 maps,
    0 at masked sites; `dense(images)` -> the plain model's 4 stage maps."""

    def __init__(self, model: nn.Module, stage_modules: list[str] | None = None):
        super().__init__()
        self.model = model
        self.stage_modules = list(stage_modules) if stage_modules else stage_modules_of(model)

    def forward(self, images: Tensor, active: Tensor) -> list[Tensor]:
        return masked_dense_features(self.model, self.stage_modules, images, active)

    def dense(self, images: Tensor) -> list[Tensor]:
        return stage_outputs(self.model, self.stage_modules, images)


def masked_dense_features(
    model: nn.Module, stage_modules: list[str], images: Tensor, active: Tensor
) -> list[Tensor]:
    """Outputs of the 4 `stage_modules` (strides 4, 8, 16, 32) of `model` run masked-dense.

    images [B, C, H, W] (H, W multiples of 32), active [B, H/32, W/32] bool -> 4 maps
    [B, C_i, H/s, W/s], exactly 0 at masked sites. Runs `model.forward_features` (or `model`) and
    stops right after the last stage module; gradients flow to the model's own parameters.
    """
    b, _, h, w = images.shape
    if h % PATCH or w % PATCH or tuple(active.shape) != (b, h // PATCH, w // PATCH):
        raise ValueError(
            f"images {tuple(images.shape)} and mask {tuple(active.shape)} do not fit {PATCH} px cells"
        )
    if len(stage_modules) != len(STRIDES):
        raise ValueError(f"need {len(STRIDES)} stage modules, got {stage_modules}")
    mode = MaskedDenseMode(active.to(torch.bool))
    with _module_scope(model, mode), mode:
        outs = stage_outputs(model, stage_modules, mode.enter(images))
    for name, out, stride in zip(stage_modules, outs, STRIDES, strict=True):
        if mode.axes(out) != CHANNELS_FIRST or tuple(out.shape[2:]) != (h // stride, w // stride):
            raise Unsupported(f"stage module {name!r} did not output a [B, C, H/{stride}, W/{stride}] map")
    return outs
