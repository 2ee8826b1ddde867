"""What a command prints to the terminal. The CLI sets this up around one command; importing msit_rec changes nothing.

- One stderr handler (time, logger, message). Lightning adds its own handler when it is imported, so every Lightning
  line used to print twice; its handlers are folded into this one for the command.
- Levels: msit-rec's own loggers INFO, Lightning's INFO, every other library WARNING. `--quiet`: msit-rec WARNING (a
  data warning of our own still shows), every other logger ERROR, Lightning's advisory `PossibleUserWarning`s hidden.
- Known third-party noise is dropped in both modes: deprecation notices addressed to torchrec's and Lightning's own
  developers, torchrec's topology guesses, FBGEMM's library-load lines and per-table argument dumps (INFO on the root
  logger), Lightning's cloud-logging tip.
- Ranks that a launcher started (Lightning re-runs the command line for rank 1..N) print only errors: the process the
  user started speaks for the run.

Results go to stdout; progress bars (tqdm, and Lightning's: `msit_rec.train.progress`) and log lines go to stderr.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from msit_rec.host import is_launching_process

FORMAT = "%(asctime)s %(name)s: %(message)s"
DATEFMT = "%H:%M:%S"
OWN_LOGGERS = ("msit_rec", "pipelines")
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")

# (category, message regex matched at its start, module regex of the warning's location): never a user's concern
NOISY_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (FutureWarning, r"HeuristicalStorageReservation is known to cause issues", r"torchrec\."),
    (FutureWarning, r"`broadcast_buffers` is deprecated", r"torchrec\."),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor", r"torch\."),
    (FutureWarning, r"`torch\.distributed\.\w+` is deprecated", r"torch\.distributed\."),
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\."),
    # our loader deals row groups to ranks and workers itself, so its length is exact
    (UserWarning, r"Your `IterableDataset` has `__len__` defined", r"lightning\."),
)

# logger → starts of the messages dropped from it (a logger filter, so it also holds for libraries' own handlers)
NOISY_LOGS: dict[str, tuple[str, ...]] = {
    "root": (  # libraries that log through the root logger
        "Successfully loaded: ",  # fbgemm_gpu: one line per .so (INFO)
        "[TBE=",  # fbgemm_gpu: SplitTableBatchedEmbeddingBagsCodegen arguments, feature gates, optimizer (INFO)
        "Could not determine LOCAL_WORLD_SIZE",  # torchrec.distributed.comm (WARNING)
    ),
    "torchrec.distributed.comm": ("TORCHREC_RESOLVED_POD_SIZE not set", "[Connection] "),  # WARNING level
    "torchrec.distributed.planner.storage_reservations": ("There is a known issue with TorchRec's dense tensor",),
    "torch.fx._symbolic_trace": ("is_fx_tracing will return true",),  # torch's own handler: `[rank0]:W… is_fx_tracing`
    "lightning.pytorch.utilities.rank_zero": ("💡 Tip:",),  # the litlogger advertisement
}


class DropMessages(logging.Filter):
    """Drops records whose message starts with one of `starts`."""

    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


class BarSafeHandler(logging.StreamHandler):
    """Writes each line above the active tqdm bars (through `tqdm.write`) instead of onto the end of one."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 (logging's contract: report through handleError, never raise)
            self.handleError(record)


class Threshold(logging.Filter):
    """Per-source minimum level: msit-rec's own loggers, Lightning's, and every other library's."""

    def __init__(self, own: int, lightning: int, other: int) -> None:
        super().__init__()
        self.own, self.lightning, self.other = own, lightning, other

    def filter(self, record: logging.LogRecord) -> bool:
        top = record.name.split(".", 1)[0]
        if top in OWN_LOGGERS:
            return record.levelno >= self.own
        if top in LIGHTNING_LOGGERS:
            return record.levelno >= self.lightning
        return record.levelno >= self.other


@contextmanager
def command_output(quiet: bool, lightning: bool = False) -> Iterator[None]:
    """Terminal output of one CLI command; every logging, warnings and environment change is undone on exit.

    `lightning`: the command trains with Lightning; Lightning is imported here so its handlers can be folded in.
    """
    launched = not is_launching_process()
    with ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        for category, message, module in NOISY_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        if quiet or launched:  # C++ (c10) warnings: read when torch is imported, which the commands do lazily
            _set_env(stack, "TORCH_CPP_LOG_LEVEL", "ERROR")
        if lightning:
            _fold_lightning_handlers(stack)
            if quiet:
                from lightning.fabric.utilities.warnings import PossibleUserWarning

                warnings.filterwarnings("ignore", category=PossibleUserWarning)
        for name, starts in NOISY_LOGS.items():
            _add_filter(stack, logging.getLogger(None if name == "root" else name), DropMessages(starts))
        own = logging.WARNING if quiet else logging.INFO
        handler = BarSafeHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        handler.addFilter(Threshold(own=own, lightning=logging.ERROR if quiet else logging.INFO,
                                    other=logging.ERROR if quiet else logging.WARNING))
        root = logging.getLogger()
        _set_level(stack, root, logging.ERROR if quiet else logging.WARNING)  # unrouted library INFO is not made
        for name in OWN_LOGGERS:
            _set_level(stack, logging.getLogger(name), own)
        root.addHandler(handler)
        stack.callback(root.removeHandler, handler)
        if launched:  # a rank the launcher started: errors only, and no Python warnings at all
            warnings.simplefilter("ignore")
            previous = logging.root.manager.disable
            logging.disable(logging.WARNING)
            stack.callback(logging.disable, previous)
        yield


def _fold_lightning_handlers(stack: ExitStack) -> None:
    """Lightning's loggers print through the command's handler only (Lightning adds a stderr handler on import)."""
    import lightning  # noqa: F401  (the import adds the handler that is removed here)

    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        handlers, propagate = list(logger.handlers), logger.propagate
        for handler in handlers:
            logger.removeHandler(handler)
        logger.propagate = True
        stack.callback(_restore_handlers, logger, handlers, propagate)


def _restore_handlers(logger: logging.Logger, handlers: list[logging.Handler], propagate: bool) -> None:
    for handler in handlers:
        logger.addHandler(handler)
    logger.propagate = propagate


def _add_filter(stack: ExitStack, logger: logging.Logger, log_filter: logging.Filter) -> None:
    logger.addFilter(log_filter)
    stack.callback(logger.removeFilter, log_filter)


def _set_level(stack: ExitStack, logger: logging.Logger, level: int) -> None:
    stack.callback(logger.setLevel, logger.level)
    logger.setLevel(level)


def _set_env(stack: ExitStack, name: str, value: str) -> None:
    """Sets `name` unless the user set it; restored on exit."""
    if name in os.environ:
        return
    os.environ[name] = value
    stack.callback(os.environ.pop, name, None)
