"""/rank request bodies built from the decoded test split (`decoded`, tests/conftest.py), and one HTTP call."""

from __future__ import annotations

import http.client
import json
from typing import Any

UNKNOWN_ID = 10**12  # larger than any raw id of the synthetic data: a raw id no vocabulary holds


def rank_body(decoded: dict, row: int, candidates: int) -> dict[str, Any]:
    record = decoded["records"][row]
    items = ("item_id", "item_cat", "brand", "price_bucket", "price")
    others = decoded["records"][row + 1 : row + 1 + candidates]
    return {
        "scenario": record["scenario"],
        "context": {k: v for k, v in record.items() if k not in items and k not in ("scenario", "history")},
        "history": [{"item_id": 5, "item_cat": 3, "scenario": s} for s in ("home", "new")] + [dict(b) for b in record["history"]],
        "candidates": [{k: r[k] for k in items} for r in others],
    }


def call(server, method: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, dict]:
    host, port = server.address
    connection = http.client.HTTPConnection(host, port, timeout=60)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    connection.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
    response = connection.getresponse()
    payload = json.loads(response.read())
    connection.close()
    return response.status, payload
