"""Serving: raw requests → encoded inputs → artifact scores, `predict`, and the HTTP service on loopback.

Oracles: `prepare`'s own encoded test split (decoded back to raw values through the vocabulary files, then encoded
again: every id, history slot and length must come back), Polars' encoders of `pipelines.encode` for the cast and
hash rules, the eager RankingModel's logits on the same prepared rows, and a serial in-process scoring of each
HTTP request. The fresh-process test loads the artifact with torchrec, lightning and polars unimportable.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from msit_rec.data.spec import OOV_INDEX, FeatureSpec
from msit_rec.errors import ConfigError, DataError
from msit_rec.export.inputs import input_schema
from msit_rec.serving.contract import InputSchema
from msit_rec.serving.encoder import IdEncoder, RequestEncoder
from msit_rec.serving.program_inputs import ProgramInputs
from msit_rec.serving.request import RequestError, arrow_rows, rank_request_rows, record_rows
from msit_rec.serving.vocabulary import Vocabulary
from pipelines.config import CategoricalFeature
from pipelines.encode import apply_map, fit_encoder
from tests.rank_requests import UNKNOWN_ID, call, rank_body

REPO = Path(__file__).resolve().parents[1]


def test_int_and_text_vocabularies_cast_like_prepare(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cases = {
        "ints": (pl.Series(rng.integers(0, 50, 400)), [3, "7", "+7", "007", " 7", "1_0", "x", None, 10**30, 49, 51]),
        "texts": (pl.Series([f"v{i}" for i in rng.integers(0, 50, 400)] + ["12"]),
                  ["v3", "v49", "v77", None, 12, "12", ""]),
    }
    for name, (train, queries) in cases.items():
        encoder = fit_encoder(CategoricalFeature(name, name, min_count=2), train)
        encoder.vocabulary.write_parquet(tmp_path / f"{name}.parquet")
        vocabulary = Vocabulary.read(tmp_path / f"{name}.parquet")
        values = [q if not isinstance(q, int) or abs(q) < 2**63 else None for q in queries]  # Polars: no big ints
        polars_values = (pl.Series([None if v is None else str(v) for v in values]) if name == "texts"
                         else _mixed_as_polars(values))  # what prepare's non-strict cast makes of them
        expected = apply_map(polars_values, encoder.vocabulary, OOV_INDEX).to_list()
        got = vocabulary.encode(queries).tolist()
        assert got == expected, name
    ints = np.array([3, 7, 49, 51], dtype=np.int64)  # the array path (Parquet int columns) agrees with the list path
    assert Vocabulary.read(tmp_path / "ints.parquet").encode(ints).tolist() == \
        Vocabulary.read(tmp_path / "ints.parquet").encode(ints.tolist()).tolist()


def _mixed_as_polars(values: list) -> pl.Series:
    """What a raw int column plus text requests become under prepare's non-strict cast (texts parsed by Polars)."""
    parsed = [v if isinstance(v, int) or v is None else pl.Series([v]).cast(pl.Int64, strict=False)[0] for v in values]
    return pl.Series(parsed, dtype=pl.Int64)


def test_hash_encoding_matches_prepare() -> None:
    values = [5, 17, "5", "abc", None, "ü", -3, 2**40]
    feature = CategoricalFeature("h", "h", encoding="hash", buckets=97)
    encoder = fit_encoder(feature, pl.Series([], dtype=pl.String))
    spec = FeatureSpec("h", "sparse", "h", "h", encoder.cardinality, 8, "hash")
    got = IdEncoder(spec, None).encode(values).tolist()
    expected = encoder.encode(pl.Series([None if v is None else str(v) for v in values])).to_list()
    assert got == expected and got[0] == got[2] and got[4] == OOV_INDEX
    assert IdEncoder(spec, None).encode(np.array([5, 17])).tolist() == expected[:2]


# ---- the prepared test split, decoded back to raw requests (`decoded`: tests/conftest.py) ----------------------


