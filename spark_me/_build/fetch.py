"""What the set-up steps share (standard library only): the cache location, hash-checked downloads
by name from the package index, and how a step reports failure on the command line.

Used by the MinkowskiEngine build and the Detectron2 repack: both fetch one pinned file from the
index's simple API, check its sha256 and keep it in a cache outside the repository.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import urllib.request
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("spark_me.build")

DEFAULT_INDEX = "https://pypi.org/simple"


class BuildError(RuntimeError):
    """A set-up step cannot proceed; the message says what to do."""


def cache_root() -> Path:
    """Outside the repo so that fresh clones and `git clean` keep multi-minute builds."""
    if os.environ.get("SPARK_ME_CACHE"):
        return Path(os.environ["SPARK_ME_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "spark-me"


def index_url() -> str:
    return (os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX).rstrip("/")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_by_name(project: str, filename: str, expected_sha256: str, dest: Path) -> Path:
    """Download `filename` of `project` from the simple index to `dest` unless a verified copy is there."""
    if dest.exists() and sha256(dest) == expected_sha256:
        return dest
    page_url = f"{index_url()}/{project}/"
    log.info("fetching %s from %s", filename, page_url)
    with urllib.request.urlopen(page_url, timeout=60) as resp:
        page = resp.read().decode()
    match = re.search(r'href="([^"]*/' + re.escape(filename) + r')(?:#[^"]*)?"', page)
    if not match:
        raise BuildError(f"{filename} is not listed at {page_url}")
    url = urllib.request.urljoin(page_url, match.group(1).replace("&amp;", "&"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    with urllib.request.urlopen(url, timeout=300) as resp, open(tmp, "wb") as fh:
        shutil.copyfileobj(resp, fh)
    if sha256(tmp) != expected_sha256:
        tmp.unlink()
        raise BuildError(f"sha256 of downloaded {filename} does not match the pinned {expected_sha256}")
    tmp.replace(dest)
    return dest


def run_step(step: Callable[[], object]) -> int:
    """A set-up step as a command: progress lines on stderr; a BuildError is one message and exit 1."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        step()
    except BuildError as err:
        log.error("error: %s", err)
        return 1
    return 0
