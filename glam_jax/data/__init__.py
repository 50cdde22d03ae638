"""Data layer: corpora, tokenizer and the packed, checkpointable grain pipeline."""

from glam_jax.data.pipeline import DataBundle, create_datasets
from glam_jax.data.text_corpus import DataError

__all__ = ["DataBundle", "DataError", "create_datasets"]
