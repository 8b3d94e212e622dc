"""Tests of sparsejax.data: packing, sources, splits, tokenizers, synthetic tasks, pipelines, resume."""
import os
import re

import grain
import ml_collections
import numpy as np
import pytest

import sparsejax.data as D
from sparsejax.data import sources, synthetic

BYTE = D.ByteTokenizer()


def make_config(**data_overrides):
  config = ml_collections.ConfigDict({"data": D.default_config()})
  for key, value in data_overrides.items():
    if key == "synthetic_mixture":
      config.data.synthetic_mixture.update(value)
    else:
      setattr(config.data, key, value)
  return config


def write_docs(directory, count, rng, *, min_len=5, max_len=300, suffix=".txt"):
  """Text files with unique, varied contents; returns their texts by file name."""
  os.makedirs(directory, exist_ok=True)
  words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "\n"]
  texts = {}
  for i in range(count):
    n = int(rng.integers(min_len, max_len))
    body = " ".join(rng.choice(words, size=n))[:n]
    text = f"doc{i:03d}:{body}"
    name = f"d{i:03d}{suffix}"
    with open(os.path.join(directory, name), "w") as f:
      f.write(text)
    texts[name] = text
  return texts


def row_tokens(batch):
  """[B, T+1] the tokens of each packed row (inputs plus the last target)."""
  return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)


def stream_documents(batches, *, cut=False):
  """Decodes the document stream held by batches of rows (padding removed) into document texts,
  split at BOS/EOS. With `cut`, the stream may end inside a document, which is then dropped."""
  tokens = []
  for b in batches:
    full = row_tokens(b)
    for row, seg, mask in zip(full, b["segment_ids"], b["loss_mask"]):
      keep = np.append(seg > 0, False)
      # The row's final token (a target only) is real iff it continues the last input's document
      # (loss_mask 1) or starts a new one (BOS); otherwise it is padding.
      keep[-1] = seg[-1] > 0 and (mask[-1] > 0 or row[-1] == BYTE.bos_id)
      tokens.extend(row[keep].tolist())
  docs, current = [], None
  for t in tokens:
    if t == BYTE.bos_id:
      assert current is None, "BOS inside a document"
      current = []
    elif t == BYTE.eos_id:
      docs.append(bytes(current).decode())
      current = None
    else:
      current.append(t)
  assert cut or current is None, "stream ends inside a document"
  return docs


# ----------------------------------------------------------------------------------------------
# Packing


def reference_rows(docs, seq_len):
  """Independent packing reference: stream of (token, document) pairs cut every seq_len + 1."""
  stream = [(t, d) for d, doc in enumerate(docs) for t in doc]
  length = seq_len + 1
  rows = []
  for start in range(0, len(stream), length):
    chunk = stream[start:start + length]
    chunk += [(0, -1)] * (length - len(chunk))
    tok = np.array([t for t, _ in chunk])
    doc = np.array([d for _, d in chunk])
    seg = np.zeros(length, np.int32)
    pos = np.zeros(length, np.int32)
    order = []
    for j, d in enumerate(doc):
      if d < 0:
        continue
      if d not in order:
        order.append(d)
      seg[j] = order.index(d) + 1
      pos[j] = j - list(doc).index(d)
    mask = (doc[:-1] == doc[1:]) & (doc[:-1] >= 0)
    rows.append({"inputs": tok[:-1], "targets": tok[1:], "positions": pos[:-1], "segment_ids": seg[:-1],
                 "loss_mask": mask.astype(np.float32)})
  return rows


@pytest.mark.parametrize("seed", range(4))
def test_packing_matches_reference(seed):
  rng = np.random.default_rng(seed)
  seq_len = int(rng.integers(4, 40))
  lengths = list(rng.integers(2, 3 * seq_len, size=25)) + [seq_len + 1, 2 * (seq_len + 1), 2]
  rng.shuffle(lengths)
  docs = [rng.integers(0, 1000, size=n).astype(np.int32) for n in lengths]
  ds = D.PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(), seq_len)
  got = list(ds)
  want = reference_rows(docs, seq_len)
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert set(g) == set(D.BATCH_KEYS)
    for key in D.BATCH_KEYS:
      np.testing.assert_array_equal(g[key], w[key], err_msg=key)
      assert g[key].dtype == (np.float32 if key == "loss_mask" else np.int32)
  # Only the last row has padding; no token lost or duplicated.
  for g in got[:-1]:
    assert (g["segment_ids"] > 0).all()
  flat = np.concatenate([np.concatenate([g["inputs"], g["targets"][-1:]]) for g in got])
  total = sum(lengths)
  np.testing.assert_array_equal(flat[:total], np.concatenate(docs))
  assert not flat[total:].any()


