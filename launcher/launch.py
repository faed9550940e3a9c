"""`gptrain launch`: check one config here, then run it on its backend
(`launch.backend`, see `launcher.backends`).

    gptrain launch configs/demo-cpu.yaml --backend local --nproc-per-node 2
    gptrain launch configs/gpt2-xl-zero3-multinode.yaml --dry-run

The resolved config is written to the run dir (`RunDir.launch_config`) and every rank
runs `gptrain train` on it, so what runs is exactly what `--dry-run` shows.
"""

from __future__ import annotations

import dataclasses
import json

from launcher.backends import backend
from launcher.config import Config, LaunchConfig, batch_layout, dump_yaml


def world_layout(launch: LaunchConfig) -> list[str]:
    """Human-readable rank placement, one line per node."""
    n = launch.nproc_per_node
    return [f"node {i}: ranks {i * n}-{i * n + n - 1}" for i in range(launch.nodes)]


def dry_run_text(cfg: Config) -> str:
    """Everything `launch` would do, without doing it."""
    from training.parallel.ds_config import build_deepspeed_config

    layout = cfg.batch_layout()
    launch = cfg.launch
    lines = ["# resolved config", dump_yaml(cfg).rstrip(), "", "# DeepSpeed config"]
    lines.append(json.dumps(build_deepspeed_config(cfg.deepspeed, cfg.train, layout), indent=2))
    lines += [
        "",
        f"# world: {launch.nodes} node(s) × {launch.nproc_per_node} = {launch.world_size} ranks; "
        f"global batch {layout.global_batch_size} = micro {layout.micro_batch_size} × "
        f"accum {layout.grad_accum_steps} × {layout.data_parallel_size}",
        *(f"#   {line}" for line in world_layout(launch)),
    ]
    return "\n".join([*lines, "", *backend(launch.backend).preview(cfg)])


def preflight(cfg: Config) -> None:
    """What a launch checks here before any rank starts (or sbatch is called); each problem
    one line naming the key: the batch arithmetic for this world size, every data source's
    manifest, tokenizer and shard sizes (`sharding.loader.open_sources`, as the loader
    does), the pretrained model dir, and that model and data agree.
    Each check is the function its package owns, the one the ranks call too."""
    from sharding.loader import open_sources
    from training.models.build import check_tokenizer, load_hf_config, pretrained_config_file

    batch_layout(cfg)
    # manifests, tokenizers, shard sizes, seq_len vs the data; hashing (data.verify): ranks
    manifests, _ = open_sources(dataclasses.replace(cfg.data, verify=False))
    pretrained_config_file(cfg.model)  # before transformers is imported for the rest
    first = manifests[0]
    load_hf_config(
        cfg.model, vocab_size=first.vocab_size, eos_id=first.eos_id, seq_len=cfg.data.seq_len
    )
    check_tokenizer(cfg.model, first.tokenizer_dir)


def launch(cfg: Config, follow: bool = False) -> int:
    """Check the inputs (`preflight`), then run or submit the config on its backend;
    returns the exit code."""
    runner = backend(cfg.launch.backend)
    runner.check(cfg.launch)
    preflight(cfg)
    return runner.launch(cfg, follow=follow)
