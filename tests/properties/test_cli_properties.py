"""Hostile command lines for ``fl-sparse run``, drawn from the parser's own flags (so a new flag is covered
as soon as it exists): each gives exit code 2, exactly one line on stderr naming the flag or binding, no
traceback, and writes nothing (no MLflow store, no checkpoint directory).

Values are hostile by the flag's kind, read from argparse: numbers that are negative, non-finite or not
numbers; a choice outside the choices; directories that are files, lie below a file or are not writable;
tracking URIs whose database cannot be created; bindings that do not parse or give an ``Experiment``
field a value of the wrong type or range. ``EDGES`` adds the flag-specific ones (zero rounds, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fl_sparse.cli.main import _parser, main
from fl_sparse.engine.experiment import Experiment

pytestmark = pytest.mark.property

# Values that are wrong for one flag only (zero rounds is wrong, seed zero is not).
EDGES = {"--rounds": ["0"], "--threads": ["0", str(10**6)], "--checkpoint-every": ["0"], "--budget-gb": ["0"],
         "--sparsity": ["1", "1.5", "1e9"], "--workers": ["0"], "--experiment-name": ["", "  "]}
# Directory flags that read an existing directory (a missing one is hostile for them, not for --checkpoint-dir).
MUST_EXIST = {"--data-dir", "--resume"}
# Valid values, mixed into each command line around the hostile one.
BACKGROUND = {"--rounds": "2", "--seed": "3", "--sparsity": "0.5", "--device": "cpu", "--budget-gb": "2.5",
              "--checkpoint-every": "1", "--checkpoint-dir": "ck", "--experiment-name": "x", "--no-tracking": None}
# Not Experiment fields: a later binding of the hostile one's parameter would override it.
BACKGROUND_BINDINGS = ["SGD.lr=0.05", "SGD.momentum=0.5"]
SYNTAX_ERRORS = ["Experiment.rounds", "=3", "Experiment.rounds=(", "Experiment.rounds=[1,", "Experiment.rounds='x",
                 "Experiment.rounds=1=2", "Experiment.rounds=-", "Experiment.rounds=abc", "Experiment.rounds=nan",
                 "Nope.x=1", "Experiment.nope=1", "Experiment.rounds=@Nope()", "Experiment.rounds=%NOPE",
                 "import nosuchmodule_fl_sparse", "include 'nosuch.gin'"]
# Wrong type or range for an Experiment field, by its annotation (every int field is a count or a seed).
BAD_FIELD_VALUES = {"int": ["'abc'", "1.5", "-1", "1e999", "True", "None", "[1]"],
                    "int | None": ["'abc'", "2.5", "-7", "True"],
                    "float": ["'abc'", "-1.0", "1e999", "-1e999", "False", "None"],
                    "float | None": ["'abc'", "-0.5", "1e999", "True"],
                    "str": ["'gpu'", "3", "None"]}
NOT_A_PART = ["3", "'x'", "[1]", "True"]
IS_ROOT = os.geteuid() == 0  # root writes into a read-only directory, so that case needs another user


def run_options() -> list[argparse.Action]:
    parser = _parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [a for a in commands.choices["run"]._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def flag_of(action: argparse.Action) -> str:
    return max(action.option_strings, key=len)


def hostile_values(action: argparse.Action) -> st.SearchStrategy[str] | None:
    """Values no run can accept for ``action``, chosen by its kind; None for switches and free text."""
    flag = flag_of(action)
    edges = st.sampled_from(EDGES[flag]) if flag in EDGES else st.nothing()
    if action.nargs == 0:
        return None
    if action.choices:
        return st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=8).filter(
            lambda text: text not in action.choices)
    if action.type is int:
        return st.one_of(edges, st.integers(max_value=-1).map(str),
                         st.sampled_from(["abc", "1.5", "nan", "inf", "", "1e3", "0x10", "2 3"]))
    if action.type is float:
        return st.one_of(edges, st.floats(max_value=-1e-12).map(repr),
                         st.sampled_from(["nan", "-nan", "inf", "-inf", "1e999", "abc", "", "1,5"]))
    if action.dest.endswith("_uri"):
        return st.sampled_from(["sqlite:///afile/x.db", "sqlite:///afile/deeper/x.db", "sqlite:///adir",
                                "afile", "afile/mlruns", "file:afile"]
                               + ([] if IS_ROOT else ["sqlite:///readonly/x.db", "readonly/mlruns"]))
    if action.dest.endswith("_dir") or action.metavar == "DIR":
        paths = ["afile", "afile/below", "adir/afile"] + ([] if IS_ROOT else ["readonly", "readonly/below"])
        return st.sampled_from(paths + (["missing", "adir/missing"] if flag in MUST_EXIST else []))
    if action.dest == "bind":
        return st.one_of(st.sampled_from(SYNTAX_ERRORS), bad_field_bindings())
    return edges if flag in EDGES else None  # free text (a name, an address): hostile only where listed


def bad_field_bindings() -> st.SearchStrategy[str]:
    """Every Experiment field but ``dataset`` (any object): numbers and strings by annotation, and for parts
    and the model function values that are neither."""
    fields = [(f.name, BAD_FIELD_VALUES.get(f.type, NOT_A_PART)) for f in dataclasses.fields(Experiment)
              if f.type != "object"]
    return st.sampled_from(fields).flatmap(
        lambda field: st.sampled_from(field[1]).map(lambda value: f"Experiment.{field[0]}={value}"))


HOSTILE = {flag_of(action): values for action in run_options() if (values := hostile_values(action)) is not None}


def names_it(line: str, flag: str, value: str) -> bool:
    """The error line names the flag, or for a binding the binding, its Configurable.param or its macro."""
    if flag != "--bind":
        return flag in line
    selector = value.partition("=")[0].strip()
    macro = value.partition("%")[2]
    return repr(value) in line or (selector != "" and selector in line) or (macro != "" and f"%{macro}" in line)


@contextlib.contextmanager
def hostile_directory():
    """A fresh working directory holding the things hostile paths point at."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "afile").write_text("a file, not a directory")
        (root / "adir").mkdir()
        (root / "adir" / "afile").write_text("")
        if not IS_ROOT:
            (root / "readonly").mkdir(mode=0o500)
        before = os.getcwd()
        os.chdir(root)
        try:
            yield root
        finally:
            os.chdir(before)
            if not IS_ROOT:
                (root / "readonly").chmod(0o700)


