"""An unsharded RankingModel with trained-like random tables: what model-level tests compare paths and layouts on."""

from __future__ import annotations

import torch

from msit_rec.data.spec import DatasetMeta
from msit_rec.fit_config import ModelConfig
from msit_rec.model import RankingModel

GATED = "msit"  # the one variant with a behaviour gate


def random_model(meta: DatasetMeta, variant: str = GATED, seed: int = 0, **config) -> RankingModel:
    """An unsharded model whose tables hold trained-like N(0, 0.5²) rows (TorchRec's initial rows are ~1e-2, so
    behaviours would barely move the logits and every comparison with it would be weak), and so do the gate's
    weights (zero when fresh: every behaviour weighed 1, whatever its scenario)."""
    torch.manual_seed(seed)
    net = RankingModel(meta, ModelConfig(variant=variant, tower_hidden=[32, 16], **config), device=torch.device("cpu"))
    with torch.no_grad():
        for name, param in net.named_parameters():
            if name.startswith(("embeddings.", "head.gate.")):
                param.normal_(0.0, 0.5)
    return net
