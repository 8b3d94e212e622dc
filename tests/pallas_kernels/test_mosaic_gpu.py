"""The Mosaic GPU forward (`pallas_kernels/block_sparse/mosaic_gpu.py`) on CPU.

jax's Mosaic GPU interpreter (0.10) runs TMA copies, barriers, warpgroup threads and wgmma from
shared memory, but not the three things this kernel needs besides: a wgmma whose A operand is in
registers (P V), one whose B operand is a transposed view (Q Kᵀ), and storing registers into a
wgmma accumulator. `extended_interpreter` adds those (and lets layout casts, which only matter to
the lowering, through) for the duration of a test, so that the kernel itself runs on CPU -- the
producer / consumer warpgroups, the TMA ring and its barriers, the list walk and its stagger, the
masks and the online softmax -- and is compared with `reference`; the interpreter also checks that
every barrier phase is observed. The same kernel lowers for CUDA here; the PTX compile happens on
the GPU (benchmarks/mosaic_fwd.py --sections check runs comparisons like these there).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import _close, random_case

from pallas_kernels import BlockLayout
from pallas_kernels.block_sparse import mosaic_gpu, pallas_gpu, reference

interpreter = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.jaxpr_interpret")
from jax._src import callback  # noqa: E402
from jax._src.pallas.mosaic.interpret import utils as interpret_utils  # noqa: E402
from jax._src.pallas.mosaic_gpu import core as gpu_core  # noqa: E402
from jax._src.pallas.mosaic_gpu import primitives as gpu_primitives  # noqa: E402
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks  # noqa: E402
from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: E402
from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import (  # noqa: E402
    reset_gpu_interpret_mode_state)
from jax._src.state import types as state_types  # noqa: E402


# ----------------------------------------------------------------------------------------------
# The interpreter extension (jax 0.10's internals; the tests that need it skip elsewhere)


def _read_smem(memory, key, transforms, thread):
  """Contents of a shared-memory ref view: its indexers, then an optional trailing transpose."""
  transforms = gpu_callbacks._remove_noop_transforms(tuple(transforms))
  perm = None
  if transforms and isinstance(transforms[-1], state_types.TransposeTransform):
    perm, transforms = transforms[-1].permutation, transforms[:-1]
  index = transforms
  x, _, _ = memory.get_buffer_content(gpu_callbacks.HostAllocationKey.from_array(key),
                                      interpret_utils.to_range(jax.tree.map(int, index)), thread,
                                      logging_info=None)
  return x if perm is None else np.transpose(x, perm)


def _wgmma(token, device_id, thread_id, acc, acc_transforms, a, a_transforms, b, b_transforms, *,
           acc_dtype, a_in_smem):
  """acc += a @ b in float32, a from shared memory or registers, either operand possibly a
  transposed view."""
  memory = gpu_callbacks._get_shared_memory()
  thread = memory.get_global_thread_id(int(device_id), int(thread_id))
  a = _read_smem(memory, a, a_transforms, thread) if a_in_smem else np.asarray(a)
  b = _read_smem(memory, b, b_transforms, thread)
  key = gpu_callbacks.HostAllocationKey.from_array(acc)
  rng = interpret_utils.to_range(jax.tree.map(int, gpu_callbacks._remove_noop_transforms(acc_transforms)))
  cur, _, _ = memory.get_buffer_content(key, rng, thread, logging_info=None)
  res = cur + np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(acc_dtype)
  memory.store_buffer_content(key, rng, res, thread, logging_info=None)
  return token


def _interpret_wgmma(self, eqn, token, get_invals):
  acc, a, b, *leaves = get_invals()
  trees = [eqn.params[f"{x}_transforms_tree"] or jax.tree.structure([]) for x in ("acc", "a", "b")]
  acc_t, a_t, b_t = jax.tree.unflatten(jax.tree_util.treedef_tuple(trees), leaves)
  run = functools.partial(_wgmma, acc_dtype=eqn.invars[0].aval.dtype,
                          a_in_smem=isinstance(eqn.invars[1].aval, state_types.AbstractRef))
  token = callback.io_callback(run, gpu_callbacks.TOKEN_SHAPE_DTYPE, token, self.device_info.device_id,
                               self.thread_id, acc, acc_t, a, a_t, b, b_t, ordered=True)
  return token, []


def _interpret_other(self, original, eqn, get_invals):
  if eqn.primitive is gpu_core.layout_cast_p:
    return get_invals()[0]
  if eqn.primitive is gpu_primitives.wgmma_accumulator_store_p:
    acc, val = get_invals()
    # ordered: it must land before the wgmma (also ordered) that accumulates into it
    callback.io_callback(
        functools.partial(gpu_callbacks._swap, source_info=eqn.source_info),
        (gpu_callbacks.TOKEN_SHAPE_DTYPE, eqn.invars[1].aval), jnp.int32(0),
        jnp.int32(self.device_info.device_id), self.grid_point_coords, self.thread_id, acc, (), val,
        None, ordered=True)
    return []
  return original(self, eqn, get_invals)


@contextlib.contextmanager
def extended_interpreter():
  """jax's Mosaic GPU interpreter with the wgmma forms and accumulator stores the kernel uses."""
  cls = interpreter.JaxprInterpreter
  saved = cls._interpret_wgmma_ref_p, cls._interpret_arithmetic_primitive
  cls._interpret_wgmma_ref_p = _interpret_wgmma
  cls._interpret_arithmetic_primitive = functools.partialmethod(_interpret_other, saved[1])
  try:
    yield
  except Exception:
    reset_gpu_interpret_mode_state()
    raise
  finally:
    cls._interpret_wgmma_ref_p, cls._interpret_arithmetic_primitive = saved


