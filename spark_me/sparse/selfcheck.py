"""A quick proof that the installed MinkowskiEngine computes what torch computes.

Used by `spark-me smoke` right after installation: a strided sparse convolution on random sites
must equal `F.conv2d` on the zero-filled dense image at the output sites.
"""

from __future__ import annotations

import MinkowskiEngine as ME
import torch
import torch.nn.functional as F

from spark_me.sparse.layout import conv_padding, me_kernel_to_conv_weight
from spark_me.sparse.tensor import densify, occupancy, sparsify, upsample_mask


def conv_matches_dense(kernel_size: int = 3, stride: int = 2, size: int = 32, channels: int = 8) -> float:
    """Max error of ME's conv against F.conv2d at the output sites, relative to the output's max."""
    gen = torch.Generator().manual_seed(0)
    active = torch.rand(2, size // 4, size // 4, generator=gen) < 0.5
    image = torch.randn(2, channels, size, size, generator=gen, dtype=torch.float64)
    conv = ME.MinkowskiConvolution(channels, channels, kernel_size, stride, bias=True, dimension=2).double()
    out = conv(sparsify(image, active))
    shape = (2, channels, size // stride, size // stride)
    weight = me_kernel_to_conv_weight(conv.kernel.detach(), kernel_size)
    masked = image * upsample_mask(active, size, size)
    ref = F.conv2d(masked, weight, conv.bias.detach().flatten(), stride, conv_padding(kernel_size))
    ref = ref * occupancy(out, shape)
    return float(((densify(out, shape) - ref).abs().max() / ref.abs().max()).detach())
