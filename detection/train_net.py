"""Fine-tune a spark-me backbone with Detectron2 (Mask R-CNN + FPN) and evaluate on COCO.

    spark-me finetune-det --num-gpus 8 --weights resnet50_spark.pkl --output-dir out/det_r50
    spark-me finetune-det --eval-only --output-dir out/det_r50 MODEL.WEIGHTS out/det_r50/model_final.pth
    spark-me finetune-det --smoke --weights resnet50_spark.pkl   # 2 CPU iterations, tiny synthetic set

`--weights` takes any spark-me output: the Detectron2 `.pkl` export, the timm export
(.pth/.safetensors) or a pretraining checkpoint; every backbone tensor must load (see weights.py).
Trailing `KEY VALUE` pairs override the config, as in Detectron2's tools. Everything is written
under --output-dir (default output/finetune_det; --smoke: output/finetune_det_smoke).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm

from detection import solver
from detection.config import load_config, resolve_config_file
from detection.datasets import register_coco_root, register_spec
from detection.logs import tidy_console
from detection.tiny_coco import make_tiny_coco
from detection.weights import load_pretrained_backbone

log = logging.getLogger("spark_me.detection")

DEFAULT_CONFIG = "mask_rcnn_R_50_FPN_1x.yaml"
DEFAULT_OUTPUT = {False: "output/finetune_det", True: "output/finetune_det_smoke"}  # by --smoke


class Trainer(DefaultTrainer):
    """Detectron2's trainer with COCO evaluation and SparK's AdamW + layer-wise lr decay."""

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None):
        return COCOEvaluator(
            dataset_name, output_dir=output_folder or str(Path(cfg.OUTPUT_DIR) / "inference")
        )

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        return solver.build_optimizer(cfg, model)


def smoke_overrides(data_dir: Path) -> list[str]:
    """A CPU-sized run on the tiny synthetic set: 2 iterations, 128 px, then a COCO evaluation."""
    make_tiny_coco(data_dir)
    register_spec(f"tiny_coco_train={data_dir / 'train.json'}:{data_dir / 'images'}")
    register_spec(f"tiny_coco_val={data_dir / 'val.json'}:{data_dir / 'images'}")
    overrides = {
        "DATASETS.TRAIN": "('tiny_coco_train',)",
        "DATASETS.TEST": "('tiny_coco_val',)",
        "MODEL.ROI_HEADS.NUM_CLASSES": "2",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": "64",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST": "0.0",  # an untrained model still yields scored detections
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN": "400",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN": "200",
        "MODEL.RPN.PRE_NMS_TOPK_TEST": "200",
        "MODEL.RPN.POST_NMS_TOPK_TEST": "100",
        "INPUT.MIN_SIZE_TRAIN": "(128,)",
        "INPUT.MAX_SIZE_TRAIN": "160",
        "INPUT.MIN_SIZE_TEST": "128",
        "INPUT.MAX_SIZE_TEST": "160",
        "SOLVER.IMS_PER_BATCH": "2",
        "SOLVER.MAX_ITER": "2",
        "SOLVER.STEPS": "()",
        "SOLVER.WARMUP_ITERS": "1",
        "SOLVER.CHECKPOINT_PERIOD": "100000",
        "TEST.EVAL_PERIOD": "0",
        "TEST.DETECTIONS_PER_IMAGE": "20",
        "TEST.PRECISE_BN.ENABLED": "False",
        "DATALOADER.NUM_WORKERS": "0",
    }
    return [item for pair in overrides.items() for item in pair]


def setup(args) -> CfgNode:
    for spec in args.dataset:
        register_spec(spec)
    if args.coco_root:
        register_coco_root(args.coco_root)
    opts = list(args.opts)
    out = Path(args.output_dir or _opt(opts, "OUTPUT_DIR") or DEFAULT_OUTPUT[args.smoke])
    if args.smoke:
        opts = smoke_overrides(out / "tiny_coco") + opts
    opts += ["OUTPUT_DIR", str(out)]
    config_file = str(resolve_config_file(args.config_file))
    cfg = load_config(config_file, opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        log.warning("no CUDA device: running on the CPU (MODEL.DEVICE cpu)")
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    default_setup(cfg, argparse.Namespace(**{**vars(args), "config_file": config_file}))  # copies the file
    tidy_console(getattr(args, "verbose", False))
    return cfg


def _opt(opts: list[str], key: str) -> str | None:
    return opts[opts.index(key) + 1] if key in opts[:-1] else None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def main(args) -> dict:
    """One process (Detectron2's `launch` runs one per GPU). Returns the evaluation results."""
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        if args.weights:
            load_pretrained_backbone(model, args.weights)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    if args.weights:
        load_pretrained_backbone(_unwrap(trainer.model), args.weights)
    elif not cfg.MODEL.WEIGHTS and not args.resume:
        log.warning("no --weights and no MODEL.WEIGHTS: the backbone starts from random initialisation")
    trainer.resume_or_load(resume=args.resume)  # a resumed run's checkpoint wins over --weights
    trainer.train()
    # Detectron2's EvalHook runs the final evaluation and keeps its results on the trainer.
    results = getattr(trainer, "_last_eval_results", None) or {}
    if comm.is_main_process():
        for task, metrics in results.items():
            log.info(
                "%s: %s", task, ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k.startswith("AP"))
            )
    return results


def build_parser():
    parser = default_argument_parser(epilog=__doc__)
    parser.prog = "spark-me finetune-det"
    parser.set_defaults(config_file=DEFAULT_CONFIG)
    parser.add_argument(
        "--weights", help="spark-me export or checkpoint for the backbone (.pkl/.pth/.safetensors)"
    )
    parser.add_argument(
        "--coco-root", help="root with coco/{train2017,val2017,annotations} (else $DETECTRON2_DATASETS)"
    )
    parser.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="NAME=JSON:IMAGES",
        help="register a COCO-format dataset (repeatable); use it via DATASETS.TRAIN/TEST",
    )
    parser.add_argument(
        "--output-dir",
        "--output_dir",
        dest="output_dir",
        help="where checkpoints, logs and evaluations go (OUTPUT_DIR; default output/finetune_det, "
        "with --smoke output/finetune_det_smoke: about 500 MB, the ResNet-50 model_final.pth)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="2 iterations on a tiny synthetic set, CPU-sized"
    )
    parser.add_argument("--verbose", action="store_true", help="Detectron2's full console log")
    return parser


def run(argv: list[str] | None = None, verbose: bool = False) -> dict | None:
    """Parse flags; one process runs in place (and returns its results), several are launched."""
    args = build_parser().parse_args(argv)
    args.verbose = args.verbose or verbose
    if args.num_gpus * args.num_machines <= 1:
        return main(args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
    return None


if __name__ == "__main__":
    run()
