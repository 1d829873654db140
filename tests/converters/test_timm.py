"""Export to timm is exact; import from timm round-trips bit for bit; mismatches are named."""

from __future__ import annotations

import functools

import pytest
import timm
import torch

import converters
import spark_me

from .._fixtures import randomize
from ..models.conftest import TINY

# small widths/depths where timm allows, plus one real-size model per family
CASES = [(arch, TINY[arch]) for arch in sorted(TINY)] + [
    ("resnet50", {}),
    ("convnext_atto", {}),
    ("convnextv2_atto", {}),
]


def features(model, images, arch):
    indices = [1, 2, 3, 4] if arch.startswith("resnet") else [0, 1, 2, 3]
    return model.forward_intermediates(images, indices=indices, intermediates_only=True)


@pytest.mark.parametrize(("arch", "kw"), CASES, ids=[f"{a}-{'tiny' if k else 'full'}" for a, k in CASES])
def test_export_gives_timm_the_same_features(gen, arch: str, kw: dict) -> None:
    sparse = spark_me.create_encoder(arch, **kw).eval()
    randomize(sparse, gen)
    state = converters.to_timm(sparse.state_dict(), arch, **kw)
    dense = timm.create_model(arch, **kw).eval()
    result = dense.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith(("fc.", "head.")) for k in result.missing_keys), result.missing_keys
    images = torch.randn(2, 3, 96, 64, generator=gen)
    with torch.no_grad():
        got = sparse(images, torch.ones(2, 3, 2, dtype=torch.bool))
        expected = features(dense, images, arch)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        assert float((g - e).abs().max() / e.abs().max()) <= 1e-5


@pytest.mark.parametrize(("arch", "kw"), CASES[:6])
def test_timm_round_trip_is_bit_identical(gen, arch: str, kw: dict) -> None:
    dense = timm.create_model(arch, **kw)
    randomize(dense, gen)
    original = {k: v for k, v in dense.state_dict().items() if not k.startswith(("fc.", "head."))}
    sparse_state = converters.from_timm(dense.state_dict(), arch, **kw)
    encoder = spark_me.create_encoder(arch, **kw)
    encoder.load_state_dict(sparse_state, strict=True)
    back = converters.to_timm(encoder.state_dict(), arch, **kw)
    assert back.keys() == original.keys()
    for k in original:
        assert torch.equal(back[k], original[k]), k


def test_full_spark_checkpoint_is_accepted(gen) -> None:
    """A pretraining checkpoint ({'model': SparK state, ...}, DDP prefixes) exports its encoder only."""
    model = spark_me.SparK(spark_me.create_encoder("resnet18"), decoder_width=64)
    ddp_state = {f"module.{k}": v for k, v in model.state_dict().items()}
    checkpoint = {"model": ddp_state, "epoch": 3, "config": {"arch": "resnet18"}}
    state = converters.to_timm(checkpoint, "resnet18")
    assert state.keys() == model.encoder.state_dict().keys()
    assert torch.equal(state["layer4.1.conv2.weight"], model.encoder.layer4[1].conv2.weight)


@functools.lru_cache
def me_kernel_offsets(kernel_size: int) -> list[tuple[int, int]]:
    """(dy, dx) of each of ME's kernel indices, found by running ME's own convolution (not from
    spark_me's layout helpers): a one-hot kernel at index j moves a single lit pixel by -offset_j."""
    import MinkowskiEngine as ME

    n = 2 * kernel_size + 1
    centre = kernel_size
    ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    coords = torch.stack([torch.zeros(n * n, dtype=torch.long), ys.flatten(), xs.flatten()], 1).int()
    feats = torch.zeros(n * n, 1, dtype=torch.float64)
    feats[centre * n + centre] = 1.0
    x = ME.SparseTensor(feats, coordinates=coords)
    conv = ME.MinkowskiConvolution(1, 1, kernel_size=kernel_size, stride=1, dimension=2).double()
    assert conv.kernel.shape == (kernel_size**2, 1, 1)
    offsets = []
    for j in range(kernel_size**2):
        with torch.no_grad():
            conv.kernel.zero_()
            conv.kernel[j] = 1.0
            out = conv(x)
        (lit,) = out.F[:, 0].nonzero()[:, 0].tolist()
        y, xx = out.C[lit, 1:].tolist()
        offsets.append((centre - y, centre - xx))
    assert len(set(offsets)) == kernel_size**2
    return offsets


