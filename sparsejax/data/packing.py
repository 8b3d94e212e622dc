"""Packing tokenized documents into fixed-length rows, and the batch format of docs/contracts.md §3.

A row holds `seq_len + 1` tokens of a concatenated document stream (each document is
`BOS + tokens + EOS`); `inputs = row[:-1]`, `targets = row[1:]`. Rows are filled completely; a
document that does not fit is split and its continuation opens the next row. Inside a row every
document piece gets its own segment id (1, 2, ...) and positions restarting at 0, so a continuation
is a new segment whose positions start at 0 again. Only the very last row of a finite stream is
padded (token 0, segment 0). No token is dropped or repeated: the rows, read in order with the
padding removed, are exactly the concatenated stream.

`loss_mask[t] = 1` iff `segment_ids` of row tokens t and t+1 are equal and non-zero: the target is
the next token of the same document piece. The first token of each piece is never a target.

With `align` > 1 a piece that starts inside a row starts at a multiple of `align` (input index):
the tokens before it are filler (token 0, segment 0, position 0; no loss, never attended by a
document). Rows still hold every token of the stream once, in order; only filler is added. NSA
needs it (`config.data.document_alignment`): its compression and selection blocks lie on the row's
grid, so a document sees the paper's per-document blocks only where it starts on that grid.

grain's `ConcatThenSplitIterDataset` does not give this contract (it passes full-length documents
through and keeps partly filled rows open), so the packer is a small grain `IterDataset` of its own.
Its checkpoint state is the parent's state before the document being consumed plus the offset into
it, so restoring costs one document read.

Evaluation's documents come as int [2, N]: the tokens and under them the bytes of text each stands
for; rows then also carry `target_bytes` (float32 [T], the bytes of each target token; 0 on filler
and padding), which is not part of the training batch.
"""
from __future__ import annotations

from typing import Any

import grain
import numpy as np

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


