"""`config.data`: defaults and validation.

Fields:
- `source`: "embedded" (the Python standard library's source files; no download; its content
  follows the Python version, so runs compare across machines only on the same version), "files" (text
  files, one document per file), "array_record" (one UTF-8 document per record), "synthetic" (only
  passkey / needle rows, see `synthetic_mixture`).
- `paths`: a tuple of files, directories (read recursively, hidden entries skipped) or glob
  patterns (`**` allowed) for "files" and "array_record"; from the command line
  `--config.data.paths='("/data/books/*.txt",)'`.
- `tokenizer`: "byte" (258 ids: bytes, BOS, EOS) or "sentencepiece" (`sentencepiece_model` path).
- `seq_len` (T), `global_batch_size` (B summed over processes).
- `val_fraction`: fraction of documents held out for validation (deterministic, by document).
- `shuffle_seed`: seed of the document shuffle (a different order each epoch) and the synthetic rows.
- `synthetic_mixture`: `fraction` of training rows that are synthetic tasks (0 = none; the
  "synthetic" source uses only synthetic rows), their relative `passkey_weight` / `needle_weight`,
  `passkey_max` (pass keys are uniform in [1, passkey_max], 50000 in the Landmark Attention test),
  `needle_distractors` (distractor needles per example) and `needle_value_digits`.
- `worker_count`: grain worker processes (0 = in the main process). The batch order and the
  checkpointed iterator state depend on it: resume with the same value.
- `read_threads`: threads that read and tokenize documents ahead of the packer.
- `max_documents`: optional cap on the number of documents (first ones in sorted order), for tiny runs.
- `document_alignment`: a document piece that starts inside a packed row starts at a multiple of this
  many tokens (filler before it: token 0, segment 0, no loss). 0 = the attention variant's own grid
  (`document_alignment(config)` of its class: NSA's selection block l', so a packed document sees the
  paper's per-document compression and selection blocks, as if it were alone; 1 for dense); 1 = none.
"""
from __future__ import annotations

import os

import ml_collections
from ml_collections import config_dict

from sparsejax.data import sources, tokenizers


def default_config() -> ml_collections.ConfigDict:
  """The defaults of `config.data`."""
  return ml_collections.ConfigDict({
      "source": "embedded",
      "paths": (),
      "tokenizer": "byte",
      "sentencepiece_model": config_dict.placeholder(str),
      "seq_len": 512,
      "global_batch_size": 8,
      "val_fraction": 0.02,
      "shuffle_seed": 0,
      "synthetic_mixture": ml_collections.ConfigDict({
          "fraction": 0.0,
          "passkey_weight": 1.0,
          "needle_weight": 1.0,
          "passkey_max": 50000,
          "needle_distractors": 3,
          "needle_value_digits": 7,
      }),
      "worker_count": 0,
      "read_threads": 4,
      "max_documents": config_dict.placeholder(int),
      "document_alignment": 0,
  })


def _check_int(key, value, minimum, maximum=None):
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f"{key}={value!r} must be an int")
  if value < minimum or (maximum is not None and value > maximum):
    bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    raise ValueError(f"{key}={value!r} must be {bound}")


def _check_float(key, value, low, high, *, high_open=False):
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{key}={value!r} must be a float")
  if value < low or value > high or (high_open and value == high):
    raise ValueError(f"{key}={value!r} must be in [{low}, {high}{')' if high_open else ']'}")


