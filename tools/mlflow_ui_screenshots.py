"""Screenshots of MLflow's UI on a store of fl_sparse runs, for docs/images (see docs/mlflow_ui.md).

    .venv/bin/python tools/mlflow_ui_screenshots.py --tracking-uri sqlite:////tmp/demo/mlflow.db --out docs/images

Serves the store as ``fl-sparse ui`` does, opens the URLs it prints in headless Chromium (the DevTools
client of the browser test, tests/devtools.py), closes the assistant panel and the shared-view notice,
and saves the runs list and the accuracy-vs-cumulative-GB chart view. Needs the ``server`` extra and chromium.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # devtools.py lives with the test that it was written for

from devtools import Chromium  # noqa: E402

from fl_sparse.tracking import links, ui  # noqa: E402

# Close the assistant side panel and the "You're viewing a shared view" notice: both are dismissable
# and take a third of the page; what is left is MLflow's page as a user sees it after one click each.
CLOSE_PANELS = """(() => {
  const closers = [...document.querySelectorAll('button')].filter(b =>
    b.dataset.componentId === 'mlflow.experiment_page.shared_view.dismiss'
    || (b.getAttribute('aria-label') === 'Close'
        && (b.parentElement?.parentElement?.parentElement?.innerText || '').includes('MLflow Assistant')));
  closers.forEach(b => b.click());
  return closers.length;
})()"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", required=True, help="the store to show, e.g. sqlite:////tmp/mlflow.db")
    parser.add_argument("--experiment-name", default="fl_sparse")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args(argv)
    from mlflow import MlflowClient

    experiment = MlflowClient(args.tracking_uri).get_experiment_by_name(args.experiment_name)
    links.tag_experiment(MlflowClient(args.tracking_uri), experiment.experiment_id)
    with socket.socket() as probe:
        probe.bind((links.HOST, 0))
        port = probe.getsockname()[1]
    server = ui.start_server(args.tracking_uri, port)
    browser = None
    try:
        ui.wait_until_ready(server, port)
        base = f"http://{links.HOST}:{port}"
        browser = Chromium(Path(tempfile.mkdtemp()) / "profile", width=1500, height=960)
        page = browser.page
        args.out.mkdir(parents=True, exist_ok=True)
        for name, url, ready in [
            ("mlflow_runs_list.png", links.runs_url(base, experiment.experiment_id),
             "document.body.innerText.includes('matching run')"),
            ("mlflow_accuracy_vs_gb.png", links.runs_url(base, experiment.experiment_id, charts=True),
             "document.querySelectorAll('.xtitle').length >= 2"),
        ]:
            page.open(url)
            page.wait_for(ready, 120, name)
            time.sleep(2)
            page.evaluate(CLOSE_PANELS)
            time.sleep(3)  # let the charts lay out again in the freed width
            print(page.screenshot(args.out / name))
    finally:
        if browser is not None:
            browser.close()
        ui.stop_server(server)


if __name__ == "__main__":
    main()
