"""Tokenizers: byte-level (the default, no files needed) and SentencePiece model files.

Every tokenizer exposes the same small interface:

- `vocab_size` (int), `bos_id`, `eos_id` (ints);
- `encode(text) -> np.ndarray int32 [N]` (str or bytes in, no BOS/EOS added);
- `decode(ids) -> str` (special ids are dropped);
- `encode_with_bytes(text) -> (ids int32 [N], nbytes int32 [N])`: `encode(text)` and, per token,
  the bytes of the text it stands for, from the tokenizer's own alignment of tokens to the input.
  Their sum is the text's UTF-8 length whenever N > 0 (text that a SentencePiece normalizer removes,
  such as leading and trailing whitespace, counts with the nearest piece). Evaluation's bits per byte
  use it.
- `token_bytes -> np.ndarray int32 [V]`: the bytes of text a token id stands for out of context, the
  fallback where no text is at hand (synthetic rows). Byte tokens are one byte, BOS/EOS zero. For
  SentencePiece it is the UTF-8 length of the piece (the word-boundary mark as one space byte): exact
  only for models trained with `normalization_rule_name="identity"`, `remove_extra_whitespaces=False`,
  `add_dummy_prefix=False` and `byte_fallback=True`; with the trainer's defaults it undercounts (the
  whitespace that normalization collapses, ~20% of source code), so documents use `encode_with_bytes`.
"""
from __future__ import annotations

import os

import numpy as np

TOKENIZERS = ("byte", "sentencepiece")


def _as_bytes(text: str | bytes) -> bytes:
  if isinstance(text, bytes):
    return text
  if isinstance(text, str):
    return text.encode("utf-8")
  raise TypeError(f"encode expects str or bytes, got {type(text).__name__}")


class ByteTokenizer:
  """UTF-8 bytes as tokens 0..255, then BOS = 256 and EOS = 257 (vocab_size 258)."""

  vocab_size = 258
  bos_id = 256
  eos_id = 257

  def encode(self, text: str | bytes) -> np.ndarray:
    """text -> int32 [N], one token per UTF-8 byte."""
    return np.frombuffer(_as_bytes(text), dtype=np.uint8).astype(np.int32)

  def encode_with_bytes(self, text: str | bytes) -> tuple[np.ndarray, np.ndarray]:
    ids = self.encode(text)
    return ids, np.ones_like(ids)

  def decode(self, ids) -> str:
    """int [N] -> str; BOS/EOS dropped, invalid UTF-8 replaced by U+FFFD."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"token ids must be in [0, {self.vocab_size}), got range [{ids.min()}, {ids.max()}]")
    return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  @property
  def token_bytes(self) -> np.ndarray:
    out = np.ones((self.vocab_size,), np.int32)
    out[[self.bos_id, self.eos_id]] = 0
    return out

  def __repr__(self):
    return "ByteTokenizer()"


def _as_text(text: str | bytes) -> str:
  if isinstance(text, bytes):
    return text.decode("utf-8", errors="replace")
  if isinstance(text, str):
    return text
  raise TypeError(f"encode expects str or bytes, got {type(text).__name__}")


class SentencePieceTokenizer:
  """A SentencePiece model file. The model must define BOS and EOS pieces (the trainer's defaults)."""

  def __init__(self, model_path: str):
    self.model_path = str(model_path)
    self._load()

  def _load(self):
    import sentencepiece as spm  # imported lazily: the byte tokenizer needs nothing

    if not os.path.isfile(self.model_path):
      raise ValueError(f"data.sentencepiece_model={self.model_path!r} is not a file")
    self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
    self.vocab_size = int(self._sp.get_piece_size())
    self.bos_id = int(self._sp.bos_id())
    self.eos_id = int(self._sp.eos_id())
    if self.bos_id < 0 or self.eos_id < 0:
      raise ValueError(
          f"SentencePiece model {self.model_path!r} has bos_id={self.bos_id}, eos_id={self.eos_id}; "
          "both must be defined (train it with the default bos_id=1, eos_id=2)")
    sizes = np.zeros((self.vocab_size,), np.int32)
    for i in range(self.vocab_size):
      if self._sp.is_control(i) or self._sp.is_unknown(i) or self._sp.is_unused(i):
        continue
      if self._sp.is_byte(i):
        sizes[i] = 1
      else:
        sizes[i] = len(self._sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    self._token_bytes = sizes

  # The processor is a C++ object: pickle the path (grain workers receive the pipeline by pickle).
  def __getstate__(self):
    return {"model_path": self.model_path}

  def __setstate__(self, state):
    self.model_path = state["model_path"]
    self._load()

  def encode(self, text: str | bytes) -> np.ndarray:
    """text -> int32 [N]; bytes are decoded as UTF-8 (invalid sequences replaced)."""
    return np.asarray(self._sp.encode(_as_text(text)), dtype=np.int32)

  def encode_with_bytes(self, text: str | bytes) -> tuple[np.ndarray, np.ndarray]:
    """text -> (ids int32 [N], nbytes int32 [N]): the UTF-8 input cut where the processor starts
    each piece (collapsed whitespace goes with the piece that absorbed it, removed leading text with
    the first piece and removed trailing text with the last; the pieces of one byte-fallback
    character: the last one carries its bytes). Bytes are counted in the text as decoded (an invalid
    byte counts as U+FFFD's 3)."""
    text = _as_text(text)
    mapping = self._sp.encode(text, out_type="offset_mapping", return_bytes=True)
    ids = np.asarray(mapping["ids"], dtype=np.int32)
    if not len(ids):
      return ids, np.zeros((0,), np.int32)
    starts = np.asarray(mapping["offsets"], dtype=np.int64).reshape(-1, 2)[:, 0]
    cuts = np.concatenate([[0], starts[1:], [len(text.encode("utf-8"))]])
    return ids, np.diff(cuts).astype(np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"token ids must be in [0, {self.vocab_size}), got range [{ids.min()}, {ids.max()}]")
    return self._sp.decode([int(i) for i in ids])

  @property
  def token_bytes(self) -> np.ndarray:
    return self._token_bytes

  def __repr__(self):
    return f"SentencePieceTokenizer({self.model_path!r})"


def make_tokenizer(config):
  """The tokenizer named by `config.data.tokenizer` (accepts the full config or its `data` section)."""
  data = config.data if "data" in config else config
  name = data.tokenizer
  if name == "byte":
    return ByteTokenizer()
  if name == "sentencepiece":
    if not data.sentencepiece_model:
      raise ValueError("data.tokenizer='sentencepiece' needs data.sentencepiece_model (a .model file path)")
    return SentencePieceTokenizer(data.sentencepiece_model)
  raise ValueError(f"data.tokenizer={name!r} is not one of {TOKENIZERS}")
