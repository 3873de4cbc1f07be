"""Errors a user can cause, and the one-line report every command line gives for them."""
from __future__ import annotations

import functools
import sys

__all__ = ["UserError", "DataError", "ArchError", "WeightsError", "cli_errors"]


class UserError(ValueError):
    "A problem the user can fix (a path, an option, a file): reported in one line, exit code 2."


class DataError(UserError):
    "A problem with the user's data."


class ArchError(UserError):
    "An unknown or unusable architecture."


class WeightsError(UserError):
    "Pretrained weights that were required but cannot be had."


def cli_errors(main):
    "Decorate a command-line `main`: a `UserError` becomes 'error: ...' on stderr and exit code 2, not a traceback."
    @functools.wraps(main)
    def _inner(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)
    return _inner
