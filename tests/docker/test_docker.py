"""docker/: the Dockerfile lints clean and builds with the same set-up code the tests exercise; the
entrypoint dispatches to spark-me / torchrun as documented. (No Docker engine runs here.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spark_me._build import minkowski

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")  # dev extra
    out = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_uses_the_projects_build_steps() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    # the offline mechanism of clusters without internet: a bundle layer, then a network-less install
    bundle = "/opt/venv/bin/python -m spark_me.bootstrap bundle /opt/bundle --torch system --extras build"
    assert bundle in text
    setup = "RUN --network=none "
    assert (
        setup in text and "-m spark_me.bootstrap setup --offline /opt/bundle --system-torch --no-venv" in text
    )
    assert (
        text.index(bundle) < text.index("COPY spark_me ./spark_me") < text.index(setup)
    )  # code: not in the bundle layer
    assert "SPARK_ME_CUDA=1" in text  # forces the CUDA build of ME without a GPU at build time
    assert f'TORCH_CUDA_ARCH_LIST="{minkowski.DEFAULT_ARCH_LIST}"' in text
    for source in re.findall(r"^COPY (?!--from)(\S+(?: \S+)*) \S+$", text, flags=re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"COPY source {path} is not in the repository"
    assert re.search(r"^USER 1000:1000$", text, flags=re.M)  # not root
    assert "torch==2.14.1" in text and "torchvision==0.29.1" in text  # the pyproject pins


def test_compose_runs_on_all_gpus_with_volumes() -> None:
    service = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["pretrain"]
    assert service["build"]["dockerfile"] == "docker/Dockerfile" and service["shm_size"]
    assert {re.search(r":(/\w+)(?::ro)?$", v)[1] for v in service["volumes"]} == {"/data", "/output"}
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["count"] == "all"


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """spark-me, torchrun and python3 stand-ins that print how they were called."""
    for name, body in {
        "spark-me": 'echo "spark-me $*"',
        "torchrun": 'echo "torchrun $*"',
        "python3": 'echo "${FAKE_GPUS:-0}"',
    }.items():
        script = tmp_path / name
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
    return tmp_path


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ([], {}, "spark-me pretrain"),
        (["--data_path", "/data"], {"FAKE_GPUS": "1"}, "spark-me pretrain --data_path /data"),
        (["pretrain", "--epochs", "2"], {}, "spark-me pretrain --epochs 2"),
        (["export", "ckpt.pth", "--to", "timm"], {}, "spark-me export ckpt.pth --to timm"),
        (["finetune-det", "--smoke"], {"FAKE_GPUS": "8"}, "spark-me finetune-det --smoke"),
        (
            ["--arch", "resnet50"],
            {"FAKE_GPUS": "8"},
            "torchrun --nproc_per_node 8 --nnodes 1 --node_rank 0 --master_addr 127.0.0.1 "
            "--master_port 29500 -m spark_me.cli pretrain --arch resnet50",
        ),
        (
            ["--arch", "resnet50"],
            {"FAKE_GPUS": "8", "NPROC_PER_NODE": "1"},
            "spark-me pretrain --arch resnet50",
        ),
    ],
)
def test_entrypoint_dispatch(fake_bin: Path, args, env, expected) -> None:
    full_env = {"PATH": f"{fake_bin}:/usr/bin:/bin", **env}
    out = subprocess.run(
        ["sh", str(DOCKER / "entrypoint.sh"), *args], capture_output=True, text=True, env=full_env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected
