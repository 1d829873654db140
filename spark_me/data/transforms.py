"""SparK's pretraining augmentation (torchvision): RandomResizedCrop(scale 0.67-1, bicubic) + flip."""

from __future__ import annotations

from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pretrain_transform(input_size: int | tuple[int, int]) -> transforms.Compose:
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    if input_size[0] % 32 or input_size[1] % 32:
        raise ValueError(f"--input_size {input_size} must be a multiple of 32 (SparK masks 32x32 patches)")
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(
                input_size, scale=(0.67, 1.0), interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transform(input_size: int | tuple[int, int]) -> transforms.Compose:
    """Deterministic resize + centre crop, for reconstruction pictures."""
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    return transforms.Compose(
        [
            transforms.Resize(min(input_size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(input_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
