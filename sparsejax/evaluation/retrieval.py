"""Passkey and needle-in-a-haystack retrieval accuracy over a grid of context lengths and depths.

An example is a prompt of exactly `context_len` tokens and an answer of A tokens. It is scored in one
forward pass over `prompt + answer[:-1]`: the example is correct when the model's argmax at every
answer position equals the answer token. This is exactly "greedy decoding reproduces the answer"
(greedy decoding emits answer token i iff the argmax after the correct prefix is that token), without
a decoding loop.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from sparsejax.data import synthetic

LogitsFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""`logits_fn(inputs [N, L], positions [N, L], segment_ids [N, L]) -> logits [N, L, V]` (numpy or jax)."""

PAD_MULTIPLE = 64  # forward lengths are rounded up to this, so a grid compiles a few shapes only


def make_example(task: str, rng: np.random.Generator, context_len: int, depth: float, tokenizer,
                 num_distractors: int, haystack: synthetic.Haystack | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_ids [context_len], answer_ids [A]) for `task` in ("passkey", "needle"); the needle
    task's filler comes from `haystack` (default: the embedded corpus' validation split)."""
    if task == "passkey":
        return synthetic.make_passkey_example(rng, context_len, depth, tokenizer)
    if task == "needle":
        return synthetic.make_needle_example(rng, context_len, depth, tokenizer, haystack=haystack,
                                             num_distractors=num_distractors)
    raise ValueError(f"task={task!r}; valid choices: ('passkey', 'needle')")


def score_examples(logits_fn: LogitsFn, examples: list[tuple[np.ndarray, np.ndarray]], *,
                   pad_multiple: int = PAD_MULTIPLE) -> np.ndarray:
    """bool [N]: whether greedy decoding after each prompt reproduces its answer.

    All examples go through one forward pass as rows of one batch: row n holds prompt + answer[:-1]
    as segment 1 and padding (segment 0) after it, so causal attention keeps rows exact. The rows'
    width is rounded up to `pad_multiple` (a sequence-sharded model needs its balance granule)."""
    lengths = [len(p) + len(a) - 1 for p, a in examples]
    width = -(-max(lengths) // pad_multiple) * pad_multiple
    n = len(examples)
    inputs = np.zeros((n, width), np.int32)
    segments = np.zeros((n, width), np.int32)
    for i, (prompt, answer) in enumerate(examples):
        seq = np.concatenate([prompt, answer[:-1]])
        inputs[i, :len(seq)] = seq
        segments[i, :len(seq)] = 1
    positions = np.where(segments > 0, np.arange(width)[None, :], 0).astype(np.int32)
    predictions = np.asarray(np.argmax(np.asarray(logits_fn(inputs, positions, segments)), axis=-1))
    correct = np.zeros((n,), bool)
    for i, (prompt, answer) in enumerate(examples):
        start = len(prompt) - 1  # the logits at the last prompt token predict answer[0]
        correct[i] = np.array_equal(predictions[i, start:start + len(answer)], answer)
    return correct


def retrieval_grid(logits_fn: LogitsFn, tokenizer, eval_config, *, pad_multiple: int = PAD_MULTIPLE,
                   haystack: synthetic.Haystack | None = None) -> dict:
    """Accuracy of every task in `eval_config.tasks` over `context_lengths` × `depths` (the needle
    task's filler from `haystack`; `synthetic.haystack_for(config.data, "validation")` for a run).

    Returns {task: {"context_lengths": [...], "depths": [...], "accuracy": [[float per depth] per
    length], "samples_per_cell": n}}. Examples are drawn from `eval_config.seed`, so two models are
    scored on the same examples (a task's examples depend on the seed, its name, the length and the
    depth, not on which other tasks are evaluated)."""
    report = {}
    for task in eval_config.tasks:
        t = synthetic.TASKS.index(task)
        accuracy = []
        for length in eval_config.context_lengths:
            row = []
            for depth in eval_config.depths:
                rng = np.random.default_rng([eval_config.seed, t, length, int(round(depth * 1000))])
                examples = [make_example(task, rng, length, depth, tokenizer, eval_config.num_distractors, haystack)
                            for _ in range(eval_config.samples_per_cell)]
                hits = []
                for start in range(0, len(examples), eval_config.batch_size):
                    hits.append(score_examples(logits_fn, examples[start:start + eval_config.batch_size],
                                               pad_multiple=pad_multiple))
                row.append(float(np.concatenate(hits).mean()))
            accuracy.append(row)
        report[task] = {"context_lengths": list(eval_config.context_lengths), "depths": list(eval_config.depths),
                        "accuracy": accuracy, "samples_per_cell": eval_config.samples_per_cell}
    return report
