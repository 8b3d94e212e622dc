"""The optimizer's weight-decay mask: the same parameters decay whatever the layer layout."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import nsa_tiny
from sparsejax.training import default_config as train_defaults
from sparsejax.training.optimizer import decay_mask, make_optimizer
from sparsejax.training.state import build_model, split_model


def _params(scan: bool):
    config = nsa_tiny.get_config()
    config.model.scan_layers = scan
    return split_model(nnx.eval_shape(lambda: build_model(config)))[1]


def _names(path):
    return tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)


def test_scanned_and_listed_layers_decay_the_same_parameters():
    listed = {_names(p): m for p, m in jax.tree_util.tree_leaves_with_path(decay_mask(_params(False)))}
    scanned = {_names(p): m for p, m in jax.tree_util.tree_leaves_with_path(decay_mask(_params(True)))}
    for path, m in listed.items():
        key = ("layers",) + path[2:] if path[0] == "blocks" else path
        assert scanned[key] == m, path
    assert len({("layers",) + p[2:] if p[0] == "blocks" else p for p in listed}) == len(scanned)
    decayed = {p[-2:] for p, m in scanned.items() if m}
    kept = {p[-2:] for p, m in scanned.items() if not m}
    assert {("embed", "embedding"), ("up", "kernel"), ("compress_k", "w1"), ("compress_k", "pe")} <= decayed
    assert {("attention_norm", "scale"), ("final_norm", "scale"), ("gate", "bias"), ("compress_k", "b1"),
            ("compress_v", "b2")} <= kept


def test_adamw_shrinks_only_the_masked_parameters():
    train = train_defaults()
    train.learning_rate, train.warmup_steps, train.weight_decay, train.grad_clip = 0.1, 1, 0.5, 0.0
    params = {"layers": {"norm": {"scale": jnp.ones((3, 4))}, "proj": {"kernel": jnp.ones((3, 4, 4))}}}
    tx = make_optimizer(train)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["layers"]["norm"]["scale"], 0.0)
    np.testing.assert_allclose(updates["layers"]["proj"]["kernel"], -0.1 * 0.5)
