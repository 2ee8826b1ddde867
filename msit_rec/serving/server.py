"""`msit-rec serve`: a small HTTP JSON service around an artifact (stdlib `http.server`, no extra dependency).

    POST /rank     {"scenario": s, "context": {user fields}, "history": [behaviours], "candidates": [{item fields}]}
                   → {"scenario": s, "items": [{"index": i, "item_id": ..., "score": p}, ...] (score descending),
                      "oov": {feature: ids encoded as OOV}}
    GET  /health   status and what the artifact is
    GET  /metrics  requests by status, OOV ids per feature, latency percentiles, batching

Each connection has its own thread, which parses and encodes its request; the model calls of concurrent
requests are micro-batched by one worker (msit_rec/serving/batcher.py). Schema errors are 400 with
`{"error": "<field path>: <problem>"}`; 404 unknown path, 405 wrong method, 411/413 missing/oversized body.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from msit_rec.serving.artifact import RankingArtifact
from msit_rec.serving.batcher import MicroBatcher
from msit_rec.serving.request import RequestError, rank_request_rows
from msit_rec.serving.server_metrics import ServerMetrics

log = logging.getLogger("msit_rec.serve")

ROUTES = {"/rank": "POST", "/health": "GET", "/metrics": "GET"}


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback unless asked: the service has no authentication
    port: int = 8080  # 0 = any free port
    max_body_bytes: int = 8 << 20
    max_batch_rows: int = 4096  # rows of one micro-batched model call
    batch_wait_ms: float = 0.0  # how long the worker waits for more requests before a call


class RankingService:
    """Request handling, independent of the HTTP plumbing: body bytes in, (status, JSON object) out."""

    def __init__(self, artifact: RankingArtifact, config: ServeConfig) -> None:
        self.artifact = artifact
        self.config = config
        self.metrics = ServerMetrics()
        self.batcher = MicroBatcher(
            lambda inputs: artifact.logits(inputs, check=False),  # encoded requests only: ids in range
            config.max_batch_rows, config.batch_wait_ms / 1000.0, self.metrics.record_batch
        )
        self.started = time.time()

    def rank(self, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            request = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return HTTPStatus.BAD_REQUEST, {"error": f"request body: invalid JSON ({exc})"}
        try:
            rows = rank_request_rows(request, self.artifact.encoder.schema)
        except RequestError as exc:
            return HTTPStatus.BAD_REQUEST, {"error": str(exc)}
        encoded = self.artifact.encode(rows)
        scores = torch.sigmoid(self.batcher.submit(encoded.inputs)).tolist()
        self.metrics.record_rows(rows.size, encoded.oov)
        item_field = self.artifact.encoder.schema.item_field
        context = request.get("context", {})
        order = sorted(range(rows.size), key=lambda i: -scores[i])  # stable: ties keep request order
        items = [
            {"index": i, "item_id": request["candidates"][i].get(item_field, context.get(item_field)),
             "score": scores[i]}
            for i in order
        ]
        oov = {name: count for name, count in encoded.oov.items() if count}
        return HTTPStatus.OK, {"scenario": request["scenario"], "items": items, "oov": oov}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "uptime_s": round(time.time() - self.started, 3), **self.artifact.info()}

    def close(self) -> None:
        self.batcher.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse one connection
    disable_nagle_algorithm = True  # headers and body are two writes: Nagle + delayed ACK would add 40 ms
    server: _Server

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        start = time.perf_counter()
        service = self.server.service
        path = self.path.split("?", 1)[0]
        try:
            if path not in ROUTES:
                status, payload = HTTPStatus.NOT_FOUND, {"error": f"{path}: not found; routes are {sorted(ROUTES)}"}
            elif ROUTES[path] != method:
                status, payload = HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{path} takes {ROUTES[path]}, not {method}"}
            elif path == "/health":
                status, payload = HTTPStatus.OK, service.health()
            elif path == "/metrics":
                status, payload = HTTPStatus.OK, service.metrics.snapshot()
            else:
                body = self._body(service.config.max_body_bytes)
                status, payload = body if isinstance(body, tuple) else service.rank(body)
        except Exception as exc:  # a bug, not the client's fault: answer 500 and keep serving
            log.exception("request %s %s failed", method, path)
            status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(exc).__name__}"}
        self._reply(status, payload, method == "POST" and status in (HTTPStatus.LENGTH_REQUIRED,
                                                                      HTTPStatus.REQUEST_ENTITY_TOO_LARGE))
        if path != "/metrics":
            service.metrics.record_request(int(status), time.perf_counter() - start)

    def _body(self, limit: int) -> bytes | tuple[int, dict[str, Any]]:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            return HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length: required (a JSON body)"}
        if int(length) > limit:
            return HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {
                "error": f"request body: {int(length)} bytes, the limit is {limit} (--max_body_bytes)"
            }
        return self.rfile.read(int(length))

    def _reply(self, status: int, payload: dict[str, Any], close: bool) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:  # the unread body would be taken for the next request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # listen backlog: the default 5 resets connections under a burst of clients

    def __init__(self, config: ServeConfig, service: RankingService) -> None:
        self.service = service
        super().__init__((config.host, config.port), _Handler)


class RankingServer:
    """The HTTP server: `start()` in a background thread (tests, benchmarks) or `serve_forever()` (the CLI)."""

    def __init__(self, artifact: RankingArtifact, config: ServeConfig | None = None) -> None:
        self.config = config or ServeConfig()
        self.service = RankingService(artifact, self.config)
        self._http = _Server(self.config, self.service)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._http.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> RankingServer:
        self._thread = threading.Thread(target=self._http.serve_forever, name="msit-rec-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve until SIGINT or SIGTERM, then finish the queued model calls and close the socket."""
        def stop(signum: int, frame: object) -> None:
            threading.Thread(target=self._http.shutdown, daemon=True).start()  # shutdown() waits for the loop

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._http.serve_forever()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._close()

    def shutdown(self) -> None:
        self._http.shutdown()
        if self._thread is not None:
            self._thread.join()
        self._close()

    def _close(self) -> None:
        self._http.server_close()
        self.service.close()
