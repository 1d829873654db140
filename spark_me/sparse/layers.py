"""Sparse layers on MinkowskiEngine whose parameters are named and shaped exactly like torch's.

`SparseConv2d.weight` is `[out, in, k, k]` like `nn.Conv2d.weight` and is re-laid out into ME's
`[k*k, in, out]` kernel on every call (a cheap permute). So an encoder built from these layers has
the same `state_dict` as its timm twin, and export to timm is a key-for-key copy.

Every layer maps `ME.SparseTensor -> ME.SparseTensor`. Stride-1 layers keep the input's sites;
strided ones put an output site wherever a stride cell holds an active input (with patch-aligned
masks: exactly the mask at the new stride).

ME's internals are reached through the package namespace only: importing the submodule
`MinkowskiEngine.MinkowskiConvolution` would replace the class `ME.MinkowskiConvolution` with that
module for every other user of ME in the process.
"""

from __future__ import annotations

import math

import MinkowskiEngine as ME
import torch
import torch.nn.functional as F
from MinkowskiEngineBackend._C import ConvolutionMode
from torch import Tensor, nn

from spark_me.sparse.layout import conv_weight_to_me_kernel


def with_features(x: ME.SparseTensor, features: Tensor) -> ME.SparseTensor:
    """A tensor on the same sites (same coordinate map) as `x` with new features [N, C']."""
    return ME.SparseTensor(
        features, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager
    )


def batch_index(x: ME.SparseTensor) -> Tensor:
    """[N] long: which image each site belongs to."""
    return x.C[:, 0].long()


