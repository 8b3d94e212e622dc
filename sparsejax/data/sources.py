"""Document sources: text files (one document per file), ArrayRecord files (one UTF-8 document per
record) and the embedded default corpus (the Python standard library's own source files).

A source is a random-access sequence of `bytes` documents (grain's `RandomAccessDataSource`
protocol: `__len__`, `__getitem__`), already restricted to one split. The split is by document and
deterministic: documents are ranked by a SHA-1 hash of a stable key (the path relative to the common
root for files, the record index for ArrayRecord), and the first `round(n * val_fraction)` of that
ranking (at least one when `val_fraction > 0`, never all) form the validation split. Adding a file
to a directory therefore moves no other file between the splits, except through the count.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import os
import sysconfig

import numpy as np

SOURCES = ("embedded", "files", "array_record", "synthetic")
SPLITS = ("train", "validation")

# Directories of the standard library that are not part of the embedded corpus: tests (they are
# large and repetitive), third-party packages, caches.
_EMBEDDED_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def _walk_files(directory: str) -> list[str]:
  """Regular, non-hidden files under `directory`, recursively (hidden directories skipped)."""
  out = []
  for root, dirs, files in os.walk(directory):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    out.extend(os.path.join(root, f) for f in files if not f.startswith("."))
  return out


def resolve_paths(paths, *, key: str = "data.paths") -> list[str]:
  """Expands files, directories (recursively) and glob patterns (`**` allowed) into a sorted list of
  unique regular files. Raises ValueError naming the entry when one does not exist or matches
  nothing, or when the list is empty."""
  if isinstance(paths, (str, bytes)) or paths is None:
    raise ValueError(f"{key}={paths!r} must be a tuple of files, directories or glob patterns")
  paths = list(paths)
  if not paths:
    raise ValueError(f"{key}=() is empty; give at least one file, directory or glob pattern")
  files = set()
  for i, entry in enumerate(paths):
    if not isinstance(entry, str) or not entry:
      raise ValueError(f"{key}[{i}]={entry!r} must be a non-empty string")
    entry = os.path.expanduser(entry)
    if glob.has_magic(entry):
      matches = sorted(glob.glob(entry, recursive=True))
      found = []
      for m in matches:
        found.extend(_walk_files(m) if os.path.isdir(m) else [m] if os.path.isfile(m) else [])
      if not found:
        raise ValueError(f"{key}[{i}]={entry!r} matches no files")
    elif os.path.isdir(entry):
      found = _walk_files(entry)
      if not found:
        raise ValueError(f"{key}[{i}]={entry!r} is a directory with no files")
    elif os.path.isfile(entry):
      found = [entry]
    else:
      raise ValueError(f"{key}[{i}]={entry!r} does not exist")
    files.update(os.path.abspath(f) for f in found)
  return sorted(files)


def stdlib_dir() -> str:
  """The directory of the running Python's standard library sources."""
  return sysconfig.get_paths()["stdlib"]


@functools.lru_cache(maxsize=None)
def embedded_corpus_files() -> tuple[str, ...]:
  """The embedded default corpus: every `.py` file of the standard library outside test
  directories and site-packages, sorted by relative path (about 12 MB in 730 files on CPython
  3.11). Its content depends on the Python version, so it is deterministic per installation."""
  root = stdlib_dir()
  out = []
  for dirpath, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if d not in _EMBEDDED_SKIP_DIRS and not d.startswith(".")]
    out.extend(os.path.join(dirpath, f) for f in files if f.endswith(".py") and not f.startswith("."))
  out.sort(key=lambda p: os.path.relpath(p, root))
  if not out:
    raise RuntimeError(f"the embedded corpus is empty: no .py files under the standard library at {root!r}")
  return tuple(out)


def _split_indices(keys: list[str], val_fraction: float, split: str) -> np.ndarray:
  """Indices (ascending) of the documents of `split`, chosen by ranking the SHA-1 of each key."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r} is not one of {SPLITS}")
  n = len(keys)
  if val_fraction > 0 and n >= 2:
    n_val = min(n - 1, max(1, round(n * val_fraction)))
  else:
    n_val = 0
  rank = sorted(range(n), key=lambda i: (hashlib.sha1(keys[i].encode("utf-8")).hexdigest(), i))
  chosen = rank[:n_val] if split == "validation" else rank[n_val:]
  return np.asarray(sorted(chosen), dtype=np.int64)


class FileDocuments:
  """One document per file (the raw bytes of the file)."""

  def __init__(self, files, keys):
    self.files = list(files)
    self.keys = list(keys)

  def __len__(self):
    return len(self.files)

  def __getitem__(self, index: int) -> bytes:
    with open(self.files[index], "rb") as f:
      return f.read()

  def subset(self, indices) -> "FileDocuments":
    return FileDocuments([self.files[i] for i in indices], [self.keys[i] for i in indices])

  def __repr__(self):
    return f"FileDocuments({len(self)} files)"


class ArrayRecordDocuments:
  """One document per ArrayRecord record (UTF-8 bytes); `indices` select records of the files."""

  def __init__(self, files, indices=None):
    import grain

    self.files = list(files)
    self._source = grain.sources.ArrayRecordDataSource(self.files)
    total = len(self._source)
    self.indices = np.arange(total, dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
    self.keys = [str(int(i)) for i in self.indices]

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, index: int) -> bytes:
    record = self._source[int(self.indices[index])]
    return bytes(record)

  def subset(self, indices) -> "ArrayRecordDocuments":
    return ArrayRecordDocuments(self.files, self.indices[np.asarray(indices, np.int64)])

  def __repr__(self):
    return f"ArrayRecordDocuments({len(self)} records in {len(self.files)} files)"


def _relative_keys(files: list[str]) -> list[str]:
  if len(files) == 1:
    return [os.path.basename(files[0])]
  root = os.path.commonpath(files)
  return [os.path.relpath(f, root) for f in files]


def all_documents(data) -> FileDocuments | ArrayRecordDocuments:
  """Every document of the configured source (before the split), capped by `max_documents`.
  `data` is the `config.data` section. Not defined for the synthetic source."""
  if data.source == "embedded":
    files = list(embedded_corpus_files())
    docs = FileDocuments(files, [os.path.relpath(f, stdlib_dir()) for f in files])
  elif data.source == "files":
    files = resolve_paths(data.paths)
    docs = FileDocuments(files, _relative_keys(files))
  elif data.source == "array_record":
    docs = ArrayRecordDocuments(resolve_paths(data.paths))
    if len(docs) == 0:
      raise ValueError(f"data.paths={tuple(data.paths)!r}: the ArrayRecord files hold no records")
  else:
    raise ValueError(f"data.source={data.source!r} has no documents; choose one of {SOURCES[:3]}")
  if data.max_documents is not None and data.max_documents < len(docs):
    docs = docs.subset(range(data.max_documents))
  return docs


def load_documents(data, split: str) -> FileDocuments | ArrayRecordDocuments:
  """The documents of `split` ("train" or "validation") of the configured source.
  Raises ValueError when the split is empty."""
  docs = all_documents(data)
  indices = _split_indices(docs.keys, data.val_fraction, split)
  if len(indices) == 0:
    raise ValueError(
        f"the {split} split of data.source={data.source!r} is empty ({len(docs)} documents, "
        f"data.val_fraction={data.val_fraction}); add documents or change data.val_fraction")
  return docs.subset(indices)
