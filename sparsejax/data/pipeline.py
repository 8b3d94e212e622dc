"""grain pipelines that yield batches in the format of docs/contracts.md §3.

Training (`make_train_iterator`):

    documents of the train split ─ [process_index::process_count] ─ shuffle(seed, new order every
    epoch) ─ repeat forever ─ tokenize (BOS + tokens + EOS) ─ to_iter_dataset (read threads)
    ─ pack into rows (document starts aligned: `document_alignment`) ─ [mix with synthetic task
    rows] ─ batch(B / process_count)
    ─ [mp_prefetch(worker_count)]

Evaluation (`make_eval_iterator`): the same without shuffle, repeat or mixture; one pass over the
split; the last batch is completed with padding rows (loss_mask 0), or exactly `num_batches`
batches are produced (padding rows after the split ends), so every batch has the same shape.

Each process reads a disjoint subset of documents (documents `process_index::process_count` of the
split) and yields `global_batch_size // process_count` rows per batch. The iterators are grain
`DatasetIterator`s: `get_state()` / `set_state()` give the exact position, and they work with
`grain.checkpoint.CheckpointSave` / `CheckpointRestore` inside an orbax `Composite`:

    manager.save(step, args=ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(iterator)))
    manager.restore(step, args=ocp.args.Composite(..., data=grain.checkpoint.CheckpointRestore(iterator)))

With `worker_count > 0` each grain worker process packs its own share of the documents, so the
batch order depends on `worker_count`, and so does the state: resume with the same `worker_count`.
"""
from __future__ import annotations

import functools
import sys

from absl import flags
from absl import logging
import grain
import numpy as np

from sparsejax.data import packing, sources, synthetic, tokenizers

_STREAM = {"train": 0, "validation": 1}


class _Tokenize:
  """document bytes -> int32 [N + 2] = BOS + tokens + EOS (a picklable class for grain workers).

  With `with_bytes`: int32 [2, N + 2], the tokens and under each the bytes of the document it
  stands for (`encode_with_bytes`; BOS and EOS 0)."""

  def __init__(self, tokenizer, with_bytes: bool = False):
    self._tokenizer = tokenizer
    self._with_bytes = with_bytes

  def __call__(self, document) -> np.ndarray:
    tok = self._tokenizer
    if not self._with_bytes:
      return np.concatenate([[tok.bos_id], tok.encode(document), [tok.eos_id]]).astype(np.int32)
    ids, nbytes = tok.encode_with_bytes(document)
    return np.stack([np.concatenate([[tok.bos_id], ids, [tok.eos_id]]),
                     np.concatenate([[0], nbytes, [0]])]).astype(np.int32)


def _local_batch_size(data, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  if data.global_batch_size % process_count:
    raise ValueError(f"data.global_batch_size={data.global_batch_size} is not divisible by "
                     f"process_count={process_count}")
  return data.global_batch_size // process_count


def _read_options(data) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=data.read_threads, prefetch_buffer_size=4 * data.read_threads)


def _synthetic_rows(data, tokenizer, split, process_index, process_count) -> grain.IterDataset:
  rows = synthetic.SyntheticRows(data, tokenizer, stream=_STREAM[split], haystack_split=split)
  ds = grain.MapDataset.range(sys.maxsize)[process_index::process_count].map(rows)
  return ds.to_iter_dataset(_read_options(data))


def document_alignment(config) -> int:
  """The packer's alignment of document starts: `data.document_alignment`, or for 0 the attention
  variant's own (`document_alignment(config)` of its class; 1 without one, or for a config that is
  only a data section)."""
  data = _data_section(config)
  align = int(data.get("document_alignment", 0))
  own = _variant_alignment(config)
  if align:
    if own > 1 and align % own:
      _warn_off_grid(align, config.attention.kind, own)
    return align
  return own


def _variant_alignment(config) -> int:
  """The attention variant's own alignment of document starts (1 without one or without a model)."""
  if "attention" not in config or "model" not in config:
    return 1
  from sparsejax.attention import get_attention  # pylint: disable=g-import-not-at-top

  variant = get_attention(config.attention.kind)
  return int(variant.document_alignment(config)) if hasattr(variant, "document_alignment") else 1


