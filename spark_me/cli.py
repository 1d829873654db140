"""The `spark-me` command line.

Each subcommand lives in its own module and is imported only when run, so `spark-me --help` is
instant and a missing optional dependency affects only the subcommand that needs it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

log = logging.getLogger("spark_me")

# Subcommands whose issues have not landed yet: they say so and exit non-zero.
NOT_YET = {
    "pretrain": "SparK pretraining (issue #4)",
    "bench": "sparse vs masked-dense vs dense benchmarks (issue #6)",
}


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spark-me", description="SparK pretraining on sparse tensors.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    smoke = sub.add_parser("smoke", help=cmd_smoke.__doc__)
    smoke.set_defaults(func=cmd_smoke)
    from converters.cli import add_parsers as add_converter_parsers

    add_converter_parsers(sub)
    for name, what in NOT_YET.items():
        stub = sub.add_parser(name, help=f"{what}: not implemented yet", add_help=False)
        stub.set_defaults(func=None, what=what)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.func is None:
        log.error("spark-me %s: not implemented yet: %s", args.command, args.what)
        return 2
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as err:  # bad input: a clear message, not a traceback
        log.error("spark-me %s: %s", args.command, err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
