"""Load-balancing token permutations for sequence parallelism.

Under causal attention a contiguous split of the sequence gives the device holding the last chunk
`n` times the work of the device holding the first. A permutation applied once at the data boundary
fixes that: the batch's tokens, targets, positions, segment ids and loss mask are permuted together
along the sequence axis, the permuted sequence is split contiguously over the `sequence` mesh axis,
and every position-dependent computation (RoPE, the kernel's causal mask, which compares explicit
positions) follows the permutation because it reads the permuted `positions` array. The loss is a
masked mean over tokens, so it does not change.

Schemes (`perm[i]` is the original index of the token at permuted index `i`):
- `"zigzag"`: the sequence is cut into `2n` chunks; shard `r` holds chunks `r` and `2n-1-r`
  (every shard gets one early and one late chunk, so causal work is equal).
- `"striped"`: stripes of `stripe` tokens are dealt round-robin; shard `r` holds stripes
  `r, r+n, r+2n, ...` (MTraining's stripes; balanced for causal and for diagonal-dominated sparsity).
- `"none"`: identity (contiguous shards).

Every scheme keeps each shard's tokens in ascending original order, and moves whole blocks of
`block` tokens when the chunk / stripe size is a multiple of `block`, so a block layout written in
original block coordinates maps block-for-block onto the permuted sequence (`block_permutation`).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

SCHEMES = ("zigzag", "striped", "none")
BATCH_SEQUENCE_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


def unit_size(seq_len: int, num_shards: int, scheme: str, *, stripe: int) -> int:
    """Length of the contiguous runs of original tokens that the scheme moves as a whole."""
    if scheme == "zigzag":
        return seq_len // (2 * num_shards)
    if scheme == "striped":
        return stripe
    if scheme == "none":
        return seq_len // num_shards
    raise ValueError(f"balance scheme {scheme!r} is not one of {SCHEMES}")


def granule(num_shards: int, scheme: str, *, stripe: int, block: int) -> int:
    """Tokens that a sequence must hold a multiple of for `scheme` over `num_shards` shards in blocks
    of `block` (zigzag: 2 chunks per shard; striped: one stripe per shard per round)."""
    if scheme == "zigzag":
        return 2 * num_shards * block
    if scheme == "striped":
        return num_shards * stripe
    return num_shards * block


def check(seq_len: int, num_shards: int, scheme: str, *, stripe: int, block: int) -> None:
    """Raise ValueError unless `scheme` can split `seq_len` tokens over `num_shards` shards in whole
    blocks of `block` tokens (the kernel's block size; chunks and stripes must be multiples of it)."""
    if scheme not in SCHEMES:
        raise ValueError(f"balance scheme {scheme!r} is not one of {SCHEMES}")
    for name, value in (("seq_len", seq_len), ("num_shards", num_shards), ("block", block)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")
    if scheme == "striped" and (not isinstance(stripe, (int, np.integer)) or stripe < 1 or stripe % block):
        raise ValueError(f"striped balance needs stripe a positive multiple of the block size {block}; got stripe={stripe!r}")
    need = granule(num_shards, scheme, stripe=stripe, block=block)
    if seq_len % need:
        what = {"zigzag": f"zigzag balance needs seq_len divisible by 2 * sequence shards * block = 2*{num_shards}",
                "striped": f"striped balance needs seq_len divisible by sequence shards * stripe = {num_shards}"}
        what = what.get(scheme, f"sequence sharding needs seq_len divisible by sequence shards * block = {num_shards}")
        size = stripe if scheme == "striped" else block
        raise ValueError(f"{what}*{size} = {need}; got seq_len={seq_len}")


def permutation(seq_len: int, num_shards: int, scheme: str, *, stripe: int = 128) -> np.ndarray:
    """`perm [T]` int32 with `permuted = original[..., perm]`; shard `r` is `perm[r*T/n:(r+1)*T/n]`."""
    check(seq_len, num_shards, scheme, stripe=stripe, block=1)
    index = np.arange(seq_len, dtype=np.int32)
    if scheme == "none":
        return index
    if scheme == "zigzag":
        chunks = index.reshape(2 * num_shards, -1)
        order = np.stack([np.arange(num_shards), 2 * num_shards - 1 - np.arange(num_shards)], axis=1).reshape(-1)
        return chunks[order].reshape(-1)
    stripes = index.reshape(-1, num_shards, stripe)      # [stripe round, shard, stripe]
    return stripes.transpose(1, 0, 2).reshape(-1)


def inverse(perm: np.ndarray) -> np.ndarray:
    """`inv` with `original = permuted[..., inv]`."""
    perm = np.asarray(perm)
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.shape[0], dtype=perm.dtype)
    return inv


def block_permutation(perm: np.ndarray, block: int) -> np.ndarray:
    """`bperm [T/block]`: original block index of the block at permuted block index `j`.

    Raises ValueError when the permutation splits a block (a chunk or stripe not a multiple of `block`)."""
    perm = np.asarray(perm)
    if perm.shape[0] % block:
        raise ValueError(f"sequence length {perm.shape[0]} is not a multiple of block={block}")
    blocks = perm.reshape(-1, block)
    starts = blocks[:, 0]
    if np.any(starts % block) or np.any(blocks - starts[:, None] != np.arange(block)):
        raise ValueError(f"the permutation moves runs of tokens that are not whole blocks of {block}")
    return (starts // block).astype(np.int32)


def permute(x, perm: np.ndarray, axis: int = 1):
    """Gather `x` (numpy or jax array) along `axis` with `perm` (original -> permuted order)."""
    if isinstance(x, np.ndarray):
        return np.take(x, perm, axis=axis)
    import jax.numpy as jnp
    return jnp.take(x, jnp.asarray(perm), axis=axis)


def unpermute(x, perm: np.ndarray, axis: int = 1):
    """Inverse of `permute`: bring a permuted array back to original order."""
    return permute(x, inverse(perm), axis=axis)


def permute_batch(batch: Mapping, perm: np.ndarray) -> dict:
    """Apply `perm` along the sequence axis of every `[B, T]` entry of a data batch (contracts §3).

    The sequence keys (`inputs, targets, positions, segment_ids, loss_mask`) must all be present with
    the same length as `perm`; other entries are passed through unchanged."""
    missing = [key for key in BATCH_SEQUENCE_KEYS if key not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}; a batch needs {BATCH_SEQUENCE_KEYS}")
    out = dict(batch)
    for key in BATCH_SEQUENCE_KEYS:
        if batch[key].shape[1] != perm.shape[0]:
            raise ValueError(f"batch[{key!r}] has length {batch[key].shape[1]}, the permutation {perm.shape[0]}")
        out[key] = permute(batch[key], perm, axis=1)
    return out
