"""What `GET /metrics` reports: request counts by status, OOV ids per feature, latency and batching summaries, and
the connections that ended early (client gone or stalled) or were refused (over `--max_connections`).

Two representations of the same events, both recorded by one `record_*` call each: the JSON `snapshot()` and
Prometheus metrics (prometheus_client, in a registry of this object's own, never the process-wide default: several
servers may live in one process) that `exposition()` writes in the Prometheus or OpenMetrics text format.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, Info
from prometheus_client import Counter as PromCounter
from prometheus_client.exposition import choose_encoder

LATENCY_WINDOW = 10_000  # most recent requests the latency percentiles are computed over
# Request latency buckets (seconds): a 1-candidate request takes ~1 ms, 10,000 candidates ~0.1-0.2 s, a stalled
# client up to the read timeout.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # requests served by one model call (at most --max_connections)


def wants_prometheus(accept: str | None) -> bool:
    """An Accept header that asks for a Prometheus scrape: OpenMetrics, or `text/plain` with a `version` (what
    Prometheus sends). Anything else (none, `*/*`, `application/json`, a browser's) gets the JSON snapshot."""
    for entry in (accept or "").lower().split(","):
        media, *params = (part.strip() for part in entry.split(";"))
        if media == "application/openmetrics-text":
            return True
        if media == "text/plain" and any(param.startswith("version=") for param in params):
            return True
    return False


class ServerMetrics:
    """Thread-safe counters; `snapshot()` gives plain JSON data, `exposition()` the Prometheus text format.
    `artifact`: labels of a constant `msit_rec_artifact_info` (what is served), none if empty."""

    def __init__(self, artifact: dict[str, str] | None = None) -> None:
        self._lock = threading.Lock()
        self._status: Counter = Counter()
        self._oov: Counter = Counter()
        self._latency_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._rows = 0
        self._model_calls = 0
        self._batched_requests = 0
        self._disconnects = 0
        self._refused = 0
        self.registry = CollectorRegistry()
        # requests by status: the histogram's `_count` (no second counter of the same thing)
        self._prom_latency = Histogram("msit_rec_request_duration_seconds", "HTTP request latency (read to answer "
                                       "written; /metrics excluded) by status", ["status"],
                                       buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self._prom_rows = PromCounter("msit_rec_rows_scored", "Candidate rows scored", registry=self.registry)
        self._prom_oov = PromCounter("msit_rec_oov_ids", "Ids encoded as out-of-vocabulary, by feature", ["feature"],
                                     registry=self.registry)
        # model calls: the histogram's `_count`; requests batched into them: its `_sum`
        self._prom_batch = Histogram("msit_rec_model_call_requests", "Requests served by one model call",
                                     buckets=BATCH_BUCKETS, registry=self.registry)
        self._prom_disconnects = PromCounter("msit_rec_disconnects", "Connections the client closed or let stall "
                                             "before its answer", registry=self.registry)
        self._prom_refused = PromCounter("msit_rec_connections_refused", "Connections answered 503 (over "
                                         "--max_connections)", registry=self.registry)
        if artifact:
            Info("msit_rec_artifact", "The served artifact", registry=self.registry).info(artifact)

    def record_request(self, status: int, latency_s: float) -> None:
        with self._lock:
            self._status[status] += 1
            self._latency_ms.append(latency_s * 1000.0)
        self._prom_latency.labels(status=str(int(status))).observe(latency_s)

    def record_rows(self, rows: int, oov: Counter) -> None:
        with self._lock:
            self._rows += rows
            self._oov.update(oov)
        self._prom_rows.inc(rows)
        for feature, count in oov.items():
            self._prom_oov.labels(feature=feature).inc(count)

    def record_batch(self, requests: int, rows: int) -> None:
        with self._lock:
            self._model_calls += 1
            self._batched_requests += requests
        self._prom_batch.observe(requests)

    def record_disconnect(self) -> None:
        with self._lock:
            self._disconnects += 1
        self._prom_disconnects.inc()

    def record_refused(self) -> None:
        with self._lock:
            self._refused += 1
        self._prom_refused.inc()

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """(body, Content-Type) of a scrape: OpenMetrics if `accept` asks for it, else the Prometheus text format."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            latency = np.array(self._latency_ms, dtype=np.float64)
            total = sum(self._status.values())
            return {
                "requests": total,
                "responses_by_status": {str(k): v for k, v in sorted(self._status.items())},
                "errors": sum(v for k, v in self._status.items() if k >= 400),
                "rows_scored": self._rows,
                "oov": dict(sorted(self._oov.items())),
                "model_calls": self._model_calls,
                "requests_per_model_call": self._batched_requests / self._model_calls if self._model_calls else None,
                "disconnects": self._disconnects,
                "connections_refused": self._refused,
                "latency_ms": {
                    "window": len(latency),
                    **({f"p{q}": float(np.percentile(latency, q)) for q in (50, 90, 99)} if len(latency) else {}),
                    "mean": float(latency.mean()) if len(latency) else None,
                },
            }