def row_to_example(tokens: np.ndarray, segments: np.ndarray, positions: np.ndarray,
                   nbytes: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """One packed row of L = T + 1 tokens (int [L] each; `nbytes` [L]: the bytes of text of each
  token) -> the batch format for one row ([T] each; with `nbytes`, also `target_bytes`)."""
  seg_in, seg_out = segments[:-1], segments[1:]
  example = {
      "inputs": tokens[:-1].astype(np.int32),
      "targets": tokens[1:].astype(np.int32),
      "positions": positions[:-1].astype(np.int32),
      "segment_ids": seg_in.astype(np.int32),
      "loss_mask": ((seg_in == seg_out) & (seg_in != 0)).astype(np.float32),
  }
  if nbytes is not None:
    example["target_bytes"] = nbytes[1:].astype(np.float32)
  return example


def padding_example(seq_len: int, with_bytes: bool = False) -> dict[str, np.ndarray]:
  """A row made only of padding (segment 0, loss_mask 0), [T] each (with `target_bytes` 0)."""
  zeros = np.zeros((seq_len + 1,), np.int32)
  return row_to_example(zeros, zeros, zeros, zeros if with_bytes else None)


class _PackIterator(grain.DatasetIterator):

  def __init__(self, parent, seq_len: int, align: int):
    super().__init__(parent)
    self._row_len = seq_len + 1
    self._align = align
    self._doc = None            # int32 [N, 1] (tokens) or [N, 2] (tokens, bytes) being consumed, or None
    self._with_bytes = False    # documents come with their bytes (int [2, N]): rows get target_bytes
    self._doc_state = None      # parent state before that document was read
    self._offset = 0            # tokens of _doc already emitted
    self._exhausted = False

  def _fetch(self) -> bool:
    state = self._parent.get_state()
    try:
      doc = next(self._parent)
    except StopIteration:
      self._exhausted = True
      return False
    doc = np.asarray(doc, dtype=np.int32)
    self._with_bytes = doc.ndim == 2
    self._doc = doc.T if self._with_bytes else doc.reshape(-1, 1)        # [N, 1] or [N, 2] (token, bytes)
    self._doc_state = state
    self._offset = 0
    return True

  def __next__(self) -> dict[str, np.ndarray]:
    length = self._row_len
    tokens = np.zeros((length, 2), np.int32)                            # token, bytes of text
    segments = np.zeros((length,), np.int32)
    positions = np.zeros((length,), np.int32)
    fill, segment = 0, 1
    while fill < length:
      if self._doc is None or self._offset >= len(self._doc):
        self._doc = None
        if self._exhausted or not self._fetch():
          break
        if len(self._doc) == 0:
          continue
      fill = -(-fill // self._align) * self._align     # filler up to the grid (zeros already there)
      if fill >= length:
        break
      n = min(length - fill, len(self._doc) - self._offset)
      tokens[fill:fill + n, :self._doc.shape[1]] = self._doc[self._offset:self._offset + n]
      segments[fill:fill + n] = segment
      positions[fill:fill + n] = np.arange(n, dtype=np.int32)
      fill += n
      segment += 1
      self._offset += n
    if fill == 0:
      raise StopIteration
    return row_to_example(tokens[:, 0], segments, positions, tokens[:, 1] if self._with_bytes else None)

  def get_state(self) -> dict[str, Any]:
    if self._doc is not None and self._offset < len(self._doc):
      return {"parent": self._doc_state, "offset": int(self._offset)}
    return {"parent": self._parent.get_state(), "offset": 0}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._doc, self._doc_state, self._offset, self._exhausted = None, None, 0, False
    if state["offset"] > 0:
      if not self._fetch():
        raise ValueError(f"cannot restore packer state {state}: the parent ended before the document")
      self._offset = int(state["offset"])


class PackIterDataset(grain.IterDataset):
  """Packs a stream of token arrays (int [N] each, BOS/EOS already added) into rows in the batch
  format: dicts of `inputs, targets, positions, segment_ids` int32 [T] and `loss_mask` float32 [T],
  T = seq_len. See the module docstring for the exact contract."""

  def __init__(self, parent: grain.IterDataset, seq_len: int, *, align: int = 1):
    super().__init__(parent)
    if seq_len < 1:
      raise ValueError(f"seq_len={seq_len} must be >= 1")
    if not 1 <= align <= seq_len:
      raise ValueError(f"align={align} must be in [1, seq_len={seq_len}]")
    self._seq_len, self._align = seq_len, align

  def __iter__(self):
    return _PackIterator(self._parent.__iter__(), self._seq_len, self._align)

  def __str__(self):
    return f"PackIterDataset(seq_len={self._seq_len}, align={self._align})"


class _PadRowsIterator(grain.DatasetIterator):

  def __init__(self, parent, seq_len: int, multiple: int, total: int | None, with_bytes: bool):
    super().__init__(parent)
    self._pad = padding_example(seq_len, with_bytes)
    self._multiple = multiple
    self._total = total
    self._count = 0
    self._exhausted = False

  def __next__(self):
    if self._total is not None and self._count >= self._total:
      raise StopIteration
    if not self._exhausted:
      try:
        row = next(self._parent)
        self._count += 1
        return row
      except StopIteration:
        self._exhausted = True
    if self._total is None and self._count % self._multiple == 0:
      raise StopIteration
    self._count += 1
    return {k: v.copy() for k, v in self._pad.items()}

  def get_state(self):
    return {"parent": self._parent.get_state(), "count": self._count, "exhausted": self._exhausted}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._count = int(state["count"])
    self._exhausted = bool(state["exhausted"])


class PadRowsIterDataset(grain.IterDataset):
  """Appends padding rows (segment 0, loss_mask 0) to a finite stream of rows: up to a multiple of
  `multiple` rows when `total` is None, else exactly `total` rows (the parent is cut after `total`).
  Evaluation uses it so that every batch has the same shape and every process runs the same number
  of batches. `with_bytes`: the rows carry `target_bytes`, and so do the padding rows."""

  def __init__(self, parent: grain.IterDataset, seq_len: int, *, multiple: int, total: int | None = None,
               with_bytes: bool = False):
    super().__init__(parent)
    self._args = (seq_len, multiple, total, with_bytes)

  def __iter__(self):
    return _PadRowsIterator(self._parent.__iter__(), *self._args)
