"""Run records read from MLflow: every finished run of an experiment, as the records the text export writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from fl_sparse.core.errors import ConfigError
from fl_sparse.reporting.records import (
    COMMIT_TAGS,
    CONFIG_ARTIFACTS,
    FORMAT_VERSION,
    RunRecord,
    export_name,
    unique_names,
    utc,
)

# Reading a run's config artifact would otherwise draw a progress bar in the middle of the caller's own.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

STUDY_PARENT_TAG = "fl_sparse.study"  # set on a study's parent run, which holds no rounds of its own


def from_mlflow(uri: str, experiment_name: str) -> list[RunRecord]:
    """Every finished run of the experiment, as records (no files written)."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise ConfigError(f"no MLflow experiment {experiment_name!r} at {uri}; pass --tracking-uri / --experiment-name")
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'", max_results=5000)
    records = [record_of(client, run, experiment_name) for run in runs if STUDY_PARENT_TAG not in run.data.tags]
    if not records:
        raise ConfigError(f"no finished runs in MLflow experiment {experiment_name!r} at {uri}")
    return unique_names(records)


def run_record(uri: str, run_id: str, extra: dict | None = None) -> RunRecord:
    """One run as a record, with ``extra`` identity fields added (a study trial's group and key)."""
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    record = record_of(client, run, client.get_experiment(run.info.experiment_id).name)
    record.info.update(extra or {})
    return record


def record_of(client: MlflowClient, run, experiment_name: str) -> RunRecord:
    metrics: dict[str, dict[int, float]] = {}
    logged_ms: dict[int, int] = {}
    for key in sorted(run.data.metrics):
        # Oldest first, so that a round replayed after a resume keeps the value logged last.
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.timestamp)
        metrics[key] = {int(m.step): float(m.value) for m in history}
        if key == "cumulative_gb":  # logged every round
            logged_ms = {int(m.step): int(m.timestamp) for m in history}
    params, tags = run.data.params, run.data.tags
    info = {
        "format": FORMAT_VERSION, "run_id": run.info.run_id, "run_name": run.info.run_name,
        "experiment": experiment_name, "algorithm": tags.get("algorithm", "?"), "presets": tags.get("presets", ""),
        "data": tags.get("data", ""), "seed": params.get("Experiment.seed", "0"), "status": run.info.status,
        "start_ms": run.info.start_time, "end_ms": run.info.end_time, "start_utc": utc(run.info.start_time),
        "end_utc": utc(run.info.end_time),
        "commit": next((tags[t] for t in COMMIT_TAGS if t in tags), None),
        "params": dict(sorted(params.items())),
    }
    return RunRecord(export_name(info), info, metrics, logged_ms, _config_text(client, run.info.run_id))


def _config_text(client, run_id: str) -> str:
    available = {item.path for item in client.list_artifacts(run_id)}
    for artifact in CONFIG_ARTIFACTS:
        if artifact in available:
            with tempfile.TemporaryDirectory() as tmp:
                return Path(client.download_artifacts(run_id, artifact, tmp)).read_text()
    return ""
