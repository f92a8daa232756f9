"""The ``fl-sparse`` command (:mod:`fl_sparse.cli.main`): the only layer that parses arguments, prints and exits."""

from fl_sparse.cli.main import main

__all__ = ["main"]
