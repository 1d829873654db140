"""SparK: mask -> sparsify -> encode -> densify -> decode -> loss, on genuine sparse tensors."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import MinkowskiEngine as ME
import torch
from torch import Tensor, nn
from torch.profiler import record_function

from spark_me.masking import PATCH, random_mask
from spark_me.models.decoder import LightDecoder
from spark_me.models.encoder import SparseEncoder, check_mask
from spark_me.sparse.layers import SparseBatchNorm2d, SparseLayerNorm, with_features
from spark_me.sparse.tensor import dense_rows, scatter_rows, sparsify, upsample_mask

MASK_TOKEN_STD = 0.02  # mask tokens: trunc-normal with this std, truncated at +-this value


def patchify(images: Tensor, patch: int = PATCH) -> Tensor:
    """[B, C, H, W] -> [B, L, patch*patch*C], patches in row-major order (matches `active.flatten(1)`)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: Tensor, height: int, width: int, patch: int = PATCH) -> Tensor:
    """Inverse of `patchify`."""
    b, _, d = patches.shape
    c = d // (patch * patch)
    x = patches.reshape(b, height // patch, width // patch, patch, patch, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, height, width)


def normalized_patches(images: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Per-patch normalised target [B, L, D] with the mean and std [B, L, 1] that undo it."""
    target = patchify(images)
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True, unbiased=True) + eps).sqrt()
    return (target - mean) / std, mean, std


@dataclass
class SparKOutput:
    loss: Tensor  # scalar
    pred: Tensor  # [B, 3, H, W] decoder output (per-patch normalised pixel space)
    active: Tensor  # [B, H/32, W/32] bool, visible cells


def uses_batchnorm(encoder: nn.Module) -> bool:
    """Whether the encoder normalises with BatchNorm (any `_BatchNorm`, sparse or timm's)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in encoder.modules())


class SparK(nn.Module):
    """Sparse masked modelling around any `SparseEncoder` (see `spark_me.create_encoder`)."""

    def __init__(self, encoder: SparseEncoder, decoder_width: int = 768, mask_ratio: float = 0.6):
        super().__init__()
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        widths = [decoder_width // 2**i for i in range(4)]  # stride 32, 16, 8, 4
        enc_channels = list(reversed(encoder.channels))  # stride 32 first
        # As the official SparK: BatchNorm-based encoders (ResNets) densify through a sparse BN with
        # torch's defaults; the others (ConvNeXt) through a sparse LayerNorm with eps 1e-6 (torch's
        # default 1e-5 shifts the gradients by ~5e-3 relative). Generic encoders: BN if the model
        # has BatchNorm layers.
        norm = SparseBatchNorm2d if uses_batchnorm(encoder) else partial(SparseLayerNorm, eps=1e-6)
        # Densify, per scale from stride 32 to 4: sparse norm -> mask token at holes -> projection.
        self.densify_norms = nn.ModuleList(norm(c) for c in enc_channels)
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.zeros(1, c, 1, 1)) for c in enc_channels)
        self.densify_projs = nn.ModuleList(
            (nn.Identity() if c == d else nn.Conv2d(c, d, 1, bias=True))
            if i == 0
            else nn.Conv2d(c, d, 3, padding=1, bias=True)
            for i, (c, d) in enumerate(zip(enc_channels, widths, strict=True))
        )
        self.decoder = LightDecoder(decoder_width, up_ratio=PATCH)
        self._compiled_stages = None  # set by compile_dense_stages (not a submodule: no state)
        # As the official code: the projections keep torch's default Conv2d init (it never
        # re-initialises them); mask tokens are trunc-normal .02 cut at +-.02 (torch's a/b are
        # absolute values, so the defaults +-2 would cut nothing at this std).
        for token in self.mask_tokens:
            nn.init.trunc_normal_(token, std=MASK_TOKEN_STD, a=-MASK_TOKEN_STD, b=MASK_TOKEN_STD)

    # -- the stages -----------------------------------------------------------------------------
    def mask(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Random visible cells [B, H/32, W/32]."""
        b, _, h, w = images.shape
        return random_mask(b, h, w, self.mask_ratio, generator=generator, device=images.device)

    def encode(self, images: Tensor, active: Tensor) -> list[ME.SparseTensor]:
        """Sparsify the visible pixels and run the sparse encoder: 4 sparse maps, strides 4..32.

        Under autocast the encoder's kernels run in the autocast dtype (see SparseEncoder)."""
        return self.encoder.forward_sparse(sparsify(images, active))

    def densify(
        self, feats: list[ME.SparseTensor], active: Tensor, image_hw: tuple[int, int]
    ) -> list[Tensor]:
        """Sparse maps (strides 4..32) -> dense decoder inputs (strides 32..4), holes = mask token."""
        rows, where = self.densify_rows(feats, active, image_hw)
        return self.fill_and_project(rows, where, active.shape[0], image_hw)

    def densify_rows(
        self, feats: list[ME.SparseTensor], active: Tensor, image_hw: tuple[int, int]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Densify's first half, on MinkowskiEngine tensors (never compiled): per scale from stride
        32 to 4, the normalised features [N_i, C_i] and their rows [N_i] in the dense map."""
        height, width = image_hw
        rows, where = [], []
        for i, x in enumerate(reversed(feats)):
            stride = PATCH // 2**i
            shape = (active.shape[0], x.F.shape[1], height // stride, width // stride)
            with torch.autocast(active.device.type, enabled=False):  # norm statistics in float32
                if x.F.dtype not in (torch.float32, torch.float64):
                    x = with_features(x, x.F.float())
                x = self.densify_norms[i](x)
            rows.append(x.F)
            where.append(dense_rows(x, shape))
        return rows, where

    def fill_and_project(
        self, rows: list[Tensor], where: list[Tensor], batch: int, image_hw: tuple[int, int]
    ) -> list[Tensor]:
        """Densify's second half, plain torch (what `--compile` compiles): rows [N_i, C_i] at
        `where` [N_i], the scale's mask token elsewhere, then the projection to the decoder width.
        Returns [B, d_i, H/s, W/s] for s = 32, 16, 8, 4."""
        height, width = image_hw
        out = []
        for i, (feats, index) in enumerate(zip(rows, where, strict=True)):
            stride = PATCH // 2**i
            shape = (batch, feats.shape[1], height // stride, width // stride)
            dense = scatter_rows(feats, index, shape, fill=self.mask_tokens[i])  # holes = mask token
            # The decoder's memory format: NCHW on the CPU, where its convs ran 20 % slower
            # channels-last (benchmarks/README.md); channels-last on GPUs, as cuDNN prefers.
            fmt = torch.channels_last if dense.is_cuda else torch.contiguous_format
            dense = dense.contiguous(memory_format=fmt)
            out.append(self.densify_projs[i](dense))
        return out

    def decode(self, to_dec: list[Tensor]) -> Tensor:
        return self.decoder(to_dec)

    def loss(self, images: Tensor, pred: Tensor, active: Tensor) -> Tensor:
        """MSE against per-patch normalised pixels, averaged over masked patches only."""
        # at least float32 (bf16/fp16 predictions under autocast), float64 kept as float64
        dtype = torch.promote_types(torch.promote_types(pred.dtype, images.dtype), torch.float32)
        target, _, _ = normalized_patches(images.to(dtype))
        per_patch = (patchify(pred.to(dtype)) - target).pow(2).mean(dim=-1)  # [B, L]
        masked = (~active).flatten(1).to(dtype)
        return (per_patch * masked).sum() / (masked.sum() + 1e-8)

    def dense_stages(
        self, rows: list[Tensor], where: list[Tensor], images: Tensor, active: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Everything after the sparse encoder and densify's norms, in plain torch: mask-token fill
        and projections, decoder, loss. Returns (loss, pred [B, 3, H, W]). This is what
        `compile_dense_stages` compiles; the eager step runs the same methods (densify's second
        half, decode, loss), one profiler label each."""
        to_dec = self.fill_and_project(rows, where, images.shape[0], images.shape[-2:])
        pred = self.decode(to_dec)
        return self.loss(images, pred, active), pred

    def compile_dense_stages(self, **options) -> None:
        """Run `dense_stages` through `torch.compile(**options)` from now on (the encoder stays
        eager: MinkowskiEngine's ops cannot be traced).

        The number of visible sites N_i varies from mask to mask; those dimensions are marked
        dynamic at every call, so a new mask reuses the compiled code instead of recompiling. The
        unbound function is compiled (self is an argument), so no wrapper module enters the model:
        state_dict keys stay those of the eager model, and a copy of the model stays independent.
        """
        if type(self).densify is not SparK.densify or type(self).encode is not SparK.encode:
            raise TypeError(f"{type(self).__name__} has its own encode/densify: dense_stages would not match")
        self._compiled_stages = torch.compile(type(self).dense_stages, **options)

    # -- entry points ---------------------------------------------------------------------------
    def forward_all(self, images: Tensor, active: Tensor | None = None) -> SparKOutput:
        """images [B, 3, H, W] (normalised); active [B, H/32, W/32] or None for a random mask."""
        if active is None:
            active = self.mask(images)
        check_mask(images, active)
        active = active.to(images.device, torch.bool)
        with record_function("spark.encode"):  # stage names show up in torch.profiler traces
            feats = self.encode(images, active)
        if self._compiled_stages is None:
            with record_function("spark.densify"):
                to_dec = self.densify(feats, active, images.shape[-2:])
            with record_function("spark.decode"):
                pred = self.decode(to_dec)
            with record_function("spark.loss"):
                loss = self.loss(images, pred, active)
        else:
            with record_function("spark.densify"):
                rows, where = self.densify_rows(feats, active, images.shape[-2:])
            for t in (*rows, *where):  # N_i: symbolic, not a constant to guard on
                torch._dynamo.maybe_mark_dynamic(t, 0)
            loss, pred = self._compiled_stages(self, rows, where, images, active)
        return SparKOutput(loss, pred, active)

    def forward(self, images: Tensor, active: Tensor | None = None) -> Tensor:
        """The scalar loss."""
        return self.forward_all(images, active).loss

    @torch.no_grad()
    def reconstruct(self, images: Tensor, active: Tensor | None = None) -> dict[str, Tensor]:
        """What a person wants to look at, all [B, 3, H, W] in the input's space.

        input, masked (visible pixels only, 0 elsewhere), prediction (the decoder's patches mapped
        back with each patch's true mean/std), merged (prediction at masked patches, input at
        visible ones), and the pixel mask `visible` [B, 1, H, W].
        """
        out = self.forward_all(images, active)
        height, width = images.shape[-2:]
        _, mean, std = normalized_patches(images.float())
        prediction = unpatchify(patchify(out.pred.float()) * std + mean, height, width)
        visible = upsample_mask(out.active, height, width)
        return {
            "input": images,
            "masked": images * visible,
            "prediction": prediction,
            "merged": torch.where(visible, images.float(), prediction),
            "visible": visible,
            "loss": out.loss,
        }
