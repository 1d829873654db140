"""The masked-dense oracle for ANY CNN: the plain dense model, run under a TorchFunctionMode that gives
every torch op issue 19's sparse semantics, densely.

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
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from ._map_axes import (
    CHANNELS_FIRST,
    Axes,
    Unsupported,
    after_getitem,
    after_permute,
    after_removing,
    after_reshape,
    after_transpose,
    normalize_dims,
    require_channel_axis,
)

__all__ = ["MaskedDenseMode", "Unsupported", "masked_dense_features", "stage_modules_of"]

PATCH = 32
STRIDES = (4, 8, 16, 32)
Rule = Callable[["MaskedDenseMode", Callable, tuple, dict], Any]


class _StopForward(Exception):
    """Raised by the hook of the last stage module: nothing after it is needed (nor must run)."""


def _name(func: Callable) -> str:
    return getattr(func, "__name__", None) or repr(func)


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
        rule = _RULES.get(func)
        if rule is None:
            raise Unsupported(f"masked-dense oracle: no rule for {_name(func)} on a spatial map{where}")
        try:
            return rule(self, func, args, kwargs)
        except Unsupported as e:
            raise Unsupported(f"masked-dense oracle, {_name(func)}{where}: {e}") from None


# --- helpers of the rules ----------------------------------------------------------------------------
def _maps_in(mode: MaskedDenseMode, tree: object) -> list[tuple[Tensor, Axes]]:
    return [(t, a) for t in tree_flatten(tree)[0] if (a := mode.axes(t)) is not None]


def _one_layout(maps: list[tuple[Tensor, Axes]]) -> tuple[Tensor, Axes]:
    """The maps of one op must share axes and batch/spatial sizes (one stride, one layout)."""
    ref, axes = maps[0]
    key = (axes, [ref.shape[i] for i in axes.sites])
    for t, a in maps[1:]:
        if (a, [t.shape[i] for i in a.sites]) != key:
            raise Unsupported(
                f"maps of different layouts or strides: {tuple(ref.shape)} {axes}, {tuple(t.shape)} {a}"
            )
    return ref, axes


def _only_first(mode: MaskedDenseMode, args: tuple, kwargs: dict) -> tuple[Tensor, Axes]:
    """The op's input (first argument) is the only map; weights etc. must not be maps."""
    x = args[0] if args else kwargs.get("input")
    axes = mode.axes(x)
    if axes is None or len(_maps_in(mode, (args, kwargs))) != 1:
        raise Unsupported("a spatial map in a position other than the input (e.g. as a weight)")
    return x, axes


def _check_broadcast(t: Tensor, ref: Tensor, axes: Axes) -> None:
    """A non-map operand must be constant over the spatial axes (per image / channel / scalar)."""
    offset = axes.ndim - t.ndim
    if offset < 0:
        raise Unsupported(f"a {t.ndim}-d operand broadcasts a {axes.ndim}-d map to more axes")
    for a in (axes.height, axes.width):
        if a >= offset and t.shape[a - offset] != 1 and t.stride(a - offset) != 0:
            raise Unsupported(f"an operand of shape {tuple(t.shape)} varies over the spatial axes")
    if axes.batch >= offset and t.shape[axes.batch - offset] not in (1, ref.shape[axes.batch]):
        raise Unsupported(f"an operand of shape {tuple(t.shape)} does not broadcast over the batch")


def _is_inplace(mode: MaskedDenseMode, func: Callable, args: tuple, kwargs: dict) -> bool:
    name = _name(func)
    if name.startswith("__i") or (name.endswith("_") and not name.endswith("__")):
        return True
    sig = mode.signature(func)
    if sig is None or "inplace" not in sig.parameters:
        return False
    return bool(sig.bind(*args, **kwargs).arguments.get("inplace", False))


_SINGULAR_INPLACE = {"log_", "sqrt_", "rsqrt_", "reciprocal_", "pow_", "__ipow__"}
_DIVIDING_INPLACE = {"div_", "divide_", "true_divide_", "__itruediv__", "__idiv__"}


