"""Which dataflow each sparse op uses: measured on the device at first use, or by rule, or forced.

No dataflow wins everywhere (block gather wins on the large blocks of strides 4-8, the densified
dense kernel on the small stride-16/32 maps, and the crossover moves with channels, batch, dtype
and device), so, as TorchSparse++'s autotuner does, the choice is measured: the first time an op
signature meets a shape bucket / dtype / device, every candidate runs forward + backward on the
real input (detached, so no parameter sees a gradient) and the fastest is cached. The cache can be
saved to and loaded from JSON, so a long run tunes once. `mode="rules"` uses the rule table without
measuring; any dataflow name forces it everywhere (tests, debugging).

One tuner is shared by the layers of one encoder (`SparseEncoder.set_dataflow`); it is an explicit
object, never module state.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable
from pathlib import Path

import MinkowskiEngine as ME
import torch

from spark_me import keep
from spark_me.sparse import dataflows
from spark_me.sparse.dataflows import SparseOp
from spark_me.sparse.geometry import BlockLayout, layout_of
from spark_me.sparse.me_dataflow import supports as me_supports

log = logging.getLogger(__name__)

MODES = ("auto", "rules", *dataflows.DATAFLOWS)
# `dataflows.run`'s signature: (name, op, x, weight, bias) -> (features, output key)
Runner = Callable[..., tuple[torch.Tensor, ME.CoordinateMapKey]]
# a cache key's op, as `SparseOp.__repr__` writes it: "conv3x3/2 64->128 g2 b8 n~512 float32 cpu"
_KEY_OP = re.compile(r"([a-z]+)(\d+)x\d+/(\d+) (\d+)->(\d+)(?: g(\d+))?( excl-pad)? b\d+ ")


def rule(op: SparseOp, layout: BlockLayout) -> str:
    """The rule table: block gather unless the halo would cost more than densifying the map.

    Block gather costs (b+2h)^2 / b^2 of the ideal work, the densified kernel 1 / density; at
    SparK's usual density 0.4 (1/0.4 = 2.5) the gather wins while (b+2h)^2 / b^2 < 2.5.
    """
    names = dataflows.candidates(op)
    if len(names) == 1:
        return names[0]
    if op.halo == 0 or op.kind == "maxpool":
        return "block"
    b, h = layout.block, op.halo
    return "block" if (b + 2 * h) ** 2 <= 2.5 * b * b else "dense"


def rule_for(op: SparseOp, x: ME.SparseTensor) -> str:
    """The rule table's answer for `op` on `x` (``me`` for tensors without a block layout)."""
    layout = layout_of(x)
    return rule(op, layout) if layout is not None else "me"


