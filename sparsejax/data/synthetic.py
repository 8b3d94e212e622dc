"""Synthetic long-context retrieval tasks: passkey retrieval and needle in a haystack.

Passkey retrieval follows the Landmark Attention test (Mohtashami & Jaggi 2023): an instruction,
then a filler paragraph repeated, with "The pass key is N. Remember it. N is the pass key." placed
inside it at a sentence boundary, then "What is the pass key? The pass key is"; the answer is " N".

Needle in a haystack: real text from the embedded corpus (the standard library sources) as the
haystack, one needle "The special magic number for <key> is <value>." and several distractor needles
with other keys and values at random places, then the question for the needle's key; the answer is
" <value>".

Both builders work on token ids, so the lengths are exact for any tokenizer: the prompt is exactly
`context_len` tokens, starting with BOS. `depth` in [0, 1] is the fraction of the filler (haystack)
tokens that come before the needle: the needle starts after `round(depth * F)` of the `F` filler
tokens (for the passkey, after the filler sentence boundary nearest to `depth * F`; a filler
sentence is about 20 byte tokens). Pieces are tokenized separately and concatenated (with SentencePiece each piece therefore
starts a new word).

As training rows (`synthetic_example`) a prompt and its answer fill one row; `loss_mask` is 1 only
where the target is an answer token, so the model is trained on the retrieval, not on the filler.
"""
from __future__ import annotations

import functools

import numpy as np

from sparsejax.data import config as data_config
from sparsejax.data import packing, sources

TASKS = ("passkey", "needle")

PASSKEY_INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. "
                       "Find it and memorize them. I will quiz you about the important information there. ")
PASSKEY_FILLER = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ",
                  "There and back again. ")
PASSKEY_QUESTION = "What is the pass key? The pass key is"
NEEDLE_INSTRUCTION = ("Some special magic numbers are hidden inside the following text. "
                      "Remember them; you will be asked about one of them.\n")

_KEY_ADJECTIVES = ("amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly",
                   "keen", "lucid", "mellow", "noble", "olive", "proud", "quiet", "rapid", "silent", "tidy",
                   "upper", "vivid", "wild", "young")
_KEY_NOUNS = ("harbor", "meadow", "lantern", "falcon", "canyon", "orchard", "glacier", "violin", "compass",
              "anchor", "beacon", "cedar", "delta", "ember", "forest", "garden", "island", "jungle", "kettle",
              "ladder", "mirror", "pepper", "river", "saddle")
_LONGEST_KEY = max(_KEY_ADJECTIVES, key=len) + "-" + max(_KEY_NOUNS, key=len)
LENGTH_SLACK = 8  # added to the computed minimum lengths: SentencePiece lengths vary with the digits and keys


def _passkey_needle(passkey) -> str:
  return f"The pass key is {passkey}. Remember it. {passkey} is the pass key. "


def _needle_sentence(key: str, value) -> str:
  return f"\nThe special magic number for {key} is {value}.\n"


def _needle_question(key: str) -> str:
  return f"\nWhat is the special magic number for {key}? The special magic number for {key} is"


def _answer(value) -> str:
  return f" {value}"


class Haystack:
  """A token stream made of documents joined by newlines, from which contiguous pieces are cut.

  `documents`: a sequence of `bytes`/`str` documents. The stream is tokenized once per tokenizer (the
  first `max_bytes` of text) and wraps around when a piece runs past its end."""

  def __init__(self, documents, *, max_bytes: int = 4 << 20):
    self._documents = documents
    self._max_bytes = max_bytes
    self._text = None
    self._tokens = {}

  def _joined(self) -> bytes:
    if self._text is None:
      parts, size = [], 0
      for i in range(len(self._documents)):
        doc = self._documents[i]
        doc = doc.encode("utf-8") if isinstance(doc, str) else bytes(doc)
        parts.append(doc)
        size += len(doc) + 1
        if size >= self._max_bytes:
          break
      text = b"\n".join(parts)[:self._max_bytes]
      if not text:
        raise ValueError("the haystack documents hold no text")
      self._text = text
    return self._text

  def tokens(self, tokenizer) -> np.ndarray:
    key = repr(tokenizer)
    if key not in self._tokens:
      self._tokens[key] = tokenizer.encode(self._joined())
    return self._tokens[key]

  def take(self, rng: np.random.Generator, num_tokens: int, tokenizer) -> np.ndarray:
    """int32 [num_tokens] contiguous tokens from a random start (wrapping around)."""
    stream = self.tokens(tokenizer)
    start = int(rng.integers(0, len(stream)))
    return np.take(stream, np.arange(start, start + num_tokens), mode="wrap").astype(np.int32)

  def __getstate__(self):  # grain workers get the documents, not the cached tokens
    return {"_documents": self._documents, "_max_bytes": self._max_bytes, "_text": None, "_tokens": {}}


