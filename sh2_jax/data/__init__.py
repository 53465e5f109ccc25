"""Byte-level training data: readers (text, directories, FASTA, gzip), packing into fixed-length
windows with a document separator, the held-out split, and the Grain pipelines."""

from sh2_jax.data.packing import PackedWindows, pack_documents, split_windows
from sh2_jax.data.pipeline import eval_batches, load_dataset, train_iterator
from sh2_jax.data.readers import default_corpus_path, read_documents

__all__ = ["PackedWindows", "pack_documents", "split_windows", "eval_batches", "load_dataset",
           "train_iterator", "default_corpus_path", "read_documents"]
