"""Depthwise convs == aten / the masked-dense oracle, float64, forward, grad-input, grad-weight.

Two levels: the dense-map backward that the ``block`` / ``dense`` dataflows use (against aten's
convolution_backward on the same maps), and every dataflow that can compute a depthwise op,
the ``fused`` one included, on sparse maps (against `F.conv2d` on the zero-masked dense image,
whose gradients are aten's). Odd non-square sizes, kernels 3 / 5 / 7, strides 1 and 2, channel
counts that exercise the kernels' 4-vector, 1-vector and scalar paths, extreme masks.
(Stride-1 depthwise convs are also checked against MinkowskiEngine in test_dataflows.py.)
"""

from __future__ import annotations

import MinkowskiEngine as ME
import pytest
import torch
import torch.nn.functional as F

from spark_me.sparse import dataflows, depthwise, native
from spark_me.sparse.ops import SparseOp
from spark_me.sparse.tensor import densify, sparsify, upsample_mask

CELL = 32
CHANNELS = 45  # float64 vectors hold 8: 32 (4 vectors) + 8 (1 vector) + 5 scalar channels


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def test_native_kernels_build_here() -> None:
    """The C++ kernels must build wherever a compiler exists (else every test below would only
    exercise the plain torch path)."""
    if native._compiler() is None:
        pytest.skip("no C++ compiler on this machine: the plain torch path runs instead")
    assert depthwise.native_available()


