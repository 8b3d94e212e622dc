"""Evaluation: validation loss and bits per byte, passkey / needle retrieval over a grid of context
lengths and depths, attention statistics, the JSON report and the heatmap.

This module holds the `config.eval` section (defaults and validation); the work is done in
`sparsejax.evaluation.retrieval`, `sparsejax.evaluation.language_modeling` and
`sparsejax.evaluation.run` (`evaluate(config, workdir)`, what `eval.py` calls).
"""
from __future__ import annotations

import ml_collections

TASKS = ("passkey", "needle")


def default_config() -> ml_collections.ConfigDict:
    """Defaults of `config.eval`."""
    c = ml_collections.ConfigDict()
    c.validation_batches = 16               # batches of the validation split for loss / bits per byte; 0 = all of it
    c.tasks = ("passkey", "needle")         # retrieval tasks to run (subset of TASKS)
    c.context_lengths = (512, 1024, 2048)   # prompt lengths in tokens (bytes: passkey >= 254, needle >= 454)
    c.depths = (0.0, 0.25, 0.5, 0.75, 1.0)  # needle position as a fraction of the filler
    c.samples_per_cell = 8                  # examples per (task, length, depth)
    c.num_distractors = 3                   # needle task: other needles with other keys
    c.batch_size = 8                        # retrieval examples per forward pass
    c.seed = 1234                           # retrieval examples are drawn from this seed
    return c


def _positive_int(key, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config.eval.{key}={value!r} is invalid; valid values: an integer >= 1")


def _check_context_lengths(config: ml_collections.ConfigDict) -> None:
    """Every context length holds the fixed text (instruction, needles, question) of every task in
    `config.eval.tasks`, tokenized with `config.data`'s tokenizer (needle: with eval.num_distractors)."""
    from sparsejax.data import synthetic, tokenizers

    ev = config.eval
    tokenizer = tokenizers.make_tokenizer(config.data)
    minimums = {task: synthetic.min_context_len(task, tokenizer, num_distractors=ev.num_distractors)
                for task in ev.tasks}
    if not minimums:
        return
    task = max(minimums, key=minimums.get)
    short = [length for length in ev.context_lengths if length < minimums[task]]
    if short:
        distractors = f", config.eval.num_distractors={ev.num_distractors}" if task == "needle" else ""
        raise ValueError(f"config.eval.context_lengths contains {short[0]}, too short for the {task} task (its "
                         f"prompts need >= {minimums[task]} tokens with data.tokenizer={config.data.tokenizer!r}"
                         f"{distractors}); valid values: integers >= {minimums[task]}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks `config.eval` (the context lengths against the retrieval tasks' fixed text, tokenized
    with `config.data`'s tokenizer); raises ValueError naming the key, the bad value and the valid values."""
    ev = config.eval
    for key in ("samples_per_cell", "batch_size"):
        _positive_int(key, ev[key])
    batches = ev.validation_batches
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
        raise ValueError(f"config.eval.validation_batches={batches!r} is invalid; valid values: an integer >= 1, "
                         "or 0 for the whole validation split")
    if batches == 0 and config.data.source == "synthetic":
        raise ValueError("config.eval.validation_batches=0 (the whole split) is invalid with data.source='synthetic', "
                         "whose validation rows are endless; valid values: an integer >= 1")
    if isinstance(ev.num_distractors, bool) or not isinstance(ev.num_distractors, int) or ev.num_distractors < 0:
        raise ValueError(f"config.eval.num_distractors={ev.num_distractors!r} is invalid; valid values: an integer >= 0")
    tasks = tuple(ev.tasks)
    bad = [t for t in tasks if t not in TASKS]
    if bad or len(set(tasks)) != len(tasks):
        raise ValueError(f"config.eval.tasks={tasks!r} is invalid; valid values: distinct names from {TASKS}")
    if tasks and not (len(ev.context_lengths) and len(ev.depths)):
        raise ValueError(f"config.eval.context_lengths={tuple(ev.context_lengths)!r} and config.eval.depths="
                         f"{tuple(ev.depths)!r} must both be non-empty for the retrieval tasks {tasks!r} "
                         "(or set config.eval.tasks=() to skip them)")
    for length in ev.context_lengths:
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"config.eval.context_lengths contains {length!r}; valid values: integers >= 1")
    _check_context_lengths(config)
    for depth in ev.depths:
        if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
            raise ValueError(f"config.eval.depths contains {depth!r}; valid values: floats in [0, 1]")
