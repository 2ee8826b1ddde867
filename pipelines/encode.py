"""Categorical id encoding: a train-only vocabulary or stable hashing, per feature.

Both encoders reduce to one mapping table (raw value → index) applied with a join, so train, valid, test and
the history lists go through exactly the same code and the same raw id always gets the same index.
Index 0 is padding and 1 is out-of-vocabulary (unseen, rare or null).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from msit_rec.data.encoding import hash_bucket
from msit_rec.data.spec import FIRST_VOCAB_INDEX, OOV_INDEX
from msit_rec.errors import DataError
from pipelines.config import CategoricalFeature

RAW = "raw"
INDEX = "index"
COUNT = "count"


def distinct_text_map(values: pl.Series, fn: Callable[[str], int]) -> pl.DataFrame:
    """Table RAW → INDEX = fn(text of RAW) over the distinct non-null values (one Python call per distinct value)."""
    uniques = values.drop_nulls().unique().sort()
    return pl.DataFrame({RAW: uniques, INDEX: pl.Series([fn(str(v)) for v in uniques.to_list()], dtype=pl.Int64)})


def apply_map(values: pl.Series, table: pl.DataFrame, default: int | None) -> pl.Series:
    """Join raw values onto a RAW → INDEX table; values missing from it (and nulls) become `default`."""
    raw = values.cast(table[RAW].dtype, strict=False).to_frame(RAW)
    joined = raw.join(table.select(RAW, INDEX), on=RAW, how="left", maintain_order="left")[INDEX]
    return joined if default is None else joined.fill_null(default)


@dataclass
class FittedEncoder:
    """A feature's raw → index mapping. For vocab features the table is the vocabulary written to disk."""

    feature: CategoricalFeature
    vocabulary: pl.DataFrame | None  # RAW (raw dtype), INDEX, COUNT; None under hashing
    cardinality: int

    def lookup(self, values: pl.Series) -> pl.DataFrame:
        """RAW → INDEX table covering `values` (the vocabulary, or the hash buckets of the distinct values)."""
        if self.vocabulary is not None:
            return self.vocabulary.select(RAW, INDEX)
        buckets = self.feature.buckets
        return distinct_text_map(values, lambda text: hash_bucket(text, buckets))

    def encode(self, values: pl.Series) -> pl.Series:
        """Encoded int64 ids for raw values; unknown and null values map to OOV."""
        return apply_map(values, self.lookup(values), OOV_INDEX).rename(self.feature.name)


def fit_encoder(feature: CategoricalFeature, train_values: pl.Series) -> FittedEncoder:
    """Vocabulary from the train split only: values seen at least `min_count` times, most frequent first."""
    if feature.encoding == "hash":
        return FittedEncoder(feature, None, FIRST_VOCAB_INDEX + feature.buckets)
    counts = (
        train_values.drop_nulls()
        .to_frame(RAW)
        .group_by(RAW)
        .agg(pl.len().cast(pl.Int64).alias(COUNT))
        .filter(pl.col(COUNT) >= feature.min_count)
        .sort([COUNT, RAW], descending=[True, False])
    )
    vocab = counts.with_columns(
        (pl.int_range(pl.len(), dtype=pl.Int64) + FIRST_VOCAB_INDEX).alias(INDEX)
    ).select(RAW, INDEX, COUNT)
    return FittedEncoder(feature, vocab, FIRST_VOCAB_INDEX + len(vocab))


def read_vocabulary(path: str | Path, feature: str) -> pl.DataFrame:
    """A vocabulary file as `prepare` writes it (RAW, INDEX, COUNT), checked enough to extend it safely."""
    try:
        vocab = pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise DataError(f"vocabulary {path} (feature '{feature}'): unreadable ({exc})") from None
    if not {RAW, INDEX} <= set(vocab.columns):
        raise DataError(f"vocabulary {path} (feature '{feature}'): expected columns {RAW}, {INDEX}, {COUNT}; "
                        f"found {vocab.columns}")
    if COUNT not in vocab.columns:
        vocab = vocab.with_columns(pl.lit(0, dtype=pl.Int64).alias(COUNT))
    return vocab.select(RAW, pl.col(INDEX).cast(pl.Int64), pl.col(COUNT).cast(pl.Int64)).sort(INDEX)


def extend_encoder(
    feature: CategoricalFeature, train_values: pl.Series, parent: pl.DataFrame, parent_cardinality: int
) -> FittedEncoder:
    """The parent's vocabulary with every index kept, plus the train ids it lacks that pass `min_count`, appended
    after the parent's last row most frequent first (ties by raw value). Parent ids absent from this train split
    keep their index (their COUNT becomes 0): a table never shrinks. Vocabulary features only (hashed ones are stable
    already: ParentVocab.encoder)."""
    raw_type = parent[RAW].dtype
    values = train_values.drop_nulls()
    cast = values.cast(raw_type, strict=False)
    if cast.null_count():  # an int vocabulary and text ids that are not ints: the ids would silently become OOV
        bad = values.filter(cast.is_null()).head(3).to_list()
        raise DataError(f"feature '{feature.name}': raw ids {bad} do not fit the --vocab-from vocabulary's type "
                        f"{raw_type} (column '{feature.column}' changed type?)")
    counts = cast.to_frame(RAW).group_by(RAW).agg(pl.len().cast(pl.Int64).alias(COUNT))
    known = parent.drop(COUNT).join(counts, on=RAW, how="left").with_columns(pl.col(COUNT).fill_null(0))
    new = (
        counts.join(parent.select(RAW), on=RAW, how="anti")
        .filter(pl.col(COUNT) >= feature.min_count)
        .sort([COUNT, RAW], descending=[True, False])
        .with_columns((pl.int_range(pl.len(), dtype=pl.Int64) + parent_cardinality).alias(INDEX))
    )
    vocab = pl.concat([known.select(RAW, INDEX, COUNT), new.select(RAW, INDEX, COUNT)]).sort(INDEX)
    return FittedEncoder(feature, vocab, parent_cardinality + len(new))
