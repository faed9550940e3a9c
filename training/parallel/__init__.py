"""Distribution: the process group, the DeepSpeed config and its version repairs."""
