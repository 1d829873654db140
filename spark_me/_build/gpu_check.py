"""One command that validates the GPU path on a GPU node and leaves its evidence in one folder.

    python3 -m spark_me.bootstrap gpu-check --out DIR [--offline BUNDLE] [--system-torch] [--no-venv]

The GPU nodes this project can use have no internet, bring their own torch and give a command about
25 minutes, so the phases are ordered by what they prove and each is timed:

1. setup     ME built with CUDA for the visible GPU's architecture only (MAX_JOBS from the cores and
             memory), installed through the same set-up code as everywhere else (offline from a
             bundle when --offline is given); then torch and ME must both see CUDA.
2. tests     `pytest -m cuda`: sparse ops and every dataflow on CUDA, the encoders against the
             masked-dense reference on CUDA, bf16 SparK steps, a checkpoint round trip.
3. bench     `spark-me bench --device cuda` for resnet50 and convnext_tiny at mask 0 / 0.6 / 0.9,
             in fp32 and in bf16 (each its own results JSON/CSV and plots).
4. report    summary.json / summary.md (environment, phases, times) and results.csv of all rows.

`--phases setup` then `--phases tests,bench-fp32,bench-bf16` splits the check over two commands (for
runners that allow only minutes a command); the summary in DIR keeps the phases of earlier calls.
A phase that fails does not stop the later ones (a test failure still leaves benchmark figures);
a phase that would start after the time budget is recorded as not run. Exit 0 only when all passed.
Refuses at once, before installing anything, when no GPU is visible. Standard library only.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from spark_me._build.fetch import BuildError

log = logging.getLogger("spark_me.gpu_check")

BENCH_ARCHS = ("resnet50", "convnext_tiny")
BENCH_RATIOS = ("0", "0.6", "0.9")
BENCH_AMPS = {"fp32": "none", "bf16": "bf16"}
TEST_PATHS = ("tests/cuda", "tests/models", "tests/sparse")
GIB_PER_COMPILE_JOB = 4  # nvcc on ME's larger .cu files
PHASES = ("setup", "tests", *(f"bench-{label}" for label in BENCH_AMPS))


def visible_gpu(python: str) -> dict | None:
    """{'name', 'capability', 'count'} of the first GPU `python`'s torch sees; else what nvidia-smi
    lists (torch may not be installed yet); None when neither finds one."""
    code = (
        "import json, torch\n"
        "if torch.cuda.is_available():\n"
        "    print(json.dumps({'name': torch.cuda.get_device_name(0), 'count': torch.cuda.device_count(),"
        " 'capability': '%d.%d' % torch.cuda.get_device_capability(0)}))\n"
        "else:\n    print('null')"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if out.returncode == 0:
        return json.loads(out.stdout.strip().splitlines()[-1])
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    query = [smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"]
    listed = subprocess.run(query, capture_output=True, text=True)
    rows = [r.split(", ") for r in listed.stdout.strip().splitlines()] if listed.returncode == 0 else []
    if not rows:
        return None
    return {"name": rows[0][0], "capability": rows[0][-1], "count": len(rows)}


def compile_jobs() -> int:
    """As many nvcc jobs as cores, but not more than the memory holds."""
    cores = os.cpu_count() or 1
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return max(1, min(cores, int(memory_gib // GIB_PER_COMPILE_JOB)))


class Run:
    """The phases' bookkeeping: times, statuses, logs, and the budget."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out, self.budget_s = out, budget_s
        self.started = time.monotonic()
        self.phases: list[dict] = []

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def phase(self, name: str, step) -> bool:
        """Run `step()` (True: passed) unless the budget is spent; log and record its time."""
        if self.left() <= 0:
            log.warning("phase %s: not run (the %.0f min budget is spent)", name, self.budget_s / 60)
            self.phases.append({"name": name, "status": "not run (budget)", "seconds": 0})
            return False
        log.info("phase %s: started (%.0f s left of the budget)", name, self.left())
        began = time.monotonic()
        try:
            ok = bool(step())
        except (BuildError, subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as err:
            log.error("phase %s: %s", name, str(err).splitlines()[0] if str(err) else type(err).__name__)
            ok = False
        seconds = time.monotonic() - began
        status = "passed" if ok else "FAILED"
        log.info("phase %s: %s in %.0f s (%.1f min since start)", name, status, seconds, self.elapsed() / 60)
        self.phases.append({"name": name, "status": status, "seconds": round(seconds, 1)})
        return ok

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def command(self, name: str, cmd: list[str], env: dict | None = None) -> bool:
        """A subprocess with its output in DIR/<name>.log; killed when the budget runs out."""
        logfile = self.out / f"{name}.log"
        log.info("  %s  (log: %s)", " ".join(cmd), logfile)
        from spark_me.bootstrap import ROOT

        with open(logfile, "w") as fh:
            result = subprocess.run(
                cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=max(self.left(), 1)
            )
        tail = logfile.read_text(errors="replace").strip().splitlines()[-1:]
        log.info("  exit %d: %s", result.returncode, tail[0] if tail else "")
        return result.returncode == 0


def setup_phase(install, gpu: dict, out: Path) -> str:
    """Build/install ME with CUDA for this GPU; the venv's interpreter must then see CUDA twice."""
    from spark_me import bootstrap

    os.environ["SPARK_ME_CUDA"] = "1"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", gpu["capability"])
    os.environ.setdefault("MAX_JOBS", str(compile_jobs()))
    log.info("  ME for sm %s with MAX_JOBS=%s", os.environ["TORCH_CUDA_ARCH_LIST"], os.environ["MAX_JOBS"])
    bootstrap.setup(with_detectron2=False, install=install)
    python = str(bootstrap.venv_python(install))
    code = "import torch, MinkowskiEngine as ME; assert torch.cuda.is_available() and ME.is_cuda_available()"
    check = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if check.returncode != 0:
        raise BuildError(f"after set-up, torch or ME does not see CUDA: {check.stderr.strip()[-300:]}")
    from spark_me._build import minkowski
    from spark_me._build.fetch import cache_root

    build_log = cache_root() / "logs" / f"{minkowski.installed_key(python)}.log"
    if build_log.exists():  # absent when the wheel came from the cache
        shutil.copy2(build_log, out / "minkowski-build.log")
    return python


def environment(python: str) -> dict:
    code = (
        "import json, platform, torch, MinkowskiEngine as ME\n"
        "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__,"
        " 'cuda': torch.version.cuda, 'cudnn': torch.backends.cudnn.version(),"
        " 'minkowskiengine': ME.__version__, 'gpu': torch.cuda.get_device_name(0),"
        " 'gpus': torch.cuda.device_count()}))"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True)
    env = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {}
    from spark_me._build import minkowski

    stamp = subprocess.run([python, "-c", f"import sys, pathlib; print(pathlib.Path(sys.prefix, {minkowski.BUILD_STAMP!r}).read_text())"], capture_output=True, text=True)  # fmt: skip
    return env | {"me_wheel_key": stamp.stdout.strip(), "cores": os.cpu_count(), "machine": platform.machine()}


def report(out: Path, run: Run, env: dict) -> bool:
    """summary.json / summary.md and one results.csv of every benchmark row (fp32 and bf16)."""
    rows = []
    for label in BENCH_AMPS:
        results = out / f"bench-{label}" / "results.json"
        if results.exists():
            rows += json.loads(results.read_text())["results"]
    fields = ["arch", "variant", "size", "batch", "mask_ratio", "amp", "step_s", "images_per_s",
              "encoder_step_s", "peak_mem_mib", "error"]  # fmt: skip
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    phases = earlier_phases(out, {p["name"] for p in run.phases}) + run.phases
    summary = {"environment": env, "phases": phases, "total_seconds": round(run.elapsed(), 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = ["# gpu-check", "", f"GPU: {env.get('gpu')}, torch {env.get('torch')}, CUDA {env.get('cuda')}", ""]
    lines += ["| phase | status | seconds |", "|---|---|---|"]
    lines += [f"| {p['name']} | {p['status']} | {p['seconds']:.0f} |" for p in phases]
    lines += ["", f"total: {run.elapsed():.0f} s; benchmark rows: {len(rows)} (results.csv, bench-*/)"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return bool(rows)


def earlier_phases(out: Path, rerun: set[str]) -> list[dict]:
    """Phases that an earlier gpu-check call (--phases) recorded in out/summary.json and this one
    did not run again, so that a check split over several commands ends with one summary."""
    previous = out / "summary.json"
    if not previous.exists():
        return []
    try:
        phases = json.loads(previous.read_text()).get("phases", [])
    except (OSError, ValueError):
        return []
    return [p for p in phases if p.get("name") not in rerun | {"report"}]


def chosen_phases(text: str) -> list[str]:
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(PHASES))
    if unknown or not chosen:
        raise SystemExit(f"--phases {text!r}: choose from {', '.join(PHASES)} (comma-separated)")
    return chosen


def main(argv: list[str] | None = None) -> int:
    from spark_me import bootstrap

    parser = argparse.ArgumentParser(
        prog="python3 -m spark_me.bootstrap gpu-check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for logs, results and plots")
    parser.add_argument("--budget-min", type=float, default=25, help="wall-clock budget (default 25)")
    parser.add_argument("--batch-size", type=int, default=32, help="benchmark batch (default 32)")
    parser.add_argument("--steps", type=int, default=5, help="timed benchmark steps per row (default 5)")
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help="run only these phases (comma-separated; default all): split the check over several "
        "commands when one command may run only minutes; the summary keeps earlier calls' phases",
    )
    # the install options are taken out by bootstrap.parse_install_options before parse_args; they
    # are declared here too so that the usage line and --help list them
    install_opts = parser.add_argument_group("install options (as for every bootstrap command)")
    install_opts.add_argument("--offline", metavar="DIR", help="install from this bundle only")
    install_opts.add_argument("--system-torch", action="store_true", help="use this interpreter's torch")
    install_opts.add_argument("--no-venv", action="store_true", help="install into this interpreter")
    logging.basicConfig(level=logging.INFO, format="[spark-me] %(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        install, rest = bootstrap.parse_install_options(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as err:
        log.error("%s", err)
        return 2
    args = parser.parse_args(rest)
    try:
        phases = chosen_phases(args.phases)
    except SystemExit as err:
        log.error("error: %s", err)
        return 2
    probe_python = sys.executable if install.system_torch or install.no_venv else str(bootstrap.venv_python())
    gpu = visible_gpu(probe_python if Path(probe_python).exists() else sys.executable)
    if gpu is None:
        log.error("error: gpu-check needs a CUDA GPU, and none is visible here (torch and nvidia-smi see none)")
        return 2
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "gpu-check.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logging.getLogger("spark_me").addHandler(handler)
    log.info("GPU: %s (sm %s, %d visible); output: %s", gpu["name"], gpu["capability"], gpu["count"], out)
    run = Run(out, args.budget_min * 60)
    state: dict = {}
    if "setup" in phases:
        run.phase("setup", lambda: state.update(python=setup_phase(install, gpu, out)) or True)
    elif bootstrap.venv_python(install).exists():  # set up by an earlier call
        state["python"] = str(bootstrap.venv_python(install))
    else:
        log.error("error: no environment at %s: run gpu-check --phases setup first", bootstrap.venv_python(install))
        return 2
    python = state.get("python")
    if python and "tests" in phases:
        run.phase("tests", lambda: run.command("tests", [python, "-m", "pytest", "-m", "cuda", "-q",
                  "-p", "no:cacheprovider", f"--junitxml={out / 'tests-junit.xml'}", *TEST_PATHS]))  # fmt: skip
    for label, amp in BENCH_AMPS.items():
        if python and f"bench-{label}" in phases:
            cmd = [python, "-m", "spark_me.cli", "bench", "--device", "cuda", "--archs", *BENCH_ARCHS,
                   "--ratios", *BENCH_RATIOS, "--amp", amp, "--batch_size", str(args.batch_size),
                   "--steps", str(args.steps), "--out", str(out / f"bench-{label}")]  # fmt: skip
            run.phase(f"bench-{label}", lambda cmd=cmd, label=label: run.command(f"bench-{label}", cmd))
    env = environment(python) if python else {"gpu": gpu["name"]}
    run.phase("report", lambda: report(out, run, env))
    report(out, run, env)  # again, so that the report phase itself is in the summary
    ok = all(p["status"] == "passed" for p in run.phases)
    log.info("gpu-check %s in %.1f min: %s", "passed" if ok else "FAILED", run.elapsed() / 60, out / "summary.md")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
