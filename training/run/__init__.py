"""The run directory: its owner lock, archive, recorded failures."""
