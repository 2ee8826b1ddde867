"""Serving metrics in the Prometheus text format: `GET /metrics/prometheus`, and `GET /metrics` when a scraper's
Accept header asks for it. The oracle is what the test sent and what the server answered, read back through
prometheus_client's own parsers."""

from __future__ import annotations

import http.client
import json
import time
from collections import Counter
from typing import Any

import prometheus_client
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from msit_rec.serving.server_metrics import ServerMetrics, wants_prometheus
from tests.rank_requests import UNKNOWN_ID, call, rank_body

# What Prometheus 2.x sends when it scrapes (3.x sends the same media types, with escaping parameters)
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


@pytest.fixture
def server(artifact):
    """A fresh server: its counts are this test's requests only."""
    from msit_rec.serving.server import RankingServer, ServeConfig

    running = RankingServer(artifact, ServeConfig(port=0)).start()
    yield running
    running.shutdown()


def get(server, path: str, accept: str | None = None) -> tuple[int, dict[str, str], str]:
    connection = http.client.HTTPConnection(*server.address, timeout=60)
    connection.request("GET", path, headers={"Accept": accept} if accept is not None else {})
    response = connection.getresponse()
    body = response.read().decode()
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body


def samples(text: str, parse: Any = text_string_to_metric_families) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of every sample in a scrape."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in parse(text) for s in family.samples}


def test_prometheus_scrape_counts_the_requests_sent(decoded: dict, artifact, server) -> None:
    candidates = (4, 7, 2)
    statuses: Counter = Counter()
    oov: Counter = Counter()
    for i, count in enumerate(candidates):
        body = rank_body(decoded, 20 + 10 * i, count)
        if i == 0:
            body["context"]["user_id"] = UNKNOWN_ID
        status, payload = call(server, "POST", "/rank", body)
        assert status == 200 and len(payload["items"]) == count, payload
        statuses[status] += 1
        oov.update(payload["oov"])
    bad = rank_body(decoded, 5, 3)
    del bad["scenario"]
    status, _ = call(server, "POST", "/rank", bad)
    assert status == 400
    statuses[status] += 1
    assert oov["user"] == 1

    latency = "msit_rec_request_duration_seconds"
    # a request is counted after its answer is written: the client can read the answer first, so wait for the count
    deadline = time.monotonic() + 10.0
    while True:
        status, headers, text = get(server, "/metrics/prometheus")
        got = samples(text)
        counted = sum(v for (name, _), v in got.items() if name == f"{latency}_count")
        if counted >= sum(statuses.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    for code, sent in statuses.items():
        labels = (("status", str(code)),)
        assert got[(f"{latency}_count", labels)] == sent
        assert got[(f"{latency}_bucket", (("le", "+Inf"), *labels))] == sent
        assert got[(f"{latency}_sum", labels)] > 0
    assert {dict(labels)["status"] for name, labels in got if name == f"{latency}_count"} == {"200", "400"}
    assert got[("msit_rec_rows_scored_total", ())] == sum(candidates)
    for feature, count in oov.items():
        assert got[("msit_rec_oov_ids_total", (("feature", feature),))] == count
    # sequential small requests: one model call each, each serving one request
    assert got[("msit_rec_model_call_requests_count", ())] == len(candidates)
    assert got[("msit_rec_model_call_requests_sum", ())] == len(candidates)
    assert got[("msit_rec_disconnects_total", ())] == 0 and got[("msit_rec_connections_refused_total", ())] == 0
    (info,) = [dict(labels) for name, labels in got if name == "msit_rec_artifact_info"]
    assert info["variant"] == artifact.manifest.model.variant
    assert info["artifact_version"] == str(artifact.manifest.artifact_version)

    # scrapes are not requests; the JSON snapshot counts the same requests
    assert samples(get(server, "/metrics/prometheus")[2])[(f"{latency}_count", (("status", "200"),))] == 3
    snapshot = call(server, "GET", "/metrics")[1]
    assert snapshot["responses_by_status"] == {str(k): v for k, v in statuses.items()}
    assert snapshot["rows_scored"] == sum(candidates)


def test_metrics_answers_a_scraper_in_the_prometheus_format_and_others_in_json(decoded: dict, server) -> None:
    assert call(server, "POST", "/rank", rank_body(decoded, 30, 5))[0] == 200
    for accept, kind in ((None, "json"), ("*/*", "json"), ("application/json", "json"),
                         ("text/html,application/xhtml+xml,*/*;q=0.8", "json"), ("text/plain;version=0.0.4", "text"),
                         (PROMETHEUS_ACCEPT, "openmetrics")):
        status, headers, text = get(server, "/metrics", accept)
        assert status == 200 and headers["vary"] == "Accept", accept
        if kind == "json":
            assert headers["content-type"] == "application/json" and json.loads(text)["rows_scored"] == 5, accept
            continue
        if kind == "text":
            assert headers["content-type"].startswith("text/plain; version=0.0.4"), accept
            got = samples(text)
        else:
            assert headers["content-type"].startswith("application/openmetrics-text; version=1.0.0"), accept
            assert text.endswith("# EOF\n")
            got = samples(text, parse_openmetrics)
        assert got[("msit_rec_rows_scored_total", ())] == 5, accept
        assert got[("msit_rec_request_duration_seconds_count", (("status", "200"),))] == 1, accept
    # the explicit path is the Prometheus format whatever the Accept header (OpenMetrics when asked for)
    assert get(server, "/metrics/prometheus", "application/json")[1]["content-type"].startswith("text/plain; version=")
    assert get(server, "/metrics/prometheus", PROMETHEUS_ACCEPT)[1]["content-type"].startswith(
        "application/openmetrics-text")


@pytest.mark.parametrize("accept,expected", [
    (None, False), ("", False), ("*/*", False), ("application/json, text/plain, */*", False),
    ("text/plain; version=0.0.4", True), ("TEXT/PLAIN;VERSION=1.0.0;escaping=allow-utf-8", True),
    ("application/json;q=0.9, application/openmetrics-text", True),
])
def test_wants_prometheus_reads_the_accept_header(accept: str | None, expected: bool) -> None:
    assert wants_prometheus(accept) is expected


def test_each_server_has_its_own_registry() -> None:
    one, other = ServerMetrics({"variant": "msit"}), ServerMetrics()
    one.record_request(200, 0.002)
    one.record_rows(10, Counter(item=2))
    one.record_batch(1, 10)
    one.record_disconnect()
    one.record_refused()
    got = samples(one.exposition(None)[0].decode())
    assert got[("msit_rec_request_duration_seconds_bucket", (("le", "0.0025"), ("status", "200")))] == 1
    assert got[("msit_rec_request_duration_seconds_bucket", (("le", "0.001"), ("status", "200")))] == 0
    assert got[("msit_rec_rows_scored_total", ())] == 10 and got[("msit_rec_oov_ids_total", (("feature", "item"),))] == 2
    assert got[("msit_rec_disconnects_total", ())] == 1 and got[("msit_rec_connections_refused_total", ())] == 1
    untouched = samples(other.exposition(None)[0].decode())
    assert untouched[("msit_rec_rows_scored_total", ())] == 0
    assert not any(name.startswith("msit_rec_artifact") for name, _ in untouched)
    assert not any(m.name.startswith("msit_rec") for m in prometheus_client.REGISTRY.collect())  # not the global one
