"""The device mesh and the logical-axis sharding rules.

Mesh axes, outermost to innermost: `data`, `fsdp`, `sequence`, `tensor`. The innermost axes get the
closest devices (`jax.make_mesh` orders devices by topology), so the axes that communicate in every
layer (tensor-parallel reductions, ring steps) sit inside the ones that communicate once per step
(data-parallel gradient reduction, FSDP gathers). Sizes come from `config.mesh`; exactly one may be
-1, meaning "the remaining devices".

Axis types are **Auto** on purpose. `jax.make_mesh` defaults to Explicit ("sharding in types") in jax
0.10; Explicit makes every op's output sharding part of its type, so einsums whose contracting
dimension is sharded (FSDP weights) and opaque calls (cuDNN custom calls, Pallas kernels) need
hand-written resharding at each site, and `shard_map` rejects inputs whose types do not match its
`in_specs`. With Auto axes we state the shardings that matter (parameters and optimizer state through
`jit` in/out shardings, batches, a few activation constraints through `constrain`) and the SPMD
partitioner propagates the rest; the ring attention wraps its own `jax.shard_map` explicitly.

Logical axis names (in the parameters' `out_sharding` metadata and in `constrain` calls) map onto mesh
axes through rules, a mapping `logical name -> tuple of mesh axes` (`()` = replicated). The defaults are
`DEFAULT_RULES`; an experiment overrides them in `config.sharding_rules`.

Usage (what the training loop does):

    mesh = make_mesh(config)
    rules = rules_from_config(config)
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    shardings = model_shardings(nnx.state(abstract), mesh, rules)     # same tree as the state
    with jax.set_mesh(mesh):                                         # activates `constrain`
        ...jax.jit(step, in_shardings=..., out_shardings=...)
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import ml_collections
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "sequence", "tensor")

# logical name -> mesh axes. Parameters: embed (d_model) is the FSDP axis; heads, kv_heads, mlp and
# vocab are tensor-parallel. Activations: batch over data and fsdp, sequence over sequence.
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "sequence": ("sequence",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "head_dim": (),
    "norm": (),
    "layers": (),      # the leading axis of the stacked parameters of scanned layers: never sharded
}

Rules = Mapping[str, Sequence[str]] | Sequence[tuple[str, Sequence[str]]]


def default_mesh_config():
    """The `config.mesh` section: all devices on FSDP by default."""
    return ml_collections.ConfigDict({"data": 1, "fsdp": -1, "sequence": 1, "tensor": 1})


def default_rules_config():
    """The `config.sharding_rules` section (a ConfigDict of tuples)."""
    return ml_collections.ConfigDict({k: tuple(v) for k, v in DEFAULT_RULES.items()})


def rules_from_config(config) -> dict[str, tuple[str, ...]]:
    """`config.sharding_rules` as a plain dict (the defaults when the config has no such section)."""
    section = config.get("sharding_rules", None)
    if section is None:
        return dict(DEFAULT_RULES)
    return {k: tuple(v) for k, v in section.items()}


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
    """Resolve `config.mesh` (one entry may be -1) against `num_devices`; raises naming the sizes."""
    sizes = {axis: mesh_config[axis] for axis in MESH_AXES}
    unknown = set(mesh_config.keys()) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"config.mesh has unknown axes {sorted(unknown)}; valid axes: {list(MESH_AXES)}")
    for axis, size in sizes.items():
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ValueError(f"config.mesh.{axis} = {size!r}: must be a positive int or -1 (the rest of the devices)")
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"config.mesh: -1 may be used for at most one axis, got it for {free}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"config.mesh {sizes}: the fixed axes multiply to {fixed}, which does not divide "
                             f"the {num_devices} devices")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(f"config.mesh {sizes}: the axes multiply to {fixed} but there are {num_devices} devices; "
                         f"make the product {num_devices} or set one axis to -1")
    return sizes


def make_mesh(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, sequence, tensor) mesh of `config.mesh` over `devices` (default: all), Auto axes."""
    devices = list(jax.devices()) if devices is None else list(devices)
    sizes = mesh_shape(config.mesh, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(names: Sequence[str | None], rules: Rules, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> PartitionSpec:
    """PartitionSpec of an array whose axes have logical `names` (None = replicated axis).

    With `shape` and `mesh` given, checks that every sharded dimension is divisible by its mesh axes.
    Raises on an unknown logical name or a mesh axis used by two dimensions. `rules` is a mapping or a
    sequence of (name, axes) pairs.
    """
    rules = dict(rules)
    used: dict[str, str | None] = {}
    spec = []
    for i, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known names: {sorted(rules)}")
        axes = tuple(rules[name])
        for a in axes:
            if a in used:
                raise ValueError(f"mesh axis {a!r} is used by both logical axes {used[a]!r} and {name!r} "
                                 f"of one array (names {tuple(names)}); fix the sharding rules")
            used[a] = name
        if shape is not None and mesh is not None and axes:
            n = math.prod(mesh.shape[a] for a in axes)
            if shape[i] % n:
                raise ValueError(f"dimension {i} ({name!r}) of size {shape[i]} is not divisible by mesh axes "
                                 f"{axes} of total size {n} (array shape {tuple(shape)})")
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def logical_to_sharding(names: Sequence[str | None], mesh: Mesh, rules: Rules,
                        shape: Sequence[int] | None = None) -> NamedSharding:
    """NamedSharding on `mesh` of an array with logical axis `names` (see `logical_to_spec`)."""
    return NamedSharding(mesh, logical_to_spec(names, rules, shape, mesh))


def model_shardings(state, mesh: Mesh, rules: Rules):
    """NamedShardings for an nnx state (model or optimizer, abstract or concrete), same tree structure.

    Variables with `out_sharding` metadata (logical names) get the rules' sharding; everything else
    (scalars, step counters, RNG keys) is replicated.
    """
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(x):
        if isinstance(x, nnx.Variable):
            names = x.get_metadata().get("out_sharding", None)
            shape = getattr(x.get_value(), "shape", ())
            sharding = (logical_to_sharding(names, mesh, rules, shape) if names else replicated)
            return x.replace(sharding)
        return replicated

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of the [B, T] batch arrays: batch over (data, fsdp), sequence over sequence."""
    return logical_to_sharding(("batch", "sequence"), mesh, rules)


def constrain(x: jax.Array, names: Sequence[str | None], rules: Rules) -> jax.Array:
    """`with_sharding_constraint` by logical names under the mesh set with `jax.set_mesh`; no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules))


def validate_rules(rules: Rules) -> None:
    """Each rule maps a logical name to a tuple of distinct mesh axes."""
    for name, axes in rules.items():
        if not isinstance(axes, (tuple, list)) or any(a not in MESH_AXES for a in axes):
            raise ValueError(f"sharding_rules.{name} = {axes!r}: must be a tuple of mesh axes from {list(MESH_AXES)}")
        if len(set(axes)) != len(axes):
            raise ValueError(f"sharding_rules.{name} = {axes!r}: a mesh axis appears twice")
    missing = set(DEFAULT_RULES) - set(rules)
    if missing:
        raise ValueError(f"sharding_rules lacks {sorted(missing)}; every logical name needs a rule")
    if tuple(rules["layers"]):
        raise ValueError(f"sharding_rules.layers = {tuple(rules['layers'])!r}: the stacked layer axis of scanned "
                         f"layers (config.model.scan_layers) is sliced by the scan at every layer; it must be ()")

