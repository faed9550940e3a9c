"""`gptrain plot`: loss, eval perplexity, learning rate and throughput as one PNG."""

from __future__ import annotations

from pathlib import Path

from training.errors import TrainingError
from training.observe.metrics import read_metrics
from training.run.paths import RunDir

PANELS = (
    ("loss", "train loss", "loss"),
    ("eval_ppl", "eval perplexity", "eval_ppl"),
    ("lr", "learning rate", "lr"),
    ("tokens_per_s", "throughput", "tokens/s"),
)


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    """Draw each run's curves (same panel, one colour per run) into `out` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for run_dir in run_dirs:
        records = read_metrics(RunDir(run_dir).metrics)
        if not records:
            raise TrainingError(f"{run_dir}: no metrics.jsonl records to plot")
        for ax, (key, title, ylabel) in zip(axes.flat, PANELS, strict=True):
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, label=str(run_dir), marker="." if len(points) < 30 else None)
            if key == "loss":
                evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
                if evals:
                    ax.plot(*zip(*evals, strict=True), linestyle="--", label=f"{run_dir} eval")
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
    for ax in axes.flat:
        if ax.lines:
            ax.legend(fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
