"""benchmarks.traffic counts calls and bytes exactly, and only the `to` / `contiguous` that copy."""

from __future__ import annotations

import torch

from benchmarks import traffic


def test_calls_and_bytes_of_copies() -> None:
    x = torch.randn(8, 16)  # 512 B of float32

    def fn() -> None:
        x.contiguous()  # returns x: not a copy, not counted
        x.to(torch.float32)  # likewise
        x.t().contiguous()  # copies: 512 B read + 512 B written
        x.to(torch.bfloat16)  # copies: 512 B read + 256 B written
        torch.zeros(4, 4).add_(torch.ones(4, 4))  # 64 + 64 B
        torch.cat([x, x[:2]])  # a tensor list: 128 + 32 elements at list_itemsize (4) B

    table = traffic.measure(fn)
    assert (table["aten::contiguous"].calls, table["aten::contiguous"].nbytes) == (1, 512)
    assert (table["aten::to"].calls, table["aten::to"].nbytes) == (1, 512)
    assert (table["aten::copy_"].calls, table["aten::copy_"].nbytes) == (2, 1024 + 768)
    assert (table["aten::add_"].calls, table["aten::add_"].nbytes) == (1, 128)
    assert (table["aten::cat"].calls, table["aten::cat"].nbytes) == (1, (128 + 32) * 4)
    assert sum(calls for calls, _ in table["aten::copy_"].sources.values()) == 2
    assert all("test_traffic.py" in where for where in table["aten::copy_"].sources)


def test_tensor_lists_count_every_tensor() -> None:
    assert traffic.call_bytes([[[2, 3], [4]], []], ["TensorList", "Scalar"], list_itemsize=2) == (6 + 4) * 2


def test_profile_traffic_report(tmp_path) -> None:
    """`python -m benchmarks.profile --traffic` (the README's re-measuring command) at 64 px:
    a report with the float32 and bf16 tables and the dataflows."""
    from benchmarks import profile

    args = ["--traffic", "--arch", "resnet18", "--size", "64", "--batch_size", "1", "--out", str(tmp_path)]
    assert profile.main(args) == 0
    report = (tmp_path / "traffic-resnet18.md").read_text()
    assert "## fp32: sources" in report and "## bf16: sources" in report and "aten::copy_" in report
    assert "dataflows (op: dataflow)" in report
