"""Tables of the cross-dataset transfer study (``scripts/study_transfer.py``): results, goals, the trust check."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable

from study_table import cell


def _values(done: dict[str, dict], dataset: str, cell_name: str, method: str, budget: str,
            seeds: list[int], field: str = "top1") -> list:
    out = []
    for seed in seeds:
        row = done.get(json.dumps([dataset, cell_name, method, budget, seed]))
        if row is not None:
            out.append(row.get(field) if field != "row" else row)
    return out


def _mean(values: list[float]) -> float | None:
    return statistics.mean(values) if values else None


def _spread(*groups: list[float]) -> float:
    return max((statistics.stdev(g) for g in groups if len(g) > 1), default=0.0)


def ceiling_cell(dataset: str, name: str) -> str:
    from study_transfer import ceiling_cell as canonical

    return canonical(dataset, name)


def result_table(done, dataset: str, cells: list[str], columns: list[tuple[str, str]], seeds: list[int],
                 noise: dict[str, float]) -> list[str]:
    """Per cell: realised noise, the ceiling, every method's top-1 and the share of the noisy-ERM-to-ceiling gap
    it recovers (at its own budget's ERM)."""
    head = "| cell | noise | ceiling | " + " | ".join(f"{m}@{b}" for m, b in columns) + " |"
    lines = [head, "|---" * (3 + len(columns)) + "|"]
    for name in cells:
        ceilings = _values(done, dataset, ceiling_cell(dataset, name), "ceiling", "study", seeds)
        ceiling = _mean(ceilings)
        parts = [name, f"{100 * noise[name]:.1f}%", cell(ceilings)]
        for method, budget in columns:
            got = _values(done, dataset, name, method, budget, seeds)
            erm = _mean(_values(done, dataset, name, "erm", budget, seeds))
            text = cell(got)
            if got and method != "erm" and erm is not None and ceiling is not None and ceiling - erm > 0.5 \
                    and budget == "study":
                text += f" ({100 * (_mean(got) - erm) / (ceiling - erm):+.0f}%)"
            parts.append(text)
        lines.append("| " + " | ".join(parts) + " |")
    return lines


def goal_lines(done, dataset: str, cells: list[str], nets: list[str], budgets: list[str], seeds: list[int],
               noise: dict[str, float]) -> list[str]:
    """Transfer with apply's defaults vs ERM at the same budget: not below by more than the spread; +3 at >= 20%."""
    lines = ["| cell | net | budget | transfer - ERM | spread | not worse | +3 at >= 20% noise | check fired |",
             "|---|---|---|---|---|---|---|---|"]
    for name in cells:
        for net in nets:
            for budget in budgets:
                got = _values(done, dataset, name, net, budget, seeds)
                erm = _values(done, dataset, name, "erm", budget, seeds)
                if len(got) < 2 or len(erm) < 2:
                    continue
                diff = statistics.mean(got) - statistics.mean(erm)
                spread = _spread(got, erm)
                plus3 = ("yes" if diff >= 3 else "**no**") if noise[name] >= 0.2 else "n/a"
                fired = sum(1 for r in _values(done, dataset, name, net, budget, seeds, "row")
                            if (r.get("trust") or {}).get("verdict") == "distrust")
                lines.append(f"| {name} | {net} | {budget} | {diff:+.1f} | {spread:.1f} | "
                             f"{'yes' if diff >= -spread else '**no**'} | {plus3} | {fired}/{len(got)} |")
    return lines


def report(done: dict[str, dict], datasets: list[str], seeds: list[int],
           realised_noise: Callable[[str, str, list[int]], float]) -> None:
    from study_transfer import TARGETS

    for dataset in datasets:
        target = TARGETS[dataset]
        cells = list(target["cells"])
        noise = {c: realised_noise(dataset, c, seeds) for c in cells}
        fixed = [("erm", "study"), ("class-balanced", "study"), ("mwnet", "study"), ("cmwnet", "study")] \
            if target["meta_trained"] else [("erm", "study")]
        columns = fixed + [(net, "study") for net in target["nets"]] + [("erm", "short")] + \
            [(net, "short") for net in target["nets"]]
        seconds = sum(r.get("seconds", 0.0) for r in done.values() if r["dataset"] == dataset)
        print(f"\n### {dataset}: clean test top-1 (%), mean ± std over seeds {seeds}; budgets "
              f"{target['budgets']}; {seconds / 3600:.1f} h of single-thread runs\n")
        print("\n".join(result_table(done, dataset, cells, columns, seeds, noise)))
        print()
        print("\n".join(goal_lines(done, dataset, cells, list(target["nets"]), list(target["budgets"]), seeds,
                                   noise)))
