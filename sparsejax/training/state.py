"""The train state (a pytree of plain dicts and arrays), its shardings, and its sharded creation.

The model is split once with `nnx.split(model, nnx.Param, ...)`: the graph definition stays on the
host (static), the parameters and any other model state travel through `jax.jit` as plain nested
dicts (`nnx.to_pure_dict`), which is also exactly what the checkpoints hold. Inside the step
`nnx.merge(graphdef, params, rest)` rebuilds the module (jax-ecosystem.md §5).
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sparsejax.parallel.mesh import model_shardings, rules_from_config


@flax.struct.dataclass
class TrainState:
    """step: int32 [] updates applied so far; params: nested dict of the model's `nnx.Param` values;
    opt_state: the optax state over `params`; rest: nested dict of the model's other variables."""
    step: jax.Array
    params: Any
    opt_state: Any
    rest: Any

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state, "rest": self.rest}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        return cls(step=d["step"], params=d["params"], opt_state=d["opt_state"], rest=d["rest"])


def build_model(config: ml_collections.ConfigDict):
    """A fresh `Transformer(config)` with parameters from `config.seed`."""
    from sparsejax.model import Transformer  # imported late: pulls in the attention registry
    return Transformer(config, rngs=nnx.Rngs(config.seed))


def split_model(model) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, params as a pure dict, other variables as a pure dict)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def merge_model(graphdef: nnx.GraphDef, params: dict, rest: dict):
    """Rebuilds the module from `split_model`'s pieces (inside or outside `jit`)."""
    return nnx.merge(graphdef, params, rest)


class StateFactory:
    """Creates the train state of `config` on `mesh`: abstract shapes, shardings, and sharded values.

    Parameters are sharded by their logical names through the mesh rules; each optimizer moment
    takes the sharding of its parameter; scalars (step, counters) are replicated.
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, optimizer: optax.GradientTransformation):
        self.config = config
        self.mesh = mesh
        self.optimizer = optimizer
        abstract_model = nnx.eval_shape(lambda: build_model(config))
        self.graphdef, abstract_params, abstract_rest = nnx.split(abstract_model, nnx.Param, ...)
        rules = rules_from_config(config)
        param_shardings = nnx.to_pure_dict(model_shardings(abstract_params, mesh, rules))
        rest_shardings = nnx.to_pure_dict(model_shardings(abstract_rest, mesh, rules))
        self.abstract = jax.eval_shape(self._init)
        replicated = NamedSharding(mesh, PartitionSpec())
        opt_shardings = optax.tree_map_params(
            optimizer, lambda _, sharding: sharding, self.abstract.opt_state, param_shardings,
            transform_non_params=lambda _: replicated,
            is_leaf=lambda x: isinstance(x, NamedSharding))
        self.shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings,
                                    rest=rest_shardings)

    def _init(self) -> TrainState:
        _, params, rest = split_model(build_model(self.config))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self.optimizer.init(params), rest=rest)

    def initializer(self):
        """The jitted initialiser: `initializer()` returns a fresh train state, created sharded."""
        return jax.jit(self._init, out_shardings=self.shardings)

    def create(self) -> TrainState:
        """A freshly initialised train state, created sharded by one jitted initialiser."""
        with jax.set_mesh(self.mesh):
            return self.initializer()()

    def abstract_with_shardings(self) -> TrainState:
        """ShapeDtypeStructs carrying the target shardings (the restore target)."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract, self.shardings)
