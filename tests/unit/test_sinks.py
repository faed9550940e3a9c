"""Metric sinks (training.observe.sinks) with the real libraries, read back with their
own readers: TensorBoard's event accumulator, MLflow's client on a `file:` store, and
metrics.jsonl; resume continues the same TensorBoard dir and MLflow run; a failing sink is
dropped with one warning while the others keep every step. No DeepSpeed."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import pytest

from training.config import MlflowConfig, TensorBoardConfig, TrackingConfig
from training.observe.events import Events
from training.observe.metrics import read_metrics
from training.observe.sinks import Metrics, RunInfo, metric_name, numeric_metrics
from training.observe.sinks.mlflow_sink import MlflowSink, flat_params
from training.run.paths import RunDir
from training.typed import from_data

CONFIG = {
    "run": {"dir": "runs/x", "name": None, "seed": 7},
    "train": {"max_steps": 8, "learning_rate": 3e-3, "resume": "auto"},
    "data": {"sources": [{"path": "/data/a", "weight": 1.0}]},
    "deepspeed": {"zero_stage": 2, "extra": {}},
}
PARAMS = {"params_trainable": 1000, "params_total": 4000}


@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MLflow setting of the machine leaks in; what the sink sets is undone after."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)


def store_uri(tmp_path: Path) -> str:
    return (tmp_path / "mlruns").as_uri()


def tracking(tmp_path: Path, **mlflow: Any) -> TrackingConfig:
    return TrackingConfig(
        tensorboard=TensorBoardConfig(enabled=True),
        mlflow=MlflowConfig(tracking_uri=store_uri(tmp_path), **mlflow),
    )


def start(
    tmp_path: Path, resume_step: int | None = None, cfg: TrackingConfig | None = None, **config
) -> Metrics:
    info = RunInfo(
        run_dir=RunDir(tmp_path / "run"),
        name="tiny",
        config={**CONFIG, **config},
        resume_step=resume_step,
        params=PARAMS,
    )
    return Metrics(cfg or tracking(tmp_path), info, rank=0)


def loss_at(step: int, attempt: int = 1) -> float:
    return 5.0 - 0.1 * step + (100.0 if attempt == 2 else 0.0)


def train(metrics: Metrics, steps: range, attempt: int = 1, checkpoints: tuple = ()) -> None:
    """What the trainer logs: a train window per step, eval and a checkpoint where due."""
    for step in steps:
        metrics.log(
            step,
            {"loss": loss_at(step, attempt), "lr": 1e-3, "mfu": None, "grad_norm": math.nan},
        )
        if step in checkpoints:
            metrics.log(step, {"eval_loss": 3.0, "eval_ppl": math.exp(3.0)})
            metrics.log(step, {"checkpoint_s": 0.5})


def tb_scalars(tmp_path: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(RunDir(tmp_path / "run").tensorboard))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def mlflow_run(tmp_path: Path) -> tuple[Any, Any]:
    """(client, run) of the run named by RUN_DIR/mlflow_run_id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store_uri(tmp_path))
    run_id = RunDir(tmp_path / "run").mlflow_id_file.read_text().strip()
    return client, client.get_run(run_id)


def mlflow_history(tmp_path: Path, key: str) -> list[tuple[int, float]]:
    client, run = mlflow_run(tmp_path)
    points = client.get_metric_history(run.info.run_id, key)
    return [(m.step, m.value) for m in sorted(points, key=lambda m: (m.step, m.timestamp))]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_metric_names_namespace_the_flat_keys() -> None:
    assert metric_name("loss") == "train/loss"
    assert metric_name("tokens_per_s") == "train/tokens_per_s"
    assert metric_name("eval_loss") == "eval/loss"
    assert metric_name("eval_ppl") == "eval/ppl"
    assert metric_name("checkpoint_s") == "checkpoint/save_s"
    assert metric_name("params_trainable") == "params/trainable"
    values = numeric_metrics({"loss": 2, "mfu": None, "note": "x", "grad_norm": math.nan})
    assert list(values) == ["train/loss", "train/grad_norm"] and values["train/loss"] == 2.0


