"""`ladm-report multirun/<sweep>`: gather every results.json of a sweep into a table.

    python -m ladm.report multirun/demo
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ladm import LadmError

METRIC_ORDER = ("spbleu", "chrf++", "comet", "bleu_spm_unofficial")


def load_results(sweep_dir: Path) -> list[dict]:
    """Every complete results.json below `sweep_dir`, with the folder it came from."""
    results = []
    for path in sorted(sweep_dir.rglob("results.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("status") == "complete":
            results.append(data | {"dir": str(path.parent)})
    if not results:
        raise LadmError(f"no complete results.json under {sweep_dir}: run a sweep there first")
    return results


def markdown_table(results: list[dict]) -> str:
    """Rows = method, columns = pair × measured metric."""
    pairs = sorted({pair for r in results for pair in r["metrics"]})
    measured = [m for m in METRIC_ORDER
                if any(r["metrics"][p].get(m) is not None for r in results for p in r["metrics"])]
    header = ["method"] + [f"{pair} {metric}" for pair in pairs for metric in measured]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(results, key=lambda r: r["method"]):
        cells = [r["method"]]
        for pair in pairs:
            for metric in measured:
                value = r["metrics"].get(pair, {}).get(metric)
                cells.append("–" if value is None else f"{value:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ladm-report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        results = load_results(args.sweep_dir)
    except LadmError as err:
        print(f"ladm-report: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(markdown_table(results))
    skipped = {m: reason for r in results for m, reason in r.get("skipped", {}).items()}
    for metric, reason in skipped.items():
        print(f"\n{metric} not reported: {reason}")


if __name__ == "__main__":
    main()
