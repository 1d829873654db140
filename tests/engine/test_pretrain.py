"""`spark-me pretrain` end to end on the CPU: outputs, resume, bad data, non-finite loss."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

import converters
from spark_me import cli
from spark_me.engine.config import resolve

from .conftest import TINY_RUN

pytestmark = pytest.mark.heavy  # whole commands in child processes: scheduled first (conftest)

TINY = TINY_RUN


def run(tmp: Path, *extra: str) -> int:
    return cli.main(["pretrain", "--output_dir", str(tmp), *TINY, *extra])


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "log.txt").read_text().splitlines()]


def test_zero_argument_config_is_the_demo() -> None:
    cfg = resolve([])
    assert cfg.data_path is None and cfg.preset == "demo" and cfg.arch == "resnet18"
    assert resolve(["--data_path", "x"]).arch == "resnet50"  # the SparK recipe for real data
    assert resolve(["--arch", "convnextv2_atto"]).arch == "convnextv2_atto"  # flags beat the preset


def test_yaml_config_and_flag_precedence(tmp_path: Path) -> None:
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("arch: convnext_atto\nepochs: 7\nmodel_kwargs: {depths: [1, 1, 1, 1]}\n")
    cfg = resolve(["--config", str(cfg_file), "--epochs", "9"])
    assert (cfg.arch, cfg.epochs, cfg.model_kwargs) == ("convnext_atto", 9, {"depths": [1, 1, 1, 1]})
    cfg_file.write_text("epochz: 3\n")
    with pytest.raises(ValueError, match="epochz"):
        resolve(["--config", str(cfg_file)])


def test_run_writes_checkpoint_export_pictures_logs(tmp_path: Path) -> None:
    assert run(tmp_path, "--epochs", "2", "--save_every", "1", "--keep_last", "1") == 0
    for name in (
        "checkpoint-last.pth",
        "timm-last.pth",
        "checkpoint-0002.pth",
        "timm-0002.pth",
        "reconstruction-last.png",
        "reconstruction-val-last.png",
        "reconstructions/epoch-0002.png",
        "reconstructions/val-epoch-0002.png",
        "config.yaml",
        "log.txt",
    ):
        assert (tmp_path / name).is_file(), name
    assert not (tmp_path / "checkpoint-0001.pth").exists()  # keep_last 1
    assert len(list((tmp_path / "tb").iterdir())) >= 1
    log = read_log(tmp_path)
    assert [r["epoch"] for r in log] == [1, 2]
    # the weight-decay ramp (0.04 -> 0.2 over the 8 updates) reaches its end value at the last update
    assert 0.04 < log[0]["weight_decay"] < 0.2 and log[1]["weight_decay"] == pytest.approx(0.2, abs=1e-12)
    with Image.open(tmp_path / "reconstruction-last.png") as img:
        assert img.size[0] > 4 * 64 and img.mode == "RGB"
    state = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)  # plain types only
    assert {"model", "optimizer", "epoch", "step", "config"} <= state.keys()
    assert state["step"] == 2 * 3 and state["config"]["arch"] == "resnet18"  # 12 training photos / batch 4
    assert any(k.startswith("decoder.") for k in state["model"])  # the decoder is kept
    decay, no_decay = state["optimizer"]["param_groups"]
    assert decay["weight_decay"] == pytest.approx(0.2, abs=1e-12) and no_decay["weight_decay"] == 0.0
    dense = timm.create_model("resnet18")
    missing = dense.load_state_dict(converters.load_state(tmp_path / "timm-last.pth"), strict=False)
    assert set(missing.missing_keys) == {"fc.weight", "fc.bias"} and not missing.unexpected_keys


def test_extending_a_finished_run(tmp_path: Path) -> None:
    """A finished 1-epoch run asked for 3 epochs continues from its checkpoint at step 3."""
    assert run(tmp_path, "--epochs", "1", "--save_every", "100") == 0
    assert run(tmp_path, "--epochs", "3") == 0
    assert [r["step"] for r in read_log(tmp_path)] == [3, 6, 9]


def test_repeat_and_last_checkpoint_only(tmp_path: Path) -> None:
    """--repeat 2 shows the 12 photographs twice an epoch (6 steps of 4); --save_every 0 keeps no
    numbered copies, not even of the last epoch (the demo's output folder stays small)."""
    assert run(tmp_path, "--epochs", "1", "--repeat", "2", "--save_every", "0") == 0
    assert [r["step"] for r in read_log(tmp_path)] == [6]
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["checkpoint-last.pth", "timm-last.pth"]


def test_a_batch_larger_than_the_repeated_data_is_refused(tmp_path: Path, caplog) -> None:
    assert run(tmp_path, "--batch_size", "25", "--repeat", "2") == 1
    assert "12 images x 2 repeat(s) is fewer than one batch (25 x 1 processes)" in caplog.text
    assert run(tmp_path, "--batch_size", "24", "--repeat", "2", "--epochs", "1") == 0


def flat(state: dict, keys: list[str]) -> torch.Tensor:
    return torch.cat([state[k].flatten() for k in keys])


def test_resume_after_kill_mid_epoch(tmp_path: Path) -> None:
    """Killed in epoch 2, the same command resumes from the end of epoch 1 (the last atomic
    checkpoint) and continues exactly like an uninterrupted run: same steps, same lr schedule, same
    losses and weights (to float rounding: ME's CPU kernels sum in a run-dependent order).

    With --accum_iter 2 over 3 batches an epoch, one batch is left over each epoch: it must not
    reach the next epoch's first update (the resumed run could not reproduce that)."""
    straight, killed_dir = tmp_path / "straight", tmp_path / "killed"
    accum = ["--accum_iter", "2", "--lr", "2e-3", "--save_every", "1", "--keep_last", "0", "--epochs", "2"]
    assert run(straight, *accum) == 0
    code = (
        "import sys, spark_me.engine.pretrain as p\n"
        "orig = p.train_one_epoch\n"
        "def dying(*a, **k):\n"
        "    if a[7] == 1: raise SystemExit(9)  # killed during the second epoch\n"
        "    return orig(*a, **k)\n"
        "p.train_one_epoch = dying\n"
        "from spark_me import cli\n"
        f"sys.exit(cli.main(['pretrain', '--output_dir', {str(killed_dir)!r}, *{TINY!r}, *{accum!r}]))\n"
    )
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr
    assert torch.load(killed_dir / "checkpoint-last.pth", weights_only=True)["epoch"] == 0
    assert run(killed_dir, *accum) == 0
    a, b = read_log(straight), read_log(killed_dir)
    assert [r["epoch"] for r in b] == [1, 2] and [r["step"] for r in b] == [1, 2]  # 3 // 2 per epoch
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    assert [r["weight_decay"] for r in a] == [r["weight_decay"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)
    # weights after epoch 2: the two runs differ by rounding only, far less than epoch 2 moved them
    # (norms, not elementwise maxima: LAMB's first steps turn rounding-level gradients into +-lr)
    first = torch.load(straight / "checkpoint-0001.pth", weights_only=True)["model"]
    want = torch.load(straight / "checkpoint-last.pth", weights_only=True)["model"]
    got = torch.load(killed_dir / "checkpoint-last.pth", weights_only=True)["model"]
    keys = [k for k, v in want.items() if k.endswith("weight") and v.dim() == 4]
    moved = (flat(want, keys) - flat(first, keys)).norm()
    assert moved > 1e-3 * flat(want, keys).norm()  # the lr is large enough for the update to show
    assert (flat(got, keys) - flat(want, keys)).norm() <= 1e-3 * moved


class ToyLoss(torch.nn.Module):
    """A float64 model whose loss is a mean over the batch (no batch statistics): accumulating the
    mean losses of k equal micro-batches, each divided by k, is the mean loss of their union."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).double()

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return (self.net(batch[:, :6]).squeeze(1) - batch[:, 6]).pow(2).mean()


def toy_epochs(model, batches_per_epoch: list[list[torch.Tensor]], accum: int) -> list[dict]:
    """Runs train_one_epoch over the given epochs; the parameters after each epoch."""
    from spark_me.engine import pretrain
    from spark_me.engine.config import PretrainConfig
    from spark_me.engine.distributed import DistEnv
    from spark_me.engine.optim import build_lr_scheduler, build_optimizer

    epochs = len(batches_per_epoch)
    steps_per_epoch = len(batches_per_epoch[0]) // accum
    cfg = PretrainConfig(arch="resnet18", accum_iter=accum, epochs=epochs, warmup_epochs=0, lr=0.05)
    optimizer = build_optimizer(model, cfg, cfg.lr)
    lr_sched = build_lr_scheduler(optimizer, cfg, cfg.lr, steps_per_epoch)
    step, after = 0, []
    for epoch, loader in enumerate(batches_per_epoch):
        total = epochs * steps_per_epoch
        _, step = pretrain.train_one_epoch(
            model, loader, optimizer, lr_sched, None, cfg, DistEnv(), epoch, step, total, None
        )
        assert step == (epoch + 1) * steps_per_epoch
        assert all(p.grad is None for p in model.parameters())  # nothing carried into the next epoch
        after.append({k: v.clone() for k, v in model.state_dict().items()})
    return after


def test_accumulation_takes_the_same_updates_as_one_big_batch(gen) -> None:
    """--accum_iter 3 with micro-batches of 2 == --accum_iter 1 with batches of 6, update by update,
    over two epochs of 4 micro-batches: the 4th micro-batch of epoch 1 is dropped, not added to the
    first update of epoch 2."""
    micro = [[torch.randn(2, 7, generator=gen, dtype=torch.float64) for _ in range(4)] for _ in range(2)]
    whole = [[torch.cat(epoch[:3])] for epoch in micro]  # the batches an accum-1 run would see
    model = ToyLoss()
    twin = ToyLoss()
    twin.load_state_dict(model.state_dict())
    start = {k: v.clone() for k, v in model.state_dict().items()}
    accumulated = toy_epochs(model, micro, accum=3)
    direct = toy_epochs(twin, whole, accum=1)
    for epoch, (a, d) in enumerate(zip(accumulated, direct, strict=True)):
        for k in d:
            assert (d[k] - start[k]).abs().max() > 1e-4  # the updates are not negligible
            assert torch.allclose(a[k], d[k], rtol=1e-12, atol=1e-14), f"epoch {epoch + 1}: {k}"


def test_bad_data(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    (data / "cls").mkdir(parents=True)
    assert cli.main(["pretrain", "--data_path", str(data), "--output_dir", str(tmp_path / "o"), *TINY]) == 1
    assert "no readable images" in caplog.text
    (data / "broken.jpg").write_bytes(b"not an image")
    Image.new("L", (80, 70), 128).save(data / "gray.png")
    Image.new("RGBA", (90, 64), (10, 20, 30, 40)).save(data / "cls" / "rgba.png")
    Image.new("CMYK", (64, 100)).save(data / "cls" / "cmyk.jpg")
    Image.new("RGB", (300, 200)).save(data / "cls" / "big.jpg")
    args = ["pretrain", "--data_path", str(data), "--output_dir", str(tmp_path / "o"), *TINY, "--epochs", "1"]
    assert cli.main(args) == 0
    assert caplog.text.count("skipped 1 unreadable image") == 1  # indexed once: one warning per file
    assert cli.main([*args, "--input_size", "70"]) == 1
    assert "multiple of 32" in caplog.text
    assert cli.main([*args, "--arch", "resnet42"]) == 1
    assert "unknown architecture" in caplog.text


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path: Path, caplog, monkeypatch) -> None:
    assert run(tmp_path, "--epochs", "1") == 0
    before = (tmp_path / "checkpoint-last.pth").read_bytes()
    import spark_me.models.spark as spark

    monkeypatch.setattr(spark.SparK, "loss", lambda self, *a: torch.tensor(float("nan"), requires_grad=True))
    assert run(tmp_path, "--epochs", "2") == 1
    assert "loss is nan" in caplog.text
    assert (tmp_path / "checkpoint-last.pth").read_bytes() == before


def test_reconstruct_command(tmp_path: Path) -> None:
    assert run(tmp_path, "--epochs", "1") == 0
    out = tmp_path / "recon.png"
    assert cli.main(["reconstruct", str(tmp_path / "checkpoint-last.pth"), "-o", str(out)]) == 0
    with Image.open(out) as img:
        assert img.size[0] > 4 * 64


def test_mixed_precision_run(tmp_path: Path) -> None:
    """--amp (bf16 on the CPU): the dense decoder runs in bf16, the ME encoder in fp32."""
    assert run(tmp_path, "--epochs", "1", "--amp", "--amp_dtype", "bf16") == 0
    loss = read_log(tmp_path)[0]["train_loss"]
    assert 0.5 < loss < 1.5
    state = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in state["model"].values())


def test_init_weight_starts_from_the_given_encoder(tmp_path: Path, gen, caplog) -> None:
    """--init_weight loads every encoder tensor (timm layout); with an lr of 1e-30 (lr must be > 0;
    updates of ~1e-30) the run keeps them to 1e-20,
    and a full-checkpoint flag given that file instead refuses it by name."""
    dense = timm.create_model("resnet18", num_classes=0)
    with torch.no_grad():
        for p in dense.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    init = converters.save_state(dense.state_dict(), tmp_path / "init.pth")
    caplog.set_level(logging.INFO, logger="spark_me")
    out = tmp_path / "run"
    assert run(out, "--epochs", "1", "--lr", "1e-30", "--init_weight", str(init)) == 0
    assert "encoder initialised from" in caplog.text
    exported = converters.load_state(out / "timm-last.pth")
    for name, value in dense.named_parameters():  # BN running statistics move in training: not those
        assert torch.allclose(exported[name], value.detach(), rtol=0, atol=1e-20), name
    assert run(tmp_path / "other", "--epochs", "1", "--resume", str(init)) == 1
    assert "not a full pretraining checkpoint" in caplog.text and "--init_weight" in caplog.text


def test_fp16_run_uses_and_resumes_the_grad_scaler(tmp_path: Path) -> None:
    """--amp_dtype fp16: the loss is scaled, the scaler is updated every step, saved, and restored
    on resume (its growth tracker keeps counting instead of starting again)."""
    assert run(tmp_path, "--epochs", "1", "--amp", "--amp_dtype", "fp16") == 0
    first = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["scaler"]
    assert first is not None and first["scale"] <= 65536.0
    assert first["_growth_tracker"] > 0 or first["scale"] < 65536.0  # update() ran
    assert run(tmp_path, "--epochs", "2", "--amp", "--amp_dtype", "fp16") == 0
    second = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["scaler"]
    assert second["scale"] <= first["scale"]
    rows = read_log(tmp_path)
    steps_in_epoch_2 = rows[1]["step"] - rows[0]["step"]
    assert steps_in_epoch_2 > 0
    tracked = second["_growth_tracker"] == first["_growth_tracker"] + steps_in_epoch_2
    assert second["scale"] < first["scale"] or tracked
    assert all(math.isfinite(r["train_loss"]) for r in rows)


def test_auto_resume_skips_unreadable_checkpoints_and_keeps_them(tmp_path: Path, caplog) -> None:
    """checkpoint-last.pth and checkpoint-0002.pth damaged, checkpoint-0001.pth good: the run
    resumes from epoch 1's state, says which files it skipped and why, and keeps them renamed
    (the epoch-2 save would otherwise overwrite them)."""
    assert run(tmp_path, "--epochs", "2", "--save_every", "1", "--keep_last", "0") == 0
    last, second = tmp_path / "checkpoint-last.pth", tmp_path / "checkpoint-0002.pth"
    last.write_bytes(last.read_bytes()[:4000])
    second.write_bytes(b"garbage")
    damaged = {p.name: p.read_bytes() for p in (last, second)}
    caplog.set_level(logging.INFO, logger="spark_me")
    assert run(tmp_path, "--epochs", "2") == 0
    assert "skipped checkpoint-last.pth (is not a torch checkpoint" in caplog.text
    assert "kept as checkpoint-last.pth.unreadable; resuming from" in caplog.text
    assert "resumed from " + str(tmp_path / "checkpoint-0001.pth") in caplog.text
    for name, content in damaged.items():
        assert (tmp_path / (name + ".unreadable")).read_bytes() == content
    assert torch.load(last, weights_only=True)["step"] == 6  # epoch 2 again, from epoch 1's state
    assert [r["step"] for r in read_log(tmp_path)] == [3, 6, 6]
