"""The rules of the masked-dense oracle: what each torch function does to spatial maps.

One rule per kind of op (see the package docstring for the semantics); `RULES` maps torch's function
objects (as `__torch_function__` receives them: `torch.conv2d`, `F.batch_norm`, `Tensor.add`, ...)
to their rule. A function absent from it has no sparse meaning here and makes the oracle raise.
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

from .axes import (
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

if TYPE_CHECKING:
    from . import MaskedDenseMode

Rule = Callable[["MaskedDenseMode", Callable, tuple, dict], Any]


def op_name(func: Callable) -> str:
    return getattr(func, "__name__", None) or repr(func)


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


def _out_of_place(mode: MaskedDenseMode, func: Callable, args: tuple, kwargs: dict) -> tuple | None:
    """(function, args, kwargs) computing an in-place op's result out of place; None if not in place."""
    name = op_name(func)
    if name.startswith("__i") or (name.endswith("_") and not name.endswith("__")):
        plain = "__" + name[3:] if name.startswith("__i") else name[:-1]
        for owner in (torch.Tensor, torch, F):
            if (f := getattr(owner, plain, None)) is not None:
                return f, args, kwargs
        raise Unsupported(f"no out-of-place form of {name}")
    sig = mode.signature(func)
    if sig is None or "inplace" not in sig.parameters:
        return None
    bound = sig.bind(*args, **kwargs)
    if not bound.arguments.get("inplace", False):
        return None
    bound.arguments["inplace"] = False
    return func, bound.args, bound.kwargs


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
    target = args[0] if args else None
    in_place = _out_of_place(mode, func, args, kwargs)
    if in_place is not None:  # computed out of place, then written into the map (no version clash)
        if mode.axes(target) is None:
            raise Unsupported("an in-place op writes spatial values into a tensor that is not a map")
        func, args, kwargs = in_place

    def safe(t: object) -> object:  # masked sites read as 1: finite values and gradients there
        if mode.axes(t) is None:
            return t
        return torch.where(visible, t, torch.ones((), dtype=t.dtype, device=t.device))

    out = func(*tree_map(safe, args), **tree_map(safe, kwargs))
    if not isinstance(out, Tensor) or out.ndim != axes.ndim:
        raise Unsupported(f"result {type(out).__name__} is not a {axes.ndim}-d map")
    if [out.shape[i] for i in axes.sites] != [ref.shape[i] for i in axes.sites]:
        raise Unsupported(f"result of shape {tuple(out.shape)} is not per site of {tuple(ref.shape)}")
    out = mode.masked(out, axes)
    if in_place is None:
        return out
    if out.shape != target.shape:
        raise Unsupported(f"an in-place op would broadcast {tuple(target.shape)} to {tuple(out.shape)}")
    return target.copy_(out)


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
    if op_name(func) == "expand_as" and mode.axes(args[0]) is not None:
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
    position = 2 if func is F.adaptive_max_pool2d else 6  # of return_indices (torch.max_pool2d: none)
    if kwargs.get("return_indices") or (
        func is not torch.max_pool2d and len(args) > position and args[position]
    ):
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
    name = op_name(func)
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
        require_channel_axis(axes, d, op_name(func))
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
    unbind = op_name(func) == "unbind"
    position = 1 if unbind else 2
    dim = args[position] if len(args) > position else kwargs.get("dim", 0)
    d = require_channel_axis(axes, dim, op_name(func))
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
    "logsigmoid exp expm1 log log1p sqrt rsqrt square pow reciprocal clamp clip clamp_min clamp_max "
    "minimum maximum where addcmul addcdiv lerp sign erf threshold gt lt ge le eq ne "
    "dropout dropout2d alpha_dropout feature_alpha_dropout"
)
_DUNDERS = (
    "__add__ __radd__ __iadd__ __sub__ __rsub__ __isub__ __mul__ __rmul__ __imul__ __truediv__ __rtruediv__ "
    "__itruediv__ __div__ __rdiv__ __idiv__ __pow__ __rpow__ __ipow__ __neg__ __abs__ __pos__"
)
_METADATA_METHODS = (
    "dim size numel nelement stride is_contiguous is_floating_point is_complex element_size get_device "
    "storage_offset data_ptr __len__ __repr__ __format__"
)
_METADATA_PROPERTIES = (
    "shape dtype device ndim requires_grad is_cuda is_cpu is_sparse is_quantized is_meta is_nested "
    "is_mkldnn layout is_leaf grad_fn names _version output_nr itemsize nbytes"
)
_OWNERS = (torch, torch.Tensor, F, torch._C._nn, torch.special, torch.linalg)


def _build_rules() -> MappingProxyType:
    rules: dict[Callable, Rule] = {}

    def add(names: str, rule: Rule, owners: tuple = _OWNERS) -> None:
        for n in names.split():
            for owner in owners:
                if (f := getattr(owner, n, None)) is not None:
                    rules[f] = rule

    add(_POINTWISE + " " + " ".join(n + "_" for n in _POINTWISE.split()) + " " + _DUNDERS, _pointwise)
    add(_METADATA_METHODS, _metadata, (torch.Tensor,))
    for prop in _METADATA_PROPERTIES.split():
        if (descriptor := getattr(torch.Tensor, prop, None)) is not None:
            rules[descriptor.__get__] = _metadata
    add(
        "contiguous clone detach to type type_as double float half bfloat16 cpu requires_grad_",
        _same_layout,
    )
    add("expand_as new_empty new_zeros new_ones new_full new_tensor", _lends_shape, (torch.Tensor,))
    add("zeros_like", _zeros_like, (torch,))
    add("conv2d avg_pool2d", _window, (torch, F, torch._C._nn))
    add("interpolate upsample_nearest2d", _interpolate, (F, torch._C._nn))
    add("max_pool2d adaptive_max_pool2d", _max_pool, (torch, F))
    add("adaptive_avg_pool2d", _adaptive_avg, (F,))
    add("mean sum amax amin norm", _reduce, (torch, torch.Tensor))
    rules[torch.linalg.vector_norm] = _reduce
    add("linear layer_norm rms_norm", _per_site, (F,))
    rules[F.batch_norm] = _batch_norm
    rules[F.group_norm] = _group_norm
    add("cat concat concatenate", _cat, (torch,))
    add("split chunk tensor_split split_with_sizes unbind", _split, (torch, torch.Tensor))
    add("permute", _permute, (torch, torch.Tensor))
    add("transpose swapaxes swapdims", _transpose, (torch, torch.Tensor))
    add("view reshape flatten unflatten squeeze unsqueeze view_as reshape_as", _reshape)
    rules[torch.Tensor.__getitem__] = _getitem
    return MappingProxyType(rules)


RULES = _build_rules()