class DataflowTuner:
    """Chooses and remembers the dataflow of every (op, shape bucket, dtype, device)."""

    def __init__(
        self,
        mode: str = "auto",
        cache_file: str | Path | None = None,
        repeats: int = 2,
        runner: Runner = dataflows.run,
    ):
        """`runner` runs a dataflow by name when measuring (`dataflows.run`; tests pass a wrapper to
        see which dataflows are measured and to make one measurably slower)."""
        if mode not in MODES:
            raise ValueError(f"unknown dataflow mode {mode!r}; choose one of {', '.join(MODES)}")
        self.mode, self.repeats, self.runner = mode, repeats, runner
        self.cache_file = Path(cache_file) if cache_file else None
        self.choices: dict[str, str] = {}
        self.timings: dict[str, dict[str, float]] = {}
        if self.cache_file is not None and self.cache_file.is_file():
            self._load_or_set_aside(self.cache_file)

    # -- the choice -----------------------------------------------------------------------------
    @staticmethod
    def key(op: SparseOp, layout: BlockLayout, dtype: torch.dtype, device: torch.device) -> str:
        bucket = 2 ** round(math.log2(max(layout.num_sites, 1)))
        dt = str(dtype).removeprefix("torch.")
        return f"{op!r} b{layout.block} n~{bucket} {dt} {device.type}"

    def choose(self, op: SparseOp, x: ME.SparseTensor, weight, bias) -> str:
        """The dataflow for `op` on `x` (``me`` for tensors without a block layout)."""
        layout = layout_of(x)
        if layout is None:
            return "me"
        if self.mode not in ("auto", "rules"):  # forced, where it applies (gemm: convs only)
            forced_ok = self.mode in dataflows.candidates(op) or (self.mode == "me" and me_supports(op))
            return self.mode if forced_ok else rule(op, layout)
        key = self.key(op, layout, dataflows.compute_dtype(x.F, op), x.device)
        if key not in self.choices:
            names = dataflows.candidates(op)
            if self.mode == "rules" or len(names) == 1:
                self.choices[key] = rule(op, layout)
            else:
                self.timings[key] = {n: self._measure(n, op, x, weight, bias) for n in names}
                self.choices[key] = min(self.timings[key], key=self.timings[key].get)
                log.debug("dataflow %s: %s %s", key, self.choices[key], self.timings[key])
                if self.cache_file is not None:
                    self.save(self.cache_file)
        return self.choices[key]

    def _measure(self, name: str, op: SparseOp, x: ME.SparseTensor, weight, bias) -> float:
        """Best of `repeats` forward+backward seconds (after one warm-up) of dataflow `name`."""
        feats = x.F.detach().requires_grad_(True)
        probe = ME.SparseTensor(feats, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x._manager)
        params = [p.detach().requires_grad_(True) if p is not None else None for p in (weight, bias)]
        best = math.inf
        with torch.enable_grad():
            for i in range(self.repeats + 1):
                _sync(x.device)
                start = time.perf_counter()
                out, _ = self.runner(name, op, probe, *params)
                out.backward(torch.ones_like(out))
                _sync(x.device)
                if i:
                    best = min(best, time.perf_counter() - start)
        return best

    # -- persistence and reporting --------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(
            json.dumps({"choices": self.choices, "timings": self.timings}, indent=1, sort_keys=True)
        )
        tmp.replace(path)

    def _load_or_set_aside(self, path: Path) -> None:
        """A cache is only a cache: one that cannot be used (damaged, foreign, from another version)
        is renamed `<name>.unusable` (kept for a look, never deleted) and the dataflows are
        measured again, instead of refusing the run."""
        try:
            self.load(path)
        except ValueError as err:
            kept = keep.set_aside(path, "unusable")
            log.warning("%s; kept as %s, the dataflows are measured again", err, kept.name)

    def load(self, path: str | Path) -> None:
        """Add the choices of a cache file; refuses (ValueError) a file that is not one, or that names
        a dataflow which cannot run the op of its key (a stale or hand-edited cache)."""
        try:
            data = json.loads(Path(path).read_text())
            choices = {str(k): str(v) for k, v in data["choices"].items()}
            timings = {
                str(k): {str(n): float(t) for n, t in v.items()} for k, v in data.get("timings", {}).items()
            }
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as err:
            raise ValueError(f"{path}: not a dataflow cache written by spark-me ({err})") from None
        unknown = sorted({v for v in choices.values() if v not in dataflows.DATAFLOWS})
        if unknown:
            raise ValueError(f"{path}: unknown dataflows {unknown}")
        for key, name in choices.items():
            op = _op_of_key(key)
            if op is None:
                raise ValueError(f"{path}: not a dataflow cache written by spark-me (key {key!r})")
            if name not in dataflows.candidates(op) and not (name == "me" and me_supports(op)):
                raise ValueError(f"{path}: dataflow {name!r} cannot run {op!r} (key {key!r})")
        self.choices.update(choices)
        self.timings.update(timings)


def _op_of_key(key: str) -> SparseOp | None:
    """The op a cache key was written for (None if the key is not one `DataflowTuner.key` writes)."""
    match = _KEY_OP.match(key)
    if match is None:
        return None
    kind, k, stride, cin, cout, groups, excl_pad = match.groups()
    try:
        op = SparseOp(kind, int(k), int(stride), int(cin), int(cout), int(groups or 1), not excl_pad)
    except ValueError:
        return None
    return op if key.startswith(f"{op!r} b") else None  # the whole op, as written


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
