"""Fine-tuning defaults per architecture: the official SparK rows, and documented fallbacks.

The rows are SparK's `downstream_imagenet/arg.py` (REFERENCE.md section 8): global batch 4096,
224 px, lr = blr x global batch / 256, warmup from 0.005 lr then cosine to 0.001 lr, layer-wise lr
decay, Mixup + CutMix (CutMix alpha 1.0, switch probability 0.5, label smoothing 0.1), EMA 0.9999.

An architecture without a row takes its family's nearest row (`recipe_for` says which, and the run
logs it); a CNN of a family SparK never fine-tuned (timm has hundreds) takes `OTHER`, AdamW with
settings that suit most timm CNNs at a small drop path. Every value can be overridden by a flag or
the YAML file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Recipe:
    epochs: int
    warmup_epochs: int
    opt: str  # timm optimiser name (create_optimizer_v2): 'lamb' or 'adamw'
    blr: float  # lr = blr x effective batch / 256
    layer_decay: float  # lr of layer i = lr x layer_decay ** (layers - 1 - i); 1.0 turns it off
    weight_decay: float
    mixup: float  # Mixup alpha (0: off)
    rep_aug: int  # repeated augmentation count (0: off)
    drop_path: float
    ema: float  # EMA decay (0: no EMA model)

    def as_dict(self) -> dict:
        return asdict(self)


# SparK's official rows (its global batch is 4096; here the batch is per process, see FinetuneConfig)
SPARK_ROWS: dict[str, Recipe] = {
    "convnext_small": Recipe(400, 20, "adamw", 2e-4, 0.7, 0.01, 0.8, 3, 0.3, 0.9999),
    "convnext_base": Recipe(400, 20, "adamw", 1e-4, 0.7, 0.01, 0.8, 3, 0.4, 0.9999),
    "convnext_large": Recipe(200, 10, "adamw", 1e-4, 0.7, 0.02, 0.8, 3, 0.5, 0.9999),
    "resnet50": Recipe(300, 5, "lamb", 2e-3, 0.7, 0.02, 0.1, 0, 0.05, 0.9999),
    "resnet101": Recipe(300, 5, "lamb", 1e-3, 0.8, 0.02, 0.1, 0, 0.2, 0.9999),
    "resnet152": Recipe(300, 5, "lamb", 1e-3, 0.8, 0.02, 0.1, 0, 0.2, 0.9999),
    "resnet200": Recipe(300, 5, "lamb", 1e-3, 0.8, 0.02, 0.1, 0, 0.2, 0.9999),
}

# Families without a row of their own, by name prefix (longest prefix first):
# - smaller / other ResNets (resnet18/26/34, resnet50d, ...): resnet50's row;
# - ConvNeXt V1/V2 below small (atto .. tiny): convnext_small's row with drop path 0.1, since
#   smaller models need less regularisation (ConvNeXt's own tiny recipe uses 0.1);
# - ConvNeXt V2 base and above: the V1 row of the same size (huge: large's).
FAMILY_ROWS: tuple[tuple[str, Recipe], ...] = (
    ("convnextv2_base", SPARK_ROWS["convnext_base"]),
    ("convnextv2_large", SPARK_ROWS["convnext_large"]),
    ("convnextv2_huge", SPARK_ROWS["convnext_large"]),
    ("convnext_xlarge", SPARK_ROWS["convnext_large"]),
    ("convnext", Recipe(400, 20, "adamw", 2e-4, 0.7, 0.01, 0.8, 3, 0.1, 0.9999)),
    ("resnet", SPARK_ROWS["resnet50"]),
)

# Any other timm CNN (EfficientNet, RegNet, MobileNet, DenseNet, ...): AdamW at blr 1e-3 (an lr of
# 4e-3 at batch 1024), weight decay 0.05, layer decay 0.8, light Mixup, no repeated augmentation,
# drop path 0.05: a middle-of-the-road transfer recipe that does not depend on a family's quirks.
OTHER = Recipe(100, 5, "adamw", 1e-3, 0.8, 0.05, 0.1, 0, 0.05, 0.9999)


def recipe_for(arch: str) -> tuple[Recipe, str]:
    """(recipe, where it comes from), e.g. (..., "SparK's resnet50 row") for `arch`."""
    if arch in SPARK_ROWS:
        return SPARK_ROWS[arch], f"SparK's {arch} row"
    for prefix, recipe in sorted(FAMILY_ROWS, key=lambda item: -len(item[0])):
        if arch.startswith(prefix):
            return recipe, f"the {prefix} family default"
    return OTHER, "the default for CNNs without a SparK recipe"
