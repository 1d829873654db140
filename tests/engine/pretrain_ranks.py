"""`spark-me pretrain` for a torchrun test that also keeps what only the ranks other than 0 know:
each rank saves the BatchNorm running statistics of its model after the run (to
`OUTPUT_DIR/rank{r}-bn-stats.pt`), so the test can check that every rank holds the same ones.

Run as `python -m torch.distributed.run ... -m tests.engine.pretrain_ranks pretrain ARGS` from the
repository root. The model is found with a forward pre-hook registered for this process only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

from spark_me.cli import main
from spark_me.models.spark import SparK


def main_saving_statistics(argv: list[str]) -> int:
    seen: list[SparK] = []

    def remember(module: nn.Module, args) -> None:
        if isinstance(module, SparK) and not seen:
            seen.append(module)

    handle = nn.modules.module.register_module_forward_pre_hook(remember)
    try:
        code = main(argv)
    finally:
        handle.remove()
    stats = {name: b.clone() for name, b in seen[0].named_buffers() if "running_" in name}
    output = Path(argv[argv.index("--output_dir") + 1])
    torch.save(stats, output / f"rank{os.environ['RANK']}-bn-stats.pt")
    return code


if __name__ == "__main__":
    sys.exit(main_saving_statistics(sys.argv[1:]))
