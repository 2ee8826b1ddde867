"""The data contract between `prepare` and everything downstream: feature spec and `dataset.json`.

`prepare` writes a `DatasetMeta`; training, evaluation and export read it back. It is defined once here
and imported everywhere else, so a field cannot mean two things in two places.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from msit_rec.config import load_versioned_json, to_dict
from msit_rec.errors import ConfigError, DataError

CONTRACT_VERSION = 2  # 2: optional hist_feedback (each behaviour's feedback); version 1 files still load
OLDEST_CONTRACT_VERSION = 1
PADDING_INDEX = 0  # encoded id 0 = padding (empty history slot)
OOV_INDEX = 1  # encoded id 1 = out-of-vocabulary / rare / null
FIRST_VOCAB_INDEX = 2

SPLITS = ("train", "valid", "test")

FeatureKind = Literal["sparse", "sequence", "scenario", "dense"]
# What a feature means beyond its kind and table; one name for it, read everywhere (model, batches, serving)
FeatureRole = Literal["behaviour_scenario", "behaviour_feedback"]
BEHAVIOUR_SCENARIO: FeatureRole = "behaviour_scenario"  # the scenario each behaviour happened in (the gate reads it)
BEHAVIOUR_FEEDBACK: FeatureRole = "behaviour_feedback"  # what the user did with each behaviour (clicked, a rating)


@dataclass
class FeatureSpec:
    """One model input column of the examples.

    `table` names the embedding table; features naming the same table share it (the target item and the
    behaviour items share `item`), so they must agree on cardinality and dim.
    """

    name: str
    kind: FeatureKind
    source: str  # raw-log column it comes from (serving maps raw values through it)
    table: str | None = None  # None for dense features
    cardinality: int = 0  # rows of the table, padding and OOV included
    embedding_dim: int = 0
    encoding: Literal["vocab", "hash", "scenario", "numeric"] = "vocab"
    vocabulary: str | None = None  # vocabulary Parquet file, relative to dataset.json
    role: FeatureRole | None = None


@dataclass
class ScenarioStats:
    rows: int
    clicks: int
    ctr: float


@dataclass
class SplitStats:
    rows: int
    clicks: int
    ctr: float
    files: list[str]  # Parquet shards, relative to dataset.json
    scenarios: dict[str, ScenarioStats]  # scenario name → stats (every scenario listed, empty ones too)


@dataclass
class NumericStats:
    # train mean/std; under `prepare --vocab-from`, the parent's (lineage.numeric_stats_from), kept day after day
    mean: float
    std: float
    nulls: int  # nulls in this dataset's input, imputed with `mean` (0 after normalisation)


@dataclass
class HistoryInfo:
    max_len: int
    events: Literal["clicks", "all"]
    source: str  # "log" (built leak-free from the log) or "precomputed:<column>" (taken as given)
    feedback: str | None = None  # what hist_feedback holds: "label", a raw column (a rating...), None = no feedback


@dataclass
class Lineage:
    """Where an incrementally prepared dataset's vocabularies come from (`prepare --vocab-from PARENT`).

    Every id of the parent keeps its index and tables only grow, so a model trained on any ancestor can be
    warm-started on (`fit --init-from`) or scored on (`evaluate`) this dataset: its rows are a prefix of these.
    """

    parent: str  # the parent examples directory, as given to --vocab-from
    parent_hash: str  # the parent's content_hash
    ancestors: list[str]  # content hashes of the parent, its parent, ... (nearest first)
    parent_rows: dict[str, int]  # table → the parent's rows (padding and OOV included)
    added: dict[str, int]  # table → ids appended after the parent's rows
    # content hash of the dataset whose numeric_stats (mean/std) standardised this one's numeric features: the
    # parent's, so a raw value is the same model input as in the parent (None: written before they were kept)
    numeric_stats_from: str | None = None


@dataclass
class DatasetMeta:
    """Everything downstream needs to know about a prepared dataset (`dataset.json`)."""

    contract_version: int
    name: str
    features: list[FeatureSpec]
    scenarios: list[str]  # index = scenario id
    history: HistoryInfo
    splits: dict[str, SplitStats]
    numeric_stats: dict[str, NumericStats]
    split_boundaries: dict[str, int]  # time cutoffs (valid_start, test_start) or per-user counts used
    rows_in: int
    rejects: dict[str, int]  # reason → rows
    rejects_file: str | None
    config: dict[str, Any]
    content_hash: str = ""
    created_by: str = field(default="msit-rec")
    # Loud records of what is legal but suspicious (defaults keep older dataset.json files loading):
    duplicate_rows: int = 0  # valid rows equal to an earlier one; also in rejects['duplicate'] when dropped
    bad_ts: dict[str, int] = field(default_factory=dict)  # kind of the bad_ts rejects (milliseconds, negative, ...)
    empty_scenarios: dict[str, list[str]] = field(default_factory=dict)  # split → declared scenarios with no rows
    # Set by `prepare --vocab-from` only; absent from dataset.json otherwise, so such files stay readable by older
    # msit-rec versions (which refuse unknown keys).
    lineage: Lineage | None = None

    def __post_init__(self) -> None:
        for spec in self.features:  # dataset.json files written before roles existed: the scenario-encoded sequence
            if spec.role is None and spec.kind == "sequence" and spec.encoding == "scenario":
                spec.role = BEHAVIOUR_SCENARIO

    @property
    def behaviour_scenario(self) -> FeatureSpec | None:
        """The sequence feature holding each behaviour's scenario (None when the dataset has none)."""
        return next((f for f in self.features if f.role == BEHAVIOUR_SCENARIO), None)

    @property
    def behaviour_feedback(self) -> FeatureSpec | None:
        """The sequence feature holding each behaviour's encoded feedback (None: clicks-only, contract v1 style)."""
        return next((f for f in self.features if f.role == BEHAVIOUR_FEEDBACK), None)

    def feature(self, name: str) -> FeatureSpec:
        for spec in self.features:
            if spec.name == name:
                return spec
        raise ConfigError(
            f"feature '{name}' is not in dataset '{self.name}' (dataset.json has {[f.name for f in self.features]})"
        )

    def descends_from(self, content_hash: str) -> bool:
        """Whether this dataset is `content_hash` itself or was prepared from it by a chain of `--vocab-from`."""
        return content_hash == self.content_hash or (
            self.lineage is not None and content_hash in self.lineage.ancestors
        )

    def features_of_kind(self, kind: FeatureKind) -> list[FeatureSpec]:
        return [f for f in self.features if f.kind == kind]

    def tables(self) -> dict[str, tuple[int, int]]:
        """table name → (cardinality, embedding dim); shared tables appear once."""
        tables: dict[str, tuple[int, int]] = {}
        for spec in self.features:
            if spec.table is not None:
                tables.setdefault(spec.table, (spec.cardinality, spec.embedding_dim))
        return tables

    def summary_table(self) -> str:
        """Per split × scenario rows, share and CTR, plus rejects: what a person checks after `prepare`."""
        header = f"{'split':<6} {'scenario':<16} {'rows':>12} {'share':>7} {'clicks':>10} {'ctr':>7}"
        lines = [header, "-" * len(header)]
        for split, stats in self.splits.items():
            for name, sc in stats.scenarios.items():
                share = sc.rows / stats.rows if stats.rows else 0.0
                lines.append(f"{split:<6} {name:<16} {sc.rows:>12,} {share:>7.1%} {sc.clicks:>10,} {sc.ctr:>7.2%}")
            lines.append(f"{split:<6} {'(all)':<16} {stats.rows:>12,} {1:>7.0%} {stats.clicks:>10,} {stats.ctr:>7.2%}")
        rejected = sum(self.rejects.values())
        lines.append(f"rows in {self.rows_in:,}; rejected {rejected:,} {self.rejects if rejected else ''}".rstrip())
        if self.lineage is not None:
            added = ", ".join(f"{table} +{n:,}" for table, n in self.lineage.added.items() if n) or "none"
            lines.append(f"vocabularies from {self.lineage.parent}; ids added: {added}")
        return "\n".join(lines + self.warnings())

    def warnings(self) -> list[str]:
        """One line per suspicious finding (bad timestamps, duplicates, empty scenarios): a summary must show them."""
        lines = []
        if self.bad_ts:
            kinds = ", ".join(f"{kind} {n:,}" for kind, n in sorted(self.bad_ts.items()))
            lines.append(f"warning: bad_ts rows by kind (epoch seconds expected): {kinds}")
        if self.duplicate_rows:
            fate = "dropped as 'duplicate'" if self.rejects.get("duplicate") else "kept"
            lines.append(f"warning: {self.duplicate_rows:,} exact duplicate rows ({fate})")
        for split, names in self.empty_scenarios.items():
            lines.append(f"warning: scenario(s) {names} have no rows in {split}")
        return lines

    def save(self, path: str | Path) -> None:
        data = to_dict(self)
        if data["lineage"] is None:  # keep files without lineage readable by versions that do not know the key
            del data["lineage"]
        Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> DatasetMeta:
        """Read `dataset.json` (or the directory holding it), checking the contract version."""
        path = Path(path)
        if path.is_dir():
            path = path / "dataset.json"
        if not path.is_file():
            raise DataError(f"{path}: no dataset.json here; run `msit-rec prepare` first")
        return load_versioned_json(path, cls, "contract_version", CONTRACT_VERSION, "data contract",
                                   oldest=OLDEST_CONTRACT_VERSION)
