"""The arguments of each `gptrain` command, one function per command (`NAME_args`);
`launcher.cli` pairs each with its handler. Pure argparse: importing it is instant."""

from __future__ import annotations

import argparse

from launcher.backends import NAMES as BACKENDS


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/)")
    add_set_arg(p, "override a config value, e.g. --set train.max_steps=100 (repeatable)")


def add_set_arg(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", metavar="NAME", help="device to plan for, e.g. H100-80GB, A100-40GB")
    p.add_argument("--gpu-memory-gb", type=float, metavar="GIB", help="device memory per rank")


def prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="files, directories or globs")
    p.add_argument("--out", help="output directory for shards + manifest.json")
    from sharding.options import add_arguments

    add_arguments(p)  # the dataset's options: flags, defaults and help from PrepareOptions
    p.add_argument(
        "--workers", type=int, default=None, help="tokenizer processes (default: all cores)"
    )
    p.add_argument("--verify", metavar="DIR", help="check every shard of DIR against its manifest")
    p.add_argument(
        "--tasks",
        type=int,
        help="prepare in N resumable slices, merged into one manifest (see --backend)",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        help="run the slices here (local) or as a SLURM array job (default: launch.backend)",
    )
    p.add_argument("--config", help="YAML config whose launch.slurm settings the slices use")
    add_set_arg(p, "override a launch setting, e.g. --set launch.slurm.cpus_per_task=8")


def train_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)


def launch_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--backend", choices=BACKENDS)
    p.add_argument("--nodes", type=int, help="overrides launch.nodes")
    p.add_argument("--nproc-per-node", type=int, help="overrides launch.nproc_per_node")
    p.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    p.add_argument(
        "--follow",
        action="store_true",
        help="slurm: stream rank 0's log until the job ends (local runs print anyway)",
    )
    add_device_args(p)
    p.add_argument("--force", action="store_true", help="launch even if the plan does not fit")


def plan_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--nodes", type=int, help="overrides launch.nodes")
    p.add_argument("--gpus-per-node", type=int, help="ranks per node; overrides nproc_per_node")
    add_device_args(p)
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per device (default: --gpu's)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed MFU for the step time")
    p.add_argument("--json", action="store_true")


def status_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "target", nargs="?", metavar="RUN_DIR|JOB_ID", help="default: list runs under runs/"
    )
    p.add_argument("--json", action="store_true")


def logs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("--rank", type=int, help="default: the rank that failed first, else 0")
    p.add_argument("--follow", action="store_true")


def cancel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")


def evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="RUN_DIR|MODEL_DIR")
    p.add_argument("--data", help="prepared dataset directory (loss, perplexity)")
    p.add_argument("--split", default="val")
    p.add_argument(
        "--seq-len",
        type=int,
        help="default: the run's data.seq_len (a model dir: its positions, at most 1024)",
    )
    p.add_argument("--step", type=int, help="a run's checkpoint step (default: latest)")
    p.add_argument(
        "--generate",
        action="store_true",
        help="also complete the prompts greedily and score them: exact match, BLEU, ROUGE-L",
    )
    p.add_argument("--prompts", metavar="FILE.jsonl", help="{prompt, completion} lines to complete")
    p.add_argument("--max-samples", type=int, default=200, help="prompts to complete at most")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--samples", metavar="FILE", help="samples JSONL (default: RUN_DIR/eval/samples.jsonl)"
    )


def generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="RUN_DIR|MODEL_DIR")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-return-sequences", type=int, default=1)
    p.add_argument("--step", type=int, help="a run's checkpoint step (default: latest)")


def export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    form = p.add_mutually_exclusive_group()
    form.add_argument(
        "--merge",
        dest="adapter",
        action="store_false",
        default=False,
        help="LoRA runs: the base with the adapters merged in (default)",
    )
    form.add_argument(
        "--adapter",
        action="store_true",
        help="LoRA runs: the adapter only, for peft.PeftModel.from_pretrained",
    )


def plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG path (default RUN_DIR/plot.png)")
    p.add_argument("--compare", nargs="*", default=[], metavar="RUN_DIR")


def config_show_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)


def config_validate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("configs", nargs="+", metavar="CONFIG")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
