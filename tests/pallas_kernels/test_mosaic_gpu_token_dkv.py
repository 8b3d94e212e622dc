"""The Mosaic GPU dK/dV kernel of one-token query units (`pallas_kernels/block_sparse/
mosaic_gpu_token_dkv.py`, NSA's selection branch) on CPU.

The kernel runs in jax's Mosaic GPU interpreter as extended by tests/pallas_kernels/
test_mosaic_gpu.py (`extended_interpreter`) and its dK, dV are compared with the float32 reference
gradients (jax.vjp of `reference.forward` with random cotangents on out and lse), on fresh random
inputs each run, over NSA-like selection layouts (block_q 1, one list per KV head, n blocks per
token: block 0, the token's own block and random earlier ones). It also lowers for CUDA here, and
`pallas_gpu.backward` picks it on a (faked) Hopper device; the PTX compile happens on the GPU.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import _close, _segments

from pallas_kernels import BlockLayout, block_sparse_attention
from pallas_kernels.block_sparse import mosaic_gpu_token_dkv as token_dkv
from pallas_kernels.block_sparse import pallas_gpu, reference

test_mosaic_gpu = pytest.importorskip("test_mosaic_gpu")
extended_interpreter = test_mosaic_gpu.extended_interpreter
InterpretGPUParams = test_mosaic_gpu.InterpretGPUParams
Cfg = token_dkv.TokenDkvConfig


def selection_layout(rng, batch, hkv, t, block_k, n, empty_blocks=(), tk=None):
  """NSA-like selection lists [batch, hkv, t, n] of t queries at the last positions of tk keys
  (default t): every query selects block 0, its own block and up to n - 2 random earlier blocks
  (not `empty_blocks`, whose inverse lists stay empty unless they are a query's own block or 0)."""
  tk = tk or t
  nk = -(-tk // block_k)
  idx = np.zeros((batch, hkv, t, n), np.int32)
  cnt = np.zeros((batch, hkv, t), np.int32)
  for b in range(batch):
    for h in range(hkv):
      for tok in range(t):
        own = (tk - t + tok) // block_k
        earlier = [j for j in range(1, own) if j not in empty_blocks]
        extra = rng.choice(earlier, size=min(n - 2, len(earlier)), replace=False) if earlier else []
        picks = sorted({0, own, *map(int, extra)})
        idx[b, h, tok, :len(picks)] = picks
        cnt[b, h, tok] = len(picks)
  return BlockLayout.from_indices(jnp.asarray(idx), jnp.asarray(cnt), block_q=1, block_k=block_k,
                                  num_kv_blocks=nk)


def _case(seed, *, t, group, tk=None, hkv=1, block_k=64, d=64, dtype=jnp.bfloat16, n=3,
          segments=False, batch=1, empty_blocks=()):
  """Inputs of t queries at the last positions of tk keys (the interpreter runs about a second per
  program and a quarter per ring step: short lists, few programs)."""
  rng = np.random.default_rng(seed)
  tk = tk or t
  hq = hkv * group
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32).astype(dtype)  # noqa: E731
  q, k, v = normal(batch, t, hq, d), normal(batch, tk, hkv, d), normal(batch, tk, hkv, d)
  layout = selection_layout(rng, batch, hkv, t, block_k, n, empty_blocks, tk)
  pos = jnp.broadcast_to(tk - t + jnp.arange(t, dtype=jnp.int32), (batch, t))
  kv_pos = jnp.broadcast_to(jnp.arange(tk, dtype=jnp.int32), (batch, tk))
  seg = kv_seg = None
  if segments:
    kv_seg = jnp.asarray(np.stack([_segments(rng, tk) for _ in range(batch)]))
    seg = kv_seg[:, tk - t:]
  d_out = normal(batch, t, hq, d)
  d_lse = jnp.asarray(rng.normal(size=(batch, hq, t)), jnp.float32)
  scale = float(rng.uniform(0.5, 1.5)) / np.sqrt(d)
  return dict(q=q, k=k, v=v, layout=layout, pos=pos, kv_pos=kv_pos, seg=seg, kv_seg=kv_seg,
              d_out=d_out, d_lse=d_lse, scale=scale, seed=seed)


def _check(c, config, causal=True):
  f = lambda q, k, v: reference.forward(q, k, v, c["layout"], c["pos"], c["kv_pos"], c["seg"],  # noqa: E731
                                        c["kv_seg"], sm_scale=c["scale"], causal=causal,
                                        interpret=False)
  (out, lse), vjp = jax.vjp(f, c["q"], c["k"], c["v"])
  _, want_dk, want_dv = vjp((c["d_out"], c["d_lse"]))
  row = jnp.einsum("bqhd,bqhd->bhq", c["d_out"].astype(jnp.float32), out.astype(jnp.float32))
  delta = jnp.where(jnp.isneginf(lse), 0.0, row - c["d_lse"])
  with extended_interpreter():
    dk, dv = jax.block_until_ready(token_dkv.dkv(
        c["q"], c["k"], c["v"], lse, delta, c["d_out"], c["layout"], c["pos"], c["kv_pos"], c["seg"],
        c["kv_seg"], sm_scale=c["scale"], causal=causal, interpret=InterpretGPUParams(),
        config=config))
  for label, x, w, ref in (("dk", dk, want_dk, c["k"]), ("dv", dv, want_dv, c["v"])):
    assert x.dtype == ref.dtype and x.shape == ref.shape, (label, x.dtype, x.shape)
    _close(label, x, w, 2e-2, f"seed {c['seed']}")


CASES = {
    # G = 16 (4 tokens per slot), block_k 64 (two consumers on alternate ring steps), 130 tokens:
    # block 0's list (130 entries, 33 steps: odd) ends in a partly filled slot, block 2's (2
    # entries) is one step (consumer 1 takes none: a zero partial); a 3-slot ring (odd), lists not
    # split (whole lists as single chunks, through the partials)
    "g16_bk64_whole": (dict(t=130, group=16, block_k=64), Cfg(stages=3, list_chunk=0)),
    # G = 8 (8 tokens per slot), two consumers (block_k 128), D = 128, packed documents (rows that
    # see nothing), lists split in chunks of 3 entries (every slot partly filled), ragged Tk
    # (padded keys)
    "g8_bk128_d128_segments_split3": (dict(t=12, tk=250, group=8, block_k=128, n=2, d=128,
                                           segments=True), Cfg(list_chunk=3)),
    # G = 16, float16, chunks of 1 entry (a slot of 1 listed token and 3 rows past the end; one
    # step per chunk, so consumer 1's partials are zeros), segments; KV block 2 is selected by nobody (an empty list), blocks 1 or 2 at random else
    "g16_f16_split1_segments_empty": (dict(t=4, tk=256, group=16, block_k=64, dtype=jnp.float16,
                                           segments=True, empty_blocks=(2,)),
                                      Cfg(list_chunk=1, stages=2)),
    # G = 32 (2 tokens per slot), two KV heads, batch 2 with a list per batch row, block_k 128,
    # D = 128, whole lists, the default ring
    "g32_bk128_d128_batch2_hkv2": (dict(t=16, tk=256, group=32, hkv=2, block_k=128, n=2, d=128,
                                        batch=2), Cfg(list_chunk=0)),
    # G = 64 (1 token per slot), block_k 64, a partial last KV block (ragged Tk: padded keys),
    # lists split by shape (too few whole-list programs: chunks of 8 steps, a list's last chunk
    # may have an odd number), a 4-slot ring
    "g64_bk64_ragged": (dict(t=20, tk=200, group=64, block_k=64, n=3), Cfg(stages=4)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_grads_match_reference_interpreted(name):
  params, config = CASES[name]
  _check(_case(np.random.SeedSequence().entropy % 2**31, **params), config)


def test_noncausal_segments_interpreted():
  """Without causal masking only segment ids mask (Tk a multiple of block_k): documents 1 (block
  0), 2 and 3 (block 1) with the queries in 2 and 3, so block 0's slots are all masked although
  its keys are in one segment, and block 1's need the element mask."""
  c = _case(np.random.SeedSequence().entropy % 2**31, t=16, tk=128, group=16, block_k=64, n=2,
            segments=True)
  kv_seg = jnp.asarray(np.repeat(np.array([1, 2, 3], np.int32), [64, 56, 8])[None])
  c.update(kv_seg=kv_seg, seg=kv_seg[:, 112:])
  _check(c, Cfg(list_chunk=5), causal=False)


@pytest.mark.parametrize("group, block_k, d, segments, chunk, dtype", [
    (16, 64, 128, True, None, jnp.bfloat16), (8, 128, 128, False, 0, jnp.bfloat16),
    (32, 64, 64, True, 0, jnp.float16), (64, 128, 64, False, None, jnp.bfloat16)])
def test_lowers_for_cuda_without_gpu(group, block_k, d, segments, chunk, dtype):
  """The kernel lowers to one Mosaic GPU custom call for CUDA (PTX compile happens on the GPU)."""
  b, t, hkv = 1, 1024, 2
  layout = selection_layout(np.random.default_rng(0), 1, hkv, t, block_k, 4)
  q = jax.ShapeDtypeStruct((b, t, hkv * group, d), dtype)
  kv = jax.ShapeDtypeStruct((b, t, hkv, d), dtype)
  ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
  lse = jax.ShapeDtypeStruct((b, hkv * group, t), jnp.float32)
  config = None if chunk is None else Cfg(list_chunk=chunk)

  def f(q, k, v, do, lse, delta, pos, seg):
    seg = seg if segments else None
    return token_dkv.dkv(q, k, v, lse, delta, do, layout, pos, pos, seg, seg, sm_scale=0.1,
                         causal=True, config=config)

  text = jax.jit(f).trace(q, kv, kv, q, lse, lse, ids, ids).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("stablehlo.custom_call @mosaic_gpu") == 1


def _shapes(t=256, hq=32, hkv=2, d=128, dv=None, dtype=jnp.bfloat16):
  return (jax.ShapeDtypeStruct((1, t, hq, d), dtype), jax.ShapeDtypeStruct((1, t, hkv, d), dtype),
          jax.ShapeDtypeStruct((1, t, hkv, dv or d), dtype))


def _sel(t=256, block_k=64, hl=2, block_q=1):
  mask = jnp.ones((1, hl, -(-t // block_q), -(-t // block_k)), bool)
  return BlockLayout.from_block_mask(mask, block_q=block_q, block_k=block_k)


@pytest.mark.parametrize("shapes, layout, kwargs, message", [
    (_shapes(dtype=jnp.float32), _sel(), {}, "bfloat16 or all float16"),
    (_shapes(d=96), _sel(), {}, "Dqk = Dv in"),
    (_shapes(dv=64), _sel(), {}, "Dv=64"),
    (_shapes(), _sel(block_q=2), {}, "block_q=2"),
    (_shapes(), _sel(hl=32), {}, "Hl=32"),
    (_shapes(hq=8, hkv=2), _sel(), {}, "Hq=8, Hkv=2"),
    (_shapes(hq=48, hkv=2), _sel(), {}, "Hq=48"),
    (_shapes(), _sel(block_k=32), {}, "block_k=32"),
    (_shapes(t=200), _sel(t=200), dict(causal=False), "Tk=200"),
    (_shapes(), _sel(), dict(window=64), "window=64"),
    (_shapes(), _sel(), dict(sm_scale=0.0), "sm_scale=0.0"),
    (_shapes(), _sel(block_k=128), dict(config=Cfg(stages=5, list_chunk=0)), "stages=5"),
])
def test_check_supported_names_the_value(shapes, layout, kwargs, message):
  q, k, v = shapes
  with pytest.raises(ValueError, match=message):
    token_dkv.check_supported(q, k, v, layout, **kwargs)


def test_default_config_fits_shared_memory():
  """NSA's selection shape (D = 128, bf16): 3 slots at block_k 64 (two float32 staging tiles), 2
  at 128, lists split; the accounting is exact at the limit."""
  q, k, v = _shapes(t=8192)
  for block_k, stages in ((64, 3), (128, 2)):
    layout = selection_layout(np.random.default_rng(0), 1, 2, 8192, block_k, 2)
    cfg = token_dkv.default_config(q, k, layout)
    assert cfg.stages == stages, cfg
    assert token_dkv.smem_bytes(128, block_k, stages + 1, 2, True, True) > token_dkv.SMEM_LIMIT
    assert token_dkv.list_chunk(layout, 2, 1, cfg, 16) % 4 == 0   # whole slots of 4 tokens
    token_dkv.check_supported(q, k, v, layout, cfg)


@pytest.mark.parametrize("hq, mosaic_calls, triton_calls", [(32, 1, 4), (256, 0, 4)])
def test_pallas_gpu_backward_takes_it_on_hopper(monkeypatch, hq, mosaic_calls, triton_calls):
  """With a Hopper GPU as the backend (faked; lowered for CUDA) an NSA selection call runs the
  Triton forward and dQ and this dK/dV kernel (block_k 64: one Mosaic call writing partials, the
  two `split.sum_partials` Pallas Triton calls); with
  G = 128 query heads per KV head (not served) the Triton dK/dV (split: partials and their sum)."""
  monkeypatch.setattr(pallas_gpu, "on_hopper", lambda: True)
  t, hkv = 1088, 2  # a length no other test traces (jax caches traces by shape)
  layout = selection_layout(np.random.default_rng(0), 1, hkv, t, 64, 4)
  q = jax.ShapeDtypeStruct((1, t, hq, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, t, hkv, 128), jnp.bfloat16)
  seg = jnp.ones((1, t), jnp.int32)

  def loss(q, k, v):
    out = block_sparse_attention(q, k, v, layout, return_lse=False, implementation="pallas_gpu",
                                 q_segment_ids=seg, kv_segment_ids=seg)
    return out.astype(jnp.float32).sum()

  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv).lower(
      lowering_platforms=("cuda",)).as_text()
  assert text.count("stablehlo.custom_call @mosaic_gpu") == mosaic_calls
  assert text.count("xla.gpu.triton") == triton_calls


def test_config_validation():
  with pytest.raises(ValueError, match="stages=1"):
    Cfg(stages=1)
  with pytest.raises(ValueError, match="list_chunk=-1"):
    Cfg(list_chunk=-1)
  with pytest.raises(ValueError, match=r"registers=\(256, 24\)"):
    Cfg(registers=(256, 24))
