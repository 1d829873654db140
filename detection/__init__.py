"""Detectron2 fine-tuning of spark-me backbones (optional: needs the `detection` set-up step).

    python3 -m spark_me.bootstrap finetune-det --config-file detection/configs/mask_rcnn_R_50_FPN_1x.yaml \
        --weights resnet50_spark.pkl

Modules: config (YAML with model-zoo bases, spark-me keys), backbone (timm ConvNeXt + FPN),
weights (pretrained backbone loading with a per-key report), solver (AdamW with layer-wise lr
decay), datasets (COCO registration from a path), tiny_coco (a small synthetic COCO-format set for
smoke runs), train_net (the entry point).
"""