class SparseConv2d(nn.Module):
    """Conv2d on active sites. Odd kernels are centred (padding k//2); even kernels span 0..k-1."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, bias: bool = False
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = kernel_size, stride
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.kernel_generator = ME.KernelGenerator(kernel_size=kernel_size, stride=stride, dimension=2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv2d's default
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_channels * self.kernel_size**2)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        if self.kernel_size == 1 and self.stride == 1:
            feats = x.F @ self.weight.view(self.out_channels, self.in_channels).t()
            out_key = x.coordinate_map_key
        else:
            # An empty key: ME fills it with the strided output sites (or reuses the input's at stride 1).
            out_key = ME.CoordinateMapKey(x.coordinate_map_key.get_coordinate_size())
            feats = ME.MinkowskiConvolutionFunction.apply(
                x.F,
                conv_weight_to_me_kernel(self.weight).contiguous(),
                self.kernel_generator,
                ConvolutionMode.DEFAULT,
                x.coordinate_map_key,
                out_key,
                x._manager,
            )
        if self.bias is not None:
            feats = feats + self.bias
        return ME.SparseTensor(feats, coordinate_map_key=out_key, coordinate_manager=x._manager)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        )


class _DepthwiseFunction(torch.autograd.Function):
    """Sum over kernel offsets of gathered inputs x weight, accumulated in place.

    Saves only the input features and the kernel (not one gathered copy per offset, as autograd
    would), and recomputes the gathers in backward: O(N*C) memory instead of O(k*k*N*C).
    """

    @staticmethod
    def forward(ctx, feats: Tensor, kernel: Tensor, maps: list[tuple[int, Tensor, Tensor]]) -> Tensor:
        out = feats.new_zeros(feats.shape)
        for offset, src, dst in maps:
            out.index_add_(0, dst, feats[src] * kernel[offset])
        ctx.save_for_backward(feats, kernel)
        ctx.maps = maps
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        feats, kernel = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_feats = torch.zeros_like(feats) if ctx.needs_input_grad[0] else None
        grad_kernel = torch.zeros_like(kernel) if ctx.needs_input_grad[1] else None
        for offset, src, dst in ctx.maps:
            g = grad_out[dst]
            if grad_feats is not None:
                grad_feats.index_add_(0, src, g * kernel[offset])
            if grad_kernel is not None:
                grad_kernel[offset] = (feats[src] * g).sum(0)
        return grad_feats, grad_kernel, None


class SparseDepthwiseConv2d(nn.Module):
    """Depthwise (groups == channels) Conv2d, stride 1, on active sites; weight [C, 1, k, k].

    `impl="function"` (default): one autograd Function that accumulates over the k*k offsets in
    place and recomputes the gathers in backward (benchmarks/README.md: ConvNeXt-T step memory and
    time). `impl="loop"`: the same sum as plain autograd ops, one gather + index_add per offset (as
    ME's channelwise conv does), which keeps k*k intermediate copies for backward.
    """

    def __init__(self, channels: int, kernel_size: int, bias: bool = True, impl: str = "function"):
        super().__init__()
        if impl not in ("function", "loop"):
            raise ValueError(f"impl must be 'function' or 'loop', not {impl!r}")
        self.channels, self.kernel_size, self.impl = channels, kernel_size, impl
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.kernel_generator = ME.KernelGenerator(kernel_size=kernel_size, stride=1, dimension=2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.kernel_size**2)
            nn.init.uniform_(self.bias, -bound, bound)

    def _kernel_map(self, x: ME.SparseTensor) -> list[tuple[int, Tensor, Tensor]]:
        """(offset, input rows, output rows) for every kernel offset, from ME's cached kernel map."""
        manager, key = x.coordinate_manager, x.coordinate_map_key
        region_type, region_offset, _ = self.kernel_generator.get_kernel(x.tensor_stride, False)
        kernel_map = manager.kernel_map(
            key, key, 1, self.kernel_size, 1, region_type=region_type, region_offset=region_offset
        )
        maps = []
        for offset, in_out in kernel_map.items():
            in_out = in_out.long().to(x.device)
            maps.append((offset, in_out[0], in_out[1]))
        return maps

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        kernel = self.weight[:, 0].permute(2, 1, 0).reshape(self.kernel_size**2, self.channels)  # ME order
        maps = self._kernel_map(x)
        if self.impl == "function":
            feats = _DepthwiseFunction.apply(x.F.contiguous(), kernel, maps)
        else:
            feats = x.F.new_zeros(x.F.shape)
            for offset, src, dst in maps:
                feats = feats.index_add(0, dst, x.F[src] * kernel[offset])
        if self.bias is not None:
            feats = feats + self.bias
        return with_features(x, feats)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, impl={self.impl}"


class SparseBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm with statistics over active sites only (SparK's sparse BN); BatchNorm2d's state."""

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:  # type: ignore[override]
        feats = x.F
        # [N, C] -> [1, C, N, 1] lets BatchNorm2d's own code (running stats, momentum) do the work.
        # contiguous() is required: torch 2.14's CPU eval-mode BN backward is wrong for strided input.
        out = super().forward(feats.t().contiguous()[None, :, :, None])
        return with_features(x, out[0, :, :, 0].t())


class SparseLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each active site (timm's LayerNorm2d, per site)."""

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:  # type: ignore[override]
        return with_features(x, F.layer_norm(x.F, self.normalized_shape, self.weight, self.bias, self.eps))


class SparseLinear(nn.Module):
    """Per-site linear map; `conv_shaped` keeps the weight as [out, in, 1, 1] (timm's ConvMlp)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, conv_shaped: bool = False):
        super().__init__()
        shape = (out_features, in_features, 1, 1) if conv_shaped else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(in_features), 1 / math.sqrt(in_features))

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        weight = self.weight.view(self.weight.shape[0], self.weight.shape[1])
        return with_features(x, F.linear(x.F, weight, self.bias))


class SparseActivation(nn.Module):
    """Any elementwise activation (nn.ReLU(), nn.GELU(), ...) applied to the features."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.act = act

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        return with_features(x, self.act(x.F))


class SparseGRN(nn.Module):
    """ConvNeXt-V2 Global Response Normalization, with the L2 norm taken PER IMAGE over its sites.

    (FCMAE's sparse GRN pools over the whole batch, which differs from the dense model it exports to.)
    Parameters `weight`, `bias` [C] as in timm's GlobalResponseNorm.
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        feats, batch = x.F, batch_index(x)
        num_images = int(batch.max()) + 1 if len(batch) else 0
        sq = feats.new_zeros(num_images, feats.shape[1]).index_add(0, batch, feats * feats)
        g = sq.sqrt()  # [B, C]
        n = g / (g.mean(dim=1, keepdim=True) + self.eps)
        return with_features(x, feats + torch.addcmul(self.bias, self.weight, feats * n[batch]))


class SparseMaxPool2d(nn.Module):
    """Max pooling over active sites only, odd kernel centred like MaxPool2d(k, s, k//2).

    Calls ME's pooling function directly (ME's module cannot be deep-copied, which EMA copies and
    checkpoint tools need).
    """

    def __init__(self, kernel_size: int, stride: int):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride
        self.kernel_generator = ME.KernelGenerator(kernel_size=kernel_size, stride=stride, dimension=2)

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        out_key = ME.CoordinateMapKey(x.coordinate_map_key.get_coordinate_size())
        feats = ME.MinkowskiLocalPoolingFunction.apply(
            x.F,
            ME.PoolingMode.LOCAL_MAX_POOLING,
            self.kernel_generator,
            x.coordinate_map_key,
            out_key,
            x._manager,
        )
        return ME.SparseTensor(feats, coordinate_map_key=out_key, coordinate_manager=x._manager)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class SparseDropPath(nn.Module):
    """Stochastic depth per image: all sites of a dropped image are zeroed together (torch RNG)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        batch = batch_index(x)
        keep = 1.0 - self.drop_prob
        num_images = int(batch.max()) + 1 if len(batch) else 0
        scale = torch.empty(num_images, 1, device=x.device, dtype=x.F.dtype).bernoulli_(keep) / keep
        return with_features(x, x.F * scale[batch])

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def add(x: ME.SparseTensor, y: ME.SparseTensor) -> ME.SparseTensor:
    """Residual sum of two tensors on the same sites (refuses to silently take a union of sites)."""
    same_map = x.coordinate_map_key == y.coordinate_map_key
    if not same_map and (x.coordinate_manager is not y.coordinate_manager or not torch.equal(x.C, y.C)):
        raise ValueError("residual branches hold different sites")
    return with_features(x, x.F + y.F)
