"""Training: a Hugging Face causal LM inside DeepSpeed ZeRO 0-3.

Importing this package is cheap; torch/deepspeed/transformers are imported
only by the modules that run a model.
"""
