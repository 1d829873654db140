"""Elementwise ops and activations: per site, with torch's broadcasting against dense operands.

Every operand is brought to rows that line up with the reference value's features ``[N, *C]``:
another value on the same sites gives its features; a dense tensor broadcastable to the value's
logical shape gives one row per image (``[B, C, 1, 1]``: squeeze-excite gates, drop-path masks), one
row for all (``[1, C, 1, 1]``, ``[C]`` on channels-last: layer scale, biases), or, for a full map,
the rows of the visible sites. Then the op itself runs on the rows: `torch.add`, `F.silu`, ... are
called exactly as the model called them, so their numerics (and autocast) are torch's own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from spark_me.sparse.value import SparseValue, first_value, handles, op_name


def as_cells(t, ref: SparseValue):
    """`t` (a value on `ref`'s sites, a dense tensor, or a number) broadcastable against
    `ref.cells()` ``[n_cells, b*b, *C]``: a per-image tensor becomes one row per cell ``[n, 1, *C]``
    (never one per site), a shared one ``[1, 1, *C]``, a full dense map its values at the sites."""
    if isinstance(t, SparseValue):
        if t.sites.key != ref.sites.key or t.sites.geometry is not ref.sites.geometry:
            raise ref.context.unsupported("an elementwise op between maps of different sites or strides")
        if t.channels_last != ref.channels_last:
            raise ref.context.unsupported("an elementwise op between channels-first and channels-last maps")
        if t.dim() != ref.dim():  # [B, H, W] vs [B, C, H, W]: torch would pair the batch with the channels
            raise ref.context.unsupported(
                f"an elementwise op between maps of different ranks {t.dim()}, {ref.dim()}"
            )
        return t.cells()
    if not isinstance(t, Tensor) or t.dim() == 0:
        return t
    shape = tuple(ref.shape)
    if t.dim() > len(shape):
        raise ref.context.unsupported(f"broadcasting a {t.dim()}-d tensor against a {len(shape)}-d map")
    t = t.reshape((1,) * (len(shape) - t.dim()) + tuple(t.shape))
    hdim, wdim = ref.spatial_dims()
    t = t.movedim((hdim, wdim), (1, 2))  # [b, h, w, *c]
    b, h, w = t.shape[:3]
    if b not in (1, ref.batch):
        raise ref.context.unsupported(f"broadcasting a batch of {b} against a batch of {ref.batch}")
    if h == 1 and w == 1:
        rows = t.reshape(b, *t.shape[3:])
        return rows.unsqueeze(0) if b == 1 else rows.index_select(0, ref.cell_images()).unsqueeze(1)
    height, width = ref.sites.dense_hw
    full = t.expand(ref.batch, height, width, *t.shape[3:]).reshape(-1, *t.shape[3:])
    sites = full.index_select(0, ref.sites.dense_index())  # a dense map: its values at the sites
    return sites.reshape(ref.sites.num_cells, ref.sites.block**2, *sites.shape[1:])


def as_rows(t, ref: SparseValue):
    """`t` as rows ``[N, *C]`` aligned with `ref.feats` (numbers stay numbers)."""
    cells = as_cells(t, ref)
    if not isinstance(cells, Tensor) or cells.dim() == 0:
        return cells
    n, bb = ref.sites.num_cells, ref.sites.block**2
    return ref.from_cells(cells.expand(n, bb, *cells.shape[2:]))


def _convert(a, ref: SparseValue):
    if isinstance(a, list | tuple):
        return type(a)(_convert(b, ref) for b in a)
    return as_cells(a, ref)


def _cells_call(func: Callable, args, kwargs):
    """`func` on the operands as cell views: (the reference value, its first operand as passed, the
    result ``[n_cells, b*b or 1, *C]``)."""
    ref = first_value(args, kwargs)
    converted = _convert(args, ref)
    out = func(*converted, **{k: _convert(v, ref) for k, v in kwargs.items()})
    if not isinstance(out, Tensor) or out.dim() < 2 or out.shape[0] != ref.sites.num_cells:
        raise ref.context.unsupported(f"{op_name(func)} with these operands")
    return ref, converted[0] if converted else None, out


def elementwise(func: Callable) -> Callable:
    """The handler of an elementwise op. One that writes into its first operand (`inplace=True`,
    by keyword or position) writes through the cell view into the value's own features, so every
    value sharing them (a slice, a channel view, a permute) sees the change, as in torch."""

    def handler(*args, **kwargs):
        ref, first, out = _cells_call(func, args, kwargs)
        if out is first and isinstance(args[0], SparseValue):
            return args[0]
        if kwargs.get("inplace"):
            raise ref.context.unsupported(f"{op_name(func)}(inplace=True) with these operands")
        return ref.with_feats(ref.from_cells(out))

    return handler


def in_place(func: Callable) -> Callable:
    """The handler of `x.op_(...)`: torch's own in-place op on `x`'s features, so that every value
    sharing them (a slice, a channel view, a permute of `x`, or `x` the other way round) sees the
    change, and autograd treats it exactly as the dense in-place op."""

    def handler(x, *args, **kwargs):
        if not isinstance(x, SparseValue):  # a dense tensor updated with a sparse operand
            raise first_value(args, kwargs).context.unsupported(f"{op_name(func)} into a dense tensor")
        _, first, out = _cells_call(func, (x, *args), kwargs)
        if out is not first:  # an in-place op returns the (view of the) tensor it wrote into
            raise x.context.unsupported(f"{op_name(func)} with these operands")
        return x

    return handler


# Out-of-place elementwise functions: torch.*, Tensor methods and operators, F.* activations.
_UNARY_NAMES = (
    "abs", "neg", "exp", "log", "sqrt", "rsqrt", "sigmoid", "tanh", "relu", "sin", "cos", "square",
    "reciprocal", "erf", "sign", "floor", "ceil", "round", "clamp", "clamp_min", "clamp_max", "clip", "pow",
    "hardtanh", "nan_to_num", "logit",
)  # fmt: skip
_BINARY_NAMES = (
    "add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "maximum", "minimum",
    "where", "lerp", "addcmul", "addcdiv",
)  # fmt: skip
_ACTIVATIONS = (
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.softplus, F.sigmoid, F.tanh, F.logsigmoid,
    F.tanhshrink, F.softsign, F.threshold, F.rrelu,
)  # fmt: skip
_OPERATORS = (
    Tensor.__add__, Tensor.__radd__, Tensor.__sub__, Tensor.__rsub__, Tensor.__mul__, Tensor.__rmul__,
    Tensor.__truediv__, Tensor.__rtruediv__, Tensor.__pow__, Tensor.__rpow__, Tensor.__neg__,
    Tensor.__abs__, Tensor.__gt__, Tensor.__lt__, Tensor.__ge__, Tensor.__le__, Tensor.__eq__,
    Tensor.__ne__, Tensor.__and__, Tensor.__or__, Tensor.__invert__,
)  # fmt: skip


def _out_of_place() -> list[Callable]:
    funcs: list[Callable] = [*_ACTIVATIONS, *_OPERATORS, F.dropout, torch.nn.functional.alpha_dropout]
    for name in (*_UNARY_NAMES, *_BINARY_NAMES, "gt", "lt", "ge", "le", "eq", "ne", "logical_not"):
        for owner in (torch, Tensor, torch.special):
            func = getattr(owner, name, None)
            if func is not None and func not in funcs:
                funcs.append(func)
    return funcs


def _in_place() -> dict[Callable, Callable]:
    """`Tensor.add_` -> `Tensor.add`, `torch.relu_` -> `torch.relu`, `Tensor.__iadd__` -> `__add__` ...
    (the in-place functions are the keys; the out-of-place ones only say that they exist)."""
    pairs: dict[Callable, Callable] = {}
    for name in (*_UNARY_NAMES, *_BINARY_NAMES, "relu", "sigmoid", "hardtanh"):
        for owner in (torch, Tensor, torch.nn.functional):
            func, base = getattr(owner, name + "_", None), getattr(owner, name, None)
            if func is not None and base is not None:
                pairs.setdefault(func, base)
    for name in ("add", "sub", "mul", "truediv", "pow", "and", "or"):
        inplace_op = getattr(Tensor, f"__i{name}__", None)
        if inplace_op is not None:
            pairs[inplace_op] = getattr(Tensor, f"__{name}__")
    for name in ("relu_", "elu_", "leaky_relu_", "hardtanh_", "celu_", "selu_", "rrelu_", "threshold_"):
        func = getattr(F, name, None)
        if func is not None:
            pairs.setdefault(func, getattr(F, name[:-1]))
    return pairs


for _func in _out_of_place():
    handles(_func)(elementwise(_func))
for _func in _in_place():
    handles(_func)(in_place(_func))


@handles(Tensor.expand_as)
def expand_as(input, other):
    """A per-image / per-channel gate expanded over a map (ECA's ``y.expand_as(x)``): a value on the
    map's sites, each holding its image's (or the shared) row."""
    if isinstance(input, SparseValue):
        if tuple(input.shape) != tuple(other.shape):
            raise input.context.unsupported(f"expand_as from {tuple(input.shape)} to {tuple(other.shape)}")
        return input
    rows = as_rows(input, other)
    return other.with_feats(rows.expand(other.feats.shape))


@handles(F.linear)
def linear(input, weight: Tensor, bias: Tensor | None = None):
    """`nn.Linear` on a channels-last map (ConvNeXt's MLP): per site, over its last channel dim.
    On a channels-first map it would mix the width axis, which has no sparse form."""
    x = input
    if not isinstance(x, SparseValue) or isinstance(weight, SparseValue) or isinstance(bias, SparseValue):
        raise first_value((input, weight, bias)).context.unsupported("F.linear whose weight is a sparse map")
    if not x.channels_last:
        raise x.context.unsupported(f"F.linear over the width of a channels-first map {tuple(x.shape)}")
    return x.with_feats(F.linear(x.feats, weight, bias))


@handles(F.glu)
def glu(input, dim: int = -1):
    """Halves along a channel dim: the logical `dim` is mapped to its feature dim (on a channels-first
    map the default dim -1 is the width, which has no sparse form)."""
    return input.with_feats(F.glu(input.feats, input.feature_dim(dim, "glu")))


@handles(F.prelu)
def prelu(input, weight: Tensor):
    """torch's PReLU weights dim 1: the channels of a channels-first map (a single weight: any map)."""
    x = input
    if not isinstance(x, SparseValue) or isinstance(weight, SparseValue):
        raise first_value((input, weight)).context.unsupported("F.prelu whose weight is a sparse map")
    if weight.numel() != 1 and (x.channels_last or x.feats.dim() != 2):
        raise x.context.unsupported(f"F.prelu per channel of a map of shape {tuple(x.shape)} (dim 1 not C)")
    return x.with_feats(F.prelu(x.feats, weight))
