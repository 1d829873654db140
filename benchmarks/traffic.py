"""Layout traffic of a profiled region: calls and bytes of the ops that move data rather than compute.

Why counts and bytes, not times: on a shared machine times swing with the load, while the number
of `copy_` / `add_` / `fill_` calls and the bytes they touch depend only on the code, the shapes
and the dtypes, so a before/after comparison of them is exact and repeatable.

Bytes of a call = the sum of the sizes of its tensor arguments as the profiler recorded them
(`record_shapes=True`): `copy_(dst, src)` counts dst and src, `add_(a, b)` a and b, `fill_(a)` a,
`cat` its inputs (the profiler records a tensor list's shapes but not its dtype: they count at
`list_itemsize` bytes, the run's float dtype); an expanded (broadcast) argument counts at its
expanded size. Composite ops are
also listed on their own row: `aten::to` and `contiguous` call `copy_` (their bytes appear in both
rows) and are counted only when they copy (a `to` or `contiguous` that returns its input moves
nothing); `zeros` calls `zero_` which calls `fill_`.

Each call is traced to where it comes from: the autograd node that ran it (backward) and the
innermost Python function of this repository above it (`with_stack=True`), as `file(def line):
function` (the profiler's Python events name the function, not the line of the call).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from torch.profiler import ProfilerActivity, profile

TRAFFIC = (
    "aten::copy_",
    "aten::add_",
    "aten::fill_",
    "aten::zero_",
    "aten::index_add_",
    "aten::index_copy",
    "aten::index_copy_",
    "aten::cat",
    "aten::contiguous",
    "aten::clone",
    "aten::to",
)
_BYTES = {
    "double": 8,
    "float": 4,
    "c10::BFloat16": 2,
    "c10::Half": 2,
    "long int": 8,
    "int": 4,
    "short int": 2,
    "bool": 1,
    "unsigned char": 1,
    "signed char": 1,
}
_SOURCES = ("spark_me/", "benchmarks/")
_COPIES_IF = {"aten::to": "aten::_to_copy", "aten::contiguous": "aten::clone"}  # composite: copies iff


@dataclass
class OpTraffic:
    """Calls and bytes of one aten op, overall and per source."""

    calls: int = 0
    nbytes: int = 0
    sources: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def call_bytes(shapes: list, dtypes: list[str], list_itemsize: int = 4) -> int:
    """Sum of the sizes of a call's tensor arguments (a TensorList's shapes come as a list of lists,
    its dtype as 'TensorList': its elements count at `list_itemsize` bytes)."""
    total = 0
    for shape, dtype in zip(shapes, dtypes, strict=False):
        size = list_itemsize if dtype == "TensorList" else _BYTES.get(dtype)
        if size is None or not shape:
            continue
        if isinstance(shape[0], list):  # TensorList
            total += sum(_numel(s) * size for s in shape)
        else:
            total += _numel(shape) * size
    return total


def _source(event) -> str:
    """'<autograd node> | <file(line): function>' of the nearest ancestors that say where it came from."""
    node = frame = None
    parent = event.cpu_parent
    while parent is not None and (node is None or frame is None):
        name = parent.name
        if node is None and name.startswith("autograd::engine::evaluate_function: "):
            node = name.removeprefix("autograd::engine::evaluate_function: ")
        if frame is None and any(s in name for s in _SOURCES) and "(" in name:
            frame = name[max(name.find(s) for s in _SOURCES if s in name) :]
        parent = parent.cpu_parent
    return f"{node or 'forward'} | {frame or '?'}"


def measure(
    fn: Callable[[], object], ops: tuple[str, ...] = TRAFFIC, list_itemsize: int = 4
) -> dict[str, OpTraffic]:
    """Run `fn` once under the profiler; calls, bytes and sources of every op in `ops`, plus the call
    count of every other aten op (bytes 0). Tensor lists (`cat`'s inputs) count at `list_itemsize`
    bytes per element."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_stack=True) as prof:
        fn()
    table: dict[str, OpTraffic] = defaultdict(OpTraffic)
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        if event.name in _COPIES_IF and all(c.name != _COPIES_IF[event.name] for c in event.cpu_children):
            continue  # returned its input: no copy
        row = table[event.name]
        row.calls += 1
        if event.name in ops:
            shapes = getattr(event, "structured_input_shapes", None) or event.input_shapes
            nbytes = call_bytes(shapes, event.input_dtypes, list_itemsize)
            row.nbytes += nbytes
            src = row.sources[_source(event)]
            src[0] += 1
            src[1] += nbytes
    return dict(table)


def markdown(tables: dict[str, dict[str, OpTraffic]], ops: tuple[str, ...] = TRAFFIC) -> list[str]:
    """One row per op: calls and MB under each labelled run (e.g. 'fp32', 'bf16')."""
    labels = list(tables)
    head = "| op | " + " | ".join(f"{lab} calls | {lab} MB" for lab in labels) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(labels)]
    for op in ops:
        cells = []
        for lab in labels:
            row = tables[lab].get(op, OpTraffic())
            cells += [str(row.calls), f"{row.nbytes / 2**20:.1f}"]
        lines.append(f"| `{op}` | " + " | ".join(cells) + " |")
    return lines


def sources(table: dict[str, OpTraffic], ops: tuple[str, ...] = TRAFFIC, top: int = 12) -> list[str]:
    """The largest sources (by bytes) of each op: 'calls  MB  node | function'."""
    lines = []
    for op in ops:
        row = table.get(op)
        if row is None or not row.calls:
            continue
        lines.append(f"{op}: {row.calls} calls, {row.nbytes / 2**20:.1f} MB")
        ranked = sorted(row.sources.items(), key=lambda kv: -kv[1][1])
        for where, (calls, nbytes) in ranked[:top]:
            lines.append(f"  {calls:5d} {nbytes / 2**20:9.1f} MB  {where}")
    return lines
