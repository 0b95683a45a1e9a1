"""Training on HF Accelerate: config, optimiser, checkpoints and the train/eval loops."""
