"""Raw scoring requests rebuilt from prepared examples, to smoke-test an exported artifact with `msit-rec predict`.

Each sampled example goes back to the raw request schema of msit_rec/serving/request.py: encoded ids become raw ids
through the vocabularies, dense features are de-normalised with the train statistics, and the history becomes a list
of behaviour objects, oldest first. Out-of-vocabulary ids have no raw value: they become null (a raw id no vocabulary
holds for the user and item ids, which may not be null), so they encode to OOV again. Hashed ids cannot be inverted
and become null too, so a dataset with hashed features gets requests that only approximate its examples. The
example's label rides along (`label`), which predict keeps next to the score.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from msit_rec import option_defaults as defaults
from msit_rec.data.spec import BEHAVIOUR_FEEDBACK, BEHAVIOUR_SCENARIO, OOV_INDEX, DatasetMeta, FeatureSpec
from msit_rec.errors import ConfigError, DataError
from msit_rec.outputs import staged_file

UNKNOWN_ID = "<oov>"  # raw user/item id standing for an out-of-vocabulary one (null is not allowed there)


def _inverse_vocabularies(meta: DatasetMeta, root: Path) -> dict[str, dict[int, Any]]:
    """feature name → {index: raw value} for every vocab-encoded sparse feature and the behaviours' feedback."""
    inverse = {}
    feedback = [meta.behaviour_feedback] if meta.behaviour_feedback is not None else []
    for spec in [*meta.features_of_kind("sparse"), *feedback]:
        if spec.vocabulary is not None:
            vocab = pl.read_parquet(root / spec.vocabulary, columns=["raw", "index"])
            inverse[spec.name] = dict(zip(vocab["index"].to_list(), vocab["raw"].to_list(), strict=True))
    return inverse


def requests_from_examples(
    data_dir: str | Path, split: str = defaults.SPLIT, rows: int = defaults.REQUEST_ROWS
) -> list[dict]:
    """The first `rows` examples of `split` (in the split's time order) as raw request objects."""
    root = Path(data_dir)
    meta = DatasetMeta.load(root)
    if split not in meta.splits:
        raise ConfigError(f"--split {split!r}: dataset {root} has splits {sorted(meta.splits)}")
    files = [root / name for name in meta.splits[split].files]
    if not files or meta.splits[split].rows == 0:
        raise DataError(f"{root}: split '{split}' has no rows to build requests from")
    return decode_examples(meta, root, pl.scan_parquet(files).head(rows).collect())


def decode_examples(meta: DatasetMeta, root: Path, frame: pl.DataFrame) -> list[dict]:
    """Every example row of `frame` (the examples' columns) as a raw request object; `root` holds dataset.json."""
    inverse = _inverse_vocabularies(meta, root)
    columns = meta.config.get("columns", {})
    required = {columns.get("user", "user_id"), columns.get("item", "item_id")}

    def raw(spec: FeatureSpec, index: int) -> Any:
        value = inverse.get(spec.name, {}).get(index) if index != OOV_INDEX else None
        return UNKNOWN_ID if value is None and spec.source in required else value

    sparse = meta.features_of_kind("sparse")
    behaviour_fields = [  # (sequence column, raw field, the feature whose vocabulary decodes it) — scenario aside
        (spec.name, spec.source, spec) if spec.role == BEHAVIOUR_FEEDBACK
        else (spec.name, meta.feature(spec.source).source, meta.feature(spec.source))
        for spec in meta.features_of_kind("sequence") if spec.role != BEHAVIOUR_SCENARIO
    ]
    scenario_field = meta.features_of_kind("scenario")[0].source
    requests = []
    for example in frame.iter_rows(named=True):
        request: dict[str, Any] = {spec.source: raw(spec, example[spec.name]) for spec in sparse}
        for spec in meta.features_of_kind("dense"):
            stats = meta.numeric_stats[spec.name]
            request[spec.source] = float(example[spec.name]) * stats.std + stats.mean
        request[scenario_field] = meta.scenarios[example["scenario"]]
        request["history"] = [
            {
                **{field: raw(feature, example[column][j]) for column, field, feature in behaviour_fields},
                # precomputed histories carry no scenario per behaviour: prepare gives them the example's
                scenario_field: meta.scenarios[example["hist_scenario"][j] if "hist_scenario" in example
                                               else example["scenario"]],
            }
            for j in range(example["hist_len"])
        ]
        request["label"] = int(example["label"])
        requests.append(request)
    return requests


def write_requests(requests: list[dict], out: str | Path, overwrite: bool = False) -> Path:
    """JSON lines, one request per line (the input format of `msit-rec predict`).

    Written to a temporary sibling that replaces `out` only when complete, so a failure keeps an earlier file.
    """
    out = Path(out)
    with staged_file(out, overwrite) as tmp, open(tmp, "w") as handle:
        handle.writelines(json.dumps(request) + "\n" for request in requests)
    return out