def test_packing_boundaries_by_hand():
  docs = [np.array([10, 11, 12]), np.array([20, 21, 22, 23, 24, 25, 26]), np.array([30, 31])]
  rows = list(D.PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(), 5))
  assert len(rows) == 2
  # Row tokens: [10 11 12 20 21 22] then [23 24 25 26 30 31].
  np.testing.assert_array_equal(rows[0]["inputs"], [10, 11, 12, 20, 21])
  np.testing.assert_array_equal(rows[0]["targets"], [11, 12, 20, 21, 22])
  np.testing.assert_array_equal(rows[0]["segment_ids"], [1, 1, 1, 2, 2])
  np.testing.assert_array_equal(rows[0]["positions"], [0, 1, 2, 0, 1])
  np.testing.assert_array_equal(rows[0]["loss_mask"], [1, 1, 0, 1, 1])
  # The continuation of document 2 is a new segment with positions from 0.
  np.testing.assert_array_equal(rows[1]["inputs"], [23, 24, 25, 26, 30])
  np.testing.assert_array_equal(rows[1]["segment_ids"], [1, 1, 1, 1, 2])
  np.testing.assert_array_equal(rows[1]["positions"], [0, 1, 2, 3, 0])
  np.testing.assert_array_equal(rows[1]["loss_mask"], [1, 1, 1, 0, 1])


def test_packing_state_restores_mid_document():
  rng = np.random.default_rng(7)
  docs = [rng.integers(0, 50, size=n).astype(np.int32) for n in rng.integers(2, 60, size=20)]
  ds = D.PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(), 16)
  full = list(ds)
  for k in range(len(full) + 1):
    it = iter(ds)
    for _ in range(k):
      next(it)
    state = it.get_state()
    fresh = iter(ds)
    fresh.set_state(state)
    rest = list(fresh)
    assert len(rest) == len(full) - k
    for a, b in zip(rest, full[k:]):
      np.testing.assert_array_equal(a["inputs"], b["inputs"])
      np.testing.assert_array_equal(a["segment_ids"], b["segment_ids"])


