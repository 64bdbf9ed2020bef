"""`ladm-report multirun/<sweep>`: a sweep's results.json files → comparison tables and plots.

Rows are methods (with whatever varies within a method: strength, thresholds, ...), columns are
pairs plus the average and its Δ against LoRA; one table per measured metric, written as Markdown,
CSV and LaTeX. A dagger marks a cell whose paired bootstrap test (sacrebleu, 1000 resamples, on the
saved hypotheses) against LoRA of the same model and pair gives p < 0.05. Plots: the metric against
LaDM's modulation strength per pair, and ΔR per layer for each pair.

    ladm-report multirun/ladm_vs_lora [--out DIR] [--no-wandb]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ladm import LadmError
from ladm.files import read_json, write_text_atomic
from ladm.plots import pyplot, save_figure

METRICS = {"spbleu": "spBLEU", "chrf++": "chrF++", "comet": "COMET", "bleu_spm_unofficial": "BLEU (unofficial SPM)",
           "target_script_ratio": "target-script ratio (share of hypothesis letters in the target's script)"}
BOOTSTRAPPED = {"chrf++", "spbleu"}  # sentence-level COMET scores are not saved, so COMET is not resampled
IGNORED_KEYS = ("pair.", "data.", "name", "cache_dir", "force", "logger.", "eval.comet.", "probe.reference_pair")
GROUPS_READ = {"ladm": ("strength.", "probe.")}  # top-level groups a method reads besides method.*
P_THRESHOLD = 0.05
RESULT_KEYS = ("model", "method", "pairs", "test_set", "n_test", "metrics", "config")


@dataclass
class Job:
    """One complete run of the sweep."""

    path: Path
    results: dict
    row: str = ""
    p_values: dict[tuple[str, str], float] = field(default_factory=dict)

    @property
    def config(self) -> dict:
        return self.results["config"]

    @property
    def model(self) -> str:
        return self.results["model"]


def _flatten(config: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else value
    return flat


def load_sweep(sweep_dir: Path, test_set: str | None = None) -> tuple[list[Job], list[dict]]:
    """Complete jobs and failed ones (with their error) below `sweep_dir`; with `test_set`, every job's scores on
    that test set (from its `test_sets` entry) and jobs not tested on it left out."""
    complete, failed = [], []
    for path in sorted(sweep_dir.rglob("results.json")):
        results = read_json(path, "results file", "re-run that job (or delete its folder)")
        if not isinstance(results, dict):
            raise LadmError(f"{path} holds a JSON {type(results).__name__}, not a ladm results file: re-run that job")
        if results.get("status") == "complete":
            missing = [key for key in RESULT_KEYS if key not in results]
            if missing:
                raise LadmError(f"{path} lacks {', '.join(missing)} (written by another ladm version?): re-run that job")
            if test_set is not None and results["test_set"] != test_set:
                if test_set not in results.get("test_sets", {}):
                    continue
                results = results | {"test_set": test_set, **results["test_sets"][test_set]}
            complete.append(Job(path.parent, results))
        elif results.get("status") == "failed":
            failed.append({"job": str(path.parent.relative_to(sweep_dir)), "error": results.get("error", "?")})
    if not complete:
        raise LadmError(f"no complete results.json under {sweep_dir}"
                        + (f" tested on {test_set}" if test_set else "") + ": run a sweep there first"
                        + (f" ({len(failed)} job(s) failed)" if failed else ""))
    tested: dict[str, set] = defaultdict(set)
    for job in complete:
        for pair in job.results["pairs"]:
            tested[pair].add((job.results["test_set"], job.results["n_test"][pair]))
    for pair, test_sets in tested.items():
        if len(test_sets) > 1:
            shown = ", ".join(f"{name} ({n} sentences)" for name, n in sorted(test_sets))
            raise LadmError(f"pair {pair} was tested on different test sets: {shown}; choose one with --test-set NAME")
    return complete, failed


def label_rows(jobs: list[Job]) -> None:
    """Row label = model (if several) + method + the config keys that vary within that method."""
    several_models = len({job.model for job in jobs}) > 1
    by_method: dict[str, list[Job]] = defaultdict(list)
    for job in jobs:
        by_method[job.results["method"]].append(job)
    for method, group in by_method.items():
        flats = [_flatten(job.config) for job in group]
        unread = tuple(g for g in ("strength.", "probe.") if g not in GROUPS_READ.get(method, ()))
        keys = sorted({k for flat in flats for k in flat
                       if not k.startswith(IGNORED_KEYS + unread) and not k.startswith("model.")})
        varying = [k for k in keys if len({str(flat.get(k)) for flat in flats}) > 1]
        if "strength.name" in varying:
            varying = [k for k in varying if k not in ("strength.alpha", "strength.beta")]
        for job, flat in zip(group, flats, strict=True):
            parts = [job.model] if several_models else []
            parts.append(method)
            parts += [f"{k.removeprefix('method.').removeprefix('strength.name').lstrip('.') or 's'}={flat.get(k)}"
                      if k != "strength.name" else str(flat.get(k)) for k in varying]
            job.row = " ".join(parts)


def read_predictions(job: Job, pair: str, ext: str) -> list[str]:
    path = job.path / "predictions" / job.results["test_set"] / f"{pair}.{ext}"
    if not path.is_file():
        raise LadmError(f"{path} is missing: the significance test needs the saved predictions; re-run that job")
    return path.read_text(encoding="utf-8").splitlines()


def paired_bootstrap(jobs: list[Job], n_samples: int = 1000) -> None:
    """p-values of every job against LoRA of the same model and pair, per resampled metric."""
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    baselines = {(job.model, pair): job for job in jobs if job.results["method"] == "lora" for pair in job.results["pairs"]}
    for job in jobs:
        for pair in job.results["pairs"]:
            baseline = baselines.get((job.model, pair))
            if baseline is None or baseline is job:
                continue
            metrics = {}
            if job.results["metrics"][pair].get("chrf++") is not None:
                metrics["chrf++"] = CHRF(word_order=2)
            if job.results["metrics"][pair].get("spbleu") is not None:
                metrics["spbleu"] = BLEU(tokenize="flores200")
            if not metrics:
                continue
            ours, theirs, refs = read_predictions(job, pair, "hyp"), read_predictions(baseline, pair, "hyp"), \
                read_predictions(baseline, pair, "ref")
            if not len(ours) == len(theirs) == len(refs):
                raise LadmError(f"{pair}: {job.path} has {len(ours)} hypotheses, {baseline.path} {len(theirs)} and "
                                f"{len(refs)} references: the predictions must cover the same test set; re-run the job")
            test = PairedTest([("lora", theirs), ("system", ours)], metrics,
                              references=[refs], test_type="bs", n_samples=n_samples)
            _, scores = test()  # keyed 'System', then each metric's display name, in insertion order
            for metric, name in zip(metrics, list(scores)[1:], strict=True):
                job.p_values[(pair, metric)] = float(scores[name][1].p_value)


@dataclass
class Table:
    metric: str
    pairs: list[str]
    rows: list[tuple[str, list[str | None], float | None, float | None]]  # row, cells, average, Δ vs LoRA


def build_tables(jobs: list[Job]) -> list[Table]:
    pairs = sorted({pair for job in jobs for pair in job.results["pairs"]})
    tables = []
    for metric in METRICS:
        if not any(job.results["metrics"][p].get(metric) is not None for job in jobs for p in job.results["pairs"]):
            continue
        cells: dict[str, dict[str, str]] = defaultdict(dict)
        values: dict[str, dict[str, float]] = defaultdict(dict)
        for job in jobs:
            for pair in job.results["pairs"]:
                value = job.results["metrics"][pair].get(metric)
                if value is None:
                    continue
                significant = job.p_values.get((pair, metric), 1.0) < P_THRESHOLD
                values[job.row][pair] = value
                cells[job.row][pair] = f"{value:.2f}{'†' if significant else ''}"
        average = {row: sum(v.values()) / len(v) for row, v in values.items() if len(v) == len(pairs)}
        lora_rows = [row for row in average if row.split(" ")[-1] == "lora" or row == "lora"]
        rows = []
        for row in sorted(values, key=lambda r: (r.split(" ")[0] != "zero_shot", r.split(" ")[0] != "lora", r)):
            lora_row = next((r for r in lora_rows if r.rsplit(" ", 1)[0] == row.rsplit(" ", 1)[0] or r == "lora"), None)
            delta = average[row] - average[lora_row] if row in average and lora_row in average else None
            rows.append((row, [cells[row].get(p) for p in pairs], average.get(row), delta))
        tables.append(Table(metric, pairs, rows))
    return tables


def _fmt(value: float | None, signed: bool = False) -> str:
    return "–" if value is None else (f"{value:+.2f}" if signed else f"{value:.2f}")


def _share(counted: dict | None) -> str:
    return "–" if counted is None else f"{100 * counted['share']:.1f}% ({counted['count']}/{counted['of']})"


def length_lines(jobs: list[Job]) -> list[str]:
    """Per run and pair: the length budgets and what they cut (METHODS.md §5, lengths)."""
    rows = []
    for job in jobs:
        r = job.results
        for pair in r["pairs"]:
            truncated, hit = r.get("truncated_train", {}).get(pair), r.get("hit_generation_budget", {}).get(pair)
            if truncated is not None or hit is not None:
                rows.append(f"| {job.row} | {pair} | {r.get('train', {}).get('max_length', '–')} | {_share(truncated)} "
                            f"| {r.get('max_new_tokens', {}).get(pair, '–')} | {_share(hit)} |")
    if not rows:
        return []
    return ["", "### Length budgets", "", "| run | pair | train.max_length | truncated training examples "
            "| eval.max_new_tokens | hypotheses that hit the budget |", "|---|---|---:|---:|---:|---:|", *rows]


def to_markdown(tables: list[Table], failed: list[dict], jobs: list[Job]) -> str:
    out = []
    for t in tables:
        out += [f"### {METRICS[t.metric]}", "", "| method | " + " | ".join(t.pairs) + " | avg | Δ avg vs LoRA |",
                "|---|" + "---:|" * (len(t.pairs) + 2)]
        out += [f"| {row} | " + " | ".join(c or "–" for c in cells) + f" | {_fmt(avg)} | {_fmt(delta, True)} |"
                for row, cells, avg, delta in t.rows]
        out.append("")
    out.append(f"† paired bootstrap resampling against LoRA (sacrebleu, 1000 samples): p < {P_THRESHOLD}.")
    out += length_lines(jobs)
    if failed:
        out += ["", "### Failed jobs", ""] + [f"- `{f['job']}`: {f['error']}" for f in failed]
    return "\n".join(out) + "\n"


def to_csv(jobs: list[Job]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["row", "model", "method", "pair", "metric", "value", "p_value_vs_lora", "test_set", "job"])
    for job in sorted(jobs, key=lambda j: j.row):
        for pair in job.results["pairs"]:
            for metric, value in job.results["metrics"][pair].items():
                if value is not None:
                    writer.writerow([job.row, job.model, job.results["method"], pair, metric, value,
                                     job.p_values.get((pair, metric), ""), job.results["test_set"], str(job.path)])
    return buffer.getvalue()


def to_latex(tables: list[Table]) -> str:
    escape = lambda s: s.replace("_", r"\_").replace("%", r"\%").replace("†", r"$^\dagger$")  # noqa: E731
    out = []
    for t in tables:
        out += [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{l" + "r" * (len(t.pairs) + 2) + "}", r"\hline",
                "Method & " + " & ".join(t.pairs) + r" & Avg & $\Delta$ \\", r"\hline"]
        out += [escape(row) + " & " + " & ".join(escape(c or "--") for c in cells)
                + f" & {_fmt(avg)} & {_fmt(delta, True)} \\\\".replace("–", "--") for row, cells, avg, delta in t.rows]
        out += [r"\hline", r"\end{tabular}", rf"\caption{{{METRICS[t.metric]}; $^\dagger$: $p<{P_THRESHOLD}$ against LoRA "
                r"(paired bootstrap, 1000 samples).}", r"\end{table}", ""]
    return "\n".join(out)


def plot_strength(jobs: list[Job], metric: str, path: Path) -> bool:
    """Metric against LaDM strength (alpha) per pair; False when the sweep has fewer than two strengths."""
    points: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for job in jobs:
        if job.results["method"] == "ladm":
            for pair in job.results["pairs"]:
                if (value := job.results["metrics"][pair].get(metric)) is not None:
                    points[pair].append((job.config["strength"]["alpha"], value))
    if len({s for pts in points.values() for s, _ in pts}) < 2:
        return False
    lora = {pair: job.results["metrics"][pair].get(metric) for job in jobs if job.results["method"] == "lora"
            for pair in job.results["pairs"]}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for pair, pts in sorted(points.items()):
        xs, ys = zip(*sorted(pts), strict=True)
        line, = ax.plot(xs, ys, marker="o", label=f"LaDM {pair}")
        if lora.get(pair) is not None:
            ax.axhline(lora[pair], color=line.get_color(), linestyle="--", linewidth=0.8, label=f"LoRA {pair}")
    ax.set_xlabel("modulation strength s (α = β)")
    ax.set_ylabel(METRICS[metric])
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


def plot_delta_r(jobs: list[Job], path: Path) -> bool:
    """ΔR per layer for each pair of the sweep (from the LaDM jobs' recorded probe)."""
    curves = {}
    for job in jobs:
        details = job.results.get("method_details", {})
        if "delta_r" in details:
            curves.setdefault((job.model, details["pair"]), details["delta_r"])
    if not curves:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for (model, pair), delta in sorted(curves.items()):
        ax.plot(range(len(delta)), delta, marker=".", label=f"{model} {pair}" if len({m for m, _ in curves}) > 1 else pair)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("ΔR  (>0: TAL, <0: LIL)")
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


def log_to_wandb(jobs: list[Job], markdown: str, figures: list[Path]) -> None:
    """Log the report into the sweep's W&B group when its runs used W&B."""
    logger = jobs[0].config.get("logger", {})
    if logger.get("name") != "wandb" or logger.get("mode") == "disabled":
        return
    import wandb

    try:
        run = wandb.init(project=logger["project"], entity=logger.get("entity"), group=jobs[0].config["name"],
                         job_type="report", name=f"report-{jobs[0].config['name']}", mode=logger["mode"],
                         dir=str(jobs[0].path.parent), settings=wandb.Settings(silent=True))
        run.log({"report": wandb.Html(f"<pre>{markdown}</pre>"), **{f.stem: wandb.Image(str(f)) for f in figures}})
        run.finish()
    except Exception as err:  # noqa: BLE001 - the files are the report; W&B is a copy
        print(f"ladm-report: W&B logging skipped: {err}", file=sys.stderr)


def report(sweep_dir: Path, out_dir: Path | None = None, wandb_log: bool = True,
           test_set: str | None = None) -> dict[str, Path]:
    """Write report.md, report.csv, report.tex and the plots; returns their paths."""
    jobs, failed = load_sweep(sweep_dir, test_set)
    label_rows(jobs)
    paired_bootstrap(jobs)
    tables = build_tables(jobs)
    out_dir = out_dir or sweep_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(tables, failed, jobs)
    written = {"md": out_dir / "report.md", "csv": out_dir / "report.csv", "tex": out_dir / "report.tex"}
    write_text_atomic(written["md"], markdown)
    write_text_atomic(written["csv"], to_csv(jobs))
    write_text_atomic(written["tex"], to_latex(tables))
    for table in tables:
        if plot_strength(jobs, table.metric, out_dir / f"strength_{table.metric}.png"):
            written[f"strength_{table.metric}"] = out_dir / f"strength_{table.metric}.png"
    if plot_delta_r(jobs, out_dir / "delta_r.png"):
        written["delta_r"] = out_dir / "delta_r.png"
    if wandb_log:
        log_to_wandb(jobs, markdown, [p for k, p in written.items() if p.suffix == ".png"])
    print(markdown)
    skipped = {m: reason for job in jobs for m, reason in job.results.get("skipped", {}).items()}
    for metric, reason in skipped.items():
        print(f"{metric} not reported: {reason}")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ladm-report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: <sweep_dir>/report")
    parser.add_argument("--no-wandb", action="store_true", help="do not log the report to W&B")
    parser.add_argument("--test-set", default=None, help="report this test set of every job (e.g. ntrex128), "
                        "not each job's headline one")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"ladm-report: error: {args.sweep_dir} is not a folder: give a sweep folder such as multirun/demo",
              file=sys.stderr)
        sys.exit(2)
    try:
        report(args.sweep_dir, args.out, wandb_log=not args.no_wandb, test_set=args.test_set)
    except LadmError as err:
        print(f"ladm-report: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
