"""Stable hashing of raw ids, shared by `prepare` (pipelines) and serving so both map a raw value the same way."""

from __future__ import annotations

import hashlib

from msit_rec.data.spec import FIRST_VOCAB_INDEX


def stable_hash64(text: str) -> int:
    """64-bit BLAKE2b of the UTF-8 text as a signed int64: the same in every process, version and language."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def hash_bucket(text: str, buckets: int) -> int:
    """Encoded index of a raw value under `encoding: hash` (`buckets` = the table's cardinality − 2)."""
    return FIRST_VOCAB_INDEX + stable_hash64(text) % buckets  # Python's % is never negative for buckets > 0
