"""The Mosaic GPU backward (`pallas_kernels/block_sparse/mosaic_gpu_bwd.py`) on CPU.

Both kernels (dQ, dK/dV) run in jax's Mosaic GPU interpreter as extended by
tests/pallas_kernels/test_mosaic_gpu.py (`extended_interpreter`: register and transposed wgmma
operands, accumulator stores) and are compared with the float32 reference gradients (jax.vjp of
`reference.forward` with random cotangents on out and lse), on fresh random inputs each run. They
also lower for CUDA here; the PTX compile happens on the GPU (benchmarks/mosaic_bwd.py --sections
check runs the comparisons there).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import _close, random_case

from pallas_kernels import BlockLayout
from pallas_kernels.block_sparse import mosaic_gpu_bwd, reference, split

test_mosaic_gpu = pytest.importorskip("test_mosaic_gpu")
extended_interpreter = test_mosaic_gpu.extended_interpreter
InterpretGPUParams = test_mosaic_gpu.InterpretGPUParams
_inputs = test_mosaic_gpu._inputs
_shapes = test_mosaic_gpu._shapes
Cfg = mosaic_gpu_bwd.BwdConfig


def _reference(case):
  """(out, lse, (dq, dk, dv)) of the float32 reference with the case's cotangents."""
  q_pos, kv_pos, q_seg, kv_seg, scale, causal = _inputs(case)
  f = lambda q, k, v: reference.forward(q, k, v, case.layout, q_pos, kv_pos, q_seg, kv_seg,  # noqa: E731
                                        sm_scale=scale, causal=causal, interpret=False,
                                        window=case.kwargs.get("window"))
  (out, lse), vjp = jax.vjp(f, case.q, case.k, case.v)
  return out, lse, vjp((case.d_out, case.d_lse))


def _mosaic_grads(case, out, lse, config):
  q_pos, kv_pos, q_seg, kv_seg, scale, causal = _inputs(case)
  out = out.astype(case.q.dtype)
  row = jnp.einsum("bqhd,bqhd->bhq", case.d_out.astype(jnp.float32), out.astype(jnp.float32))
  delta = jnp.where(jnp.isneginf(lse), 0.0, row - case.d_lse)
  with extended_interpreter():
    return jax.block_until_ready(mosaic_gpu_bwd.backward(
        case.q, case.k, case.v, out, lse, delta, case.d_out, case.layout, q_pos, kv_pos, q_seg,
        kv_seg, sm_scale=scale, causal=causal, interpret=InterpretGPUParams(), config=config,
        window=case.kwargs.get("window")))


