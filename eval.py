"""Evaluate the latest checkpoint of a training run.

    python eval.py --config=configs/dense_tiny.py --workdir=runs/tiny
    python eval.py --config=configs/dense_tiny.py --workdir=runs/tiny --step=400 \
        --config.eval.context_lengths='(512,1024)'

Reports validation loss, perplexity and bits per byte, the attention variant's statistics, and
passkey / needle-in-a-haystack accuracy over `config.eval`'s grid of context lengths and depths;
writes `DIR/eval/report_<step>.json` and the heatmap `DIR/eval/retrieval_<step>.png`. Runs under
the config's mesh, so a config that shards the sequence (`configs/nsa_1b_long.py`) evaluates with
its ring or all-gather attention.
Exit status 1 with a message for an invalid config or a missing or damaged checkpoint.
"""
from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "The training run's directory (holds checkpoints/).")
flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from sparsejax import cli
    from sparsejax.evaluation.run import evaluate
    from sparsejax.training.checkpoint import CheckpointError

    cli.quiet_library_logs()
    config, workdir = cli.validated_config_and_workdir(FLAGS.config, FLAGS.workdir)
    try:
        report = evaluate(config, workdir, FLAGS.step)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    summary = {"step": report["step"], "validation": report["validation"],
               "attention_stats": report["attention_stats"],
               "retrieval_mean_accuracy": {t: sum(map(sum, r["accuracy"])) / sum(map(len, r["accuracy"]))
                                           for t, r in report["retrieval"].items()}}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    from sparsejax.cli import parse_flags
    app.run(main, flags_parser=parse_flags)
