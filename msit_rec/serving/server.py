"""`msit-rec serve`: a small HTTP JSON service around an artifact (stdlib `http.server`; orjson parses and answers /rank).

    POST /rank     {"scenario": s, "context": {user fields}, "history": [behaviours], "candidates": [{item fields}],
                    "top_behaviours": k (optional, default 0)}
                   → {"scenario": s, "items": [{"index": i, "item_id": ..., "score": p}, ...] (score descending),
                      "oov": {feature: ids encoded as OOV}}; with k > 0 each item also has "behaviours": the k
                      behaviours of the history with the largest attention weight for that candidate,
                      [{"index": j (into the history sent), "item_id", "scenario", "weight"}, ...]
    GET  /health   status and what the artifact is
    GET  /metrics  requests by status, OOV ids per feature, latency percentiles, batching, dropped connections
                   (JSON; the Prometheus text format instead when the Accept header asks for it, as a scraper's does)
    GET  /metrics/prometheus  the same in the Prometheus text format (OpenMetrics if Accept asks), latency
                   histograms by status (msit_rec/serving/server_metrics.py)

Each connection has its own thread (at most `max_connections`; more are answered 503), which parses and encodes its
request; the model calls of concurrent requests are micro-batched by one worker in chunks of at most `max_batch_rows`
rows (msit_rec/serving/batcher.py), so one large request cannot hold the model while small ones wait. Every answer
but a Prometheus scrape is JSON: schema errors and malformed JSON 400 `{"error": "<field path>: <problem>"}`; 404
unknown path; 405 any other method (with `Allow`); 408 a body that stops arriving; 411/413 a missing/oversized body;
413 too many candidates or behaviours. A connection silent for `read_timeout_s` is closed; a client that leaves early is counted
in /metrics (`disconnects`), not logged as a failure.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import signal
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

import numpy as np
import orjson
import torch

from msit_rec.serving.artifact import RankingArtifact
from msit_rec.serving.batcher import MicroBatcher
from msit_rec.serving.program_inputs import ProgramInputs
from msit_rec.serving.request import HISTORY, TOP_BEHAVIOURS, RequestError, rank_request_rows
from msit_rec.serving.serve_config import ServeConfig
from msit_rec.serving.server_metrics import ServerMetrics, wants_prometheus
from msit_rec.serving.top_behaviours import top_behaviours

log = logging.getLogger("msit_rec.serve")

ROUTES = {"/rank": "POST", "/health": "GET", "/metrics": "GET", "/metrics/prometheus": "GET"}
METRICS_PATHS = ("/metrics", "/metrics/prometheus")  # scrapes are not counted as requests
# How often a Python thread must hand the interpreter lock to a waiting one while `serve_forever` runs (default 5 ms):
# a thread parsing or answering a large request would otherwise hold up a small request's threads, and the model
# worker at each torch op, up to 5 ms at every hand-over (measured in one process on 2 cores: 1-candidate p99 beside
# a streaming 10,000-candidate request ~23 ms at 5 ms, ~11-14 ms at 0.5 ms, before orjson and new-requests-first).
SWITCH_INTERVAL_S = 0.0005


class Text(NamedTuple):
    """An answer that is not JSON: its bytes and Content-Type."""

    data: bytes
    content_type: str


class Refused(Exception):
    """A request the service will not score: `status` and the message of its JSON error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RankingService:
    """Request handling, independent of the HTTP plumbing: body bytes in, (status, JSON object) out."""

    def __init__(self, artifact: RankingArtifact, config: ServeConfig) -> None:
        config.validate()
        self.artifact = artifact
        self.config = config
        info = artifact.info()
        self.metrics = ServerMetrics({"artifact_version": str(artifact.manifest.artifact_version),
                                      "variant": str(info["model"]), "dataset": str(info["dataset"]),
                                      "backend": str(info["backend"])})
        self.batcher = MicroBatcher(
            self._model_outputs, config.max_batch_rows, config.batch_wait_ms / 1000.0, self.metrics.record_batch
        )
        self.started = time.time()

    def rank(self, body: bytes) -> tuple[int, dict[str, Any] | bytes]:
        """(status, answer): a JSON object, or the ranking already encoded as JSON text."""
        try:
            request = self._parse(body)
            self._check_sizes(request)
            rows = rank_request_rows(request, self.artifact.encoder.schema)
            top = self._top_behaviours(request)
        except Refused as exc:
            return exc.status, {"error": str(exc)}
        except RequestError as exc:
            return HTTPStatus.BAD_REQUEST, {"error": str(exc)}
        encoded = self.artifact.encode(rows)
        outputs = self.batcher.submit(encoded.inputs)  # [B, 1 (+ L)]: the logit, then each behaviour's weight
        self.metrics.record_rows(rows.size, encoded.oov)
        oov = {name: count for name, count in encoded.oov.items() if count}
        behaviours = None
        if top:
            kept = encoded.inputs.hist_len.expand(rows.size)  # [B]: one context
            sent = torch.full_like(kept, len(request.get(HISTORY) or []))
            behaviours = top_behaviours(outputs[:, 1:], kept, sent, top)
        return HTTPStatus.OK, self._ranking_json(request, torch.sigmoid(outputs[:, 0]), oov, behaviours)

    def _model_outputs(self, inputs: ProgramInputs) -> torch.Tensor:
        """[B, 1 + L] logits then attention weights ([B, 1] for an artifact without them): one tensor, so that the
        micro-batcher slices and joins rows of both alike. Encoded requests only: ids in range, no check."""
        logits, attention = self.artifact.outputs(inputs, check=False)
        return logits[:, None] if attention is None else torch.cat([logits[:, None], attention], dim=1)

    def _top_behaviours(self, request: dict[str, Any]) -> int:
        value = request.get(TOP_BEHAVIOURS, 0)
        if type(value) is not int or value < 0:
            raise RequestError(f"{TOP_BEHAVIOURS}: expected an int ≥ 0, got {value!r}")
        missing = self.artifact.without_attention() if value else None
        if missing:
            raise RequestError(f"{TOP_BEHAVIOURS}: {missing}")
        return value

    def _ranking_json(self, request: dict[str, Any], scores: torch.Tensor, oov: dict[str, int],
                      behaviours: list[list[tuple[int, float]]] | None) -> bytes:
        """`{"scenario", "items" (score descending), "oov"}` as JSON text. orjson, not json: encoding holds the
        interpreter lock throughout, and other requests wait (10,000 items: json ~8 ms, orjson ~0.4 ms)."""
        schema = self.artifact.encoder.schema
        fallback = request.get("context", {}).get(schema.item_field)
        candidates = request["candidates"]
        order = np.argsort(-scores.numpy(), kind="stable").tolist()  # ties keep request order
        values = scores.tolist()
        items = [{"index": i, "item_id": candidates[i].get(schema.item_field, fallback), "score": values[i]}
                 for i in order]
        if behaviours is not None:
            history = request.get(HISTORY) or []
            described = [{"index": j, "item_id": history[j].get(schema.item_field),
                          "scenario": history[j][schema.scenario_field]} for j in range(len(history))]
            for item in items:
                item["behaviours"] = [dict(described[j], weight=w) for j, w in behaviours[item["index"]]]
        return orjson.dumps({"scenario": request["scenario"], "items": items, "oov": oov})

    def _parse(self, body: bytes) -> Any:
        """The JSON value of a body, or 400: nesting is measured before parsing (a parser recurses per level)."""
        limit = self.config.max_json_depth
        depth = json_depth(body)
        if depth > limit:
            raise Refused(HTTPStatus.BAD_REQUEST,
                          f"request body: JSON nested {depth} deep, the limit is {limit} (--max_json_depth)")
        try:  # orjson: parsing holds the interpreter lock throughout (10,000 candidates: json ~5 ms, orjson ~2 ms)
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:  # decode errors, bad encodings, NaN, ints beyond 64 bits
            raise Refused(HTTPStatus.BAD_REQUEST, f"request body: invalid JSON ({exc})") from None

    def _check_sizes(self, request: Any) -> None:
        """413 for more candidates or behaviours than the limits (the rest of the schema is checked after)."""
        if not isinstance(request, dict):
            return
        for field, limit, flag in (("candidates", self.config.max_candidates, "--max_candidates"),
                                   (HISTORY, self.config.max_history, "--max_history")):
            value = request.get(field)
            if isinstance(value, list) and len(value) > limit:
                raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                              f"{field}: {len(value)} entries, the limit is {limit} ({flag})")

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "uptime_s": round(time.time() - self.started, 3), **self.artifact.info()}

    def close(self) -> None:
        self.batcher.close()


