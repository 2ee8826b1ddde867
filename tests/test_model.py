"""The whole ranking model on real prepared batches: path parity, lookups, gradients, padding, scenario paths, bad
configs.

Oracles: the other sequence path with the same weights, table rows indexed by hand, the set of ids a batch looks up,
the same model with more empty bags, permuted/sliced batches, and a stubbed gate. Models run unsharded on the CPU
(tables as ordinary tensors); the sharded runs are in tests/test_training.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from msit_rec.config import from_dict
from msit_rec.data.arrow_kjt import ROW_INDEX_COLUMN, BatchLayout, table_to_batch
from msit_rec.data.batch import Batch
from msit_rec.data.loader import padding_table
from msit_rec.data.spec import DatasetMeta
from msit_rec.errors import ConfigError, MsitError
from msit_rec.fit_config import VARIANTS, FitConfig, ModelConfig, SequencePath, TrainerConfig
from msit_rec.model import RankingModel
from msit_rec.train.fit import fit
from msit_rec.train.optim import dense_param_groups
from tests.random_model import GATED, random_model

ROWS = 512
UNGATED = sorted(set(VARIANTS) - {GATED})


@pytest.fixture(scope="module")
def meta(small_examples: Path) -> DatasetMeta:
    return DatasetMeta.load(small_examples)


@pytest.fixture(scope="module")
def rows(small_examples: Path, meta: DatasetMeta) -> pa.Table:
    """The first ROWS validation rows (late in time: long histories) with the loader's columns and row index."""
    layout = BatchLayout.from_meta(meta)
    table = pq.read_table(small_examples / meta.splits["valid"].files[0], columns=list(layout.expected_types()))
    table = table.slice(0, ROWS)
    table = table.append_column(ROW_INDEX_COLUMN, pa.array(np.arange(table.num_rows, dtype=np.int64)))
    assert set(table["scenario"].to_pylist()) == set(range(len(meta.scenarios))), "every scenario in the batch"
    lengths = np.asarray(table["hist_len"])
    assert lengths.min() == 0 and lengths.max() == meta.history.max_len, "empty and full histories both present"
    return table


def to_batch(table: pa.Table, meta: DatasetMeta) -> Batch:
    return table_to_batch(table.combine_chunks(), BatchLayout.from_meta(meta))


def logits(net: RankingModel, batch: Batch) -> torch.Tensor:
    net.eval()
    with torch.no_grad():
        return net(batch)


def with_features(meta: DatasetMeta, **changes: dict) -> DatasetMeta:
    """`meta` with some features' fields changed, e.g. `hist_item={"embedding_dim": 8}`."""
    features = [dataclasses.replace(f, **changes.get(f.name, {})) for f in meta.features]
    return dataclasses.replace(meta, features=features)


def without_feature(meta: DatasetMeta, name: str) -> DatasetMeta:
    return dataclasses.replace(meta, features=[f for f in meta.features if f.name != name])


# ---- the two sequence paths ----------------------------------------------------------------------------


def collection_key(key: str) -> str:
    return key.replace("embeddings.sequences.embedding_bags.", "embeddings.sequences.embeddings.")


@pytest.mark.parametrize("variant", ["msit", "din", "shared"])
def test_sequence_paths_give_the_same_logits_and_table_gradients(meta, rows, variant: str) -> None:
    batch = to_batch(rows, meta)
    pooled = random_model(meta, variant, sequence_path=SequencePath.POOLED_BAGS)
    collection = random_model(meta, variant, seed=1, sequence_path=SequencePath.EMBEDDING_COLLECTION)
    before = logits(collection, batch)
    # strict load: the state dicts differ in exactly these key names, nothing else
    collection.load_state_dict({collection_key(k): v for k, v in pooled.state_dict().items()})
    expected = logits(pooled, batch)
    assert not torch.allclose(before, expected), "the copied weights must matter (the check would be vacuous)"
    torch.testing.assert_close(logits(collection, batch), expected, rtol=1e-5, atol=1e-6)

    grads = {}
    for name, net in (("pooled", pooled), ("collection", collection)):
        net.train()
        F.binary_cross_entropy_with_logits(net(batch), batch.label).backward()
        grads[name] = {collection_key(k): p.grad for k, p in net.named_parameters() if "sequences" in k}
    assert grads["pooled"].keys() == grads["collection"].keys() and len(grads["pooled"]) == 2  # item, category
    for key, grad in grads["pooled"].items():
        assert grad.abs().sum() > 0, key
        torch.testing.assert_close(grads["collection"][key], grad, rtol=1e-5, atol=1e-7, msg=key)


