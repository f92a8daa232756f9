"""Errors a user can act on. Each carries one line that names what is wrong and how to fix it."""


class FlSparseError(Exception):
    """Base class; the CLI prints ``str(error)`` on one line and exits with code 2."""


class ConfigError(FlSparseError, ValueError):
    """A gin binding, preset or command-line value that cannot work."""


class DataError(FlSparseError):
    """A missing or malformed dataset directory."""


class PayloadError(FlSparseError, ValueError):
    """Bytes that do not decode to a valid message (truncated, tampered, wrong version, ...)."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def first_line(error: BaseException) -> str:
    """The first line of an error's message (gin and MLflow put whole configs and tracebacks after it)."""
    text = str(error).strip().strip('"').splitlines()
    return text[0] if text else type(error).__name__