# --- the rules -----------------------------------------------------------------------------------------
def _metadata(mode: MaskedDenseMode, func: Callable, args: tuple, kwargs: dict) -> Any:
    out = func(*args, **kwargs)
    if any(isinstance(t, Tensor) for t in tree_flatten(out)[0]):
        raise Unsupported("a metadata accessor returned a tensor")
    return out


def _pointwise(mode: MaskedDenseMode, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    maps = _maps_in(mode, (args, kwargs))
    ref, axes = _one_layout(maps)
    for t in tree_flatten((args, kwargs))[0]:
        if isinstance(t, Tensor) and mode.axes(t) is None:
            _check_broadcast(t, ref, axes)
    visible = mode.mask(ref, axes)
    self_ = args[0] if args else None
    inplace = _is_inplace(mode, func, args, kwargs)
    if inplace and mode.axes(self_) is None:
        raise Unsupported("an in-place op writes spatial values into a tensor that is not a map")
    name = _name(func)
    others_are_maps = any(t is not self_ for t, _ in maps)
    if inplace and (name in _SINGULAR_INPLACE or (name in _DIVIDING_INPLACE and others_are_maps)):
        raise Unsupported("an in-place op singular at 0 on a map")

    def safe(t: object) -> object:  # masked sites read as 1: finite values and gradients there
        if mode.axes(t) is None or (inplace and t is self_):
            return t
        return torch.where(visible, t, torch.ones((), dtype=t.dtype, device=t.device))

    out = func(*tree_map(safe, args), **tree_map(safe, kwargs))
    if inplace:
        out.masked_fill_(~visible, 0)
        return out
    if not isinstance(out, Tensor) or out.ndim != axes.ndim:
        raise Unsupported(f"result {type(out).__name__} is not a {axes.ndim}-d map")
    if [out.shape[i] for i in axes.sites] != [ref.shape[i] for i in axes.sites]:
        raise Unsupported(f"result of shape {tuple(out.shape)} is not per site of {tuple(ref.shape)}")
    return mode.masked(out, axes)


def _same_layout(mode: MaskedDenseMode, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    """contiguous / clone / to / type conversions: same values, same axes."""
    axes = mode.axes(args[0])
    if axes is None:  # `y.to(x)`, `y.type_as(x)`: the map only lends its dtype / device
        return func(*args, **kwargs)
    out = func(*args, **kwargs)
    if out.shape != args[0].shape:
        raise Unsupported(f"shape changed {tuple(args[0].shape)} -> {tuple(out.shape)}")
    return mode.tag(out, axes)


def _lends_shape(mode: MaskedDenseMode, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    """`y.expand_as(x)` (y per image), `x.new_empty(shape)`: the map lends only shape/dtype/device."""
    if _name(func) == "expand_as" and mode.axes(args[0]) is not None:
        raise Unsupported("expanding a spatial map")
    return func(*args, **kwargs)


def _zeros_like(mode: MaskedDenseMode, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    x, axes = _only_first(mode, args, kwargs)
    return mode.tag(func(*args, **kwargs), axes)


def _window(mode: MaskedDenseMode, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    """conv2d / avg_pool2d: masked sites read as zeros; the output keeps its visible sites only."""
    x, axes = _only_first(mode, args, kwargs)
    if axes != CHANNELS_FIRST:
        raise Unsupported(f"a channels-first [B, C, H, W] map is needed, axes are {axes}")
    return mode.masked(func(*args, **kwargs), CHANNELS_FIRST)


def _interpolate(mode: MaskedDenseMode, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    if func is F.interpolate:
        how = mode.signature(func).bind(*args, **kwargs).arguments.get("mode", "nearest")
        if how != "nearest":
            raise Unsupported(f"interpolate mode {how!r} (only 'nearest' has a sparse meaning here)")
    return _window(mode, func, args, kwargs)


def _max_pool(mode: MaskedDenseMode, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    """Masked sites are ignored (-inf); a visible output always has a visible site in its window."""
    x, axes = _only_first(mode, args, kwargs)
    if axes != CHANNELS_FIRST:
        raise Unsupported("max pool of a map that is not channels-first")
    if kwargs.get("return_indices") or (func is not torch.max_pool2d and len(args) > 6 and args[6]):
        raise Unsupported("max pool with return_indices")
    filled = torch.where(mode.mask(x, axes), x, torch.full((), float("-inf"), dtype=x.dtype))
    out = func(filled, *args[1:], **{k: v for k, v in kwargs.items() if k != "input"})
    if func is F.adaptive_max_pool2d:
        if tuple(out.shape[2:]) != (1, 1):
            raise Unsupported("adaptive max pool to a size other than 1")
        return out  # per image, not a map
    y = mode.masked(out, CHANNELS_FIRST)
    if torch.isinf(y).any():
        raise Unsupported("a visible output of a max pool saw no visible site")
    return y


def _adaptive_avg(mode: MaskedDenseMode, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    x, axes = _only_first(mode, args, kwargs)
    size = args[1] if len(args) > 1 else kwargs["output_size"]
    if axes != CHANNELS_FIRST or size not in (1, (1, 1), [1, 1]):
        raise Unsupported(f"adaptive average pool to {size} (only 1 is a per-image reduction)")
    visible = mode.mask(x, axes)
    return x.sum((2, 3), keepdim=True) / visible.sum((2, 3), keepdim=True)


_REDUCE_PARAMS = {
    "mean": "dim",
    "sum": "dim",
    "amax": "dim",
    "amin": "dim",
    "norm": "p",
    "linalg_vector_norm": "ord",
}


def _reduce(mode: MaskedDenseMode, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    x, axes = _only_first(mode, args, kwargs)
    name = _name(func)
    names = ("input", "p", "dim", "keepdim") if _REDUCE_PARAMS[name] != "dim" else ("input", "dim", "keepdim")
    params = dict(zip(names, args, strict=False)) | kwargs
    if name == "linalg_vector_norm":
        params.setdefault("p", params.pop("ord", 2))
    dims = normalize_dims(params.get("dim"), axes.ndim)
    keepdim = bool(params.get("keepdim", False))
    if axes.batch in dims:
        raise Unsupported(f"a reduction over the batch axis (dims {dims})")
    spatial = {axes.height, axes.width} & set(dims)
    if not spatial:  # over channel axes only: per site
        return mode.masked(func(*args, **kwargs), axes if keepdim else after_removing(axes, dims))
    if spatial != {axes.height, axes.width}:
        raise Unsupported(f"a reduction over one spatial axis only (dims {dims})")
    visible = mode.mask(x, axes)
    if name in ("amax", "amin"):
        fill = torch.full((), float("-inf") if name == "amax" else float("inf"), dtype=x.dtype)
        return func(torch.where(visible, x, fill), *args[1:], **kwargs)
    if name in ("norm", "linalg_vector_norm"):
        p = params.get("p", "fro")
        if not (p == "fro" or (isinstance(p, int | float) and p > 0)):
            raise Unsupported(f"norm of order {p!r} (zeros of masked sites would count)")
        return func(*args, **kwargs)  # masked sites hold 0: they add nothing
    if name == "sum":
        return func(*args, **kwargs)
    total = torch.sum(x, dim=dims, keepdim=keepdim, dtype=params.get("dtype"))
    factor = 1
    for d in dims:
        if d not in axes.sites:
            factor *= x.shape[d]
    return total / (visible.sum(dim=dims, keepdim=keepdim) * factor)


def _per_site(mode: MaskedDenseMode, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    """linear / layer_norm / rms_norm: act on the trailing channel axes of each site."""
    x, axes = _only_first(mode, args, kwargs)
    trailing = 1
    if func is not F.linear:
        shape = mode.signature(func).bind(*args, **kwargs).arguments["normalized_shape"]
        trailing = 1 if isinstance(shape, int) else len(shape)
    for d in range(axes.ndim - trailing, axes.ndim):
        require_channel_axis(axes, d, _name(func))
    return mode.masked(func(*args, **kwargs), axes)


def _batch_norm(mode: MaskedDenseMode, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    x, axes = _only_first(mode, args, kwargs)
    p = mode.signature(func).bind(*args, **kwargs)
    p.apply_defaults()
    a = p.arguments
    if axes != CHANNELS_FIRST:
        raise Unsupported("batch_norm of a map that is not [B, C, H, W]")
    if not a["training"] and a["running_mean"] is not None and a["running_var"] is not None:
        return mode.masked(func(*args, **kwargs), axes)
    keep = mode.grid(x, axes)  # [B, H, W]
    vectors = x.permute(0, 2, 3, 1)[keep]  # [N, C]: the visible sites of the whole batch
    normed = func(
        vectors, a["running_mean"], a["running_var"], a["weight"], a["bias"], True, a["momentum"], a["eps"]
    )
    b, c, h, w = x.shape
    out = x.new_zeros(b, h, w, c).index_put((keep,), normed)
    return mode.tag(out.permute(0, 3, 1, 2), axes)


def _group_norm(mode: MaskedDenseMode, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    x, axes = _only_first(mode, args, kwargs)
    a = mode.signature(func).bind(*args, **kwargs)
    a.apply_defaults()
    p = a.arguments
    if axes != CHANNELS_FIRST:
        raise Unsupported("group_norm of a map that is not [B, C, H, W]")
    keep = mode.grid(x, axes)
    sites = x.permute(0, 2, 3, 1)  # [B, H, W, C]
    per_image = [  # [N_b, C]: statistics from image b's visible sites only
        func(sites[i][keep[i]].t()[None], p["num_groups"], p["weight"], p["bias"], p["eps"])[0].t()
        for i in range(x.shape[0])
    ]
    out = sites.new_zeros(sites.shape).index_put((keep,), torch.cat(per_image))
    return mode.tag(out.permute(0, 3, 1, 2), axes)


def _cat(mode: MaskedDenseMode, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    tensors = args[0] if args else kwargs["tensors"]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    if any(mode.axes(t) is None for t in tensors):
        raise Unsupported("concatenating a map with a tensor that is not one")
    _, axes = _one_layout([(t, mode.axes(t)) for t in tensors])
    require_channel_axis(axes, dim, "cat")
    return mode.tag(func(*args, **kwargs), axes)


def _split(mode: MaskedDenseMode, func: Callable, args: tuple, kwargs: dict) -> tuple[Tensor, ...]:
    """split / chunk / tensor_split / split_with_sizes (dim is the 3rd argument) and unbind (2nd)."""
    x, axes = _only_first(mode, args, kwargs)
    unbind = _name(func) == "unbind"
    position = 1 if unbind else 2
    dim = args[position] if len(args) > position else kwargs.get("dim", 0)
    d = require_channel_axis(axes, dim, _name(func))
    parts = func(*args, **kwargs)
    new = after_removing(axes, [d]) if unbind else axes
    return type(parts)(mode.tag(t, new) for t in parts) if isinstance(parts, tuple) else parts


def _permute(mode: MaskedDenseMode, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    x, axes = _only_first(mode, args, kwargs)
    dims = kwargs.get("dims", args[1:])
    if len(dims) == 1 and isinstance(dims[0], list | tuple):
        dims = dims[0]
    return mode.tag(func(*args, **kwargs), after_permute(axes, dims))


def _transpose(mode: MaskedDenseMode, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    x, axes = _only_first(mode, args, kwargs)
    d0 = args[1] if len(args) > 1 else kwargs["dim0"]
    d1 = args[2] if len(args) > 2 else kwargs["dim1"]
    return mode.tag(func(*args, **kwargs), after_transpose(axes, d0, d1))


def _reshape(mode: MaskedDenseMode, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    if mode.axes(args[0]) is None:
        raise Unsupported("reshaping a tensor to a map's shape (view_as / reshape_as a map)")
    x, axes = args[0], mode.axes(args[0])
    out = func(*args, **kwargs)
    return mode.tag(out, after_reshape(axes, x.shape, out.shape))


def _getitem(mode: MaskedDenseMode, func: Callable, args: tuple, kwargs: dict) -> Tensor:
    x, axes = _only_first(mode, args, kwargs)
    new = after_getitem(axes, x.shape, args[1])
    return mode.tag(func(*args, **kwargs), new)


# --- the registry: torch function objects -> rule -----------------------------------------------------
_POINTWISE = (
    "add sub subtract mul multiply div divide true_divide rsub neg negative abs positive relu relu6 "
    "sigmoid tanh silu gelu mish hardswish hardsigmoid hardtanh leaky_relu elu selu celu softplus softsign "
    "logsigmoid exp expm1 log log1p sqrt rsqrt square pow reciprocal clamp clip clamp_min clamp_max minimum "
    "maximum where addcmul addcdiv lerp sign erf threshold dropout dropout2d alpha_dropout feature_alpha_dropout"
).split()
_DUNDERS = (
    "__add__ __radd__ __iadd__ __sub__ __rsub__ __isub__ __mul__ __rmul__ __imul__ __truediv__ __rtruediv__ "
    "__itruediv__ __div__ __rdiv__ __idiv__ __pow__ __rpow__ __ipow__ __neg__ __abs__ __pos__"
).split()
_METADATA_METHODS = (
    "dim size numel nelement stride is_contiguous is_floating_point is_complex element_size get_device "
    "storage_offset data_ptr __len__ __repr__ __format__"
).split()
_METADATA_PROPERTIES = (
    "shape dtype device ndim requires_grad is_cuda is_cpu is_sparse is_quantized is_meta is_nested "
    "is_mkldnn layout is_leaf grad_fn names _version output_nr itemsize nbytes"
).split()
_OWNERS = (torch, torch.Tensor, F, torch._C._nn, torch.special, torch.linalg)


def _build_rules() -> MappingProxyType:
    rules: dict[Callable, Rule] = {}

    def add(names: list[str] | str, rule: Rule, owners: tuple = _OWNERS) -> None:
        for n in [names] if isinstance(names, str) else names:
            for owner in owners:
                if (f := getattr(owner, n, None)) is not None:
                    rules[f] = rule

    add(_POINTWISE + [n + "_" for n in _POINTWISE] + _DUNDERS, _pointwise)
    add(_METADATA_METHODS, _metadata, (torch.Tensor,))
    for prop in _METADATA_PROPERTIES:
        if (descriptor := getattr(torch.Tensor, prop, None)) is not None:
            rules[descriptor.__get__] = _metadata
    add(
        "contiguous clone detach to type type_as double float half bfloat16 cpu requires_grad_".split(),
        _same_layout,
    )
    add("expand_as new_empty new_zeros new_ones new_full new_tensor".split(), _lends_shape, (torch.Tensor,))
    add("zeros_like", _zeros_like, (torch,))
    add("conv2d avg_pool2d".split(), _window, (torch, F, torch._C._nn))
    add("interpolate upsample_nearest2d".split(), _interpolate, (F, torch._C._nn))
    add("max_pool2d adaptive_max_pool2d".split(), _max_pool, (torch, F))
    add("adaptive_avg_pool2d", _adaptive_avg, (F,))
    add("mean sum amax amin norm".split(), _reduce, (torch, torch.Tensor))
    rules[torch.linalg.vector_norm] = _reduce
    add("linear layer_norm rms_norm".split(), _per_site, (F,))
    rules[F.batch_norm] = _batch_norm
    rules[F.group_norm] = _group_norm
    add("cat concat concatenate".split(), _cat, (torch,))
    add("split chunk tensor_split split_with_sizes unbind".split(), _split, (torch, torch.Tensor))
    add("permute", _permute, (torch, torch.Tensor))
    add("transpose swapaxes swapdims".split(), _transpose, (torch, torch.Tensor))
    add("view reshape flatten unflatten squeeze unsqueeze view_as reshape_as".split(), _reshape)
    rules[torch.Tensor.__getitem__] = _getitem
    return MappingProxyType(rules)


_RULES = _build_rules()


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
        with _module_scope(model, mode), mode:
            forward(mode.enter(images))
        raise RuntimeError(f"the forward ended before the stage modules {stage_modules} had all run")
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    outs = [captured[n] for n in stage_modules]
    for name, out, stride in zip(stage_modules, outs, STRIDES, strict=True):
        if mode.axes(out) != CHANNELS_FIRST or tuple(out.shape[2:]) != (h // stride, w // stride):
            raise Unsupported(f"stage module {name!r} did not output a [B, C, H/{stride}, W/{stride}] map")
    return outs
