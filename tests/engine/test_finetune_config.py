"""Fine-tuning options: SparK's rows, the family fallbacks, precedence flag > YAML > recipe, checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from spark_me.engine.finetune_config import resolve
from spark_me.engine.probe_config import resolve as resolve_probe
from spark_me.engine.recipes import OTHER, SPARK_ROWS, recipe_for

DATA = ["--data_path", "some/folder"]
# REFERENCE.md section 8, as (epochs, warmup, opt, blr, layer decay, wd, mixup, rep_aug, drop path, ema)
OFFICIAL = {
    "resnet50": (300, 5, "lamb", 2e-3, 0.7, 0.02, 0.1, 0, 0.05, 0.9999),
    "resnet101": (300, 5, "lamb", 1e-3, 0.8, 0.02, 0.1, 0, 0.2, 0.9999),
    "resnet152": (300, 5, "lamb", 1e-3, 0.8, 0.02, 0.1, 0, 0.2, 0.9999),
    "resnet200": (300, 5, "lamb", 1e-3, 0.8, 0.02, 0.1, 0, 0.2, 0.9999),
    "convnext_small": (400, 20, "adamw", 2e-4, 0.7, 0.01, 0.8, 3, 0.3, 0.9999),
    "convnext_base": (400, 20, "adamw", 1e-4, 0.7, 0.01, 0.8, 3, 0.4, 0.9999),
    "convnext_large": (200, 10, "adamw", 1e-4, 0.7, 0.02, 0.8, 3, 0.5, 0.9999),
}
FIELDS = ("epochs", "warmup_epochs", "opt", "blr", "layer_decay", "weight_decay", "mixup", "rep_aug")
FIELDS += ("drop_path", "ema")


@pytest.mark.parametrize("arch", sorted(OFFICIAL))
def test_official_rows_are_the_defaults(arch: str) -> None:
    cfg = resolve([*DATA, "--arch", arch])
    assert tuple(getattr(cfg, f) for f in FIELDS) == OFFICIAL[arch]
    assert cfg.recipe == f"SparK's {arch} row" and cfg.cutmix == 1.0 and cfg.smoothing == 0.1


def test_families_without_a_row() -> None:
    assert recipe_for("resnet18")[0] == recipe_for("resnet50d")[0] == SPARK_ROWS["resnet50"]
    tiny, source = recipe_for("convnextv2_tiny")
    assert tiny.opt == "adamw" and tiny.drop_path == 0.1 and "convnext family" in source
    assert recipe_for("convnextv2_base")[0] == SPARK_ROWS["convnext_base"]
    for arch in ("efficientnet_b0", "regnety_016", "mobilenetv3_large_100"):  # any other timm CNN
        assert recipe_for(arch)[0] == OTHER and resolve([*DATA, "--arch", arch]).opt == "adamw"


def test_flag_beats_yaml_beats_recipe(tmp_path: Path) -> None:
    config = tmp_path / "ft.yaml"
    config.write_text("arch: resnet101\nblr: 1e-3\nepochs: 30\nmixup: 0.5\n")
    cfg = resolve([*DATA, "--config", str(config), "--mixup", "0.2"])
    assert (cfg.arch, cfg.blr, cfg.epochs, cfg.mixup, cfg.layer_decay) == ("resnet101", 1e-3, 30, 0.2, 0.8)
    assert cfg.warmup_epochs == 0  # the recipe's 5 of 300 epochs, scaled to a 30-epoch run: 0.5 -> 0
    assert resolve([*DATA, "--epochs", "120"]).warmup_epochs == 2  # 5 * 120 / 300
    config.write_text("epochz: 3\n")
    with pytest.raises(ValueError, match="unknown option.*epochz"):
        resolve([*DATA, "--config", str(config)])


BAD = [
    (["--epochs", "0"], "--epochs 0: must be >= 1"),
    (["--input_size", "16"], "--input_size 16: must be >= 32"),
    (["--layer_decay", "0"], "--layer_decay 0.0: must be in (0, 1]"),
    (["--ema", "1"], "--ema 1.0: must be in [0, 1)"),
    (["--mixup", "-0.1"], "--mixup -0.1: must be >= 0"),
    (["--opt", "adamm"], "--opt adamm: not a timm optimiser"),
    (["--warmup_epochs", "10", "--epochs", "10"], "--warmup_epochs 10: must be below --epochs 10"),
    (["--batch_size", "9"], "--batch_size 9: Mixup/CutMix pair images"),
    (["--aa", "rand-m9-mstd0.5-inc1"], "add -mmax9"),
    (["--crop_pct", "1.5"], "--crop_pct 1.5"),
]


@pytest.mark.parametrize(("flags", "message"), BAD)
def test_bad_values_are_one_line_naming_the_option(flags: list[str], message: str) -> None:
    with pytest.raises(ValueError) as exc:
        resolve([*DATA, *flags])
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_odd_batch_is_fine_without_mixing_and_probe_checks_its_options() -> None:
    assert resolve([*DATA, "--batch_size", "9", "--mixup", "0", "--cutmix", "0"]).batch_size == 9
    assert resolve_probe([*DATA, "--method", "linear"]).knn_k == 20
    with pytest.raises(ValueError, match=r"--knn_k 0: must be >= 1; --knn_t 0.0: must be > 0"):
        resolve_probe([*DATA, "--knn_k", "0", "--knn_t", "0"])
