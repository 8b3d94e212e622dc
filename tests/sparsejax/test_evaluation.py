"""Evaluation pieces against hand-computed answers: retrieval scoring, bits per byte, the report."""
import ast
import json
import math
import re
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from sparsejax import config as config_lib
from sparsejax import data, evaluation
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
    # Rows with their own byte counts (evaluation's document rows) use those, not the vocabulary's.
    target_bytes = rng.integers(0, 5, size=(2, t)).astype(np.float32)
    result, _ = language_modeling.evaluate(sums, [{**batch, "target_bytes": target_bytes}, batch])
    both = (target_bytes * mask).sum() + nbytes
    np.testing.assert_allclose(result["bits_per_byte"], 2 * (nll * mask).sum() / math.log(2) / both, rtol=1e-5)
    np.testing.assert_allclose(result["bytes"], both)


def test_statistics_are_means_over_real_tokens_of_all_batches():
    """Each batch's statistic (a mean over its real tokens) is weighted by those tokens: a batch of
    padding rows (segment 0) changes nothing, and a batch with 3x the real tokens weighs 3x."""
    t, vocab = 8, 258

    def batch(real_rows, stat_value):
        seg = np.zeros((4, t), np.int32)
        seg[:real_rows] = 1
        return {"inputs": np.zeros((4, t), np.int32), "positions": np.zeros((4, t), np.int32),
                "segment_ids": seg, "targets": np.ones((4, t), np.int32), "loss_mask": seg.astype(np.float32),
                "stat": np.float32(stat_value)}

    def forward_of(b):
        return lambda i, p, s: (np.zeros((4, t, vocab), np.float32), {"stats/density": b["stat"]})

    def run(batches):
        sums = [language_modeling.make_sums_fn(forward_of(b), ByteTokenizer().token_bytes)(b) for b in batches]
        _, stats = language_modeling.evaluate(lambda s: s, sums)
        return stats["density"]

    assert run([batch(4, 0.25), batch(0, 0.0), batch(0, 0.0)]) == pytest.approx(0.25)
    assert run([batch(3, 0.5), batch(1, 0.1)]) == pytest.approx((3 * 0.5 + 1 * 0.1) / 4)


def test_a_tasks_examples_do_not_depend_on_the_other_tasks():
    tok = ByteTokenizer()
    seen = {}
    for tasks in (("passkey", "needle"), ("needle",), ("needle", "passkey")):
        cfg = evaluation.default_config()
        cfg.context_lengths, cfg.depths, cfg.samples_per_cell, cfg.tasks = (512,), (0.5,), 2, tasks
        prompts = []

        def record(inputs, positions, segment_ids):
            prompts.append(np.asarray(inputs).copy())
            return np.zeros(inputs.shape + (258,), np.float32)

        retrieval.retrieval_grid(record, tok, cfg)
        needle = prompts[tasks.index("needle")]       # one batch per task (samples 2 <= batch size)
        seen[tasks] = needle
    first = seen[("passkey", "needle")]
    for needle in seen.values():
        np.testing.assert_array_equal(needle, first)


def test_report_is_strict_json():
    from sparsejax.evaluation.run import _finite_or_null
    report = {"validation": {"loss": float("nan"), "bits_per_byte": float("inf"), "tokens": 3.0},
              "retrieval": {"passkey": {"accuracy": [[0.5, float("-inf")]]}}}
    clean = _finite_or_null(report)
    assert clean == {"validation": {"loss": None, "bits_per_byte": None, "tokens": 3.0},
                     "retrieval": {"passkey": {"accuracy": [[0.5, None]]}}}
    json.loads(json.dumps(clean, allow_nan=False))


def test_eval_config_errors():
    config = ml_collections.ConfigDict({"eval": evaluation.default_config(), "data": data.default_config()})
    evaluation.validate(config)
    config.eval.tasks = ("passkey", "haystack")
    with pytest.raises(ValueError, match="haystack.*passkey"):
        evaluation.validate(config)
    config.eval.tasks = ("passkey",)
    config.eval.depths = ()
    with pytest.raises(ValueError, match=r"config.eval.context_lengths=.* and config.eval.depths=\(\) must both be"):
        evaluation.validate(config)
    config.eval.depths = (0.5, 1.5)
    with pytest.raises(ValueError, match=r"1\.5.*\[0, 1\]"):
        evaluation.validate(config)
    config.eval.depths = (0.5,)
    config.eval.validation_batches = 0                                   # the whole split
    evaluation.validate(config)
    config.eval.validation_batches = -1
    with pytest.raises(ValueError, match=r"validation_batches=-1 is invalid; valid values: an integer >= 1, or 0"):
        evaluation.validate(config)
    config.eval.validation_batches, config.data.source = 0, "synthetic"
    with pytest.raises(ValueError, match=r"validation_batches=0 \(the whole split\) is invalid with data.source="):
        evaluation.validate(config)