def to_me_layout(name: str, value: torch.Tensor) -> torch.Tensor:
    """torch layout -> ME layout, built from ME's measured offsets: ME's kernel row j holds the
    torch weight tap that multiplies the input at offset_j (Conv2d is a cross-correlation; odd
    kernels are centred, even ones start at offset 0, so the tap is offset - smallest offset)."""
    if value.dim() == 4 and value.shape[-1] == 1:  # pointwise: ME keeps a 2-D [in, out] kernel
        import MinkowskiEngine as ME

        assert ME.MinkowskiConvolution(3, 5, kernel_size=1, dimension=2).kernel.shape == (3, 5)
        return value[:, :, 0, 0].t()
    if value.dim() == 4:
        k = value.shape[-1]
        offsets = me_kernel_offsets(k)
        low = min(min(o) for o in offsets)
        taps = [value[:, :, dy - low, dx - low] for dy, dx in offsets]  # each [out, in]
        if name.endswith("conv_dw.weight"):
            return torch.stack([t[:, 0] for t in taps])  # [k*k, C]
        return torch.stack([t.t() for t in taps])  # [k*k, in, out]
    if name.endswith("grn.weight") or name.endswith("grn.bias"):
        return value.reshape(1, 1, 1, -1)
    if name.endswith("bias") and value.dim() == 1:
        return value.reshape(1, -1)
    return value


def test_minkowski_layout_is_relaid_out(gen) -> None:
    """State dicts in ME's layout (kernels [k*k, in, out], depthwise [k*k, C], biases [1, C]) export
    to the same timm tensors; the ME layout is made independently of spark_me's layout helpers."""
    arch, kw = "convnextv2_atto", TINY["convnextv2_atto"]
    sparse = spark_me.create_encoder(arch, **kw)
    randomize(sparse, gen)
    me_state = {k: to_me_layout(k, v) for k, v in sparse.state_dict().items()}
    assert {tuple(v.shape) for k, v in me_state.items() if k.endswith("conv_dw.weight")} == {(49, 8),
            (49, 16), (49, 24), (49, 32)}  # fmt: skip
    exported = converters.to_timm(me_state, arch, **kw)
    for k, v in sparse.state_dict().items():
        assert torch.equal(exported[k], v), k


def test_wrong_architecture_names_the_keys() -> None:
    state = spark_me.create_encoder("resnet18").state_dict()
    with pytest.raises(converters.KeyMismatchError, match=r"'resnet50': \d+ keys differ: missing") as err:
        converters.to_timm(state, "resnet50")
    assert "layer1.0.conv3.weight" in err.value.differ["missing"]  # every key, for a Python caller
    assert "\n" not in str(err.value)  # the message is one line
    with pytest.raises(
        converters.KeyMismatchError,
        match=r"unexpected.*stages\.0\.blocks\.0\.conv_dw\.weight.*look like convnext_atto",
    ):
        converters.from_timm(spark_me.create_encoder("convnext_atto").state_dict(), "resnet18")
    shapes = spark_me.create_encoder("convnext_atto", dims=(8, 16, 24, 32)).state_dict()
    with pytest.raises(converters.KeyMismatchError, match="does not fit"):
        converters.to_timm(shapes, "convnext_atto")


def test_allow_missing_must_name_the_keys() -> None:
    state = spark_me.create_encoder("resnet18").state_dict()
    del state["bn1.num_batches_tracked"]
    with pytest.raises(converters.KeyMismatchError, match="bn1.num_batches_tracked"):
        converters.to_timm(state, "resnet18")
    out = converters.to_timm(state, "resnet18", allow_missing=["bn1.num_batches_tracked"])
    assert "bn1.num_batches_tracked" not in out
