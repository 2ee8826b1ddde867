"""Dense building blocks of the model: pure torch, no embedding tables (those live in msit_rec.model)."""

from msit_rec.modules.mlp import MLP, make_activation
from msit_rec.modules.scenario_gate import ScenarioGate
from msit_rec.modules.star import StarLinear
from msit_rec.modules.target_attention import TargetAttention, lengths_to_mask
from msit_rec.modules.tower import ScenarioScale, ScenarioTower

__all__ = [
    "MLP",
    "ScenarioGate",
    "ScenarioScale",
    "ScenarioTower",
    "StarLinear",
    "TargetAttention",
    "lengths_to_mask",
    "make_activation",
]
