"""A block input that feeds both a 1x1 conv and an identity shortcut, as one autograd node.

Why: the gradient of such an input is the sum of two gradients, the conv's grad-input
(grad_h @ W) and the shortcut's. Autograd computes them apart and sums them with an `add_` (reads
both, writes [N, C]: in a ResNet-152 step, 46 bottlenecks with an identity shortcut, ~55 MB of the
82.5 MB of `add_` in float32). As one node the sum is the GEMM's own accumulation:
grad_x = addmm(grad_shortcut, grad_h, W), which reads the shortcut's gradient once and writes once.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


class _PointwiseAndIdentity(torch.autograd.Function):
    """(x @ W^T, x) for x [N, in], W [out, in]; backward sums both gradients of x in one addmm."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(x, weight)
        return x @ weight.t(), x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h: Tensor, grad_x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_in = torch.addmm(grad_x, grad_h, weight) if ctx.needs_input_grad[0] else None
        grad_w = grad_h.t() @ x if ctx.needs_input_grad[1] else None
        return grad_in, grad_w


def pointwise_and_identity(feats: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """(feats [N, in] @ weight[out, in]^T, feats) whose backward sums the two gradients of `feats`
    inside the GEMM. `feats` and `weight` must already be in the dtype the GEMM runs in."""
    return _PointwiseAndIdentity.apply(feats, weight)