# ---- gradients ------------------------------------------------------------------------------------------


def looked_up_ids(batch: Batch, meta: DatasetMeta) -> dict[str, set[int]]:
    """Table name → the ids the batch looks up in it (every single-valued and sequence feature on the table)."""
    ids: dict[str, set[int]] = {}
    for kjt in (batch.sparse, batch.sequence):
        for key, jagged in kjt.to_dict().items():
            spec = meta.feature(key)
            if spec.table == "scenario":
                continue  # hist_scenario indexes the dense scenario embedding, not a TorchRec table
            ids.setdefault(spec.table, set()).update(jagged.values().tolist())
    return ids


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_gradients_reach_every_table_row_used_and_every_dense_layer(meta, rows, variant: str) -> None:
    batch = to_batch(rows, meta)
    net = random_model(meta, variant).train()
    F.binary_cross_entropy_with_logits(net(batch), batch.label).backward()
    used = looked_up_ids(batch, meta)
    tables = 0
    for name, param in net.named_parameters():
        assert param.grad is not None, f"{variant}: {name} got no gradient"
        if name.startswith("embeddings."):
            table = name.split(".")[-2]
            touched = set(torch.nonzero(param.grad.abs().sum(dim=1)).flatten().tolist())
            assert touched == used[table], f"{variant}: rows of table {table} with a gradient != rows looked up"
            tables += 1
        else:
            assert param.grad.abs().sum() > 0, f"{variant}: dense parameter {name} got a zero gradient"
    assert tables == len(meta.tables()) - 1  # every TorchRec table (all but the dense scenario embedding)


# ---- padding and row independence ---------------------------------------------------------------------


def table_weight(module: torch.nn.Module, table: str) -> torch.Tensor:
    """The weight of `table` in a TorchRec EmbeddingBagCollection or EmbeddingCollection."""
    return next(p for name, p in module.named_parameters() if name.split(".")[-2] == table)


def summed_rows(weight: torch.Tensor, jagged) -> torch.Tensor:
    """Row b: the sum of `weight`'s rows at the ids of example b (a pooled lookup by hand)."""
    example = torch.repeat_interleave(torch.arange(jagged.lengths().numel()), jagged.lengths())
    out = weight.new_zeros(jagged.lengths().numel(), weight.shape[1])
    return out.index_add_(0, example, weight[jagged.values()])