@pytest.mark.parametrize("kernel", [3, 5, 7])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", ["zero", "same"])
def test_maps_backward_equals_aten(kernel: int, stride: int, padding: str, gen: torch.Generator) -> None:
    pad = 0 if padding == "zero" else kernel // 2
    x = torch.randn(2, CHANNELS, 13, 10, generator=gen, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(CHANNELS, 1, kernel, kernel, generator=gen, dtype=torch.float64)
    y = F.conv2d(x, w, None, stride, pad, 1, CHANNELS)
    grad = torch.randn(y.shape, generator=gen, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last
    )
    ref = torch.ops.aten.convolution_backward(
        grad, x, w, [CHANNELS], [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], CHANNELS, [True, True, True]
    )
    got = depthwise.maps_backward(grad, x, w, stride, pad, (True, True, True))
    if kernel <= depthwise.ATEN_BACKWARD_MAX_KERNEL:  # aten's own backward there: check the kernel too
        assert rel_err(depthwise.map_weight_grad(x, grad, kernel, stride, pad), ref[1]) <= 1e-10
    for name, a, b in zip(("grad input", "grad weight", "grad bias"), got, ref, strict=True):
        assert a.shape == b.shape, name
        assert rel_err(a, b) <= 1e-10, f"{name}: {rel_err(a, b):.2e}"


def make_mask(gen: torch.Generator, batch: int, grid: tuple[int, int], case: str) -> torch.Tensor:
    h, w = grid
    if case == "single":  # one visible cell per image, in a corner for the first
        active = torch.zeros(batch, h, w, dtype=torch.bool)
        active[0, h - 1, w - 1] = True
        active[1:, 0, int(torch.randint(w, (1,), generator=gen))] = True
        return active
    active = torch.rand(batch, h, w, generator=gen) >= float(case)
    active.view(batch, -1)[:, 0] |= ~active.view(batch, -1).any(1)
    return active


def sparse_run(name: str, op: SparseOp, x: torch.Tensor, active, stride: int, weight, bias, probe):
    """Output map (zeros at masked sites) and gradients of x, weight, bias under dataflow `name`."""
    xi = x.clone().requires_grad_(True)
    w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    st = sparsify(xi, active, stride=stride)
    feats, key = dataflows.run(name, op, st, w, b)
    out = ME.SparseTensor(feats, coordinate_map_key=key, coordinate_manager=st.coordinate_manager)
    y = densify(out, probe.shape)
    (y.double() * probe).sum().backward()
    return y.detach(), xi.grad, w.grad, b.grad


def oracle(x, active, weight, bias, op: SparseOp, probe):
    """Masked-dense: conv of the zero-masked image, kept at the visible output sites (aten grads)."""
    xi = x.clone().requires_grad_(True)
    w, b = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    mask_in = upsample_mask(active, *x.shape[2:]).to(x.dtype)
    mask_out = upsample_mask(active, *probe.shape[2:]).to(x.dtype)
    y = F.conv2d(xi * mask_in, w, b, op.stride, op.kernel_size // 2, 1, op.in_channels) * mask_out
    (y * probe).sum().backward()
    return y.detach(), xi.grad, w.grad, b.grad


CONFIGS = [(k, s, st) for k in (3, 5, 7) for s in (1, 2) for st in (2, 8, 16) if CELL % (st * s) == 0]
CONFIGS += [(7, 1, 32), (3, 1, 32)]


@pytest.mark.parametrize(("kernel", "stride", "in_stride"), CONFIGS)
@pytest.mark.parametrize("case", ["0", "0.6", "0.9", "single"])
def test_depthwise_dataflows_equal_masked_dense(kernel, stride, in_stride, case, gen) -> None:
    channels, grid = (CHANNELS if in_stride >= 8 else 5), (3, 2)
    op = SparseOp("depthwise", kernel, stride, channels, channels)
    batch = 1 if case == "0.9" else 2
    active = make_mask(gen, batch, grid, case)
    b = CELL // in_stride
    x = torch.randn(batch, channels, grid[0] * b, grid[1] * b, generator=gen, dtype=torch.float64)
    weight = torch.randn(channels, 1, kernel, kernel, generator=gen, dtype=torch.float64)
    bias = torch.randn(channels, generator=gen, dtype=torch.float64)
    out_shape = (batch, channels, grid[0] * b // stride, grid[1] * b // stride)
    probe = torch.randn(out_shape, generator=gen, dtype=torch.float64)
    ref = oracle(x, active, weight, bias, op, probe)
    names = dataflows.candidates(op)
    assert "fused" in names or not depthwise.native_available()
    for name in names:
        got = sparse_run(name, op, x, active, in_stride, weight, bias, probe)
        for what, a, r in zip(("forward", "grad input", "grad weight", "grad bias"), got, ref, strict=True):
            assert rel_err(a, r) <= 1e-10, f"{name} {what}: {rel_err(a, r):.2e}"


@pytest.mark.parametrize("stride", [1, 2])
def test_fused_plain_torch_path_equals_masked_dense(stride: int, gen, monkeypatch) -> None:
    """Without the C++ kernels (no compiler, or CUDA) ``fused`` runs its plain torch definition, in
    chunks of rows (3 here, so that there are many)."""
    monkeypatch.setattr(depthwise, "_library", lambda: None)
    monkeypatch.setattr(depthwise, "_chunk_rows", lambda kk, channels: 3)
    op = SparseOp("depthwise", 5, stride, 6, 6)
    active = make_mask(gen, 2, (3, 2), "0.6")
    x = torch.randn(2, 6, 12, 8, generator=gen, dtype=torch.float64)
    weight = torch.randn(6, 1, 5, 5, generator=gen, dtype=torch.float64)
    bias = torch.randn(6, generator=gen, dtype=torch.float64)
    probe = torch.randn(2, 6, 12 // stride, 8 // stride, generator=gen, dtype=torch.float64)
    got = sparse_run("fused", op, x, active, 32 // 4, weight, bias, probe)
    ref = oracle(x, active, weight, bias, op, probe)
    for what, a, r in zip(("forward", "grad input", "grad weight", "grad bias"), got, ref, strict=True):
        assert rel_err(a, r) <= 1e-10, f"{what}: {rel_err(a, r):.2e}"


@pytest.mark.parametrize("name", ["block", "dense", "fused"])
def test_bfloat16_under_autocast_close_to_float64(name: str, gen) -> None:
    """The bf16 kernels (float accumulation, round-to-nearest-even stores) under CPU autocast."""
    channels = 40  # float vectors hold 16: 32 + ... exercises the 4-vector and 1-vector paths
    op = SparseOp("depthwise", 7, 1, channels, channels)
    active = make_mask(gen, 2, (3, 2), "0.6")
    x = torch.randn(2, channels, 12, 8, generator=gen, dtype=torch.float64)
    weight = torch.randn(channels, 1, 7, 7, generator=gen, dtype=torch.float64)
    bias = torch.randn(channels, generator=gen, dtype=torch.float64)
    probe = torch.randn(2, channels, 12, 8, generator=gen, dtype=torch.float64)
    ref = oracle(x, active, weight, bias, op, probe)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sparse_run(name, op, x.float(), active, 8, weight.float(), bias.float(), probe)
    assert got[0].dtype == torch.bfloat16
    for what, a, r in zip(("forward", "grad input", "grad weight", "grad bias"), got, ref, strict=True):
        assert rel_err(a.double(), r) <= 3e-2, f"{what}: {rel_err(a.double(), r):.2e}"


@pytest.mark.parametrize("kk", [49, 9, 4])  # odd and even numbers of offsets (paired two by two)
@pytest.mark.parametrize("channels", [72, 8])  # 32-channel vectors + a 16-channel one + scalars; scalars
def test_bf16_kernels_round_only_their_result(kk: int, channels: int, gen: torch.Generator) -> None:
    """bf16 gather_sum / gather_weight_grad == float64 sums of the same bf16 values, but for one
    rounding of the result to bf16 (half an ulp: 2^-8 relative) and float accumulation. The loose
    bf16-vs-float64 test above would not see a dropped term; this one does. On CPUs with
    AVX512-BF16 the 32-channel blocks take the vdpbf16ps path (terms paired), elsewhere the float
    one."""
    n, m = 37, 23  # m: neither a multiple of the 4 rows the forward takes at once nor even
    x = torch.randn(n, channels, generator=gen).bfloat16()
    weight = torch.randn(kk, channels, generator=gen).bfloat16()
    bias = torch.randn(channels, generator=gen).bfloat16()
    grad = torch.randn(m, channels, generator=gen).bfloat16()
    index = torch.randint(0, n + 1, (m, kk), generator=gen)  # n: no site there
    padded = torch.cat([x.double(), torch.zeros(1, channels, dtype=torch.float64)])[index]  # [m, kk, C]
    for got, terms, extra in (
        (depthwise.gather_sum(x, index, weight, bias), padded * weight.double(), bias.double()),
        (
            depthwise.gather_weight_grad(x, index, grad),
            (padded * grad.double()[:, None]).transpose(0, 1),
            0.0,
        ),
    ):
        assert got.dtype == torch.bfloat16
        ref = terms.sum(1) + extra
        bound = 2**-8 * ref.abs() + 2**-16 * terms.abs().sum(1)
        assert ((got.double() - ref).abs() <= bound).all(), float(((got.double() - ref).abs() / bound).max())


def test_build_key_names_the_source(tmp_path) -> None:
    compiler = native._compiler()
    if compiler is None:
        pytest.skip("no C++ compiler on this machine")
    a, b = tmp_path / "a.cpp", tmp_path / "b.cpp"
    a.write_text("int f() { return 1; }\n")
    b.write_text("int f() { return 2; }\n")
    assert native.build_key(a, compiler) == native.build_key(a, compiler)
    assert native.build_key(a, compiler) != native.build_key(b, compiler)


def map_windows(batch: int, height: int, width: int, kernel: int, stride: int) -> torch.Tensor:
    """[N_out, k*k] window table of a dense map's rows (b, y, x order), padding k//2 -> pad row N."""
    n, p = batch * height * width, kernel // 2
    rows = torch.full((batch, height + 2 * p, width + 2 * p), n)
    rows[:, p : p + height, p : p + width] = torch.arange(n).view(batch, height, width)
    return rows.unfold(1, kernel, stride).unfold(2, kernel, stride).reshape(-1, kernel * kernel)


@pytest.mark.parametrize("stride", [1, 2])
def test_threaded_kernels_equal_aten(stride: int, gen) -> None:
    """The kernels split rows across OpenMP threads (the weight gradients into one partial sum per
    thread). Autograd's backward runs on its own thread count, so the kernels are called directly
    here, three threads, on a dense map's window table, against aten's conv and its backward."""
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        k, (b, h, w) = 5, (2, 11, 7)
        x = torch.randn(b, CHANNELS, h, w, generator=gen, dtype=torch.float64)
        x = x.contiguous(memory_format=torch.channels_last)
        weight = torch.randn(CHANNELS, 1, k, k, generator=gen, dtype=torch.float64)
        y = F.conv2d(x, weight, None, stride, k // 2, 1, CHANNELS)
        grad = torch.randn(y.shape, generator=gen, dtype=torch.float64).contiguous(
            memory_format=torch.channels_last
        )
        ref_in, ref_w, _ = torch.ops.aten.convolution_backward(
            grad,
            x,
            weight,
            None,
            [stride] * 2,
            [k // 2] * 2,
            [1, 1],
            False,
            [0, 0],
            CHANNELS,
            [True, True, False],
        )
        rows, grad_rows = (
            x.permute(0, 2, 3, 1).reshape(-1, CHANNELS),
            grad.permute(0, 2, 3, 1).reshape(-1, CHANNELS),
        )
        windows, columns = map_windows(b, h, w, k, stride), weight.reshape(CHANNELS, -1).t()
        out = depthwise.gather_sum(rows, windows, columns)
        assert rel_err(out, y.permute(0, 2, 3, 1).reshape(-1, CHANNELS)) <= 1e-10
        got_in = depthwise.gather_sum(grad_rows, depthwise.inverse_windows(windows, len(rows)), columns)
        assert rel_err(got_in, ref_in.permute(0, 2, 3, 1).reshape(-1, CHANNELS)) <= 1e-10
        got_w = depthwise.gather_weight_grad(rows, windows, grad_rows).t().reshape(weight.shape)
        assert rel_err(got_w, ref_w) <= 1e-10
        assert rel_err(depthwise.map_weight_grad(x, grad, k, stride, k // 2), ref_w) <= 1e-10
    finally:
        torch.set_num_threads(threads)
