"""Training metrics: FLOPs per token, model FLOPs utilisation (MFU), and the metric writers
(`DIR/metrics.jsonl`, TensorBoard event files).

FLOPs count one multiply-add as 2 FLOPs and a training step as 3 forward passes (forward + a
backward of twice the cost); recomputation under remat is not counted (it is not useful work).
- Matmul FLOPs per token and layer (forward): q, k, v and output projections
  `2·E·(H·D + 2·K·D + H·D)` plus the SwiGLU MLP `2·3·E·F`; plus the LM head `2·E·V` once.
- Attention FLOPs are what the attention variant computes on a row that holds one sequence of
  `seq_len` tokens, reported by the variant class: `attention_flops(config, seq_len) -> float`, the
  forward FLOPs of one layer's attention matmuls (scores and values). Dense causal attention computes
  half of the `T x T` score matrix: `2·(2·T²·H·D)/2`; a sparse variant counts only the blocks it
  visits. This is a nominal count: rows packed with several documents are counted as one sequence,
  although kernels that skip blocks between documents (cuDNN with segment ids) do less work, so MFU
  on packed data is somewhat overstated (about 3.5% relative for dense_1b on the embedded corpus).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import ml_collections
from absl import logging

# Dense bfloat16 peak FLOP/s per device (vendor data sheets, without structured sparsity).
# The first entry whose key occurs in `device.device_kind` (case-insensitive) wins: keep the more
# specific names first.
PEAK_FLOPS_PER_DEVICE: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756e12),
    ("h200", 989e12),
    ("h100", 989e12),
    ("h800", 989e12),
    ("gb200", 2500e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("l40s", 362e12),
    ("l4", 121e12),
    ("v100", 125e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v6 lite", 918e12),
    ("tpu v6e", 918e12),
    ("tpu7x", 2307e12),
)


def peak_flops_per_device(device: jax.Device, override: float = 0.0) -> float | None:
    """Peak FLOP/s of `device` (bf16 dense), `override` when > 0, None when the device is unknown
    (CPUs): then no MFU is reported."""
    if override > 0:
        return float(override)
    kind = device.device_kind.lower()
    for key, flops in PEAK_FLOPS_PER_DEVICE:
        if key in kind:
            return flops
    return None


def matmul_flops_per_token(config: ml_collections.ConfigDict) -> float:
    """Forward FLOPs per token of every weight matmul (projections, MLP, LM head)."""
    m = config.model
    e, h, k, d, f = m.d_model, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim
    per_layer = 2 * e * (h * d + 2 * k * d + h * d) + 2 * 3 * e * f
    return float(m.num_layers * per_layer + 2 * e * m.vocab_size)


def dense_causal_attention_flops(config: ml_collections.ConfigDict, seq_len: int) -> float:
    """Forward FLOPs of one layer of dense causal attention over one sequence of `seq_len` tokens:
    scores `q·kᵀ` and values `p·v`, each `2·T²·H·D`, over the causal half."""
    m = config.model
    return 2.0 * (2.0 * seq_len * seq_len * m.num_heads * m.head_dim) / 2.0


def attention_flops_per_token(config: ml_collections.ConfigDict) -> float | None:
    """Forward attention FLOPs per token, all layers, as reported by the configured variant; None
    (with a warning) if the variant does not report them."""
    from sparsejax.attention import get_attention  # the registry; imported late (heavy)

    kind = config.attention.kind
    variant = get_attention(kind)
    report = getattr(variant, "attention_flops", None)
    if report is None:
        logging.warning("attention variant %r has no attention_flops(config, seq_len): MFU not reported", kind)
        return None
    seq_len = config.data.seq_len
    return config.model.num_layers * float(report(config, seq_len)) / seq_len


def train_flops_per_token(config: ml_collections.ConfigDict) -> float | None:
    """Training FLOPs per token: 3 x (matmul + computed attention) forward FLOPs; None if unknown."""
    attention = attention_flops_per_token(config)
    if attention is None:
        return None
    return 3.0 * (matmul_flops_per_token(config) + attention)


class MetricWriter:
    """Writes metric records to `workdir/metrics.jsonl` (one JSON object a line) and to TensorBoard
    event files under `workdir/tensorboard`. Only process 0 writes; other processes no-op.

    On a resumed run, records of steps after `resume_step` (written by the interrupted run after its
    last checkpoint) are dropped first, so the file holds one consistent history; the TensorBoard
    writer starts with `purge_step=resume_step + 1`, so TensorBoard hides those steps of the older
    event files in the same way.
    """

    def __init__(self, workdir: str, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if os.path.exists(self.path):
            kept = []
            with open(self.path) as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by a kill
                        continue
                    if record.get("step", 0) <= resume_step:
                        kept.append(line)
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(line + "\n" for line in kept)
            os.replace(tmp, self.path)
        self._file = open(self.path, "a")
        from tensorboardX import SummaryWriter  # imported late: only process 0 needs it
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)

    def write(self, record: dict[str, Any], tb_prefix: str = "") -> None:
        """Appends `record` (must contain `step`) to metrics.jsonl and logs its numbers to TensorBoard."""
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        step = int(clean["step"])
        for key, value in clean.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(tb_prefix + key, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()


def _plain(value: Any) -> Any:
    """Numbers to Python floats/ints (NaN/inf as strings, which JSON cannot hold)."""
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, int):
        return value
    value = float(value)
    return value if math.isfinite(value) else str(value)
