"""The artifact contract between `msit-rec export` (writer) and the serving runtime (reader).

An artifact is a directory:

    manifest.json        Manifest below (versions, input schema, table precisions, file hashes, parity, provenance)
    program.pt2          torch.export program of the serving model (dynamic batch dimension) — portable
    program_aoti.pt2     optional AOTInductor package of the same program — fast, tied to this torch build
    dataset.json         the DatasetMeta the model was trained on (feature spec, scenarios, numeric stats)
    vocab/*.parquet      the vocabularies dataset.json names (columns raw, index, count)

The program takes plain tensors, positionally in `INPUT_NAMES` order, and returns (logits float32 [B], attention
float32 [B, L]) for B rows that share C user contexts (a context = a behaviour history and the scenario it is served
in; a /rank request is one context and B candidates, a `predict` file has one context per row). `attention` is each
of the row's context's behaviours' weight in its interest: α (1 for variants without attention), times msit's
transfer weight g; 0 on padding. Artifact version 2 programs returned the logits alone.

    sparse    int64   [B, Fs]     encoded ids of `inputs.sparse` (dataset.json's sparse features, in that order)
    history   int64   [C, H, L]   encoded behaviour ids of `inputs.sequence` (hist_item, hist_cat, hist_scenario...),
                                  oldest first, left-aligned: positions ≥ hist_len hold PADDING_INDEX (0)
    hist_len  int64   [C]         real behaviours per context, in [0, L]
    scenario  int64   [C]         served scenario id, in [0, S)
    dense     float32 [B, Fd]     `inputs.dense` normalised as prepare does: (x − mean) / std, null → 0
    context   int64   [B]         the context of each row, in [0, C)

Everything that depends on the context only (the behaviour lookups and the scenario gate) is computed once per
context, not once per candidate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from msit_rec.config import load_versioned_json, to_dict
from msit_rec.errors import DataError
from msit_rec.fit_config import ModelConfig
from msit_rec.provenance import CheckpointPosition, Provenance

ARTIFACT_VERSION = 3  # 2: per-context history/hist_len/scenario + `context` input; 3: + the attention output
OLDEST_ARTIFACT_VERSION = 2  # still served (logits only: no behaviours per candidate)
MANIFEST_FILE = "manifest.json"
PROGRAM_FILE = "program.pt2"
AOTI_FILE = "program_aoti.pt2"
DATASET_FILE = "dataset.json"
VOCAB_DIR = "vocab"
INPUT_NAMES = ("sparse", "history", "hist_len", "scenario", "dense", "context")
ROW_INPUTS = ("sparse", "dense", "context")  # dimension 0 = rows (B); the others: contexts (C)

Precision = Literal["fp32", "fp16", "int8"]


@dataclass
class InputSchema:
    """Column order of each program input (feature names of dataset.json) and the fixed sizes."""

    sparse: list[str]
    sequence: list[str]
    dense: list[str]
    max_len: int
    scenarios: list[str]  # index = scenario id


@dataclass
class TableInfo:
    """One embedding table as stored in the program."""

    name: str
    rows: int
    dim: int
    precision: Precision
    bytes: int  # as stored (int8: rows + per-row scale/bias)
    fp32_bytes: int


@dataclass
class ScenarioParity:
    rows: int
    auc_model: float | None  # None when undefined (one class only)
    auc_artifact: float | None
    auc_drop: float | None  # auc_model − auc_artifact


@dataclass
class ParityReport:
    """The artifact against the trained model on the same rows (`split` of the training dataset)."""

    split: str
    rows: int
    max_abs_logit_diff: float
    tolerance: float | None  # the |Δ logit| bound checked (fp32 artifacts), None when only AUC is checked
    max_auc_drop: float | None  # the per-scenario AUC drop bound checked (quantised artifacts)
    scenarios: dict[str, ScenarioParity]
    table_bytes_fp32: int
    table_bytes_artifact: int
    passed: bool
    non_finite_model: int = 0  # rows whose logit is NaN/±inf from the trained model (the run itself is broken)
    non_finite_artifact: int = 0  # ... from the artifact's program


@dataclass
class Manifest:
    artifact_version: int
    created_at: str  # ISO 8601, UTC
    versions: dict[str, str]  # torch, msit_rec, python
    run_dir: str
    checkpoint: str
    dataset_name: str
    dataset_hash: str
    model: ModelConfig  # the run's model config (variant, attention_hidden, ...)
    inputs: InputSchema
    tables: list[TableInfo]
    files: dict[str, str]  # relative path → sha256 of every file of the artifact but the manifest
    aoti: bool  # program_aoti.pt2 present
    parity: ParityReport | None = None
    notes: list[str] = field(default_factory=list)
    # the checkpoint's epoch and step, and what the export ran with (git commit, host, all versions); None in
    # artifacts exported before they were recorded
    checkpoint_position: CheckpointPosition | None = None
    provenance: Provenance | None = None
    compute: str = "fp32"  # dtype of the program's dense part (`export --compute`); tables keep their own precision

    def save(self, artifact_dir: str | Path) -> None:
        Path(artifact_dir, MANIFEST_FILE).write_text(json.dumps(to_dict(self), indent=2) + "\n")

    @classmethod
    def load(cls, artifact_dir: str | Path) -> Manifest:
        path = Path(artifact_dir) / MANIFEST_FILE
        if not path.is_file():
            raise DataError(f"{artifact_dir}: no {MANIFEST_FILE}; give a directory written by `msit-rec export`")
        return load_versioned_json(path, cls, "artifact_version", ARTIFACT_VERSION,
                                   "artifact manifest", oldest=OLDEST_ARTIFACT_VERSION)

    @property
    def has_attention(self) -> bool:
        """The program returns each behaviour's attention weight beside the logits (version 3 on)."""
        return self.artifact_version >= 3
