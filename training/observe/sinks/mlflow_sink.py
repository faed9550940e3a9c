"""MLflow (`tracking.mlflow`): one MLflow run per run dir, through `MlflowClient` (no
global active run, so nothing else in the process is affected).

The run's id is kept in `RUN_DIR/mlflow_run_id`; every resume and requeue sets that run
RUNNING again and logs into it. Params: the resolved config, flattened to dotted keys, and
the parameter counts; an attempt adds the params its config has new (MLflow never changes
a param's value: the first attempt's stay). Metrics: the tracker names (`train/loss`, …)
with their step. MLflow's history is append-only: the points an interrupted attempt logged
past its checkpoint stay (metrics.jsonl and TensorBoard drop them).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sharding.atomic import atomic_write
from training.config import MlflowConfig
from training.errors import first_line
from training.observe.sinks import RunInfo, metric_name, numeric_metrics
from training.run.paths import RunDir

log = logging.getLogger("gptrain")

# Without a tracking URI: a file store in the run dir (`RunDir.mlruns`; `mlflow ui
# --backend-store-uri RUN_DIR/mlruns`). A `file:` store is the one local store
# mlflow-skinny can write with no server: `sqlite:` needs SQLAlchemy and alembic, which
# only the full `mlflow` brings.
PARAM_VALUE_CHARS = 500  # older MLflow servers take no more; the whole config: config.yaml
PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch
TAG_VALUE_CHARS = 5000
# The run's end state when an event of this kind was the last word (else FINISHED).
END_STATUS = {"failure": "FAILED", "requeue": "KILLED"}


def tracking_uri(cfg: MlflowConfig, run_dir: RunDir, environ: Mapping[str, str]) -> str:
    """`tracking.mlflow.tracking_uri`, else $MLFLOW_TRACKING_URI, else RUN_DIR/mlruns."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if environ.get("MLFLOW_TRACKING_URI"):
        return environ["MLFLOW_TRACKING_URI"]
    return run_dir.mlruns.resolve().as_uri()


def is_file_store(uri: str) -> bool:
    """A `file:` URI or a plain path: what MLflow opens as a file store."""
    return urlparse(uri).scheme in ("", "file")


def flat_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys, values as text (JSON for
    non-strings) cut to PARAM_VALUE_CHARS; characters MLflow refuses in a key become _."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = re.sub(r"[^\w\-. /:]", "_", f"{prefix}{key}")
        if isinstance(value, Mapping) and value:
            out.update(flat_params(value, f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        out[name] = text[:PARAM_VALUE_CHARS]
    return out


class MlflowSink:
    """An MLflow run: config and parameter counts as params, metrics with their step,
    events as the `gptrain.event` tag; FINISHED at the end (FAILED after a failure,
    KILLED when stopped for a requeue)."""

    name = "mlflow"

    def __init__(self, cfg: MlflowConfig, info: RunInfo) -> None:
        uri = tracking_uri(cfg, info.run_dir, os.environ)
        if is_file_store(uri):
            # MLflow 3 refuses file stores unless opted in: they are in "maintenance mode"
            # but work, and are what mlflow-skinny can write locally. A user's own
            # MLFLOW_ALLOW_FILE_STORE wins.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        try:
            self.client = MlflowClient(tracking_uri=uri)
        except ImportError as exc:  # e.g. sqlite: with mlflow-skinny
            raise RuntimeError(
                f"{first_line(exc)} (a sqlite: store needs the full mlflow package)"
            ) from exc
        self.status = "FINISHED"
        run = self._resumed_run(info.run_dir)
        if run is None:
            run = self.client.create_run(
                self._experiment_id(cfg.experiment),
                run_name=cfg.run_name or info.name,
                tags={"gptrain.run_dir": str(info.run_dir.root.resolve())},
            )
            atomic_write(info.run_dir.mlflow_id_file, run.info.run_id)
            log.info("MLflow run %s (experiment %s)", run.info.run_id, cfg.experiment)
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
            log.info("MLflow run %s continued", run.info.run_id)
        self.run_id: str = run.info.run_id
        self._log_params(
            {
                **flat_params(info.config),
                **{metric_name(k): str(v) for k, v in info.params.items()},
            },
            dict(run.data.params),
        )

    def _resumed_run(self, run_dir: RunDir) -> Any:
        """The run named by RUN_DIR/mlflow_run_id, if this store has it (not deleted)."""
        path: Path = run_dir.mlflow_id_file
        if not path.is_file():
            return None
        from mlflow.exceptions import MlflowException

        run_id = path.read_text().strip()
        try:
            run = self.client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            run = None
        if run is None or run.info.lifecycle_stage == "deleted":
            log.warning(
                "tracking.mlflow: run %s (%s) is not in this tracking store; starting a new run",
                run_id,
                path,
            )
            return None
        return run

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return self.client.create_experiment(name)
            except MlflowException:  # another run created it meanwhile
                experiment = self.client.get_experiment_by_name(name)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            raise RuntimeError(
                f"experiment {name!r} is deleted; restore it (mlflow experiments restore) "
                "or set tracking.mlflow.experiment"
            )
        return experiment.experiment_id

    def _log_params(self, params: dict[str, str], existing: dict[str, str]) -> None:
        """The params the run lacks; ones it has with another value stay as they are."""
        from mlflow.entities import Param

        changed = [k for k, v in params.items() if k in existing and existing[k] != v]
        if changed:
            log.info(
                "tracking.mlflow: %d config value(s) differ from the run's first attempt "
                "(e.g. %s); MLflow keeps the first (this attempt's: RUN_DIR/config.yaml)",
                len(changed),
                changed[0],
            )
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=new[i : i + PARAMS_PER_BATCH])

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        batch = [Metric(k, v, now_ms, step) for k, v in numeric_metrics(metrics).items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def alert(self, kind: str, message: str, level: str) -> None:
        self.status = END_STATUS.get(kind, self.status)
        text = f"{level} {kind}: {message}"[:TAG_VALUE_CHARS]
        self.client.set_tag(self.run_id, "gptrain.event", text)

    def finish(self) -> None:
        self.client.set_terminated(self.run_id, status=self.status)
