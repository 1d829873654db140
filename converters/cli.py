"""`spark-me export` and `spark-me import-timm`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from converters.detectron2_format import DETECTRON2_CONFIG, to_detectron2
from converters.io import load_state, save_state
from converters.timm_format import from_timm, to_timm

log = logging.getLogger("spark_me.export")


def _arch_and_kwargs(checkpoint: dict, arch: str | None) -> tuple[str, dict]:
    """The architecture: --arch, else what the pretraining checkpoint recorded."""
    config = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else {}
    kwargs = dict(config.get("model_kwargs") or {})
    arch = arch or config.get("arch")
    if not arch:
        raise SystemExit(
            "the checkpoint does not record its architecture: pass --arch (e.g. --arch resnet50)"
        )
    return arch, kwargs


def verify_in_timm(state: dict, arch: str, model_kwargs: dict) -> list[str]:
    """Load into the real timm model; returns the keys timm keeps at its own init (the classifier)."""
    import timm

    model = timm.create_model(arch, pretrained=False, **model_kwargs)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise SystemExit(f"timm's {arch} does not know: {', '.join(result.unexpected_keys)}")
    # keys the encoder has but timm misses are an error; the rest come after SparK's last stage
    # (the classifier; e.g. EfficientNet's conv_head and bn2), which stay at timm's init
    not_head = [k for k in result.missing_keys if k in state]
    if not_head:
        raise SystemExit(f"timm's {arch} misses: {', '.join(not_head)}")
    return result.missing_keys


def cmd_export(args: argparse.Namespace) -> int:
    checkpoint = load_state(args.checkpoint)
    arch, model_kwargs = _arch_and_kwargs(checkpoint, args.arch)
    state = to_timm(checkpoint, arch, allow_missing=args.allow_missing, **model_kwargs)
    head = verify_in_timm(state, arch, model_kwargs)
    log.info(
        "%d tensors -> timm %s; classifier left at timm's init: %s", len(state), arch, ", ".join(head) or "-"
    )
    if args.to == "timm":
        out = save_state(state, args.output)
    else:
        if not arch.startswith("resnet"):
            raise SystemExit(f"Detectron2 export supports ResNets; {arch} is not one")
        out = save_state(to_detectron2(state), args.output)
        log.info("Detectron2 config for these weights: %s", DETECTRON2_CONFIG)
    log.info("wrote %s", out)
    return 0


def cmd_import_timm(args: argparse.Namespace) -> int:
    source = load_state(args.weights)
    state = from_timm(source, args.arch, allow_missing=args.allow_missing)
    out = save_state(state, args.output)
    log.info(
        "%d tensors from %s -> sparse %s encoder state_dict %s", len(state), args.weights, args.arch, out
    )
    log.info("start pretraining from it with: spark-me pretrain --arch %s --init_weight %s", args.arch, out)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser(
        "export", help="pretraining checkpoint -> timm (.pth/.safetensors) or Detectron2 (.pkl)"
    )
    export.add_argument("checkpoint", type=Path, help="pretraining checkpoint or sparse encoder state_dict")
    export.add_argument("--to", choices=("timm", "detectron2"), default="timm")
    export.add_argument("-o", "--output", type=Path, required=True, help=".pth, .safetensors (timm) or .pkl")
    export.add_argument("--arch", help="architecture, if the checkpoint does not record it")
    export.add_argument(
        "--allow-missing", nargs="*", default=(), metavar="KEY", help="keys that may be absent"
    )
    export.set_defaults(func=cmd_export)

    imp = sub.add_parser("import-timm", help="timm / SparK 'timm style' / FCMAE weights -> sparse encoder")
    imp.add_argument("weights", type=Path, help=".pth / .safetensors / Detectron2 .pkl")
    imp.add_argument("--arch", required=True)
    imp.add_argument("-o", "--output", type=Path, required=True)
    imp.add_argument("--allow-missing", nargs="*", default=(), metavar="KEY", help="keys that may be absent")
    imp.set_defaults(func=cmd_import_timm)