def test_each_sink_writes_what_its_own_reader_reads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gptrain")
    metrics = start(tmp_path)
    assert metrics.names == ["jsonl", "tensorboard", "mlflow"]
    train(metrics, range(1, 7), checkpoints=(3, 6))
    metrics.finish()
    assert not warnings_of(caplog)
    assert "parameters: 1,000 trainable of 4,000 (25.00%)" in caplog.text

    steps = list(range(1, 7))
    assert tb_scalars(tmp_path, "train/loss") == [(s, pytest.approx(loss_at(s))) for s in steps]
    assert [s for s, _ in tb_scalars(tmp_path, "eval/loss")] == [3, 6]
    assert [s for s, _ in tb_scalars(tmp_path, "checkpoint/save_s")] == [3, 6]
    assert tb_scalars(tmp_path, "params/total") == [(0, 4000.0)]

    assert mlflow_history(tmp_path, "train/loss") == [(s, pytest.approx(loss_at(s))) for s in steps]
    assert [s for s, _ in mlflow_history(tmp_path, "eval/ppl")] == [3, 6]
    assert all(math.isnan(v) for _, v in mlflow_history(tmp_path, "train/grad_norm"))
    _, run = mlflow_run(tmp_path)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    params = run.data.params
    assert params["train.max_steps"] == "8" and params["params/total"] == "4000"
    assert params["data.sources"] == '[{"path": "/data/a", "weight": 1.0}]'
    assert params["run.name"] == "null"
    assert "train/mfu" not in run.data.metrics  # None: not a number, not logged

    records = read_metrics(RunDir(tmp_path / "run").metrics)  # the flat on-disk format
    assert records[0] == {"step": 0, **PARAMS}
    first = records[1]
    assert sorted(first) == ["grad_norm", "loss", "lr", "mfu", "step"]
    assert (first["step"], first["loss"], first["mfu"]) == (1, loss_at(1), None)
    assert [r["step"] for r in records if "loss" in r] == steps
    assert [r["step"] for r in records if "checkpoint_s" in r] == [3, 6]


def test_resume_continues_the_same_tensorboard_dir_and_mlflow_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = start(tmp_path)
    train(first, range(1, 5), checkpoints=(4,))
    first.finish()  # stopped after saving step 4
    run_id = RunDir(tmp_path / "run").mlflow_id_file.read_text().strip()
    time.sleep(1.1)  # event file names hold seconds: the resumed attempt's sorts after
    second = start(tmp_path, resume_step=4, train={**CONFIG["train"], "max_steps": 12})
    assert second.names == ["jsonl", "tensorboard", "mlflow"]  # a changed param is no error
    _, run = mlflow_run(tmp_path)
    assert run.info.run_id == run_id and run.info.status == "RUNNING"
    train(second, range(5, 9))
    second.finish()
    assert not warnings_of(caplog)

    steps = list(range(1, 9))
    assert [s for s, _ in tb_scalars(tmp_path, "train/loss")] == steps
    assert len(list(RunDir(tmp_path / "run").tensorboard.iterdir())) == 2  # one dir, 2 files
    assert [s for s, _ in mlflow_history(tmp_path, "train/loss")] == steps
    client, run = mlflow_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "8"  # MLflow keeps a param's first value
    runs = client.search_runs([run.info.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]


def test_steps_past_the_resumed_checkpoint_are_replaced(tmp_path: Path) -> None:
    first = start(tmp_path)
    train(first, range(1, 7), checkpoints=(4,))
    first.finish()  # the attempt died after step 6; the last checkpoint is step 4
    time.sleep(1.1)
    second = start(tmp_path, resume_step=4)
    train(second, range(5, 9), attempt=2)
    second.finish()

    expected = [(s, pytest.approx(loss_at(s, 1 if s <= 4 else 2))) for s in range(1, 9)]
    assert tb_scalars(tmp_path, "train/loss") == expected  # purged: 5 and 6 of attempt 1
    records = read_metrics(RunDir(tmp_path / "run").metrics)
    assert [(r["step"], pytest.approx(r["loss"])) for r in records if "loss" in r] == expected
    # MLflow's history is append-only: attempt 1's points of 5 and 6 stay, then attempt 2's
    history = mlflow_history(tmp_path, "train/loss")
    assert [s for s, _ in history] == [1, 2, 3, 4, 5, 5, 6, 6, 7, 8]
    assert history[4:8] == [
        (5, pytest.approx(loss_at(5))),
        (5, pytest.approx(loss_at(5, 2))),
        (6, pytest.approx(loss_at(6))),
        (6, pytest.approx(loss_at(6, 2))),
    ]


def test_a_sink_raising_mid_run_warns_once_and_the_others_keep_every_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_log = MlflowSink.log

    def flaky(self: MlflowSink, step: int, metrics: Any) -> None:
        if step >= 3:
            raise ConnectionError("tracking server went away\n(details)")
        real_log(self, step, metrics)

    monkeypatch.setattr(MlflowSink, "log", flaky)
    metrics = start(tmp_path)
    train(metrics, range(1, 9), checkpoints=(4, 8))
    metrics.alert("completed", "done", "INFO")
    metrics.finish()

    assert warnings_of(caplog) == [
        "tracking.mlflow: tracking server went away; continuing without it"
    ]
    steps = list(range(1, 9))
    assert [s for s, _ in tb_scalars(tmp_path, "train/loss")] == steps
    records = read_metrics(RunDir(tmp_path / "run").metrics)
    assert [r["step"] for r in records if "loss" in r] == steps
    assert [s for s, _ in mlflow_history(tmp_path, "train/loss")] == [1, 2]


def test_a_sink_failing_to_start_is_dropped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    cfg = TrackingConfig(tensorboard=TensorBoardConfig(enabled=True, dir=str(blocker)))
    metrics = start(tmp_path, cfg=cfg)
    assert metrics.names == ["jsonl"]
    train(metrics, range(1, 4))
    metrics.finish()
    (warning,) = warnings_of(caplog)
    assert warning.startswith("tracking.tensorboard: ") and "continuing without it" in warning
    records = read_metrics(RunDir(tmp_path / "run").metrics)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]