def listing(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


@st.composite
def command_lines(draw) -> tuple[list[str], str, str]:
    flag = draw(st.sampled_from(sorted(HOSTILE)))
    value = draw(HOSTILE[flag])
    background = draw(st.lists(st.sampled_from(sorted(set(BACKGROUND) - {flag})), unique=True, max_size=4))
    pieces = [[f"{flag}={value}"] if draw(st.booleans()) else [flag, value]]
    pieces += [[name] if BACKGROUND[name] is None else [name, BACKGROUND[name]] for name in background]
    pieces += [["--bind", binding] for binding in draw(st.lists(st.sampled_from(BACKGROUND_BINDINGS), max_size=2))]
    order = draw(st.permutations(range(len(pieces))))
    return ["run", "fedavg", *[arg for i in order for arg in pieces[i]]], flag, value


def run_in_process(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse's own errors
            code = stop.code
    return code, err.getvalue()


def test_every_flag_of_run_is_drawn_or_has_no_hostile_value():
    """A new flag is covered by its kind; only switches and free text are left out, by name."""
    left_out = {flag_of(action) for action in run_options()} - set(HOSTILE)
    switches_and_text = {flag_of(a) for a in run_options() if a.nargs == 0 or (a.type is None and not a.choices)}
    assert left_out <= switches_and_text, left_out
    assert {"--seed", "--rounds", "--bind", "--checkpoint-dir", "--tracking-uri", "--device"} <= set(HOSTILE)
    assert set(EDGES) <= {flag_of(action) for action in run_options()}


@given(command_lines())
def test_a_hostile_value_is_one_line_naming_it_exit_2_and_nothing_written(drawn):
    argv, flag, value = drawn
    with hostile_directory() as root:
        before = listing(root)
        code, err = run_in_process(argv)
        assert listing(root) == before, (argv, err)
    assert code == 2, (argv, err)
    assert "Traceback" not in err and err.endswith("\n") and err.count("\n") == 1, (argv, err)
    assert names_it(err, flag, value), (argv, err)


@pytest.mark.parametrize("args, names", [
    (["--seed", "-1"], "--seed -1"),
    (["--checkpoint-dir", "afile", "--checkpoint-every", "1"], "--checkpoint-dir afile"),
    (["--bind", "Experiment.rounds=abc"], "'Experiment.rounds=abc'"),
    (["--rounds", "many"], "--rounds"),
])
def test_the_console_script_gives_one_line_for_a_bad_command_line(args, names):
    with hostile_directory() as root:
        before = listing(root)
        done = subprocess.run([sys.executable, "-m", "fl_sparse.cli", "run", "fedavg", *args],
                              capture_output=True, text=True, timeout=300)
        assert listing(root) == before
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert names in done.stderr, done.stderr
