"""Reusable random cases for testing any `block_sparse_attention` implementation against `reference`.

Import from a test file in this directory (pytest puts it on sys.path):

    from kernel_cases import Case, random_case, cases, assert_matches_reference

random_case(seed: int, *, batch=1, seq_len_q=48, seq_len_k=64, num_kv_heads=2, group=2,
            head_unit="query", block_q=16, block_k=16, dqk=16, dv=16, dtype="float32",
            layout_kind="random", density=0.5, layout_batch=None, causal=True,
            positions="default", segments=False, window=None) -> Case
    One deterministic case (numpy seed). head_unit: "query" (Hl = Hq) or "kv" (Hl = Hkv).
    layout_kind: one of LAYOUT_KINDS ("random", "causal", "diagonal", "window", "full", "empty",
    "top_k", "indices"); positions: "default" (implicit, bottom-right aligned) or "permuted"
    (explicit, a random permutation as the ring/zigzag permutations produce); segments: packed
    documents (q ids bottom-right aligned with kv ids). layout_batch: 1 or batch (default: batch).
    window: None or the kernel's static `window=` (needs causal=True), passed through to every call.

cases(**overrides) -> hypothesis strategy of Case
    Every keyword of random_case may be fixed (a value) or drawn (a hypothesis strategy); the rest are
    drawn from small defaults covering block_q 1..128, GQA 1..16, both head units, Dqk != Dv, bf16/f32,
    ragged ends, Tq < Tk, empty and full rows. Example for a kernel that tiles only 16-multiples:
        @given(cases(block_q=st.sampled_from([16, 32]), block_k=16, dtype="bfloat16"))

assert_matches_reference(impl_name: str, case: Case, interpret: bool = True, *, check_grads=True,
                         tol: float | None = None) -> None
    Runs (under one jax.jit each) `block_sparse_attention` with implementation=impl_name and with "reference" on the case
    and compares out, lse (the -inf pattern exactly) and, with the case's random cotangents on both
    out and lse, dq, dk, dv. Errors are measured relative to max(1, max|reference|) per tensor;
    tol defaults to 2e-5 (float32) or 2e-2 (bfloat16/float16). Also asserts nothing is NaN.

run_case(impl_name: str, case: Case, interpret: bool, *, grads=True) -> tuple of arrays
    (out, lse) or (out, lse, dq, dk, dv) of one implementation on the case, jitted.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from pallas_kernels import BlockLayout, block_sparse_attention

LAYOUT_KINDS = ("random", "causal", "diagonal", "window", "full", "empty", "top_k", "indices")


@dataclasses.dataclass(frozen=True, repr=False)
class Case:
    """One attention call: inputs, keyword arguments and cotangents for (out, lse)."""

    q: jax.Array          # [B, Tq, Hq, Dqk]
    k: jax.Array          # [B, Tk, Hkv, Dqk]
    v: jax.Array          # [B, Tk, Hkv, Dv]
    layout: BlockLayout
    kwargs: dict          # sm_scale, causal, positions, segment ids
    d_out: jax.Array      # [B, Tq, Hq, Dv] in q's dtype
    d_lse: jax.Array      # [B, Hq, Tq] float32
    params: dict          # the random_case arguments, for failure messages

    def __repr__(self):
        return f"Case({', '.join(f'{k}={v!r}' for k, v in self.params.items())})"


def _cdiv(a, b):
    return -(-a // b)


def _layout(rng, kind, density, b, hl, tq, tk, bq, bk):
    nq, nk = _cdiv(tq, bq), _cdiv(tk, bk)
    sizes = dict(block_q=bq, block_k=bk)
    if kind == "random":
        mask = rng.random((b, hl, nq, nk)) < density
        mask[..., rng.integers(nq), :] = False                     # one empty row
        mask[..., rng.integers(nq), :] = True                      # one full row
        return BlockLayout.from_block_mask(jnp.asarray(mask), **sizes)
    if kind in ("full", "empty"):
        return BlockLayout.from_block_mask(jnp.full((b, hl, nq, nk), kind == "full"), **sizes)
    if kind == "causal":
        return BlockLayout.causal(tq, tk, num_head_units=hl, batch=b, **sizes)
    if kind == "diagonal":
        return BlockLayout.sliding_window(tq, tk, 1, num_head_units=hl, batch=b, **sizes)
    if kind == "window":
        window = int(rng.integers(1, tk + 1))
        return BlockLayout.sliding_window(tq, tk, window, num_head_units=hl, batch=b, **sizes)
    if kind == "top_k":
        scores = rng.normal(size=(b, hl, nq, nk)).astype(np.float32)
        scores[rng.random(scores.shape) > density] = -np.inf
        return BlockLayout.top_k(jnp.asarray(scores), int(rng.integers(1, nk + 1)), **sizes)
    if kind == "indices":
        cap = int(rng.integers(1, 2 * nk + 1))                    # may exceed nk: duplicates
        indices = rng.integers(0, nk, size=(b, hl, nq, cap))
        counts = rng.integers(0, cap + 1, size=(b, hl, nq))
        return BlockLayout.from_indices(jnp.asarray(indices), jnp.asarray(counts), num_kv_blocks=nk, **sizes)
    raise ValueError(f"unknown layout_kind {kind!r}; valid: {LAYOUT_KINDS}")


def _segments(rng, length):
    """Packed-document ids 1, 2, ... with a padding tail of 0 sometimes. int32 [length]."""
    starts = rng.random(length) < 4.0 / max(length, 1)
    ids = 1 + np.cumsum(starts) - starts[0]
    if rng.random() < 0.5:
        ids[length - int(rng.integers(0, max(1, length // 4))):] = 0
    return ids.astype(np.int32)


def random_case(seed: int, *, batch=1, seq_len_q=48, seq_len_k=64, num_kv_heads=2, group=2, head_unit="query",
                block_q=16, block_k=16, dqk=16, dv=16, dtype="float32", layout_kind="random", density=0.5,
                layout_batch=None, causal=True, positions="default", segments=False, window=None) -> Case:
    params = dict(seed=seed, batch=batch, seq_len_q=seq_len_q, seq_len_k=seq_len_k, num_kv_heads=num_kv_heads,
                  group=group, head_unit=head_unit, block_q=block_q, block_k=block_k, dqk=dqk, dv=dv,
                  dtype=dtype, layout_kind=layout_kind, density=density, layout_batch=layout_batch,
                  causal=causal, positions=positions, segments=segments, window=window)
    rng = np.random.default_rng(seed)
    hq = num_kv_heads * group
    hl = {"query": hq, "kv": num_kv_heads}[head_unit]
    dt = jnp.dtype(dtype)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32).astype(dt)
    q = normal(batch, seq_len_q, hq, dqk)
    k = normal(batch, seq_len_k, num_kv_heads, dqk)
    v = normal(batch, seq_len_k, num_kv_heads, dv)
    layout = _layout(rng, layout_kind, density, layout_batch or batch, hl, seq_len_q, seq_len_k, block_q, block_k)
    kwargs = dict(causal=causal, sm_scale=float(rng.uniform(0.5, 1.5)) / np.sqrt(dqk))
    if window is not None:
        kwargs["window"] = window
    if positions == "permuted":
        kv_pos = np.stack([rng.permutation(seq_len_k) for _ in range(batch)])
        q_pos = np.stack([rng.permutation(max(seq_len_q, seq_len_k))[:seq_len_q] for _ in range(batch)])
        kwargs.update(q_positions=jnp.asarray(q_pos, jnp.int32), kv_positions=jnp.asarray(kv_pos, jnp.int32))
    elif positions != "default":
        raise ValueError(f"unknown positions {positions!r}; valid: 'default', 'permuted'")
    if segments:
        kv_seg = np.stack([_segments(rng, seq_len_k) for _ in range(batch)])
        q_seg = kv_seg[:, max(seq_len_k - seq_len_q, 0):]
        q_seg = np.pad(q_seg, ((0, 0), (seq_len_q - q_seg.shape[1], 0)), constant_values=1)
        kwargs.update(q_segment_ids=jnp.asarray(q_seg), kv_segment_ids=jnp.asarray(kv_seg))
    d_out = normal(batch, seq_len_q, hq, dv)
    d_lse = jnp.asarray(rng.normal(size=(batch, hq, seq_len_q)), jnp.float32)
    return Case(q, k, v, layout, kwargs, d_out, d_lse, params)


def cases(**overrides):
    """Hypothesis strategy of `Case`; see the module docstring."""
    defaults = dict(
        batch=st.sampled_from([1, 2]),
        num_kv_heads=st.sampled_from([1, 2]),
        group=st.sampled_from([1, 2, 4, 8, 16]),
        head_unit=st.sampled_from(["query", "kv"]),
        block_q=st.sampled_from([1, 16, 32, 64, 128]),
        block_k=st.sampled_from([8, 16, 32]),
        dqk=st.sampled_from([8, 16, 32]),
        dv=st.sampled_from([8, 16, 32]),
        dtype=st.sampled_from(["float32", "bfloat16"]),
        layout_kind=st.sampled_from(LAYOUT_KINDS),
        density=st.sampled_from([0.2, 0.5, 0.9]),
        causal=st.booleans(),
        positions=st.sampled_from(["default", "default", "permuted"]),
        segments=st.booleans(),
    )
    strategies = {name: value if isinstance(value, st.SearchStrategy) else st.just(value)
                  for name, value in (defaults | overrides).items()}

    @st.composite
    def draw_case(draw):
        params = {name: draw(strategy) for name, strategy in strategies.items()}
        bq, bk = params["block_q"], params["block_k"]
        if "seq_len_q" not in params:   # about 1-3 query units and Tq <= Tk usually, ragged ends often
            units = 1 if bq >= 64 else draw(st.integers(1, 3))
            params["seq_len_q"] = draw(st.integers(max(1, (units - 1) * bq + 1), units * bq)) if bq > 1 \
                else draw(st.integers(1, 24))
        if "seq_len_k" not in params:
            tq = params["seq_len_q"]
            params["seq_len_k"] = draw(st.one_of(st.integers(tq, tq + 3 * bk), st.integers(1, tq + bk)))
        if "layout_batch" not in params:
            params["layout_batch"] = draw(st.sampled_from([1, params["batch"]]))
        return random_case(draw(st.integers(0, 2**31 - 1)), **params)

    return draw_case()


_STATIC = ("causal", "sm_scale", "window")


def run_case(impl_name, case, interpret, *, grads=True):
    """(out, lse) or, with grads, (out, lse, dq, dk, dv) for the case's cotangents; one jit per call."""
    static = {name: case.kwargs[name] for name in _STATIC if name in case.kwargs}
    arrays = {name: value for name, value in case.kwargs.items() if name not in _STATIC}

    def run(q, k, v, layout, arrays, d_out, d_lse):
        attend = lambda q, k, v: block_sparse_attention(q, k, v, layout, implementation=impl_name,
                                                        interpret=interpret, **static, **arrays)
        if not grads:
            return attend(q, k, v)
        (out, lse), vjp = jax.vjp(attend, q, k, v)
        return (out, lse) + tuple(vjp((d_out, d_lse)))

    return jax.jit(run)(case.q, case.k, case.v, case.layout, arrays, case.d_out, case.d_lse)


