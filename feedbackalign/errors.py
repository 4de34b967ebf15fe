"""Errors a user can cause and fix, by kind. Each message is one line that names the file, record or config key
and says what to do; the entry points print it as `<program>: error: <message>` and exit with code 2, without a
traceback (`exit_on_user_error`). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

USER_ERROR_EXIT = 2


class UserError(Exception):
    """Base of every error the user can fix; never raised itself."""


class DataError(UserError, ValueError):
    """A dataset, file, record or field the user gave is malformed or does not fit the loss."""


class ConfigError(UserError, ValueError):
    """A configuration key or value cannot run; the message names the key and the valid choices."""


class EnvError(UserError, RuntimeError):
    """This machine lacks something the run needs: a GPU, a package, hub access, disk space."""


class CheckpointError(UserError, RuntimeError):
    """A run directory, checkpoint or cache file cannot be read or written as asked."""


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps); the message says why and what was kept."""


class SettingWarning(UserWarning):
    """A setting that runs but is probably not what the user meant; the message says what to change."""


def one_line(error: BaseException) -> str:
    """The message on one line (whitespace runs collapsed)."""
    return " ".join(str(error).split())


def report(program: str, message: str, code: int = USER_ERROR_EXIT) -> int:
    """Print `<program>: error: <message>` on stderr (the one line every entry point ends a failure with) and
    return the exit code."""
    print(f"{program}: error: {message}", file=sys.stderr, flush=True)
    return code


@contextmanager
def exit_on_user_error(program: str, show: bool = True):
    """Print a UserError as `<program>: error: <message>` on stderr and exit 2; let anything else propagate.
    `show=False` exits without printing (the other ranks of a torchrun job, whose rank 0 prints the same line)."""
    try:
        yield
    except UserError as e:
        sys.exit(report(program, one_line(e)) if show else USER_ERROR_EXIT)


def warnings_as_lines(program: str, show: bool = True) -> None:
    """Print every warning as one `<program>: warning: <message>` line instead of Python's two-line default (with
    its source file and line unless it is a SettingWarning); `show=False` silences them (ranks other than 0)."""

    def line(message, category, filename, lineno, text=None) -> str:
        where = "" if issubclass(category, SettingWarning) else f" ({Path(filename).name}:{lineno})"
        return f"{program}: warning: {one_line(message)}{where}\n"

    warnings.formatwarning = line
    if not show:
        warnings.simplefilter("ignore")
