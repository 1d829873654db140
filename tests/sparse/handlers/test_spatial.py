"""Window handlers refuse what torch's dense op would not compute the same way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spark_me.sparse.value import UnsupportedOp

from ._values import value_and_dense


@pytest.mark.parametrize(
    "op",
    [
        lambda x: F.conv2d(x.permute(0, 2, 3, 1), torch.ones(4, 4, 1, 1, dtype=x.dtype)),
        lambda x: F.conv2d(x.permute(0, 2, 3, 1), torch.ones(4, 4, 3, 3, dtype=x.dtype), padding=1),
        lambda x: F.max_pool2d(x.view(2, 2, 2, 8, 12), 3, 1, 1),
        lambda x: F.avg_pool2d(x.view(2, 2, 2, 8, 12), 3, 1, 1),
        lambda x: F.avg_pool2d(x.view(2, 2, 2, 8, 12), 1),
        lambda x: F.interpolate(x.view(2, 2, 2, 8, 12), scale_factor=2),
    ],
    ids=["conv1x1 channels-last", "conv3x3 channels-last", "max_pool 5-d", "avg_pool 5-d", "avg_pool 1 5-d",
         "interpolate 5-d"],
)  # fmt: skip
def test_windows_need_a_channels_first_map(op) -> None:
    x, _, _ = value_and_dense(channels=4)
    with pytest.raises(UnsupportedOp):
        op(x)
