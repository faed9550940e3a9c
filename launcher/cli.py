"""`gptrain`: prepare data, train, launch, watch and use GPT models.

Quick start (CPU, 2 ranks):
    gptrain prepare corpus.jsonl --out data/demo --train-tokenizer 4096
    gptrain launch configs/demo-cpu.yaml --backend local --nproc-per-node 2
    gptrain generate runs/demo --prompt "Return the"

Per-rank entry point (what `launch` runs under torchrun or SLURM):
    torchrun --standalone --nproc-per-node 2 -m launcher.cli train configs/demo-cpu.yaml

Heavy libraries (torch, deepspeed, transformers, wandb) are imported only by
the subcommand that needs them, so `gptrain --help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from launcher import cli_args as A
from launcher.errors import LaunchError


class UsageError(Exception):
    """Bad command-line arguments that argparse alone cannot detect."""


def _load(args: argparse.Namespace):  # -> launcher.config.Config
    from launcher.config import load_config

    return load_config(args.config, args.overrides)


# --- handlers ------------------------------------------------------------------------------


def cmd_config_show(args: argparse.Namespace) -> int:
    from launcher.config import dump_yaml

    cfg = _load(args)
    layout = cfg.batch_layout()
    print(dump_yaml(cfg), end="")
    if cfg.model.name_or_path:
        print(
            f"# model.config: unused — model.name_or_path is set ({cfg.model.name_or_path}); "
            "the model's sizes come from its config.json"
        )
    print(
        f"# batch: global {layout.global_batch_size} = micro {layout.micro_batch_size} × "
        f"accum {layout.grad_accum_steps} × data_parallel {layout.data_parallel_size} "
        f"({cfg.launch.nodes} node(s) × {cfg.launch.nproc_per_node} proc)"
    )
    return 0


def cmd_config_validate(args: argparse.Namespace) -> int:
    from launcher.config import load_config

    for path in args.configs:
        load_config(path, args.overrides)
        print(f"{path}: ok")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    if args.verify:
        from sharding.prepare import verify

        if args.inputs:
            raise UsageError("prepare --verify DIR takes no INPUT files")
        verify(args.verify)
        print(f"{args.verify}: all shards match the manifest")
        return 0
    if not args.inputs or not args.out:
        raise UsageError("prepare needs INPUT... and --out DIR (or --verify DIR)")
    from sharding.options import from_arguments

    options = from_arguments(args)
    options.check()  # before any work, on every backend
    if args.backend or args.tasks is not None or args.config or args.overrides:
        from launcher.prepare_job import launch_settings, run_prepare

        launch = launch_settings(args.config, args.overrides)
        return run_prepare(
            args.inputs,
            args.out,
            backend_name=args.backend,
            tasks=args.tasks,
            launch=launch,
            workers=args.workers,
            command=["gptrain", *sys.argv[1:]],
            options=options,
        )
    from sharding.prepare import prepare

    prepare(args.inputs, args.out, options, workers=args.workers)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from launcher.backends import rank_context
    from launcher.config import train_job
    from training.parallel.dist import dist_env
    from training.run import failures
    from training.trainer import train

    job = train_job(_load(args))
    # ranks of `gptrain launch` (which reports failures), by hand, torchrun or a scheduler
    context = rank_context(os.environ)
    try:
        return train(job, context=context)
    except failures.RankFailed as exc:  # recorded in the run dir, traceback in the rank's log
        if not context.launcher_holds_lock:
            print(f"gptrain train: error: {exc}", file=sys.stderr)
        return 1
    except _user_errors() as exc:
        if not context.launcher_holds_lock:
            raise
        # Every rank would print the same line: recorded instead, the launcher shows it once.
        failures.record(Path(job.run.dir), dist_env(os.environ).rank, exc, user_error=True)
        return 2


def cmd_export(args: argparse.Namespace) -> int:
    from training.evaluate.inference import export

    out = export(args.run_dir, args.out, step=args.step, adapter=args.adapter)
    print(f"exported {args.run_dir} to {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from training.evaluate.inference import generate

    texts = generate(
        args.model,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        num_return_sequences=args.num_return_sequences,
        step=args.step,
    )
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1}")
        print(text)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from training.evaluate.inference import evaluate

    if args.prompts and not args.generate:
        raise UsageError("--prompts FILE is for --generate")
    if args.data is None and not (args.generate and args.prompts):
        raise UsageError("evaluate needs --data DIR (or --generate --prompts FILE.jsonl)")
    result: dict = {}
    if args.data is not None:
        result = evaluate(
            args.model, args.data, split=args.split, seq_len=args.seq_len, step=args.step
        )
    if args.generate:
        result.update(_generation_eval(args))
    print(json.dumps(result))
    return 0


def _generation_eval(args: argparse.Namespace) -> dict:
    from itertools import islice
    from pathlib import Path

    from training.evaluate.gen_eval import generation_eval, pairs_from_file, pairs_from_split
    from training.evaluate.inference import is_run_dir, load_model_and_tokenizer
    from training.run.paths import RunDir

    model, tokenizer = load_model_and_tokenizer(args.model, args.step)
    if args.prompts:
        pairs = pairs_from_file(args.prompts)[: args.max_samples]
    else:
        pairs = list(islice(pairs_from_split(args.data, args.split, tokenizer), args.max_samples))
    samples = args.samples or (
        RunDir(args.model).eval_samples
        if is_run_dir(Path(args.model))
        else Path("eval_samples.jsonl")
    )
    return generation_eval(
        model, tokenizer, pairs, samples_path=samples, max_new_tokens=args.max_new_tokens
    )


def cmd_launch(args: argparse.Namespace) -> int:
    from launcher.config import load_config
    from launcher.launch import dry_run_text, launch

    overrides = list(args.overrides)
    for flag, key in (
        ("backend", "backend"),
        ("nodes", "nodes"),
        ("nproc_per_node", "nproc_per_node"),
    ):
        if getattr(args, flag) is not None:
            overrides.append(f"launch.{key}={getattr(args, flag)}")
    cfg = load_config(args.config, overrides)
    if args.dry_run:
        from launcher.plan import format_report
        from sharding.errors import DataError
        from training.errors import TrainingError

        print(dry_run_text(cfg))
        try:
            print("\n# plan (gptrain plan)\n" + format_report(_plan_report(cfg, args)))
        except (TrainingError, DataError) as exc:  # e.g. the model dir exists only on the cluster
            print(f"\n# plan: not available here ({exc})")
        return 0
    if not args.force:
        from launcher.plan import check_fits

        check_fits(_plan_report(cfg, args))
    return launch(cfg, follow=args.follow)


def _plan_report(cfg, args: argparse.Namespace):  # -> launcher.plan.PlanReport
    from launcher.plan import DEFAULT_MFU, build_report

    if args.gpu_memory_gb is not None and args.gpu_memory_gb <= 0:
        raise UsageError(f"--gpu-memory-gb: must be > 0, got {args.gpu_memory_gb}")
    if not 0 < getattr(args, "mfu", DEFAULT_MFU) <= 1:
        raise UsageError(f"--mfu: must be in (0, 1], got {args.mfu}")
    return build_report(
        cfg,
        args.config,
        gpu=args.gpu,
        gpu_memory_gb=args.gpu_memory_gb,
        peak_tflops=getattr(args, "peak_tflops", None),
        mfu=getattr(args, "mfu", DEFAULT_MFU),
    )


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from launcher.config import load_config
    from launcher.plan import format_report, report_dict

    overrides = list(args.overrides)
    for flag, key in (("nodes", "nodes"), ("gpus_per_node", "nproc_per_node")):
        if getattr(args, flag) is not None:
            overrides.append(f"launch.{key}={getattr(args, flag)}")
    report = _plan_report(load_config(args.config, overrides), args)
    print(json.dumps(report_dict(report), indent=2) if args.json else format_report(report))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from launcher.status import format_summary, list_runs, resolve_target, summary

    if args.target is None:
        runs = list_runs()
        if args.json:
            print(json.dumps(runs))
            return 0
        if not runs:
            print("no runs with a job.json under runs/")
        for s in runs:
            print(
                f"{s['run']:<40} {s['state']:<10} step {s['step']:>7}  loss "
                f"{'-' if s['loss'] is None else format(s['loss'], '.4f')}"
            )
        return 0
    s = summary(resolve_target(args.target))
    print(json.dumps(s) if args.json else format_summary(s))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from launcher.status import failed_rank, show_log

    run_dir = Path(args.run_dir)
    rank = args.rank if args.rank is not None else failed_rank(run_dir)
    show_log(run_dir, rank, args.follow)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from pathlib import Path

    from launcher.status import cancel

    record = cancel(Path(args.run_dir))
    print(f"{args.run_dir}: {record.state}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from training.observe.plot import plot_runs
    from training.run.paths import RunDir

    run = Path(args.run_dir)
    out = plot_runs([run, *map(Path, args.compare)], Path(args.out or RunDir(run).plot))
    print(f"wrote {out}")
    return 0


# --- parser --------------------------------------------------------------------------------

Handler = Callable[[argparse.Namespace], int]


def _commands() -> list[tuple[str, str, Handler, Callable[[argparse.ArgumentParser], None]]]:
    """Each command: name, one-line help, handler, its arguments (launcher.cli_args)."""
    return [
        ("prepare", "tokenize a corpus into checksummed shards", cmd_prepare, A.prepare_args),
        (
            "train",
            "run training in this process (one rank; used by launch)",
            cmd_train,
            A.train_args,
        ),
        (
            "launch",
            "run a config locally under torchrun or as a SLURM job",
            cmd_launch,
            A.launch_args,
        ),
        ("plan", "memory per rank, fit, communication and time of a config", cmd_plan, A.plan_args),
        (
            "status",
            "state, step, loss and ETA of a run (or list recent runs)",
            cmd_status,
            A.status_args,
        ),
        ("logs", "show a rank's log of a run", cmd_logs, A.logs_args),
        ("cancel", "cancel a run's job", cmd_cancel, A.cancel_args),
        (
            "evaluate",
            "loss and perplexity of a run or model on prepared data",
            cmd_evaluate,
            A.evaluate_args,
        ),
        (
            "generate",
            "sample text from a run or an HF model directory",
            cmd_generate,
            A.generate_args,
        ),
        (
            "export",
            "write a run's checkpoint as a plain HF model directory",
            cmd_export,
            A.export_args,
        ),
        ("plot", "loss, perplexity, lr and throughput curves as a PNG", cmd_plot, A.plot_args),
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptrain",
        description="Train and fine-tune GPT models on one CPU or many GPU nodes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `gptrain COMMAND --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_, handler, add_args in _commands():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(handler=handler)
        add_args(p)
    config = sub.add_parser("config", help="show or validate a config", description="Config tools.")
    actions = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    p = actions.add_parser("show", help="print the resolved config as YAML")
    A.config_show_args(p)
    p.set_defaults(handler=cmd_config_show)
    p = actions.add_parser("validate", help="check configs; exit nonzero on the first error")
    A.config_validate_args(p)
    p.set_defaults(handler=cmd_config_validate)
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    from launcher.config import ConfigError
    from launcher.errors import StatusError
    from sharding.errors import DataError
    from training.errors import TrainingError

    return (ConfigError, DataError, TrainingError, UsageError, LaunchError, StatusError)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, dispatch, and turn user errors into one line + exit 2."""
    args = build_parser().parse_args(argv)
    from training.observe.logs import quiet_libraries

    quiet_libraries()
    try:
        return args.handler(args)
    except _user_errors() as exc:
        print(f"gptrain {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptrain: interrupted", file=sys.stderr)
        return 130


def main_exit() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
