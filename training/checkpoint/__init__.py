"""Checkpoints: save and verify step dirs, resume, consolidate to a plain HF model."""
