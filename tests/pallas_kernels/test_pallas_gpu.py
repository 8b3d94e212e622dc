"""`pallas_gpu` (Pallas, Triton lowering) against the float32 `reference`, in interpret mode on CPU.

Every case compares out, lse and the gradients dq, dk, dv (through `block_sparse_attention`'s
custom_vjp, with random cotangents for both out and lse) on fresh random inputs and a random block
layout: the shared hypothesis cases of kernel_cases.py plus fixed cases for the shapes this kernel
treats specially (NSA's one-token units with 16 heads and 192/128 head dims, row tiling, units packed
into dK/dV tiles, split KV lists). Sizes are tiny: interpret mode runs the grid one program at a time.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel_cases import assert_matches_reference, cases, random_case
from pallas_kernels import BlockLayout, block_sparse_attention
from pallas_kernels.block_sparse import pallas_gpu, split


def _case(seed, *, batch, tq, tk, hq, hkv, hl, dqk, dv, block_q, block_k, density, dtype,
          segments=False, empty_unit=True, layout_batch=1):
  rng = np.random.default_rng(seed)
  nq, nk = -(-tq // block_q), -(-tk // block_k)
  mask = rng.random((layout_batch, hl, nq, nk)) < density
  if empty_unit:
    mask[0, 0, 0, :] = False                               # a query unit with an empty list
  layout = BlockLayout.from_block_mask(jnp.asarray(mask), block_q=block_q, block_k=block_k)
  q = jnp.asarray(rng.standard_normal((batch, tq, hq, dqk)), dtype)
  k = jnp.asarray(rng.standard_normal((batch, tk, hkv, dqk)), dtype)
  v = jnp.asarray(rng.standard_normal((batch, tk, hkv, dv)), dtype)
  kw = {}
  if segments:                                             # two packed documents per row
    cut = rng.integers(1, tk, size=(batch, 1))
    kv_seg = (np.arange(tk)[None] >= cut).astype(np.int32) + 1
    kw = dict(q_segment_ids=jnp.asarray(kv_seg[:, tk - tq:]), kv_segment_ids=jnp.asarray(kv_seg))
  cot = (jnp.asarray(rng.standard_normal((batch, tq, hq, dv)), dtype),
         jnp.asarray(rng.standard_normal((batch, hq, tq)), jnp.float32))
  return q, k, v, layout, kw, cot


def _run(impl, q, k, v, layout, kw, cot, causal):
  @jax.jit
  def run(q, k, v, layout, kw, cot):
    def f(q, k, v):
      return block_sparse_attention(q, k, v, layout, causal=causal, implementation=impl,
                                    interpret=impl == "pallas_gpu", **kw)
    (out, lse), vjp = jax.vjp(f, q, k, v)
    lse_cot = jnp.where(jnp.isneginf(lse), 0.0, cot[1])
    return (out, lse) + tuple(vjp((cot[0], lse_cot)))
  return run(q, k, v, layout, kw, cot)


def _check(case, causal=True):
  q = case[0]
  got = _run("pallas_gpu", *case, causal)
  want = _run("reference", *case, causal)
  tol = 2e-5 if q.dtype == jnp.float32 else 3e-2
  for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape, name
    assert not np.isnan(a).any(), f"{name} has NaN"
    if name == "lse":
      assert np.array_equal(np.isneginf(a), np.isneginf(b)), "rows that see nothing differ"
      a, b = np.where(np.isneginf(a), 0, a), np.where(np.isneginf(b), 0, b)
    err = np.abs(a - b).max() / max(1.0, np.abs(b).max())
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol}"
  return got


CASES = {
    # name: sizes (Tq < Tk, ragged ends everywhere: neither T is a multiple of its block)
    "nsa_token_units_g16_192_128": dict(batch=1, tq=5, tk=70, hq=32, hkv=2, hl=2, dqk=192, dv=128,
                                        block_q=1, block_k=64, density=0.6, dtype=jnp.float32,
                                        segments=True),
    "block_64_g4_rows_tiled_batch2": dict(batch=2, tq=70, tk=70, hq=8, hkv=2, hl=2, dqk=16, dv=32,
                                          block_q=64, block_k=32, density=0.7, dtype=jnp.float32,
                                          layout_batch=2),
    "moba_like_units_g3": dict(batch=1, tq=33, tk=48, hq=6, hkv=2, hl=2, dqk=48, dv=16, block_q=8,
                               block_k=16, density=0.6, dtype=jnp.float32),
    "bf16": dict(batch=1, tq=24, tk=40, hq=8, hkv=1, hl=1, dqk=64, dv=64, block_q=2, block_k=16,
                 density=0.7, dtype=jnp.bfloat16),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference(name):
  _check(_case(sum(map(ord, name)), **CASES[name]))


def test_small_tiles_skip_full_masks(monkeypatch):
  """16-row tiles: query units of 4 tokens x 8 heads span two tiles in the forward and dQ kernels,
  and the dK/dV kernel steps through one tile of a unit at a time; blocks that need no mask skip
  it (full rows: blocks before the first query are full, the others need the causal mask)."""
  tile = pallas_gpu.KernelConfig(rows=16, num_warps=4, num_stages=2, skip_full_masks=True)
  monkeypatch.setattr(pallas_gpu, "default_configs",
                      lambda *a: {"fwd": tile, "dq": tile, "dkv": tile})
  _check(_case(7, batch=1, tq=10, tk=36, hq=8, hkv=2, hl=2, dqk=16, dv=16, block_q=4,
               block_k=16, density=1.0, dtype=jnp.float32, empty_unit=False))


@pytest.mark.parametrize("params", [
    # A window smaller than a block, permuted positions and packed documents, GQA rows stacked.
    dict(block_q=4, block_k=16, group=4, head_unit="kv", seq_len_q=13, seq_len_k=37, layout_kind="random",
         positions="permuted", segments=True, window=5),
    # One-token units (NSA-like), the window layout, window of one block and a half, bf16.
    dict(block_q=1, block_k=16, group=8, head_unit="kv", num_kv_heads=1, seq_len_q=6, seq_len_k=50,
         layout_kind="window", dtype="bfloat16", window=24),
], ids=["sub_block_permuted", "token_units"])
def test_window(params):
  assert_matches_reference("pallas_gpu", random_case(13, **params))


def test_window_skip_full_masks(monkeypatch):
  """With skip_full_masks, a block before every query is skipped only if it also lies inside every
  query's window: with positions 60..63 and window 40, block 2 (keys 32..47) needs no mask but
  block 1 (16..31) does, though it passes the causal test."""
  tile = pallas_gpu.KernelConfig(rows=16, num_warps=4, num_stages=2, skip_full_masks=True)
  monkeypatch.setattr(pallas_gpu, "default_configs",
                      lambda *a: {"fwd": tile, "dq": tile, "dkv": tile})
  assert_matches_reference("pallas_gpu", random_case(
      5, block_q=4, block_k=16, group=2, head_unit="kv", seq_len_q=12, seq_len_k=64, layout_kind="full",
      window=40))


def test_empty_rows_give_zero_and_neg_inf():
  case = _case(3, batch=1, tq=16, tk=32, hq=2, hkv=1, hl=1, dqk=16, dv=16, block_q=8, block_k=16,
               density=0.0, dtype=jnp.float32)
  out, lse, dq, dk, dv = _check(case)
  assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))
  for g in (dq, dk, dv):
    assert np.all(np.asarray(g) == 0)


def test_split_kv_lists(monkeypatch):
  """dK/dV with the CSR lists cut into chunks of 2 entries (partial tiles, then an ordered sum);
  one-token units of 16 heads packed four to a 64-row tile."""
  configs = pallas_gpu.default_configs
  monkeypatch.setattr(pallas_gpu, "default_configs", lambda *a: dict(
      configs(*a), dkv=pallas_gpu.KernelConfig(rows=64, num_warps=4, num_stages=2, list_chunk=2)))
  _check(_case(11, batch=2, tq=9, tk=40, hq=32, hkv=2, hl=2, dqk=48, dv=32, block_q=1,
               block_k=16, density=0.7, dtype=jnp.float32))


def test_split_kv_lists_units_over_several_tiles(monkeypatch):
  """The split dK/dV pass with query units larger than a dK/dV tile (NSA's compression attention:
  64-token units x 16 heads): 8-token units x 4 heads = 32 rows over 16-row tiles, chunks of 3."""
  configs = pallas_gpu.default_configs
  monkeypatch.setattr(pallas_gpu, "default_configs", lambda *a: dict(
      configs(*a), dkv=pallas_gpu.KernelConfig(rows=16, num_warps=4, num_stages=2, list_chunk=3)))
  _check(_case(12, batch=1, tq=40, tk=48, hq=8, hkv=2, hl=2, dqk=16, dv=32, block_q=8,
               block_k=16, density=0.8, dtype=jnp.float32))


def test_split_is_chosen_for_skewed_lists_and_few_programs():
  """NSA-like shapes split: many one-token units with short lists (selection: chunks of twice the
  mean list), and the compression attention's 64 KV blocks x 4 heads, too few dK/dV programs for a
  GPU (chunks of 128 entries: about 2048 programs). Dense causal layouts over enough KV blocks and
  heads do not."""
  t = 8192
  nsa = BlockLayout.from_indices(jnp.zeros((1, 4, t, 16), jnp.int32), jnp.ones((1, 4, t), jnp.int32),
                                 block_q=1, block_k=64, num_kv_blocks=t // 64)
  dense = BlockLayout.causal(t, t, block_q=128, block_k=64, num_head_units=16)
  cmp_t, nq, nk = 65536, 1024, 64  # compressed tokens i at positions 16 i + 31, in blocks of 64
  counts = jnp.clip(((jnp.arange(nq) + 1) * 64 - 32) // (64 * 16) + 1, 0, nk).astype(jnp.int32)
  cmp = BlockLayout.from_indices(jnp.broadcast_to(jnp.arange(nk, dtype=jnp.int32), (1, 4, nq, nk)),
                                 jnp.broadcast_to(counts, (1, 4, nq)), block_q=64, block_k=64,
                                 num_kv_blocks=nk)
  for layout, tq, hq, hkv, chunk in ((nsa, t, 64, 4, 2048), (dense, t, 16, 16, 0), (cmp, cmp_t, 64, 4, 128)):
    tk = layout.num_kv_blocks * layout.block_k
    q = jax.ShapeDtypeStruct((1, tq, hq, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, tk, hkv, 128), jnp.bfloat16)
    cfg = pallas_gpu.default_configs(q, k, k, layout)["dkv"]
    g = pallas_gpu._geometry(q, k, k, layout, cfg, 1.0, True, False)
    assert pallas_gpu._list_chunk(g, layout, cfg, batch=1) == chunk


def test_split_at_run_time_decision():
  """`split_at_run_time` (the default) applies where the split comes from the lists' possible length
  with enough programs for whole lists; not when the config fixes the chunk or switches it off."""
  nq = 1024                                    # 1024 KV blocks x 1 KV head: enough whole programs
  diagonal = BlockLayout.from_block_mask(jnp.eye(nq, dtype=bool)[None, None], block_q=64,
                                         block_k=64, max_kv_blocks=2)
  q = jax.ShapeDtypeStruct((1, nq * 64, 1, 64), jnp.bfloat16)
  cfg = pallas_gpu.default_configs(q, q, q, diagonal)["dkv"]
  g = pallas_gpu._geometry(q, q, q, diagonal, cfg, 1.0, True, False)
  assert cfg.split_at_run_time and pallas_gpu._list_chunk(g, diagonal, cfg, batch=1) > 0
  assert pallas_gpu.runs_split_test(g, diagonal, cfg, batch=1)
  off = dataclasses.replace(cfg, split_at_run_time=False)
  assert not pallas_gpu.runs_split_test(g, diagonal, off, batch=1)
  assert not pallas_gpu.runs_split_test(g, diagonal, dataclasses.replace(cfg, list_chunk=4), batch=1)
  small = BlockLayout.from_block_mask(jnp.eye(512, dtype=bool)[None, None], block_q=64, block_k=64,
                                      max_kv_blocks=2)     # 512 whole programs: split by shape alone
  assert not pallas_gpu.runs_split_test(g, small, cfg, batch=1)


def test_split_at_run_time_both_branches(monkeypatch):
  """The run-time choice (programs threshold lowered so that 5 KV blocks decide), both paths against
  the float32 reference: one-entry lists run whole; block 0 listed by all 5 units runs split. The
  split branch is counted at run time (a debug callback inside the conditional)."""
  monkeypatch.setattr(pallas_gpu, "_DKV_MIN_PROGRAMS", 1)
  configs = pallas_gpu.default_configs
  monkeypatch.setattr(pallas_gpu, "default_configs", lambda *a: dict(
      configs(*a), dkv=pallas_gpu.KernelConfig(rows=16, num_warps=4, num_stages=2)))
  splits = []
  dkv_split = pallas_gpu._dkv_split

  def counted(*args):
    jax.debug.callback(lambda: splits.append(1))
    return dkv_split(*args)
  monkeypatch.setattr(pallas_gpu, "_dkv_split", counted)
  nq = 5
  seed = np.random.SeedSequence().entropy % 2**31
  q, k, v, _, kw, cot = _case(seed, batch=1, tq=nq * 16, tk=nq * 16, hq=2, hkv=2, hl=2, dqk=16, dv=16,
                              block_q=16, block_k=16, density=1.0, dtype=jnp.float32)
  eye = jnp.eye(nq, dtype=bool)
  for mask, longest, ran_split in ((eye, 1, False), (jnp.zeros_like(eye).at[:, 0].set(True), nq, True)):
    layout = BlockLayout.from_block_mask(jnp.broadcast_to(mask, (1, 2, nq, nq)), block_q=16,
                                         block_k=16, max_kv_blocks=1)
    assert int(split.longest_list(layout)) == longest
    splits.clear()
    _check((q, k, v, layout, kw, cot))
    jax.effects_barrier()
    assert bool(splits) == ran_split, (longest, splits)


def test_split_at_run_time_lowers_for_cuda(monkeypatch):
  """With the run-time choice the backward lowers to one conditional holding both dK/dV paths: the
  whole-list kernel in one branch, the partial and reduction kernels in the other (5 Triton calls
  with the forward and dQ)."""
  monkeypatch.setattr(pallas_gpu, "_DKV_MIN_PROGRAMS", 1)
  nq = 5
  q, k, v, _, kw, _ = _case(0, batch=1, tq=nq * 16, tk=nq * 16, hq=2, hkv=2, hl=2, dqk=16, dv=16,
                            block_q=16, block_k=16, density=1.0, dtype=jnp.bfloat16)
  layout = BlockLayout.from_block_mask(jnp.broadcast_to(jnp.eye(nq, dtype=bool), (1, 2, nq, nq)),
                                       block_q=16, block_k=16, max_kv_blocks=1)
  cfg = pallas_gpu.KernelConfig(rows=16, num_warps=4, num_stages=2)
  g = pallas_gpu._geometry(q, k, v, layout, cfg, 1.0, True, False)
  assert pallas_gpu.runs_split_test(g, layout, cfg, batch=1)
  configs = pallas_gpu.default_configs
  monkeypatch.setattr(pallas_gpu, "default_configs", lambda *a: dict(configs(*a), dkv=cfg))

  def loss(q, k, v):
    out, lse = block_sparse_attention(q, k, v, layout, implementation="pallas_gpu", **kw)
    return out.astype(jnp.float32).sum() + jnp.where(jnp.isneginf(lse), 0.0, lse).sum()

  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count("xla.gpu.triton") == 5 and "stablehlo.case" in text


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=cases(block_k=st.sampled_from([16, 32]), dqk=st.sampled_from([16, 32]),
                  dv=st.sampled_from([16, 32])))
def test_random_cases(case):
  """The shared random cases (every layout kind, permuted positions, segments, causal or not,
  both head units, GQA up to 16, block_q up to 128), restricted to the tiles pallas_gpu supports."""
  assert_matches_reference("pallas_gpu", case)


@pytest.mark.parametrize("list_chunk, kernels", [(0, 3), (2, 4)])
def test_lowers_for_cuda_without_gpu(monkeypatch, list_chunk, kernels):
  """The kernels lower to Triton custom calls for the CUDA platform (Triton IR only: the PTX
  compile happens in the GPU runtime and is exercised by benchmarks/kernels.py on the device):
  forward, dQ and dK/dV, or forward, dQ, partial dK/dV and their sum."""
  configs = pallas_gpu.default_configs
  monkeypatch.setattr(pallas_gpu, "default_configs", lambda *a: dict(
      configs(*a), dkv=pallas_gpu.KernelConfig(rows=64, num_warps=4, num_stages=2,
                                               list_chunk=list_chunk)))
  q, k, v, layout, kw, cot = _case(0, batch=1, tq=5, tk=70, hq=32, hkv=2, hl=2, dqk=192, dv=128,
                                   block_q=1, block_k=64, density=0.6, dtype=jnp.bfloat16,
                                   segments=True)

  def loss(q, k, v):
    out, lse = block_sparse_attention(q, k, v, layout, implementation="pallas_gpu", **kw)
    return out.astype(jnp.float32).sum() + jnp.where(jnp.isneginf(lse), 0.0, lse).sum()

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v).lower(
      lowering_platforms=("cuda",))
  assert lowered.as_text().count("xla.gpu.triton") == kernels


@pytest.mark.parametrize("t, block_k, window, dtype, mosaic_calls, triton_calls", [
    (384, 128, None, jnp.bfloat16, 3, 0), (384, 64, None, jnp.bfloat16, 3, 0),
    (330, 64, None, jnp.bfloat16, 3, 0), (4096, 128, None, jnp.bfloat16, 3, 2),
    (384, 32, None, jnp.bfloat16, 0, 3),
    (384, 128, 256, jnp.bfloat16, 3, 0), (384, 128, None, jnp.float32, 0, 3)])
def test_takes_mosaic_gpu_on_hopper(monkeypatch, t, block_k, window, dtype, mosaic_calls, triton_calls):
  """With a Hopper GPU as the backend (faked; the trace is lowered for CUDA) a call that the Mosaic
  GPU kernels support lowers to them: forward, dQ and dK/dV, also with ragged ends (the call is
  causal), with a sliding window, and with split dK/dV lists (4096 tokens: 32 KV blocks x 2 heads,
  too few programs: dQ, partial dK/dV, and `split.sum_partials`, a Triton kernel, for dK and for dV);
  calls they do not support (block_k 32, float32) lower to the three Triton kernels."""
  monkeypatch.setattr(pallas_gpu, "on_hopper", lambda: True)
  b, hq, hkv = 1, 4, 2  # lengths no other test traces (jax caches traces by shape)
  q = jax.ShapeDtypeStruct((b, t, hq, 128), dtype)
  kv = jax.ShapeDtypeStruct((b, t, hkv, 128), dtype)
  layout = BlockLayout.causal(t, t, block_q=128, block_k=block_k, num_head_units=hkv)

  def loss(q, k, v):
    out = block_sparse_attention(q, k, v, layout, window=window, return_lse=False,
                                 implementation="pallas_gpu")
    return out.astype(jnp.float32).sum()

  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count("stablehlo.custom_call @mosaic_gpu") == mosaic_calls
  assert text.count("xla.gpu.triton") == triton_calls


@pytest.mark.parametrize("change, message", [
    (dict(dqk=40), "multiples of 16"),
    (dict(dv=512), "multiples of 16"),
    (dict(block_k=8), "block_k in"),
    (dict(block_k=256), "block_k in"),
    (dict(block_k=128, dqk=256, dv=256, tk=256), "shared memory"),
])
def test_check_supported_rejects(change, message):
  sizes = dict(batch=1, tq=8, tk=16, hq=2, hkv=1, hl=1, dqk=32, dv=32, block_q=8, block_k=16,
               density=1.0, dtype=jnp.float32)
  sizes.update(change)
  q, k, v, layout, _, _ = _case(0, **sizes)
  with pytest.raises(ValueError, match=message):
    pallas_gpu.check_supported(q, k, v, layout)
