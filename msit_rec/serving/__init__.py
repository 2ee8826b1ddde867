"""Scoring raw requests from an exported artifact: torch, numpy and pyarrow only — no torchrec, no Lightning.

Nothing under this package may import `msit_rec.model`, `msit_rec.embeddings`, `msit_rec.train` or `pipelines`
(tests load it in a process where torchrec and lightning cannot be imported).
"""
