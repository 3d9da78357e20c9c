"""Per-hospital work after pretraining: data, splits, fine-tuning, prediction, metrics, Grad-CAM."""
