"""Dense building blocks of the model: pure torch, no embedding tables (those live in msit_rec.embeddings).

Shape legend for the model package (msit_rec.modules, msit_rec.embeddings, msit_rec.model, msit_rec.export's
serving model); each letter has one meaning:
    B  rows scored: training examples, or the candidates of /rank requests
    C  contexts: histories that rows share (C = B in training; a /rank request's candidates share one)
    L  most behaviours in a history (the dataset's history.max_len)
    N  real behaviours of a batch, packed example by example (Σ hist_len ≤ B·L)
    K  sequence features of a behaviour (item, category, scenario...: the rows of the serving `history` input)
    D  width of a behaviour and of the target: the summed dims of the sequence tables
    U  width of the pooled single-valued features (user, brand...)
    E  width of the scenario embedding e(s);  S  number of scenarios
    H  width of the attention's first hidden layer
    F  width of the tower input
"""

from msit_rec.modules.mlp import MLP, make_activation
from msit_rec.modules.ranking_head import RankingHead
from msit_rec.modules.scenario_gate import ScenarioGate
from msit_rec.modules.star import StarLinear
from msit_rec.modules.target_attention import TargetAttention, lengths_to_mask
from msit_rec.modules.tower import ScenarioScale, ScenarioTower

__all__ = [
    "MLP",
    "RankingHead",
    "ScenarioGate",
    "ScenarioScale",
    "ScenarioTower",
    "StarLinear",
    "TargetAttention",
    "lengths_to_mask",
    "make_activation",
]
