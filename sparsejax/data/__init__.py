"""Data: sources, tokenizers, packing, synthetic long-context tasks and grain pipelines.

Batches follow docs/contracts.md §3: dicts of numpy arrays `inputs, targets, positions, segment_ids`
int32 `[B, T]` and `loss_mask` float32 `[B, T]`, per process.
"""
from sparsejax.data.config import default_config, validate
from sparsejax.data.packing import BATCH_KEYS, PackIterDataset, PadRowsIterDataset, padding_example, row_to_example
from sparsejax.data.pipeline import make_eval_iterator, make_train_iterator
from sparsejax.data.sources import (ArrayRecordDocuments, FileDocuments, embedded_corpus_files, load_documents,
                                    resolve_paths)
from sparsejax.data.synthetic import (Haystack, embedded_haystack, make_needle_example, make_passkey_example,
                                      synthetic_example)
from sparsejax.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, make_tokenizer

__all__ = [
    "ArrayRecordDocuments", "BATCH_KEYS", "ByteTokenizer", "FileDocuments", "Haystack", "PackIterDataset",
    "PadRowsIterDataset", "SentencePieceTokenizer", "default_config", "embedded_corpus_files",
    "embedded_haystack", "load_documents", "make_eval_iterator", "make_needle_example", "make_passkey_example",
    "make_tokenizer", "make_train_iterator", "padding_example", "resolve_paths", "row_to_example",
    "synthetic_example", "validate",
]
