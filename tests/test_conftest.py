"""tests/conftest.py's `deal`: how the suite's tests are ordered for pytest-xdist's worksteal."""

from __future__ import annotations

import pytest

from .conftest import deal


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_each_worker_starts_with_its_share_of_the_heavy_tests(workers: int) -> None:
    items = [f"h{i}" if i % 3 == 0 else f"l{i}" for i in range(31)]  # 11 heavy, 20 light
    ordered = deal(items, lambda item: item.startswith("h"), workers)
    assert sorted(ordered) == sorted(items)
    # worksteal hands worker i the i-th contiguous part: len // W items to the first, and so on
    parts, rest = [], list(ordered)
    for i in range(workers):
        size = len(rest) // (workers - i)
        parts.append(rest[:size])
        rest = rest[size:]
    heavy_counts = [sum(item.startswith("h") for item in part) for part in parts]
    assert max(heavy_counts) - min(heavy_counts) <= 1 and sum(heavy_counts) == 11
    for part in parts:  # heavy first within a part
        kinds = [item[0] for item in part]
        assert kinds == sorted(kinds)  # "h" < "l"
    light = [item for item in ordered if item.startswith("l")]
    assert light == [item for item in items if item.startswith("l")]  # light order kept
