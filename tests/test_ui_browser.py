"""``fl-sparse ui`` end to end: MLflow's server for a store, two runs logged into it over HTTP, and the UI in a
real headless Chromium (driven over the DevTools protocol: see ``devtools.py`` for why not selenium).

What is checked is read from the DOM, not from pixels: both run names in the runs list, the accuracy
charts against ``cumulative_gb`` in the chart view the printed URL opens, and the ``test_accuracy`` chart
(a line drawn through both rounds, with the run's legend) on one run's metrics page. Screenshots go into
the test's tmp directory. Ctrl-C (SIGINT) then stops ``fl-sparse ui`` with exit code 0 and leaves no
process of the server's group alive. Skips, with the reason, where Chromium or the ``server`` extra is absent.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from devtools import Chromium, chromium_binary

from fl_sparse.cli.main import main
from fl_sparse.core.errors import FlSparseError
from fl_sparse.tracking import links, ui

try:
    ui.require_server()
    SERVER_MISSING = None
except FlSparseError as error:
    SERVER_MISSING = str(error)

pytestmark = pytest.mark.skipif(SERVER_MISSING is not None, reason=f"{SERVER_MISSING}")
RUNS = [("fedavg", "fedavg s=0 seed=0"), ("pffdst", "pffdst s=0.8 seed=0")]
FAST = ["--rounds", "2", "--bind", "Experiment.local_epochs=1", "--bind", "Experiment.num_clients=10",
        "--bind", "Experiment.clients_per_round=2"]
EXPERIMENT = "browser"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((links.HOST, 0))
        return probe.getsockname()[1]


def live_members(group: int) -> list[int]:
    """Processes of the process group that are not zombies (a zombie has exited; only its parent's wait
    is missing), from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``fl-sparse ui`` on a fresh store (a subprocess in its own session), with the two runs logged into
    the server it started. Yields (process, server pid, base URL, experiment id, {run name: run id})."""
    folder = tmp_path_factory.mktemp("ui")
    store = f"sqlite:///{folder / 'mlflow.db'}"
    from mlflow import MlflowClient

    MlflowClient(store).search_experiments()  # creates the store: fl-sparse ui serves existing stores only
    port = free_port()
    log = open(folder / "ui.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "fl_sparse.cli", "ui", "--tracking-uri", store, "--port",
                                str(port), "--experiment-name", EXPERIMENT], cwd=folder, stdout=subprocess.PIPE,
                               stderr=log, text=True, start_new_session=True)
    server_pid = None
    try:
        first = process.stdout.readline()  # printed once the server answers on /health
        match = re.search(r"\(server pid (\d+)\)", first)
        assert match, f"fl-sparse ui printed {first!r}; its log: {(folder / 'ui.log').read_text()[-2000:]}"
        server_pid = int(match.group(1))
        assert f"no experiment '{EXPERIMENT}'" in process.stdout.readline()
        base = f"http://{links.HOST}:{port}"
        for algorithm, _ in RUNS:  # in this process: one import of torch for both runs
            assert main(["run", algorithm, *FAST, "--tracking-uri", base, "--experiment-name", EXPERIMENT]) == 0
        client = MlflowClient(base)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        run_ids = {run.info.run_name: run.info.run_id for run in client.search_runs([experiment.experiment_id])}
        yield process, server_pid, base, experiment.experiment_id, run_ids
    finally:
        if process.poll() is None:  # the Ctrl-C test did not run or failed: end what this fixture started
            process.send_signal(signal.SIGINT)  # fl-sparse ui stops its server at any point after it starts it
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if server_pid is not None and live_members(server_pid):
            os.killpg(server_pid, signal.SIGKILL)
        log.close()


@pytest.mark.skipif(chromium_binary() is None, reason="chromium is absent: apt-get install chromium (.ci/run "
                                                     "installs it) to run the browser test")
def test_runs_list_chart_view_and_run_page_in_chromium(served, tmp_path):
    _, _, base, experiment_id, run_ids = served
    assert {name for _, name in RUNS} <= set(run_ids), run_ids
    browser = Chromium(tmp_path / "profile")
    try:
        page = browser.page
        page.open(links.runs_url(base, experiment_id))
        names = " && ".join(f"document.body.innerText.includes({name!r})" for _, name in RUNS)
        page.wait_for(f"!!document.body && {names}", 90, "both run names in the runs list")
        assert page.evaluate("document.body.innerText.includes('Run Name')")  # the training runs table
        page.screenshot(tmp_path / "runs_list.png")

        page.open(links.runs_url(base, experiment_id, charts=True))  # the accuracy charts against GB
        page.wait_for("""[...document.querySelectorAll('[data-testid=experiment-view-compare-runs-card]')]
            .some(card => card.querySelector('h4')?.textContent === 'test_accuracy'
                          && card.querySelector('.xtitle')?.textContent === 'cumulative_gb')""", 60,
                      "the test_accuracy chart with cumulative_gb on its x-axis")
        page.screenshot(tmp_path / "accuracy_vs_gb.png")

        name, run_id = RUNS[1][1], run_ids[RUNS[1][1]]
        page.open(links.run_url(base, experiment_id, run_id))
        search = 'input[placeholder="Search metric charts"]'  # charts render as they scroll into view
        page.wait_for(f"document.body.innerText.includes('Artifacts') && !!document.querySelector({search!r})",
                      60, "the run page's metric charts")  # the runs page has a search box too, no Artifacts tab
        page.type_into(search, "test_accuracy")
        page.wait_for(f"""[...document.querySelectorAll('[data-testid=experiment-view-compare-runs-card]')]
            .some(card => card.querySelector('h4')?.textContent === 'test_accuracy'
                          && [...card.querySelectorAll('.scatterlayer path.js-line')]
                                 .some(line => /^M[^L]+L/.test(line.getAttribute('d') || ''))
                          && card.innerText.includes({f'{name} (test_accuracy)'!r}))""", 60,
                      "the plotted test_accuracy chart of the run")
        page.screenshot(tmp_path / "run_metrics.png")
    finally:
        browser.close()
    for shot in ("runs_list.png", "accuracy_vs_gb.png", "run_metrics.png"):
        assert (tmp_path / shot).read_bytes()[:4] == b"\x89PNG"


def test_ctrl_c_stops_the_server_group_and_exits_0(served):
    process, server_pid, *_ = served
    assert live_members(server_pid), "the server should be running before Ctrl-C"
    process.send_signal(signal.SIGINT)
    assert process.wait(60) == 0
    deadline = time.monotonic() + 10  # members the server's leader did not wait for are reaped by init
    while live_members(server_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live_members(server_pid) == []