def prepared_inputs(frame: pl.DataFrame, schema: InputSchema) -> dict[str, np.ndarray]:
    """The program inputs `prepare`'s examples stand for (history left-aligned, 0-padded)."""
    history = np.zeros((len(frame), len(schema.sequence), schema.max_len), dtype=np.int64)
    for h, name in enumerate(schema.sequence):
        for row, values in enumerate(frame[name].to_list()):
            history[row, h, : len(values)] = values
    return {
        "sparse": np.stack([frame[name].to_numpy() for name in schema.sparse], axis=1),
        "history": history,
        "hist_len": frame["hist_len"].to_numpy().astype(np.int64),
        "scenario": frame["scenario"].to_numpy().astype(np.int64),
        "dense": np.stack([frame[name].to_numpy() for name in schema.dense], axis=1) if schema.dense
        else np.zeros((len(frame), 0)),
    }


def test_encoder_reproduces_the_prepared_test_split(decoded: dict) -> None:
    meta, frame = decoded["meta"], decoded["frame"]
    schema = input_schema(meta)
    encoder = RequestEncoder(meta, schema, decoded["root"])
    encoded = encoder.encode(record_rows(decoded["records"], encoder.schema))
    expected = prepared_inputs(frame, schema)
    for name in ("sparse", "history", "hist_len", "scenario"):
        np.testing.assert_array_equal(getattr(encoded.inputs, name).numpy(), expected[name], err_msg=name)
    np.testing.assert_allclose(encoded.inputs.dense.numpy(), expected["dense"], rtol=1e-6, atol=1e-6)
    assert decoded["extended"], "no history was long enough to test truncation"
    oov_rows = {f.name: int((frame[f.name] == OOV_INDEX).sum()) for f in meta.features_of_kind("sparse")}
    assert {k: encoded.oov[k] for k in oov_rows} == oov_rows and oov_rows["user"] > 0 and oov_rows["item"] > 0
    kept = prepared_inputs(frame, schema)["history"][:, 0]  # hist_item of real slots only
    assert encoded.oov["hist_item"] == int(((kept == OOV_INDEX)).sum())


def test_arrow_rows_encode_like_json_rows(decoded: dict) -> None:
    meta = decoded["meta"]
    encoder = RequestEncoder(meta, input_schema(meta), decoded["root"])
    records = [dict(r, brand=None if r["brand"] is None else int(r["brand"])) for r in decoded["records"][:300]]
    table = pa.Table.from_pylist(records)
    from_json = encoder.encode(record_rows(records, encoder.schema)).inputs
    from_arrow = encoder.encode(arrow_rows(table, encoder.schema)).inputs
    for a, b in zip(from_json.args(), from_arrow.args()):
        assert torch.equal(a, b)


def test_dense_nulls_become_zero_and_rank_requests_share_their_context(decoded: dict) -> None:
    meta = decoded["meta"]
    encoder = RequestEncoder(meta, input_schema(meta), decoded["root"])
    record = dict(decoded["records"][1], price=None)
    one = encoder.encode(record_rows([record], encoder.schema)).inputs
    assert one.dense[0, input_schema(meta).dense.index("price")] == 0.0
    items = ("item_id", "item_cat", "brand", "price_bucket", "price")
    candidates = [{k: r[k] for k in items} for r in decoded["records"][:7]]
    context = {k: v for k, v in record.items() if k not in items and k not in ("scenario", "history")}
    body = {"scenario": record["scenario"], "context": context, "history": record["history"], "candidates": candidates}
    rank = encoder.encode(rank_request_rows(body, encoder.schema)).inputs
    rows = [{**record, **c} for c in candidates]
    flat = encoder.encode(record_rows(rows, encoder.schema)).inputs
    assert (rank.contexts, rank.rows, flat.contexts, flat.rows) == (1, 7, 7, 7)  # the request's history: encoded once
    for a, b in zip(per_row(rank), per_row(flat)):
        assert torch.equal(a, b)


def per_row(inputs: ProgramInputs) -> tuple[torch.Tensor, ...]:
    """Every input with one entry per row (context inputs gathered by `context`)."""
    return (inputs.sparse, inputs.history[inputs.context], inputs.hist_len[inputs.context],
            inputs.scenario[inputs.context], inputs.dense)


