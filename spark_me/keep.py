"""Nothing a user may need is overwritten: files that cannot be used are renamed, never deleted."""

from __future__ import annotations

from pathlib import Path


def set_aside(path: Path, suffix: str) -> Path:
    """Rename `path` to `<name>.<suffix>` (`.<suffix>-2`, ... if taken); returns the new path."""
    target = path.with_name(f"{path.name}.{suffix}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.{suffix}-{n}")
    path.rename(target)
    return target