_BASE = dict(block_q=128, dqk=128, dv=128, dtype="bfloat16", num_kv_heads=1, group=1)
CASES = {
    # 2 query heads with a list each (Hl = Hq) over one KV head: block 0's dK/dV walk (2 heads x 2
    # units x 2 halves) wraps a 3-slot ring; two consumers taking turns (pingpong) in both
    # kernels, dQ in sub-blocks of 64 keys
    "causal_bk128_gqa": (dict(seq_len_q=256, seq_len_k=256, block_k=128, layout_kind="causal",
                              group=2, dqk=64, dv=64),
                         Cfg(dq_stages=2, dkv_stages=3, dq_sub_k=64, pingpong=True)),
    # one dK/dV consumer (block_k 64) software-pipelined (overlap), dQ over whole blocks, a 3-slot
    # dQ ring; Tq < Tk with the diagonal blocks only: KV blocks 0, 1 have empty inverse lists
    "diagonal_bk64_tq_lt_tk_overlap": (dict(seq_len_q=128, seq_len_k=256, block_k=64,
                                            layout_kind="diagonal"),
                                       Cfg(dq_stages=3, dkv_stages=2, dq_sub_k=None, stagger=1,
                                           overlap=True)),
    # causal without segments (the block-level mask skip) over random blocks with an empty unit
    "random_causal_empty_rows": (dict(seq_len_q=256, seq_len_k=256, block_k=128,
                                      layout_kind="random", dqk=64, dv=64), Cfg()),
    # one list per KV head shared by its 2 query heads (Hl = Hkv), random causal blocks, packed
    # documents with permuted positions (rows with nothing visible: lse -inf); two dK/dV
    # consumers software-pipelined (overlap) over a walk that crosses heads
    "gqa_kv_head_lists_segments": (dict(seq_len_q=256, seq_len_k=256, block_k=128,
                                        layout_kind="random", group=2, head_unit="kv", density=0.7,
                                        segments=True, positions="permuted", dqk=64, dv=64),
                                   Cfg(overlap=True)),
    # float16, D = 64, batch 2 over a layout of batch 1; random blocks with one empty and one full
    # unit, no causal mask and no segments (no element mask at all), a 4-slot dQ ring, no stagger
    "f16_d64_batch2_noncausal_empty_rows": (dict(seq_len_q=256, seq_len_k=128, block_k=64,
                                                 layout_kind="random", batch=2, layout_batch=1,
                                                 dqk=64, dv=64, dtype="float16", causal=False),
                                            Cfg(dq_stages=4, stagger=0)),
    # split dK/dV lists (chunks of 1 entry: every block's partials summed in order) with ragged
    # ends, the shape of NSA's compression attention: queries in a partial last unit, keys in a
    # partial last block (padded inside the wrapper), a list per KV head shared by its 2 heads,
    # packed documents
    "split_ragged_kv_head_lists_segments": (dict(seq_len_q=200, seq_len_k=168, block_k=64,
                                                 layout_kind="causal", group=2, head_unit="kv",
                                                 segments=True, dqk=64, dv=64),
                                            Cfg(list_chunk=1)),
    # a sliding window of 150 over causal 64-key blocks without segments (the block-level mask
    # skip, far edge included) and split lists
    "window_skip_split": (dict(seq_len_q=384, seq_len_k=384, block_k=64, layout_kind="causal",
                               window=150, dqk=64, dv=64), Cfg(list_chunk=2)),
    # a window with segment ids, a list per KV head shared by its 2 heads, overlapped consumers
    "window_segments_gqa_overlap": (dict(seq_len_q=256, seq_len_k=256, block_k=128,
                                         layout_kind="causal", window=37, group=2, head_unit="kv",
                                         segments=True, dqk=64, dv=64), Cfg(overlap=True)),
    # split lists of query-head units (2 per KV head) over random causal blocks with empty rows,
    # software-pipelined consumers, chunks of 2 entries (batch broadcast of the split's table and
    # sum: test_sum_partials_in_program_order)
    "split_query_head_lists_overlap": (dict(seq_len_q=256, seq_len_k=256, block_k=128,
                                            layout_kind="random", group=2, dqk=64, dv=64),
                                       Cfg(list_chunk=2, overlap=True)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_grads_match_reference_interpreted(name):
  params, config = CASES[name]
  case = random_case(np.random.SeedSequence().entropy % 2**31, **{**_BASE, **params})
  out, lse, want = _reference(case)
  got = _mosaic_grads(case, out, lse, config)
  for label, x, w, ref in zip(("dq", "dk", "dv"), got, want, (case.q, case.k, case.v)):
    assert x.dtype == ref.dtype and x.shape == ref.shape, (label, x.dtype, x.shape)
    assert not np.isnan(np.asarray(x, np.float32)).any(), label
    _close(label, x, w, 2e-2, case)


@pytest.mark.parametrize("causal, segments, block_k, d, dtype, config", [
    (True, False, 128, 128, jnp.bfloat16, None),
    (True, False, 128, 128, jnp.bfloat16, Cfg(pingpong=True, dq_sub_k=None)),
    (True, True, 128, 128, jnp.bfloat16, Cfg(overlap=True)),
    (True, True, 64, 128, jnp.bfloat16, None),
    (False, False, 64, 64, jnp.float16, Cfg(pingpong=True, dq_stages=4, registers=(232, 40))),
    (False, True, 128, 64, jnp.bfloat16, None)])
def test_lowers_for_cuda_without_gpu(causal, segments, block_k, d, dtype, config):
  """Both kernels lower to Mosaic GPU custom calls for CUDA (PTX compile happens on the GPU)."""
  b, t, hq, hkv = 1, 512, 4, 2
  q = jax.ShapeDtypeStruct((b, t, hq, d), dtype)
  kv = jax.ShapeDtypeStruct((b, t, hkv, d), dtype)
  ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
  lse = jax.ShapeDtypeStruct((b, hq, t), jnp.float32)
  layout = BlockLayout.causal(t, t, block_q=128, block_k=block_k, num_head_units=hkv)

  def f(q, k, v, do, lse, delta, pos, seg):
    seg = seg if segments else None
    return mosaic_gpu_bwd.backward(q, k, v, None, lse, delta, do, layout, pos, pos, seg, seg,
                                   sm_scale=0.1, causal=causal, config=config)

  text = jax.jit(f).trace(q, kv, kv, q, lse, lse, ids, ids).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("stablehlo.custom_call @mosaic_gpu") == 2


def test_split_at_run_time_lowers_for_cuda():
  """With the split decided on the device: the dQ kernel, and both dK/dV kernels (whole lists, the
  split's partials) in the two branches of one conditional, lower for CUDA."""
  t, nq = 512 * 128, 512
  q = jax.ShapeDtypeStruct((1, t, 1, 64), jnp.bfloat16)
  lse = jax.ShapeDtypeStruct((1, 1, t), jnp.float32)
  layout = BlockLayout.from_block_mask(jnp.eye(nq, dtype=bool)[None, None], block_q=128,
                                       block_k=128, max_kv_blocks=2)
  cfg = Cfg(split_at_run_time=True)
  assert mosaic_gpu_bwd.runs_split_test(layout, 1, 1, cfg)
  pos = jnp.arange(t, dtype=jnp.int32)[None]

  def f(q, k, v, do, lse, delta):
    return mosaic_gpu_bwd.backward(q, k, v, None, lse, delta, do, layout, pos, pos, None, None,
                                   sm_scale=0.1, causal=True, config=cfg)

  text = jax.jit(f).trace(q, q, q, q, lse, lse).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("stablehlo.custom_call @mosaic_gpu") == 3 and "stablehlo.case" in text


def test_attention_grad_lowers_for_cuda():
  """mosaic fwd + mosaic bwd under `attention`'s custom_vjp: jax.grad lowers (3 Mosaic calls)."""
  t = 256
  q = jax.ShapeDtypeStruct((1, t, 2, 128), jnp.bfloat16)
  layout = BlockLayout.causal(t, t, block_q=128, block_k=128, num_head_units=2)
  pos = jnp.arange(t, dtype=jnp.int32)[None]

  def loss(q, k, v):
    out, _ = mosaic_gpu_bwd.attention(q, k, v, layout, pos, pos, sm_scale=0.1, causal=True)
    return jnp.sum(out.astype(jnp.float32))

  text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, q, q).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("stablehlo.custom_call @mosaic_gpu") == 3


def _long_list_layout():
  """Every query unit lists KV block 0 and its own block (NSA-like): block 0's list is long."""
  nq = 64
  mask = jnp.eye(nq, dtype=bool).at[:, 0].set(True)[None, None]
  return BlockLayout.from_block_mask(mask, block_q=128, block_k=128, max_kv_blocks=2)


@pytest.mark.parametrize("shapes, layout, config, message", [
    *test_mosaic_gpu.SHARED_REFUSALS,
    (_shapes(), (128, 128), Cfg(dq_stages=3, dq_sub_k=None), "dq_stages=3"),
    (_shapes(), (128, 128), Cfg(dq_stages=5), "dq_stages=5"),
    (_shapes(), (128, 128), Cfg(dkv_stages=5), "dkv_stages=5"),
    (_shapes(), (128, 64), Cfg(dq_sub_k=128), "dq_sub_k=128"),
    (_shapes(), (128, 128), Cfg(dkv_stages=4, list_chunk=4), "dkv_stages=4 with split lists"),
])
def test_check_supported_names_the_value(shapes, layout, config, message):
  q, k, v = shapes
  lay = BlockLayout.causal(q.shape[1], k.shape[1], block_q=layout[0], block_k=layout[1])
  with pytest.raises(ValueError, match=message):
    mosaic_gpu_bwd.check_supported(q, k, v, lay, config)


def test_sum_partials_in_program_order():
  """The split's reduction: block j of every (batch, KV head) gets the sum of partial tiles
  first[j] .. first[j+1]-1, the table shared by a batch of 2 (layout batch 1), as [B, nk*bk, Hkv, D];
  a block without programs gets zeros."""
  rng = np.random.default_rng(0)
  b, hkv, programs, bk, d = 2, 2, 7, 4, 3
  part = rng.normal(size=(b, hkv, programs * bk, d)).astype(np.float32)
  first = np.array([[[0, 2, 2, 5, 7], [0, 1, 4, 4, 6]]], np.int32)          # [1, Hkv, nk+1]
  got = np.asarray(split.sum_partials(jnp.asarray(part), jnp.asarray(first), bk, jnp.float32, interpret=True))
  tiles = part.reshape(b, hkv, programs, bk, d)
  for bi in range(b):
    for h in range(hkv):
      for j in range(4):
        want = tiles[bi, h, first[0, h, j]:first[0, h, j + 1]].sum(0) if first[0, h, j + 1] > first[0, h, j] \
            else np.zeros((bk, d), np.float32)
        np.testing.assert_allclose(got[bi, j * bk:(j + 1) * bk, h], want, rtol=1e-6, atol=1e-6)


def test_list_chunk_by_shape():
  """Splits where one program per (KV block, KV head, batch) would serialise the backward: lists
  of one block far longer than the mean (NSA-like), or too few programs (NSA's compression
  attention at 64k: 32 KV blocks x 4 heads); not for a dense causal layout with enough programs."""
  cfg = Cfg()
  chunk = mosaic_gpu_bwd.list_chunk(_long_list_layout(), 1, 1, cfg)
  assert chunk == 8                                       # twice the mean list (2 entries), >= 8
  cmp = BlockLayout.causal(65536, 4096, block_q=128, block_k=128, num_head_units=4)
  chunk = mosaic_gpu_bwd.list_chunk(cmp, 4, 1, cfg)
  assert chunk == -(-512 * 32 * 4 // 2048)                # ~2048 programs over the entries' bound
  dense = BlockLayout.causal(8192, 8192, block_q=128, block_k=128, num_head_units=16)
  assert mosaic_gpu_bwd.list_chunk(dense, 16, 1, cfg) == 0
  assert mosaic_gpu_bwd.list_chunk(dense, 16, 1, Cfg(list_chunk=3)) == 3
  assert mosaic_gpu_bwd.list_chunk(cmp, 4, 1, Cfg(list_chunk=0)) == 0
  # the split's staging tiles take shared memory: one ring slot fewer than unsplit (4 -> 3)
  q = jax.ShapeDtypeStruct((1, 65536, 16, 128), jnp.bfloat16)
  assert mosaic_gpu_bwd.default_config(q, cmp, 4).dkv_stages < mosaic_gpu_bwd.default_config(q, cmp).dkv_stages


def test_split_at_run_time_decision():
  """`split_at_run_time` applies only where the split comes from the lists' possible length with
  enough programs for whole lists; the device-side test reads the real longest list."""
  on = Cfg(split_at_run_time=True)
  nq = 512                                     # 512 KV blocks x 1 KV head: enough whole programs
  diagonal = BlockLayout.from_block_mask(jnp.eye(nq, dtype=bool)[None, None], block_q=128,
                                         block_k=128, max_kv_blocks=2)
  long = BlockLayout.from_block_mask(jnp.eye(nq, dtype=bool).at[:, 0].set(True)[None, None],
                                     block_q=128, block_k=128, max_kv_blocks=2)
  for layout in (diagonal, long):
    assert mosaic_gpu_bwd.list_chunk(layout, 1, 1, on) == 8
    assert mosaic_gpu_bwd.runs_split_test(layout, 1, 1, on)
    assert mosaic_gpu_bwd.runs_split_test(layout, 1, 1, Cfg())                   # on by default
    assert not mosaic_gpu_bwd.runs_split_test(layout, 1, 1, Cfg(split_at_run_time=False))
    assert not mosaic_gpu_bwd.runs_split_test(layout, 1, 1, Cfg(split_at_run_time=True, list_chunk=8))
  assert int(split.longest_list(diagonal)) == 1
  assert int(split.longest_list(long)) == nq
  # few programs (NSA's compression attention): always split, the lists' lengths do not matter
  cmp = BlockLayout.causal(65536, 4096, block_q=128, block_k=128, num_head_units=4)
  assert not mosaic_gpu_bwd.runs_split_test(cmp, 4, 1, on)


def test_split_at_run_time_grads_interpreted(monkeypatch):
  """Both paths of the run-time choice (thresholds lowered so that 5 query units decide), against
  the float32 reference: one-entry lists run whole; block 0 listed by all 5 units runs split. Which
  branch ran is counted at run time: the split's partial sums report from inside the conditional."""
  monkeypatch.setattr(mosaic_gpu_bwd, "_MIN_CHUNK", 1)
  monkeypatch.setattr(mosaic_gpu_bwd, "_SPLIT_BELOW_PROGRAMS", 1)
  sums = []
  sum_partials = split.sum_partials

  def counted(*args, **kwargs):
    jax.debug.callback(lambda: sums.append(1))
    return sum_partials(*args, **kwargs)
  monkeypatch.setattr(split, "sum_partials", counted)
  on = Cfg(split_at_run_time=True)
  nq = 5
  case = random_case(np.random.SeedSequence().entropy % 2**31, **{
      **_BASE, "seq_len_q": nq * 128, "seq_len_k": nq * 128, "block_k": 128,
      "layout_kind": "diagonal", "dqk": 64, "dv": 64})
  block0 = BlockLayout.from_block_mask(jnp.zeros((1, 1, nq, nq), bool).at[..., 0].set(True),
                                       block_q=128, block_k=128, max_kv_blocks=1)
  for layout, longest, split_sums in ((case.layout, 1, 0), (block0, nq, 2)):
    c = dataclasses.replace(case, layout=layout)
    assert mosaic_gpu_bwd.list_chunk(layout, 1, 1, on) == 2
    assert mosaic_gpu_bwd.runs_split_test(layout, 1, 1, on)
    assert int(split.longest_list(layout)) == longest
    out, lse, want = _reference(c)
    q_pos, kv_pos, q_seg, kv_seg, scale, causal = _inputs(c)
    row = jnp.einsum("bqhd,bqhd->bhq", c.d_out.astype(jnp.float32), out.astype(jnp.float32))
    delta = jnp.where(jnp.isneginf(lse), 0.0, row - c.d_lse)
    sums.clear()
    with extended_interpreter():
      _, dk, dv = jax.block_until_ready(mosaic_gpu_bwd.backward(
          c.q, c.k, c.v, out.astype(c.q.dtype), lse, delta, c.d_out, layout, q_pos, kv_pos, q_seg,
          kv_seg, sm_scale=scale, causal=causal, interpret=InterpretGPUParams(), config=on,
          kernels=("dkv",)))
    jax.effects_barrier()
    assert len(sums) == split_sums, (longest, sums)    # dK's and dV's sums, in the split branch only
    for label, x, w in (("dk", dk, want[1]), ("dv", dv, want[2])):
      _close(label, x, w, 2e-2, c)


def test_default_config_fits_shared_memory():
  q = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
  for block_k, (dq, dkv) in ((128, (4, 4)), (64, (4, 5))):
    layout = BlockLayout.causal(256, 256, block_q=128, block_k=block_k)
    cfg = mosaic_gpu_bwd.default_config(q, layout)
    assert (cfg.dq_stages, cfg.dkv_stages) == (dq, dkv), cfg
    mosaic_gpu_bwd.check_supported(q, q, q, layout)


def test_config_validation():
  with pytest.raises(ValueError, match="dq_stages=1"):
    Cfg(dq_stages=1)
  with pytest.raises(ValueError, match="dq_sub_k=32"):
    Cfg(dq_sub_k=32)
  with pytest.raises(ValueError, match=r"registers=\(256, 24\)"):
    Cfg(registers=(256, 24))
  with pytest.raises(ValueError, match="stagger=-1"):
    dataclasses.replace(Cfg(), stagger=-1)
  with pytest.raises(ValueError, match="list_chunk=-1"):
    Cfg(list_chunk=-1)
