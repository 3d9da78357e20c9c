"""Contrastive pretraining: the trainer, its state and checkpoints, losses, LARS, the LR schedule, engines."""