@functools.lru_cache(maxsize=None)
def embedded_haystack(split: str = "validation", val_fraction: float | None = None,
                      max_documents: int | None = None) -> Haystack:
  """The haystack of the embedded corpus' `split`, under `val_fraction` and `max_documents` (None:
  the defaults). Evaluation uses the validation split so that the haystack text was not trained on."""
  data = data_config.default_config()
  data.source = "embedded"
  if val_fraction is not None:
    data.val_fraction = float(val_fraction)
  data.max_documents = max_documents
  return Haystack(sources.load_documents(data, split))


def haystack_for(data, split: str) -> Haystack:
  """The needle haystack of a run on `data` (its `config.data`): for a run on the embedded corpus with
  a validation split, that run's own `split` (so the validation haystack holds no text it trained on,
  and training rows' haystack no validation text); otherwise the embedded corpus' `split` under the
  defaults (a run on other text, or on the embedded corpus with `val_fraction=0`, whose validation
  haystack it then has trained on)."""
  return embedded_haystack(*_haystack_args(data, split))


def _haystack_args(data, split: str) -> tuple:
  if data.source == "embedded" and data.val_fraction > 0:
    return split, float(data.val_fraction), data.max_documents
  return (split,)


def _fill_budget(prompt_len: int, fixed: int, what: str) -> int:
  budget = prompt_len - fixed
  if budget < 0:
    raise ValueError(f"context_len={prompt_len} is too short for a {what} example: its fixed text alone "
                     f"takes {fixed} tokens")
  return budget


def _check_depth(depth):
  if not 0.0 <= float(depth) <= 1.0:
    raise ValueError(f"depth={depth!r} must be in [0, 1]")


