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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from sparsejax import cli, distributed
    cli.quiet_library_logs()
    try:
        distributed.maybe_initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    except ValueError as e:
        sys.exit(f"error: {e}")

    from sparsejax.training.checkpoint import CheckpointError
    from sparsejax.training.loop import TrainingDivergedError, train

    config, workdir = cli.validated_config_and_workdir(FLAGS.config, FLAGS.workdir)
    try:
        result = train(config, workdir)
    except (CheckpointError, TrainingDivergedError) as e:
        logging.error("%s: %s", type(e).__name__, e)
        sys.exit(f"error: {e}")
    logging.info("finished: %s at step %d, loss %s, last checkpoint %s", result.stopped_by, result.step,
                 result.train_metrics.get("loss"), result.last_checkpoint)


if __name__ == "__main__":
    from sparsejax.cli import parse_flags
    app.run(main, flags_parser=parse_flags)
