"""Watching a run: metric sinks, events and alerts, progress, plots, logs, run health."""
