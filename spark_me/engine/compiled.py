"""`--compile`: torch.compile for the dense stages of a pretraining step, and the log line of its cost.

What is compiled is `SparK.dense_stages`: densify's mask-token fill and projections, the light
decoder and the per-patch normalised loss, plain dense torch that dominates the step next to the
sparse encoder. The encoder and densify's sparse norms stay eager: MinkowskiEngine's ops cannot be
traced. The code is device-agnostic: inductor writes C++/OpenMP kernels on a CPU and Triton kernels
on a GPU from the same graph.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from spark_me.models.spark import SparK

log = logging.getLogger("spark_me.pretrain")

WHAT = "dense stages (mask-token fill and projections, decoder, loss)"


def compile_seconds() -> float:
    """Seconds torch.compile has spent in this process so far, forward and backward graphs
    (dynamo's own cumulative accounting: tracing, AOT autograd, code generation, C++/Triton builds)."""
    return float(torch._dynamo.utils.calculate_time_spent().get("total_wall_time", 0.0))


class CompileReport:
    """Logs the compile time once it is spent: torch.compile compiles lazily, at the first step
    (forward and backward), and again only for a graph it has not seen (evaluation mode, no grad,
    a new batch or image size; a new mask is not one). Call it at step boundaries and epoch ends."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.logged = compile_seconds()
        self.first = True

    def __call__(self) -> None:
        spent = compile_seconds() - self.logged
        if spent <= 0:
            return
        self.logged += spent
        if self.first:
            log.info("compiled the %s with %s: %.1f s", WHAT, self.backend, spent)
        else:
            log.info("compiled the %s again (evaluation mode or a new shape): %.1f s", WHAT, spent)
        self.first = False


def compile_dense_stages(model: SparK, backend: str) -> CompileReport:
    """Switch `model` to its compiled dense stages; the report logs the compile time once spent."""
    model.compile_dense_stages(backend=backend)
    log.info("--compile: the %s go through torch.compile (%s) at the first step", WHAT, backend)
    return CompileReport(backend)


def with_report(report: CompileReport | None, boundary: Callable[[int, int, list[float]], None]):
    """`boundary` (run after every optimiser step but an epoch's last) preceded by `report`, so
    that the first step's compile time is logged as soon as that step is done."""
    if report is None:
        return boundary

    def after_step(done: int, step: int, losses: list[float]) -> None:
        report()
        boundary(done, step, losses)

    return after_step
