"""Mean ± standard deviation over several ``bench_real.py`` runs (one per seed).

    python benchmarks/summarise_real.py RUN.json [RUN.json ...] [--out benchmarks/results/real_seeds.json]

Each run draws its own unlabelled half of val and its own inits, so the spread shows which
differences between rows are larger than seed noise. Prints a Markdown table (mean ± sd)
and the goal check on the means.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_real import COLUMNS, elta_goal_check, goal_check  # noqa: E402
from pipelines.io import write_json  # noqa: E402

KEYS = [k for k, _ in COLUMNS if k != "wall_s"] + ["val_srcc"]


def summarise(runs: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """``{row: {metric: {"mean", "sd", "n"}}}`` over the runs that have the row."""
    rows: dict[str, dict] = {}
    names = list(runs[0]["rows"])
    for name in sorted(names, key=lambda n: (not n.startswith("baseline"), n.startswith("ablation"), n)):
        per = [r["rows"][name] for r in runs if name in r["rows"]]
        rows[name] = {}
        for k in KEYS:
            vals = np.array([p[k] for p in per if p.get(k) is not None], float)
            if len(vals):
                rows[name][k] = {"mean": float(vals.mean()), "sd": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0, "n": len(vals)}
    return rows


def markdown(rows: dict) -> str:
    heads = [h for k, h in COLUMNS if k != "wall_s"] + ["val SRCC"]
    out = ["| model | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for name, r in rows.items():
        cells = [f"{r[k]['mean']:.3f} ± {r[k]['sd']:.3f}" if k in r else "–" for k in KEYS]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "real_seeds.json")
    args = ap.parse_args()
    runs = [json.loads(p.read_text()) for p in args.runs]
    rows = summarise(runs)
    means = {name: {k: v["mean"] for k, v in r.items()} for name, r in rows.items()}
    base = [k for k in means if k.startswith("baseline")]
    goal = goal_check(means, base) if base and "TMCR+ELTA (full)" in means else None
    elta_goal = elta_goal_check(means)
    table = markdown(rows)
    print(table)
    if goal:
        print(json.dumps(goal, indent=1))
    if elta_goal:
        print("ELTA on EMD-MLP (means):", json.dumps(elta_goal, indent=1))
    write_json(args.out, {
        "runs": [str(p) for p in args.runs], "seeds": [r["seed"] for r in runs], "data": runs[0]["data"],
        "rows": rows, "goal_on_means": goal, "elta_goal_on_means": elta_goal, "markdown": table,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
