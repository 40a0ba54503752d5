"""Start-up errors a user can fix (config, weights, output folder, data), and how the command
lines report them.

Every such error is a `CatsegError` whose message is one line naming the file or key at fault.
The command lines (`catseg-demo`, `demo/app.py`, `train_net.py`) run under `report_errors`:
a CatsegError prints `error: <message>` and exits with status 2, with no traceback; `--debug`
or CATSEG_DEBUG=1 lets the traceback through.
"""
import os
import sys
from typing import Callable, TypeVar

T = TypeVar("T")

DEBUG_ENV = "CATSEG_DEBUG"
EXIT_CODE = 2  # the command lines' exit status for a CatsegError (also their usage-error status)


class CatsegError(Exception):
    """A problem in what the user gave (config, weights, data, output), with a one-line message."""


class ConfigError(CatsegError):
    """A config file is missing or unreadable, or names a key or value catseg does not know."""


class WeightsError(CatsegError):
    """A checkpoint is missing, unreadable, or does not match the model."""


class OutputError(CatsegError):
    """An output folder cannot be created or written."""


def debug_requested(flag: bool = False) -> bool:
    """True when tracebacks should be shown: `flag` (--debug) or CATSEG_DEBUG set to 1/true/yes."""
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")


def report_errors(func: Callable[[], T], debug: bool = False) -> T:
    """`func()`; on a CatsegError print `error: <message>` to stderr and exit with EXIT_CODE
    (re-raised instead when `debug_requested(debug)`)."""
    try:
        return func()
    except CatsegError as e:
        if debug_requested(debug):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_CODE)