_BRACKET_STEP = np.zeros(256, dtype=np.int8)  # byte → +1 opens a level, −1 closes one
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1


def json_depth(body: bytes) -> int:
    """Deepest nesting of `[`/`{` outside strings, in linear time and without recursion (a few ms per MB).

    Escapes are made neutral first (`\\\\` pairs, then `\\"`), so every quote left opens or closes a string.
    """
    plain = body.replace(b"\\\\", b"__").replace(b'\\"', b"__")
    codes = np.frombuffer(plain, dtype=np.uint8)
    inside = np.bitwise_xor.accumulate((codes == ord('"')).view(np.uint8)).view(bool)  # in a string (or its quote)
    steps = _BRACKET_STEP[codes]
    steps[inside] = 0
    return int(np.cumsum(steps[steps != 0], dtype=np.int64).max(initial=0))


class _ClientGone(Exception):
    """The client closed the connection before its request was read."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse one connection
    disable_nagle_algorithm = True  # headers and body are two writes: Nagle + delayed ACK would add 40 ms
    default_request_version = "HTTP/1.0"  # until a request line parses: its error answer gets a status line (0.9 none)
    server: _Server

    def setup(self) -> None:
        self.timeout = self.server.service.config.read_timeout_s  # applied to the socket by StreamRequestHandler
        super().setup()

    def __getattr__(self, name: str) -> Any:
        """Every `do_<METHOD>` is the router, so a method no route takes is a JSON 405 (the base class: HTML 501)."""
        if name.startswith("do_"):
            return lambda: self._dispatch(name[3:])
        raise AttributeError(name)

    def _dispatch(self, method: str) -> None:
        start = time.perf_counter()
        service = self.server.service
        path = self.path.split("?", 1)[0]
        self._body_read = False
        try:
            status, payload = self._answer(method, path)
        except _ClientGone:
            self._client_gone(f"{method} {path}: body cut short")
            return
        except Exception as exc:  # a bug, not the client's fault: answer 500 and keep serving
            log.exception("request %s %s failed", method, path)
            status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {type(exc).__name__}"}
        headers = {"Allow": ROUTES[path]} if status == HTTPStatus.METHOD_NOT_ALLOWED else {}
        if path == "/metrics":
            headers["Vary"] = "Accept"  # JSON or the Prometheus text format, by Accept
        try:
            self._reply(status, payload, headers)
        except (ConnectionError, TimeoutError) as exc:
            self._client_gone(f"{method} {path}: {type(exc).__name__} while answering")
            return
        if path not in METRICS_PATHS:
            service.metrics.record_request(int(status), time.perf_counter() - start)

    def _answer(self, method: str, path: str) -> tuple[int, dict[str, Any] | bytes | Text]:
        service = self.server.service
        if path not in ROUTES:
            return HTTPStatus.NOT_FOUND, {"error": f"{path}: not found; routes are {sorted(ROUTES)}"}
        if ROUTES[path] != method:
            return HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{path} takes {ROUTES[path]}, not {method}"}
        if path == "/health":
            return HTTPStatus.OK, service.health()
        if path == "/metrics/prometheus" or (path == "/metrics" and wants_prometheus(self.headers.get("Accept"))):
            return HTTPStatus.OK, Text(*service.metrics.exposition(self.headers.get("Accept")))
        if path == "/metrics":
            return HTTPStatus.OK, service.metrics.snapshot()
        body = self._body(service.config.max_body_bytes)
        return body if isinstance(body, tuple) else service.rank(body)

    def _body(self, limit: int) -> bytes | tuple[int, dict[str, Any]]:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            return HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length: required (a JSON body)"}
        if int(length) > limit:
            return HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {
                "error": f"request body: {int(length)} bytes, the limit is {limit} (--max_body_bytes)"
            }
        try:
            body = self.rfile.read(int(length))
        except TimeoutError:
            return HTTPStatus.REQUEST_TIMEOUT, {
                "error": f"request body: not received within {self.timeout} s (--read_timeout_s)"
            }
        except ConnectionError as exc:
            raise _ClientGone from exc
        if len(body) < int(length):
            raise _ClientGone
        self._body_read = True
        return body

    def _reply(self, status: int, payload: dict[str, Any] | bytes | Text, headers: dict[str, str],
               close: bool = False) -> None:
        if isinstance(payload, Text):
            data, content_type = payload
        else:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            content_type = "application/json"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        if close or self._body_unread():  # an unread body would be taken for the next request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":  # a HEAD answer has headers only
            self.wfile.write(data)

    def _body_unread(self) -> bool:
        declared = self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers
        return declared and not self._body_read

    def _client_gone(self, what: str) -> None:
        self.close_connection = True
        self.server.service.metrics.record_disconnect()
        log.info("%s: client disconnected (%s)", self.address_string(), what)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol errors found by the base class (bad request line, long headers...) as JSON too, then close."""
        self.log_error("code %d, message %s", code, message)
        self._reply(code, {"error": message or HTTPStatus(code).phrase}, {}, close=True)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # listen backlog: the default 5 resets connections under a burst of clients

    def __init__(self, config: ServeConfig, service: RankingService) -> None:
        self.service = service
        self._slots = threading.BoundedSemaphore(config.max_connections)
        super().__init__((config.host, config.port), _Handler)

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """A thread per connection while fewer than `max_connections` are open; beyond, 503 and close at once."""
        if not self._slots.acquire(blocking=False):
            self.service.metrics.record_refused()
            _answer_busy(request, self.service.config.max_connections)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A dropped or stalled connection is counted, not printed; anything else is logged with its traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            self.service.metrics.record_disconnect()
            log.info("%s: client disconnected (%s)", client_address[0], type(error).__name__)
        else:
            log.exception("connection from %s failed", client_address[0])


