"""spark-me: SparK masked image modelling for CNNs on genuine sparse tensors (MinkowskiEngine).

Names are resolved lazily so that `python3 -m spark_me.bootstrap` runs with a bare interpreter
(no torch, no MinkowskiEngine) and the CLI starts fast.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

__version__ = "0.1.0"

# MinkowskiEngine warns at every import that it was "compiled with CPU_ONLY flag". spark-me's CPU
# set-up builds exactly that on purpose, so the line is noise here; `spark-me --verbose` shows it
# again (and `spark-me smoke` says itself when torch sees a GPU that such a build cannot use).
warnings.filterwarnings("ignore", message="The MinkowskiEngine was compiled with CPU_ONLY flag")

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "create_encoder": "spark_me.models.registry",
    "list_encoders": "spark_me.models.registry",
    "SparK": "spark_me.models.spark",
    "random_mask": "spark_me.masking",
    "create_reference": "spark_me.models.reference",
    "sparsify": "spark_me.sparse.tensor",
    "densify": "spark_me.sparse.tensor",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'spark_me' has no attribute {name!r}")
