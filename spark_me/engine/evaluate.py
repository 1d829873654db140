"""Validation loss on held-out images: the number that says whether pretraining generalises.

The train loss mixes random crops and fresh masks every step, so it cannot be compared across
epochs image for image, and it says nothing about images the model never saw. Here every held-out
image is centre-cropped and keeps one mask for the whole run (drawn once from a generator seeded with
`--seed`), so successive values differ only because the weights changed. The value is SparK's
masked-patch loss, the same quantity as the train loss.

Runs on the main process only: held-out sets are small next to the training data.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from spark_me.data.images import HELD_OUT_PHOTOS, ImageFiles, sample_photo_paths
from spark_me.data.transforms import eval_transform
from spark_me.engine.config import PretrainConfig
from spark_me.masking import random_mask
from spark_me.models.spark import SparK

log = logging.getLogger("spark_me.evaluate")


def val_dataset(cfg: PretrainConfig) -> ImageFiles | None:
    """--val_path; else, on the embedded set, the photographs held out of it; else no validation."""
    if cfg.val_every == 0:
        return None
    transform = eval_transform(cfg.input_size)
    if cfg.val_path:
        return ImageFiles(cfg.val_path, transform)
    if cfg.data_path is None:
        return ImageFiles(sample_photo_paths(HELD_OUT_PHOTOS), transform)
    log.info("no --val_path: no validation loss (give a folder of held-out images to get one)")
    return None


@dataclass
class Validation:
    loader: DataLoader  # centre crops, in a fixed order
    masks: Tensor  # [N, H/32, W/32] bool: image i always gets masks[i]
    every: int  # epochs between evaluations
    epochs: int  # the last epoch is always evaluated

    @classmethod
    def from_config(cls, cfg: PretrainConfig) -> Validation | None:
        dataset = val_dataset(cfg)
        if dataset is None:
            return None
        gen = torch.Generator().manual_seed(cfg.seed)
        masks = random_mask(len(dataset), cfg.input_size, cfg.input_size, cfg.mask_ratio, generator=gen)
        loader = DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            shuffle=False,
            num_workers=cfg.num_workers,
            generator=torch.Generator(),  # leaves the global RNG (augmentation, masks) untouched
        )
        log.info("validation: %d held-out images under %s", len(dataset), dataset.root)
        return cls(loader, masks, cfg.val_every, cfg.epochs)

    def due(self, epoch: int) -> bool:
        """Whether to evaluate after 0-based `epoch`."""
        return (epoch + 1) % self.every == 0 or epoch + 1 == self.epochs

    def pictures(self, count: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The first `count` held-out images [n, 3, H, W] and their fixed masks [n, H/32, W/32]."""
        dataset = self.loader.dataset
        images = torch.stack([dataset[i] for i in range(min(count, len(dataset)))])
        return images.to(device), self.masks[: len(images)].to(device)

    @torch.no_grad()
    def loss(self, model: SparK, amp: AbstractContextManager | None = None) -> float:
        """Masked-patch loss over all held-out images (eval mode; the model's mode is restored).

        Every image masks the same number of patches, so weighting batch means by batch size gives
        the mean over all masked patches exactly.
        """
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        total, seen = 0.0, 0
        try:
            with amp if amp is not None else nullcontext():
                for images in self.loader:
                    active = self.masks[seen : seen + len(images)].to(device)
                    value = model.forward_all(images.to(device, non_blocking=True), active).loss
                    total += float(value) * len(images)
                    seen += len(images)
        finally:
            model.train(was_training)
        return total / seen
