"""TensorBoard and MLflow on 2 CPU ranks across a stop + resume: one TensorBoard dir and
one MLflow run (a `file:` store) hold `train/loss` at every step, once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.conftest import check, tiny_config, torchrun
from training.run.paths import RunDir

pytestmark = pytest.mark.dist


def test_tensorboard_and_mlflow_continue_across_a_resume(
    tmp_path: Path, prepared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # this process reads the store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = (tmp_path / "mlruns").as_uri()
    config = tiny_config(
        tmp_path,
        prepared,
        train={"max_steps": 8, "save_every": 100, "eval_every": 100},
        tracking={
            "tensorboard": {"enabled": True},
            "mlflow": {"tracking_uri": uri, "experiment": "gptrain-test"},
        },
    )
    stopped = torchrun(2, config, env={"GPTRAIN_FAULT_SIGNAL_AT_STEP": "1:4"})
    assert stopped.returncode != 0
    run = RunDir(tmp_path / "run")
    run_id = run.mlflow_id_file.read_text().strip()
    client = MlflowClient(tracking_uri=uri)
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 4]

    check(torchrun(2, config))
    assert run.mlflow_id_file.read_text().strip() == run_id, "resume continues the MLflow run"
    steps = list(range(1, 9))
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == steps, "every step once"
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert int(mlflow_run.data.params["params/total"]) > 0
    assert "checkpoint/save_s" in mlflow_run.data.metrics
    experiment = client.get_experiment_by_name("gptrain-test")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]

    acc = EventAccumulator(str(run.tensorboard))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == steps
    assert [e.step for e in acc.Scalars("eval/loss")] == [8]
    assert len(list(run.tensorboard.glob("events.out.tfevents.*"))) == 2  # one dir, 2 attempts
