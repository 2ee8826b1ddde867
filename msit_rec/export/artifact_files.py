"""The artifact directory on disk: what it holds, copying the data files serving needs, hashing what was written,
keeping an artifact that failed parity apart from the good one."""

from __future__ import annotations

import shutil
from pathlib import Path

from msit_rec.data.spec import DatasetMeta
from msit_rec.errors import DataError
from msit_rec.outputs import check_replaceable_dir, replace_dir
from msit_rec.serving.artifact import sha256_file
from msit_rec.serving.contract import AOTI_FILE, DATASET_FILE, MANIFEST_FILE, PROGRAM_FILE, VOCAB_DIR

ARTIFACT_ENTRIES = (MANIFEST_FILE, PROGRAM_FILE, AOTI_FILE, DATASET_FILE, VOCAB_DIR)  # an artifact holds these only
FAILED_SUFFIX = ".parity-failed"


def keep_failed_artifact(staging: Path, out_dir: Path) -> Path:
    """Move a complete artifact that failed parity next to `out_dir` (as OUT.parity-failed) for inspection."""
    failed = out_dir.with_name(out_dir.name + FAILED_SUFFIX)
    check_replaceable_dir(failed, overwrite=True, entries=ARTIFACT_ENTRIES, flag="failed artifact")
    replace_dir(staging, failed)
    return failed


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
