"""Raw results as text in the repository: each finished MLflow run as ``<name>.csv`` + ``.gin`` + ``.json``.

``fl-sparse export`` writes, for every finished run of an experiment, three files named after the run
(``<algorithm>_s<seed>``, plus ``_<first 8 characters of the run id>`` where two runs would share a name):

* ``<name>.csv``: one row per round, every metric MLflow holds for the run, columns ``round``,
  ``logged_ms`` (when the round was logged, ms since the epoch) and the metric keys in sorted order. A
  metric a round did not log (evaluation every k rounds) is an empty cell. A run resumed from a checkpoint
  logs its replayed rounds again; the value logged last counts, as in the report.
* ``<name>.gin``: the operative gin config the run finished with (every binding resolved).
* ``<name>.json``: identity and provenance: run id, experiment, algorithm, presets, seed, status, start and
  end time, the code commit when the run recorded one, and every logged parameter. A study trial's export
  also names its ``group`` (its export folder) and ``variant`` (:data:`BASE_VARIANT` for no extra bindings).

The data directory a run read is a path of the machine it ran on, so the files write it as ``<data-dir>``
(:data:`DATA_DIR_PLACEHOLDER`): exports are committed, and a path of one machine means nothing on another.

Floats are written with ``repr``, the shortest text that reads back to the same double, so reading an
export gives exactly the numbers MLflow held, and exporting again gives identical bytes. ``fl-sparse
report`` reads these records (:func:`read`), and the MLflow path builds the same records in memory
(:func:`fl_sparse.tracking.export.from_mlflow`), so both report from one code path.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from datetime import datetime, timezone
from pathlib import Path

from fl_sparse.core.errors import ConfigError

FORMAT_VERSION = 1
CONFIG_ARTIFACTS = ("operative_config.gin", "config.gin")  # the resolved config first
COMMIT_TAGS = ("commit", "mlflow.source.git.commit")
DATA_DIR_PLACEHOLDER = "<data-dir>"
BASE_VARIANT = "base"  # the variant of a study trial run with its preset and algorithm only


@dataclasses.dataclass
class RunRecord:
    """One finished run: what the report needs and what the export keeps."""

    name: str  # file stem
    info: dict  # JSON-serialisable identity, provenance and params
    metrics: dict[str, dict[int, float]]  # metric key -> {round: value}
    logged_ms: dict[int, int]  # round -> when it was logged (ms since the epoch)
    config: str  # the operative gin config

    def history(self, key: str) -> list[tuple[int, float]]:
        """[(round, value)] in round order, the form :func:`fl_sparse.reporting.summary.summarize` takes."""
        return sorted(self.metrics.get(key, {}).items())


def utc(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def export_name(info: dict) -> str:
    """The file stem of a run's export: ``<algorithm>_s<seed>``."""
    return f"{info['algorithm']}_s{info['seed']}"


def unique_names(records: list[RunRecord]) -> list[RunRecord]:
    """Records sorted by name; where names collide, each gets its run id's first 8 characters."""
    count: dict[str, int] = {}
    for record in records:
        count[record.name] = count.get(record.name, 0) + 1
    for record in records:
        if count[record.name] > 1:
            record.name = f"{record.name}_{record.info['run_id'][:8]}"
    return sorted(records, key=lambda r: r.name)


def csv_text(record: RunRecord) -> str:
    keys = sorted(record.metrics)
    rounds = sorted(set(record.logged_ms).union(*(set(v) for v in record.metrics.values())))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["round", "logged_ms", *keys])
    for step in rounds:
        logged = record.logged_ms.get(step)
        writer.writerow([step, "" if logged is None else logged,
                         *("" if step not in record.metrics[key] else repr(record.metrics[key][step]) for key in keys)])
    return out.getvalue()


def machine_paths(info: dict) -> list[str]:
    """The data directories a run's params name (``*.data_dir`` bindings, the ``DATA_DIR`` macro), longest
    first, so that a directory inside another is replaced whole."""
    params = info.get("params", {})
    paths = {value for key, value in params.items()
             if (key.endswith(".data_dir") or key == "macros/DATA_DIR") and str(value).startswith("/")}
    return sorted(paths, key=len, reverse=True)


def portable(text: str, paths: list[str]) -> str:
    for path in paths:
        text = text.replace(path, DATA_DIR_PLACEHOLDER)
    return text


def write(records: list[RunRecord], out: Path) -> list[Path]:
    """Write each record as ``<name>.csv``, ``.gin`` and ``.json`` into ``out``; returns the paths.

    A run exported earlier under another name (it got a run-id suffix when a later run of the same method and
    seed joined the experiment) loses its old files, so that no run is ever read twice."""
    out.mkdir(parents=True, exist_ok=True)
    names = {record.info["run_id"]: record.name for record in records}
    for meta in out.glob("*.json"):
        run_id = json.loads(meta.read_text()).get("run_id")
        if run_id in names and meta.stem != names[run_id]:
            for suffix in (".csv", ".gin", ".json"):
                meta.with_suffix(suffix).unlink(missing_ok=True)
    written = []
    for record in records:
        paths = machine_paths(record.info)
        files = {".csv": csv_text(record), ".gin": portable(record.config, paths),
                 ".json": portable(json.dumps(record.info, indent=1, sort_keys=True) + "\n", paths)}
        for suffix, text in files.items():
            path = out / f"{record.name}{suffix}"
            path.write_text(text)
            written.append(path)
    return written


def read(directory: Path) -> list[RunRecord]:
    """The records of an export directory (every ``<name>.json`` with its ``.csv`` and ``.gin``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"--from-export {directory}: no such directory; write one with fl-sparse export")
    records, seen = [], {}  # seen: run id -> the file stem it was read from
    for meta in sorted(directory.glob("*.json")):
        info = json.loads(meta.read_text())
        table = meta.with_suffix(".csv")
        if info.get("format") != FORMAT_VERSION or not table.is_file():
            raise ConfigError(f"{meta}: not a run export of format {FORMAT_VERSION} with its .csv beside it; "
                              "export it again with fl-sparse export")
        rows = list(csv.reader(io.StringIO(table.read_text())))
        header, body = rows[0], rows[1:]
        if header[:2] != ["round", "logged_ms"]:
            raise ConfigError(f"{table}: the header must start with round,logged_ms; export it again")
        metrics: dict[str, dict[int, float]] = {key: {} for key in header[2:]}
        logged_ms: dict[int, int] = {}
        for row in body:
            step = int(row[0])
            if row[1]:
                logged_ms[step] = int(row[1])
            for key, cell in zip(header[2:], row[2:]):
                if cell:
                    metrics[key][step] = float(cell)
        gin_file = meta.with_suffix(".gin")
        config = gin_file.read_text() if gin_file.is_file() else ""
        if info.get("run_id") in seen:
            raise ConfigError(f"{directory}: run {info.get('run_id')} is exported twice ({seen[info.get('run_id')]}"
                              f".json and {meta.name}); delete the older files or export the experiment again")
        seen[info.get("run_id")] = meta.stem
        records.append(RunRecord(meta.stem, info, metrics, logged_ms, config))
    if not records:
        raise ConfigError(f"--from-export {directory}: no run exports (*.json) in that directory")
    return records
