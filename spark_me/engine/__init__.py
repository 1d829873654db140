"""Pretraining engine: configuration, optimisation, checkpoints, distribution, the training loop."""
