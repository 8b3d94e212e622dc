"""Tiny Native Sparse Attention model on the embedded corpus: the same model, data and schedule as
`configs/dense_tiny.py` with `attention.kind = "nsa"`, so the two train on identical batches.

The paper's branch sizes (l=32, d=16, l'=64, n=16, w=512) would make every branch see the whole
256-token context; they are scaled down so the three branches differ at seq_len 256:
compression l=16, d=8 (31 compressed tokens at the end of a row); selection l'=16, n=6 blocks
(1 initial + 2 local + 3 chosen: at most 96 of up to 256 keys); window w=32.

    python train.py --config=configs/nsa_tiny.py --workdir=runs/nsa_tiny
"""
from configs import common
from configs import dense_tiny


def get_config():
    config = dense_tiny.get_config()
    config.attention.kind = "nsa"
    common.update(config.attention.nsa, compress_block=16, compress_stride=8, select_block=16, num_selected=6,
                  num_initial=1, num_local=2, window=32, window_block=16, compress_hidden=64,
                  compress_kernel_block_q=64, compress_kernel_block_k=16)
    return config