def _passkey(rng, depth, tokenizer, *, passkey, passkey_max, context_len=None, total_len=None):
  _check_depth(depth)
  if passkey is None:
    passkey = int(rng.integers(1, passkey_max + 1))
  head = np.concatenate([[tokenizer.bos_id], tokenizer.encode(PASSKEY_INSTRUCTION)]).astype(np.int32)
  needle = tokenizer.encode(_passkey_needle(passkey))
  tail = tokenizer.encode(PASSKEY_QUESTION)
  answer = tokenizer.encode(_answer(passkey))
  prompt_len = context_len if context_len is not None else total_len - len(answer)
  budget = _fill_budget(prompt_len, len(head) + len(needle) + len(tail), "passkey")
  sentences = [tokenizer.encode(x) for x in PASSKEY_FILLER]
  unit = np.concatenate(sentences)
  filler = np.resize(unit, budget).astype(np.int32)  # np.resize repeats the unit
  # The pass key sentence goes at the filler sentence boundary nearest to depth * budget.
  starts = np.cumsum([0] + [len(x) for x in sentences[:-1]])
  boundaries = (np.arange(budget // len(unit) + 2)[:, None] * len(unit) + starts[None, :]).reshape(-1)
  boundaries = np.append(boundaries[boundaries <= budget], budget)
  before = int(boundaries[np.argmin(np.abs(boundaries - float(depth) * budget))])
  prompt = np.concatenate([head, filler[:before], needle, filler[before:], tail]).astype(np.int32)
  return prompt, answer.astype(np.int32)


def make_passkey_example(rng: np.random.Generator, context_len: int, depth: float, tokenizer, *,
                         passkey: int | None = None, passkey_max: int = 50000):
  """A passkey retrieval example.

  Returns `(prompt_ids int32 [context_len], answer_ids int32 [A])`: the prompt starts with BOS and its
  length is exactly `context_len`; the answer is `" <passkey>"` tokenized. The pass key is drawn
  uniformly from [1, passkey_max] unless given. Raises ValueError when `context_len` cannot hold the
  instruction, the pass key sentence and the question."""
  return _passkey(rng, depth, tokenizer, passkey=passkey, passkey_max=passkey_max, context_len=context_len)


def _draw_keys_values(rng, count, value_digits):
  pairs = rng.choice(len(_KEY_ADJECTIVES) * len(_KEY_NOUNS), size=count, replace=False)
  keys = [f"{_KEY_ADJECTIVES[p // len(_KEY_NOUNS)]}-{_KEY_NOUNS[p % len(_KEY_NOUNS)]}" for p in pairs]
  low, high = 10 ** (value_digits - 1), 10 ** value_digits
  values = []
  while len(values) < count:
    v = int(rng.integers(low, high))
    if v not in values:
      values.append(v)
  return keys, values


def _needle(rng, depth, tokenizer, *, haystack, num_distractors, value_digits, context_len=None, total_len=None):
  _check_depth(depth)
  if haystack is None:
    haystack = embedded_haystack("validation")
  keys, values = _draw_keys_values(rng, 1 + num_distractors, value_digits)
  head = np.concatenate([[tokenizer.bos_id], tokenizer.encode(NEEDLE_INSTRUCTION)]).astype(np.int32)
  needles = [tokenizer.encode(_needle_sentence(k, v)) for k, v in zip(keys, values)]
  tail = tokenizer.encode(_needle_question(keys[0]))
  answer = tokenizer.encode(_answer(values[0]))
  prompt_len = context_len if context_len is not None else total_len - len(answer)
  budget = _fill_budget(prompt_len, len(head) + sum(len(n) for n in needles) + len(tail), "needle")
  hay = haystack.take(rng, budget, tokenizer)
  # Insertion points in haystack coordinates: the needle at `depth`, distractors anywhere.
  points = [int(round(float(depth) * budget))] + [int(p) for p in rng.integers(0, budget + 1, size=num_distractors)]
  order = sorted(range(len(points)), key=lambda i: (points[i], i))
  pieces, cursor = [head], 0
  for i in order:
    pieces.append(hay[cursor:points[i]])
    pieces.append(needles[i])
    cursor = points[i]
  pieces += [hay[cursor:], tail]
  return np.concatenate(pieces).astype(np.int32), answer.astype(np.int32)


def make_needle_example(rng: np.random.Generator, context_len: int, depth: float, tokenizer, *,
                        haystack: Haystack | None = None, num_distractors: int = 3, value_digits: int = 7):
  """A needle-in-a-haystack example with distractors.

  Returns `(prompt_ids int32 [context_len], answer_ids int32 [A])`. Keys are distinct
  "<adjective>-<noun>" names, values distinct `value_digits`-digit numbers; the question asks for the
  key of the needle placed at `depth`; `num_distractors` other needles sit at uniform random places.
  The haystack defaults to the embedded corpus' validation split."""
  return _needle(rng, depth, tokenizer, haystack=haystack, num_distractors=num_distractors,
                 value_digits=value_digits, context_len=context_len)


def synthetic_example(prompt_ids, answer_ids, seq_len: int) -> dict[str, np.ndarray]:
  """One row in the batch format ([T] each, T = seq_len) from a prompt and its answer: one segment,
  positions from 0, `loss_mask` 1 exactly where the target is an answer token. When the prompt and
  answer are shorter than `seq_len + 1` tokens the rest is padding (segment 0)."""
  prompt_ids, answer_ids = np.asarray(prompt_ids, np.int32), np.asarray(answer_ids, np.int32)
  n = len(prompt_ids) + len(answer_ids)
  if n > seq_len + 1:
    raise ValueError(f"prompt ({len(prompt_ids)}) + answer ({len(answer_ids)}) tokens exceed seq_len + 1 = {seq_len + 1}")
  if len(prompt_ids) == 0 or len(answer_ids) == 0:
    raise ValueError("prompt and answer must both be non-empty")
  tokens = np.zeros((seq_len + 1,), np.int32)
  segments = np.zeros((seq_len + 1,), np.int32)
  tokens[:n] = np.concatenate([prompt_ids, answer_ids])
  segments[:n] = 1
  positions = np.where(segments > 0, np.arange(seq_len + 1), 0).astype(np.int32)
  row = packing.row_to_example(tokens, segments, positions)
  mask = np.zeros((seq_len,), np.float32)
  mask[len(prompt_ids) - 1:n - 1] = 1.0
  row["loss_mask"] = mask
  return row


def _passkey_fixed_tokens(tokenizer, passkey_max: int) -> tuple[int, int]:
  """(prompt, answer) tokens of a passkey example without filler, for the largest pass key."""
  prompt = 1 + sum(len(tokenizer.encode(s)) for s in (PASSKEY_INSTRUCTION, _passkey_needle(passkey_max),
                                                      PASSKEY_QUESTION))
  return prompt, len(tokenizer.encode(_answer(passkey_max)))


def _needle_fixed_tokens(tokenizer, num_distractors: int, value_digits: int) -> tuple[int, int]:
  """(prompt, answer) tokens of a needle example without filler, for the longest key and value."""
  value = "9" * value_digits
  prompt = (1 + len(tokenizer.encode(NEEDLE_INSTRUCTION))
            + (1 + num_distractors) * len(tokenizer.encode(_needle_sentence(_LONGEST_KEY, value)))
            + len(tokenizer.encode(_needle_question(_LONGEST_KEY))))
  return prompt, len(tokenizer.encode(_answer(value)))


def min_context_len(task: str, tokenizer, *, num_distractors: int = 3, passkey_max: int = 50000,
                    value_digits: int = 7) -> int:
  """The shortest `context_len` that `make_passkey_example` / `make_needle_example` (same keyword
  defaults) accept for `task`: the fixed text of its prompt, plus `LENGTH_SLACK`."""
  if task == "passkey":
    prompt, _ = _passkey_fixed_tokens(tokenizer, passkey_max)
  else:
    prompt, _ = _needle_fixed_tokens(tokenizer, num_distractors, value_digits)
  return prompt + LENGTH_SLACK


def min_row_tokens(data, tokenizer) -> int:
  """The fewest tokens (prompt + answer) a synthetic row of the configured tasks needs (no filler)."""
  mix = data.synthetic_mixture
  need = []
  if mix.passkey_weight > 0:
    need.append(sum(_passkey_fixed_tokens(tokenizer, mix.passkey_max)))
  if mix.needle_weight > 0:
    need.append(sum(_needle_fixed_tokens(tokenizer, mix.needle_distractors, mix.needle_value_digits)))
  return max(need) + LENGTH_SLACK


class SyntheticRows:
  """index -> one training/evaluation row (batch format, [T] each) of a synthetic task.

  Each row draws its own generator from `(seed, stream, index)`, so rows are deterministic and
  independent of the order they are read in. The task is drawn by the mixture weights, the depth
  uniformly in [0, 1]; the needle haystack is `haystack_for(data, haystack_split)`."""

  def __init__(self, data, tokenizer, *, stream: int, haystack_split: str):
    mix = data.synthetic_mixture
    self._seed = int(data.shuffle_seed)
    self._stream = int(stream)
    self._seq_len = int(data.seq_len)
    self._tokenizer = tokenizer
    weights = np.asarray([mix.passkey_weight, mix.needle_weight], np.float64)
    self._probs = weights / weights.sum()
    self._passkey_max = int(mix.passkey_max)
    self._distractors = int(mix.needle_distractors)
    self._digits = int(mix.needle_value_digits)
    self._haystack_args = _haystack_args(data, haystack_split)   # the haystack is loaded on first use

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self._seed, self._stream, int(index)])
    task = TASKS[int(rng.choice(len(TASKS), p=self._probs))]
    depth = float(rng.uniform())
    total = self._seq_len + 1
    if task == "passkey":
      prompt, answer = _passkey(rng, depth, self._tokenizer, passkey=None, passkey_max=self._passkey_max,
                                total_len=total)
    else:
      prompt, answer = _needle(rng, depth, self._tokenizer, haystack=embedded_haystack(*self._haystack_args),
                               num_distractors=self._distractors, value_digits=self._digits, total_len=total)
    return synthetic_example(prompt, answer, self._seq_len)