@pytest.mark.parametrize("path", list(SequencePath), ids=lambda p: p.value)
def test_each_sequence_path_looks_up_the_rows_of_the_batch_ids(meta, rows, path: SequencePath) -> None:
    """pooled [B, U], target [B, D] and the N real behaviours [N, D] equal the table rows at the batch's ids, indexed
    by hand (the target's and the behaviours' slots concatenated in slot order, item then category)."""
    batch = to_batch(rows, meta)
    net = random_model(meta, sequence_path=path)
    with torch.no_grad():
        pooled, target, behaviours = net.embeddings(batch.sparse, batch.sequence, batch.hist_len)
    sparse, sequence = batch.sparse.to_dict(), batch.sequence.to_dict()
    layout, tables = net.embeddings.layout, net.embeddings.sequences
    expected_target = torch.cat([summed_rows(table_weight(tables, slot.table), sparse[slot.target])
                                 for slot in layout.slots], dim=1)
    expected_behaviours = torch.cat([table_weight(tables, slot.table)[sequence[slot.sequence].values()]
                                     for slot in layout.slots], dim=1)
    expected_pooled = torch.cat([summed_rows(table_weight(net.embeddings.bags, meta.feature(name).table or name),
                                             sparse[name]) for name in layout.bag_features], dim=1)
    assert behaviours.shape == (int(batch.hist_len.sum()), layout.sequence_dim) and len(layout.slots) == 2
    torch.testing.assert_close(target, expected_target, rtol=0, atol=0)
    torch.testing.assert_close(behaviours, expected_behaviours, rtol=0, atol=0)
    torch.testing.assert_close(pooled, expected_pooled, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pooling", ["sum", "softmax"])
def test_more_empty_bags_do_not_change_logits(meta, rows, pooling: str) -> None:
    """`pooled_bags` looks up a fixed B·(L+1) bags whatever the batch holds (targets, real behaviours, then empty
    bags, so every rank of a sharded table sees the same batch size). The same weights with a max_len 13 longer look
    up 13·B more empty bags and give the same logits. (`embedding_collection` reads no max_len: nothing to vary.)"""
    batch = to_batch(rows, meta)
    path = SequencePath.POOLED_BAGS
    short = random_model(meta, sequence_path=path, pooling=pooling)
    longer_meta = dataclasses.replace(meta, history=dataclasses.replace(meta.history, max_len=meta.history.max_len + 13))
    longer = random_model(longer_meta, seed=1, sequence_path=path, pooling=pooling)
    longer.load_state_dict(short.state_dict())
    bags: dict[str, int] = {}
    for name, net in (("short", short), ("longer", longer)):
        record = lambda _, args, name=name: bags.update({name: args[0].stride()})
        net.embeddings.sequences.register_forward_pre_hook(record)
    torch.testing.assert_close(logits(longer, batch), logits(short, batch), rtol=1e-5, atol=1e-6)
    assert bags == {"short": ROWS * (meta.history.max_len + 1), "longer": ROWS * (meta.history.max_len + 14)}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rows_are_scored_independently_of_their_batch(meta, rows, variant: str) -> None:
    """Permuting rows permutes logits; a row scores the same alone, among others, and next to padding rows."""
    net = random_model(meta, variant)
    full = logits(net, to_batch(rows, meta))
    permutation = np.random.default_rng(0).permutation(rows.num_rows)
    torch.testing.assert_close(logits(net, to_batch(rows.take(permutation), meta)), full[permutation])
    torch.testing.assert_close(logits(net, to_batch(rows.slice(10, 7), meta)), full[10:17])
    padded = pa.concat_tables([rows.slice(0, 5), padding_table(rows.schema, 9)])
    torch.testing.assert_close(logits(net, to_batch(padded, meta))[:5], full[:5])


# ---- behaviours from another scenario -------------------------------------------------------------------


def shifted_behaviour_scenarios(table: pa.Table, num_scenarios: int) -> pa.Table:
    """Every behaviour moved to another scenario (s_j → s_j + 1 mod S); items, categories and lengths kept."""
    column = table["hist_scenario"].combine_chunks()
    shifted = pc.add(column.values, 1)
    shifted = pc.if_else(pc.equal(shifted, num_scenarios), 0, shifted)
    moved = type(column).from_arrays(column.offsets, shifted)
    return table.set_column(table.schema.get_field_index("hist_scenario"), "hist_scenario", moved)


@pytest.mark.parametrize("variant", UNGATED)
def test_behaviour_scenario_is_ignored_without_a_gate(meta, rows, variant: str) -> None:
    net = random_model(meta, variant)
    moved = shifted_behaviour_scenarios(rows, len(meta.scenarios))
    assert torch.equal(logits(net, to_batch(moved, meta)), logits(net, to_batch(rows, meta)))


def test_behaviour_scenario_changes_msit_only_through_the_gate(meta, rows, monkeypatch) -> None:
    net = random_model(meta, GATED)
    moved = shifted_behaviour_scenarios(rows, len(meta.scenarios))
    original, changed = logits(net, to_batch(rows, meta)), logits(net, to_batch(moved, meta))
    has_history = torch.from_numpy(np.asarray(rows["hist_len"]) > 0)
    change = (original - changed).abs()
    assert (change[has_history] > 0).all() and change.max() > 1e-4  # the gate sees s_j: every such row moves
    assert torch.equal(original[~has_history], changed[~has_history])  # nothing to gate, nothing changes

    gate_values = net.head.gate.values_packed  # the same gate, told every behaviour happened in scenario 0
    monkeypatch.setattr(net.head.gate, "values_packed",
                        lambda b, own, s, table, feedback, age: gate_values(b, torch.zeros_like(own), s, table, feedback, age))
    assert torch.equal(logits(net, to_batch(moved, meta)), logits(net, to_batch(rows, meta)))


# ---- bad configs: clear errors before any training --------------------------------------------------------


def test_unknown_variant_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"model\.variant.*'msit'.*got 'mist'"):
        from_dict(FitConfig, {"model": {"variant": "mist"}}, "fit")


