"""Cross-validation splits: stratified, fixed, reused, and a user's file checked."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from dscovid.errors import DscovidError
from dscovid.training.splits import (
    CaseStratum,
    fold_cases,
    load_or_create_splits,
    make_stratified_splits,
    stratum_labels,
)


def _cases(n: int = 100, seed: int = 0) -> dict[str, CaseStratum]:
    rng = np.random.default_rng(seed)
    cases = {}
    for i in range(n):
        class_index = int(rng.choice(3, p=[0.5, 0.3, 0.2]))
        volume = 0.0 if class_index == 2 else float(rng.lognormal(8, 1))
        cases[f"case_{i:03d}"] = CaseStratum(class_index, volume, True)
    return cases


def test_folds_partition_cases_and_balance_every_stratum():
    cases = _cases()
    splits = make_stratified_splits(cases, 10, seed=1)
    assert len(splits) == 10
    vals = [set(f["val"]) for f in splits]
    assert set().union(*vals) == set(cases) and sum(map(len, vals)) == len(cases)  # each case validated once
    for fold in splits:
        assert set(fold["train"]) | set(fold["val"]) == set(cases) and not set(fold["train"]) & set(fold["val"])
    assert max(map(len, vals)) - min(map(len, vals)) <= 1
    labels = stratum_labels(cases)
    for stratum in Counter(labels.values()):
        per_fold = [sum(labels[c] == stratum for c in v) for v in vals]
        assert max(per_fold) - min(per_fold) <= 1, (stratum, per_fold)  # as even as the stratum allows
    # terciles of lesion volume inside each class with lesions; non-pneumonia is one stratum
    assert {s for s in labels.values() if s.startswith("c0")} == {"c0_t0", "c0_t1", "c0_t2"}
    assert {s for s in labels.values() if s.startswith("c2")} == {"c2_none"}


def test_splits_are_fixed_by_the_seed():
    cases = _cases(40)
    assert make_stratified_splits(cases, 10, 7) == make_stratified_splits(dict(reversed(cases.items())), 10, 7)
    assert make_stratified_splits(cases, 10, 7) != make_stratified_splits(cases, 10, 8)


def test_small_strata_still_valid():
    # 12 cases, strata of 1-5 cases: fewer cases than folds per stratum
    cases = {f"c{i}": CaseStratum(i % 3, float(i) if i % 3 != 2 else 0.0) for i in range(12)}
    splits = make_stratified_splits(cases, 10)
    assert all(f["val"] for f in splits) and sorted(sum((f["val"] for f in splits), [])) == sorted(cases)
    with pytest.raises(DscovidError, match="too few for 10 folds"):
        make_stratified_splits({f"c{i}": CaseStratum(0, 1.0) for i in range(5)}, 10)


def test_written_once_then_reused(tmp_path):
    cases = _cases(30)
    first = load_or_create_splits(tmp_path, cases, 10, seed=3)
    on_disk = json.loads((tmp_path / "splits_final.json").read_text(encoding="utf-8"))
    assert on_disk == first
    # a different seed later does not rewrite the file: the folds of a dataset never change under a run
    assert load_or_create_splits(tmp_path, cases, 10, seed=99) == first


def test_user_file_is_respected_and_checked(tmp_path):
    cases = _cases(20)
    names = sorted(cases)
    user = [{"train": [n for n in names if n != v], "val": [v]} for v in names[:10]]
    path = tmp_path / "splits_final.json"
    path.write_text(json.dumps(user))
    assert load_or_create_splits(tmp_path, cases, 10) == user  # 10 cases never validated: allowed, logged

    bad_cases = [{**f, "val": ["ghost"]} if i == 3 else f for i, f in enumerate(user)]
    path.write_text(json.dumps(bad_cases))
    with pytest.raises(DscovidError, match="fold 3 names cases that are not in the preprocessed dataset: ghost"):
        load_or_create_splits(tmp_path, cases, 10)

    overlap = [{"train": f["train"] + f["val"], "val": f["val"]} for f in user]
    path.write_text(json.dumps(overlap))
    with pytest.raises(DscovidError, match="fold 0 has cases in both train and val"):
        load_or_create_splits(tmp_path, cases, 10)

    path.write_text(json.dumps(user[:5]))
    with pytest.raises(DscovidError, match="holds 5 folds, expected 10"):
        load_or_create_splits(tmp_path, cases, 10)

    path.write_text("{not json")
    with pytest.raises(DscovidError, match="not valid JSON"):
        load_or_create_splits(tmp_path, cases, 10)


def test_fold_all_and_bad_fold():
    splits = make_stratified_splits(_cases(20), 10)
    train, val = fold_cases(splits, "all", sorted(_cases(20)))
    assert len(train) == 20 and val == []
    with pytest.raises(DscovidError, match="fold must be 0-9 or 'all'"):
        fold_cases(splits, 10, [])
