"""MinkowskiEngine really works here: its sparse ops equal torch's dense ops at the active sites.

Sites are random pixels (not patch-aligned), so these tests exercise ME's coordinate mapping in
general, not only the patch-aligned case SparK needs. float64 throughout: equality is the point.
"""

from __future__ import annotations

import MinkowskiEngine as ME
import pytest
import torch
import torch.nn.functional as F

from spark_me.sparse.layout import conv_padding, me_depthwise_to_conv_weight, me_kernel_to_conv_weight
from spark_me.sparse.tensor import densify, occupancy, sparsify, upsample_mask

TOL = 1e-10


def random_sparse(gen: torch.Generator, batch=2, channels=4, height=16, width=12, density=0.4):
    """Random pixels active; returns (sparse tensor, zero-filled dense image, active mask)."""
    active = torch.rand(batch, height, width, generator=gen) < density
    image = torch.randn(batch, channels, height, width, generator=gen, dtype=torch.float64)
    masked = image * upsample_mask(active, height, width)
    return sparsify(image, active), masked, active


def dense_conv(masked: torch.Tensor, weight: torch.Tensor, stride: int, groups: int = 1) -> torch.Tensor:
    """Conv2d placing outputs on ME's sites: odd kernels centred, even ones spanning 0..k-1."""
    k = weight.shape[-1]
    lo = conv_padding(k)
    hi = k - 1 - lo
    return F.conv2d(F.pad(masked, (lo, hi, lo, hi)), weight, stride=stride, groups=groups)


def expected_sites(active: torch.Tensor, stride: int) -> torch.Tensor:
    """A strided op's output sites: every stride-cell that holds at least one active input."""
    h, w = active.shape[1:]
    pad = (0, -w % stride, 0, -h % stride)
    return F.max_pool2d(F.pad(active[:, None].double(), pad), stride, stride) > 0