BAD_REQUESTS = [  # (change to a valid /rank body, the field path the message must start with)
    (lambda b: b["candidates"][3].update(item_id=[1]), "candidates[3].item_id: expected int or string, got list"),
    (lambda b: b["candidates"][1].update(item_id=None), "candidates[1].item_id: null"),
    (lambda b: b["candidates"][2].pop("brand"), "candidates[2].brand: missing"),
    (lambda b: b["candidates"][0].update(price="3.5"), "candidates[0].price: expected a number"),
    (lambda b: b.update(scenario="nowhere"), "scenario: unknown scenario 'nowhere'"),
    (lambda b: b.pop("scenario"), "scenario: missing"),
    (lambda b: b["context"].pop("user_id"), "candidates[0].user_id: missing"),
    (lambda b: b["context"].update(user_id=True), "context.user_id: expected int or string, got bool"),
    (lambda b: b["history"][0].update(scenario="mars"), "history[0].scenario: unknown scenario 'mars'"),
    (lambda b: b["history"][1].pop("item_id"), "history[1].item_id: missing"),
    (lambda b: b.update(history="x"), "history: expected a list"),
    (lambda b: b.update(candidates=[]), "candidates: expected a non-empty list"),
    (lambda b: b.update(extra=1), "extra: unknown field"),
]


@pytest.mark.parametrize("change,message", BAD_REQUESTS, ids=[m.split(":")[0] for _, m in BAD_REQUESTS])
def test_bad_rank_requests_name_the_field(decoded: dict, change, message: str) -> None:
    meta = decoded["meta"]
    encoder = RequestEncoder(meta, input_schema(meta), decoded["root"])
    body = rank_body(decoded, 10, 6)
    rank_request_rows(body, encoder.schema)  # valid as built
    change(body)
    with pytest.raises(RequestError) as caught:
        rank_request_rows(body, encoder.schema)
    assert str(caught.value).startswith(message)


# ---- with a trained run and its fp32 artifact (`exported`, `artifact`: tests/conftest.py) ------------------------


def test_predict_scores_equal_the_eager_model(decoded: dict, exported: dict, tmp_path: Path) -> None:
    from msit_rec.cli import main

    def predict(source: Path, out: Path, *extra: str) -> int:
        return main(["predict", "--artifact", str(exported["artifact"]), "--input", str(source), "--out", str(out),
                     "--quiet", *extra])

    records = decoded["records"]  # ids of one column as int and as text: JSON lines keep them as given
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert predict(tmp_path / "rows.jsonl", tmp_path / "scored.jsonl", "--batch_size", "1000") == 0
    lines = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k not in ("logit", "score")} for r in lines] == records
    logits = np.array([r["logit"] for r in lines])
    assert np.abs(logits - exported["eager_logits"]).max() <= 1e-5
    np.testing.assert_allclose([r["score"] for r in lines], 1 / (1 + np.exp(-logits)), rtol=1e-6)

    parquet_rows = [dict(r, brand=None if r["brand"] is None else int(r["brand"])) for r in records]
    pq.write_table(pa.Table.from_pylist(parquet_rows), tmp_path / "rows.parquet")
    assert predict(tmp_path / "rows.parquet", tmp_path / "scored.parquet", "--batch_size", "777") == 0
    scored = pq.read_table(tmp_path / "scored.parquet")
    assert scored.drop_columns(["logit", "score"]).to_pylist() == parquet_rows
    assert np.abs(scored.column("logit").to_numpy() - exported["eager_logits"]).max() <= 1e-5
    assert predict(tmp_path / "rows.parquet", tmp_path / "scored.parquet") == 2  # exists, no --overwrite
    assert predict(tmp_path / "rows.jsonl", tmp_path / "mixed.parquet") == 2  # mixed types cannot be Parquet
    bad = [*records[:30], {**records[30], "scenario": "mars"}]  # the last batch fails: no half-written output
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    assert predict(tmp_path / "bad.jsonl", tmp_path / "bad_scored.jsonl", "--batch_size", "10") == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("bad_scored", "mixed"))) == []


