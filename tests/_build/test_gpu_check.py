"""gpu-check on a machine without a GPU: a clean refusal; its bookkeeping (budget, report) on fakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spark_me import bootstrap
from spark_me._build import gpu_check


def test_refuses_without_a_gpu_before_making_anything(tmp_path: Path) -> None:
    out, venv = tmp_path / "out", tmp_path / "venv"
    env = dict(os.environ, SPARK_ME_VENV=str(venv), CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "spark_me.bootstrap", "gpu-check", "--out", str(out), "--system-torch"]
    result = subprocess.run(cmd, cwd=bootstrap.ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "[spark-me] error: gpu-check needs a CUDA GPU, and none is visible here (torch and nvidia-smi see none)"
    ]
    assert not out.exists() and not venv.exists()


def test_compile_jobs_follow_cores_and_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_check.os, "cpu_count", lambda: 16)
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 128 * 2**30 // 4096}
    monkeypatch.setattr(gpu_check.os, "sysconf", pages.__getitem__)
    assert gpu_check.compile_jobs() == 16  # 128 GiB: the cores decide
    pages["SC_PHYS_PAGES"] = 24 * 2**30 // 4096
    assert gpu_check.compile_jobs() == 6  # 24 GiB / 4 GiB per nvcc job


def test_phases_are_timed_failures_do_not_stop_later_ones_and_the_budget_is_kept(tmp_path: Path) -> None:
    run = gpu_check.Run(tmp_path, budget_s=3600)
    assert run.phase("ok", lambda: True)
    assert not run.phase("broken", lambda: (_ for _ in ()).throw(OSError("disk full")))
    assert run.command("echo", [sys.executable, "-c", "print('hello from a phase')"])
    assert (tmp_path / "echo.log").read_text().strip() == "hello from a phase"
    run.budget_s = 0
    assert not run.phase("late", lambda: pytest.fail("must not run past the budget"))
    assert [(p["name"], p["status"]) for p in run.phases] == [
        ("ok", "passed"), ("broken", "FAILED"), ("late", "not run (budget)")
    ]  # fmt: skip


def test_report_joins_fp32_and_bf16_rows(tmp_path: Path) -> None:
    for label, amp in (("fp32", "none"), ("bf16", "bf16")):
        (tmp_path / f"bench-{label}").mkdir()
        row = {"arch": "resnet50", "variant": "sparse", "size": 224, "batch": 32, "mask_ratio": 0.6,
               "amp": amp, "step_s": 0.1, "images_per_s": 320.0, "encoder_step_s": 0.05, "peak_mem_mib": 900}  # fmt: skip
        (tmp_path / f"bench-{label}" / "results.json").write_text(json.dumps({"results": [row]}))
    run = gpu_check.Run(tmp_path, budget_s=60)
    run.phase("tests", lambda: True)
    assert gpu_check.report(tmp_path, run, {"gpu": "NVIDIA H100", "torch": "2.11.0+cu130"})
    lines = (tmp_path / "results.csv").read_text().splitlines()
    assert len(lines) == 3 and {line.split(",")[5] for line in lines[1:]} == {"none", "bf16"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["phases"][0]["name"] == "tests" and summary["environment"]["gpu"] == "NVIDIA H100"
    assert "| tests | passed |" in (tmp_path / "summary.md").read_text()


def test_a_check_split_over_calls_ends_with_one_summary(tmp_path: Path) -> None:
    first = gpu_check.Run(tmp_path, budget_s=60)
    first.phase("setup", lambda: True)
    gpu_check.report(tmp_path, first, {"gpu": "NVIDIA H100"})
    second = gpu_check.Run(tmp_path, budget_s=60)
    second.phase("tests", lambda: False)
    second.phase("report", lambda: True)
    gpu_check.report(tmp_path, second, {"gpu": "NVIDIA H100"})
    third = gpu_check.Run(tmp_path, budget_s=60)
    third.phase("tests", lambda: True)  # re-run: replaces the failed entry
    gpu_check.report(tmp_path, third, {"gpu": "NVIDIA H100"})
    phases = json.loads((tmp_path / "summary.json").read_text())["phases"]
    assert [(p["name"], p["status"]) for p in phases] == [("setup", "passed"), ("tests", "passed")]
    assert "| setup | passed |" in (tmp_path / "summary.md").read_text()


def test_phase_names_are_checked() -> None:
    assert gpu_check.chosen_phases("tests, bench-bf16") == ["tests", "bench-bf16"]
    for bad in ("tests,bench", ""):
        with pytest.raises(SystemExit, match="choose from setup, tests, bench-fp32, bench-bf16"):
            gpu_check.chosen_phases(bad)
