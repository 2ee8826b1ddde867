"""`msit-rec predict`: score a file of raw request rows (Parquet or JSON lines) with an artifact, in batches.

The output holds the input rows unchanged plus `logit` and `score` (replacing columns of those names), in the
format its extension names (.parquet, or .jsonl/.ndjson). Rows follow the request schema of
msit_rec/serving/request.py, one self-contained row (with its `history`) each.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from msit_rec import option_defaults as defaults
from msit_rec.errors import ConfigError, DataError
from msit_rec.outputs import staged_file
from msit_rec.serving.artifact import RankingArtifact
from msit_rec.serving.request import RawRows, RequestError, arrow_rows, record_rows
from msit_rec.serving.top_behaviours import top_behaviours as ranked_behaviours

PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
TOP_COLUMN = "top_behaviours"  # with --top_behaviours k: [{index (into the row's history), weight}], largest first
OUTPUT_COLUMNS = ("logit", "score")
TOP_TYPE = pa.list_(pa.struct([("index", pa.int64()), ("weight", pa.float64())]))


@dataclass
class PredictSummary:
    rows: int
    seconds: float
    oov: Counter  # feature → ids encoded as OOV

    def table(self) -> str:
        lines = [f"scored {self.rows:,} rows in {self.seconds:.2f}s ({self.rows / max(self.seconds, 1e-9):,.0f} rows/s)"]
        if any(self.oov.values()):
            lines.append("OOV ids per feature: " + ", ".join(f"{k} {v:,}" for k, v in sorted(self.oov.items()) if v))
        else:
            lines.append("OOV ids: none")
        return "\n".join(lines)


def file_format(path: Path, role: str) -> str:
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    raise ConfigError(f"{role} {path}: unknown extension {suffix!r}; expected one of "
                      f"{list(PARQUET_SUFFIXES + JSONL_SUFFIXES)}")


def predict_file(
    artifact: RankingArtifact,
    input_path: str | Path,
    out_path: str | Path,
    batch_size: int = defaults.PREDICT_BATCH_ROWS,
    overwrite: bool = False,
    progress: bool = True,
    top_behaviours: int = defaults.TOP_BEHAVIOURS,
) -> PredictSummary:
    """Score every row of `input_path` into `out_path` (the rows + logit, score; with `top_behaviours` > 0 also
    each row's that many behaviours with the largest |attention weight|)."""
    input_path, out_path = Path(input_path), Path(out_path)
    in_format, out_format = file_format(input_path, "--input"), file_format(out_path, "--out")
    if batch_size < 1:
        raise ConfigError(f"--batch_size {batch_size}: expected ≥ 1")
    if top_behaviours < 0:
        raise ConfigError(f"--top_behaviours {top_behaviours}: expected ≥ 0")
    missing = artifact.without_attention() if top_behaviours else None
    if missing:
        raise ConfigError(f"--top_behaviours: {missing}")
    if not input_path.is_file():
        raise DataError(f"--input {input_path}: no such file")
    if out_path.resolve() == input_path.resolve():
        raise ConfigError(f"--out {out_path}: is the input file; write the scores elsewhere")
    start = time.perf_counter()
    oov: Counter = Counter()
    rows = 0
    total = pq.ParquetFile(input_path).metadata.num_rows if in_format == "parquet" else None
    # written to a temporary sibling that replaces --out only when complete: a bad row in batch k leaves the
    # previous output as it was and nothing half-scored behind
    with staged_file(out_path, overwrite) as staged, tqdm(total=total, desc="predict", unit="rows",
                                                          disable=not progress) as bar:
        writer = _Writer(staged, out_format)
        try:
            for raw, table in _batches(input_path, in_format, artifact, batch_size):
                encoded = artifact.encode(raw)
                logits, attention = artifact.outputs(encoded.inputs, check=False)  # the encoder keeps ids in range
                kept = encoded.inputs.hist_len[encoded.inputs.context]  # [B]
                top_rows = _top_rows(raw, kept, attention, top_behaviours) if top_behaviours else None
                writer.write(table, logits.numpy(), (1.0 / (1.0 + (-logits.double()).exp())).numpy(), top_rows)
                oov.update(encoded.oov)
                rows += raw.size
                bar.update(raw.size)
            if rows == 0:
                raise DataError(f"--input {input_path}: no rows to score")
        except BaseException:
            writer.abandon()
            raise
        writer.close()
    return PredictSummary(rows, time.perf_counter() - start, oov)


def _top_rows(raw: RawRows, kept: Any, attention: Any, top: int) -> list[list[dict[str, Any]]]:
    """Per row (its own context): its `top` behaviours by attention weight, indexed into its history as sent."""
    sent = torch.from_numpy(raw.history_offsets[1:] - raw.history_offsets[:-1])  # [B] behaviours each row sent
    return [[{"index": j, "weight": w} for j, w in row]
            for row in ranked_behaviours(attention, kept, sent.expand(raw.size), top)]


def _batches(
    path: Path, in_format: str, artifact: RankingArtifact, batch_size: int
) -> Iterator[tuple[RawRows, pa.RecordBatch | list[dict[str, Any]]]]:
    schema = artifact.encoder.schema
    first = 0
    if in_format == "parquet":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
            yield _located(path, arrow_rows, batch, schema, first), batch
            first += batch.num_rows
        return
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise RequestError(f"{path}: line {number}: invalid JSON ({exc})") from None
            if len(records) == batch_size:
                yield _located(path, record_rows, records, schema, first), records
                first += len(records)
                records = []
    if records:
        yield _located(path, record_rows, records, schema, first), records


def _located(path: Path, parse: Callable[..., RawRows], *args: Any) -> RawRows:
    """Schema errors name the file too (rows[i] counts data rows from 0)."""
    try:
        return parse(*args)
    except RequestError as exc:
        raise RequestError(f"{path}: {exc}") from None


class _Writer:
    """Input rows + logit/score, appended batch by batch in the output format."""

    def __init__(self, path: Path, out_format: str) -> None:
        self.path = path
        self.format = out_format
        self._parquet: pq.ParquetWriter | None = None
        self._tables: list[pa.Table] = []  # JSON rows → Parquet: schemas are unified once at the end
        self._text = open(path, "w", encoding="utf-8") if out_format == "jsonl" else None  # noqa: SIM115 (closed in close())

    def write(self, rows: pa.RecordBatch | list[dict[str, Any]], logits: Any, scores: Any,
              top: list[list[dict[str, Any]]] | None = None) -> None:
        if self._text is not None:
            records = rows.to_pylist() if isinstance(rows, pa.RecordBatch) else rows
            for i, (record, logit, score) in enumerate(zip(records, logits.tolist(), scores.tolist())):
                record = {**record, "logit": logit, "score": score, **({TOP_COLUMN: top[i]} if top is not None else {})}
                self._text.write(json.dumps(record, default=str) + "\n")
            return
        table = pa.Table.from_batches([rows]) if isinstance(rows, pa.RecordBatch) else _json_table(rows)
        written = [*OUTPUT_COLUMNS, *([TOP_COLUMN] if top is not None else [])]
        table = table.drop_columns([c for c in written if c in table.column_names])
        table = table.append_column("logit", pa.array(logits, pa.float32()))
        table = table.append_column("score", pa.array(scores, pa.float64()))
        if top is not None:
            table = table.append_column(TOP_COLUMN, pa.array(top, TOP_TYPE))
        if isinstance(rows, list):
            self._tables.append(table)
            return
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self.path, table.schema)
        self._parquet.write_table(table)

    def close(self) -> None:
        if self._text is not None:
            self._text.close()
        if self._tables:
            pq.write_table(pa.concat_tables(self._tables, promote_options="permissive"), self.path)
        if self._parquet is not None:
            self._parquet.close()

    def abandon(self) -> None:
        """Close the file unfinished (whoever staged it removes it)."""
        if self._text is not None:
            self._text.close()
        if self._parquet is not None:
            self._parquet.close()


def _json_table(records: list[dict[str, Any]]) -> pa.Table:
    try:
        return pa.Table.from_pylist(records)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(f"JSON rows with mixed value types cannot become a Parquet table ({exc}); "
                        "write .jsonl output instead") from None