@functools.lru_cache(maxsize=None)
def _warn_off_grid(align: int, kind: str, own: int) -> None:
  logging.warning(
      "data.document_alignment=%d is not a multiple of the %s variant's own alignment %d: packed documents "
      "do not all start on its block grid, so a document's blocks depend on where it lands in a row; set "
      "data.document_alignment=0 (the variant's own) or a multiple of %d", align, kind, own, own)


def _document_rows(config, tokenizer, split, process_index, process_count, *, train: bool) -> grain.IterDataset:
  data = _data_section(config)
  docs = sources.load_documents(data, split)
  ds = grain.MapDataset.source(docs)[process_index::process_count]
  if train:
    if len(ds) == 0:
      raise ValueError(f"process {process_index} of {process_count} gets no training documents "
                       f"(the train split has {len(docs)}); use fewer processes or more documents")
    ds = ds.shuffle(seed=data.shuffle_seed).repeat()
  ds = ds.map(_Tokenize(tokenizer, with_bytes=not train))
  return packing.PackIterDataset(ds.to_iter_dataset(_read_options(data)), data.seq_len,
                                align=min(document_alignment(config), data.seq_len))


def _data_section(config):
  return config.data if "data" in config else config


def make_train_iterator(config, *, process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """An endless, checkpointable iterator of training batches for this process.

  Args:
    config: the experiment config (or its `data` section).
    process_index, process_count: this process among all (`jax.process_index()`/`jax.process_count()`).

  Yields dicts with `inputs, targets, positions, segment_ids` int32 `[B_local, T]` and `loss_mask`
  float32 `[B_local, T]`, `B_local = global_batch_size // process_count`, `T = seq_len`. The order is a
  deterministic function of `shuffle_seed` (a different document order in every epoch); a fraction
  `synthetic_mixture.fraction` of the rows are passkey / needle rows (all of them for the synthetic
  source)."""
  data = _data_section(config)
  batch = _local_batch_size(data, process_index, process_count)
  tokenizer = tokenizers.make_tokenizer(data)
  fraction = 1.0 if data.source == "synthetic" else float(data.synthetic_mixture.fraction)
  if fraction >= 1.0:
    rows = _synthetic_rows(data, tokenizer, "train", process_index, process_count)
  else:
    rows = _document_rows(config, tokenizer, "train", process_index, process_count, train=True)
    if fraction > 0.0:
      synth = _synthetic_rows(data, tokenizer, "train", process_index, process_count)
      rows = grain.IterDataset.mix([rows, synth], [1.0 - fraction, fraction])
  ds = rows.batch(batch, drop_remainder=True)
  if data.worker_count > 0:
    # grain's worker processes read absl flags; outside an absl app (tests, notebooks) use their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.worker_count))
  return iter(ds)


def make_eval_iterator(config, split: str = "validation", *, num_batches: int | None = None,
                       process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """An iterator over the documents of `split` ("validation" or "train"), in order, packed like the
  training data, in batches of `global_batch_size // process_count` rows (same format as training).

  With `num_batches=None` it makes one pass and pads the last batch with padding rows (loss_mask 0).
  With `num_batches=n` it yields exactly n batches: the split is cut after n batches, or completed
  with padding batches. In multi-process evaluation give `num_batches`, so that every process runs
  the same number of steps. Document rows also carry `target_bytes` float32 [B_local, T], the bytes
  of text each target token stands for (0 on padding and filler; `packing.row_to_example`), for
  bits per byte. For the synthetic source the rows are synthetic tasks from a stream separate from
  training, without `target_bytes`, and `num_batches` is required."""
  data = _data_section(config)
  if split not in sources.SPLITS:
    raise ValueError(f"split={split!r} is not one of {sources.SPLITS}")
  if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1):
    raise ValueError(f"num_batches={num_batches!r} must be None or an int >= 1")
  batch = _local_batch_size(data, process_index, process_count)
  tokenizer = tokenizers.make_tokenizer(data)
  if data.source == "synthetic":
    if num_batches is None:
      raise ValueError("data.source='synthetic' has endless evaluation rows: pass num_batches")
    rows = _synthetic_rows(data, tokenizer, split, process_index, process_count)
  else:
    rows = _document_rows(config, tokenizer, split, process_index, process_count, train=False)
  total = None if num_batches is None else num_batches * batch
  rows = packing.PadRowsIterDataset(rows, data.seq_len, multiple=batch, total=total,
                                    with_bytes=data.source != "synthetic")
  return iter(rows.batch(batch, drop_remainder=True))