def _close(name, got, want, tol, case):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != reference {want.shape} in {case}"
    assert not np.isnan(got).any(), f"{name} has NaN in {case}"
    if name == "lse":
        got_empty, want_empty = np.isneginf(got), np.isneginf(want)
        assert np.array_equal(got_empty, want_empty), (
            f"lse -inf rows differ at {np.argwhere(got_empty != want_empty)[:5].tolist()} in {case}")
        got, want = np.where(want_empty, 0, got), np.where(want_empty, 0, want)
    scale = max(1.0, float(np.abs(want).max(initial=0)))
    err = float(np.abs(got - want).max(initial=0)) / scale
    assert err <= tol, f"{name}: max error {err:.3g} (relative to {scale:.3g}) > {tol:.3g} in {case}"


def assert_matches_reference(impl_name: str, case: Case, interpret: bool = True, *, check_grads=True,
                             tol: float | None = None) -> None:
    """Compare implementation `impl_name` with `reference` on `case`; see the module docstring."""
    if tol is None:
        tol = 2e-5 if case.q.dtype == jnp.float32 else 2e-2
    got = run_case(impl_name, case, interpret, grads=check_grads)
    want = run_case("reference", case, False, grads=check_grads)
    names = ("out", "lse", "dq", "dk", "dv")
    for name, g, w in zip(names, got, want):
        _close(name, g, w, tol, case)
