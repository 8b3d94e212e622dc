"""Helpers that compose experiment configs from the sections' defaults.

Every experiment file `configs/<name>.py` defines `get_config()` that starts from `base_config()` (all
sections with their defaults: `sparsejax.config.default_config()`) and overrides values through the
helpers below, which refuse keys that the defaults do not have (a typo fails here, not at run time).

    config = common.base_config()
    common.update(config.model, d_model=512, num_layers=8)
    common.update(config.data, seq_len=1024, global_batch_size=32)
"""
from __future__ import annotations

import ml_collections

from sparsejax import config as config_lib


def base_config() -> ml_collections.ConfigDict:
    """All sections with their defaults."""
    return config_lib.default_config()


def update(section: ml_collections.ConfigDict, **values) -> ml_collections.ConfigDict:
    """Set existing keys of `section`; raises on a key the section does not have."""
    unknown = sorted(set(values) - set(section.keys()))
    if unknown:
        raise KeyError(f"unknown key(s) {unknown}; valid keys: {sorted(section.keys())}")
    for key, value in values.items():
        section[key] = value
    return section


def llama_model(config: ml_collections.ConfigDict, *, d_model: int, num_layers: int, num_heads: int,
                num_kv_heads: int, mlp_dim: int, **overrides) -> ml_collections.ConfigDict:
    """Set a Llama-shaped model: head_dim = d_model / num_heads, SwiGLU width mlp_dim."""
    if d_model % num_heads:
        raise ValueError(f"d_model = {d_model} is not divisible by num_heads = {num_heads}")
    update(config.model, d_model=d_model, num_layers=num_layers, num_heads=num_heads,
           num_kv_heads=num_kv_heads, head_dim=d_model // num_heads, mlp_dim=mlp_dim, **overrides)
    return config
