"""What makes MLflow's UI open fl_sparse runs as model training, and the URLs of runs and charts (see
:mod:`fl_sparse.tracking.ui` for why). Shared by the tracker, which tags every experiment it logs to, and by
``fl-sparse ui``."""

from __future__ import annotations

import json

HOST = "127.0.0.1"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
CHART_VIEW_KEY = "fl_sparse_accuracy_vs_gb"
CHART_VIEW = {"globalLineChartConfig": {"xAxisKey": "metric", "selectedXAxisMetricKey": "cumulative_gb",
                                        "lineSmoothness": 0},
              "chartsSearchFilter": "accuracy"}


def experiment_tags() -> dict[str, str]:
    """The experiment tags that make the UI open an experiment as model training, with the chart view."""
    return {EXPERIMENT_KIND_TAG: MODEL_TRAINING, f"mlflow.sharedViewState.{CHART_VIEW_KEY}": json.dumps(CHART_VIEW)}


def tag_experiment(client, experiment_id: str) -> None:
    """Set :func:`experiment_tags` that the experiment lacks (a kind chosen in the UI is kept)."""
    present = client.get_experiment(experiment_id).tags
    for key, value in experiment_tags().items():
        if key not in present:
            client.set_experiment_tag(experiment_id, key, value)


def runs_url(base: str, experiment_id: str, charts: bool = False) -> str:
    """The experiment's runs list (``charts``: its accuracy charts against cumulative GB)."""
    query = "workflowType=machine_learning"
    if charts:
        query += f"&compareRunsMode=CHART&viewStateShareKey={CHART_VIEW_KEY}"
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """One run's page; its "Model metrics" tab charts every metric."""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics?workflowType=machine_learning"
