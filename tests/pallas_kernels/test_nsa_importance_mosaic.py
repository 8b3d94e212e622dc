"""NSA's selection importance in Mosaic GPU (`pallas_kernels/nsa_importance_mosaic.py`) on CPU.

The kernel runs in jax's Mosaic GPU interpreter, extended by test_mosaic_gpu.py with the wgmma forms
it lacks (register A operand, transposed B operand, accumulator stores), against an independent
float32 XLA oracle on fresh random inputs: p_cmp = exp(q·k̃ᵀ·scale − lse) over the visible compressed
tokens (block-causal, same segment, finite lse), summed over the G heads of each group, then
`compressed.block_importance` (Eq. 9). The oracle reads the same bfloat16 / float16 q and k̃ values,
upcast. The interpreter compiles every program's threads on its own (≈ 1.5 s a program on 2 cores),
so the cases have few query tiles and many steps (small strides d: many compressed tokens per query):
steps are cheap, programs are not. Plus the CUDA lowering (no GPU needed) and the refusals.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_mosaic_gpu import InterpretGPUParams, extended_interpreter

from pallas_kernels import nsa_importance_mosaic as nim
from sparsejax.attention.compressed import block_importance, compressed_positions, compressed_segments


def oracle(q, k_cmp, lse, positions, q_seg, kv_seg, *, block, stride, select_block, num_blocks, block_n=None):
  """float32 p_slc [B, K, T, S] from q [B, T, H, D], k̃ [B, N, K, D] (upcast), lse [B, H, T]."""
  b, t, h, d = q.shape
  n, kv = k_cmp.shape[1], k_cmp.shape[2]
  g = h // kv
  logits = jnp.einsum("btkgd,bnkd->bkgtn", q.astype(jnp.float32).reshape(b, t, kv, g, d),
                      k_cmp.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST) / math.sqrt(d)
  visible = ((compressed_positions(n, block, stride)[None, None, :] <= positions[:, :, None])
             & (kv_seg[:, None, :] == q_seg[:, :, None]))                         # [B, T, N]
  lse = lse.reshape(b, kv, g, t)[..., None]
  ok = visible[:, None, None] & (lse > -jnp.inf)
  p = jnp.where(ok, jnp.exp(logits - jnp.where(lse > -jnp.inf, lse, 0.0)), 0.0).sum(2)  # [B, K, T, N]
  return block_importance(p, num_blocks, select_block=select_block, block=block, stride=stride)


def make_case(seed, *, b=1, t=64, kv=1, g=16, d=128, block=2, stride=1, select_block=4, dtype=jnp.bfloat16,
              documents=0, block_n=None):
  """Kernel arguments and keywords: random q, k̃ (scaled so that the probabilities spread), the
  compression branch's lse (logsumexp over the visible tokens; −inf rows: those that see none, plus
  ~10% set to −inf), positions 0 .. T−1, `documents` extra document cuts per row at random places, or
  at the given tuple of places (segment ids from 1; the compressed tokens across a cut get −1, as
  `compressed_segments` gives)."""
  rng = np.random.default_rng(seed)
  n = 0 if t < block else (t - block) // stride + 1
  q = jnp.asarray(rng.standard_normal((b, t, kv * g, d)) * 1.5, dtype)
  k_cmp = jnp.asarray(rng.standard_normal((b, n, kv, d)), dtype)
  seg = np.ones((b, t), np.int32)
  for row in range(b):
    cuts = documents if isinstance(documents, tuple) else rng.choice(np.arange(3, t - 3), documents, replace=False)
    for cut in cuts:
      seg[row, cut:] += 1
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  seg = jnp.asarray(seg)
  kv_seg = compressed_segments(seg, n, block, stride)
  kw = dict(block=block, stride=stride, select_block=select_block, num_blocks=-(-t // select_block),
            block_n=block_n)
  logits = jnp.einsum("bthd,bnhd->bhtn", q.astype(jnp.float32),
                      jnp.repeat(k_cmp.astype(jnp.float32), g, axis=2)) / math.sqrt(d)
  visible = ((compressed_positions(n, block, stride)[None, :] <= positions[:, :, None])
             & (kv_seg[:, None, :] == seg[:, :, None]))[:, None]
  lse = jax.nn.logsumexp(jnp.where(visible, logits, -jnp.inf), axis=-1)
  lse = jnp.where(jnp.asarray(rng.random(lse.shape) < 0.1), -jnp.inf, lse)
  return (q, k_cmp, lse, positions, seg, kv_seg), kw


def interpreted(fn, args, kw):
  with extended_interpreter():
    return np.asarray(jax.block_until_ready(fn(*args, **kw, interpret=InterpretGPUParams())))


def assert_close(got, want, tol=1e-4):
  want = np.asarray(want)
  assert got.shape == want.shape, (got.shape, want.shape)
  assert np.isfinite(got).all()
  err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)
  assert err <= tol, f"relative error {err:.2e} > {tol}"


def check_padded(padded, args, kw):
  """The padded layout: step j's columns c < nbt hold block j·nbt + c, the others are 0; the
  consumed columns match the oracle."""
  b, kv, t, steps, width = padded.shape
  nbt = nim.step_blocks(block=kw["block"], stride=kw["stride"], select_block=kw["select_block"],
                        block_n=kw["block_n"])
  assert steps == -(-kw["num_blocks"] // nbt) and width == max(16, 1 << (nbt - 1).bit_length())
  assert not padded[..., nbt:].any()
  got = padded[..., :nbt].reshape(b, kv, t, steps * nbt)[..., :kw["num_blocks"]]
  assert_close(got, oracle(*args, **kw))
  return got


CASES = {
    # G = 16 (4 tokens × 16 heads per warpgroup), K = 1, D = 128; r = 4, s = 2 (l = 2, d = 1, l' = 4:
    # the paper's l = 32, d = 16, l' = 64 in units of d), steps of bn = 64 keys: nbt = 14, 2 steps;
    # one document
    "g16_k1_d128_bn64": dict(t=64, kv=1, g=16, d=128, block_n=64),
    # K = 2 (each program one head group), D = 64, ragged T = 37 (rows past T masked), packed
    # documents (compressed tokens across a cut: segment −1); the default bn = 128 (one step)
    "g16_k2_d64_ragged_documents": dict(t=37, kv=2, g=16, d=64, block=4, stride=2, select_block=8,
                                        documents=2),
    # G = 8, float16, r = 4, s = 2, the default bn = 128 (nbt = 30): 3 steps walk a ring of 2 slots;
    # ragged T = 250 (16 tokens per program); a second document from token 20 on: step j (keys
    # 120j − 1 .. 120j + 126, positions up to 120j + 127) skips the element mask for the 8-token
    # tiles starting at or after that position
    "g8_f16_ring_documents": dict(t=250, kv=1, g=8, d=64, dtype=jnp.float16, documents=(20,)),
    # G = 32, batch 2, r = 2, s = 2 (nbt = 28: a slot 32 columns wide)
    "g32_b2_wide_slot": dict(b=2, t=18, kv=1, g=32, d=64, select_block=2, documents=1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_oracle_interpreted(name, monkeypatch):
  """block_scores_padded against the float32 oracle, fresh inputs: relative error <= 1e-4 of the
  largest score (bfloat16 operands without the lo parts give ≈ 1e-3); and importance_scores = its consumed columns (the padded result, computed once in the interpreter, handed
  to importance_scores in place of the kernel)."""
  args, kw = make_case(np.random.SeedSequence().entropy % 2**31, **CASES[name])
  padded = interpreted(nim.block_scores_padded, args, kw)
  consumed = check_padded(padded, args, kw)
  monkeypatch.setattr(nim, "block_scores_padded", lambda *a, **k: jnp.asarray(padded))
  got = np.asarray(nim.importance_scores(*args, **kw))
  assert got.shape == (*padded.shape[:3], kw["num_blocks"])
  np.testing.assert_array_equal(got, consumed)


def padded_oracle(q, k_cmp, lse, positions, q_seg, kv_seg, *, block, stride, select_block, num_blocks,
                  block_n=None, sm_scale=None, interpret=None):
  """`block_scores_padded`'s layout [B, K, T, steps, W] filled from the float32 oracle (a stand-in
  for the kernel where a test checks only what is built around it)."""
  del sm_scale, interpret
  p = oracle(q, k_cmp, lse, positions, q_seg, kv_seg, block=block, stride=stride, select_block=select_block,
             num_blocks=num_blocks)
  nbt, steps, width = nim.slot_layout(block=block, stride=stride, select_block=select_block, num_blocks=num_blocks)
  p = jnp.pad(p, ((0, 0), (0, 0), (0, 0), (0, steps * nbt - num_blocks)))
  return jnp.pad(p.reshape(*p.shape[:3], steps, nbt), ((0, 0),) * 4 + ((0, width - nbt),))


def test_select_blocks_mosaic_chunks_equal_one_call(monkeypatch):
  """`compressed.select_blocks_mosaic` in chunks of 128 queries (T = 300: 3 chunks in one `lax.map`, the
  last overlapping the second by 84 rows) picks exactly what one call over all T picks: the kernel
  replaced by the float32 oracle in its padded layout (so the rows that each chunk slices out of q,
  lse, positions and segment ids are checked), `topn_of_scores` in Triton's interpreter; K = 2, two
  documents (document starts sliced too)."""
  from sparsejax.attention import compressed
  monkeypatch.setattr(nim, "block_scores_padded", padded_oracle)
  (q, k_cmp, lse, positions, seg, kv_seg), kw = make_case(np.random.SeedSequence().entropy % 2**31, t=300, kv=2,
                                                          g=16, d=64, documents=2)
  kw.pop("block_n")
  doc_start = compressed.document_starts(seg)
  nbt, steps, width = nim.slot_layout(block=kw["block"], stride=kw["stride"], select_block=kw["select_block"],
                                      num_blocks=kw["num_blocks"])
  per_query = 2 * steps * width
  select = lambda chunk_queries: compressed.select_blocks_mosaic(  # noqa: E731
      q, k_cmp, lse, seg, kv_seg, positions, doc_start, num_selected=5, num_initial=1, num_local=1,
      chunk_elements=chunk_queries * per_query, interpret=InterpretGPUParams(), **kw)
  whole, chunked = select(300), select(128)
  for w, c in zip(whole, chunked):
    assert w.shape == c.shape == (1, 2, 300, *w.shape[3:])
    np.testing.assert_array_equal(np.asarray(c), np.asarray(w))
  assert (np.asarray(whole[1]) > 1).mean() > 0.5   # most rows pick several blocks


def test_no_compressed_token():
  """T < l: N = 0, every score 0 (no launch)."""
  args, kw = make_case(0, t=20, block=32, stride=16, select_block=64)
  assert args[1].shape[1] == 0
  out = np.asarray(nim.importance_scores(*args, **kw))
  assert out.shape == (1, 1, 20, 1) and not out.any()
  padded = np.asarray(nim.block_scores_padded(*args, **kw))
  assert padded.shape == (1, 1, 20, 1, 32) and not padded.any()      # bn = 128: 30 blocks in 32 columns


@pytest.mark.parametrize("g, d, dtype, block, select_block", [
    (16, 128, jnp.bfloat16, 32, 64), (8, 64, jnp.float16, 32, 64), (64, 128, jnp.bfloat16, 32, 64),
    (16, 128, jnp.bfloat16, 32, 32), (32, 64, jnp.bfloat16, 16, 16)])
def test_lowers_for_cuda_without_gpu(g, d, dtype, block, select_block):
  """The kernel lowers to one Mosaic GPU custom call for CUDA (layouts, wgmma shapes and swizzles, TMA
  boxes, barriers; the PTX compile happens on the GPU): at the paper's l = 32, d = 16, l' = 64 (slots of
  16 columns), and at l' = 32 (nbt = 28: 32 columns) and l = l' = d (nbt = 64: 64 columns)."""
  b, t, kv, stride = 1, 1000, 2, 16
  n = (t - block) // stride + 1
  shapes = (jax.ShapeDtypeStruct((b, t, kv * g, d), dtype), jax.ShapeDtypeStruct((b, n, kv, d), dtype),
            jax.ShapeDtypeStruct((b, kv * g, t), jnp.float32), jax.ShapeDtypeStruct((b, t), jnp.int32),
            jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, n), jnp.int32))

  def f(*args):
    return nim.importance_scores(*args, block=block, stride=stride, select_block=select_block,
                                 num_blocks=-(-t // select_block))

  text = jax.jit(f).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("stablehlo.custom_call @mosaic_gpu") == 1


def _shapes(t=64, h=16, kv=1, d=128, n=31, dtype=jnp.bfloat16, k_dtype=None, lse_dtype=jnp.float32):
  return (jax.ShapeDtypeStruct((1, t, h, d), dtype), jax.ShapeDtypeStruct((1, n, kv, d), k_dtype or dtype),
          jax.ShapeDtypeStruct((1, h, t), lse_dtype), jax.ShapeDtypeStruct((1, t), jnp.int32),
          jax.ShapeDtypeStruct((1, t), jnp.int32), jax.ShapeDtypeStruct((1, n), jnp.int32))


_GOOD = dict(block=2, stride=1, select_block=4, num_blocks=16)


@pytest.mark.parametrize("shapes, change, message", [
    (_shapes(dtype=jnp.float32), {}, "both bfloat16 or both float16"),
    (_shapes(k_dtype=jnp.float16), {}, "k_cmp float16"),
    (_shapes(d=96), {}, "D=96"),
    (_shapes(h=8, kv=2), {}, r"H=8, K=2"),
    (_shapes(h=12, kv=1), {}, r"H=12, K=1"),
    (_shapes(lse_dtype=jnp.bfloat16), {}, "lse in float32"),
    (_shapes(), dict(stride=3), "stride d=3"),
    (_shapes(), dict(block=8, select_block=4, stride=1), "block l=8"),
    (_shapes(), dict(select_block=128, block=2, stride=1), "= 129 compressed tokens"),
    (_shapes(), dict(num_blocks=0), "num_blocks=0"),
    (_shapes(), dict(block=3, stride=1, select_block=9, block_n=64), r"9·n a multiple of 8"),
    (_shapes(), dict(block_n=96), r"block_n=96 compressed tokens per step; valid: \(64, 128\)"),
])
def test_check_supported_names_the_value(shapes, change, message):
  with pytest.raises(ValueError, match=message):
    nim.check_supported(*shapes, **{**_GOOD, **change})


def test_refuses_interpret_true():
  args, kw = make_case(0, t=16)
  with pytest.raises(ValueError, match="interpret=True"):
    nim.block_scores_padded(*args, **kw, interpret=True)
