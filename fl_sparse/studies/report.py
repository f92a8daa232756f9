"""``fl-sparse study report``: the study's tables and plots, rebuilt from its committed exports alone."""

from __future__ import annotations

from pathlib import Path

from fl_sparse.core.errors import ConfigError
from fl_sparse.reporting.records import read
from fl_sparse.reporting.report import write_report
from fl_sparse.studies.spec import Report, Study


def reports(study: Study) -> dict[str, Report]:
    """The file's ``[reports]``, or one report of every export group into ``<output>/report``."""
    return study.reports or {"report": Report(tuple(sorted({trial.group for trial in study.trials})), None)}


def write_study_report(study: Study, out: Path) -> list[Path]:
    written = []
    for folder, report in reports(study).items():
        # "STUDY/GROUP": a baseline another study ran is read from its exports, not trained again here
        groups = [(out.parent / study if study else out) / "runs" / group
                  for study, _, group in (entry.rpartition("/") for entry in report.runs)]
        present = [group for group in groups if any(group.glob("*.json"))]
        if not present:
            raise ConfigError(f"{study.path}: [reports.{folder}] has no exports yet in {', '.join(map(str, groups))}; "
                              "run the study first (fl-sparse study run)")
        records = [record for group in present for record in read(group)
                   if report.algorithms is None or record.info.get("algorithm") in report.algorithms]
        written += write_report(records, out / folder, report.reach)
    return written
