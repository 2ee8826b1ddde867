"""What `GET /metrics` reports: request counts by status, OOV ids per feature, latency and batching summaries, and
the connections that ended early (client gone or stalled) or were refused (over `--max_connections`)."""

from __future__ import annotations

import threading
from collections import Counter, deque
from typing import Any

import numpy as np

LATENCY_WINDOW = 10_000  # most recent requests the latency percentiles are computed over


class ServerMetrics:
    """Thread-safe counters; `snapshot()` gives plain JSON data."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status: Counter = Counter()
        self._oov: Counter = Counter()
        self._latency_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._rows = 0
        self._model_calls = 0
        self._batched_requests = 0
        self._disconnects = 0
        self._refused = 0

    def record_request(self, status: int, latency_s: float) -> None:
        with self._lock:
            self._status[status] += 1
            self._latency_ms.append(latency_s * 1000.0)

    def record_rows(self, rows: int, oov: Counter) -> None:
        with self._lock:
            self._rows += rows
            self._oov.update(oov)

    def record_batch(self, requests: int, rows: int) -> None:
        with self._lock:
            self._model_calls += 1
            self._batched_requests += requests

    def record_disconnect(self) -> None:
        with self._lock:
            self._disconnects += 1

    def record_refused(self) -> None:
        with self._lock:
            self._refused += 1

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