# ----------------------------------------------------------------------------------------------
# Cases


def _inputs(case):
  """(q_pos, kv_pos, q_seg, kv_seg, sm_scale, causal) of a kernel_cases Case, positions filled in."""
  kw = case.kwargs
  b, tq, tk = case.q.shape[0], case.q.shape[1], case.k.shape[1]
  q_pos = kw.get("q_positions", jnp.broadcast_to(tk - tq + jnp.arange(tq, dtype=jnp.int32), (b, tq)))
  kv_pos = kw.get("kv_positions", jnp.broadcast_to(jnp.arange(tk, dtype=jnp.int32), (b, tk)))
  return (q_pos, kv_pos, kw.get("q_segment_ids"), kw.get("kv_segment_ids"), kw["sm_scale"],
          kw["causal"])


def _run(impl, case, **extra):
  q_pos, kv_pos, q_seg, kv_seg, scale, causal = _inputs(case)
  return impl.forward(case.q, case.k, case.v, case.layout, q_pos, kv_pos, q_seg, kv_seg,
                      **{"sm_scale": scale, "causal": causal, "window": case.kwargs.get("window"),
                         **extra})


def _mosaic(case, config):
  with extended_interpreter():
    return jax.block_until_ready(_run(mosaic_gpu, case, interpret=InterpretGPUParams(), config=config))


