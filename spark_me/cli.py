"""The `spark-me` command line.

Each subcommand lives in its own module and is imported only when run, so `spark-me --help` is
instant and a missing optional dependency affects only the subcommand that needs it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

log = logging.getLogger("spark_me")


def cmd_smoke(args: argparse.Namespace) -> int:
    """Check that MinkowskiEngine imports and its convolutions equal torch's."""
    import MinkowskiEngine as ME
    import torch

    from spark_me.sparse.selfcheck import conv_matches_dense

    log.info(
        "MinkowskiEngine %s, torch %s, CUDA available: %s",
        ME.__version__,
        torch.__version__,
        torch.cuda.is_available(),
    )
    if torch.cuda.is_available() and not ME.is_cuda_available():
        log.warning(
            "MinkowskiEngine was built without CUDA although torch sees a GPU (SPARK_ME_CUDA=1 setup)"
        )
    worst = 0.0
    for kernel_size, stride in [(3, 1), (3, 2), (7, 2), (2, 2), (4, 4), (1, 2)]:
        started = time.perf_counter()
        err = conv_matches_dense(kernel_size, stride)
        worst = max(worst, err)
        log.info(
            "sparse conv k=%d s=%d vs F.conv2d: max rel error %.2e (%.3f s)",
            kernel_size,
            stride,
            err,
            time.perf_counter() - started,
        )
    ok = worst < 1e-10
    log.info("smoke check %s (worst %.2e, float64)", "passed" if ok else "FAILED", worst)
    return 0 if ok else 1


def cmd_pretrain(args: argparse.Namespace, extra: list[str]) -> int:
    """SparK pretraining (flags: `spark-me pretrain --help`)."""
    from spark_me.engine.config import resolve

    cfg = resolve(extra)  # bad values fail here, before the model code (and MinkowskiEngine) loads
    from spark_me.engine.pretrain import run

    return run(cfg)


def cmd_finetune(args: argparse.Namespace, extra: list[str]) -> int:
    """Classification fine-tuning (flags: `spark-me finetune --help`)."""
    from spark_me.engine.finetune_config import resolve

    cfg = resolve(extra)  # bad values fail here, before timm or the data load
    from spark_me.engine.finetune import run

    return run(cfg)


def cmd_probe(args: argparse.Namespace, extra: list[str]) -> int:
    """Frozen-feature k-NN / linear probe (flags: `spark-me probe --help`)."""
    from spark_me.engine.probe_config import resolve

    cfg = resolve(extra)
    from spark_me.engine.probe import run

    return run(cfg)


def cmd_bench(args: argparse.Namespace, extra: list[str]) -> int:
    """Benchmarks (flags: `spark-me bench --help`)."""
    from benchmarks.harness import main as bench_main

    return bench_main(extra)


def cmd_finetune_det(args: argparse.Namespace, extra: list[str]) -> int:
    """Detectron2 fine-tuning (flags: `spark-me finetune-det --help`)."""
    weights = _finetune_weights(extra)
    if weights:  # a file that is not weights fails here, in one line, before Detectron2 builds anything
        from converters import load_state

        load_state(weights)
    try:
        import detectron2  # noqa: F401
    except ImportError:
        log.error(
            "Detectron2 is not installed in this environment: `python3 -m spark_me.bootstrap setup` "
            "installs it (or `python -m spark_me._build.detectron2`; upstream: see detection/README.md)"
        )
        return 1
    from detection.train_net import run

    run(extra, verbose=args.verbose)
    return 0


