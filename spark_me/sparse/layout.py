"""Kernel layouts: MinkowskiEngine <-> torch.nn.Conv2d.

ME stores a 2-D convolution kernel as [kernel_volume, in, out] whose offset index runs over the
FIRST spatial axis fastest: with coordinates (batch, y, x), offset (dy, dx) has index dy + k*dx.
torch stores [out, in, ky, kx]. A 1x1 stride-1 ME kernel is 2-D ([in, out]); depthwise kernels are
[kernel_volume, channels]. Odd kernels are centred (== Conv2d padding k//2); even kernels span
offsets 0..k-1 (== padding 0).
"""

from __future__ import annotations

from torch import Tensor


def me_kernel_to_conv_weight(kernel: Tensor, kernel_size: int) -> Tensor:
    """[k*k, in, out] (or [in, out]) -> [out, in, k, k]."""
    if kernel.dim() == 2:
        return kernel.t().reshape(kernel.shape[1], kernel.shape[0], 1, 1)
    volume, cin, cout = kernel.shape
    if volume != kernel_size * kernel_size:
        raise ValueError(f"kernel volume {volume} != {kernel_size}x{kernel_size}")
    # index dy + k*dx  ->  [dx, dy, in, out]  ->  [out, in, dy, dx]
    return kernel.reshape(kernel_size, kernel_size, cin, cout).permute(3, 2, 1, 0)


def conv_weight_to_me_kernel(weight: Tensor, two_d_if_pointwise: bool = False) -> Tensor:
    """[out, in, k, k] -> [k*k, in, out]; [in, out] for a pointwise kernel if asked (ME's 1x1/1 shape)."""
    cout, cin, kh, kw = weight.shape
    if kh != kw:
        raise ValueError(f"only square kernels are supported, got {kh}x{kw}")
    if two_d_if_pointwise and kh == 1:
        return weight.reshape(cout, cin).t()
    return weight.permute(3, 2, 1, 0).reshape(kh * kw, cin, cout)


def me_depthwise_to_conv_weight(kernel: Tensor, kernel_size: int) -> Tensor:
    """[k*k, C] -> [C, 1, k, k] (Conv2d with groups=C)."""
    volume, channels = kernel.shape
    if volume != kernel_size * kernel_size:
        raise ValueError(f"kernel volume {volume} != {kernel_size}x{kernel_size}")
    return kernel.reshape(kernel_size, kernel_size, channels).permute(2, 1, 0).unsqueeze(1)


def conv_weight_to_me_depthwise(weight: Tensor) -> Tensor:
    """[C, 1, k, k] -> [k*k, C]."""
    channels, one, kh, kw = weight.shape
    if one != 1 or kh != kw:
        raise ValueError(f"expected a square depthwise weight [C, 1, k, k], got {tuple(weight.shape)}")
    return weight[:, 0].permute(2, 1, 0).reshape(kh * kw, channels)


def conv_padding(kernel_size: int) -> int:
    """The Conv2d padding that puts dense outputs on the same sites as ME's kernel offsets."""
    return kernel_size // 2 if kernel_size % 2 == 1 else 0


__all__ = [
    "conv_padding",
    "conv_weight_to_me_depthwise",
    "conv_weight_to_me_kernel",
    "me_depthwise_to_conv_weight",
    "me_kernel_to_conv_weight",
]
