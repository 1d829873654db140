"""Running a timm model's stages plainly, and comparing maps and gradients: shared by the oracle's
tests and the generic path's family matrix."""

from __future__ import annotations

import torch
from torch import Tensor, nn

STRIDES = (4, 8, 16, 32)


def rel_err(got: Tensor, want: Tensor) -> float:
    with torch.no_grad():
        return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def probes_for(maps: list[Tensor], gen: torch.Generator) -> list[Tensor]:
    """Random weights of a scalar loss sum(map * probe): every output site gets its own gradient."""
    return [torch.randn(m.shape, generator=gen, dtype=m.dtype) for m in maps]


def backward(maps: list[Tensor], probes: list[Tensor]) -> None:
    sum((m * p).sum() for m, p in zip(maps, probes, strict=True)).backward()


def assert_maps_close(got: list[Tensor], want: list[Tensor], tol: float, what: str = "") -> None:
    assert len(got) == len(want) == 4
    for g, w, s in zip(got, want, STRIDES, strict=True):
        assert g.shape == w.shape, f"{what} stride {s}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert rel_err(g, w) <= tol, f"{what} stride {s}: relative error {rel_err(g, w):.2e}"


def assert_zero_at_masked(maps: list[Tensor], active: Tensor) -> None:
    """Exactly 0 at every masked site of every map (the cell of a site at stride s: its index // (32/s))."""
    for m, s in zip(maps, STRIDES, strict=True):
        r = 32 // s
        visible = active.repeat_interleave(r, 1).repeat_interleave(r, 2)[:, None]
        assert m.shape[2:] == visible.shape[2:], (
            f"stride {s}: {tuple(m.shape)} vs mask {tuple(visible.shape)}"
        )
        assert torch.equal(m * ~visible, torch.zeros_like(m)), f"stride {s}: nonzero at masked sites"


def assert_grads_close(got: nn.Module, want: nn.Module, tol: float, floor: float = 1e-3) -> None:
    """Every parameter of `want` that received a gradient has the same one in `got` (same names).

    Each gradient is compared relative to max(its own largest entry, `floor` x the model's largest
    gradient entry): the bias of a train-mode BN followed by a linear conv and another train-mode BN
    has a gradient that is exactly 0 in exact arithmetic (the next BN removes any per-channel shift),
    so both sides hold only float64 rounding noise (~1e-16 of the largest gradient) there.
    """
    theirs = dict(want.named_parameters())
    mine = dict(got.named_parameters())
    # `got` may have lost the modules after its last stage (they never ran: no gradient in `want`)
    assert mine.keys() <= theirs.keys(), sorted(mine.keys() - theirs.keys())
    gone = [n for n in theirs.keys() - mine.keys() if theirs[n].grad is not None]
    assert not gone, f"parameters with a gradient missing from the encoder: {gone}"
    present = [p.grad.abs().max() for p in theirs.values() if p.grad is not None]
    assert present, "no parameter received a gradient"
    least = floor * float(max(present))
    for name, p in theirs.items():
        if name not in mine:
            continue
        g = mine[name].grad
        assert (g is None) == (p.grad is None), f"{name}: gradient present in only one of the two"
        if p.grad is not None:
            err = float((g - p.grad).abs().max()) / max(float(p.grad.abs().max()), least)
            assert err <= tol, f"{name}: gradient error {err:.2e} (relative, floor {least:.1e})"


def assert_buffers_close(got: nn.Module, want: nn.Module, tol: float) -> None:
    """BN running statistics (and counters) updated identically."""
    mine = dict(got.named_buffers())
    for name, b in want.named_buffers():
        if name not in mine:  # a module after the last stage (never ran)
            continue
        if b.is_floating_point():
            assert rel_err(mine[name], b) <= tol, f"{name}: {rel_err(mine[name], b):.2e}"
        else:
            assert torch.equal(mine[name], b), name
