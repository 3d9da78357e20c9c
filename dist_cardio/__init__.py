"""dist_cardio: contrastive pretraining and per-hospital fine-tuning of SimCardioNet on ECG images."""

__version__ = "0.1.0"
