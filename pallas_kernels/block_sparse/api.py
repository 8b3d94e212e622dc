"""`block_sparse_attention`: validation, defaults, the one `custom_vjp`, and dispatch.

Implementations live in sibling modules (`reference`, `xla`, `pallas_gpu`, `pallas_tpu`) and provide
`check_supported`, `forward` and `backward` (docs/contracts.md §1); they are imported lazily, on
first use, so that a missing or broken one only affects calls that ask for it.
"""
from __future__ import annotations

import functools
import importlib
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.layout import BlockLayout

IMPLEMENTATIONS = ("reference", "xla", "pallas_gpu", "pallas_tpu")
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
_DEFAULT_BY_BACKEND = {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu", "tpu": "pallas_tpu"}
# `jax.ad_checkpoint.checkpoint_name` of the (out, lse) that a forward tags where its kernel is no
# primitive a remat policy can match by name (the Mosaic GPU forward, `mosaic_gpu.forward` says why);
# sparsejax.model's `dots_attention` policy saves values of this name.
KERNEL_OUTPUT_NAME = "block_sparse_kernel_out"


def default_implementation(backend: str | None = None) -> str:
    """The implementation `implementation=None` picks: pallas_gpu on GPU, pallas_tpu on TPU, else xla."""
    return _DEFAULT_BY_BACKEND.get(backend or jax.default_backend(), "xla")


def get_implementation(name: str):
    """Import and return the module `pallas_kernels.block_sparse.<name>`."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {name!r}; valid choices: {list(IMPLEMENTATIONS)} or None")
    module_name = f"pallas_kernels.block_sparse.{name}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise ValueError(f"implementation {name!r} is not available: module {module_name} does not exist "
                         f"in this installation") from e


def block_sparse_attention(q, k, v, layout: BlockLayout, *, sm_scale=None, causal=True, return_lse=True,
                           q_positions=None, kv_positions=None, q_segment_ids=None, kv_segment_ids=None,
                           window=None, implementation=None, interpret=False):
    """Attention of each query unit over the KV blocks its layout lists.

    q [B, Tq, Hq, Dqk], k [B, Tk, Hkv, Dqk], v [B, Tk, Hkv, Dv] with Hq = G·Hkv; dtypes bf16, f16 or
    f32 (all three the same). layout: `BlockLayout` with nq = ceil(Tq/block_q), nk = ceil(Tk/block_k).
    sm_scale: logit scale, default 1/sqrt(Dqk). causal: query i sees key j only if
    kv_positions[j] <= q_positions[i]; positions default to arange(Tk) and Tk - Tq + arange(Tq).
    q_segment_ids [B, Tq] / kv_segment_ids [B, Tk]: int32, both or neither; equal ids see each other.
    window: None or a Python int w >= 1 (static), only with causal=True: query i also needs
    q_positions[i] - kv_positions[j] < w (a sliding window of w keys ending at the query itself).
    implementation: None (pallas_gpu on GPU, pallas_tpu on TPU, xla elsewhere) or one of
    "reference", "xla", "pallas_gpu", "pallas_tpu". interpret: run a Pallas implementation in
    interpret mode.

    Returns out [B, Tq, Hq, Dv] in q's dtype and, if return_lse, lse [B, Hq, Tq] float32 (rows that see
    nothing: out 0, lse -inf). Both are differentiable in q, k, v.
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    _check_inputs(q, k, v, layout)
    batch, tq, _, dqk = q.shape
    tk = k.shape[1]
    q_pos = _positions(q_positions, "q_positions", batch, tq, tk - tq)
    kv_pos = _positions(kv_positions, "kv_positions", batch, tk, 0)
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must both be given or both be None, got "
                         f"q_segment_ids={'None' if q_segment_ids is None else 'an array'} and "
                         f"kv_segment_ids={'None' if kv_segment_ids is None else 'an array'}")
    q_seg = kv_seg = None
    if q_segment_ids is not None:
        q_seg = _int_array(q_segment_ids, "q_segment_ids", (batch, tq))
        kv_seg = _int_array(kv_segment_ids, "kv_segment_ids", (batch, tk))
    name = default_implementation() if implementation is None else implementation
    impl = get_implementation(name)
    try:
        impl.check_supported(q, k, v, layout)
    except ValueError as e:
        if implementation is not None:
            raise
        raise ValueError(f"{e} (implementation=None chose {name!r} for the {jax.default_backend()!r} backend; "
                         f"implementation='xla' serves every valid call, more slowly)") from e
    scale = 1.0 / math.sqrt(dqk) if sm_scale is None else _check_scale(sm_scale)
    causal = _check_causal(causal)
    window = _check_window(window, causal)
    attend = _attention_fn(name, scale, causal, window, bool(interpret))
    out, lse = attend(q, k, v, layout, q_pos, kv_pos, q_seg, kv_seg)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------- validation
