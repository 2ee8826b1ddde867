"""What `fit` measures at every validation: AUC, GAUC and logloss overall and per scenario, exact over all ranks.

One torchmetrics `Metric` keeps every validation row's (logit, label, scenario, user) as list states. `compute()`
first gathers every rank's rows (torchmetrics' sync: an all_gather that allows uneven row counts), so every rank
computes the same numbers from all rows: per-rank AUCs are never averaged. AUC is torchmetrics' `binary_auroc` (the
same computation as its `BinaryAUROC` over the same rows); GAUC is `msit_rec.metrics.gauc` (per-user AUC weighted by
impressions, over the users with both classes), which costs one more sort of the rows by (scenario, user, score) and
one by (user, score) — the rows are already held for the AUC, plus 16 bytes per row for scenario and user.

Undefined values are NaN, never 0.5: the AUC of a scenario without clicks or without non-clicks (or without rows),
the GAUC of a scenario without a user who has both classes. `scenario_auc` is the unweighted mean of the defined
per-scenario AUCs: every scenario counts the same, whatever its traffic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.utilities import dim_zero_cat

from msit_rec.metrics import gauc

_STATES = ("logit", "label", "scenario", "user")


class ValidationMetrics(Metric):
    """`compute()` → {"auc", "logloss", "gauc", "scenario_auc", "auc_<scenario>", "gauc_<scenario>"}: 0-d tensors
    (AUCs float32 as torchmetrics gives them, logloss and GAUC float64), the same on every rank; scenarios named as
    in dataset.json, in id order."""

    full_state_update = False

    def __init__(self, scenarios: list[str]) -> None:
        super().__init__()
        self.scenarios = list(scenarios)
        for name in _STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, logit: torch.Tensor, label: torch.Tensor, scenario: torch.Tensor, user: torch.Tensor) -> None:
        """One batch's real rows (padding already dropped), all [N]."""
        self.logit.append(logit.detach().float())
        self.label.append(label.detach().long())
        self.scenario.append(scenario.detach().long())
        self.user.append(user.detach().long())

    def compute(self) -> dict[str, torch.Tensor]:
        logit, label, scenario, user = (dim_zero_cat(getattr(self, name)) for name in _STATES)
        prob = torch.sigmoid(logit)  # [N]
        num = len(self.scenarios)
        aucs = torch.stack([_auc(prob[scenario == s], label[scenario == s]) for s in range(num)])  # [S]
        score = prob.double()
        order = torch.argsort(score, stable=True)  # one score sort for both GAUCs, as evaluate shares it
        gaucs, _ = gauc(score, label, user, scenario, num, score_order=order)  # [S]
        overall_gauc, _ = gauc(score, label, user, score_order=order)  # [1]
        values = {
            "auc": _auc(prob, label),
            "logloss": F.binary_cross_entropy_with_logits(logit.double(), label.double()),
            "gauc": overall_gauc[0],
            "scenario_auc": torch.nanmean(aucs),  # NaN when no scenario has a defined AUC
        }
        for s, name in enumerate(self.scenarios):
            values[f"auc_{name}"] = aucs[s]
            values[f"gauc_{name}"] = gaucs[s]
        return values


def _auc(prob: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """torchmetrics' AUC; NaN (not its 0 and a warning) without both classes."""
    positives = int(label.sum())
    if positives == 0 or positives == label.numel():
        return torch.tensor(torch.nan, device=prob.device)
    return binary_auroc(prob, label, validate_args=False)
