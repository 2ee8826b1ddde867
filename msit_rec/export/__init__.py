"""Export a trained run for serving: an unsharded, optionally quantised `torch.export` artifact with parity checks.

`export_run` is the entry point (used by `msit-rec export`); the artifact's layout is `msit_rec.serving.contract`.
"""

from msit_rec.export.exporter import export_run
from msit_rec.export.parity import ParityBounds
from msit_rec.export.precision import parse_precision
from msit_rec.export.serving_model import ServingModel

__all__ = ["ParityBounds", "ServingModel", "export_run", "parse_precision"]
