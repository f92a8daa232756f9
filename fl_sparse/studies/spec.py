"""Study files: a whole table of experiments (methods x presets x seeds x variants) in one TOML file.

::

    [study]
    name = "tiny"                 # MLflow experiment; output folder <folder of this file>/<name>
    threads = 1                   # torch threads per trial = CPUs Ray reserves per trial
    gpus = 0                      # GPUs per trial, fractions allowed (0.25: four trials share a GPU)
    checkpoint_every = 10         # optional (default 10): rounds between a trial's checkpoints
    max_failures = 1              # optional (default 1): retries of a trial that fails or whose worker dies
    [variants.known_mask]         # a named list of gin bindings; "base" (none) is implicit
    bind = ["Experiment.uplink_codec = @KnownMaskSparse()"]
    [variants.known_mask.algorithms.pffdst]   # optional: replaces the variant's bindings for one algorithm
    bind = ["FreezeAware.inner = @KnownMaskSparse()"]
    [[grid]]                      # the product algorithms x presets x seeds x variants
    algorithms = ["fedavg", "feddst"]
    presets = ["demo"]            # an entry may be a list of presets / gin files
    seeds = [0, 1]
    variants = ["base"]           # optional, default ["base"]
    bind = ["Experiment.rounds = 2"]   # optional, bindings for every trial of the block
    group = "tiny_runs"           # optional: the export folder of the block's base trials (default: the presets)
    [reports.budget]              # optional: `fl-sparse study report` writes <output>/budget/ from these groups
    runs = ["demo"]               # an entry "STUDY/GROUP" reads another study's exports beside this one's output
    reach = [30, 35, 40]          # optional
    algorithms = ["feddst"]       # optional: only these methods' runs of those groups

A study is the union of its blocks. A trial's bindings are the block's, then the variant's, then its seed; the
data directory comes from the command line. Every trial is composed (:func:`fl_sparse.config.compose.compose`)
when the file is read, so a bad file fails in one line, naming the file, the block and the key, before anything
is written or started. A trial's key is a hash of its resolved composition (the gin config it runs, without
the data directory): it names the trial's working folder and tags its MLflow run, so editing the file keeps
every trial whose composition did not change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import tomllib
from pathlib import Path

from fl_sparse.config import gin_files
from fl_sparse.config.compose import compose
from fl_sparse.core.errors import ConfigError, first_line
from fl_sparse.reporting.records import BASE_VARIANT as BASE

KEYS = {
    "study": {"name", "threads", "gpus", "checkpoint_every", "max_failures"},
    "variant": {"bind", "algorithms"},
    "variant algorithm": {"bind"},
    "grid": {"algorithms", "presets", "seeds", "variants", "bind", "group"},
    "report": {"runs", "reach", "algorithms"},
    "top": {"study", "variants", "grid", "reports"},
}
NAME = re.compile(r"[A-Za-z0-9_.-]+")


class StudyFileError(ConfigError):
    """A study file that cannot work; the message names the file, the block and the key."""


@dataclasses.dataclass(frozen=True)
class Trial:
    """One run of a study: a composition and where its results go."""

    key: str  # hash of the resolved composition
    algorithm: str
    presets: tuple[str, ...]
    bindings: tuple[str, ...]  # the block's, the variant's and the seed's, in that order
    seed: int
    variant: str
    group: str  # the export folder under <output>/runs/
    rounds: int  # planned rounds (a communication budget may end the trial earlier)

    @property
    def name(self) -> str:
        """The file stem of the trial's export: ``<algorithm>_s<seed>``, as ``fl-sparse export`` names runs."""
        return f"{Path(self.algorithm).stem}_s{self.seed}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Trial:
        return cls(**{**data, "presets": tuple(data["presets"]), "bindings": tuple(data["bindings"])})


@dataclasses.dataclass(frozen=True)
class Report:
    runs: tuple[str, ...]
    reach: tuple[float, ...] | None
    algorithms: tuple[str, ...] | None = None  # only these methods' runs; None: every run of the groups


@dataclasses.dataclass(frozen=True)
class Study:
    path: Path
    name: str
    threads: int
    gpus: float
    checkpoint_every: int
    max_failures: int
    trials: tuple[Trial, ...]
    reports: dict[str, Report]

    @property
    def default_out(self) -> Path:
        return self.path.parent / self.name