_BASE = dict(block_q=128, dqk=128, dv=128, dtype="bfloat16", num_kv_heads=1, group=1)
CASES = {
    # ring of 2 slots wrapped 2x (4 blocks in the last unit), pingpong, stagger
    "causal_bk64": (dict(seq_len_q=256, seq_len_k=256, block_k=64, layout_kind="causal"),
                    mosaic_gpu.MosaicConfig(num_stages=2, softmax_fence=True)),
    # Tq < Tk: bottom-right aligned, the unit's own block half masked, the rest skip the mask;
    # 2 query heads with their own lists over 1 KV head; batch 2 over a layout of batch 1
    "causal_bk128_tq_lt_tk": (dict(seq_len_q=128, seq_len_k=384, block_k=128, layout_kind="causal",
                                   group=2, batch=2, layout_batch=1),
                              mosaic_gpu.MosaicConfig(num_stages=2)),
    # one empty and one full unit per head, no causal mask; 3 stages, no pingpong, no stagger
    "random_noncausal_empty_rows": (dict(seq_len_q=384, seq_len_k=256, block_k=64, layout_kind="random",
                                         causal=False),
                                    mosaic_gpu.MosaicConfig(num_stages=3, pingpong=False, stagger=0)),
    # one list per KV head shared by its 2 query heads, random causal blocks (some fully masked)
    "gqa_kv_head_lists": (dict(seq_len_q=256, seq_len_k=256, block_k=128, layout_kind="random",
                               group=2, head_unit="kv", density=0.7),
                          mosaic_gpu.MosaicConfig(num_stages=2)),
    # packed documents with a padding tail, permuted positions (rows with nothing visible)
    "segments_permuted": (dict(seq_len_q=256, seq_len_k=256, block_k=64, layout_kind="random",
                               segments=True, positions="permuted", density=0.8),
                          mosaic_gpu.MosaicConfig(num_stages=4, stagger=1)),
    # ragged ends (causal): Tq = 200 and Tk = 300 padded to 256 / 320 inside `forward`, segments
    "ragged_causal": (dict(seq_len_q=200, seq_len_k=300, block_k=64, layout_kind="random",
                           segments=True, density=0.8),
                      mosaic_gpu.MosaicConfig(num_stages=2)),
    # a sliding window of 150 over causal 64-key blocks: blocks inside every row's window skip the
    # element mask, blocks across its far edge (or wholly past it) are masked
    "window_causal_skip": (dict(seq_len_q=384, seq_len_k=384, block_k=64, layout_kind="causal",
                                window=150),
                           mosaic_gpu.MosaicConfig(num_stages=3)),
    # a window with ragged ends and segment ids (every block masked element-wise)
    "window_ragged_segments": (dict(seq_len_q=200, seq_len_k=300, block_k=128, layout_kind="causal",
                                    window=77, segments=True),
                               mosaic_gpu.MosaicConfig(num_stages=2)),
    # persistent grids (`programs`): 3 programs over 4 items (2 query heads x batch 2 over a causal
    # layout of batch 1), so program 0 takes items 0 and 3 and its ring runs on from one to the next
    "persistent_causal_tq_lt_tk": (dict(seq_len_q=128, seq_len_k=384, block_k=128, layout_kind="causal",
                                        group=2, batch=2, layout_batch=1),
                                   mosaic_gpu.MosaicConfig(num_stages=2, programs=3)),
    # 2 programs over 3 units, one empty list and one full (the empty one between two others of
    # program 0 or alone), a ring of 3 slots that wraps across items, no pingpong, no stagger
    "persistent_random_empty_rows": (dict(seq_len_q=384, seq_len_k=256, block_k=64, layout_kind="random",
                                          causal=False),
                                     mosaic_gpu.MosaicConfig(num_stages=3, pingpong=False, stagger=0,
                                                             programs=2)),
    # 3 programs over 8 items (4 units x 2 query heads sharing a list per KV head), segments,
    # causal 64-key blocks, some masked element-wise and some skipping the mask, stagger 1, 3 slots
    "persistent_gqa_segments": (dict(seq_len_q=512, seq_len_k=512, block_k=64, layout_kind="random",
                                     group=2, head_unit="kv", segments=True, density=0.6),
                                mosaic_gpu.MosaicConfig(num_stages=3, stagger=1, programs=3)),
    # float16, D = 64, batch 2 with a list per batch row, segments without causal masking
    "f16_d64_batch2": (dict(seq_len_q=128, seq_len_k=256, block_k=64, layout_kind="top_k", batch=2,
                            layout_batch=2, dqk=64, dv=64, dtype="float16", segments=True,
                            causal=False, density=0.7),
                       mosaic_gpu.MosaicConfig(num_stages=2)),
}


def _case(name, seed=0):
  params, config = CASES[name]
  return random_case(seed, **{**_BASE, **params}), config


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_interpreted(name):
  """out and lse (its -inf rows exactly) against the float32 reference, fresh random inputs."""
  case, config = _case(name, seed=np.random.SeedSequence().entropy % 2**31)
  out, lse = _mosaic(case, config)
  want_out, want_lse = _run(reference, case, interpret=False)
  tol = 2e-2
  _close("out", out, want_out, tol, case)
  _close("lse", lse, want_lse, tol, case)
  assert out.dtype == case.q.dtype and lse.dtype == jnp.float32
  assert lse.shape == (case.q.shape[0], case.q.shape[2], case.q.shape[1])


def test_pallas_gpu_backward_consumes_its_lse():
  """pallas_gpu.backward from mosaic_gpu's (out, lse) gives the reference gradients."""
  case, config = _case("causal_bk64")
  q_pos, kv_pos, q_seg, kv_seg, scale, causal = _inputs(case)
  out, lse = _mosaic(case, config)
  delta = jnp.einsum("bqhd,bqhd->bhq", case.d_out.astype(jnp.float32), out.astype(jnp.float32))
  delta = jnp.where(jnp.isneginf(lse), 0.0, delta - case.d_lse)
  grads = pallas_gpu.backward(case.q, case.k, case.v, out, lse, delta, case.d_out, case.layout, q_pos,
                              kv_pos, q_seg, kv_seg, sm_scale=scale, causal=causal, interpret=True)
  _, vjp = jax.vjp(lambda q, k, v: reference.forward(q, k, v, case.layout, q_pos, kv_pos, q_seg, kv_seg,
                                                     sm_scale=scale, causal=causal, interpret=False),
                   case.q, case.k, case.v)
  for name, got, want in zip(("dq", "dk", "dv"), grads, vjp((case.d_out, case.d_lse))):
    _close(name, got, want, 2e-2, case)


