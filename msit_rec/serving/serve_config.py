"""`ServeConfig`: the settings of `msit-rec serve`, each declared once with its flag's help.

No torch import: the CLI builds the `serve` flags from these fields (name, type, default, help) without loading the
serving stack, so a default changed here is the one `--help` shows and the server uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from msit_rec.errors import ConfigError


def _option(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class ServeConfig:
    host: str = _option("127.0.0.1", "address to bind; loopback unless asked: the service has no authentication")
    port: int = _option(8080, "port (0 = any free port, printed)")
    max_body_bytes: int = _option(8 << 20, "largest request body in bytes; larger is answered 413")
    max_candidates: int = _option(10_000, "candidates of one /rank request; more are answered 413")
    max_history: int = _option(1_000, "behaviours of one history (only the model's max_len most recent count, all "
                                      "cost parsing); more are answered 413")
    max_json_depth: int = _option(64, "nesting depth of a request body (a valid /rank body nests 4 deep); deeper is "
                                      "answered 400")
    # Reference model, one thread, a 10,000-candidate request: 128-row calls score it fastest (AOTI 128 ms, export
    # 200 ms; 512 rows: 154 / 332 ms, the activations outgrow the caches), and a small request beside it waits for
    # one short call: its p99 7-13x idle instead of 10-31x at 512. The AOTInductor runner holds the interpreter lock
    # for its whole call, so the call's length bounds how long the HTTP threads of other requests stall.
    max_batch_rows: int = _option(128, "rows of one model call: concurrent requests share it, a larger request is "
                                       "scored in chunks of this many rows between others'")
    batch_wait_ms: float = _option(0.0, "how long a model call waits for more concurrent requests")
    read_timeout_s: float = _option(30.0, "close a connection silent this long, mid-request or between requests")
    max_connections: int = _option(64, "open connections (a thread each); more are answered 503")

    def validate(self) -> None:
        for name in ("max_body_bytes", "max_candidates", "max_history", "max_json_depth", "max_batch_rows",
                     "max_connections"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} {getattr(self, name)}: expected ≥ 1")
        if not self.read_timeout_s > 0:
            raise ConfigError(f"--read_timeout_s {self.read_timeout_s}: expected > 0")
        if self.batch_wait_ms < 0:
            raise ConfigError(f"--batch_wait_ms {self.batch_wait_ms}: expected ≥ 0")


SERVE_OPTIONS = tuple(fields(ServeConfig))
