"""The model: build from config or a pretrained dir, LoRA and freezing, the loss head, FLOPs."""
