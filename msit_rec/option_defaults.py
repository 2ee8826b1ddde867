"""Defaults of the options that a library function and its `msit-rec` flag both take, declared once.

The functions use these as their keyword defaults and the CLI as its flag defaults (shown by `--help`), so the two
cannot drift. No heavy import here: building the CLI parser must not import torch. The `serve` options live in
`ServeConfig` (msit_rec/serving/serve_config.py); `fit`'s in msit_rec/fit_config.py.
"""

from __future__ import annotations

CHECKPOINT = "best"  # which checkpoint of a run is scored, explained or exported
SPLIT = "test"  # which split is scored, explained, parity-checked or turned into requests
SCORING_BATCH_ROWS = 8192  # rows per batch when scoring prepared examples (evaluate, explain, export's parity)
PREDICT_BATCH_ROWS = 4096  # rows per model call of `predict`
COMPARE_RESAMPLES = 1000  # paired-bootstrap resamples of `compare`
EXPLAIN_RESAMPLES = 200  # bootstrap resamples per transfer cell of `explain` (one scoring pass each)
CONFIDENCE_LEVEL = 0.95  # of every interval
BOOTSTRAP_SEED = 0
EXPLAIN_TOP = 10  # most attended behaviours listed per served scenario and feature
PRECISION = "fp32"  # table storage of an exported artifact
COMPUTE = "fp32"  # dtype of the exported program's dense products (bf16 where the host multiplies bf16 natively)
COMPUTES = ("fp32", "bf16")
BACKEND = "auto"  # serving program: the AOTInductor package when present, else the torch.export program
BACKENDS = ("auto", "export", "aoti")
REQUEST_ROWS = 20  # requests written by `msit-rec requests`
TOP_BEHAVIOURS = 0  # behaviours with the largest attention weight returned per scored row (0: none)
