"""`configs/nsa_1b.py` at ultra-long context: 1M tokens per row, the sequence sharded over every device.

The model and NSA hyper-parameters are those of `nsa_1b` (about 1B parameters, GQA 16, l=32, d=16,
l'=64, n=16, w=512; scanned layers, so the ring's shard_map is traced once, inside the scan body). The
mesh puts all devices on `sequence` (e.g. 4 H200s: 256k tokens each) and attention runs as a ring over
stripes of 128 tokens (`config.parallel`, `sparsejax/parallel/`): the compressed K/V (T/16 tokens) are
gathered, the selection and window branches ride the ring. Stripes, not zigzag: NSA's selected blocks
cluster near each query and at the document's first block, which zigzag leaves unbalanced per ring step
(benchmarks/RESULTS.md, "Ring"). Rows of packed documents from the embedded corpus, with a quarter of
the rows long-context retrieval tasks (pass keys, needles) so that the context length is used. Remat of
everything (`full`): at 1M tokens the activations, not the weights, fill the memory. Scanned layers
(`model.scan_layers`): with 16 unrolled layers the 1M-token step did not finish compiling within several
minutes on 4 H200s (benchmarks/RESULTS.md, Ring). On 2 H200s the 1M-token step compiles in ~70 s and
trains at 41.9 s per step with 113.6 GiB peak per GPU (RESULTS.md, Ring (c)).

    python train.py --config=configs/nsa_1b_long.py --workdir=runs/nsa_1b_long
    python train.py --config=configs/nsa_1b_long.py --config.data.seq_len=524288 ...   # shorter
"""
from configs import common
from configs import nsa_1b


def get_config():
    config = nsa_1b.get_config()
    common.update(config.model, remat="full", scan_layers=True)
    common.update(config.data, seq_len=1 << 20, global_batch_size=1)
    common.update(config.data.synthetic_mixture, fraction=0.25)
    common.update(config.mesh, data=1, fsdp=1, sequence=-1, tensor=1)
    common.update(config.parallel, context_scheme="ring", balance="striped", stripe_size=128)
    common.update(config.train, num_steps=1000, warmup_steps=100, log_every=1, eval_every=250, eval_batches=2,
                  checkpoint_every=100)
    return config
