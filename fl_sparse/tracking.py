"""Run callbacks: MLflow tracking and the terminal progress bar."""

from __future__ import annotations

import math
import os
from pathlib import Path

from fl_sparse.engine import RoundEvent

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri(cli_value: str | None) -> str:
    """--tracking-uri wins, then MLFLOW_TRACKING_URI, then a sqlite file in the working directory.

    A relative sqlite path is made absolute: MLflow caches stores by URI, so a relative one would keep
    pointing at the first working directory it was used from."""
    uri = cli_value or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


class MlflowTracker:
    """Logs one run: every gin binding as a param, the operative config as an artifact, and the
    per-round metrics. Evaluation metrics are logged only in the rounds where they were computed."""

    def __init__(self, uri: str, experiment_name: str, run_name: str, resume_run_id: str | None = None):
        import logging

        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # keep the terminal to the progress bar
        self.mlflow = mlflow
        mlflow.set_tracking_uri(uri)
        if resume_run_id:  # continue the interrupted run; rounds after its checkpoint are logged again
            self.run = mlflow.start_run(run_id=resume_run_id)
        else:
            mlflow.set_experiment(experiment_name)
            self.run = mlflow.start_run(run_name=run_name)
        self.run_id = self.run.info.run_id

    def log_config(self, params: dict[str, str], config_text: str, tags: dict[str, str]) -> None:
        items = list(params.items())
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.mlflow.log_params(dict(items[start:start + 100]))
        self.mlflow.log_text(config_text, "config.gin")
        self.mlflow.set_tags(tags)

    def __call__(self, event: RoundEvent) -> None:
        finite = {key: value for key, value in event.metrics.items() if math.isfinite(value)}
        self.mlflow.log_metrics(finite, step=event.round)

    def finish(self, operative_config: str, status: str = "FINISHED") -> None:
        self.mlflow.log_text(operative_config, "operative_config.gin")
        self.mlflow.end_run(status=status)

    def how_to_open(self, uri: str) -> str:
        experiment_id = self.run.info.experiment_id
        store = uri if uri.startswith(("sqlite:", "http:", "https:", "postgresql:", "mysql:")) else Path(uri).as_uri()
        return (f"MLflow run {self.run_id}\n  open it: mlflow ui --backend-store-uri {store}  "
                f"(pip install 'fl-sparse[server]'), then http://127.0.0.1:5000/#/experiments/"
                f"{experiment_id}/runs/{self.run_id}")


class ProgressBar:
    """A tqdm bar showing round, last evaluated accuracy and cumulative GB."""

    def __init__(self, total_rounds: int, start_round: int = 0):
        from tqdm import tqdm

        self.bar = tqdm(total=total_rounds, initial=start_round, unit="round", dynamic_ncols=True)
        self.accuracy = float("nan")

    def __call__(self, event: RoundEvent) -> None:
        if event.evaluated:
            self.accuracy = event.metrics["test_accuracy"]
        self.bar.set_postfix(acc=f"{self.accuracy:.3f}", GB=f"{event.metrics['cumulative_gb']:.4f}",
                             density=f"{event.metrics['density']:.3f}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