def _check_choice(key, value, choices):
  if value not in choices:
    raise ValueError(f"{key}={value!r} is not one of {tuple(choices)}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks `config.data` (and, when present, that `config.model.vocab_size` covers the tokenizer).
  Resolves the data paths, so a missing file or an empty glob fails here, before any training.
  Raises ValueError naming the key, the bad value and the valid choices."""
  if "data" not in config:
    raise ValueError("config has no 'data' section; build it from sparsejax.data.default_config()")
  data = config.data
  unknown = sorted(set(data.keys()) - set(default_config().keys()))
  if unknown:
    raise ValueError(f"unknown keys in config.data: {unknown}; valid keys: {sorted(default_config().keys())}")
  mixture_keys = set(default_config().synthetic_mixture.keys())
  unknown = sorted(set(data.synthetic_mixture.keys()) - mixture_keys)
  if unknown:
    raise ValueError(f"unknown keys in config.data.synthetic_mixture: {unknown}; valid keys: {sorted(mixture_keys)}")

  _check_choice("data.source", data.source, sources.SOURCES)
  _check_choice("data.tokenizer", data.tokenizer, tokenizers.TOKENIZERS)
  _check_int("data.seq_len", data.seq_len, 1)
  _check_int("data.global_batch_size", data.global_batch_size, 1)
  _check_float("data.val_fraction", data.val_fraction, 0.0, 1.0, high_open=True)
  _check_int("data.shuffle_seed", data.shuffle_seed, 0, 2**32 - 1)
  _check_int("data.worker_count", data.worker_count, 0)
  _check_int("data.read_threads", data.read_threads, 1)
  if data.max_documents is not None:
    _check_int("data.max_documents", data.max_documents, 1)
  _check_int("data.document_alignment", data.document_alignment, 0, data.seq_len)

  mix = data.synthetic_mixture
  _check_float("data.synthetic_mixture.fraction", mix.fraction, 0.0, 1.0)
  _check_float("data.synthetic_mixture.passkey_weight", mix.passkey_weight, 0.0, float("inf"))
  _check_float("data.synthetic_mixture.needle_weight", mix.needle_weight, 0.0, float("inf"))
  _check_int("data.synthetic_mixture.passkey_max", mix.passkey_max, 1)
  _check_int("data.synthetic_mixture.needle_distractors", mix.needle_distractors, 0, 50)
  _check_int("data.synthetic_mixture.needle_value_digits", mix.needle_value_digits, 1, 18)

  if data.source != "synthetic":
    try:
      count = len(sources.all_documents(data))  # resolves the paths: a missing or empty one fails here
    except (RuntimeError, OSError) as e:  # e.g. an "array_record" path that is not an ArrayRecord file
      read_from = f" from data.paths={tuple(data.paths)!r}" if data.paths else ""
      raise ValueError(f"data.source={data.source!r} cannot read its documents{read_from}: {e}") from e
    if data.val_fraction > 0 and count < 2:
      raise ValueError(f"data.val_fraction={data.val_fraction} needs at least 2 documents to hold one out, "
                       f"data.source={data.source!r} has {count}; add documents or set data.val_fraction=0.0")
  if data.source not in ("files", "array_record") and data.paths:
    raise ValueError(f"data.paths={tuple(data.paths)!r} is only read by data.source in ('files', 'array_record'), "
                     f"not {data.source!r}; leave it empty")

  if data.tokenizer == "sentencepiece":
    if not data.sentencepiece_model or not os.path.isfile(data.sentencepiece_model):
      raise ValueError(f"data.sentencepiece_model={data.sentencepiece_model!r} must be an existing "
                       ".model file when data.tokenizer='sentencepiece'")
  try:
    tokenizer = tokenizers.make_tokenizer(data)
  except (RuntimeError, OSError) as e:  # sentencepiece: an empty or damaged model file
    raise ValueError(f"data.sentencepiece_model={data.sentencepiece_model!r} is not a valid SentencePiece "
                     f"model: {e}") from e
  if "model" in config and "vocab_size" in config.model and config.model.vocab_size < tokenizer.vocab_size:
    raise ValueError(f"model.vocab_size={config.model.vocab_size} is smaller than the vocabulary of "
                     f"data.tokenizer={data.tokenizer!r} ({tokenizer.vocab_size})")

  uses_synthetic = data.source == "synthetic" or mix.fraction > 0
  if uses_synthetic:
    if mix.passkey_weight + mix.needle_weight <= 0:
      raise ValueError("data.synthetic_mixture.passkey_weight + needle_weight must be > 0 when synthetic "
                       f"rows are used (got {mix.passkey_weight} and {mix.needle_weight})")
    from sparsejax.data import synthetic  # pylint: disable=g-import-not-at-top

    minimum = synthetic.min_row_tokens(data, tokenizer)
    if data.seq_len + 1 < minimum:
      raise ValueError(f"data.seq_len={data.seq_len} is too short for the synthetic tasks "
                       f"(they need seq_len >= {minimum - 1} with data.tokenizer={data.tokenizer!r})")
