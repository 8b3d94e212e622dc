"""Evaluation pieces against hand-computed answers: retrieval scoring, bits per byte, the report."""
import math

import jax
import ml_collections
import numpy as np
import pytest

from sparsejax import evaluation
from sparsejax.data.tokenizers import ByteTokenizer
from sparsejax.evaluation import language_modeling, plots, retrieval


def _oracle(sequences, wrong_rows=()):
    """logits_fn predicting each row's true next token, except a wrong last answer token on `wrong_rows`."""
    def logits_fn(inputs, positions, segment_ids):
        n, width = inputs.shape
        logits = np.zeros((n, width, 258), np.float32)
        for i, seq in enumerate(sequences):
            nxt = np.array(seq[1:])
            if i in wrong_rows:
                nxt[-1] = (nxt[-1] + 1) % 256
            logits[i, np.arange(len(nxt)), nxt] = 5.0
        return logits
    return logits_fn


@pytest.mark.parametrize("task", ["passkey", "needle"])
def test_score_examples_oracle_and_wrong_answers(task):
    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    examples = [retrieval.make_example(task, rng, 600, d, tok, 2) for d in (0.0, 0.5, 1.0)]
    sequences = [np.concatenate([p, a]) for p, a in examples]
    assert retrieval.score_examples(_oracle(sequences), examples).tolist() == [True, True, True]
    assert retrieval.score_examples(_oracle(sequences, wrong_rows=(1,)), examples).tolist() == [True, False, True]


def test_retrieval_grid_shape_and_values():
    tok = ByteTokenizer()
    cfg = evaluation.default_config()
    cfg.context_lengths, cfg.depths, cfg.samples_per_cell, cfg.tasks = (300, 400), (0.0, 1.0), 2, ("passkey",)

    def uniform(inputs, positions, segment_ids):  # argmax of all-equal logits is token 0: never an answer digit
        return np.zeros(inputs.shape + (258,), np.float32)

    grid = retrieval.retrieval_grid(uniform, tok, cfg)
    assert grid["passkey"]["accuracy"] == [[0.0, 0.0], [0.0, 0.0]]


def test_bits_per_byte_matches_hand_computation():
    vocab, t = 258, 6
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, t, vocab)).astype(np.float32)
    targets = rng.integers(0, vocab, size=(2, t)).astype(np.int32)
    targets[0, 0] = 256  # BOS: zero bytes
    mask = np.ones((2, t), np.float32)
    mask[1, -2:] = 0
    batch = {"inputs": np.zeros((2, t), np.int32), "positions": np.zeros((2, t), np.int32),
             "segment_ids": np.ones((2, t), np.int32), "targets": targets, "loss_mask": mask}
    stat = np.float32(0.25)
    forward = lambda i, p, s: (logits, {"stats/density": stat, "loss/ignored": np.float32(9.0)})  # noqa: E731
    sums = jax.jit(language_modeling.make_sums_fn(forward, ByteTokenizer().token_bytes))
    result, stats = language_modeling.evaluate(sums, [batch, batch])
    assert stats == {"density": pytest.approx(0.25)}
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    nbytes = ((targets < 256) * mask).sum()
    np.testing.assert_allclose(result["loss"], (nll * mask).sum() / mask.sum(), rtol=1e-5)
    np.testing.assert_allclose(result["bits_per_byte"], (nll * mask).sum() / math.log(2) / nbytes, rtol=1e-5)


def test_eval_config_errors():
    config = ml_collections.ConfigDict({"eval": evaluation.default_config()})
    evaluation.validate(config)
    config.eval.tasks = ("passkey", "haystack")
    with pytest.raises(ValueError, match="haystack.*passkey"):
        evaluation.validate(config)
    config.eval.tasks = ("passkey",)
    config.eval.depths = (0.5, 1.5)
    with pytest.raises(ValueError, match=r"1\.5.*\[0, 1\]"):
        evaluation.validate(config)


def test_heatmap_writes_png(tmp_path):
    grid = {"passkey": {"context_lengths": [128, 256], "depths": [0.0, 1.0], "accuracy": [[1.0, 0.5], [0.0, 0.25]]}}
    path = tmp_path / "h.png"
    plots.retrieval_heatmap(grid, str(path), title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
