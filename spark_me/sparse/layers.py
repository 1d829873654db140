"""Sparse layers on MinkowskiEngine whose parameters are named and shaped exactly like torch's.

`SparseConv2d.weight` is `[out, in, k, k]` like `nn.Conv2d.weight` (channels-last in memory, the
dataflows' layout; re-laid out into ME's `[k*k, in, out]` kernel only when ME's own function
runs). So an encoder built from these layers
has the same `state_dict` as its timm twin, and export to timm is a key-for-key copy. Convs,
depthwise convs and max-pools say what they compute (`SparseOp`) and run whichever dataflow
(dataflows.py) their tuner (tuner.py) picks.

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
from torch import Tensor, nn

from spark_me.sparse import dataflows
from spark_me.sparse.bn_relu import Prologue, batchnorm_relu
from spark_me.sparse.dataflows import SparseOp
from spark_me.sparse.geometry import layout_of
from spark_me.sparse.sync_batchnorm import sync_batch_norm_rows, synchronised, tracked_momentum
from spark_me.sparse.tuner import DataflowTuner, rule_for


def with_features(x: ME.SparseTensor, features: Tensor) -> ME.SparseTensor:
    """A tensor on the same sites (same coordinate map) as `x` with new features [N, C']."""
    return ME.SparseTensor(
        features, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager
    )


def batch_index(x: ME.SparseTensor) -> Tensor:
    """[N] long: which image each site belongs to."""
    layout = layout_of(x)
    return layout.batch_index() if layout is not None else x.C[:, 0].long().to(x.device)


class _TunedOp(nn.Module):
    """A layer whose computation is a `SparseOp` run by the dataflow its tuner picks.

    `tuner` is a plain attribute (not a submodule, not in the state_dict), shared by the layers of
    one encoder; without one the rule table decides. `last_dataflow` says what ran last (reports).
    """

    op: SparseOp
    tuner: DataflowTuner | None = None
    last_dataflow: str | None = None

    def run_op(
        self, x: ME.SparseTensor, weight: Tensor | None, bias: Tensor | None, prologue: Prologue | None = None
    ) -> ME.SparseTensor:
        if self.tuner is not None:
            self.last_dataflow = self.tuner.choose(self.op, x, weight, bias)
        else:
            self.last_dataflow = rule_for(self.op, x)
        feats, key = dataflows.run(self.last_dataflow, self.op, x, weight, bias, prologue)
        return ME.SparseTensor(feats, coordinate_map_key=key, coordinate_manager=x.coordinate_manager)


class SparseConv2d(_TunedOp):
    """Conv2d on active sites. Odd kernels are centred (padding k//2); even kernels span 0..k-1."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, bias: bool = False
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = kernel_size, stride
        # Channels-last, the layout the dataflows' kernels want: oneDNN's convs on the channels-last
        # maps of `block` / `dense` would copy an NCHW weight in forward and in backward and hand back
        # a channels-last gradient that AccumulateGrad copies again (3 weight-sized copies per conv and
        # step), and `gemm`'s [k*k*in, out] matrix is a free view of it. Same shape and values as
        # nn.Conv2d's weight, so the state_dict is unchanged.
        shape = (out_channels, in_channels, kernel_size, kernel_size)
        self.weight = nn.Parameter(torch.empty(shape, memory_format=torch.channels_last))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.op = SparseOp("conv", kernel_size, stride, in_channels, out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv2d's default
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_channels * self.kernel_size**2)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: ME.SparseTensor, prologue: Prologue | None = None) -> ME.SparseTensor:
        """conv(x), or with a `prologue` conv(relu(bn(x))) without saving relu(bn(x)) (bn_relu.py)."""
        if self.kernel_size == 1 and self.stride == 1:  # a GEMM on the features, whatever the layout
            self.last_dataflow = "pointwise"
            return with_features(x, dataflows.pointwise(self.op, x.F, self.weight, self.bias, prologue))
        return self.run_op(x, self.weight, self.bias, prologue)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        )


class SparseDepthwiseConv2d(_TunedOp):
    """Depthwise (groups == channels) Conv2d, stride 1, on active sites; weight [C, 1, k, k]."""

    def __init__(self, channels: int, kernel_size: int, bias: bool = True):
        super().__init__()
        self.channels, self.kernel_size = channels, kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.op = SparseOp("depthwise", kernel_size, 1, channels, channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.kernel_size**2)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: ME.SparseTensor, prologue: Prologue | None = None) -> ME.SparseTensor:
        """conv(x), or with a `prologue` conv(relu(bn(x))) (bn_relu.py)."""
        return self.run_op(x, self.weight, self.bias, prologue)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}"


class SparseBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm with statistics over active sites only (SparK's sparse BN); BatchNorm2d's state.

    Runs `F.batch_norm` on the [N, C] features directly (no transposed copies), with BatchNorm2d's
    running-statistics bookkeeping. After `convert_sync_batchnorm` (sync_batchnorm.py) its training
    statistics are those of the visible sites of every process.
    """

    sync_group = False  # False: local statistics; None or a process group: synchronised

    def forward(self, x: ME.SparseTensor) -> ME.SparseTensor:  # type: ignore[override]
        if synchronised(self):
            return with_features(x, sync_batch_norm_rows(self, x.F, self.sync_group))
        momentum = tracked_momentum(self) if self.training else 0.0
        use_batch_stats = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        out = F.batch_norm(
            x.F,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
        )
        return with_features(x, out)

    def relu_prologue(self, x: ME.SparseTensor) -> Prologue:
        """What the next op needs to compute relu(self(x)) itself, in its forward and again in its
        backward, so that the ReLU's output is never saved (bn_relu.py); running statistics and
        synchronisation as `forward`."""
        return batchnorm_relu(self, x.F)


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
        wide = feats.to(torch.promote_types(feats.dtype, torch.float32))  # sums in >= float32
        sq = wide.new_zeros(num_images, feats.shape[1]).index_add(0, batch, wide * wide)
        g = sq.sqrt()  # [B, C]
        n = (g / (g.mean(dim=1, keepdim=True) + self.eps)).to(feats.dtype)
        return with_features(
            x, feats + torch.addcmul(self.bias, self.weight, feats * n[batch]).to(feats.dtype)
        )


class SparseMaxPool2d(_TunedOp):
    """Max pooling over active sites only (masked sites never win), odd kernel centred like
    MaxPool2d(k, s, k//2)."""

    def __init__(self, kernel_size: int, stride: int, channels: int = 0):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride
        self.op = SparseOp("maxpool", kernel_size, stride, channels, channels)

    def forward(self, x: ME.SparseTensor, prologue: Prologue | None = None) -> ME.SparseTensor:
        """max-pool(x), or with a `prologue` max-pool(relu(bn(x))) without saving relu(bn(x))."""
        return self.run_op(x, None, None, prologue)

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
