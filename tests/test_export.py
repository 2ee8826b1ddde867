"""`msit-rec export`: the serving model against the trained model, int8 tables, the artifact on disk and in a
fresh torch-only process, the manifest, the parity gate and bad precision specs.

Oracles: RankingModel (TorchRec lookups) on the same rows for every variant and both sequence paths; per-row
min/max quantisation computed by hand; hashlib and sklearn on the artifact's files and scores; a subprocess in
which torchrec, lightning and fbgemm cannot be imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from msit_rec.cli import main
from msit_rec.data.batch import Batch
from msit_rec.data.loader import ExamplesDataset, make_loader
from msit_rec.data.spec import DatasetMeta
from msit_rec.errors import ConfigError, DataError
from msit_rec.export import export_run, parse_precision
from msit_rec.export import exporter as exporter_module
from msit_rec.export.inputs import batch_to_inputs, input_schema
from msit_rec.export.serving_model import ServingModel, embedding_table_names
from msit_rec.export.summary import export_summary
from msit_rec.export.tables import ServingTable, dequantize_rowwise, quantize_rowwise
from msit_rec.fit_config import VARIANTS, ModelConfig, SequencePath
from msit_rec.model import RankingModel
from msit_rec.serving.artifact import verify_files
from msit_rec.serving.contract import AOTI_FILE, PROGRAM_FILE, Manifest
from tests.launch import LAUNCH_ENV

pytestmark = pytest.mark.usefixtures("in_process_launch_env")

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
ROWS = 513  # one more than a power of two: the dynamic batch dimension is not specialised on it
BLOCKED = ("torchrec", "lightning", "pytorch_lightning", "lightning_fabric", "fbgemm_gpu", "msit_rec.train",
           "msit_rec.model", "msit_rec.embeddings")


@pytest.fixture(scope="module")
def meta(small_examples: Path) -> DatasetMeta:
    return DatasetMeta.load(small_examples)


@pytest.fixture(scope="module")
def batch(small_examples: Path) -> Batch:
    """ROWS validation rows (late in time) with empty, partial and full histories and every scenario."""
    batch = next(iter(make_loader(ExamplesDataset(small_examples, "valid", ROWS))))
    lengths = batch.hist_len
    max_len = DatasetMeta.load(small_examples).history.max_len
    assert (lengths == 0).any() and ((lengths > 0) & (lengths < max_len)).any() and (lengths == max_len).any()
    assert batch.scenario.unique().numel() == len(DatasetMeta.load(small_examples).scenarios)
    return batch


def trained_like(meta: DatasetMeta, variant: str, path: SequencePath) -> RankingModel:
    """A model whose tables hold N(0, 0.5²) rows (row 0 too) and whose dense weights are doubled (the gate's, zero
    when fresh, drawn like the tables), so that every input moves the logits (a fresh model's barely depend on the
    tables) and a wrong lookup cannot hide."""
    torch.manual_seed(0)
    variant, _, ablation = variant.partition("+")  # "msit+attention_scenario": the preset with e(s) in the attention
    model = RankingModel(meta, ModelConfig(variant=variant, attention_hidden=[8], tower_hidden=[16, 8],
                                           sequence_path=path, attention_scenario=True if ablation else None),
                         device=CPU)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.5) if name.startswith(("embeddings.", "head.gate.")) else param.mul_(2.0)
    return model.eval()


@pytest.mark.parametrize("path", list(SequencePath), ids=lambda p: p.value)
@pytest.mark.parametrize("variant", [*sorted(VARIANTS), "msit+attention_scenario"])
def test_serving_model_equals_the_ranking_model(meta, batch, variant: str, path: SequencePath) -> None:
    model = trained_like(meta, variant, path)
    serving = ServingModel(model, meta, {})
    inputs = batch_to_inputs(batch, input_schema(meta))
    with torch.no_grad():
        details, (got, attention) = model.details(batch), serving(*inputs)
    expected = details.logits
    assert expected.std() > 0.1, "logits must vary across rows, or the comparison is weak"
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # each behaviour's weight: the training model's packed α, laid out per row as the program returns it
    position = torch.arange(details.example.shape[0]) - (batch.hist_len.cumsum(0) - batch.hist_len)[details.example]
    packed_as_rows = torch.zeros_like(attention).index_put_((details.example, position), details.attention)
    assert details.attention.std() > 0.01 or variant == "shared", "weights must vary, or the comparison is weak"
    torch.testing.assert_close(attention, packed_as_rows, rtol=0, atol=1e-5)
    # positions past hist_len are padding whatever ids they hold: fill them with real ids, same logits
    sparse, history, hist_len, scenario, dense, context = inputs
    padded = torch.arange(history.shape[-1]) >= hist_len[:, None, None]  # [B, 1, L]
    filled = torch.where(padded, torch.ones_like(history), history)
    with torch.no_grad():
        torch.testing.assert_close(serving(sparse, filled, hist_len, scenario, dense, context)[0], got, rtol=0, atol=0)


@pytest.mark.parametrize("path", list(SequencePath), ids=lambda p: p.value)
@pytest.mark.parametrize("variant", ["msit", "din"])
def test_serving_model_with_feedback_equals_the_ranking_model(feedback_examples, variant, path) -> None:
    """hist_feedback is a behaviour slot for every variant and a gate input for msit: both layouts agree, and the
    feedback moves the logits of rows with a history (nearly all: a row in a dead ReLU region of the tower may not)."""
    meta = DatasetMeta.load(feedback_examples)
    batch = next(iter(make_loader(ExamplesDataset(feedback_examples, "valid", ROWS))))
    model = trained_like(meta, variant, path)
    if model.head.gate is not None:
        with torch.no_grad():
            model.head.gate.feedback_weight.normal_(0.0, 0.5)  # starts at zero: make the check bite
    serving = ServingModel(model, meta, {})
    sparse, history, hist_len, scenario, dense, context = batch_to_inputs(batch, input_schema(meta))
    with torch.no_grad():
        expected, got = model(batch), serving(sparse, history, hist_len, scenario, dense, context)[0]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        row = input_schema(meta).sequence.index(meta.behaviour_feedback.name)
        flipped = history.clone()
        flipped[:, row] = torch.where(history[:, row] == 2, 3, 2)  # clicked ↔ skipped, padding stays padding
        changed = serving(sparse, flipped, hist_len, scenario, dense, context)[0]
    moved, has_history = (changed - got).abs() > 1e-6, hist_len > 0
    assert not moved[~has_history].any(), "a row without history has no feedback to see"
    assert moved[has_history].float().mean() > 0.9, "rows with a history must see their behaviours' feedback"


def test_rows_sharing_a_context_score_like_rows_with_their_own_copy(meta, batch) -> None:
    serving = ServingModel(trained_like(meta, "msit", SequencePath.POOLED_BAGS), meta, {})
    sparse, history, hist_len, scenario, dense, _ = batch_to_inputs(batch, input_schema(meta))
    with_history = torch.nonzero(hist_len > 0).squeeze(1).tolist()
    other = next(r for r in with_history if not torch.equal(history[r], history[with_history[0]]))
    chosen = torch.tensor([with_history[0], other])  # two different contexts with behaviours
    context = torch.arange(sparse.shape[0]) % 2  # [B]: rows alternate between them
    own = chosen[context]  # each row with a private copy of its context
    with torch.no_grad():
        shared = serving(sparse, history[chosen], hist_len[chosen], scenario[chosen], dense, context)
        copied = serving(sparse, history[own], hist_len[own], scenario[own], dense, torch.arange(sparse.shape[0]))
    torch.testing.assert_close(shared, copied, rtol=0, atol=1e-6)


def test_serving_tables_keep_every_trained_table_and_its_rows(meta) -> None:
    model = trained_like(meta, "msit", SequencePath.POOLED_BAGS)
    serving = ServingModel(model, meta, {"item": "fp16"})
    assert list(serving.tables) == embedding_table_names(meta)
    assert set(serving.tables) == {f.table for f in meta.features if f.kind == "sparse"}
    ids = torch.arange(meta.feature("item").cardinality)
    item = model.embeddings.sequences.embedding_bags["item"].weight
    torch.testing.assert_close(serving.tables["item"](ids), item.half().float(), rtol=0, atol=0)
    torch.testing.assert_close(serving.tables["user"](ids[:5]),
                               model.embeddings.bags.embedding_bags["user"].weight[:5], rtol=0, atol=0)


def test_int8_rowwise_quantisation_against_a_hand_computed_oracle() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 16, generator=generator) * torch.logspace(-3, 1, 300)[:, None]  # rows of every scale
    weight[0] = 0.0  # the padding row
    weight[7] = 0.25  # a constant row
    codes, scale, bias = quantize_rowwise(weight)
    low, high = weight.min(dim=1).values, weight.max(dim=1).values
    assert codes.dtype == torch.uint8
    torch.testing.assert_close(scale, (high - low) / 255, rtol=1e-6, atol=0)
    torch.testing.assert_close(bias, low, rtol=0, atol=0)
    restored = dequantize_rowwise(codes, scale, bias)
    error = (restored - weight).abs()
    assert bool((error <= scale[:, None] / 2 + 1e-6 * weight.abs().amax(dim=1, keepdim=True)).all())
    assert error.max() > 0  # it is a real quantisation
    assert torch.equal(restored[0], torch.zeros(16)) and torch.equal(restored[7], torch.full((16,), 0.25))
    assert int(codes.min()) == 0 and int(codes.max()) == 255  # each row spans its full code range

    table = ServingTable("item", weight, "int8")
    ids = torch.tensor([[0, 5, 299], [7, 0, 0]])
    torch.testing.assert_close(table(ids), restored[ids], rtol=0, atol=0)
    info = table.info()
    assert (info.precision, info.bytes, info.fp32_bytes) == ("int8", 300 * 16 + 300 * 8, 300 * 16 * 4)


def test_precision_specs() -> None:
    tables = ["user", "item", "category"]
    assert parse_precision("int8", tables) == {"user": "int8", "item": "int8", "category": "int8"}
    assert parse_precision(" item=int8, user=fp16", tables) == {"user": "fp16", "item": "int8", "category": "fp32"}
    assert parse_precision({"category": "fp16"}, tables)["category"] == "fp16"
    with pytest.raises(ConfigError, match=r"unknown table\(s\) \['brand'\].*\['user', 'item', 'category'\]"):
        parse_precision("item=int8,brand=fp16", tables)
    with pytest.raises(ConfigError, match="table 'item' got 'int4'.*'fp32', 'fp16', 'int8'"):
        parse_precision("item=int4", tables)
    with pytest.raises(ConfigError, match="expected one of"):
        parse_precision("bf16", tables)
    with pytest.raises(ConfigError, match="given twice"):
        parse_precision("item=int8,item=fp16", tables)


# ---- a trained run and its artifacts ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(small_examples: Path, tmp_path_factory: pytest.TempPathFactory, slow_setup: None) -> Path:
    """A tiny msit run trained by 2 gloo processes: its checkpoints hold each rank's table shards, so every export
    below starts from a sharded checkpoint and unshards it in one process."""
    out = tmp_path_factory.mktemp("export_run") / "msit"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env["PYTHONPATH"] = str(REPO)
    overrides = ("model.attention_hidden=[8]", "model.tower_hidden=[16]", "trainer.devices=2",
                 "trainer.batch_size=256", "trainer.max_epochs=1", "trainer.limit_train_batches=8",
                 "trainer.limit_val_batches=1")
    result = subprocess.run(
        [sys.executable, "-m", "msit_rec.cli", "fit", "--data", str(small_examples), "--out", str(out), "--quiet",
         *(arg for item in overrides for arg in ("--set", item))],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert len(list((out / "checkpoints" / "best.ckpt").glob("*.distcp"))) == 2, "one shard file per process"
    return out


@pytest.fixture(scope="module")
def fp32_artifact(run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Exported through the CLI (exit code and printed summary kept)."""
    out = tmp_path_factory.mktemp("artifacts") / "fp32"
    with pytest.MonkeyPatch.context() as mp:
        printed: list[str] = []
        mp.setattr("builtins.print", lambda *a, **k: printed.append(" ".join(map(str, a))))
        code = main(["export", "--run", str(run), "--out", str(out), "--quiet", "--batch_size", "1000"])
    return {"dir": out, "code": code, "printed": "\n".join(printed)}


