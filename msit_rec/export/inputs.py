"""The program's input schema from `dataset.json`, and training `Batch`es as program inputs (for parity)."""

from __future__ import annotations

import torch

from msit_rec.data.batch import Batch
from msit_rec.data.spec import PADDING_INDEX, DatasetMeta
from msit_rec.serving.contract import InputSchema


def input_schema(meta: DatasetMeta) -> InputSchema:
    return InputSchema(
        sparse=[f.name for f in meta.features_of_kind("sparse")],
        sequence=[f.name for f in meta.features_of_kind("sequence")],
        dense=[f.name for f in meta.features_of_kind("dense")],
        max_len=meta.history.max_len,
        scenarios=list(meta.scenarios),
    )


def batch_to_inputs(batch: Batch, schema: InputSchema) -> tuple[torch.Tensor, ...]:
    """The program's positional inputs (contract.INPUT_NAMES order) holding exactly the rows of `batch`, each row
    its own context (C = B)."""
    sparse = batch.sparse.to_dict()
    sequence = batch.sequence.to_dict()
    sparse_ids = torch.stack([sparse[name].values() for name in schema.sparse], dim=1)  # [B, Fs]
    history = torch.stack(  # [B, H, L], left-aligned, padded with PADDING_INDEX
        [sequence[name].to_padded_dense(schema.max_len, padding_value=PADDING_INDEX) for name in schema.sequence],
        dim=1,
    )
    rows = torch.arange(batch.hist_len.shape[0], device=history.device)  # [B]: row b is context b
    return (sparse_ids.long(), history.long(), batch.hist_len.long(), batch.scenario.long(), batch.dense.float(), rows)
