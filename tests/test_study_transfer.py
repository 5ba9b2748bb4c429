"""``scripts/study_transfer.py``: what the cross-dataset study plans, and that its cache survives a kill."""

import json
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import study_transfer as study  # noqa: E402
from study_table import load_cache  # noqa: E402


def test_the_plan_has_every_method_once_per_cell_seed_and_budget():
    runs = study.planned_runs(["fashion-mnist", "digits"], [0, 1, 2], None)
    keys = [r.key for r in runs]
    assert len(keys) == len(set(keys))
    fm = [r for r in runs if r.dataset == "fashion-mnist"]
    # 5 cells x (erm x 2 budgets, class-balanced, mwnet, cmwnet, 3 nets x 2 budgets) + one ceiling per imbalance
    assert len(fm) == 3 * (5 * (2 + 3 + 6) + 3)
    assert {r.cell for r in fm if r.method == "ceiling"} == {"sym 40%", "sym 20% + IF 10", "IF 50"}
    assert not any(r.method in ("mwnet", "cmwnet", "class-balanced") for r in runs if r.dataset == "digits")


def test_methods_and_budgets_select_a_part():
    runs = study.planned_runs(["digits"], [0], {"erm", "cmw-fmnist"}, {"short"})
    assert {(r.method, r.budget) for r in runs} == {("erm", "short"), ("cmw-fmnist", "short")}
    assert len(runs) == 2 * len(study.TARGETS["digits"]["cells"])
    one = study.planned_runs(["fashion-mnist"], [0], {"erm", "ceiling"}, {"study"}, {"asym 40%"})
    assert [(r.cell, r.method) for r in one] == [("asym 40%", "erm")]  # its ceiling run is sym 40%'s


def test_the_cache_skips_a_line_cut_short_by_a_kill(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps({"key": "a", "top1": 1.0}) + "\n" + '{"key": "b", "to')
    assert load_cache(path) == {"a": {"key": "a", "top1": 1.0}}
    assert load_cache(tmp_path / "missing.jsonl") == {}
