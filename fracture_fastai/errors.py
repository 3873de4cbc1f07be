"""Errors a user can cause, and the one-line report every command line gives for them."""
from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

__all__ = ["UserError", "DataError", "ArchError", "WeightsError", "cli_errors", "ArgumentParser", "check_writable"]


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


class ArgumentParser(argparse.ArgumentParser):
    "argparse's parser whose usage errors are `UserError`s: one line and exit code 2 under `cli_errors`, no usage dump."
    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def check_writable(path, option: str, folder: bool) -> Path:
    "`path` if a file (`folder=False`) or folder could be written there; else a `UserError` naming `option`, before any work."
    path = Path(path).expanduser()
    kind = "folder" if folder else "file"
    if path.exists() and path.is_dir() != folder:
        raise UserError(f"{option} {path} is a {'file' if folder else 'folder'}; give a {kind} path")
    if path.exists():
        target = path if folder else path.parent
    else:  # it will be made: in its nearest existing ancestor, which must be a folder
        target = next(p for p in path.absolute().parents if p.exists())
        if not target.is_dir():
            raise UserError(f"{option} {path} lies under the file {target}; give a {kind} path in a folder")
    if not os.access(target, os.W_OK | os.X_OK):
        raise UserError(f"{option} {path}: no permission to write in {target}; choose another place")
    return path
