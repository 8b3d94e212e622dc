"""Registry of attention variants (docs/contracts.md §2).

A variant is an `nnx.Module` class registered under a name:

    @register_attention("dense")
    class DenseAttention(nnx.Module):
        def __init__(self, config, *, rngs): ...            # reads config.model and config.attention.<name>
        def __call__(self, x, positions, segment_ids): ...  # -> (out [B, T, E], aux dict)

and its module also defines `default_config() -> ConfigDict` and `validate(config)`.

Adding a variant: write `sparsejax/attention/<name>.py` with the three pieces above and append one
line `"<name>": "sparsejax.attention.<name>"` to `VARIANT_MODULES` below. Modules are imported lazily,
the first time `get_attention`, `variant_module` or `default_configs` asks for them, so a variant with
heavy imports costs nothing to experiments that do not use it.

Shared pieces for variants live in `sparsejax.attention.projection` (q/k/v projections with RoPE and the
output projection) so that every variant has the same parameters and sharding names.
"""
from __future__ import annotations

import importlib
from types import ModuleType

VARIANT_MODULES: dict[str, str] = {
    "dense": "sparsejax.attention.dense",
    "nsa": "sparsejax.attention.nsa",
}

_REGISTRY: dict[str, type] = {}


def register_attention(name: str):
    """Class decorator: register an attention variant under `name` (must be a key of VARIANT_MODULES)."""
    def decorate(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"attention kind {name!r} is already registered by {_REGISTRY[name].__module__}")
        _REGISTRY[name] = cls
        cls.kind = name
        return cls
    return decorate


def registered_kinds() -> list[str]:
    """All attention kinds: those listed in VARIANT_MODULES and any registered from elsewhere."""
    return sorted(set(VARIANT_MODULES) | set(_REGISTRY))


def variant_module(kind: str) -> ModuleType:
    """The module of variant `kind` (imported on first use)."""
    if kind not in VARIANT_MODULES:
        raise ValueError(f"unknown attention kind {kind!r}; registered kinds: {registered_kinds()}")
    return importlib.import_module(VARIANT_MODULES[kind])


def get_attention(kind: str) -> type:
    """The variant class registered as `kind`; raises naming the registered kinds."""
    if kind not in _REGISTRY and kind in VARIANT_MODULES:
        variant_module(kind)
    if kind not in _REGISTRY:
        raise ValueError(f"unknown attention kind {kind!r}; registered kinds: {registered_kinds()}")
    return _REGISTRY[kind]


def default_configs():
    """ConfigDict with one sub-config per variant of VARIANT_MODULES, from each `default_config()`."""
    import ml_collections
    cfg = ml_collections.ConfigDict()
    for kind in sorted(VARIANT_MODULES):
        cfg[kind] = variant_module(kind).default_config()
    return cfg