def test_context_lengths_must_hold_each_tasks_fixed_text():
    """Lengths too short for a task's instruction, needles and question fail validation naming the
    length and the minimum (the needle task's grows with eval.num_distractors); examples of every
    task fit at that minimum."""
    config = config_lib.default_config()
    config.eval.context_lengths = (256, 512)
    with pytest.raises(ValueError, match=r"config\.eval\.context_lengths contains 256, too short for the needle task "
                                         r"\(its prompts need >= 454 tokens with data\.tokenizer='byte', "
                                         r"config\.eval\.num_distractors=3\); valid values: integers >= 454"):
        config_lib.validate(config)
    config.eval.num_distractors = 0
    with pytest.raises(ValueError, match=r"contains 256, too short for the needle task.*integers >= 283"):
        config_lib.validate(config)
    config.eval.tasks = ("passkey",)
    config_lib.validate(config)
    config.eval.context_lengths = (253, 512)
    with pytest.raises(ValueError, match=r"contains 253, too short for the passkey task.*integers >= 254"):
        config_lib.validate(config)
    tok = ByteTokenizer()
    for seed in range(20):
        rng = np.random.default_rng(seed)
        assert len(retrieval.make_example("passkey", rng, 254, 0.5, tok, 3)[0]) == 254
        assert len(retrieval.make_example("needle", rng, 454, 0.5, tok, 3)[0]) == 454


def test_eval_py_docstring_example_is_valid():
    text = (Path(__file__).resolve().parents[2] / "eval.py").read_text()
    lengths = re.search(r"--config\.eval\.context_lengths='(\([0-9, ]+\))'", text).group(1)
    config = config_lib.default_config()
    config.eval.context_lengths = ast.literal_eval(lengths)
    config_lib.validate(config)


def test_heatmap_writes_png(tmp_path):
    grid = {"passkey": {"context_lengths": [128, 256], "depths": [0.0, 1.0], "accuracy": [[1.0, 0.5], [0.0, 0.25]]}}
    path = tmp_path / "h.png"
    plots.retrieval_heatmap(grid, str(path), title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kind, balance", [("dense", "zigzag"), ("nsa", "striped")])
def test_logits_fn_with_the_sequence_sharded_equals_one_device(kind, balance):
    """eval.py's forward under a mesh with sequence = 4 (ring; the balance permutation applied and
    undone) gives the logits of sequence = 1 for the same parameters, on a row of two packed
    documents and padding, one row for two-way batch axes (padded with an empty row)."""
    from test_context_training import tiny

    from sparsejax import config as config_lib
    from sparsejax.evaluation.run import make_logits_fn
    from sparsejax.parallel import context, mesh as mesh_lib
    from sparsejax.training.optimizer import make_optimizer
    from sparsejax.training.state import StateFactory

    configs = {1: tiny(kind, data=2), 4: tiny(kind, data=2, sequence=4)}
    configs[4].parallel.update(context_scheme="ring", balance=balance)
    width = max(256, context.sequence_multiple(configs[4], 8))
    assert width % context.sequence_multiple(configs[4], 8) == 0
    rng = np.random.default_rng(3)
    inputs = rng.integers(0, configs[1].model.vocab_size, (1, width)).astype(np.int32)
    cut = width // 3
    segments = np.where(np.arange(width) < cut, 1, 2)[None].astype(np.int32)
    segments[:, -7:] = 0                                                      # padding tokens
    positions = np.where(segments == 2, np.arange(width) - cut, np.arange(width))
    positions = np.where(segments > 0, positions, 0).astype(np.int32)

    logits, params = {}, None
    for sequence, n_dev in ((1, 2), (4, 8)):
        config = configs[sequence]
        config_lib.validate(config, n_dev)
        mesh = mesh_lib.make_mesh(config, jax.devices()[:n_dev])
        factory = StateFactory(config, mesh, make_optimizer(config.train))
        if params is None:                      # the same parameters on both meshes
            state = factory.create()
            params = jax.tree.map(np.asarray, (state.params, state.rest))
        placed = jax.device_put(params, (factory.shardings.params, factory.shardings.rest))
        logits[sequence] = make_logits_fn(config, mesh, factory.graphdef, *placed)(inputs, positions, segments)
    assert logits[4].shape == logits[1].shape == (1, width, configs[1].model.vocab_size)
    real = segments[0] > 0      # padding tokens (segment 0, position 0) have no defined output
    np.testing.assert_allclose(logits[4][0, real], logits[1][0, real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind, balance", [("dense", "zigzag"), ("nsa", "striped")])
def test_evaluate_with_the_sequence_sharded_equals_one_device(tmp_path, kind, balance):
    """`evaluate` (eval.py) of one checkpoint under sequence = 1 (data = 8) and under sequence = 4
    (data = 2, ring): the same validation loss and bits per byte, and the same retrieval grid
    (its rows of 2 examples padded to the batch axes)."""
    from test_context_training import tiny

    from sparsejax.evaluation.run import evaluate
    from sparsejax.training.loop import train

    configs = {1: tiny(kind, data=8), 4: tiny(kind, data=2, sequence=4)}   # all 8 devices
    configs[4].parallel.update(context_scheme="ring", balance=balance)
    for config in configs.values():
        config.data.global_batch_size = 8
        config.train.update(num_steps=1, checkpoint_every=1)
        config.eval.update(validation_batches=2, context_lengths=(256,), depths=(0.5,), samples_per_cell=3,
                           batch_size=2, tasks=("passkey",))
    train(configs[1], str(tmp_path))
    reports = {s: evaluate(config, str(tmp_path)) for s, config in configs.items()}
    for key in ("loss", "bits_per_byte", "tokens"):
        np.testing.assert_allclose(reports[4]["validation"][key], reports[1]["validation"][key], rtol=1e-5)
    assert reports[4]["retrieval"] == reports[1]["retrieval"]
    assert reports[4]["step"] == reports[1]["step"] == 1
