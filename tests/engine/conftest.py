"""The smallest pretraining run that exercises everything (ResNet-18, 64 px, 12 photographs + 4 held out)."""

TINY_RUN = ["--arch", "resnet18", "--input_size", "64", "--batch_size", "4", "--decoder_width", "64",
            "--num_workers", "0", "--warmup_epochs", "1", "--repeat", "1"]  # fmt: skip
