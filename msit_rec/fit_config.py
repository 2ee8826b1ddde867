"""The `fit` configuration as typed dataclasses: sections `model` and `trainer` (with `optim` and `sharding`).

No torch, TorchRec or Lightning import here: a run directory's `fit_config.yaml` and an artifact's manifest are read
back into these types anywhere — by `evaluate`, `export` and the serving runtime — without the training stack.
Every default is declared once, here; the shipped YAML files only name what differs from it.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from typing import Literal

from msit_rec.errors import ConfigError

Variant = Literal["shared", "din", "din_sid", "star", "pepnet", "msit"]
GateRecency = Literal["scenario", "shared", "none"]  # the behaviour gate's age term: r_s[k], one r[k], or none
Activation = Literal["relu", "prelu", "gelu", "silu"]
ShardingKind = Literal["table_wise", "row_wise", "column_wise", "data_parallel"]
EmbeddingOptimizer = Literal["rowwise_adagrad", "adagrad", "sgd", "adam"]
# What picks checkpoints/best.ckpt and drives early stopping (TrainerConfig.monitor): the validation metric of that name
# (msit_rec/train/val_metrics.py).
Monitor = Literal["auc", "logloss", "scenario_auc"]


class SequencePath(enum.Enum):
    """How behaviour sequences are looked up (msit_rec/embeddings.py); the same numbers either way."""

    EMBEDDING_COLLECTION = "embedding_collection"  # TorchRec EmbeddingCollection: shards well on GPU
    POOLED_BAGS = "pooled_bags"  # one bag per position: FBGEMM's fast pooled backward on CPU


@dataclass(frozen=True)
class VariantParts:
    """What a variant switches on; every part is off unless named, so a preset lists only what it adds."""

    attention: bool = False  # DIN target attention over the behaviours (else sum pooling)
    attention_scenario: bool = False  # e(s) joins the attention's input
    behaviour_gate: bool = False  # each behaviour's attention weight × 2σ(w_s·b_j + a_s·e(s_j) + c_s)
    scenario_input: bool = False  # e(s) joins the tower input
    input_gate: bool = False  # EPNet: the tower input scaled by a gate of e(s)
    hidden_gates: bool = False  # PPNet: every hidden layer scaled by a gate of e(s)
    star: bool = False  # STAR: shared ⊙ scenario-specific tower weights

    @property
    def uses_scenario(self) -> bool:
        """Whether the served scenario's embedding is read at all (`shared` and `din` never read it)."""
        parts = (self.behaviour_gate, self.attention_scenario, self.scenario_input, self.input_gate, self.hidden_gates,
                 self.star)
        return any(parts)


VARIANTS: dict[str, VariantParts] = {
    "shared": VariantParts(),  # no scenario input at all; history sum-pooled
    "din": VariantParts(attention=True),
    "din_sid": VariantParts(attention=True, scenario_input=True),  # + the scenario id as one more tower feature
    "star": VariantParts(attention=True, scenario_input=True, star=True),
    "pepnet": VariantParts(attention=True, scenario_input=True, input_gate=True, hidden_gates=True),
    # the served scenario reaches the behaviours through the gate only: with e(s) in the attention's input too
    # (`model.attention_scenario: true`), msit fell below `shared` in 1 of 5 MovieLens seeds (0.847 vs 0.862; 0.869
    # without) and gained nothing on the planted world (0.7625 vs 0.7630)
    "msit": VariantParts(attention=True, behaviour_gate=True, scenario_input=True, input_gate=True),
}


@dataclass
class ModelConfig:
    """Section `model`: a variant preset plus the sizes every variant shares."""

    variant: Variant = "msit"
    attention_hidden: list[int] = field(default_factory=lambda: [64, 32])
    pooling: Literal["sum", "softmax"] = "sum"
    tower_hidden: list[int] = field(default_factory=lambda: [512, 256])
    activation: Activation = "relu"
    dropout: float = 0.0
    sequence_path: SequencePath = SequencePath.POOLED_BAGS
    # the served scenario's embedding e(s) joins the target attention's input: None = as the variant's preset has it
    # (none does), true/false to ablate it on any variant with attention
    attention_scenario: bool | None = None
    # how the behaviour gate (msit) weighs a behaviour's age: one profile per served scenario r_s[k] ("scenario"),
    # one for every scenario r[k] ("shared": on MovieLens as good), or not at all ("none": the gate before it)
    gate_recency: GateRecency = "scenario"

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.attention_hidden:
            raise ValueError("attention_hidden: expected at least one layer, got none")
        if self.attention_scenario and not VARIANTS[self.variant].attention:
            raise ValueError(f"attention_scenario: variant {self.variant!r} has no target attention")
        if self.gate_recency != "scenario" and not VARIANTS[self.variant].behaviour_gate:
            raise ValueError(f"gate_recency: variant {self.variant!r} has no behaviour gate")

    @property
    def parts(self) -> VariantParts:
        preset = VARIANTS[self.variant]
        if self.attention_scenario is None:
            return preset
        return dataclasses.replace(preset, attention_scenario=self.attention_scenario)


