"""What the thin entry points (`train.py`, `eval.py`) share: flag parsing with one-line errors, quiet
library logging, and the workdir + whole-config validation that runs before anything is traced."""
from __future__ import annotations

import logging as py_logging
import sys

from absl import flags, logging


class _QuietLibraries(py_logging.Filter):
    """Drops orbax's per-save/restore INFO chatter from the console; its warnings and errors stay."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing (`app.run(main, flags_parser=parse_flags)`) with a one-line error, not a
    traceback, for a bad flag, an unknown --config.KEY override or a value of the wrong type."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"error: invalid flag: {e}")
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a key the config lacks
        while e.args and isinstance(e.args[0], BaseException):
            e = e.args[0]
        sys.exit(f"error: invalid --config override: unknown key {e.args[0] if e.args else e}")


def quiet_library_logs() -> None:
    logging.get_absl_handler().addFilter(_QuietLibraries())


def validated_config_and_workdir(config, workdir_flag: str | None):
    """(config, workdir) after validating the whole config for this run's devices; exits with a
    one-line message when the workdir is missing or the config is invalid."""
    import jax
    from sparsejax import config as config_lib

    workdir = workdir_flag or config.get("workdir")
    if not workdir:
        sys.exit("error: no workdir: pass --workdir=DIR (or set config.workdir)")
    try:
        config_lib.validate(config, jax.device_count())
    except (ValueError, KeyError) as e:
        sys.exit(f"error: invalid config: {e}")
    return config, workdir