@pytest.mark.parametrize("causal, segments, block_k, d, dtype, programs", [
    (True, False, 128, 128, jnp.bfloat16, 0), (True, True, 64, 128, jnp.bfloat16, 0),
    (False, False, 64, 64, jnp.float16, 0), (False, True, 128, 64, jnp.bfloat16, 0),
    (True, True, 128, 128, jnp.bfloat16, 132), (True, False, 64, 128, jnp.bfloat16, 5)])
def test_lowers_for_cuda_without_gpu(causal, segments, block_k, d, dtype, programs):
  """The kernel lowers to one Mosaic GPU custom call for CUDA (the Pallas-to-Mosaic lowering: layouts,
  wgmma shapes, TMA and barriers; the PTX compile happens in the GPU runtime), persistent grids too
  (132 programs: more than the 16 items, so 16)."""
  b, t, hq, hkv = 1, 512, 4, 2
  q = jax.ShapeDtypeStruct((b, t, hq, d), dtype)
  kv = jax.ShapeDtypeStruct((b, t, hkv, d), dtype)
  ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
  layout = BlockLayout.causal(t, t, block_q=128, block_k=block_k, num_head_units=hkv)

  def f(q, k, v, pos, seg):
    seg = seg if segments else None
    return mosaic_gpu.forward(q, k, v, layout, pos, pos, seg, seg, sm_scale=0.1, causal=causal,
                              config=dataclasses.replace(mosaic_gpu.default_config(q, layout), programs=programs))

  text = jax.jit(f).trace(q, kv, kv, ids, ids).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("stablehlo.custom_call @mosaic_gpu") == 1


def _shapes(tq=256, tk=256, d=128, dv=None, dtype=jnp.bfloat16):
  return (jax.ShapeDtypeStruct((1, tq, 2, d), dtype), jax.ShapeDtypeStruct((1, tk, 2, d), dtype),
          jax.ShapeDtypeStruct((1, tk, 2, dv or d), dtype))


# (shapes, (block_q, block_k), config, message) that this forward and mosaic_gpu_bwd both refuse
# (non-causal: no ragged ends); test_mosaic_gpu_bwd.py adds the backward's own
SHARED_REFUSALS = [
    (_shapes(dtype=jnp.float32), (128, 64), None, "bfloat16 or all float16"),
    (_shapes(d=96), (128, 64), None, "Dqk = Dv in"),
    (_shapes(dv=64), (128, 64), None, "Dqk = Dv in"),
    (_shapes(), (64, 64), None, "block_q=128"),
    (_shapes(), (128, 32), None, "block_k in"),
    (_shapes(tq=200), (128, 64), None, "Tq=200"),
    (_shapes(tk=200), (128, 64), None, "Tk=200"),
]


@pytest.mark.parametrize("shapes, layout, config, message", [
    *SHARED_REFUSALS,
    (_shapes(), (128, 128), mosaic_gpu.MosaicConfig(num_stages=3), "shared memory"),
])
def test_check_supported_names_the_value(shapes, layout, config, message):
  q, k, v = shapes
  lay = BlockLayout.causal(q.shape[1], k.shape[1], block_q=layout[0], block_k=layout[1])
  with pytest.raises(ValueError, match=message):
    mosaic_gpu.check_supported(q, k, v, lay, config)


def test_default_config_fits_shared_memory():
  """The deepest ring that fits: 2 stages of 128-key blocks, 4 of 64-key blocks (D = 128, bf16)."""
  q = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
  for block_k, stages in ((128, 2), (64, 4)):
    layout = BlockLayout.causal(256, 256, block_q=128, block_k=block_k)
    assert mosaic_gpu.default_config(q, layout).num_stages == stages
    mosaic_gpu.check_supported(q, q, q, layout)


@pytest.mark.parametrize("change, message", [
    (dict(interpret=True), "interpret=True"),
    (dict(window=64, causal=False), "positive int with causal=True"),
    (dict(window=0), "window=0"),
    (dict(sm_scale=-1.0), "sm_scale > 0"),
])
def test_forward_refuses(change, message):
  case, _ = _case("causal_bk64")
  with pytest.raises(ValueError, match=message):
    _run(mosaic_gpu, case, **{"interpret": False, **change})


def test_config_validation():
  with pytest.raises(ValueError, match="num_stages=1"):
    mosaic_gpu.MosaicConfig(num_stages=1)
  with pytest.raises(ValueError, match="stagger=-1"):
    dataclasses.replace(mosaic_gpu.MosaicConfig(), stagger=-1)
  with pytest.raises(ValueError, match="programs=-1"):
    mosaic_gpu.MosaicConfig(programs=-1)