def test_predict_writes_each_rows_top_behaviours(decoded: dict, exported: dict, artifact, tmp_path: Path) -> None:
    """`predict --top_behaviours 2`: each row's 2 behaviours with the largest weight of the program's attention,
    indexed into that row's history (longer than max_len for some rows), in JSON lines and Parquet alike."""
    from msit_rec.cli import main

    records = [dict(r, history=[{"item_id": 5, "item_cat": 3, "scenario": "home"}, *r["history"]])
               for r in decoded["records"][:200]]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    common = ["predict", "--artifact", str(exported["artifact"]), "--quiet", "--top_behaviours", "2"]
    assert main([*common, "--input", str(tmp_path / "rows.jsonl"), "--out", str(tmp_path / "top.jsonl")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "top.jsonl").read_text().splitlines()]
    encoded = artifact.encode(record_rows(records, artifact.encoder.schema))
    _, attention = artifact.outputs(encoded.inputs)
    longer = 0
    for row, (record, line) in enumerate(zip(records, lines)):
        sent, kept = len(record["history"]), int(encoded.inputs.hist_len[row])
        longer += sent > kept
        weights = attention[row, :kept].tolist()
        ranked = sorted(range(kept), key=lambda p: (-abs(weights[p]), -p))[:2]
        assert [b["index"] for b in line["top_behaviours"]] == [sent - kept + p for p in ranked]
        assert [b["weight"] for b in line["top_behaviours"]] == pytest.approx([weights[p] for p in ranked], abs=1e-6)
    assert longer > 0 and sum(len(line["top_behaviours"]) == 2 for line in lines) > 100
    parquet_rows = [dict(r, brand=None if r["brand"] is None else int(r["brand"])) for r in records]
    pq.write_table(pa.Table.from_pylist(parquet_rows), tmp_path / "rows.parquet")
    assert main([*common, "--input", str(tmp_path / "rows.parquet"), "--out", str(tmp_path / "top.parquet")]) == 0
    assert pq.read_table(tmp_path / "top.parquet").column("top_behaviours").to_pylist() == [
        [{"index": b["index"], "weight": pytest.approx(b["weight"], abs=1e-6)} for b in line["top_behaviours"]]
        for line in lines
    ]


def test_a_failed_predict_leaves_the_previous_output_and_no_temporary_file(decoded: dict, exported: dict,
                                                                           tmp_path: Path) -> None:
    from msit_rec.cli import main

    records = [dict(r, brand=None if r["brand"] is None else int(r["brand"])) for r in decoded["records"][:40]]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    bad = [*records[:35], {**records[35], "scenario": "mars"}]  # fails in the fourth batch of ten
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    for suffix in (".jsonl", ".parquet"):
        out = tmp_path / f"scored{suffix}"
        predict = ["predict", "--artifact", str(exported["artifact"]), "--out", str(out), "--quiet", "--input"]
        assert main([*predict, str(tmp_path / "rows.jsonl")]) == 0
        (tmp_path / f"{out.name}.partial").write_text("a user's file")  # the name predict once wrote to
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
        assert main([*predict, str(tmp_path / "bad.jsonl"), "--batch_size", "10", "--overwrite"]) == 2
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before, suffix


def test_requests_rebuilt_from_examples_score_like_the_examples(decoded: dict, exported: dict, tmp_path: Path) -> None:
    from msit_rec.cli import main

    rows = 40
    assert main(["requests", "--data", str(decoded["root"]), "--rows", str(rows), "--out", str(tmp_path / "r.jsonl")]) == 0
    assert main(["requests", "--data", str(decoded["root"]), "--out", str(tmp_path / "r.jsonl")]) == 2  # exists
    assert main(["predict", "--artifact", str(exported["artifact"]), "--input", str(tmp_path / "r.jsonl"),
                 "--out", str(tmp_path / "scored.jsonl"), "--quiet"]) == 0
    lines = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert [line["label"] for line in lines] == decoded["frame"]["label"].head(rows).cast(pl.Int64).to_list()
    assert np.abs(np.array([line["logit"] for line in lines]) - exported["eager_logits"][:rows]).max() <= 1e-5