def _finetune_weights(extra: list[str]) -> str | None:
    """The `--weights` value among finetune-det's flags (its full parser needs Detectron2)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--weights")
    return parser.parse_known_args(extra)[0].weights


def cmd_reconstruct(args: argparse.Namespace) -> int:
    """Picture of input / masked / reconstruction / merged from a pretraining checkpoint."""
    from spark_me.engine import checkpoint
    from spark_me.engine.config import PretrainConfig, mask_ratio_problem, size_problem

    # the file and the sizes are checked before the model code (and MinkowskiEngine) loads
    state = checkpoint.load(args.checkpoint)
    config = state["config"]
    size = args.input_size if args.input_size is not None else config["input_size"]
    mask_ratio = args.mask_ratio if args.mask_ratio is not None else config["mask_ratio"]
    problem = size_problem("input_size", size) or mask_ratio_problem(mask_ratio, size)
    if problem:
        raise ValueError(problem)
    import torch

    from spark_me.data.images import ImageFiles, load_rgb
    from spark_me.data.transforms import eval_transform
    from spark_me.engine.pretrain import build_model
    from spark_me.viz import save_reconstructions

    cfg = PretrainConfig(
        arch=config["arch"],
        model_kwargs=config.get("model_kwargs") or {},
        model=config.get("model"),
        stages=config.get("stages"),
        decoder_width=config["decoder_width"],
        mask_ratio=mask_ratio,
    )
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    model.eval()
    transform = eval_transform(size)
    if args.images:
        images = torch.stack([transform(load_rgb(p)) for p in args.images])
    else:
        dataset = ImageFiles(None, transform)
        images = torch.stack([dataset[i] for i in range(min(8, len(dataset)))])
    gen = torch.Generator().manual_seed(args.seed)
    out = save_reconstructions(model, images, args.output, model.mask(images, generator=gen))
    log.info("wrote %s (%d images: input | masked | reconstruction | merged)", out, len(images))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spark-me", description="SparK pretraining on sparse tensors.")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging and every warning of every library"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    smoke = sub.add_parser("smoke", help=cmd_smoke.__doc__)
    smoke.set_defaults(func=cmd_smoke)
    bench = sub.add_parser("bench", help="speed/memory: sparse vs masked-dense vs dense", add_help=False)
    bench.set_defaults(func=cmd_bench, takes_extra=True)
    pretrain = sub.add_parser(
        "pretrain", help="SparK pretraining (see spark-me pretrain --help)", add_help=False
    )
    pretrain.set_defaults(func=cmd_pretrain, takes_extra=True)
    classify = sub.add_parser(
        "finetune", help="classification fine-tuning (see spark-me finetune --help)", add_help=False
    )
    classify.set_defaults(func=cmd_finetune, takes_extra=True)
    probe = sub.add_parser(
        "probe", help="k-NN / linear probe on frozen features (see spark-me probe --help)", add_help=False
    )
    probe.set_defaults(func=cmd_probe, takes_extra=True)
    finetune = sub.add_parser(
        "finetune-det", help="Detectron2 Mask R-CNN fine-tuning of an export", add_help=False
    )
    finetune.set_defaults(func=cmd_finetune_det, takes_extra=True)
    recon = sub.add_parser("reconstruct", help=cmd_reconstruct.__doc__)
    recon.add_argument("checkpoint", type=Path)
    recon.add_argument("images", nargs="*", type=Path, help="image files (default: the embedded photographs)")
    recon.add_argument("-o", "--output", type=Path, default=Path("reconstruction.png"))
    recon.add_argument("--mask_ratio", type=float)
    recon.add_argument("--input_size", type=int)
    recon.add_argument("--seed", type=int, default=0)
    recon.set_defaults(func=cmd_reconstruct)
    from converters.cli import add_parsers as add_converter_parsers

    add_converter_parsers(sub)
    return parser


# where our own code lives: its warnings are never silenced
OWN_MODULES = r"(?!spark_me|converters|detection|benchmarks)"


def quiet_warnings(verbose: bool) -> None:
    """Deprecation notices of dependencies (torch.jit in Detectron2, pkg_resources, ...) are for
    their maintainers, not for a user of this command; `--verbose` shows every warning."""
    if verbose:
        warnings.simplefilter("default")
        return
    for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=OWN_MODULES)
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", module=OWN_MODULES)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `spark-me pretrain ... --verbose` works too
    args.verbose = args.verbose or any(a in ("-v", "--verbose") for a in extra)
    extra = [a for a in extra if a not in ("-v", "--verbose")]
    quiet_warnings(args.verbose)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    if extra and not getattr(args, "takes_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if getattr(args, "takes_extra", False):
            return args.func(args, extra)
        return args.func(args)
    except (FileNotFoundError, ValueError) as err:  # bad input: a clear message, not a traceback
        log.error("spark-me %s: %s", args.command, err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
