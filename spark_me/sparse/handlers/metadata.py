"""Metadata queries answered from the value's logical (dense-looking) shape, dtype and device."""

from __future__ import annotations

import torch
from torch import Tensor

from spark_me.sparse.value import SparseValue, handles

_QUERIES = (
    Tensor.dim,
    Tensor.size,
    Tensor.numel,
    Tensor.is_floating_point,
    Tensor.is_complex,
    Tensor.element_size,
    Tensor.get_device,
    Tensor.__len__,
    Tensor.shape.__get__,  # type: ignore[attr-defined]
    Tensor.ndim.__get__,  # type: ignore[attr-defined]
    Tensor.dtype.__get__,  # type: ignore[attr-defined]
    Tensor.device.__get__,  # type: ignore[attr-defined]
    Tensor.is_cuda.__get__,  # type: ignore[attr-defined]
    Tensor.layout.__get__,  # type: ignore[attr-defined]
    Tensor.is_sparse.__get__,  # type: ignore[attr-defined]
    Tensor.is_quantized.__get__,  # type: ignore[attr-defined]
    Tensor.is_meta.__get__,  # type: ignore[attr-defined]
    Tensor.is_nested.__get__,  # type: ignore[attr-defined]
)


def _query(func):
    def answer(*args, **kwargs):
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    return answer


for _func in _QUERIES:
    handles(_func)(_query(_func))


@handles(Tensor.requires_grad.__get__)  # type: ignore[attr-defined]
def requires_grad(x: SparseValue) -> bool:
    return x.feats.requires_grad


@handles(Tensor.is_contiguous)
def is_contiguous(x: SparseValue, memory_format: torch.memory_format = torch.contiguous_format) -> bool:
    """Contiguous in whichever format is asked: the sites have no dense memory layout to speak of."""
    return True
