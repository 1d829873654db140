"""Build, cache and load spark-me's own C++ kernels (a plain C ABI called through ctypes).

Why not `torch.utils.cpp_extension`: compiling torch's headers takes a minute or more per build,
and torch.compile's generated kernels for a gather-multiply-reduce ran 10-40x slower than the
hand-written loops here (benchmarks/README.md, "Fused depthwise"). A header-free source builds in
about two seconds with the C++ compiler that MinkowskiEngine's build already needs.

The library is built with -march=native, so its cache key (like the ME wheel's, under the same
cache root) names the source, the compiler, the flags and the CPU model and flags; a build goes to
a temporary name and is renamed into place, so concurrent first uses never see half a library.
Without a compiler (or with SPARK_ME_NATIVE=0) `load` returns None and callers use their plain
torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

from spark_me._build.fetch import cache_root

log = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
_SOURCES = Path(__file__).parent


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _cpu_identity() -> str:
    """Model name and flag set of this CPU (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def build_key(source: Path, compiler: str) -> str:
    """Hash of everything the built library depends on."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    digest = hashlib.sha256()
    for part in (source.read_bytes(), version.encode(), " ".join(FLAGS).encode(), _cpu_identity().encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:20]


def build(name: str) -> Path:
    """The cached shared library of `<name>.cpp` (next to this file), compiling it if absent.

    Raises RuntimeError with the compiler's message when there is no compiler or it fails.
    """
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler (set CXX or install g++)")
    source = _SOURCES / f"{name}.cpp"
    final = cache_root() / "kernels" / build_key(source, compiler) / f"lib{name}.so"
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    cmd = [compiler, *FLAGS, str(source), "-o", str(tmp)]
    log.info("building %s: %s", final.name, " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building {source.name} failed: {done.stderr.strip()[-2000:]}")
    tmp.replace(final)
    return final


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The loaded library `<name>`, built on first use; None (logged once) where it cannot be built.

    Memoised per process: a library is immutable once loaded.
    """
    if os.environ.get("SPARK_ME_NATIVE", "1") == "0":
        return None
    try:
        return ctypes.CDLL(str(build(name)))
    except (RuntimeError, OSError) as err:
        log.warning("native kernels %s unavailable, using plain torch: %s", name, err)
        return None
