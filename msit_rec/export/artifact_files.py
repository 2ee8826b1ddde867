"""The artifact directory on disk: claiming it, copying the data files serving needs, hashing what was written."""

from __future__ import annotations

import shutil
from pathlib import Path

from msit_rec.data.spec import DatasetMeta
from msit_rec.errors import DataError
from msit_rec.serving.artifact import sha256_file
from msit_rec.serving.contract import AOTI_FILE, DATASET_FILE, MANIFEST_FILE, PROGRAM_FILE, VOCAB_DIR

ARTIFACT_ENTRIES = (MANIFEST_FILE, PROGRAM_FILE, AOTI_FILE, DATASET_FILE, VOCAB_DIR)


def claim_artifact_dir(out_dir: Path, overwrite: bool) -> None:
    """Create `out_dir`; an earlier artifact in it is an error unless `overwrite`, which removes only its entries."""
    existing = [name for name in ARTIFACT_ENTRIES if (out_dir / name).exists()]
    if existing and not overwrite:
        raise DataError(f"output directory {out_dir} already holds an artifact ({existing}); pass --overwrite")
    for name in existing:
        path = out_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def copy_data_files(meta: DatasetMeta, data_dir: Path, out_dir: Path) -> list[str]:
    """dataset.json (byte for byte: its content hash stays valid) and every vocabulary it names → relative paths."""
    written = [DATASET_FILE]
    shutil.copyfile(data_dir / DATASET_FILE, out_dir / DATASET_FILE)
    for vocabulary in sorted({f.vocabulary for f in meta.features if f.vocabulary}):
        source = data_dir / vocabulary
        if not source.is_file():
            raise DataError(f"{data_dir / DATASET_FILE} names vocabulary {vocabulary}, but {source} does not exist")
        target = out_dir / vocabulary
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        written.append(vocabulary)
    return written


def hash_files(out_dir: Path, relative_paths: list[str]) -> dict[str, str]:
    return {path: sha256_file(out_dir / path) for path in sorted(relative_paths)}
