"""Lightning's tqdm progress bar, on stderr: stdout carries only a command's results (Lightning's bar writes to stdout)."""

from __future__ import annotations

import sys
from contextlib import redirect_stdout

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm


class StderrProgressBar(TQDMProgressBar):
    """`TQDMProgressBar` whose bars write to stderr (each bar takes `sys.stdout` when it is made)."""

    def init_sanity_tqdm(self) -> Tqdm:
        with redirect_stdout(sys.stderr):
            return super().init_sanity_tqdm()

    def init_train_tqdm(self) -> Tqdm:
        with redirect_stdout(sys.stderr):
            return super().init_train_tqdm()

    def init_predict_tqdm(self) -> Tqdm:
        with redirect_stdout(sys.stderr):
            return super().init_predict_tqdm()

    def init_validation_tqdm(self) -> Tqdm:
        with redirect_stdout(sys.stderr):
            return super().init_validation_tqdm()

    def init_test_tqdm(self) -> Tqdm:
        with redirect_stdout(sys.stderr):
            return super().init_test_tqdm()
