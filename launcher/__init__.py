"""Launcher: the `gptrain` CLI, the config tree, local torchrun and SLURM jobs.

Nothing else in gptrain imports this package.
"""