@pytest.mark.parametrize("stride", [1, 2, 4])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_conv_equals_dense_conv(gen: torch.Generator, k: int, stride: int) -> None:
    x, masked, active = random_sparse(gen)
    conv = ME.MinkowskiConvolution(4, 6, kernel_size=k, stride=stride, bias=True, dimension=2).double()
    out = conv(x)
    shape = (2, 6, -(-16 // stride), -(-12 // stride))

    sites = occupancy(out, shape)
    assert torch.equal(sites, expected_sites(active, stride))

    weight = me_kernel_to_conv_weight(conv.kernel.detach(), k)
    ref = (dense_conv(masked, weight, stride) + conv.bias.detach().reshape(1, -1, 1, 1)) * sites
    got = densify(out, shape)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= TOL * ref.abs().max()


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 4, 7])
def test_depthwise_conv_equals_grouped_conv(gen: torch.Generator, k: int, stride: int) -> None:
    x, masked, active = random_sparse(gen, channels=5)
    conv = ME.MinkowskiChannelwiseConvolution(5, kernel_size=k, stride=stride, bias=True, dimension=2)
    conv = conv.double()
    out = conv(x)
    shape = (2, 5, -(-16 // stride), -(-12 // stride))
    sites = occupancy(out, shape)
    assert torch.equal(sites, expected_sites(active, stride))

    weight = me_depthwise_to_conv_weight(conv.kernel.detach(), k)
    ref = dense_conv(masked, weight, stride, groups=5) + conv.bias.detach().reshape(1, -1, 1, 1)
    assert (densify(out, shape) - ref * sites).abs().max() <= TOL * ref.abs().max()


def test_conv_gradients_equal_dense(gen: torch.Generator) -> None:
    """Backward through ME == backward through the masked dense conv (inputs and kernel)."""
    x, masked, active = random_sparse(gen)
    conv = ME.MinkowskiConvolution(4, 3, kernel_size=3, stride=2, dimension=2).double()
    feats = x.F.clone().requires_grad_(True)
    out = conv(
        ME.SparseTensor(
            feats, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager
        )
    )
    shape = (2, 3, 8, 6)
    probe = torch.randn(shape, generator=gen, dtype=torch.float64)
    (densify(out, shape) * probe).sum().backward()

    dense_in = masked.clone().requires_grad_(True)
    weight = me_kernel_to_conv_weight(conv.kernel.detach(), 3).clone().requires_grad_(True)
    (dense_conv(dense_in, weight, 2) * occupancy(out, shape) * probe).sum().backward()

    mask = upsample_mask(active, 16, 12)[:, 0]
    assert torch.allclose(feats.grad, dense_in.grad.permute(0, 2, 3, 1)[mask], rtol=0, atol=1e-12)
    assert torch.allclose(me_kernel_to_conv_weight(conv.kernel.grad, 3), weight.grad, rtol=0, atol=1e-10)


def test_dense_round_trip(gen: torch.Generator) -> None:
    """sparsify -> densify gives back the masked image; ME's own .dense(shape=...) agrees."""
    x, masked, active = random_sparse(gen, height=10, width=14)
    assert len(x.C) == int(active.sum())
    assert x.C.dtype == torch.int32
    assert torch.equal(densify(x, masked.shape), masked)
    me_dense, _, _ = x.dense(shape=masked.shape, min_coordinate=torch.zeros(2, dtype=torch.int32))
    assert torch.equal(me_dense, masked)


def test_densify_keeps_shape_when_border_cells_are_empty() -> None:
    """Masking the last row and column everywhere must not shrink the dense map."""
    active = torch.ones(2, 4, 6, dtype=torch.bool)
    active[:, -1, :] = False
    active[:, :, -1] = False
    image = torch.randn(2, 3, 32, 48)
    dense = densify(sparsify(image, active), (2, 3, 32, 48))
    assert dense.shape == (2, 3, 32, 48)
    assert torch.equal(dense, image * upsample_mask(active, 32, 48))


def test_visible_zero_pixels_stay_active() -> None:
    """Sites come from the mask, not from feature values: an all-zero visible patch is kept."""
    image = torch.zeros(1, 3, 8, 8)
    active = torch.tensor([[[True, False], [False, True]]])
    assert len(sparsify(image, active).C) == 2 * 16


def test_densify_refuses_wrong_shape(gen: torch.Generator) -> None:
    x, _, _ = random_sparse(gen)
    with pytest.raises(ValueError, match="outside"):
        densify(x, (2, 4, 8, 8))
    with pytest.raises(ValueError, match="channels"):
        densify(x, (2, 7, 16, 12))


def test_batchnorm_over_active_sites(gen: torch.Generator) -> None:
    """ME's BN == BatchNorm1d over exactly the active vectors (output and running stats)."""
    x, _, _ = random_sparse(gen, channels=6)
    me_bn = ME.MinkowskiBatchNorm(6, momentum=0.3).double().train()
    ref_bn = torch.nn.BatchNorm1d(6, momentum=0.3).double().train()
    with torch.no_grad():
        me_bn.bn.weight.copy_(torch.rand(6, generator=gen) + 0.5)
        me_bn.bn.bias.copy_(torch.randn(6, generator=gen))
    ref_bn.load_state_dict(me_bn.bn.state_dict())

    out = me_bn(x)
    ref = ref_bn(x.F)
    assert torch.allclose(out.F, ref, rtol=0, atol=1e-12)
    assert torch.allclose(me_bn.bn.running_mean, ref_bn.running_mean, rtol=0, atol=1e-14)
    assert torch.allclose(me_bn.bn.running_var, ref_bn.running_var, rtol=0, atol=1e-14)
    # statistics really are over active sites only: they differ from those of the zero-filled map
    dense_mean = densify(x, (2, 6, 16, 12)).mean((0, 2, 3))
    assert not torch.allclose(x.F.mean(0), dense_mean)
    assert torch.allclose(x.F.mean(0), ref_bn.running_mean / 0.3, rtol=1e-12)  # one step from 0
