"""Loading an export artifact: manifest, file hashes, program (torch.export or AOTInductor) and request encoder.

This is the one place the serving side touches the artifact's files; it needs torch, numpy and pyarrow only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from msit_rec import option_defaults as defaults
from msit_rec.data.spec import DatasetMeta
from msit_rec.errors import ConfigError, DataError
from msit_rec.serving.contract import AOTI_FILE, DATASET_FILE, PROGRAM_FILE, Manifest
from msit_rec.serving.encoder import Encoded, RequestEncoder
from msit_rec.serving.program_inputs import ProgramInputs
from msit_rec.serving.request import RawRows

Backend = Literal["auto", "export", "aoti"]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def verify_files(root: Path, files: dict[str, str]) -> None:
    """Every file the manifest lists exists with its recorded sha256 (a copied or edited artifact fails here)."""
    for relative, expected in files.items():
        path = root / relative
        if not path.is_file():
            raise DataError(f"artifact {root}: file {relative} listed in manifest.json is missing")
        found = sha256_file(path)
        if found != expected:
            raise DataError(
                f"artifact {root}: file {relative} has sha256 {found}, manifest.json expects {expected}; "
                "the artifact was changed after export — export it again"
            )


@dataclass
class RankingArtifact:
    """A loaded artifact: `encode` raw rows, then `logits`/`scores` of the encoded inputs."""

    root: Path
    manifest: Manifest
    meta: DatasetMeta
    encoder: RequestEncoder
    backend: Literal["export", "aoti"]
    program: Callable[..., Any]
    device: torch.device | None  # where the program's weights live; None = where export left them (the host)

    def encode(self, rows: RawRows) -> Encoded:
        return self.encoder.encode(rows)

    def logits(self, inputs: ProgramInputs, check: bool = True) -> torch.Tensor:
        """float32 logits [B] on the host (no grad).

        `check` refuses ids outside their tables, scenarios outside [0, S) and lengths outside [0, L] with an error
        naming the input and feature: the program does not bounds-check its lookups (the AOTInductor package would
        read out of bounds). Inputs made by `encode` are in range by construction, so its callers skip the check.
        """
        return self.outputs(inputs, check)[0]

    def outputs(self, inputs: ProgramInputs, check: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits [B], attention [B, L]) float32 on the host: each row's weight of each of its context's behaviours
        (0 on padding); attention is None for an artifact exported before the program returned it (version 2)."""
        if check:
            check_ranges(inputs, self.meta, self.manifest)
        with torch.inference_mode():
            out = self.program(*(inputs if self.device is None else inputs.to(self.device)).args())
        out = out if isinstance(out, (list, tuple)) else (out,)  # version 2 programs return the logits alone
        attention = out[1].float().cpu() if self.manifest.has_attention else None
        return out[0].float().cpu(), attention

    def without_attention(self) -> str | None:
        """Why this artifact cannot say which behaviours weighed most (exported before version 3), or None."""
        if self.manifest.has_attention:
            return None
        return (f"this artifact (version {self.manifest.artifact_version}) does not return attention weights; "
                "export it again with this msit-rec")

    def scores(self, inputs: ProgramInputs) -> torch.Tensor:
        """Click probabilities [B] (sigmoid of the logits)."""
        return torch.sigmoid(self.logits(inputs))

    def info(self) -> dict[str, Any]:
        """What /health and `predict` report about the artifact."""
        return {
            "artifact": str(self.root),
            "backend": self.backend,
            "dataset": self.manifest.dataset_name,
            "model": self.manifest.model.variant,
            "created_at": self.manifest.created_at,
            "scenarios": list(self.manifest.inputs.scenarios),
            "max_len": self.manifest.inputs.max_len,
            "tables": {t.name: t.precision for t in self.manifest.tables},
            "compute": self.manifest.compute,
            "torch": torch.__version__,
        }


def check_ranges(inputs: ProgramInputs, meta: DatasetMeta, manifest: Manifest) -> None:
    """DataError naming the first input column with a value the program cannot look up."""
    schema = manifest.inputs
    columns = [
        *(("sparse", name, inputs.sparse[:, i], meta.feature(name).cardinality) for i, name in enumerate(schema.sparse)),
        *(("history", name, inputs.history[:, h], meta.feature(name).cardinality)
          for h, name in enumerate(schema.sequence)),
        ("scenario", "scenario", inputs.scenario, len(schema.scenarios)),
        ("hist_len", "hist_len", inputs.hist_len, schema.max_len + 1),
        ("context", "context", inputs.context, inputs.contexts),
    ]
    for tensor_name, feature, values, limit in columns:
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= limit):
            raise DataError(
                f"input {tensor_name}, feature '{feature}': values must lie in [0, {limit}), got "
                f"[{int(values.min())}, {int(values.max())}]; encode raw requests with `encode` (unknown ids → OOV)"
            )


def load_artifact(
    artifact_dir: str | Path,
    backend: Backend = defaults.BACKEND,
    threads: int | None = None,
    device: torch.device | str | None = None,
    verify: bool = True,
) -> RankingArtifact:
    """Load an artifact written by `msit-rec export`.

    `backend`: `aoti` (the AOTInductor package; fastest, tied to the torch build and device that compiled it),
    `export` (the portable torch.export program, movable to `device`) or `auto` (aoti when the artifact has it).
    `threads` sets torch's intra-op threads for this process. `verify` checks every file's sha256 first.
    """
    root = Path(artifact_dir)
    if backend not in defaults.BACKENDS:
        raise ConfigError(f"backend {backend!r}: expected one of {list(defaults.BACKENDS)}")
    manifest = Manifest.load(root)
    if verify:
        verify_files(root, manifest.files)
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads {threads}: expected ≥ 1")
        torch.set_num_threads(threads)
    chosen = "aoti" if backend == "auto" and (root / AOTI_FILE).is_file() else ("export" if backend == "auto" else backend)
    if chosen == "aoti" and not (root / AOTI_FILE).is_file():
        raise DataError(f"artifact {root}: backend aoti asked, but it has no {AOTI_FILE} (export with --aoti)")
    device = torch.device(device) if device is not None else None
    if device is not None and chosen == "aoti":
        raise ConfigError("an AOTInductor package runs on the device it was compiled for; use backend export to move")
    meta = DatasetMeta.load(root / DATASET_FILE)
    encoder = RequestEncoder(meta, manifest.inputs, root)
    program = _load_program(root, chosen)
    if device is not None:
        program = program.to(device)
    return RankingArtifact(root, manifest, meta, encoder, chosen, program, device)


def _load_program(root: Path, backend: str) -> Callable[..., Any]:
    if backend == "aoti":
        return torch._inductor.aoti_load_package(str(root / AOTI_FILE))
    path = root / PROGRAM_FILE
    if not path.is_file():
        raise DataError(f"artifact {root}: no {PROGRAM_FILE}")
    return torch.export.load(path).module()
