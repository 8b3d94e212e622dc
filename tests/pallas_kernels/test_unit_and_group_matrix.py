"""Every query-unit size (1, 16, 64, 128 tokens) and every GQA ratio (1, 2, 4, 8, 16) meets every
implementation in a fixed case, besides the random (hypothesis) draws that may or may not reach them:
out, lse, dq, dk, dv against `reference`, the Pallas kernels in interpret mode. Tq < Tk and both
lengths ragged in every case."""
import pytest
from kernel_cases import assert_matches_reference, random_case

# (block_q, G): each block_q and each G at least once
UNITS_AND_GROUPS = [(1, 16), (16, 8), (64, 1), (128, 2), (64, 4)]
# each implementation's own tiles (pallas_tpu: KV blocks that divide or fill its 128 lanes)
TILES = {"xla": dict(block_k=16, dqk=16, dv=24),
         "pallas_gpu": dict(block_k=32, dqk=16, dv=32),
         "pallas_tpu": dict(block_k=64, dqk=32, dv=32)}


@pytest.mark.parametrize("block_q, group", UNITS_AND_GROUPS)
@pytest.mark.parametrize("impl", sorted(TILES))
def test_unit_size_and_group(impl, block_q, group):
    tq = 6 if block_q == 1 else block_q + block_q // 2 + 3
    case = random_case(block_q * 31 + group, seq_len_q=tq, seq_len_k=tq + 67, num_kv_heads=1 if group == 16 else 2,
                       group=group, head_unit="kv" if block_q in (1, 64) else "query", block_q=block_q,
                       dtype="bfloat16" if block_q == 16 else "float32", layout_kind="random", density=0.6,
                       **TILES[impl])
    assert_matches_reference(impl, case)