@pytest.fixture(scope="module")
def int8_artifact(run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    out = tmp_path_factory.mktemp("artifacts") / "int8"
    return out, export_run(run, out, precision="int8", progress=False)


def eager_model(run_dir: Path) -> RankingModel:
    from msit_rec.run_dir import load_model, read_run, resolve_checkpoint

    trained = read_run(run_dir)
    return load_model(trained, resolve_checkpoint(trained, "best"), DatasetMeta.load(trained.data_dir), CPU)


def test_cli_export_prints_tables_and_parity(fp32_artifact: dict, meta) -> None:
    assert fp32_artifact["code"] == 0
    printed = fp32_artifact["printed"]
    for table in embedding_table_names(meta):
        assert f"\n{table} " in printed
    assert "PASSED" in printed and "max |Δ logit|" in printed and str(fp32_artifact["dir"]) in printed


def test_manifest_records_versions_files_precision_and_parity(fp32_artifact: dict, run: Path, small_examples) -> None:
    root = fp32_artifact["dir"]
    manifest = Manifest.load(root)
    meta = DatasetMeta.load(small_examples)
    assert manifest.versions["torch"] == torch.__version__ and set(manifest.versions) == {"torch", "msit_rec", "python"}
    assert manifest.dataset_hash == meta.content_hash and manifest.model.variant == "msit"
    assert manifest.inputs == input_schema(meta) and not manifest.aoti
    vocabularies = {f.vocabulary for f in meta.features if f.vocabulary}
    assert set(manifest.files) == {PROGRAM_FILE, "dataset.json", *vocabularies}
    for relative, digest in manifest.files.items():
        assert hashlib.sha256((root / relative).read_bytes()).hexdigest() == digest
    assert (root / "dataset.json").read_bytes() == (small_examples / "dataset.json").read_bytes()
    verify_files(root, manifest.files)
    assert {t.name: t.precision for t in manifest.tables} == dict.fromkeys(embedding_table_names(meta), "fp32")
    parity = manifest.parity
    assert parity.passed and parity.split == "test" and parity.rows == meta.splits["test"].rows
    assert parity.tolerance == 1e-5 and parity.max_abs_logit_diff <= 1e-5
    assert parity.table_bytes_artifact == parity.table_bytes_fp32 == sum(r * d * 4 for r, d in (
        (t.rows, t.dim) for t in manifest.tables))
    assert {name: s.rows for name, s in parity.scenarios.items()} == {
        name: s.rows for name, s in meta.splits["test"].scenarios.items()}


def test_edited_artifact_files_fail_verification(fp32_artifact: dict, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(fp32_artifact["dir"], copy)
    with open(copy / PROGRAM_FILE, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(DataError, match=PROGRAM_FILE):
        verify_files(copy, Manifest.load(copy).files)


FRESH_PROCESS = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import name` now raises ImportError
import torch
for name in ("torchrec", "lightning", "fbgemm_gpu"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(name + " was importable")
from msit_rec.serving.contract import Manifest
manifest = Manifest.load(sys.argv[1])
program = torch.export.load(sys.argv[1] + "/program.pt2").module()
inputs = torch.load(sys.argv[2])
torch.save([program(*[x[:b] for x in inputs])[0] for b in (1, 7, len(inputs[0]))], sys.argv[3])
print("tables", {{t.name: t.precision for t in manifest.tables}})
"""


def test_fresh_torch_only_process_scores_like_the_eager_model(fp32_artifact: dict, run: Path, batch, meta,
                                                             tmp_path: Path) -> None:
    inputs = batch_to_inputs(batch, input_schema(meta))
    torch.save([x.clone() for x in inputs], tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS.format(blocked=BLOCKED), str(fp32_artifact["dir"]),
         str(tmp_path / "inputs.pt"), str(tmp_path / "logits.pt")],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "'item': 'fp32'" in result.stdout
    with torch.no_grad():
        expected = eager_model(run)(batch)
    logits = torch.load(tmp_path / "logits.pt")
    assert [len(x) for x in logits] == [1, 7, ROWS]  # one program, three batch sizes
    for got in logits:
        torch.testing.assert_close(got, expected[: len(got)], rtol=0, atol=1e-5)


def test_int8_artifact_parity_is_the_auc_of_its_scores(int8_artifact, run: Path, small_examples: Path, meta) -> None:
    root, manifest = int8_artifact
    assert {t.precision for t in manifest.tables} == {"int8"}
    for t in manifest.tables:
        assert t.bytes == t.rows * t.dim + 8 * t.rows and t.fp32_bytes == 4 * t.rows * t.dim
    parity = manifest.parity
    assert parity.passed and parity.tolerance is None and parity.max_auc_drop == 1e-3
    assert parity.table_bytes_artifact < 0.4 * parity.table_bytes_fp32
    assert 0 < parity.max_abs_logit_diff < 0.05  # quantised: different, but close
    # oracle: sklearn on both models' logits over the whole test split
    model, program = eager_model(run), torch.export.load(root / PROGRAM_FILE).module()
    columns: dict[str, list] = {"model": [], "artifact": [], "label": [], "scenario": []}
    with torch.no_grad():
        for test_batch in make_loader(ExamplesDataset(small_examples, "test", 1024)):
            real = test_batch.weight > 0
            columns["model"].append(model(test_batch)[real])
            columns["artifact"].append(program(*batch_to_inputs(test_batch, manifest.inputs))[0][real])
            columns["label"].append(test_batch.label[real])
            columns["scenario"].append(test_batch.scenario[real])
    model_logits, artifact_logits, label, scenario = (torch.cat(c).numpy() for c in columns.values())
    assert np.abs(model_logits - artifact_logits).max() == pytest.approx(parity.max_abs_logit_diff, rel=1e-5)
    for sid, name in enumerate(meta.scenarios):
        mine = scenario == sid
        reported = parity.scenarios[name]
        assert reported.rows == int(mine.sum())
        assert reported.auc_model == pytest.approx(roc_auc_score(label[mine], model_logits[mine]), abs=1e-9)
        assert reported.auc_artifact == pytest.approx(roc_auc_score(label[mine], artifact_logits[mine]), abs=1e-9)
        assert reported.auc_drop <= 1e-3


def test_parity_gate_fails_on_a_program_that_differs_from_the_model(run: Path, tmp_path: Path, monkeypatch) -> None:
    class Tampered(ServingModel):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.tables["item"].weight[2:] += 1e-3  # a bug in the serving path, invisible on a few rows by eye

    monkeypatch.setattr(exporter_module, "ServingModel", Tampered)
    with pytest.raises(DataError, match="parity FAILED: max .Δ logit. .* exceeds the bound"):
        export_run(run, tmp_path / "gated", parity_rows=500, progress=False)
    assert not (tmp_path / "gated").exists()  # a failed artifact never takes the name serving reads
    manifest = Manifest.load(tmp_path / "gated.parity-failed")  # kept for inspection, and marked
    assert not manifest.parity.passed and manifest.parity.rows == 500 and manifest.parity.max_abs_logit_diff > 1e-5
    kept = export_run(run, tmp_path / "kept", parity_rows=500, parity_gate=False, progress=False)
    assert not kept.parity.passed


def test_parity_gate_fails_with_an_absurd_bound_and_the_cli_exits_non_zero(run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "int8"
    export_run(run, out, parity_rows=300, progress=False)  # a good artifact the failing export must not touch
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code = main(["export", "--run", str(run), "--out", str(out), "--precision", "item=int8", "--parity_rows", "300",
                 "--max_logit_diff", "1e-9", "--overwrite", "--quiet"])
    assert code == 2
    assert "parity FAILED" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    parity = Manifest.load(tmp_path / "int8.parity-failed").parity
    assert parity.tolerance == 1e-9 and parity.max_auc_drop == 1e-3 and not parity.passed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8", "int8.parity-failed"]  # no staging left behind
    with pytest.raises(DataError, match="holds an earlier output; pass --overwrite"):
        export_run(run, out, progress=False)


def test_non_finite_logits_are_named_as_the_parity_failure(run: Path, tmp_path: Path, monkeypatch) -> None:
    class Broken(ServingModel):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.tables["item"].weight[:] = float("nan")  # what a run trained on NaN features gives

    monkeypatch.setattr(exporter_module, "ServingModel", Broken)
    with pytest.raises(DataError, match="parity FAILED: non-finite logits"):
        export_run(run, tmp_path / "nan", parity_rows=200, progress=False)


def test_export_refuses_an_output_inside_the_run(run: Path, capsys) -> None:
    code = main(["export", "--run", str(run), "--out", str(run / "artifact"), "--quiet"])
    assert code == 2 and "overlaps --run" in capsys.readouterr().err
    assert not (run / "artifact").exists()


def test_cli_rejects_a_bad_precision_spec_naming_the_tables(run: Path, tmp_path: Path, capsys, meta) -> None:
    code = main(["export", "--run", str(run), "--out", str(tmp_path / "x"), "--precision", "items=int8", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "'items'" in err and str(embedding_table_names(meta)) in err
    assert not (tmp_path / "x").exists()  # nothing written


@pytest.mark.slow
def test_aoti_package_scores_like_the_eager_model(run: Path, batch, meta, tmp_path: Path) -> None:
    manifest = export_run(run, tmp_path / "aoti", aoti=True, parity_rows=1000, progress=False)
    assert manifest.aoti and AOTI_FILE in manifest.files and manifest.parity.passed
    assert any(note.startswith(f"{AOTI_FILE}: max |Δ logit|") for note in manifest.notes)
    package = torch._inductor.aoti_load_package(str(tmp_path / "aoti" / AOTI_FILE))
    inputs = batch_to_inputs(batch, input_schema(meta))
    with torch.no_grad():
        expected = eager_model(run)(batch)
        for rows in (1, 7, ROWS):
            torch.testing.assert_close(package(*(x[:rows] for x in inputs))[0], expected[:rows], rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "aoti" / "manifest.json").read_text())["aoti"] is True


@pytest.mark.parametrize("variant", ["msit", "star"])
def test_bf16_compute_runs_the_dense_part_in_bf16_close_to_the_model(meta, batch, variant: str) -> None:
    model = trained_like(meta, variant, SequencePath.POOLED_BAGS)
    serving = ServingModel(model, meta, {}, compute="bf16")
    output_layer = {id(p) for p in serving.head.tower.mlp.out.parameters()}
    assert {p.dtype for p in serving.head.parameters() if id(p) not in output_layer} == {torch.bfloat16}
    assert {p.dtype for p in serving.head.tower.mlp.out.parameters()} == {torch.float32}  # the logit's resolution
    assert {t.weight.dtype for t in serving.tables.values()} == {torch.float32}  # tables keep their own precision
    with torch.no_grad():
        expected = model(batch)
        got, attention = serving(*batch_to_inputs(batch, input_schema(meta)))
    assert got.dtype == attention.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: the logits move by a few hundredths at most, and rank the rows alike
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert np.corrcoef(got.numpy(), expected.numpy())[0, 1] > 0.999
    assert got.unique().numel() > 0.95 * got.numel()  # fp32 logits: no ties from bf16's 8-bit mantissa


def test_bf16_compute_artifact_is_checked_on_the_auc(run: Path, tmp_path: Path) -> None:
    if not exporter_module.native_bf16_flags():
        pytest.skip("this CPU has no native bf16 products: export --compute bf16 refuses (tested below)")
    # the fixture's run trained 8 steps: its logits barely spread (AUC 0.3-0.5 on 122-1,528 rows), so the few
    # pairs bf16 reorders move its AUC more than a trained model's (the demo model: drop <= 0.0002 per scenario)
    manifest = export_run(run, tmp_path / "bf16", compute="bf16", max_auc_drop=0.005, progress=False)
    assert manifest.compute == "bf16" and Manifest.load(tmp_path / "bf16").compute == "bf16"
    parity = manifest.parity
    assert parity.passed and parity.tolerance is None and parity.max_auc_drop == 0.005
    assert 0 < parity.max_abs_logit_diff < 0.01
    assert all(s.auc_drop <= 0.005 for s in parity.scenarios.values())
    assert "bf16 dense products" in export_summary(manifest)


def test_bf16_compute_is_refused_where_bf16_is_emulated(run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(exporter_module, "native_bf16_flags", list)
    code = main(["export", "--run", str(run), "--out", str(tmp_path / "art"), "--compute", "bf16", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--compute bf16" in err and "no native bf16" in err and "--compute fp32" in err
    assert not (tmp_path / "art").exists()
