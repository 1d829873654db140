"""Spatial reductions per image: the dtype asked for is the dtype computed in and returned."""

from __future__ import annotations

import torch

from ._values import value_and_dense


def test_a_reductions_dtype_argument_is_honoured() -> None:
    x, dense, visible = value_and_dense()
    x32, dense32 = x.float(), dense.float()
    for reduce in (torch.sum, torch.mean):
        got = reduce(x32, (2, 3), keepdim=True, dtype=torch.float64)
        assert got.dtype == torch.float64
    want = dense32.sum((2, 3), keepdim=True, dtype=torch.float64)
    torch.testing.assert_close(
        torch.sum(x32, (2, 3), keepdim=True, dtype=torch.float64), want, rtol=1e-15, atol=0
    )
