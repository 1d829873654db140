"""ImageFiles: what it reads, and the in-memory copy of decoded images for small sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spark_me.data.images import ImageFiles


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def test_keep_decoded_serves_the_same_images_without_reading_the_files_again(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    plain, kept = ImageFiles(tmp_path), ImageFiles(tmp_path, keep_decoded=True)
    first = [pixels(kept[i]) for i in range(3)]
    for path in tmp_path.glob("*.png"):  # from now on only the in-memory copies can answer
        path.write_bytes(b"gone")
    assert all(np.array_equal(first[i], pixels(kept[i])) for i in range(3))
    assert [a.shape for a in first] == [(40, 50, 3), (41, 50, 3), (42, 50, 3)]
    # without keep_decoded the damaged files are skipped in favour of the next good one, then refused
    with pytest.raises(RuntimeError, match="can be decoded"):
        plain[0]
