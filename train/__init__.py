"""Training: typed configs, the trainer, objectives, losses, checkpoints."""
