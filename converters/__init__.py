"""Weight conversion between spark-me's sparse encoders, timm and Detectron2.

to_timm(state_dict, arch) -> dict        sparse encoder / SparK checkpoint -> timm
from_timm(state_dict, arch) -> dict      timm -> sparse encoder (loads with strict=True)
to_detectron2(timm_state_dict) -> dict   timm ResNet -> Detectron2 .pkl content
"""

from converters.detectron2_format import DETECTRON2_CONFIG, from_detectron2, to_detectron2
from converters.io import load_state, save_state
from converters.timm_format import KeyMismatchError, from_timm, to_timm

__all__ = [
    "DETECTRON2_CONFIG",
    "KeyMismatchError",
    "from_detectron2",
    "from_timm",
    "load_state",
    "save_state",
    "to_detectron2",
    "to_timm",
]