def test_out_of_range_inputs_are_refused_before_the_program(decoded: dict, artifact) -> None:
    encoded = artifact.encode(record_rows(decoded["records"][:8], artifact.encoder.schema)).inputs
    expected = artifact.logits(encoded)  # in range: accepted, and equal to the unchecked call
    assert torch.equal(expected, artifact.logits(encoded, check=False))
    item = decoded["meta"].feature("item")
    column = artifact.manifest.inputs.sparse.index("item")
    scenarios, max_len = len(decoded["meta"].scenarios), decoded["meta"].history.max_len
    cases = {
        "sparse": (lambda x: x.sparse[3, column].fill_(item.cardinality),
                   rf"sparse, feature 'item'.*\[0, {item.cardinality}\)"),
        "history": (lambda x: x.history[0, 0, 0].fill_(-1), r"history, feature 'hist_item'.*got \[-1,"),
        "scenario": (lambda x: x.scenario.fill_(scenarios), rf"scenario.*\[0, {scenarios}\)"),
        "hist_len": (lambda x: x.hist_len.fill_(max_len + 1), rf"hist_len.*\[0, {max_len + 1}\)"),
    }
    for spoil, message in cases.values():
        bad = ProgramInputs(*(t.clone() for t in encoded.args()))
        spoil(bad)
        with pytest.raises(DataError, match=message):
            artifact.logits(bad)


def test_a_changed_artifact_file_is_refused(exported: dict, tmp_path: Path) -> None:
    import shutil

    from msit_rec.serving.artifact import load_artifact

    copy = tmp_path / "artifact"
    shutil.copytree(exported["artifact"], copy)
    vocab = min((copy / "vocab").glob("*.parquet"))
    vocab.write_bytes(vocab.read_bytes() + b"\0")
    with pytest.raises(DataError, match=f"file vocab/{vocab.name} has sha256"):
        load_artifact(copy)


FRESH_PROCESS = """
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torchrec", "lightning", "pytorch_lightning", "polars", "fbgemm_gpu", "pipelines"}:
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
from msit_rec.serving.artifact import load_artifact
from msit_rec.serving.request import record_rows
artifact = load_artifact(sys.argv[1], backend="export", threads=1)
records = json.load(open(sys.argv[2]))
logits = artifact.logits(artifact.encode(record_rows(records, artifact.encoder.schema)).inputs)
loaded = sorted(m for m in sys.modules if m.startswith(("msit_rec.model", "msit_rec.train", "msit_rec.embeddings",
                                                        "msit_rec.data.batch", "msit_rec.data.loader", "torchrec")))
print(json.dumps({"logits": logits.tolist(), "loaded": loaded}))
"""


def test_a_fresh_process_without_torchrec_lightning_or_polars_scores(decoded: dict, exported: dict,
                                                                     tmp_path: Path) -> None:
    records = decoded["records"][:200]
    (tmp_path / "rows.json").write_text(json.dumps(records))
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(exported["artifact"]), str(tmp_path / "rows.json")],
                          capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    assert np.abs(np.array(result["logits"]) - exported["eager_logits"][:200]).max() <= 1e-5


# ---- HTTP on loopback -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(artifact):
    from msit_rec.serving.server import RankingServer, ServeConfig

    running = RankingServer(artifact, ServeConfig(port=0, max_body_bytes=200_000, max_batch_rows=256)).start()
    yield running
    running.shutdown()


def expected_scores(artifact, body: dict) -> list[float]:
    """Serial, in-process: each candidate as a self-contained row (context + candidate fields + history)."""
    rows = [{**body["context"], **c, "scenario": body["scenario"], "history": body["history"]} for c in body["candidates"]]
    encoded = artifact.encode(record_rows(rows, artifact.encoder.schema))
    return artifact.scores(encoded.inputs).tolist()


