"""What the thin entry points (`train.py`, `eval.py`) share: flag parsing with one-line errors, quiet
library logging, and the workdir + whole-config validation that runs before anything is traced."""
from __future__ import annotations

import logging as py_logging
import os
import sys

from absl import flags, logging


class _QuietLibraries(py_logging.Filter):
    """Drops orbax's per-save/restore INFO chatter from the console; its warnings and errors stay."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def _lines(error: BaseException) -> list[str]:
    """The non-empty lines of an error's message (its type name if it has none)."""
    return [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]


def _one_line(error: flags.Error) -> str:
    """A flag error whose message embeds a traceback (ml_collections: a config file's get_config
    failed) as its first line (the flag and its value) and its last (the exception)."""
    lines = _lines(error)
    return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"


def _config_file_error() -> OSError | None:
    """The error of a --config file that could not be loaded (missing, unreadable): ml_collections
    defers it until the config is first used, so it is raised here, at parse time."""
    if "config" not in flags.FLAGS:
        return None
    try:
        flags.FLAGS.config.get("workdir")
    except OSError as e:
        return e
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing (`app.run(main, flags_parser=parse_flags)`) with a one-line error, not a
    traceback, for a bad flag, a --config file that is missing or whose get_config fails, an unknown
    --config.KEY override or a value of the wrong type."""
    try:
        args = flags.FLAGS(argv)
        error = _config_file_error()
    except flags.Error as e:
        sys.exit(f"error: invalid flag: {_one_line(e)}")
    except OSError as e:  # an override applied to a --config file that could not be loaded
        error = e
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a key the config lacks
        while e.args and isinstance(e.args[0], BaseException):
            e = e.args[0]
        sys.exit(f"error: invalid --config override: unknown key {e.args[0] if e.args else e}")
    if error is not None:  # its last line names the file: "[Errno 2] No such file or directory: 'x.py'"
        sys.exit(f"error: invalid flag --config: {_lines(error)[-1]}")
    return args


def quiet_library_logs() -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())


def validated_config_and_workdir(config, workdir_flag: str | None):
    """(config, workdir) after validating the whole config for this run's devices; exits with a
    one-line message when the workdir is missing or is (or lies under) a regular file, or when the
    config is invalid."""
    import jax
    from sparsejax import config as config_lib

    workdir = workdir_flag or config.get("workdir")
    if not workdir:
        sys.exit("error: no workdir: pass --workdir=DIR (or set config.workdir)")
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        key = "--workdir" if workdir_flag else "config.workdir"
        sys.exit(f"error: {key}={workdir} is not a directory ({existing} is a file)")
    try:
        config_lib.validate(config, jax.device_count())
    except (ValueError, KeyError) as e:
        sys.exit(f"error: invalid config: {e}")
    return config, workdir