def write_dataset_json(meta: DatasetMeta, directory: Path) -> Path:
    directory.mkdir(parents=True)
    meta.save(directory / "dataset.json")
    return directory


def small_fit_config(**trainer) -> FitConfig:
    return FitConfig(model=ModelConfig(tower_hidden=[32, 16]), trainer=TrainerConfig(progress_bar=False, **trainer))


def test_shared_table_dim_mismatch_fails_fit_before_training(meta, tmp_path: Path) -> None:
    crafted = write_dataset_json(with_features(meta, hist_item={"embedding_dim": 8}), tmp_path / "data")
    written = {f["name"]: f["embedding_dim"] for f in json.loads((crafted / "dataset.json").read_text())["features"]}
    assert (written["item"], written["hist_item"]) == (16, 8)
    with pytest.raises(ConfigError, match=r"'item' and 'hist_item' share table 'item'.*16/\d+ vs 8/\d+"):
        fit(small_fit_config(), crafted, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_embedding_collection_needs_equal_sequence_dims(meta, rows) -> None:
    narrow = with_features(meta, category={"embedding_dim": 8}, hist_cat={"embedding_dim": 8})
    with pytest.raises(ConfigError, match=r"embedding_collection.*\[8, 16\].*pooled_bags"):
        random_model(narrow, sequence_path=SequencePath.EMBEDDING_COLLECTION)
    out = logits(random_model(narrow, sequence_path=SequencePath.POOLED_BAGS), to_batch(rows, narrow))  # that path can
    assert out.shape == (ROWS,) and torch.isfinite(out).all()


def test_more_devices_than_the_host_has_fails_fit_before_training(small_examples: Path, tmp_path: Path) -> None:
    with pytest.raises(MsitError, match=r"devices=64 but this host has only \d+ CPU cores"):
        fit(small_fit_config(devices=64), small_examples, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_gated_variant_on_a_dataset_without_behaviour_scenarios_is_a_config_error(meta) -> None:
    with pytest.raises(ConfigError, match="behaviour-scenario sequence"):
        random_model(without_feature(meta, "hist_scenario"), GATED)


def test_ungated_variant_needs_no_behaviour_scenarios(meta, rows) -> None:
    reduced = without_feature(meta, "hist_scenario")
    out = logits(random_model(reduced, "din"), to_batch(rows, reduced))
    torch.testing.assert_close(out, logits(random_model(meta, "din"), to_batch(rows, meta)))


def test_dataset_without_scenario_feature_is_a_config_error(meta) -> None:
    with pytest.raises(ConfigError, match="scenario"):
        random_model(without_feature(meta, "scenario"), "shared")


def test_attention_scenario_ablation_needs_an_attention_and_switches_the_part() -> None:
    """`model.attention_scenario` overrides the preset (msit's gate carries the scenario, so no preset sets it) and is
    refused, naming the key, on a variant without target attention."""
    assert not ModelConfig(variant="msit").parts.attention_scenario
    assert ModelConfig(variant="msit", attention_scenario=True).parts.attention_scenario
    assert ModelConfig(variant="din").parts == VARIANTS["din"]
    with pytest.raises(ConfigError, match="fit.model: attention_scenario: variant 'shared' has no target attention"):
        from_dict(FitConfig, {"model": {"variant": "shared", "attention_scenario": True}}, "fit")


def test_a_checkpoint_from_before_the_recency_term_scores_as_it_did(meta, rows) -> None:
    """Checkpoints written before the gate's recency term lack r: it loads as 0, the gate those runs trained."""
    trained = random_model(meta, GATED)
    with torch.no_grad():
        trained.head.gate.recency_weight.zero_()  # what an older gate computed
    older = {k: v for k, v in trained.state_dict().items() if not k.endswith("recency_weight")}
    loaded = random_model(meta, GATED, seed=1)
    assert sorted(loaded.absent_from_older_checkpoints(set(older))) == ["head.gate.recency_weight"]
    loaded.load_state_dict({**older, **loaded.absent_from_older_checkpoints(set(older))})
    batch = to_batch(rows, meta)
    assert torch.equal(logits(loaded, batch), logits(trained, batch))
    assert loaded.absent_from_older_checkpoints(set(trained.state_dict())) == {}


@pytest.mark.parametrize(("recency", "profiles"), [("scenario", "S"), ("shared", 1), ("none", None)])
def test_gate_recency_option_sets_the_age_term(meta, rows, recency: str, profiles) -> None:
    """`model.gate_recency`: one age profile per served scenario, one for all, or none (the gate before it)."""
    shape = None if profiles is None else (len(meta.scenarios) if profiles == "S" else profiles, 8)
    net = random_model(meta, GATED, gate_recency=recency)
    weight = net.head.gate.recency_weight
    assert (None if weight is None else tuple(weight.shape)) == shape
    assert logits(net, to_batch(rows, meta)).isfinite().all()
    assert ("head.gate.recency_weight" in net.state_dict()) == (shape is not None)


def test_gate_recency_needs_a_gated_variant() -> None:
    with pytest.raises(ConfigError, match="gate_recency.*'din'.*no behaviour gate"):
        from_dict(FitConfig, {"model": {"variant": "din", "gate_recency": "none"}}, "fit")
    with pytest.raises(ConfigError, match="gate_recency"):
        from_dict(FitConfig, {"model": {"gate_recency": "per_scenario"}}, "fit")


@pytest.mark.parametrize(("variant", "recency"), [("msit", "scenario"), ("msit", "shared"), ("msit", "none"),
                                                 ("din", "scenario")])
def test_the_age_profile_learns_at_its_own_rate(meta, rows, variant: str, recency: str) -> None:
    """trainer.optim.recency_lr_scale: the gate's age profile (exactly it) forms the "recency" group at scale ×
    dense_lr. Oracle: AdamW's first step moves every parameter with a gradient by its group's lr (m̂/√v̂ = ±1), so
    after one step r has moved 10× as far as every other parameter; without an age profile there is one group."""
    net = random_model(meta, variant, **({"gate_recency": recency} if variant == GATED else {})).train()
    groups = dense_param_groups(net, net.age_profile, 1e-3, 10.0)
    profiled = variant == GATED and recency != "none"
    assert [g["name"] for g in groups] == (["dense", "recency"] if profiled else ["dense"])
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))  # a partition: every parameter once
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    batch = to_batch(rows, meta)
    F.binary_cross_entropy_with_logits(net(batch), batch.label).backward()
    optimizer.step()
    for name, param in net.named_parameters():
        step = (param.detach() - before[name]).abs().max().item()
        assert step == pytest.approx(1e-2 if name == "head.gate.recency_weight" else 1e-3, rel=1e-3), name


@pytest.mark.parametrize("scale", [0, -1.0, float("inf")])
def test_recency_lr_scale_must_be_a_positive_number(scale: float) -> None:
    with pytest.raises(ConfigError, match=rf"fit.trainer.optim: recency_lr_scale: expected a positive number, got {scale}"):
        from_dict(FitConfig, {"trainer": {"optim": {"recency_lr_scale": scale}}}, "fit")