@dataclass
class OptimConfig:
    """Section `trainer.optim`: the dense parameters' AdamW and its learning-rate schedule."""

    dense_lr: float = 1e-3
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = 20
    # the gate's age profile (msit's r_s, model.gate_recency) learns at recency_lr_scale × dense_lr. Adam moves a
    # parameter by about its lr per step, and the profile's logits need several units (MovieLens: r from +3.5 for the
    # most recent behaviour to −1.7 for those 31–49 back, g ≈ 1.9 vs 0.3) while a small dataset's best checkpoint
    # comes within a few hundred steps: at the dense lr r had moved 0.3 by then (g within 0.85–1.15). Chosen on
    # validation AUC (MovieLens session contexts, 5 seeds, benchmarks/bench_quality.py's budget: ×1 0.7653, ×5
    # 0.7712, ×10 0.7746, ×20 0.7763, ×30 0.7761); the rest of the gate at 10× the dense lr lost 0.002–0.003 test AUC
    recency_lr_scale: float = 20.0

    def __post_init__(self) -> None:
        if not (self.recency_lr_scale > 0 and math.isfinite(self.recency_lr_scale)):
            raise ConfigError(f"recency_lr_scale: expected a positive number, got {self.recency_lr_scale}")


@dataclass
class ShardingConfig:
    """Section `trainer.sharding`: where tables live and the fused optimizer that updates them.

    `table_sharding` maps a table name to a forced sharding type; tables not named are placed by TorchRec's
    planner. `embedding_lr`/`embedding_eps` are the fused optimizer's hyper-parameters (eps unused by sgd).
    """

    table_sharding: dict[str, ShardingKind] = field(default_factory=dict)
    embedding_optimizer: EmbeddingOptimizer = "rowwise_adagrad"
    embedding_lr: float = 0.05
    embedding_eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.embedding_lr <= 0:
            raise ConfigError(f"embedding_lr: expected a positive number, got {self.embedding_lr}")


@dataclass
class TrainerConfig:
    """Section `trainer`: one CPU process by default (configs/trainer/*.yaml name what differs)."""

    accelerator: Literal["cpu", "gpu"] = "cpu"
    devices: int = 1
    num_nodes: int = 1
    max_epochs: int = 3
    max_steps: int = -1
    batch_size: int = 4096
    eval_batch_size: int = 8192
    num_workers: int = 0  # on 2 cores the in-process loader is fastest (benchmarks/bench_loader.py)
    # Lightning's names, or "auto": bf16-mixed where this host multiplies bf16 natively and a short probe measures
    # it faster, else 32-true (msit_rec/train/auto_precision.py; the choice and why are in fit_result.json)
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "32-true"
    seed: int = 0
    # seeded runs repeat bit for bit: without it some CPU kernels of the model's backward differ in the last bit
    # between identical runs, and the difference grows with training. False may be faster on GPU.
    deterministic: bool = True
    # what picks checkpoints/best.ckpt and drives early stopping: "auc" (validation AUC over all rows, higher is
    # better), "logloss" (validation logloss, lower is better) or "scenario_auc" (the unweighted mean of the
    # per-scenario validation AUCs: a small scenario counts as much as the largest)
    monitor: Monitor = "auc"
    early_stopping_patience: int = 2  # validations without improvement of `monitor` before training stops
    # Lightning's meaning: a float in (0, 1] validates every that fraction of an epoch, an int every that many
    # training batches (at most the batches of an epoch). CTR training is often one epoch over a big log: 0.25
    # validates, logs per-scenario metrics and may save best.ckpt four times in it
    val_check_interval: int | float = 1.0
    tune_malloc: bool = True  # keep large freed blocks in glibc's heap (msit_rec/host.py): fewer page faults
    log_every_n_steps: int = 20  # lowered to the steps of an epoch when an epoch has fewer (msit_rec/train/fit.py)
    limit_train_batches: int | float = 1.0
    limit_val_batches: int | float = 1.0
    progress_bar: bool = True
    optim: OptimConfig = field(default_factory=OptimConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)

    def __post_init__(self) -> None:
        for name in ("devices", "num_nodes", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_epochs == 0 or self.max_epochs < -1:
            raise ValueError(f"max_epochs must be >= 1 (or -1 with max_steps > 0), got {self.max_epochs}")
        if self.max_epochs == -1 and self.max_steps <= 0:
            raise ValueError("max_epochs=-1 (no epoch limit) needs max_steps > 0")
        interval = self.val_check_interval
        if (interval < 1) if isinstance(interval, int) else not 0.0 < interval <= 1.0:
            raise ValueError(
                f"val_check_interval: expected a fraction of an epoch in (0, 1] or a number of training batches >= 1, "
                f"got {interval!r}"
            )


@dataclass
class FitConfig:
    """Everything `msit-rec fit` is configured with (what `fit_config.yaml` records besides the data)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