def _check_inputs(q, k, v, layout) -> None:
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be 4-d [B, T, H, D], got shape {x.shape}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has unsupported dtype {x.dtype}; valid: bfloat16, float16, float32")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    (b, tq, hq, dqk), (bk, tk, hkv, dk), (bv, tv, hv, _) = q.shape, k.shape, v.shape
    if not b == bk == bv:
        raise ValueError(f"batch sizes differ: q {b}, k {bk}, v {bv}")
    if tk != tv or hkv != hv:
        raise ValueError(f"k {k.shape} and v {v.shape} must agree in [B, Tk, Hkv]")
    if dqk != dk:
        raise ValueError(f"q and k head dims differ: Dqk {dqk} vs {dk}")
    for name, n in (("Hq", hq), ("Hkv", hkv), ("Dqk", dqk), ("Dv", v.shape[3])):
        if n < 1:
            raise ValueError(f"{name} must be >= 1, got {name}={n} (q {q.shape}, k {k.shape}, v {v.shape})")
    if hq % hkv:
        raise ValueError(f"query heads Hq={hq} must be a multiple of KV heads Hkv={hkv}")
    layout.check_shapes(tq, tk, hq, hkv, b)
    layout.check_values()


def _static_scalar(x, name: str, kind: str):
    """x itself, or the Python value of a concrete 0-d jax array; a traced value is refused."""
    if not isinstance(x, jax.Array):
        return x
    try:
        return x.item() if x.ndim == 0 else x
    except jax.errors.ConcretizationTypeError as e:
        raise ValueError(f"{name} must be a Python {kind} (static), got a traced value"
                         + ("; scale q instead for a learned or traced scale" if name == "sm_scale" else "")) from e


def _check_scale(sm_scale) -> float:
    """sm_scale as a finite Python float (it is static, like `causal`)."""
    sm_scale = _static_scalar(sm_scale, "sm_scale", "number")
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, numbers.Real) or not math.isfinite(sm_scale):
        raise ValueError(f"sm_scale must be None or a finite real number, got {sm_scale!r}")
    return float(sm_scale)


def _check_causal(causal) -> bool:
    causal = _static_scalar(causal, "causal", "bool")
    if not isinstance(causal, (bool, np.bool_)):
        raise ValueError(f"causal must be a bool (True or False), got {causal!r}")
    return bool(causal)


def _check_window(window, causal: bool) -> int | None:
    """The window as a Python int (or None); it is static, like `causal`."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
        raise ValueError(f"window must be None or a Python int >= 1 (static), got {window!r}")
    if not causal:
        raise ValueError(f"window={window} needs causal=True (it keeps the {window} positions ending at the "
                         "query); got causal=False")
    return int(window)


def _int_array(x, name, shape):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got {x.dtype}")
    if x.shape != shape:
        raise ValueError(f"{name} must have shape [B, T] = {shape}, got {x.shape}")
    return x.astype(jnp.int32)


def _positions(x, name, batch, length, start):
    if x is None:
        return jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))
    return _int_array(x, name, (batch, length))


# ---------------------------------------------------------------------------------------- custom_vjp
@functools.lru_cache(maxsize=None)
def _attention_fn(name: str, sm_scale: float, causal: bool, window: int | None, interpret: bool):
    """The differentiable (out, lse) function for one implementation and static configuration."""
    impl = get_implementation(name)
    static = dict(sm_scale=sm_scale, causal=causal, window=window, interpret=interpret)

    @jax.custom_vjp
    def attend(q, k, v, layout, q_pos, kv_pos, q_seg, kv_seg):
        return impl.forward(q, k, v, layout, q_pos, kv_pos, q_seg, kv_seg, **static)

    def attend_fwd(q, k, v, layout, q_pos, kv_pos, q_seg, kv_seg):
        out, lse = impl.forward(q, k, v, layout, q_pos, kv_pos, q_seg, kv_seg, **static)
        return (out, lse), (q, k, v, out, lse, layout, q_pos, kv_pos, q_seg, kv_seg)

    def attend_bwd(residuals, cotangents):
        q, k, v, out, lse, layout, q_pos, kv_pos, q_seg, kv_seg = residuals
        d_out, d_lse = cotangents
        row_dot = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32),
                             precision=jax.lax.Precision.HIGHEST)
        delta = jnp.where(jnp.isneginf(lse), 0.0, row_dot - d_lse.astype(jnp.float32))
        dq, dk, dv = impl.backward(q, k, v, out, lse, delta, d_out.astype(q.dtype), layout, q_pos, kv_pos,
                                   q_seg, kv_seg, **static)
        return dq, dk, dv, None, None, None, None, None

    attend.defvjp(attend_fwd, attend_bwd)
    return attend
