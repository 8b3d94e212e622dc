"""Train a language model from a config file.

    python train.py --config=configs/dense_tiny.py --workdir=runs/tiny
    python train.py --config=configs/dense_tiny.py --workdir=runs/tiny --config.train.num_steps=20

Running again on the same workdir resumes from its latest checkpoint. Multi-process (multi-host)
runs: launch one process per host with the same flags plus `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I`; SLURM (srun) and Cloud TPU pods are detected without them.

Exit status: 0 when training completed or was stopped by SIGTERM/SIGINT after saving a checkpoint;
1 with a message on stderr for an invalid config, a damaged checkpoint or a diverged loss.
"""
from __future__ import annotations

import logging as py_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and TensorBoard files.")
flags.DEFINE_string("coordinator_address", None, "Multi-process: HOST:PORT of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: index of this process in [0, num_processes).")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


class _QuietLibraries(py_logging.Filter):
    """Drops orbax's per-save INFO chatter from the console; its warnings and errors stay."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    from sparsejax import distributed
    try:
        distributed.maybe_initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    except ValueError as e:
        sys.exit(f"error: {e}")

    import jax
    from sparsejax import config as config_lib
    from sparsejax.training.checkpoint import CheckpointError
    from sparsejax.training.loop import TrainingDivergedError, train

    config = FLAGS.config
    workdir = FLAGS.workdir or config.get("workdir")
    if not workdir:
        sys.exit("error: no workdir: pass --workdir=DIR (or set config.workdir)")
    try:
        config_lib.validate(config, jax.device_count())
    except (ValueError, KeyError) as e:
        sys.exit(f"error: invalid config: {e}")
    try:
        result = train(config, workdir)
    except (CheckpointError, TrainingDivergedError) as e:
        logging.error("%s: %s", type(e).__name__, e)
        sys.exit(f"error: {e}")
    logging.info("finished: %s at step %d, loss %s, last checkpoint %s", result.stopped_by, result.step,
                 result.train_metrics.get("loss"), result.last_checkpoint)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with a one-line error (not a traceback) for a bad flag, an unknown
    --config.KEY override or a value of the wrong type."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"error: invalid flag: {e}")
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a key the config lacks
        while e.args and isinstance(e.args[0], BaseException):
            e = e.args[0]
        sys.exit(f"error: invalid --config override: unknown key {e.args[0] if e.args else e}")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
