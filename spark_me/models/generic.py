"""Any CNN on the sparse engine: a model's own `nn.Module` and forward code, run on visible sites.

SparK's promise is that any convolutional network can be pretrained without modifying it. Here the
model is not converted at all: its `forward_features` (or `forward`) runs unchanged on a
`SparseValue` (spark_me/sparse/value.py), whose `__torch_function__` sends every torch op to its
sparse handler (spark_me/sparse/handlers/), so weight-standardised convs, BatchNormAct layers,
squeeze-excite and hand-written modules built from torch functions all work as they are, and an op
without sparse semantics stops the model at construction with one line naming it and its module.

Why a tensor subclass and not a torch.fx graph: it needs no trace (timm models with Python control
flow run as they are), it handles ops at function level wherever they are called, and it costs a
few microseconds of Python per op, which the measurements in benchmarks/README.md show is lost in
the convolutions' time.

The four stage outputs SparK's decoder needs (strides 4, 8, 16, 32) are taken with forward hooks on
the model's stage modules (by default the last `feature_info` entry of each reduction), and the
forward stops after the last one. Modules that never run before it (classifier heads, timm's
`conv_head`) are removed at construction, so every parameter gets a gradient (DDP needs that) and
the encoder's `state_dict` is the model's without them, key for key, no prefix.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import MinkowskiEngine as ME
import torch
from torch import Tensor, nn

from spark_me.models.encoder import STRIDES, SparseEncoder
from spark_me.sparse import handlers  # noqa: F401  (fills the handler registry)
from spark_me.sparse.geometry import layout_of
from spark_me.sparse.tensor import sparsify
from spark_me.sparse.value import ExecutionContext, SparseValue

log = logging.getLogger(__name__)


class _StagesDone(Exception):
    """Raised by the last stage's hook: the rest of the model is not SparK's encoder."""


def stages_from_feature_info(model: nn.Module, name: str) -> list[str]:
    """The last module of each reduction 4, 8, 16, 32 in timm's `feature_info`."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise ValueError(
            f"{name}: no feature_info; pass the names of its stride 4/8/16/32 stage modules (stages=[...])"
        )
    entries = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
    last: dict[int, str] = {}
    for entry in entries:
        last[int(entry["reduction"])] = entry["module"]
    missing = [s for s in STRIDES if s not in last]
    if missing:
        raise ValueError(
            f"{name}: feature_info has no stage at reduction {missing} (has {sorted(last)}); SparK needs "
            "stages at strides 4, 8, 16 and 32"
        )
    return [last[s] for s in STRIDES]


