"""msit-rec: multi-scenario CTR ranking with scenario-conditioned interest transfer."""

__version__ = "0.1.0"
