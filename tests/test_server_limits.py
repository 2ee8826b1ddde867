"""The HTTP service against clients that could stall it: large, deep, malformed or stalled requests, odd methods,
early disconnects, too many connections; and the chunked model calls that keep small requests fast beside a large one.

Every test talks real HTTP (or raw sockets) to a server on loopback, built on the tiny artifact of tests/conftest.py.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from msit_rec.serving.batcher import MicroBatcher
from msit_rec.serving.program_inputs import ProgramInputs
from msit_rec.serving.request import rank_request_rows
from msit_rec.serving.server import RankingServer, ServeConfig, json_depth
from tests.launch import launch_env_restored
from tests.rank_requests import call, rank_body

REPO = Path(__file__).resolve().parents[1]
LARGE = 10_000  # candidates of the large request: the default --max_candidates


@pytest.fixture
def serve(artifact) -> Iterator[Any]:
    """`serve(model=None, **config)` starts a server (of the tiny artifact unless `model`) on a free loopback port;
    all are shut down after the test."""
    started: list[RankingServer] = []

    def start(model: Any = None, **config: Any) -> RankingServer:
        started.append(RankingServer(model or artifact, ServeConfig(port=0, **config)).start())
        return started[-1]

    yield start
    for server in started:
        server.shutdown()


def large_body(decoded: dict, candidates: int) -> dict[str, Any]:
    """One user, `candidates` candidates (the test split's items, repeated)."""
    body = rank_body(decoded, 0, 1)
    items = [rank_body(decoded, row, 1)["candidates"][0] for row in range(200)]
    body["candidates"] = [dict(items[i % len(items)], price=float(i % 97)) for i in range(candidates)]
    return body


def post(connection: http.client.HTTPConnection, body: bytes) -> tuple[int, dict]:
    connection.request("POST", "/rank", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def metrics(server: RankingServer) -> dict[str, Any]:
    return call(server, "GET", "/metrics")[1]


def wait_for(condition: Any, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


# ---- limits -----------------------------------------------------------------------------------------------------


def test_limits_answer_4xx_naming_the_flag(decoded: dict, serve) -> None:
    server = serve(max_candidates=50, max_history=4, max_json_depth=8)
    status, payload = call(server, "POST", "/rank", large_body(decoded, 51))
    assert status == 413 and payload["error"] == "candidates: 51 entries, the limit is 50 (--max_candidates)"
    assert call(server, "POST", "/rank", large_body(decoded, 50))[0] == 200
    body = rank_body(decoded, 3, 2)
    body["history"] = body["history"][:1] * 5
    status, payload = call(server, "POST", "/rank", body)
    assert status == 413 and payload["error"] == "history: 5 entries, the limit is 4 (--max_history)"
    body["context"]["extra"] = [[[[[[[[]]]]]]]]  # 10 levels with the body and context objects
    status, payload = call(server, "POST", "/rank", body)
    assert status == 400 and payload["error"] == "request body: JSON nested 10 deep, the limit is 8 (--max_json_depth)"


def test_the_default_limits_refuse_what_stalled_the_service(decoded: dict, serve) -> None:
    server = serve()
    status, payload = call(server, "POST", "/rank", large_body(decoded, LARGE + 1))
    assert status == 413 and "(--max_candidates)" in payload["error"]
    body = rank_body(decoded, 3, 2)
    body["history"] = body["history"][:1] * 1001
    assert call(server, "POST", "/rank", body)[0] == 413
    status, payload = call(server, "POST", "/rank", raw=b"[" * 100_000 + b"]" * 100_000)  # was a RecursionError: 500
    assert status == 400 and "(--max_json_depth)" in payload["error"]


MALFORMED = [
    b"{not json", b"", b"\xff\xfe\x00", b'{"a": "\xff"}', b"[" * 64 + b"]" * 63, b'{"a": 1}}', b"1" * 5000,
    b'{"candidates": ' + b"9" * 5000 + b"}", b"NaN", b'"\\ud800"', b"\x00" * 10, b'{"a": [1, 2,]}', b"null",
    b'{"scenario": {"$ref": ' + b"[" * 60 + b"]" * 60 + b"}}",
]


def test_malformed_json_of_any_shape_is_400(serve) -> None:
    server = serve()
    for raw in MALFORMED:
        status, payload = call(server, "POST", "/rank", raw=raw)
        assert status == 400, (raw[:40], payload)
    assert metrics(server)["responses_by_status"] == {"400": len(MALFORMED)}


def test_json_depth_counts_brackets_outside_strings() -> None:
    cases = {b"": 0, b"1": 0, b"[]": 1, b'{"a": [{"b": []}]}': 4, b'["[[[", "\\"[["]': 1, b'["\\\\", [[]]]': 3,
             b'{"\\\\\\"{": [1]}': 2, b'"[' + b"\\" * 7 + b'"[[[' + b'"': 0, b"[" * 100_000: 100_000}
    for text, depth in cases.items():
        assert json_depth(text) == depth, text
    rng = np.random.default_rng(0)
    for _ in range(300):  # against json.loads: the deepest value of random documents with escape-heavy strings
        value = nested(rng, 0)
        assert json_depth(json.dumps(value).encode()) == depth_of(value)


def nested(rng: np.random.Generator, depth: int) -> Any:
    kind = rng.integers(0, 3) if depth < 8 else 0
    if kind == 0:
        return str(rng.choice(['a"[', "\\", '\\"{', "]]", 'x\\\\"', "", "ü"]))
    children = [nested(rng, depth + 1) for _ in range(rng.integers(0, 4))]
    return children if kind == 1 else {str(rng.choice(['k"[', "\\"])) + str(i): c for i, c in enumerate(children)}


def depth_of(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth_of, value.values()), default=0)
    return 0


# ---- methods, disconnects, connections ---------------------------------------------------------------------------


def test_every_other_method_is_a_json_405_with_allow(serve) -> None:
    server = serve()
    connection = http.client.HTTPConnection(*server.address, timeout=30)
    for method, path, allow in (("PATCH", "/rank", "POST"), ("OPTIONS", "/rank", "POST"), ("PUT", "/health", "GET"),
                                ("DELETE", "/metrics", "GET"), ("BREW", "/rank", "POST"), ("GET", "/rank", "POST")):
        connection.request(method, path, body=b'{"x": 1}')
        response = connection.getresponse()
        payload = json.loads(response.read())
        assert response.status == 405 and response.getheader("Allow") == allow, method
        assert response.getheader("Content-Type") == "application/json"
        assert payload["error"] == f"{path} takes {allow}, not {method}"
        connection.close()  # the body was not read: the server closes, the client reconnects
    connection.request("HEAD", "/health")
    response = connection.getresponse()
    assert response.status == 405 and response.getheader("Allow") == "GET" and response.read() == b""
    connection.request("GET", "/health")  # the same keep-alive connection: the HEAD answer had no body
    assert connection.getresponse().status == 200
    connection.close()
    with socket.create_connection(server.address, timeout=30) as raw:  # a request line the base class refuses
        raw.sendall(b"GET /health HTTP/1.1 extra\r\n\r\n")
        head, _, body = receive_all(raw).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and json.loads(body)["error"].startswith("Bad request")


def receive_all(connection: socket.socket) -> bytes:
    chunks = []
    while chunk := connection.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_client_that_leaves_early_is_counted_not_a_traceback(decoded: dict, serve, capfd, caplog) -> None:
    server = serve(max_batch_rows=256)
    data = json.dumps(large_body(decoded, LARGE)).encode()
    caplog.set_level(logging.INFO, logger="msit_rec.serve")
    for cut in (len(data), len(data) // 2):  # left before the answer; left in the middle of the body
        connection = socket.create_connection(server.address, timeout=30)
        connection.sendall(f"POST /rank HTTP/1.1\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data[:cut])
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
        connection.close()
    assert wait_for(lambda: metrics(server)["disconnects"] == 2), metrics(server)
    assert call(server, "GET", "/health")[0] == 200
    assert "Traceback" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
    assert sum("client disconnected" in r.getMessage() for r in caplog.records) == 2


def test_stalled_connections_time_out_and_the_cap_answers_503(serve) -> None:
    server = serve(read_timeout_s=1.0, max_connections=4)
    stalled = [socket.create_connection(server.address, timeout=10) for _ in range(4)]
    stalled[0].sendall(b"POST /rank HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")  # a body that stops coming
    stalled[1].sendall(b"GET /health HTTP/1.1\r\n")  # headers that stop coming
    with socket.create_connection(server.address, timeout=10) as extra:  # accepted after the four: no slot
        head, _, body = receive_all(extra).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and "(--max_connections)" in json.loads(body)["error"]
    start = time.monotonic()
    answers = [receive_all(connection) for connection in stalled]  # each ends when the server closes it
    assert time.monotonic() - start < 5
    assert answers[0].startswith(b"HTTP/1.1 408") and answers[1:] == [b"", b"", b""]
    for connection in stalled:
        connection.close()
    assert wait_for(lambda: call(server, "GET", "/health")[0] == 200)  # the slots are free again
    assert metrics(server)["connections_refused"] == 1


def test_binding_beyond_loopback_warns_that_there_is_no_authentication(exported: dict, artifact, monkeypatch,
                                                                       capsys) -> None:
    from msit_rec.cli import main

    local = RankingServer(artifact, ServeConfig(port=0)).start()
    everywhere = RankingServer(artifact, ServeConfig(host="0.0.0.0", port=0)).start()
    try:
        assert local.unauthenticated_warning is None
        assert "no authentication" in everywhere.unauthenticated_warning
    finally:
        local.shutdown()
        everywhere.shutdown()
    monkeypatch.setattr(RankingServer, "serve_forever", RankingServer._close)  # bind, print, return
    for host, warned in (("0.0.0.0", True), ("127.0.0.1", False)):
        assert main(["serve", "--artifact", str(exported["artifact"]), "--host", host, "--port", "0",
                     "--backend", "export", "--quiet"]) == 0
        err = capsys.readouterr().err
        assert ("no authentication" in err) is warned, err


# ---- chunked model calls -----------------------------------------------------------------------------------------


def per_row_value(inputs: ProgramInputs) -> torch.Tensor:
    """A stand-in model: a number per row from its own columns and its context's (any mix-up changes it)."""
    context = inputs.context
    return (inputs.sparse.sum(1) * 1000 + inputs.history[context].sum((1, 2)) * 10 + inputs.hist_len[context]
            + inputs.scenario[context] * 7 + inputs.dense.sum(1)).double()


def fake_inputs(rows: int, contexts: int, seed: int) -> ProgramInputs:
    generator = torch.Generator().manual_seed(seed)
    return ProgramInputs(
        sparse=torch.randint(0, 100, (rows, 3), generator=generator),
        history=torch.randint(0, 100, (contexts, 2, 4), generator=generator),
        hist_len=torch.randint(0, 5, (contexts,), generator=generator),
        scenario=torch.randint(0, 3, (contexts,), generator=generator),
        dense=torch.rand(rows, 2, generator=generator),
        context=torch.zeros(rows, dtype=torch.int64) if contexts == 1 else torch.arange(rows),
    )


def test_a_small_request_waits_for_at_most_one_chunk_of_a_large_one() -> None:
    calls: list[list[int]] = []  # rows of each call, by job: the stand-in model tags the rows with their job
    first_call, release = threading.Event(), threading.Event()

    def run(inputs: ProgramInputs) -> torch.Tensor:
        calls.append(inputs.dense[:, 0].long().tolist())
        first_call.set()
        release.wait()
        return per_row_value(inputs)

    batcher = MicroBatcher(run, max_rows=100)
    large, shared, small = fake_inputs(1000, 1, 0), fake_inputs(250, 250, 1), fake_inputs(1, 1, 2)
    for tag, inputs in enumerate((large, shared, small)):
        inputs.dense[:, 0] = tag
    results: dict[str, torch.Tensor] = {}

    def submit(name: str, inputs: ProgramInputs) -> None:
        results[name] = batcher.submit(inputs)

    threads = [threading.Thread(target=submit, args=("large", large))]
    threads[0].start()
    first_call.wait()  # the large request's first chunk is being scored: the others arrive now
    for name, inputs in (("shared", shared), ("small", small)):
        threads.append(threading.Thread(target=submit, args=(name, inputs)))
        threads[-1].start()
    time.sleep(0.2)
    release.set()
    for thread in threads:
        thread.join()
    batcher.close()
    assert calls[0] == [0] * 100 and calls[1].count(2) == 1, calls[:3]  # the small one rode the very next call
    assert calls[1].count(1) == 99 and 0 not in calls[1]  # the new arrivals first: the large one's rows wait a call
    assert (calls[2].count(1), calls[2].count(0)) == (50, 50)  # then all share again
    assert all(len(call) <= 100 for call in calls) and sum(map(len, calls)) == 1251
    for name, inputs in (("large", large), ("shared", shared), ("small", small)):  # chunks joined = scored whole
        assert torch.equal(results[name], per_row_value(inputs)), name


def test_a_stream_of_new_requests_does_not_starve_a_large_one() -> None:
    """New requests are scored first, but every other call serves the started ones too."""
    calls: list[list[int]] = []
    arrivals: list[threading.Thread] = []

    def run(inputs: ProgramInputs) -> torch.Tensor:
        calls.append(inputs.dense[:, 0].long().tolist())
        if len(calls) <= 6:  # a new 1-row request arrives during each of the first six calls
            queued = batcher._queue.qsize()
            arrivals.append(threading.Thread(target=batcher.submit, args=(fake_inputs(1, 1, len(calls)),)))
            arrivals[-1].start()
            while batcher._queue.qsize() == queued:
                time.sleep(0.001)
        return per_row_value(inputs)

    batcher = MicroBatcher(run, max_rows=100)
    large = fake_inputs(1000, 1, 0)
    large.dense[:, 0] = 7
    logits = batcher.submit(large)
    for thread in arrivals:
        thread.join()
    batcher.close()
    assert torch.equal(logits, per_row_value(large))
    served = [7 in call for call in calls[:7]]
    assert served == [True, False, True, False, True, False, True], calls[:7]  # new ones cut in, every other call


def test_a_large_request_is_scored_in_chunks_with_the_direct_scores(decoded: dict, artifact, serve) -> None:
    server = serve(max_batch_rows=512)
    body = large_body(decoded, LARGE)
    calls_before = metrics(server)["model_calls"]
    status, payload = call(server, "POST", "/rank", body)
    assert status == 200
    assert metrics(server)["model_calls"] - calls_before == -(-LARGE // 512)
    direct = artifact.scores(artifact.encode(rank_request_rows(body, artifact.encoder.schema)).inputs)  # one call
    got = torch.tensor([item["score"] for item in sorted(payload["items"], key=lambda item: item["index"])],
                       dtype=torch.float64)
    torch.testing.assert_close(got, direct.double(), rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def reference_artifact(decoded: dict, tmp_path_factory: pytest.TempPathFactory, slow_setup: None) -> Path:
    """The reference-size model (attention 64-32, tower 512-256) trained for a few steps, exported: its cost grows
    with the rows as a real model's does (the tiny artifact scores 10,000 rows in ~10 ms, less than parsing them)."""
    from msit_rec.export import export_run
    from msit_rec.train.fit import fit
    from tests.training_worker import tiny_fit_config

    config = tiny_fit_config("msit")
    config.model.attention_hidden, config.model.tower_hidden = [64, 32], [512, 256]
    config.trainer.limit_train_batches = 2
    root = tmp_path_factory.mktemp("reference")
    with launch_env_restored():
        fit(config, decoded["root"], root / "run")
    export_run(root / "run", root / "artifact", parity_gate=False, progress=False)
    return root / "artifact"


@contextmanager
def serve_process(artifact: Path, *flags: str) -> Iterator[tuple[str, int]]:
    """`msit-rec serve` in its own process, as deployed: the test's clients do not share its interpreter lock."""
    process = subprocess.Popen(
        [sys.executable, "-m", "msit_rec.cli", "serve", "--artifact", str(artifact), "--port", "0", *flags],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = process.stdout.readline()  # "serving ARTIFACT (backend) on http://HOST:PORT — ..."
        url = re.search(r"http://([\d.]+):(\d+)", line)
        assert url is not None, f"serve did not start: {line!r}"
        yield url.group(1), int(url.group(2))
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow
def test_small_requests_stay_fast_beside_a_large_one(decoded: dict, reference_artifact: Path) -> None:
    """p99 of 1-candidate requests beside a streaming 10,000-candidate one < 10× their idle p99 (was ~20-50×: each
    waited for the whole large call; 11-14× with a chunk of the large one ahead of it in every call), against
    `msit-rec serve --threads 1` in its own process. Best of three rounds, idle and beside measured back to back: a
    busy machine inflates one round's tail, a head-of-line block all."""
    small = json.dumps(rank_body(decoded, 5, 1)).encode()
    large = json.dumps(large_body(decoded, LARGE)).encode()
    with serve_process(reference_artifact, "--threads", "1", "--backend", "export", "--quiet") as address:
        connection = http.client.HTTPConnection(*address, timeout=60)
        latencies(connection, small, 20)  # warm-up
        rounds = []
        for _ in range(3):
            idle = latencies(connection, small, 300)
            with streaming(address, large):
                beside = latencies(connection, small, 300)
            rounds.append((np.percentile(idle, 99) * 1e3, np.percentile(beside, 99) * 1e3))
            if rounds[-1][1] < 10 * rounds[-1][0]:
                break
        connection.close()
    print("p99 idle vs beside, ms:", rounds)
    assert rounds[-1][1] < 10 * rounds[-1][0], "p99 idle vs beside, ms: " + ", ".join(f"{a:.1f} vs {b:.1f}"
                                                                                   for a, b in rounds)


@contextmanager
def streaming(address: tuple[str, int], body: bytes) -> Iterator[None]:
    """Send `body` back to back on its own connection while the block runs (at least one request in flight)."""
    busy, stop = threading.Event(), threading.Event()

    def send() -> None:  # answers read, not parsed: this process is the server's too
        connection = http.client.HTTPConnection(*address, timeout=60)
        while not stop.is_set():
            connection.request("POST", "/rank", body=body)
            busy.set()
            response = connection.getresponse()
            assert response.status == 200 and response.read()
        connection.close()

    sender = threading.Thread(target=send)
    sender.start()
    assert busy.wait(timeout=60)
    try:
        yield
    finally:
        stop.set()
        sender.join()


def latencies(connection: http.client.HTTPConnection, body: bytes, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        assert post(connection, body)[0] == 200
        samples.append(time.perf_counter() - start)
    return samples
