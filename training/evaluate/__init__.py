"""Evaluation beyond the training loss: generation metrics and inference."""
