"""The project's error types. A `UserError` is a mistake in what the user gave (a config key, a path, a
prompt, an image): the command line prints it as one line and exits with status 2. Every other exception is
a bug or an environment failure and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input: reported in one line, exit status 2."""


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be turned into a valid config."""


class InvalidInput(UserError, ValueError):
    """A value, file or image the user gave that cannot be used (wrong shape, too long, corrupt, empty)."""


class InputNotFound(UserError, FileNotFoundError):
    """A file or directory the user named that does not exist or is not what it should be."""


class TrainingError(UserError, RuntimeError):
    """A run cannot go on (diverged, a final checkpoint could not be saved, resumed with other settings)."""


__all__ = ["ConfigError", "InputNotFound", "InvalidInput", "TrainingError", "UserError"]


def describe(err: BaseException, limit: int = 200) -> str:
    """`TypeName: first line of the message` (cut to `limit`): what a one-line error says of its cause."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:limit] if lines else ''}".rstrip(": ")
