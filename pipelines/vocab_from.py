"""`prepare --vocab-from PARENT`: today's examples indexed like yesterday's, so yesterday's model fits them.

Every id of the parent's vocabularies keeps its index; ids new in today's train split that pass `min_count` are
appended after the parent's last row (most frequent first, ties by raw value); ids of the parent not seen today
keep their row. Hash-encoded features are stable by construction. Tables therefore only grow, and a model trained
on the parent is a prefix of a model of today's tables (`fit --init-from`, msit_rec/train/warm_start.py).

Numeric features are standardised (and nulls imputed) with the parent's numeric_stats, not today's train statistics:
one raw value is the same model input every day, so yesterday's model scores today's examples as its served
artifact would, and a warm-started model sees unshifted inputs. dataset.json records it
(`lineage.numeric_stats_from`: the parent's content hash; its `numeric_stats` mean/std are the parent's).

The parent must describe the same model inputs: the same categorical features (encoding, table, embedding dim,
hash buckets), numeric features, scenarios and behaviour feedback; anything else is refused naming the feature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from msit_rec.data.spec import FIRST_VOCAB_INDEX, DatasetMeta, FeatureSpec, Lineage, NumericStats
from msit_rec.errors import DataError
from pipelines.config import CategoricalFeature, DatasetConfig, NumericFeature
from pipelines.encode import INDEX, FittedEncoder, extend_encoder, fit_encoder, read_vocabulary


@dataclass
class ParentVocab:
    """The --vocab-from examples directory: its metadata, read and checked before any work."""

    root: Path
    meta: DatasetMeta

    @classmethod
    def load(cls, root: str | Path, config: DatasetConfig) -> ParentVocab:
        root = Path(root)
        if not root.is_dir():  # DatasetMeta.load would accept dataset.json itself, and the vocabularies then fail
            what = "is a file" if root.exists() else "does not exist"
            raise DataError(f"--vocab-from {root}: {what}; give the parent examples directory (the one holding "
                            f"dataset.json)")
        parent = cls(root, DatasetMeta.load(root))
        parent.check_compatible(config)
        return parent

    def _where(self) -> str:
        return f"--vocab-from {self.root}"

    def check_compatible(self, config: DatasetConfig) -> None:
        """DataError naming the first feature (or setting) on which `config` and the parent's examples disagree."""
        mine = {f.name: f for f in self.meta.features if f.kind in ("sparse", "dense")}
        wanted = {f.name for f in config.categorical} | {f.name for f in config.numeric}
        for name in sorted(set(mine) - wanted):
            raise DataError(f"{self._where()}: feature '{name}' of the parent examples is not in this dataset config; "
                            f"incremental prepares keep the same features (re-prepare from scratch to change them)")
        for feature in config.categorical:
            self._check_categorical(feature, mine.get(feature.name))
        for numeric in config.numeric:
            spec = mine.get(numeric.name)
            if spec is None or spec.kind != "dense":
                raise DataError(f"{self._where()}: numeric feature '{numeric.name}' is not a numeric feature of the "
                                f"parent examples")
            self._check_numeric_stats(numeric.name)
        parent_feedback = self.meta.history.feedback
        if parent_feedback != config.history.feedback:
            raise DataError(f"{self._where()}: history.feedback is {config.history.feedback!r} here but "
                            f"{parent_feedback!r} in the parent examples")
        parent_dim = self.meta.feature("scenario").embedding_dim
        if parent_dim != config.scenario_embedding_dim:
            raise DataError(f"{self._where()}: scenario_embedding_dim is {config.scenario_embedding_dim} here but "
                            f"{parent_dim} in the parent examples")

    def _check_categorical(self, feature: CategoricalFeature, spec: FeatureSpec | None) -> None:
        if spec is None or spec.kind != "sparse":
            raise DataError(f"{self._where()}: feature '{feature.name}' is not a categorical feature of the parent "
                            f"examples (their features: {sorted(f.name for f in self.meta.features_of_kind('sparse'))})")
        theirs = {"encoding": spec.encoding, "table": spec.table, "embedding_dim": spec.embedding_dim}
        ours = {"encoding": feature.encoding, "table": feature.table, "embedding_dim": feature.embedding_dim}
        if feature.encoding == "hash" and spec.encoding == "hash":
            theirs["buckets"], ours["buckets"] = spec.cardinality - FIRST_VOCAB_INDEX, feature.buckets
        for key, value in ours.items():
            if theirs[key] != value:
                raise DataError(f"{self._where()}: feature '{feature.name}' has {key} {value!r} here but "
                                f"{theirs[key]!r} in the parent examples; an incremental prepare keeps it")

    def _check_numeric_stats(self, name: str) -> None:
        stats = self.meta.numeric_stats.get(name)
        if stats is None:
            raise DataError(f"{self._where()}: numeric feature '{name}' has no numeric_stats in the parent's "
                            f"dataset.json (they standardise it here too)")
        if not (math.isfinite(stats.mean) and math.isfinite(stats.std) and stats.std > 0):
            raise DataError(f"{self._where()}: numeric feature '{name}' has numeric_stats mean {stats.mean}, std "
                            f"{stats.std} in the parent's dataset.json; a finite mean and positive std are needed")

    def numeric_stats(self, feature: NumericFeature, values: pl.Series) -> NumericStats:
        """`feature`'s standardisation: the parent's mean/std (checked in `check_compatible`), today's null count."""
        stats = self.meta.numeric_stats[feature.name]
        return NumericStats(mean=stats.mean, std=stats.std, nulls=int(values.null_count()))

    def check_scenarios(self, scenarios: list[str]) -> None:
        """Scenario ids index dense per-scenario weights: the list must be the parent's, in the same order."""
        if scenarios != self.meta.scenarios:
            raise DataError(f"{self._where()}: scenarios {scenarios} differ from the parent's {self.meta.scenarios} "
                            f"(declare `scenarios` in the dataset config in the parent's order; a new scenario "
                            f"needs a full re-prepare and a new model)")

    def encoder(self, feature: CategoricalFeature, train_values: pl.Series) -> FittedEncoder:
        """`feature`'s encoder: the parent's vocabulary extended with today's new ids."""
        spec = self.meta.feature(feature.name)
        if feature.encoding == "hash":
            return fit_encoder(feature, train_values)  # stable by construction (the buckets were checked equal)
        if spec.vocabulary is None:
            raise DataError(f"{self._where()}: feature '{feature.name}' has no vocabulary file in dataset.json")
        vocab = read_vocabulary(self.root / spec.vocabulary, feature.name)
        indices = vocab[INDEX]
        expected = pl.int_range(FIRST_VOCAB_INDEX, spec.cardinality, dtype=pl.Int64, eager=True)
        if len(indices) != len(expected) or not indices.equals(expected, check_names=False):
            raise DataError(f"vocabulary {self.root / spec.vocabulary}: indices are not {FIRST_VOCAB_INDEX}.."
                            f"{spec.cardinality - 1} once each (cardinality {spec.cardinality} in dataset.json)")
        return extend_encoder(feature, train_values, vocab, spec.cardinality)

    def lineage(self, encoders: dict[str, FittedEncoder]) -> Lineage:
        """The record of where today's vocabularies come from: per table, the parent's rows and the ids added."""
        parent_rows, added = {}, {}
        for name, encoder in encoders.items():
            table = encoder.feature.table or name
            parent_rows[table] = self.meta.feature(name).cardinality
            added[table] = encoder.cardinality - parent_rows[table]
        ancestors = [self.meta.content_hash, *(self.meta.lineage.ancestors if self.meta.lineage else [])]
        return Lineage(parent=str(self.root.resolve()), parent_hash=self.meta.content_hash, ancestors=ancestors,
                       parent_rows=parent_rows, added=added, numeric_stats_from=self.meta.content_hash)
