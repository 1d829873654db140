"""The three pretraining steps being compared; they share SparK's densify, decoder, loss and LAMB.

sparse        spark-me: visible pixels as ME sparse tensors (the product)
masked_dense  SparK's official emulation: dense convs on the zero-filled image, re-masked after
              every op, BN over active sites (spark_me.models.reference for ResNet / ConvNeXt,
              spark_me.models.masked_dense for any other timm CNN)
dense         the same network with the encoder on the whole image (no masking, timm's own
              forward); the decoder and the loss are the run's, at its mask ratio, so the step does
              real work: the cost of plain dense training with SparK's decoder

Every variant runs at every mask ratio. The loss averages over the masked cells; at ratio 0 there
are none (SparK's loss is then exactly 0 and every gradient zero, a degenerate step), so a
benchmark step at ratio 0 averages over all cells instead, at the same cost.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from timm.optim import Lamb
from torch import Tensor, nn

from spark_me.models.masked_dense import MaskedDenseModel
from spark_me.models.reference import MaskedDenseEncoder, _Masker
from spark_me.models.registry import create_encoder, is_hand_written
from spark_me.models.spark import SparK
from spark_me.sparse.layers import SparseBatchNorm2d
from spark_me.sparse.tensor import upsample_mask

VARIANTS = ("sparse", "masked_dense", "dense")


def _dense_norm(norm, x: Tensor, masker: _Masker | None) -> Tensor:
    """The densify norm applied to a dense map (over active sites only when a masker is given)."""
    if isinstance(norm, SparseBatchNorm2d):
        if masker is None:
            return torch.nn.BatchNorm2d.forward(norm, x)
        # the sparse BN's own parameters and statistics, through BatchNorm2d's dense forward
        return masker.batch_norm(lambda t: torch.nn.BatchNorm2d.forward(norm, t), x)
    out = F.layer_norm(x.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return out.permute(0, 3, 1, 2)


class MaskedDenseSparK(SparK):
    """SparK with a masked-dense encoder (timm modules) in place of the sparse one: SparK's own
    emulation for the hand-written families (ResNet, ConvNeXt), the masked-dense TorchFunctionMode
    reference for any other timm CNN (the generic families)."""

    def __init__(self, arch: str, decoder_width: int, mask_ratio: float, masked: bool = True):
        sparse = create_encoder(arch, dataflow="rules")
        super().__init__(sparse, decoder_width=decoder_width, mask_ratio=mask_ratio)
        if is_hand_written(arch):
            self.encoder = MaskedDenseEncoder(timm.create_model(arch, num_classes=0))
        else:  # the generic encoder's own (pruned) timm model, run densely
            self.encoder = MaskedDenseModel(sparse.model, sparse.stage_names)
        self.masked = masked

    def encode(self, images: Tensor, active: Tensor) -> list[Tensor]:
        if self.masked:
            return self.encoder(images, active)
        if isinstance(self.encoder, MaskedDenseModel):
            return self.encoder.dense(images)
        indices = [1, 2, 3, 4] if self.encoder.model.__class__.__name__ == "ResNet" else [0, 1, 2, 3]
        return self.encoder.model.forward_intermediates(images, indices=indices, intermediates_only=True)

    def densify(self, feats: list[Tensor], active: Tensor, image_hw) -> list[Tensor]:
        masker = _Masker(active) if self.masked else None
        out = []
        for i, x in enumerate(reversed(feats)):
            x = _dense_norm(self.densify_norms[i], x, masker)
            if self.masked:
                visible = upsample_mask(active, x.shape[2], x.shape[3])
                x = torch.where(visible, x, self.mask_tokens[i].to(x.dtype))
            out.append(self.densify_projs[i](x))
        return out


def build(variant: str, arch: str, decoder_width: int = 768, mask_ratio: float = 0.6) -> SparK:
    if variant == "sparse":
        return SparK(create_encoder(arch), decoder_width=decoder_width, mask_ratio=mask_ratio)
    if variant in ("masked_dense", "dense"):
        return MaskedDenseSparK(arch, decoder_width, mask_ratio, masked=variant == "masked_dense")
    raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")


def loss_cells(active: Tensor) -> Tensor:
    """The `active` argument of `SparK.loss` for a benchmark step [B, h, w]: the run's mask, or, when
    it masks nothing (ratio 0), no visible cell, so that every cell counts in the loss."""
    return active if not bool(active.all()) else torch.zeros_like(active)


def step_loss(model: SparK, variant: str, images: Tensor, active: Tensor) -> Tensor:
    """A pretraining step's loss: encoder on the visible cells (dense: on all of them), then
    densify, decoder and the loss over the masked cells of `active` (all cells at ratio 0)."""
    seen = torch.ones_like(active) if variant == "dense" else active
    feats = model.encode(images, seen)
    pred = model.decode(model.densify(feats, seen, images.shape[-2:]))
    return model.loss(images, pred, loss_cells(active))


@dataclass
class BenchStep:
    """A variant's model and optimiser, with the two things the harness times."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    full_step: Callable[[], None]  # zero_grad + forward + backward + LAMB step
    encoder_step: Callable[[], None]  # encoder forward + backward


def _autocast(device: torch.device, amp: str):
    dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def bench_step(variant: str, arch: str, images: Tensor, active: Tensor, decoder_width: int = 768,
               amp: str = "none") -> BenchStep:  # fmt: skip
    """The step of `variant` on `images` [B, 3, H, W] with the run's mask `active` [B, H/32, W/32]."""
    ratio = 1.0 - float(active.float().mean())
    model = build(variant, arch, decoder_width=decoder_width, mask_ratio=ratio).to(images.device)
    optimizer = Lamb(model.parameters(), lr=1e-4)
    seen = torch.ones_like(active) if variant == "dense" else active

    def full_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(images.device, amp):
            loss = step_loss(model, variant, images, active)
        loss.backward()
        optimizer.step()

    def encoder_step() -> None:
        with _autocast(images.device, amp):
            feats = model.encode(images, seen)
        sum((f.F if hasattr(f, "F") else f).float().sum() for f in feats).backward()

    return BenchStep(model, optimizer, full_step, encoder_step)


def timm_step(arch: str, images: Tensor, amp: str = "none") -> BenchStep:
    """Plain timm training at the same size: forward_features, a mean loss, backward, the same LAMB
    step over timm's parameters. What the dense variant is read against."""
    model = timm.create_model(arch, num_classes=0).to(images.device)
    optimizer = Lamb(model.parameters(), lr=1e-4)

    def encoder_step() -> None:
        with _autocast(images.device, amp):
            loss = model.forward_features(images).float().pow(2).mean()
        loss.backward()

    def full_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        encoder_step()
        optimizer.step()

    return BenchStep(model, optimizer, full_step, encoder_step)