def test_rank_returns_the_candidates_sorted_with_predict_scores(decoded: dict, artifact, server) -> None:
    assert server.address[0] == "127.0.0.1"
    body = rank_body(decoded, 40, 25)
    status, payload = call(server, "POST", "/rank", body)
    assert status == 200, payload
    expected = expected_scores(artifact, body)
    items = payload["items"]
    assert sorted(item["index"] for item in items) == list(range(25))
    # one shared context vs a context per row: the same numbers up to float32 rounding (different batched kernels)
    assert [item["score"] for item in items] == pytest.approx(sorted(expected, reverse=True), abs=1e-7)
    for item in items:
        assert item["score"] == pytest.approx(expected[item["index"]], abs=1e-7)
        assert item["item_id"] == body["candidates"][item["index"]]["item_id"]
    status, health = call(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["scenarios"] == decoded["meta"].scenarios


def test_rank_returns_each_candidates_top_behaviours_with_the_programs_weights(decoded: dict, artifact,
                                                                             server) -> None:
    """`top_behaviours: k`: per candidate, the k behaviours of the history as sent with the largest attention weight
    (the program's α for that candidate, parity with the eager model: tests/test_export.py), indexed into the sent
    history — longer than max_len here, so the oldest were dropped and the indices are offset."""
    records = decoded["records"]
    row = next(r for r in range(len(records) - 20) if len(records[r]["history"]) >= 4)
    body = {**rank_body(decoded, row, 12), "top_behaviours": 3}
    status, payload = call(server, "POST", "/rank", body)
    assert status == 200, payload
    rows = [{**body["context"], **c, "scenario": body["scenario"], "history": body["history"]} for c in body["candidates"]]
    encoded = artifact.encode(record_rows(rows, artifact.encoder.schema))  # each candidate its own context
    _, attention = artifact.outputs(encoded.inputs)
    sent, kept = len(body["history"]), int(encoded.inputs.hist_len[0])
    assert sent > kept == artifact.manifest.inputs.max_len
    for item in payload["items"]:
        weights = attention[item["index"], :kept].tolist()
        ranked = sorted(range(kept), key=lambda p: (-abs(weights[p]), -p))[:3]  # ties: the more recent first
        assert [b["index"] for b in item["behaviours"]] == [sent - kept + p for p in ranked]
        assert [b["weight"] for b in item["behaviours"]] == pytest.approx([weights[p] for p in ranked], abs=1e-6)
        for behaviour in item["behaviours"]:
            sent_behaviour = body["history"][behaviour["index"]]
            assert (behaviour["item_id"], behaviour["scenario"]) == (sent_behaviour["item_id"], sent_behaviour["scenario"])
    assert len({tuple(b["index"] for b in item["behaviours"]) for item in payload["items"]}) > 1  # per candidate
    plain = call(server, "POST", "/rank", {**body, "top_behaviours": 0})[1]
    assert all("behaviours" not in item for item in plain["items"])
    for bad in ("3", -1, True, 2.5):
        status, payload = call(server, "POST", "/rank", {**body, "top_behaviours": bad})
        assert status == 400 and payload["error"].startswith("top_behaviours: expected an int ≥ 0"), payload


@pytest.mark.parametrize("change,message", BAD_REQUESTS[:6], ids=[m.split(":")[0] for _, m in BAD_REQUESTS[:6]])
def test_invalid_requests_are_400_naming_the_field(decoded: dict, server, change, message: str) -> None:
    body = rank_body(decoded, 10, 6)
    change(body)
    status, payload = call(server, "POST", "/rank", body)
    assert status == 400 and payload["error"].startswith(message)


def test_http_errors_for_bad_json_paths_methods_and_sizes(server) -> None:
    status, payload = call(server, "POST", "/rank", raw=b"{not json")
    assert status == 400 and payload["error"].startswith("request body: invalid JSON")
    assert call(server, "GET", "/nowhere")[0] == 404
    assert call(server, "GET", "/rank")[0] == 405
    assert call(server, "POST", "/health", body={})[0] == 405
    status, payload = call(server, "POST", "/rank", raw=b" " * 300_000)
    assert status == 413 and "limit is 200000" in payload["error"]


def test_unknown_ids_score_as_oov_and_are_counted(decoded: dict, artifact, server) -> None:
    before = call(server, "GET", "/metrics")[1]["oov"]
    body = rank_body(decoded, 60, 5)
    body["context"]["user_id"] = UNKNOWN_ID
    body["candidates"][0]["item_id"] = UNKNOWN_ID + 1
    body["candidates"][1]["item_id"] = "never-seen"
    status, payload = call(server, "POST", "/rank", body)
    assert status == 200 and payload["oov"]["user"] == 1 and payload["oov"]["item"] >= 2
    assert sorted(i["score"] for i in payload["items"]) == pytest.approx(sorted(expected_scores(artifact, body)))
    after = call(server, "GET", "/metrics")[1]
    assert after["oov"]["user"] == before.get("user", 0) + 1
    assert after["oov"]["item"] == before.get("item", 0) + payload["oov"]["item"]
    assert after["responses_by_status"]["400"] >= 1 and after["latency_ms"]["p50"] > 0


def test_concurrent_requests_are_all_answered_correctly(decoded: dict, artifact, server) -> None:
    bodies = [rank_body(decoded, 100 + 7 * i, 3 + i % 9) for i in range(24)]
    expected = [expected_scores(artifact, body) for body in bodies]
    results: list[Any] = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def send(i: int) -> None:
        start.wait()
        results[i] = call(server, "POST", "/rank", bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for (status, payload), scores in zip(results, expected):
        assert status == 200
        got = {item["index"]: item["score"] for item in payload["items"]}
        assert [got[i] for i in range(len(scores))] == pytest.approx(scores, abs=1e-7)
    metrics = call(server, "GET", "/metrics")[1]
    assert metrics["model_calls"] >= 1 and metrics["rows_scored"] >= sum(len(s) for s in expected)


def test_serve_cli_binds_loopback_prints_its_port_and_stops_on_sigterm(exported: dict) -> None:
    import signal

    process = subprocess.Popen(
        [sys.executable, "-m", "msit_rec.cli", "serve", "--artifact", str(exported["artifact"]), "--port", "0",
         "--backend", "export", "--quiet"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = process.stdout.readline()
        assert " on http://127.0.0.1:" in line, process.stderr.read()
        port = int(line.split("http://127.0.0.1:", 1)[1].split()[0])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("GET", "/health")
        assert connection.getresponse().status == 200
        connection.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert "server stopped" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()


def test_encoder_reproduces_feedback_histories(feedback_examples: Path) -> None:
    """Contract v2: each behaviour's feedback travels in the request as its raw field (here `label`) and encodes
    back to the prepared hist_feedback ids, aligned with the other behaviour fields."""
    from msit_rec.data.spec import DatasetMeta
    from pipelines.requests import decode_examples

    meta = DatasetMeta.load(feedback_examples)
    frame = pl.concat([pl.read_parquet(feedback_examples / f) for f in meta.splits["test"].files]).head(400)
    records = decode_examples(meta, feedback_examples, frame)
    assert all("label" in b for r in records for b in r["history"]) and any(r["history"] for r in records)
    schema = input_schema(meta)
    encoder = RequestEncoder(meta, schema, feedback_examples)
    encoded = encoder.encode(record_rows(records, encoder.schema)).inputs
    expected = prepared_inputs(frame, schema)
    np.testing.assert_array_equal(encoded.history.numpy(), expected["history"])
    np.testing.assert_array_equal(encoded.hist_len.numpy(), expected["hist_len"])
    as_ints = [dict(r, history=[dict(b, label=int(b["label"])) for b in r["history"]]) for r in records]
    again = encoder.encode(record_rows(as_ints, encoder.schema)).inputs  # a client sends 0/1 as numbers
    np.testing.assert_array_equal(again.history.numpy(), expected["history"])
    row = next(i for i, r in enumerate(records) if r["history"])
    for bad, shown in (([1], "list"), (float("nan"), "nan"), (True, "bool")):
        broken = [*records[:row], {**records[row], "history": [{**records[row]["history"][0], "label": bad}]}]
        with pytest.raises(RequestError) as caught:
            record_rows(broken, encoder.schema)
        assert str(caught.value) == (f"rows[{row}].history[0].label: expected a finite number, an int, a string or "
                                     f"null, got {shown}")


def test_encoder_reproduces_graded_feedback_sent_as_numbers(shared_data: Path, tmp_path: Path) -> None:
    """A graded feedback (MovieLens ratings, the vocabulary's "4.0"/"4.5" texts) sent as JSON numbers — floats, and
    integral ones as ints the way JavaScript writes them — or as an Arrow float column encodes to the prepared ids."""
    from msit_rec.config import load_config
    from msit_rec.data.spec import DatasetMeta
    from pipelines.config import DatasetConfig
    from pipelines.prepare import prepare
    from pipelines.requests import decode_examples

    config = load_config(Path(__file__).resolve().parents[1] / "configs/datasets/movielens.yaml", DatasetConfig,
                         "dataset", overrides=[f"source.path={shared_data / 'ml-latest-small'}"])
    assert config.history.feedback == "rating"
    prepare(config, tmp_path / "examples")
    meta = DatasetMeta.load(tmp_path / "examples")
    frame = pl.concat([pl.read_parquet(tmp_path / "examples" / f) for f in meta.splits["test"].files]).head(300)
    records = decode_examples(meta, tmp_path / "examples", frame)
    ratings = {b["rating"] for r in records for b in r["history"]}
    assert {"4.0", "4.5"} <= ratings  # the vocabulary's texts, as Polars wrote the float column
    schema = input_schema(meta)
    encoder = RequestEncoder(meta, schema, tmp_path / "examples")
    expected = prepared_inputs(frame, schema)["history"]

    def rated(as_number: Any) -> list[dict[str, Any]]:
        return [dict(r, history=[dict(b, rating=as_number(float(b["rating"]))) for b in r["history"]]) for r in records]

    for sent in (rated(float), rated(lambda v: int(v) if v.is_integer() else v)):
        encoded = encoder.encode(record_rows(sent, encoder.schema)).inputs
        np.testing.assert_array_equal(encoded.history.numpy(), expected)
    as_text = [  # ids as text (decoded OOV ids are text placeholders, the known ones ints): one Arrow type
        dict(r, user_id=str(r["user_id"]), item_id=str(r["item_id"]),
             history=[dict(b, item_id=str(b["item_id"])) for b in r["history"]]) for r in rated(float)
    ]
    table = pa.Table.from_pylist(as_text)
    assert pa.types.is_floating(table.schema.field("history").type.value_type.field("rating").type)
    np.testing.assert_array_equal(encoder.encode(arrow_rows(table, encoder.schema)).inputs.history.numpy(), expected)
    # a float32 rating reads as the text Polars writes for it ("3.7"), not float64's 3.700000047683716
    behaviour = pa.struct([("item_id", pa.string()), ("genre", pa.string()), ("rating", pa.float32()),
                           ("scenario", pa.string())])
    one = pa.Table.from_pylist([{**as_text[0], "history": [{**as_text[0]["history"][0], "rating": 3.7}]}])
    one = one.set_column(one.schema.get_field_index("history"), "history",
                         pa.array([[{**one.column("history")[0][0].as_py()}]], pa.list_(behaviour)))
    assert arrow_rows(one, encoder.schema).behaviours["rating"] == [pl.Series([3.7], dtype=pl.Float32).cast(
        pl.String).cast(pl.Float64).item()] == [3.7]


def test_a_version_2_artifact_still_scores_but_has_no_behaviour_weights(decoded: dict, exported: dict,
                                                                       tmp_path: Path) -> None:
    """Artifacts exported before the program returned attention (version 2) load and rank; asking them for
    top behaviours is a clear 400 / error, not a crash."""
    import shutil

    from msit_rec.serving.artifact import load_artifact
    from msit_rec.serving.predict import predict_file
    from msit_rec.serving.server import RankingService, ServeConfig

    old = tmp_path / "v2"
    shutil.copytree(exported["artifact"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "artifact_version": 2}))
    artifact = load_artifact(old, backend="export")
    assert not artifact.manifest.has_attention and artifact.outputs(
        artifact.encode(record_rows(decoded["records"][:5], artifact.encoder.schema)).inputs)[1] is None
    service = RankingService(artifact, ServeConfig())
    try:
        body = rank_body(decoded, 3, 4)
        status, payload = service.rank(json.dumps(body).encode())
        assert status == 200 and len(json.loads(payload)["items"]) == 4
        status, payload = service.rank(json.dumps({**body, "top_behaviours": 2}).encode())
        assert status == 400 and "version 2" in payload["error"] and "export it again" in payload["error"]
    finally:
        service.close()
    (tmp_path / "rows.jsonl").write_text(json.dumps(decoded["records"][0]) + "\n")
    with pytest.raises(ConfigError, match="does not return attention weights"):
        predict_file(artifact, tmp_path / "rows.jsonl", tmp_path / "out.jsonl", top_behaviours=1, progress=False)
    with pytest.raises(ConfigError) as caught:
        predict_file(artifact, tmp_path / "rows.jsonl", tmp_path / "out.jsonl", top_behaviours=-1, progress=False)
    assert str(caught.value) == "--top_behaviours -1: expected ≥ 0"
