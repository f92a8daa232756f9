"""Finding and parsing gin files: algorithms by short name or path, presets, command-line bindings.

Callers compose through :func:`fl_sparse.config.compose.compose`, which parses with :func:`parse` after every
part is registered, then builds the Experiment."""

from __future__ import annotations

import logging
import re
import tokenize
from pathlib import Path

import gin

from fl_sparse.core.errors import ConfigError, first_line

_PACKAGE = Path(__file__).resolve().parents[1]  # fl_sparse/
# In a wheel the gin files ship inside the package; in a source checkout they sit beside it.
GIN_ROOT = _PACKAGE / "_gin" if (_PACKAGE / "_gin").is_dir() else _PACKAGE.parent
ALGORITHMS = GIN_ROOT / "algorithms"
REGISTRY = GIN_ROOT / "registry"
DEFAULTS = REGISTRY / "defaults.gin"


def available(folder: Path) -> list[str]:
    return sorted(path.stem for path in folder.glob("*.gin") if path.name != "defaults.gin")


def resolve(name: str, folder: Path, kind: str) -> Path:
    """A gin file given by short name (``pffdst``), file name or path."""
    path = Path(name)
    if path.suffix == ".gin" and path.is_file():
        return path.resolve()
    candidate = folder / (path.name if path.suffix == ".gin" else f"{name}.gin")
    if candidate.is_file():
        return candidate
    raise ConfigError(f"unknown {kind} {name!r}: choose one of {', '.join(available(folder))} or give a .gin path")


def parse(algorithm: str, presets: list[str], bindings: list[str]) -> list[Path]:
    """Clear gin and load defaults, then presets, then the algorithm, then bindings (last wins)."""
    files = [DEFAULTS, *(resolve(p, REGISTRY, "preset") for p in presets), resolve(algorithm, ALGORITHMS, "algorithm")]
    gin.clear_config()
    for folder in (ALGORITHMS, REGISTRY):
        gin.add_config_file_search_path(str(folder))
    quiet = _DropGinPathProbes()
    logging.getLogger().addFilter(quiet)
    try:
        try:
            gin.parse_config_files_and_bindings([str(f) for f in files], [], finalize_config=False)
        except (ValueError, KeyError, SyntaxError, IOError) as error:
            raise ConfigError(f"bad gin configuration: {first_line(error)}") from None
        for binding in bindings:  # one at a time, so that an error names its binding
            try:
                gin.parse_config(binding)
            except (ValueError, KeyError, SyntaxError, IOError, ImportError, tokenize.TokenError) as error:
                raise ConfigError(f"binding {binding!r}: {_binding_problem(binding, error)}") from None
        try:
            gin.finalize()  # checks that every %MACRO referred to is bound
        except ValueError as error:
            problem = first_line(error).split(" in config string")[0]  # the rest is the whole config
            macro = re.fullmatch(r"No bindings specified for '(\w+)/gin\.macro'", problem)
            if macro:
                problem = f"%{macro[1]} is used but never bound (bind it: --bind '{macro[1]} = VALUE')"
            raise ConfigError(f"bad gin configuration: {problem}") from None
    finally:
        logging.getLogger().removeFilter(quiet)
    return files


def _binding_problem(binding: str, error: Exception) -> str:
    """What is wrong with one binding, in words (gin reports a bare name as an ``ast.Name`` object)."""
    if isinstance(error, tokenize.TokenError):
        return "unbalanced brackets or quotes"
    text = first_line(error)
    if text.startswith("malformed node or string"):
        value = binding.partition("=")[2].strip()
        return (f"{value!r} is not a value gin can read: write a number, a quoted string, True/False/None, "
                "a list, @Part() or %MACRO")
    return text


class _DropGinPathProbes(logging.Filter):
    """gin logs an error for each search-path probe of an ``include`` before it finds the file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Path not found:")


def bindings_as_params() -> dict[str, str]:
    """Every gin binding in force, as flat ``Configurable.param`` -> value strings (MLflow params)."""
    params = {}
    for (scope, selector), values in gin.config._CONFIG.items():  # gin has no public iterator for this
        if selector == "gin.macro":  # ROUNDS = 200 is stored as gin.macro.value in scope ROUNDS
            params[f"macros/{scope}"] = _resolved(values["value"])
            continue
        prefix = f"{scope}/{selector}" if scope else selector
        for param, value in values.items():
            params[f"{prefix.split('.')[-1]}.{param}"] = _resolved(value)
    return params


def _resolved(value) -> str:
    """The value as text, with a macro reference (``%ROUNDS``) replaced by what it stands for, so that
    runs can be compared and filtered on numbers rather than on macro names."""
    text = str(value)
    if text.startswith("%"):
        try:
            text = str(gin.query_parameter(text))
        except (ValueError, KeyError):  # an unbound macro: keep the reference
            pass
    return text[:500]