def _answer_busy(connection: socket.socket, limit: int) -> None:
    """One non-blocking write of a 503 from the accepting thread: it must never wait on a client."""
    body = json.dumps({"error": f"server busy: {limit} connections open, the limit (--max_connections); "
                                "retry later"}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Retry-After: 1\r\nConnection: close\r\n\r\n").encode()
    try:
        connection.setblocking(False)
        connection.send(head + body)
    except OSError:
        pass  # gone already, or its buffer is full: closing is answer enough


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
    def unauthenticated_warning(self) -> str | None:
        """What to tell whoever starts a server reachable beyond this machine: it has no authentication."""
        host = self.address[0]
        if ipaddress.ip_address(host).is_loopback:
            return None
        return (f"warning: listening on {host}, not loopback only: this service has no authentication; anyone who "
                "can reach the port can use it")

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> RankingServer:
        self._thread = threading.Thread(target=self._http.serve_forever, name="msit-rec-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve until SIGINT or SIGTERM, then finish the queued model calls and close the socket. The process is a
        server meanwhile: its threads hand over the interpreter lock every `SWITCH_INTERVAL_S`."""
        def stop(signum: int, frame: object) -> None:
            threading.Thread(target=self._http.shutdown, daemon=True).start()  # shutdown() waits for the loop

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        try:
            self._http.serve_forever()
        finally:
            sys.setswitchinterval(switch_interval)
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
