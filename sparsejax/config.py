"""The experiment config: defaults of every section and whole-config validation.

Sections and the modules that own them (each module has `default_config()` and `validate(config)`,
both taking/returning ConfigDicts; `validate` receives the whole config):

    seed, workdir      here
    model              here (`model_defaults`; remat policies in sparsejax.model)
    attention          sparsejax.attention (kind + one sub-config per registered variant)
    data               sparsejax.data
    train              sparsejax.training
    eval               sparsejax.evaluation
    parallel           sparsejax.parallel.context (sequence-parallel scheme)
    mesh               sparsejax.parallel.mesh (data, fsdp, sequence, tensor; one may be -1)
    sharding_rules     sparsejax.parallel.mesh (logical axis -> tuple of mesh axes)
    parallel           sparsejax.parallel.context (context parallelism; validated with the device count)

A new section is added by appending `"<name>": "<module>"` to `SECTIONS`; its module
provides `default_config()` and `validate(config)` (or `validate(config, num_devices=None)`, which then
receives the device count when `validate` below is given one).

`validate(config, num_devices=None)` runs before anything is traced: unknown keys anywhere (compared
with the key set of `default_config()`), wrong types, bad values, then each section's validator; with
`num_devices` it also resolves the mesh and checks that batch, sequence, heads and widths divide over
it. Errors name the key, the bad value and the valid choices.
"""
from __future__ import annotations

import importlib
import inspect
import math

import ml_collections
from ml_collections import config_dict

from sparsejax import attention as attention_registry
from sparsejax.layers import DTYPES
from sparsejax.parallel import context as parallel_context
from sparsejax.parallel import mesh as mesh_lib

SECTIONS: dict[str, str] = {
    "data": "sparsejax.data",
    "train": "sparsejax.training",
    "eval": "sparsejax.evaluation",
    "parallel": "sparsejax.parallel.context",
}

PARAM_DTYPES = ("float32",)


def model_defaults() -> ml_collections.ConfigDict:
    """`config.model`: a small Llama-shaped decoder over the byte vocabulary."""
    return ml_collections.ConfigDict({
        "vocab_size": 320,          # >= tokenizer vocabulary (byte: 258); a multiple of 64 shards well
        "d_model": 256,
        "num_layers": 4,
        "num_heads": 8,
        "num_kv_heads": 4,          # GQA: num_heads must be a multiple
        "head_dim": 32,
        "mlp_dim": 768,
        "tie_embeddings": True,
        "rope_theta": 10000.0,
        "norm_eps": 1e-5,
        "init_std": 0.02,
        "param_dtype": "float32",
        "dtype": "float32",         # compute dtype: "float32" | "bfloat16" | "float16"
        "remat": "none",            # "none" | "full" | "dots" | "dots_attention" (sparsejax.model)
        "scan_layers": False,       # True: params stacked [L, ...], layers applied by one lax.scan (sparsejax.model)
    })


def attention_defaults() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict({"kind": "dense"})
    for kind, sub in attention_registry.default_configs().items():
        cfg[kind] = sub
    return cfg


def section_module(name: str):
    return importlib.import_module(SECTIONS[name])


def default_config() -> ml_collections.ConfigDict:
    """Every section with its defaults: the key set `validate` checks against."""
    cfg = ml_collections.ConfigDict()
    cfg.seed = 0
    cfg.workdir = config_dict.placeholder(str)
    cfg.model = model_defaults()
    cfg.attention = attention_defaults()
    for name in SECTIONS:
        cfg[name] = section_module(name).default_config()
    cfg.mesh = mesh_lib.default_mesh_config()
    cfg.sharding_rules = mesh_lib.default_rules_config()
    cfg.parallel = parallel_context.default_config()
    return cfg


# --------------------------------------------------------------------------------------- checks

def _type_name(value) -> str:
    return type(value).__name__


