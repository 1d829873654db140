"""The Detectron2 repack: pure-Python wheel from the sha256-pinned sal-detectron2, valid RECORD."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

from spark_me._build import detectron2 as d2build
from spark_me._build.fetch import cache_root, fetch_by_name


def test_repack_drops_the_binary_and_tools_and_keeps_a_valid_record(tmp_path: Path) -> None:
    source = fetch_by_name(
        "sal-detectron2",
        d2build.SOURCE_WHEEL,
        d2build.SOURCE_SHA256,
        cache_root() / "src" / d2build.SOURCE_WHEEL,
    )
    wheel = d2build.repack(source, tmp_path)
    assert wheel.name == f"sal_detectron2-{d2build.VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf, zipfile.ZipFile(source) as src:
        names = set(zf.namelist())
        assert not [n for n in names if n.startswith("tools/") or n.endswith(".so")]
        assert "detectron2/model_zoo/configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml" in names
        # the Python sources are the original bytes
        assert zf.read("detectron2/modeling/backbone/resnet.py") == src.read(
            "detectron2/modeling/backbone/resnet.py"
        )
        dist_info = f"sal_detectron2-{d2build.VERSION}.dist-info"
        metadata = zf.read(f"{dist_info}/METADATA").decode()
        assert f"Version: {d2build.VERSION}" in metadata and "numpy<2" not in metadata
        assert "Requires-Dist: fvcore>=0.1.5,<0.1.6" in metadata
        assert "Tag: py3-none-any" in zf.read(f"{dist_info}/WHEEL").decode()
        rows = [r.split(",") for r in zf.read(f"{dist_info}/RECORD").decode().splitlines()]
        assert {r[0] for r in rows} == names
        for name, digest, size in rows:
            if digest:
                data = zf.read(name)
                expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                assert digest == f"sha256={expected}" and int(size) == len(data), name
    again = tmp_path / "again"
    again.mkdir()
    assert d2build.repack(source, again).read_bytes() == wheel.read_bytes()  # deterministic


def test_installed_detectron2_is_the_repack_and_imports_without_c_extension() -> None:
    assert importlib.metadata.version("sal-detectron2") == d2build.VERSION
    code = (
        "import detectron2.modeling, detectron2.model_zoo, importlib.util as u; "
        "print(u.find_spec('detectron2._C'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
