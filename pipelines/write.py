"""Write one split as Parquet shards: row groups sized for streaming reads, files of bounded size."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.config import OutputConfig


class ShardWriter:
    """Appends Arrow tables (one row group each) to `split/part-NNNNN.parquet`, starting a new file when full.

    The caller hands it tables of `rows_per_row_group` rows (the last may be shorter), so row groups line up
    with what the training loader deals to ranks.
    """

    def __init__(self, root: Path, split: str, output: OutputConfig) -> None:
        self.root = root
        self.split = split
        self.output = output
        self.files: list[str] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_file = 0

    def write(self, table: pa.Table) -> None:
        if self._writer is not None and self._rows_in_file + table.num_rows > self.output.rows_per_file:
            self._close_file()
        if self._writer is None:
            relative = f"{self.split}/part-{len(self.files):05d}.parquet"
            (self.root / self.split).mkdir(parents=True, exist_ok=True)
            compression = None if self.output.compression == "none" else self.output.compression
            self._writer = pq.ParquetWriter(self.root / relative, table.schema, compression=compression)
            self.files.append(relative)
        self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self._rows_in_file += table.num_rows

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer = None
        self._rows_in_file = 0

    def close(self) -> list[str]:
        """Finish the open file; the written files, relative to the dataset root."""
        self._close_file()
        return self.files
