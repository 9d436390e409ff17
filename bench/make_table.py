"""Render benchmark rows (bench/results/*.jsonl) as a markdown table for the README.

    python bench/make_table.py                          # every results file, latest row per measurement
    python bench/make_table.py bench/results/bench_e2e.jsonl --all

A measurement is (bench, device, case, shape, dtype, metric, impl); by default only its newest row is shown.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ("device", "case", "shape", "dtype", "metric", "impl", "median", "baseline", "ratio")


def read_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                print(f"{path}:{n}: skipped, not JSON ({e})", file=sys.stderr)
    return rows


def latest(rows: list[dict]) -> list[dict]:
    """The newest row of each measurement, in the order measurements first appear."""
    newest: dict[tuple, dict] = {}
    for row in rows:
        key = tuple(row.get(k) for k in ("bench", "device", "case", "shape", "dtype", "metric", "impl"))
        if key not in newest or str(row.get("time", "")) >= str(newest[key].get("time", "")):
            newest[key] = row
    return list(newest.values())


def number(x) -> str:
    if x is None:
        return "–"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def cells(row: dict) -> list[str]:
    baseline = row.get("baseline")
    base = f"{number(row.get('baseline_median'))} ({baseline})" if baseline else "–"
    ratio = f"{row['ratio']:.2f}×" if row.get("ratio") is not None else "–"
    return [row.get("device", "?"), row.get("case", "?"), row.get("shape", ""), row.get("dtype", ""),
            row.get("metric", ""), row.get("impl", ""), number(row.get("median")), base, ratio]


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", type=Path, help="results files (default: bench/results/*.jsonl)")
    p.add_argument("--all", action="store_true", help="every row, not only the newest of each measurement")
    args = p.parse_args(argv)
    paths = args.files or sorted(RESULTS.glob("*.jsonl"))
    rows = read_rows(paths)
    if not rows:
        sys.exit(f"no rows in {', '.join(map(str, paths)) or RESULTS}")
    rows = rows if args.all else latest(rows)
    print(table(rows))
    commits = sorted({str(r.get("commit")) for r in rows})
    print(f"\nMedians of repeated runs after warm-up; ratio > 1: smolvlm_fast is faster. Commit(s): {', '.join(commits)}.")


if __name__ == "__main__":
    main()