def load(path: Path | str) -> Study:
    """Read, validate and expand a study file, composing every trial; raises one-line :class:`StudyFileError`."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as error:
        raise StudyFileError(f"{path}: cannot read it ({error.strerror}); give the path of a study .toml") from None
    except tomllib.TOMLDecodeError as error:
        raise StudyFileError(f"{path}: not valid TOML: {first_line(error)}") from None
    where = _Where(path)
    where.keys("the top level", data, KEYS["top"])
    header = where.table("[study]", data.get("study"), required=True)
    where.keys("[study]", header, KEYS["study"])
    name = where.text("[study]", "name", header.get("name"))
    threads = where.integer("[study]", "threads", header.get("threads", 1), low=1)
    gpus = where.number("[study]", "gpus", header.get("gpus", 0), low=0)
    every = where.integer("[study]", "checkpoint_every", header.get("checkpoint_every", 10), low=1)
    retries = where.integer("[study]", "max_failures", header.get("max_failures", 1), low=0)
    variants = _variants(where, data.get("variants", {}))
    blocks = data.get("grid")
    if not isinstance(blocks, list) or not blocks:
        raise StudyFileError(f"{path}: no [[grid]] block; add at least one with algorithms, presets and seeds")
    trials = [trial for number, block in enumerate(blocks, 1) for trial in _expand(where, number, block, variants)]
    _check_unique(where, trials)
    reports = {}
    for folder, table in where.table("[reports]", data.get("reports", {})).items():
        block = f"[reports.{folder}]"
        where.keys(block, where.table(block, table), KEYS["report"])
        runs = tuple(where.names(block, "runs", table.get("runs")))
        for run in runs:
            if not all(NAME.fullmatch(part) for part in run.split("/")) or run.count("/") > 1:
                where.fail(block, "runs", f"{run!r}: give GROUP, or STUDY/GROUP for another study's exports")
        reach = table.get("reach")
        if reach is not None:
            reach = tuple(where.number(block, "reach", value, low=0) for value in where.items(block, "reach", reach))
        algorithms = table.get("algorithms")
        if algorithms is not None:
            algorithms = tuple(where.names(block, "algorithms", algorithms))
        reports[folder] = Report(runs, reach, algorithms)
    return Study(path, name, threads, gpus, every, retries, tuple(trials), reports)


class _Where:
    """Type checks that name the file, the block and the key in their one-line error."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, block: str, key: str, problem: str):
        raise StudyFileError(f"{self.path}: {block}, key {key!r}: {problem}")

    def keys(self, block: str, table: dict, allowed: set[str]) -> None:
        for key in table:
            if key not in allowed:
                self.fail(block, key, f"unknown key; the keys of {block} are {', '.join(sorted(allowed))}")

    def table(self, block: str, value, required: bool = False) -> dict:
        if value is None and not required:
            return {}
        if not isinstance(value, dict):
            missing = " (it is missing)" if value is None else ""
            raise StudyFileError(f"{self.path}: {block} must be a table{missing}")
        return value

    def items(self, block: str, key: str, value) -> list:
        if not isinstance(value, list) or not value:
            self.fail(block, key, "give a non-empty list")
        return value

    def names(self, block: str, key: str, value) -> list[str]:
        names = self.items(block, key, value)
        for item in names:
            if not isinstance(item, str) or not item:
                self.fail(block, key, f"{item!r} is not a name")
        return names

    def text(self, block: str, key: str, value) -> str:
        if not isinstance(value, str) or not NAME.fullmatch(value):
            self.fail(block, key, f"{value!r}: give a name of letters, digits, '_', '-' or '.'")
        return value

    def integer(self, block: str, key: str, value, low: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            self.fail(block, key, f"{value!r}: give an integer >= {low}")
        return value

    def number(self, block: str, key: str, value, low: float) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
            self.fail(block, key, f"{value!r}: give a number >= {low:g}")
        return value


def _variants(where: _Where, table) -> dict[str, dict]:
    """{variant: {"bind": [...], "algorithms": {algorithm: [...]}}}, "base" included."""
    variants = {BASE: {"bind": [], "algorithms": {}}}
    for name, spec in where.table("[variants]", table).items():
        block = f"[variants.{name}]"
        where.text(block, "name", name)
        if name == BASE:
            where.fail(block, "name", "'base' is the variant without bindings; give this one another name")
        where.keys(block, where.table(block, spec), KEYS["variant"])
        overrides = {}
        for algorithm, override in where.table(f"{block}.algorithms", spec.get("algorithms", {})).items():
            inner = f"[variants.{name}.algorithms.{algorithm}]"
            where.keys(inner, where.table(inner, override), KEYS["variant algorithm"])
            overrides[algorithm] = where.names(inner, "bind", override.get("bind"))
        bind = spec.get("bind", [])
        variants[name] = {"bind": where.names(block, "bind", bind) if bind else [], "algorithms": overrides}
    return variants


def _expand(where: _Where, number: int, block, variants: dict[str, dict]) -> list[Trial]:
    label = f"[[grid]] {number}"
    block = where.table(label, block)
    where.keys(label, block, KEYS["grid"])
    algorithms = where.names(label, "algorithms", block.get("algorithms"))
    preset_lists = [tuple(where.names(label, "presets", entry) if isinstance(entry, list) else
                          where.names(label, "presets", [entry]))
                    for entry in where.items(label, "presets", block.get("presets"))]
    seeds = [where.integer(label, "seeds", seed, low=0) for seed in where.items(label, "seeds", block.get("seeds"))]
    chosen = where.names(label, "variants", block.get("variants", [BASE]))
    bind = where.names(label, "bind", block["bind"]) if block.get("bind") else []
    group = where.text(label, "group", block["group"]) if "group" in block else None
    for variant in chosen:
        if variant not in variants:
            where.fail(label, "variants", f"unknown variant {variant!r}; define [variants.{variant}] or choose one "
                                          f"of {', '.join(sorted(variants))}")
    trials = []
    for algorithm in algorithms:
        algorithm = _relative_gin(where.path, algorithm)
        for presets in preset_lists:
            presets = tuple(_relative_gin(where.path, preset) for preset in presets)
            for variant in chosen:
                spec = variants[variant]
                extra = spec["algorithms"].get(Path(algorithm).stem, spec["bind"])
                for seed in seeds:
                    bindings = (*bind, *extra, f"Experiment.seed = {seed}")
                    trials.append(_trial(where, label, algorithm, presets, bindings, seed, variant, group))
    return trials


def _relative_gin(study_file: Path, name: str) -> str:
    """A .gin path is relative to the study file; a short name is looked up as usual."""
    if name.endswith(".gin") and not Path(name).is_absolute():
        return str((study_file.parent / name).resolve())
    return name


def _trial(where: _Where, label: str, algorithm: str, presets: tuple[str, ...], bindings: tuple[str, ...],
           seed: int, variant: str, group: str | None) -> Trial:
    trial = f"{Path(algorithm).stem} {'+'.join(presets)} seed {seed} ({variant})"
    # The files first, so that an error names the key that holds the wrong name; then the bindings.
    for key, names, folder, kind in (("algorithms", [algorithm], gin_files.ALGORITHMS, "algorithm"),
                                     ("presets", presets, gin_files.REGISTRY, "preset")):
        for name in names:
            try:
                gin_files.resolve(name, folder, kind)
            except ConfigError as error:
                where.fail(label, key, f"{trial}: {first_line(error)}")
    try:
        composed = compose(algorithm, presets, bindings)
    except ConfigError as error:
        where.fail(label, "bind", f"{trial}: {first_line(error)}")
    base_group = group or "+".join(Path(preset).stem for preset in presets) or "-"
    return Trial(trial_key(composed.config_text), algorithm, presets, bindings, seed, variant,
                 base_group if variant == BASE else f"{base_group}_{variant}", composed.experiment.rounds)


def trial_key(config_text: str) -> str:
    """The hash that identifies a trial: its resolved gin config, without the data directory."""
    lines = [line for line in config_text.splitlines() if not line.startswith("DATA_DIR =")]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _check_unique(where: _Where, trials: list[Trial]) -> None:
    keys: dict[str, Trial] = {}
    for trial in trials:
        other = keys.setdefault(trial.key, trial)
        if other is not trial:
            raise StudyFileError(f"{where.path}: the trials {other.algorithm} {'+'.join(other.presets)} seed "
                                 f"{other.seed} ({other.variant}) and ({trial.variant}) compose to the same "
                                 "experiment; list it once")
    seen: dict[tuple[str, str], Trial] = {}
    for trial in trials:
        other = seen.setdefault((trial.group, trial.name), trial)
        if other is not trial:
            raise StudyFileError(f"{where.path}: two trials would export to runs/{trial.group}/{trial.name}: "
                                 f"{other.variant} {other.bindings} and {trial.variant} {trial.bindings}; give one "
                                 "of them another variant or group")
