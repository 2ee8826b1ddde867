"""Stand-in LightningModule for strategy tests: 3 pooled tables (EBC), 1 sequence table (EC), a small MLP.

Batches are synthetic and fully determined by (seed, batch index), so every process can rebuild any batch.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from msit_rec.train.optim import dense_parameters

DIM = 8
DENSE_DIM = 4
MAX_HIST = 6
BAG_TABLES = {"user": ("user_id", 64), "item": ("item_id", 96), "cat": ("cat_ids", 24)}  # name: (feature, rows)
SEQ_TABLE = ("hist", "hist_item", 96)
TABLE_NAMES = [*BAG_TABLES, SEQ_TABLE[0]]

Batch = dict[str, Any]


def make_batch(index: int, batch_size: int = 16, seed: int = 0) -> Batch:
    """Batch `index`: bag features (1 user, 1 item, 0-3 cats), a 0-6 long history, 4 dense floats, labels."""
    gen = torch.Generator().manual_seed(seed * 100_003 + index)
    user = torch.randint(0, BAG_TABLES["user"][1], (batch_size,), generator=gen)
    item = torch.randint(0, BAG_TABLES["item"][1], (batch_size,), generator=gen)
    cat_len = torch.randint(0, 4, (batch_size,), generator=gen)
    cats = torch.randint(0, BAG_TABLES["cat"][1], (int(cat_len.sum()),), generator=gen)
    hist_len = torch.randint(0, MAX_HIST + 1, (batch_size,), generator=gen)
    hist = torch.randint(0, SEQ_TABLE[2], (int(hist_len.sum()),), generator=gen)
    ones = torch.ones(batch_size, dtype=torch.long)
    bags = KeyedJaggedTensor.from_lengths_sync(
        keys=["user_id", "item_id", "cat_ids"],
        values=torch.cat([user, item, cats]),
        lengths=torch.cat([ones, ones, cat_len]),
    )
    seq = KeyedJaggedTensor.from_lengths_sync(keys=["hist_item"], values=hist, lengths=hist_len)
    dense = torch.randn(batch_size, DENSE_DIM, generator=gen)
    label = ((item % 3 == 0) ^ (dense[:, 0] > 0.5)).float()  # learnable from item id and one dense value
    return {"bags": bags, "seq": seq, "dense": dense, "label": label}


class SyntheticBatches(Dataset[Batch]):
    """`num_batches` ready-made batches; use with `DataLoader(batch_size=None)`."""

    def __init__(self, num_batches: int, batch_size: int = 16, seed: int = 0) -> None:
        self.num_batches, self.batch_size, self.seed = num_batches, batch_size, seed

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, index: int) -> Batch:
        return make_batch(index, self.batch_size, self.seed)


def _keep(batch: Batch) -> Batch:
    return batch


def batch_loader(num_batches: int, batch_size: int = 16, seed: int = 0) -> DataLoader[Batch]:
    return DataLoader(SyntheticBatches(num_batches, batch_size, seed), batch_size=None, collate_fn=_keep)


class ToyRecModule(LightningModule):
    """EBC(user, item, cat) + EC(hist, mean-pooled) + dense → MLP → logit. Tables on `table_device`."""

    def __init__(
        self,
        table_device: str = "meta",
        dense_optimizer: Literal["adamw", "sgd"] = "adamw",
        dense_lr: float = 0.01,
        lr_decay: float | None = None,
    ) -> None:
        super().__init__()
        device = torch.device(table_device)
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(name=name, embedding_dim=DIM, num_embeddings=rows, feature_names=[feature])
                for name, (feature, rows) in BAG_TABLES.items()
            ],
            device=device,
        )
        name, feature, rows = SEQ_TABLE
        self.ec = EmbeddingCollection(
            tables=[EmbeddingConfig(name=name, embedding_dim=DIM, num_embeddings=rows, feature_names=[feature])],
            device=device,
        )
        self.mlp = nn.Sequential(nn.Linear(len(BAG_TABLES) * DIM + DIM + DENSE_DIM, 16), nn.ReLU(), nn.Linear(16, 1))
        self.dense_optimizer, self.dense_lr, self.lr_decay = dense_optimizer, dense_lr, lr_decay

    def forward(self, batch: Batch) -> Tensor:
        pooled = self.ebc(batch["bags"]).values()  # [B, 3*D]
        hist = self.ec(batch["seq"])["hist_item"]
        lengths = hist.lengths()  # [B]
        owner = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)  # [N]
        summed = torch.zeros(lengths.numel(), DIM, device=pooled.device).index_add_(0, owner, hist.values())
        hist_mean = summed / lengths.clamp(min=1).unsqueeze(1).to(summed.dtype)  # [B, D]
        return self.mlp(torch.cat([pooled, hist_mean, batch["dense"]], dim=1)).squeeze(1)  # [B]

    def _loss(self, batch: Batch) -> Tensor:
        return nn.functional.binary_cross_entropy_with_logits(self(batch), batch["label"])

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, on_step=True, prog_bar=False)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), sync_dist=True)

    def predict_step(self, batch: Batch, batch_idx: int) -> Tensor:
        return self(batch)

    def configure_optimizers(self) -> Any:
        params = list(dense_parameters(self))
        if self.dense_optimizer == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=self.dense_lr)
        else:
            optimizer = torch.optim.AdamW(params, lr=self.dense_lr, weight_decay=0.01)
        if self.lr_decay is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=self.lr_decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