class GenericSparseEncoder(SparseEncoder):
    """A model's own module run sparsely; `state_dict` keys are the model's (minus unreached modules).

    model: any CNN whose stage modules output maps at strides 4, 8, 16, 32 of the input.
    stages: their module names (default: from timm's `feature_info`). name: for messages.
    The encoder shares the model's modules and parameters (no copy); `dropped` lists the modules
    removed because they run after the last stage.
    """

    # convert_sync_batchnorm leaves the model's BatchNorms alone and sets `sync_group` instead: the
    # batch_norm handler then synchronises the statistics of the visible sites (norm.py).
    syncs_batchnorm_itself = True

    def __init__(self, model: nn.Module, stages: Sequence[str] | None = None, name: str | None = None):
        super().__init__()
        self.arch = name or type(model).__name__
        self.stage_names = list(stages) if stages is not None else stages_from_feature_info(model, self.arch)
        if len(self.stage_names) != 4:
            raise ValueError(
                f"{self.arch}: 4 stage modules needed (strides 4, 8, 16, 32), got {self.stage_names}"
            )
        modules = dict(model.named_modules())
        unknown = [s for s in self.stage_names if s not in modules]
        if unknown:
            raise ValueError(f"{self.arch}: no module named {unknown}")
        object.__setattr__(self, "model", model)  # not a submodule: its children are registered below
        self.sync_group = False
        self._context: ExecutionContext | None = None
        self._captured: dict[str, Tensor] = {}
        self._last_dataflows: list[tuple[str, str, str]] = []
        for stage in self.stage_names:
            modules[stage].register_forward_hook(self._capture_hook(stage))
        for path, module in modules.items():
            module.register_forward_pre_hook(self._enter_hook(path or "<model>"))
            module.register_forward_hook(self._leave_hook())
        self.channels = self._check_and_prune()
        for child_name, child in model.named_children():
            self.add_module(child_name, child)
        for param_name, param in model.named_parameters(recurse=False):
            self.register_parameter(param_name, param)
        for buffer_name, buffer in model.named_buffers(recurse=False):
            self.register_buffer(buffer_name, buffer)

    # -- hooks (active only while this encoder runs the model) ---------------------------------
    def _capture_hook(self, stage: str):
        def hook(module: nn.Module, inputs, output):
            if self._context is None:
                return None
            self._captured[stage] = output
            if stage == self.stage_names[-1]:
                raise _StagesDone
            return None

        return hook

    def _enter_hook(self, path: str):
        def hook(module: nn.Module, inputs):
            if self._context is not None:
                self._context.path.append(path)

        return hook

    def _leave_hook(self):
        def hook(module: nn.Module, inputs, output):
            if self._context is not None and self._context.path:
                self._context.path.pop()

        return hook

    # -- running ------------------------------------------------------------------------------
    def _run(self, value: SparseValue, context: ExecutionContext) -> list[SparseValue]:
        entry = getattr(self.model, "forward_features", None) or self.model
        self._context, self._captured = context, {}
        try:
            entry(value)
        except _StagesDone:
            pass
        finally:
            self._context = None
        captured, self._captured = self._captured, {}
        if len(captured) != 4:
            missing = [s for s in self.stage_names if s not in captured]
            raise ValueError(f"{self.arch}: the forward ended before the stage modules {missing} ran")
        outputs = []
        for stage, stride in zip(self.stage_names, STRIDES, strict=True):
            out = captured[stage]
            if not isinstance(out, SparseValue) or out.site_stride != stride or out.feats.dim() != 2:
                what = f"stride {out.site_stride}" if isinstance(out, SparseValue) else type(out).__name__
                raise ValueError(
                    f"{self.arch}: stage '{stage}' gives {what}, SparK needs a map at stride {stride}"
                )
            outputs.append(out)
        return outputs

    def forward_sparse(self, x: ME.SparseTensor) -> list[ME.SparseTensor]:
        layout = layout_of(x)
        if layout is None:
            raise ValueError("the generic encoder runs on tensors made by spark_me.sparsify")
        context = ExecutionContext(tuner=self.tuner, sync_group=self.sync_group, model=self.arch)
        outputs = self._run(SparseValue(x.F, layout, False, context), context)
        self._last_dataflows = context.dataflows
        return [out.to_sparse_tensor() for out in outputs]

    def dataflow_table(self) -> list[tuple[str, str, str | None]]:
        """(module, op, dataflow) of every conv and pool of the last forward, in order."""
        return list(self._last_dataflows)

    def train(self, mode: bool = True) -> GenericSparseEncoder:
        super().train(mode)
        self.model.training = mode  # the model object itself is not a registered child
        return self

    # -- construction -------------------------------------------------------------------------
    def _check_and_prune(self) -> tuple[int, int, int, int]:
        """Run the model once sparsely (eval and train, no gradient, state restored) to find
        unsupported ops before any training, the stage widths, and the modules that never run."""
        ran: set[str] = set()
        names = {m: n for n, m in self.model.named_modules()}
        handles = [m.register_forward_pre_hook(lambda m, i: ran.add(names[m])) for m in names]
        first = next(iter(self.model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
        dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
        in_chans = _input_channels(self.model)
        images = torch.zeros(2, in_chans, 64, 64, device=device, dtype=dtype)
        active = torch.ones(2, 2, 2, dtype=torch.bool, device=device)
        saved = {k: v.clone() for k, v in self.model.state_dict().items()}
        was_training = self.model.training
        try:
            for mode in (False, True):  # train mode last, with a graph: which parameters it uses
                self.model.train(mode)
                context = ExecutionContext(model=self.arch)
                x = sparsify(images, active)
                with torch.set_grad_enabled(mode):
                    outputs = self._run(SparseValue(x.F, layout_of(x), False, context), context)
            used = _parameters_reached(outputs)
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)
            self.model.load_state_dict(saved)
        self.dropped = _prune(self.model, ran, used)
        if self.dropped:
            log.debug("%s: modules after the last stage removed: %s", self.arch, ", ".join(self.dropped))
        return tuple(int(o.feats.shape[1]) for o in outputs)  # type: ignore[return-value]


def _input_channels(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return 3


def _parameters_reached(outputs: list[SparseValue]) -> set[int]:
    """ids of the parameters in the autograd graph of `outputs`: those the forward used, including
    through another module's code (``F.conv2d(x, self.proj.weight)`` never calls `proj`)."""
    stack = [o.feats.grad_fn for o in outputs]
    seen: set[int] = set()
    reached: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf, i.e. a parameter
        if variable is not None:
            reached.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return reached


def _prune(model: nn.Module, ran: set[str], used: set[int]) -> list[str]:
    """Replace the modules (with state) of which no part ran and no parameter was used by
    `nn.Identity`; their names.

    Containers count as run when a descendant ran (a ModuleList is iterated, never called)."""
    reached = {p.rsplit(".", i)[0] for p in ran for i in range(p.count(".") + 1)}
    dropped = []
    for path, module in list(model.named_modules()):
        if not path or path in reached or any(path.startswith(d + ".") for d in dropped):
            continue
        if next(module.parameters(), None) is None and next(module.buffers(), None) is None:
            continue
        if any(id(p) in used for p in module.parameters()):
            continue
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, nn.Identity())
        dropped.append(path)
    return dropped