def test_packing_aligns_document_starts():
  docs = [np.array([10, 11, 12]), np.array([20, 21, 22, 23, 24, 25, 26]), np.array([30, 31])]
  rows = list(D.PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(), 7, align=4))
  # Row tokens (8 per row): [10 11 12 _ 20 21 22 23] [24 25 26 _ 30 31 _ _]; _ = filler (0, segment 0).
  assert len(rows) == 2
  np.testing.assert_array_equal(rows[0]["inputs"], [10, 11, 12, 0, 20, 21, 22])
  np.testing.assert_array_equal(rows[0]["segment_ids"], [1, 1, 1, 0, 2, 2, 2])
  np.testing.assert_array_equal(rows[0]["positions"], [0, 1, 2, 0, 0, 1, 2])
  np.testing.assert_array_equal(rows[0]["loss_mask"], [1, 1, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(rows[1]["inputs"], [24, 25, 26, 0, 30, 31, 0])
  np.testing.assert_array_equal(rows[1]["segment_ids"], [1, 1, 1, 0, 2, 2, 0])
  np.testing.assert_array_equal(rows[1]["loss_mask"], [1, 1, 0, 0, 1, 0, 0])


@pytest.mark.parametrize("align", [3, 16])
def test_aligned_packing_keeps_the_stream_and_restores(align):
  rng = np.random.default_rng(align)
  docs = [rng.integers(1, 50, size=n).astype(np.int32) for n in rng.integers(1, 60, size=30)]
  ds = D.PackIterDataset(grain.MapDataset.source(docs).to_iter_dataset(), 32, align=align)
  full = list(ds)
  for row in full:      # every piece starts at a multiple of `align` (input index) or at the row start
    seg = row["segment_ids"]
    starts = np.flatnonzero((seg > 0) & (np.concatenate([[0], seg[:-1]]) != seg))
    assert not (starts % align).any(), starts
  # Without the filler (segment 0 inside rows) the rows read in order are the stream, once.
  tokens = np.concatenate([np.concatenate([r["inputs"], r["targets"][-1:]]) for r in full])
  segs = np.concatenate([np.concatenate([r["segment_ids"], [0]]) for r in full])
  np.testing.assert_array_equal(tokens[tokens > 0], np.concatenate(docs))
  for k in (1, len(full) // 2, len(full) - 1):
    it = iter(ds)
    for _ in range(k):
      next(it)
    fresh = iter(ds)
    fresh.set_state(it.get_state())
    for a, b in zip(fresh, full[k:]):
      np.testing.assert_array_equal(a["inputs"], b["inputs"])
      np.testing.assert_array_equal(a["segment_ids"], b["segment_ids"])
  assert (segs == 0).any()


def test_document_alignment_follows_the_attention_variant():
  from configs import dense_tiny, nsa_tiny
  from sparsejax.data.pipeline import document_alignment
  nsa, dense = nsa_tiny.get_config(), dense_tiny.get_config()
  assert document_alignment(dense) == document_alignment(nsa) == 16     # dense_tiny packs on nsa_tiny's grid
  nsa.data.document_alignment = dense.data.document_alignment = 0        # 0: the variant's own
  assert document_alignment(nsa) == nsa.attention.nsa.select_block
  assert document_alignment(dense) == 1
  assert document_alignment(dense.data) == 1
  dense.data.document_alignment = 8
  assert document_alignment(dense) == 8
  dense.attention.kind = "nsa"
  dense.data.document_alignment = 0
  assert document_alignment(dense) == dense.attention.nsa.select_block


def test_alignment_off_the_variants_grid_warns(monkeypatch):
  """dense_tiny's rows (alignment 16) switched to NSA with the paper's l' = 64: kept, with a warning."""
  from configs import dense_tiny
  from sparsejax.data import pipeline
  warnings = []
  monkeypatch.setattr(pipeline.logging, "warning", lambda msg, *args: warnings.append(msg % args))
  pipeline._warn_off_grid.cache_clear()
  config = dense_tiny.get_config()
  assert pipeline.document_alignment(config) == 16 and not warnings               # dense: no grid of its own
  config.attention.kind = "nsa"
  assert pipeline.document_alignment(config) == 16
  assert len(warnings) == 1 and "data.document_alignment=16 is not a multiple of the nsa variant's own " \
                                "alignment 64" in warnings[0]
  config.data.document_alignment = 128
  assert pipeline.document_alignment(config) == 128 and len(warnings) == 1        # a multiple: no warning


# ----------------------------------------------------------------------------------------------
# Tokenizers


def test_byte_tokenizer():
  text = "héllo\n\x00 wörld ∑"
  ids = BYTE.encode(text)
  assert ids.dtype == np.int32 and len(ids) == len(text.encode("utf-8"))
  assert BYTE.decode(ids) == text
  assert BYTE.decode(np.concatenate([[BYTE.bos_id], ids, [BYTE.eos_id]])) == text
  assert BYTE.vocab_size == 258 and {BYTE.bos_id, BYTE.eos_id} == {256, 257}
  assert BYTE.token_bytes[ids].sum() == len(text.encode("utf-8"))
  assert BYTE.token_bytes[BYTE.bos_id] == 0 and BYTE.token_bytes[BYTE.eos_id] == 0
  with pytest.raises(ValueError, match="258"):
    BYTE.decode([300])


def test_sentencepiece_tokenizer(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  files = D.embedded_corpus_files()[:30]
  text = b"".join(open(f, "rb").read() for f in files)[:150_000].decode("utf-8", "replace")
  prefix = str(tmp_path / "tiny")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(text.splitlines()), model_prefix=prefix, vocab_size=400, model_type="bpe",
      byte_fallback=True, character_coverage=0.995, normalization_rule_name="identity",
      remove_extra_whitespaces=False, add_dummy_prefix=False, minloglevel=2)
  config = make_config(tokenizer="sentencepiece", sentencepiece_model=prefix + ".model", seq_len=64,
                       global_batch_size=2, max_documents=20)
  D.validate(config)
  tok = D.make_tokenizer(config)
  assert isinstance(tok, D.SentencePieceTokenizer) and tok.vocab_size == 400
  sample = open(D.embedded_corpus_files()[40], encoding="utf-8").read()[:3000]
  ids = tok.encode(sample)
  assert tok.decode(ids) == sample
  assert len(ids) < len(sample.encode("utf-8"))  # it does merge bytes
  assert tok.token_bytes[ids].sum() == len(sample.encode("utf-8"))
  batch = next(D.make_train_iterator(config))
  assert batch["inputs"].shape == (2, 64) and batch["inputs"].max() < 400
  assert batch["inputs"][0, 0] == tok.bos_id  # a fresh iterator starts with a document
  config.model = ml_collections.ConfigDict({"vocab_size": 300})
  with pytest.raises(ValueError, match="model.vocab_size=300"):
    D.validate(config)


def test_sentencepiece_bytes_follow_the_text(tmp_path):
  """With the trainer's default normalisation (NFKC, collapsed whitespace, a dummy prefix) the piece
  lengths undercount the text; `encode_with_bytes` and evaluation rows count the text itself."""
  spm = pytest.importorskip("sentencepiece")
  files = D.embedded_corpus_files()[:30]
  text = b"".join(open(f, "rb").read() for f in files)[:150_000].decode("utf-8", "replace")
  prefix = str(tmp_path / "default_norm")
  spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_prefix=prefix, vocab_size=400,
                                 byte_fallback=True, character_coverage=0.995, minloglevel=2)
  tok = D.SentencePieceTokenizer(prefix + ".model")
  sample = "  " + open(D.embedded_corpus_files()[40], encoding="utf-8").read()[:3000] + "é😀 ﬁ\t\t \n\n  "
  ids, nbytes = tok.encode_with_bytes(sample)
  np.testing.assert_array_equal(ids, tok.encode(sample))
  assert (nbytes >= 0).all()
  assert tok.token_bytes[ids].sum() < 0.95 * len(sample.encode("utf-8"))   # the vocabulary's count falls short
  assert nbytes.sum() == len(sample.encode("utf-8"))                       # stripped ends included
  assert nbytes[0] >= 2 and nbytes[-1] >= len("\t\t \n\n  ")              # ... with the nearest pieces
  b_ids, b_bytes = BYTE.encode_with_bytes(sample)
  assert (b_bytes == 1).all() and len(b_ids) == len(sample.encode("utf-8"))

  docs = {f"d{i}.txt": sample[300 * i:300 * i + 200 + 37 * i] + "  \n" for i in range(6)}
  for name, body in docs.items():
    (tmp_path / name).write_text(body, encoding="utf-8")
  config = make_config(source="files", paths=[str(tmp_path / "*.txt")], seq_len=4096, global_batch_size=2,
                       val_fraction=0.0, tokenizer="sentencepiece", sentencepiece_model=prefix + ".model",
                       document_alignment=1)
  batches = list(D.make_eval_iterator(config, "train"))
  assert all(b["target_bytes"].dtype == np.float32 and b["target_bytes"].shape == (2, 4096) for b in batches)
  # One row holds every document whole, so each token after a BOS is a target: the bytes are the texts'.
  counted = sum(float((b["target_bytes"] * b["loss_mask"]).sum()) for b in batches)
  assert counted == sum(len(body.encode("utf-8")) for body in docs.values())
  assert all(not b["target_bytes"][b["segment_ids"] == 0].any() for b in batches)
  assert "target_bytes" not in next(D.make_train_iterator(config))        # training batches are unchanged


# ----------------------------------------------------------------------------------------------
# Sources and splits


def test_embedded_corpus():
  files = D.embedded_corpus_files()
  root = sources.stdlib_dir()
  rel = [os.path.relpath(f, root) for f in files]
  assert rel == sorted(rel)
  assert all(f.endswith(".py") for f in files)
  assert not any(set(r.split(os.sep)) & {"test", "tests", "site-packages"} for r in rel)
  assert sum(os.path.getsize(f) for f in files) > 5_000_000
  assert "os.py" in rel and "json/decoder.py".replace("/", os.sep) in rel


def test_split_is_disjoint_deterministic_and_complete():
  data = make_config().data
  train = sources.load_documents(data, "train")
  val = sources.load_documents(data, "validation")
  everything = sources.all_documents(data)
  assert set(train.keys).isdisjoint(val.keys)
  assert sorted(train.keys + val.keys) == sorted(everything.keys)
  assert len(val) == round(len(everything) * data.val_fraction)
  assert sources.load_documents(data, "validation").keys == val.keys
  # The validation iterator reads the validation documents in order; the training iterator starts
  # with a (shuffled) training document.
  config = make_config(seq_len=256, global_batch_size=2)
  first = row_tokens(next(D.make_eval_iterator(config, num_batches=1)))[0]
  assert first[0] == BYTE.bos_id and first[1:].astype(np.uint8).tobytes() == val[0][:256]
  first = row_tokens(next(D.make_train_iterator(config)))[0]
  prefix = first[1:].astype(np.uint8).tobytes()
  assert any(train[i].startswith(prefix) for i in range(len(train)))
  assert not any(val[i].startswith(prefix) for i in range(len(val)))


def test_text_files_source(tmp_path):
  rng = np.random.default_rng(0)
  texts = write_docs(tmp_path / "a", 15, rng)
  texts.update(write_docs(tmp_path / "b" / "deep", 5, rng, suffix=".md"))
  config = make_config(source="files", paths=[str(tmp_path / "a"), str(tmp_path / "b" / "**" / "*.md")],
                       seq_len=32, global_batch_size=3, val_fraction=0.2)
  D.validate(config)
  got = []
  for split in ("train", "validation"):
    got += stream_documents(list(D.make_eval_iterator(config, split)))
  assert sorted(got) == sorted(texts.values())
  # A single file and a glob give the same documents as listing them.
  files = D.resolve_paths([str(tmp_path / "a" / "d003.txt"), str(tmp_path / "a" / "d00[12].txt")])
  assert [os.path.basename(f) for f in files] == ["d001.txt", "d002.txt", "d003.txt"]


def test_array_record_source(tmp_path):
  from array_record.python import array_record_module

  rng = np.random.default_rng(1)
  texts = [f"record {i}: " + "ü" * int(rng.integers(0, 40)) + "x" * int(rng.integers(0, 80)) for i in range(30)]
  paths = []
  for part in range(2):
    path = str(tmp_path / f"part-{part}.array_record")
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for t in texts[part::2]:
      writer.write(t.encode("utf-8"))
    writer.close()
    paths.append(path)
  config = make_config(source="array_record", paths=[str(tmp_path / "*.array_record")], seq_len=48,
                       global_batch_size=2, val_fraction=0.1)
  D.validate(config)
  got = []
  for split in ("train", "validation"):
    got += stream_documents(list(D.make_eval_iterator(config, split)))
  assert sorted(got) == sorted(texts)


# ----------------------------------------------------------------------------------------------
# Pipelines


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(y) and set(x) - {"target_bytes"} == set(D.BATCH_KEYS)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_train_batches_format_and_determinism():
  config = make_config(seq_len=128, global_batch_size=4, shuffle_seed=3)
  a = take(D.make_train_iterator(config), 6)
  b = take(D.make_train_iterator(config), 6)
  assert_batches_equal(a, b)
  for batch in a:
    for key in D.BATCH_KEYS:
      assert batch[key].shape == (4, 128)
      assert batch[key].dtype == (np.float32 if key == "loss_mask" else np.int32)
    # Positions restart at 0 at every segment start and count up inside a segment.
    seg, pos = batch["segment_ids"], batch["positions"]
    starts = np.concatenate([np.ones((4, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    assert (pos[starts] == 0).all()
    assert (pos[:, 1:][~starts[:, 1:]] == pos[:, :-1][~starts[:, 1:]] + 1).all()
  config.data.shuffle_seed = 4
  c = take(D.make_train_iterator(config), 6)
  assert any((x["inputs"] != y["inputs"]).any() for x, y in zip(a, c))


def test_train_epochs_are_complete_and_reshuffled(tmp_path):
  texts = write_docs(tmp_path, 9, np.random.default_rng(2), max_len=60)
  config = make_config(source="files", paths=[str(tmp_path)], seq_len=16, global_batch_size=2, val_fraction=0.0)
  it = D.make_train_iterator(config)
  total = sum(len(t) + 2 for t in texts.values())
  rows_needed = -(-3 * total // 17) + 2
  docs = stream_documents(take(it, rows_needed // 2 + 1), cut=True)
  epochs = [docs[i * 9:(i + 1) * 9] for i in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == sorted(texts.values())
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_processes_read_disjoint_documents(tmp_path):
  texts = write_docs(tmp_path, 12, np.random.default_rng(3), max_len=80)
  config = make_config(source="files", paths=[str(tmp_path)], seq_len=24, global_batch_size=4, val_fraction=0.0)
  seen = []
  for index in range(2):
    batches = list(D.make_eval_iterator(config, "train", process_index=index, process_count=2))
    assert all(b["inputs"].shape == (2, 24) for b in batches)
    seen.append(stream_documents(batches))
  assert set(seen[0]).isdisjoint(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(texts.values())
  batch = next(D.make_train_iterator(config, process_index=1, process_count=2))
  assert batch["inputs"].shape == (2, 24)
  with pytest.raises(ValueError, match="not divisible by process_count=3"):
    D.make_train_iterator(config, process_count=3)


def test_eval_iterator_padding_and_num_batches(tmp_path):
  texts = write_docs(tmp_path, 5, np.random.default_rng(4), max_len=100)
  config = make_config(source="files", paths=[str(tmp_path)], seq_len=20, global_batch_size=4, val_fraction=0.0)
  batches = list(D.make_eval_iterator(config, "train"))
  total = sum(len(t) + 2 for t in texts.values())
  rows = -(-total // 21)
  assert len(batches) == -(-rows // 4)
  assert all(b["inputs"].shape == (4, 20) for b in batches)
  padding_rows = sum(int((b["segment_ids"] == 0).all(axis=1).sum()) for b in batches)
  assert padding_rows == len(batches) * 4 - rows
  for b in batches:
    assert not b["loss_mask"][b["segment_ids"] == 0].any()
  more = list(D.make_eval_iterator(config, "train", num_batches=len(batches) + 2))
  assert len(more) == len(batches) + 2
  assert_batches_equal(more[:len(batches)], batches)
  assert not more[-1]["loss_mask"].any() and not more[-1]["segment_ids"].any()
  fewer = list(D.make_eval_iterator(config, "train", num_batches=1))
  assert_batches_equal(fewer, batches[:1])
  assert sorted(stream_documents(batches)) == sorted(texts.values())


def test_train_resume_from_state():
  config = make_config(seq_len=512, global_batch_size=2, synthetic_mixture={"fraction": 0.25})
  it = D.make_train_iterator(config)
  take(it, 3)
  state = it.get_state()
  want = take(it, 4)
  fresh = D.make_train_iterator(config)
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 4), want)


def test_train_resume_through_orbax(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  config = make_config(seq_len=64, global_batch_size=2)
  it = D.make_train_iterator(config)
  take(it, 5)
  manager = ocp.CheckpointManager(str(tmp_path / "ckpt"))
  manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  want = take(it, 3)
  fresh = D.make_train_iterator(config)
  restored = ocp.CheckpointManager(str(tmp_path / "ckpt"))
  restored.restore(restored.latest_step(), args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert_batches_equal(take(fresh, 3), want)
  manager.close()
  restored.close()


def test_worker_processes_resume():
  """worker_count > 0 runs the pipeline in grain worker processes (each packs its own share of the
  documents, so the order differs from in-process); the state still restores exactly."""
  config = make_config(seq_len=64, global_batch_size=2, worker_count=1, max_documents=40)
  it = D.make_train_iterator(config)
  take(it, 3)
  state = it.get_state()
  want = take(it, 3)
  fresh = D.make_train_iterator(config)
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 3), want)
  it.close()
  fresh.close()


def test_mixture_rows(tmp_path):
  config = make_config(seq_len=600, global_batch_size=4, synthetic_mixture={"fraction": 0.5})
  D.validate(config)
  batches = take(D.make_train_iterator(config), 3)
  synthetic_rows = 0
  for b in batches:
    for i in range(4):
      text = BYTE.decode(b["inputs"][i])
      if "The pass key is" in text or "special magic number for" in text:
        synthetic_rows += 1
        mask = b["loss_mask"][i] > 0
        answer = BYTE.decode(b["targets"][i][mask])
        assert re.fullmatch(r" \d+", answer), answer
        assert b["segment_ids"][i].min() == 1 and b["segment_ids"][i].max() == 1
        assert (b["positions"][i] == np.arange(600)).all()
  assert synthetic_rows == 6  # grain's mix interleaves by proportion


def test_synthetic_source():
  config = make_config(source="synthetic", seq_len=700, global_batch_size=2)
  D.validate(config)
  b = next(D.make_train_iterator(config))
  assert b["loss_mask"].sum() <= 2 * 8 and b["loss_mask"].sum() >= 2
  v = list(D.make_eval_iterator(config, num_batches=2))
  assert len(v) == 2 and not np.array_equal(v[0]["inputs"], b["inputs"])
  with pytest.raises(ValueError, match="num_batches"):
    D.make_eval_iterator(config)


# ----------------------------------------------------------------------------------------------
# Synthetic tasks


def _find(prompt, needle: bytes) -> int:
  """Token index of `needle` in a byte-tokenized prompt that starts with BOS."""
  body = np.asarray(prompt[1:], np.uint8).tobytes()
  assert body.count(needle) == 1, needle
  return 1 + body.index(needle)


@pytest.mark.parametrize("context_len", [400, 3000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_passkey_example(context_len, depth):
  rng = np.random.default_rng(int(depth * 100) + context_len)
  prompt, answer = D.make_passkey_example(rng, context_len, depth, BYTE)
  assert prompt.dtype == np.int32 and len(prompt) == context_len and prompt[0] == BYTE.bos_id
  key = BYTE.decode(answer).strip()
  assert BYTE.decode(answer) == f" {key}" and 1 <= int(key) <= 50000
  text = BYTE.decode(prompt)
  assert text.startswith(synthetic.PASSKEY_INSTRUCTION)
  assert text.endswith("What is the pass key? The pass key is")
  sentence = f"The pass key is {key}. Remember it. {key} is the pass key. ".encode()
  start = _find(prompt, sentence)
  head = 1 + len(synthetic.PASSKEY_INSTRUCTION)
  budget = context_len - head - len(sentence) - len("What is the pass key? The pass key is")
  longest = max(len(s) for s in synthetic.PASSKEY_FILLER)
  assert abs((start - head) - depth * budget) <= longest / 2 + 1
  if 0 < start - head < budget:  # the pass key sits at a filler sentence boundary
    assert text[start - 3:start - 1] in (". ",) or text[start - 2] == "."


@pytest.mark.parametrize("depth", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_needle_example(depth):
  rng = np.random.default_rng(int(depth * 10))
  haystack = D.Haystack([b"alpha beta gamma delta. " * 50, b"one two three four five. " * 50])
  context_len = 1500
  prompt, answer = D.make_needle_example(rng, context_len, depth, BYTE, haystack=haystack, num_distractors=4)
  assert len(prompt) == context_len and prompt[0] == BYTE.bos_id
  text = BYTE.decode(prompt)
  found = re.findall(r"\nThe special magic number for ([a-z]+-[a-z]+) is (\d+)\.\n", text)
  assert len(found) == 5 and len({k for k, _ in found}) == 5 and len({v for _, v in found}) == 5
  asked = re.search(r"What is the special magic number for ([a-z]+-[a-z]+)\? The special magic number for \1 is$",
                    text).group(1)
  value = dict(found)[asked]
  assert BYTE.decode(answer) == f" {value}" and len(value) == 7
  # Depth: the haystack tokens before the asked needle, not counting other needles.
  start = _find(prompt, f"\nThe special magic number for {asked} is".encode())
  needle_lens = {k: len(f"\nThe special magic number for {k} is {v}.\n") for k, v in found}
  before_needles = sum(needle_lens[k] for k, _ in found
                       if _find(prompt, f"\nThe special magic number for {k} is".encode()) < start)
  head = 1 + len(synthetic.NEEDLE_INSTRUCTION)
  question = len(f"\nWhat is the special magic number for {asked}? The special magic number for {asked} is")
  budget = context_len - head - sum(needle_lens.values()) - question
  assert start - head - before_needles == round(depth * budget)


def test_needle_default_haystack_is_embedded_validation_text():
  prompt, _ = D.make_needle_example(np.random.default_rng(0), 800, 0.5, BYTE, num_distractors=1)
  body = re.sub(r"\nThe special magic number for [a-z-]+ is \d+\.\n", "", BYTE.decode(prompt))
  body = body[len(synthetic.NEEDLE_INSTRUCTION):body.index("\nWhat is the special magic")]
  corpus = b"\n".join(D.embedded_haystack("validation")._documents[i]
                      for i in range(len(D.embedded_haystack("validation")._documents))).decode("utf-8", "replace")
  assert body[:200] in corpus or body[:200] in corpus + corpus  # a contiguous piece, maybe wrapping


def test_haystack_follows_the_runs_split():
  """A run on the embedded corpus draws its needle filler from its own split: the validation haystack
  is that run's validation documents (none of which it trains on), the training haystack its training
  documents; with a larger val_fraction those differ from the defaults' splits."""
  config = make_config(source="embedded", val_fraction=0.2, max_documents=200)
  keys = {split: set(sources.load_documents(config.data, split).keys) for split in sources.SPLITS}
  for split in sources.SPLITS:
    haystack = synthetic.haystack_for(config.data, split)
    assert set(haystack._documents.keys) == keys[split]
  assert not set(synthetic.haystack_for(config.data, "train")._documents.keys) & keys["validation"]
  assert set(synthetic.embedded_haystack("train")._documents.keys) & keys["validation"]   # the old default
  for other in (make_config(source="embedded", val_fraction=0.0), make_config(source="synthetic")):
    assert synthetic.haystack_for(other.data, "validation") is synthetic.embedded_haystack("validation")


def test_synthetic_example_masks_only_the_answer():
  prompt, answer = D.make_passkey_example(np.random.default_rng(5), 300, 0.5, BYTE)
  row = D.synthetic_example(prompt, answer, 310)
  mask = row["loss_mask"] > 0
  assert mask.sum() == len(answer)
  np.testing.assert_array_equal(row["targets"][mask], answer)
  np.testing.assert_array_equal(row["inputs"][:300], prompt)
  assert (row["segment_ids"][:len(prompt) + len(answer)] == 1).all() and not row["segment_ids"][-4:].any()
  with pytest.raises(ValueError, match="exceed"):
    D.synthetic_example(prompt, answer, 300)


def test_synthetic_examples_too_short():
  with pytest.raises(ValueError, match="context_len=100 is too short"):
    D.make_passkey_example(np.random.default_rng(0), 100, 0.5, BYTE)
  with pytest.raises(ValueError, match="depth=1.5"):
    D.make_passkey_example(np.random.default_rng(0), 1000, 1.5, BYTE)


# ----------------------------------------------------------------------------------------------
# Config errors


@pytest.mark.parametrize("overrides, message", [
    ({"source": "files", "paths": ["/nonexistent/dir"]}, r"data.paths\[0\]='/nonexistent/dir' does not exist"),
    ({"source": "files", "paths": []}, r"data.paths=\(\) is empty"),
    ({"source": "array_record", "paths": ["/tmp/*.no_such_extension_here"]}, "matches no files"),
    ({"source": "web"}, r"data.source='web' is not one of \('embedded', 'files', 'array_record', 'synthetic'\)"),
    ({"tokenizer": "wordpiece"}, r"data.tokenizer='wordpiece' is not one of \('byte', 'sentencepiece'\)"),
    ({"tokenizer": "sentencepiece"}, r"data.sentencepiece_model=None must be an existing"),
    ({"seq_len": 0}, r"data.seq_len=0 must be >= 1"),
    ({"global_batch_size": -2}, r"data.global_batch_size=-2 must be >= 1"),
    ({"val_fraction": 1.0}, r"data.val_fraction=1.0 must be in \[0.0, 1.0\)"),
    ({"paths": ["x"]}, r"only read by data.source"),
    ({"synthetic_mixture": {"fraction": 0.1}, "seq_len": 64}, r"data.seq_len=64 is too short for the synthetic"),
    ({"synthetic_mixture": {"fraction": 0.1, "passkey_weight": 0.0, "needle_weight": 0.0}}, "must be > 0"),
])
def test_config_errors(overrides, message):
  config = make_config(**overrides)
  with pytest.raises(ValueError, match=message):
    D.validate(config)


def test_config_errors_need_temp_dirs(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="is a directory with no files"):
    D.validate(make_config(source="files", paths=[str(tmp_path / "empty")]))
  with pytest.raises(ValueError, match="matches no files"):
    D.validate(make_config(source="files", paths=[str(tmp_path / "*.txt")]))
  config = make_config()
  config.data = ml_collections.ConfigDict({**D.default_config().to_dict(), "seq_len": "long"})
  with pytest.raises(ValueError, match="data.seq_len='long' must be an int"):
    D.validate(config)
  config = make_config()
  config.data.bogus = 1
  with pytest.raises(ValueError, match=r"unknown keys in config.data: \['bogus'\]"):
    D.validate(config)
  (tmp_path / "one.txt").write_text("a single document")
  with pytest.raises(ValueError, match="data.val_fraction=0.02 needs at least 2 documents"):
    D.validate(make_config(source="files", paths=[str(tmp_path / "one.txt")]))
  D.validate(make_config(source="files", paths=[str(tmp_path / "one.txt")], val_fraction=0.0))
  D.validate(make_config())  # the defaults are valid