def check_structure(config, defaults, path: str = "config") -> None:
    """Unknown or missing keys and wrong types, recursively (ints are accepted for float fields).
    Only a field whose default is None (a placeholder: an optional value) accepts None; its section
    validator checks the type of any other value."""
    keys, valid = set(config.keys()), set(defaults.keys())
    unknown = sorted(keys - valid)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(f'{path}.{k}' for k in unknown)}; valid keys of {path}: {sorted(valid)}")
    missing = sorted(valid - keys)
    if missing:
        raise ValueError(f"missing key(s) {', '.join(f'{path}.{k}' for k in missing)}")
    for key in sorted(valid):
        value, default = config[key], defaults[key]
        where = f"{path}.{key}"
        if isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise ValueError(f"{where} = {value!r} must be a section (ConfigDict) with keys {sorted(default.keys())}")
            check_structure(value, default, where)
        elif default is None:
            continue  # placeholders (optional values); the section validator checks them
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{where} = {value!r} must be a bool (True or False), got {_type_name(value)}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where} = {value!r} must be a float, got {_type_name(value)}")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{where} = {value!r} must be an int, got {_type_name(value)}")
        elif isinstance(default, (tuple, list)):
            if not isinstance(value, (tuple, list)):
                raise ValueError(f"{where} = {value!r} must be a tuple/list, got {_type_name(value)}")
        elif not isinstance(value, type(default)):
            raise ValueError(f"{where} = {value!r} must be a {_type_name(default)}, got {_type_name(value)}")


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{key} = {value!r}; valid choices: {list(choices)}")


def _positive(key: str, value) -> None:
    if value <= 0:
        raise ValueError(f"{key} = {value!r} must be > 0")


def validate_model(config) -> None:
    m = config.model
    for key in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
        _positive(f"config.model.{key}", m[key])
    for key in ("rope_theta", "norm_eps", "init_std"):
        _positive(f"config.model.{key}", m[key])
    if m.num_heads % m.num_kv_heads:
        raise ValueError(f"config.model.num_heads = {m.num_heads} is not a multiple of config.model.num_kv_heads = "
                         f"{m.num_kv_heads}; valid num_kv_heads: divisors of {m.num_heads}: "
                         f"{[d for d in range(1, m.num_heads + 1) if m.num_heads % d == 0]}")
    if m.head_dim % 2:
        raise ValueError(f"config.model.head_dim = {m.head_dim} must be even (RoPE rotates pairs)")
    _choice("config.model.dtype", m.dtype, sorted(DTYPES))
    _choice("config.model.param_dtype", m.param_dtype, PARAM_DTYPES)
    from sparsejax.model import REMAT_POLICIES
    _choice("config.model.remat", m.remat, list(REMAT_POLICIES))


def validate_attention(config) -> None:
    _choice("config.attention.kind", config.attention.kind, attention_registry.registered_kinds())
    attention_registry.variant_module(config.attention.kind).validate(config)


def validate_mesh(config, num_devices: int | None) -> None:
    mesh_lib.validate_rules(mesh_lib.rules_from_config(config))
    for axis in mesh_lib.MESH_AXES:
        size = config.mesh[axis]
        if size < 1 and size != -1:
            raise ValueError(f"config.mesh.{axis} = {size!r} must be a positive int or -1 (the rest of the devices)")
    free = [a for a in mesh_lib.MESH_AXES if config.mesh[a] == -1]
    if len(free) > 1:
        raise ValueError(f"config.mesh: -1 may be used for at most one axis, got it for {free}")
    if num_devices is None:
        return
    sizes = mesh_lib.mesh_shape(config.mesh, num_devices)
    rules = mesh_lib.rules_from_config(config)

    def span(logical: str) -> int:
        return math.prod(sizes[a] for a in rules[logical])

    m, d = config.model, config.data
    micro_batch = d.global_batch_size // config.train.grad_accum_steps
    checks = [
        ("config.data.global_batch_size / config.train.grad_accum_steps", micro_batch, "batch"),
        ("config.data.seq_len", d.seq_len, "sequence"),
        ("config.model.num_heads", m.num_heads, "heads"),
        ("config.model.num_kv_heads", m.num_kv_heads, "kv_heads"),
        ("config.model.mlp_dim", m.mlp_dim, "mlp"),
        ("config.model.vocab_size", m.vocab_size, "vocab"),
        ("config.model.d_model", m.d_model, "embed"),
    ]
    for key, value, logical in checks:
        n = span(logical)
        if value % n:
            raise ValueError(f"{key} = {value} is not divisible by {n}, the size of mesh axes {rules[logical]} that "
                             f"'{logical}' is sharded over (mesh {sizes}); change the value or config.mesh")


def validate(config, num_devices: int | None = None) -> None:
    """Validate the whole config (see the module docstring); raises ValueError."""
    check_structure(config, default_config())
    validate_model(config)
    validate_attention(config)
    validate_mesh(config, num_devices)
    parallel_context.validate(config, num_devices)
    for name in SECTIONS:
        section_validate = section_module(name).validate
        if "num_devices" in inspect.signature(section_validate).parameters:
            section_validate(config, num_devices=num_devices)
        else:
            section_validate(config)