def test_only_rank_0_tracks(tmp_path: Path) -> None:
    info = RunInfo(RunDir(tmp_path / "run"), "tiny", CONFIG, None, PARAMS)
    metrics = Metrics(tracking(tmp_path), info, rank=1)
    train(metrics, range(1, 3))
    metrics.alert("failure", "boom", "ERROR")
    metrics.finish()
    assert metrics.names == [] and not (tmp_path / "run").exists()


def test_events_alert_through_the_sinks_rate_limited(tmp_path: Path) -> None:
    metrics = start(tmp_path)
    events = Events(tmp_path / "run", 0, metrics)
    train(metrics, range(1, 3))
    events.emit("failure", "step 2: out of memory", step=2)
    events.emit("failure", "again", step=2)  # within the interval: events.jsonl only
    metrics.finish()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(RunDir(tmp_path / "run").tensorboard))
    acc.Reload()
    texts = acc.Tensors("events/failure/text_summary")
    assert len(texts) == 1 and texts[0].step == 2
    assert b"out of memory" in texts[0].tensor_proto.string_val[0]
    _, run = mlflow_run(tmp_path)
    assert run.info.status == "FAILED"
    assert run.data.tags["gptrain.event"] == "ERROR failure: step 2: out of memory"
    assert len(RunDir(tmp_path / "run").events.read_text().splitlines()) == 2


def test_mlflow_starts_a_new_run_when_the_store_lacks_the_recorded_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    id_file = RunDir(tmp_path / "run").mlflow_id_file
    id_file.parent.mkdir(parents=True)
    id_file.write_text("0123456789abcdef0123456789abcdef")
    metrics = start(tmp_path, resume_step=4)
    metrics.finish()
    assert metrics.names == []
    assert id_file.read_text() != "0123456789abcdef0123456789abcdef"
    assert "is not in this tracking store; starting a new run" in caplog.text


def test_mlflow_without_a_uri_uses_a_file_store_in_the_run_dir(tmp_path: Path) -> None:
    cfg = TrackingConfig(mlflow=MlflowConfig(enabled=True))
    metrics = start(tmp_path, cfg=cfg)
    train(metrics, range(1, 3))
    metrics.finish()
    assert metrics.names == []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(tmp_path / "run" / "mlruns").as_uri())
    run_id = RunDir(tmp_path / "run").mlflow_id_file.read_text().strip()
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2]


def test_flat_params_are_dotted_and_cut() -> None:
    params = flat_params({"a": {"b": 1, "c": {"d": True}}, "e": "x" * 600, "f": {}, "g h!": 2})
    assert params == {"a.b": "1", "a.c.d": "true", "e": "x" * 500, "f": "{}", "g h_": "2"}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"mlflow": {"experiment": " "}}, "tracking.mlflow.experiment: must not be empty"),
        ({"mlflow": {"tracking_uri": ""}}, "tracking.mlflow.tracking_uri: must not be empty"),
        ({"tensorboard": {"dir": ""}}, "tracking.tensorboard.dir: must not be empty"),
        ({"tensorboard": {"enabld": True}}, "tracking.tensorboard.enabld: unknown key"),
    ],
)
def test_config_errors_name_the_dotted_key(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_data(TrackingConfig, data, "tracking")


def test_mlflow_is_on_when_enabled_or_given_a_uri() -> None:
    assert not MlflowConfig().on
    assert MlflowConfig(enabled=True).on
    assert MlflowConfig(tracking_uri="http://mlflow:5000").on
