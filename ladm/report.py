"""`ladm-report multirun/<sweep>`: a sweep's results.json files → tables and plots for a paper.

Rows are methods (with the knobs that vary within a method; presets by their name), columns are the pairs
in the order the sweep ran them plus their average. A cell is the mean ± sample std over seeds (n shown).
Δ is against the baseline of the same model and context: LoRA, or LaDM at strength 0 (= LoRA) when the
sweep has no LoRA job, over the seeds both have. An arrow marks a cell whose paired bootstrap test
(sacrebleu, 1000 resamples, two-sided, on the saved hypotheses) against the baseline *of the same seed* gives
p < 0.05 for every seed with the difference in the same direction in every seed: ↑ significantly better, ↓
significantly worse (the largest per-seed p-value and the direction are in the CSV). The caption states each
row's training budget (steps and examples per pair) and marks rows (‡) whose budget differs, and the design's
minimum detectable difference (METHODS.md §5). Plots: the metric against each LaDM knob the sweep varies (strength,
k_TAL/k_LIL, τ), one panel per pair with error bars over seeds, and ΔR per layer for each pair.

    ladm-report multirun/ladm_vs_lora [--out DIR] [--no-wandb] [--test-set NAME]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

from ladm import LadmError
from ladm.files import read_json, write_text_atomic
from ladm.plots import delta_r_title, draw_delta_r, draw_delta_r_trajectory, pyplot, save_figure
from ladm.schema import HASH_NEUTRAL

METRICS = {"spbleu": "spBLEU", "chrf++": "chrF++", "comet": "COMET", "bleu_spm_unofficial": "BLEU (unofficial SPM)",
           "target_script_ratio": "target-script ratio (share of hypothesis letters in the target's script)",
           "target_language": "target-language rate (share of hypotheses CLD2 identifies as the target language)"}
BOOTSTRAPPED = {"chrf++", "spbleu"}  # sentence-level COMET scores are not saved, so COMET is not resampled
IGNORED_KEYS = ("pair.", "data.", "name", "cache_dir", "force", "logger.", "eval.comet.", "probe.reference_pair",
                "evaluate.", "train.seed")
GROUPS_READ = {"ladm": ("strength.", "probe.")}  # top-level groups a method reads besides method.*
PRESET_KEYS = ("strength.name", "method.ablation")  # a preset's name stands for the keys it sets
P_THRESHOLD = 0.05
N_RESAMPLES = 1000
POWER = 0.8  # the minimum detectable difference is the true difference detected with this probability
Z_INTERVAL = NormalDist().inv_cdf(0.975)  # a 95% interval is ± this many standard errors
Z_DETECT = NormalDist().inv_cdf(1 - P_THRESHOLD / 2) + NormalDist().inv_cdf(POWER)  # 1.96 + 0.84
RESULT_KEYS = ("model", "method", "pairs", "test_set", "n_test", "metrics", "config")


@dataclass
class Job:
    """One complete run of the sweep."""

    path: Path
    results: dict
    order: tuple = ()
    row: str = ""
    context: tuple = ()  # model and the non-method keys that vary: what a baseline must share
    p_values: dict[tuple[str, str], float] = field(default_factory=dict)
    directions: dict[tuple[str, str], int] = field(default_factory=dict)  # sign of (this job − its baseline)
    differences: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # resampled (this job − baseline)

    @property
    def config(self) -> dict:
        return self.results["config"]

    @property
    def model(self) -> str:
        return self.results["model"]

    @property
    def seed(self) -> object:
        return self.config.get("train", {}).get("seed")

    def value(self, pair: str, metric: str) -> float | None:
        return self.results["metrics"].get(pair, {}).get(metric)

    @property
    def examples_per_pair(self) -> tuple | None:
        """(optimizer steps per pair, training examples per pair) or None when the job did not train; a value
        is None where an older results.json did not record it."""
        train = self.results.get("train") or {}
        if not train:
            return None
        seen = set((train.get("examples_seen") or {None: None}).values())
        steps = train.get("steps_per_pair")  # a mapping when an early stop left the pairs with different counts
        return (tuple(sorted(set(steps.values()))) if isinstance(steps, dict) else steps,
                seen.pop() if len(seen) == 1 else tuple(sorted(seen, key=lambda n: (n is None, n or 0))))


def _flatten(config: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else value
    return flat


def checkout_relative(flat: dict[str, object], job: Job) -> dict[str, object]:
    """`flat` with the folder of the ladm checkout that ran `job` written `<ladm>` (as in the job's hash), so the
    same shipped data read from two checkouts is the same data."""
    root = (job.results.get("versions") or {}).get("ladm_root")
    if not root:
        return flat
    return {k: v.replace(root, "<ladm>") if isinstance(v, str) else v for k, v in flat.items()}


def _job_number(folder: Path) -> float:
    """Hydra's job number (the order the sweep ran its jobs), if the folder has Hydra's record."""
    import yaml

    try:
        return float(yaml.safe_load((folder / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["num"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return float("inf")


def load_sweep(sweep_dir: Path, test_set: str | None = None) -> tuple[list[Job], list[dict]]:
    """Complete jobs (in the order the sweep ran them) and failed ones (with their error) below `sweep_dir`;
    with `test_set`, every job's scores on that test set (from its `test_sets` entry) and jobs not tested on it
    left out. Mixtures that cannot share one table are refused."""
    complete, failed = [], []
    for path in sorted(sweep_dir.rglob("results.json")):
        results = read_json(path, "results file", "re-run that job (or delete its folder)")
        if not isinstance(results, dict):
            raise LadmError(f"{path} holds a JSON {type(results).__name__}, not a ladm results file: re-run that job")
        if results.get("status") == "complete":
            missing = [key for key in RESULT_KEYS if key not in results]
            if missing:
                raise LadmError(f"{path} lacks {', '.join(missing)} (written by another ladm version?): re-run that job")
            bad = [(pair, metric, value) for pair, scores in results["metrics"].items() for metric, value in scores.items()
                   if isinstance(value, float) and not math.isfinite(value)]
            if bad:
                raise LadmError(f"{path} holds a non-finite {bad[0][1]} ({bad[0][2]}) for {bad[0][0]}: a damaged or "
                                "hand-edited results file; re-run that job (force=true)")
            if test_set is not None and results["test_set"] != test_set:
                if test_set not in results.get("test_sets", {}):
                    continue
                results = results | {"test_set": test_set, **results["test_sets"][test_set]}
            complete.append(Job(path.parent, results, order=(_job_number(path.parent), str(path))))
        elif results.get("status") == "failed":
            failed.append({"job": str(path.parent.relative_to(sweep_dir)), "error": results.get("error", "?")})
        else:  # a job still running (or killed) or a file of another tool: listed, never dropped silently
            failed.append({"job": str(path.parent.relative_to(sweep_dir)),
                           "error": f"not finished (status {results.get('status')!r}): run the sweep again to complete it"})
    if not complete:
        raise LadmError(f"no complete results.json under {sweep_dir}"
                        + (f" tested on {test_set}" if test_set else "") + ": run a sweep there first"
                        + (f" ({len(failed)} job(s) failed)" if failed else ""))
    names = sorted({str(job.config.get("name")) for job in complete})
    if len(names) > 1:
        raise LadmError(f"{sweep_dir} holds jobs of several experiments ({', '.join(names)}): report each one's "
                        "folder (multirun/<name>) on its own")
    tested: dict[str, set] = defaultdict(set)
    for job in complete:
        for pair in job.results["pairs"]:
            tested[pair].add((job.results["test_set"], job.results["n_test"][pair]))
    for pair, test_sets in tested.items():
        if len(test_sets) > 1:
            shown = ", ".join(f"{name} ({n} sentences)" for name, n in sorted(test_sets))
            raise LadmError(f"pair {pair} was tested on different test sets: {shown}; choose one with --test-set NAME")
    return sorted(complete, key=lambda job: job.order), failed


def _preset_determined(key: str, flats: list[dict]) -> set[str]:
    """Keys of `key`'s group whose value follows from `key`'s value in every job (set by the preset)."""
    group = key.rsplit(".", 1)[0] + "."
    determined = set()
    for other in {k for flat in flats for k in flat if k.startswith(group) and k != key}:
        seen: dict[str, str] = {}
        if all(seen.setdefault(str(flat.get(key)), str(flat.get(other))) == str(flat.get(other)) for flat in flats):
            determined.add(other)
    return determined


def label_rows(jobs: list[Job]) -> None:
    """Row label = model (if several) + method + the config keys that vary within that method (a preset by its
    name), seeds excluded; context = model + the keys outside any method's groups that vary over the sweep."""
    several_models = len({job.model for job in jobs}) > 1
    # a key added after a job ran counts as its neutral value there (what that job did)
    all_flats = [HASH_NEUTRAL | checkout_relative(_flatten(job.config), job) for job in jobs]
    outside = sorted({k for flat in all_flats for k in flat if not k.startswith(IGNORED_KEYS + ("method.", "strength.",
                                                                                               "probe.", "model."))})
    context_keys = [k for k in outside if len({str(flat.get(k)) for flat in all_flats}) > 1]
    # data.* paths follow the pair; a data key that varies among the jobs of one pair is another context
    by_pair: dict[str, list[dict]] = defaultdict(list)
    for job, flat in zip(jobs, all_flats, strict=True):
        by_pair[json.dumps(job.results["pairs"])].append(flat)
    data_keys = sorted({k for flats in by_pair.values() for k in {k for f in flats for k in f if k.startswith("data.")}
                        if len({str(f.get(k)) for f in flats}) > 1})
    context_keys += data_keys
    by_method: dict[str, list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        by_method[job.results["method"]].append(i)
    for method, indices in by_method.items():
        flats = [all_flats[i] for i in indices]
        unread = tuple(g for g in ("strength.", "probe.") if g not in GROUPS_READ.get(method, ()))
        keys = sorted({k for flat in flats for k in flat if not k.startswith((*IGNORED_KEYS, *unread, "model."))})
        varying = [k for k in keys if len({str(flat.get(k)) for flat in flats}) > 1
                   and k != "method.teacher.name"]  # the teacher is always named (below)
        for preset in PRESET_KEYS:
            if preset in varying:
                varying = [k for k in varying if k not in _preset_determined(preset, flats)]
        for i, flat in zip(indices, flats, strict=True):
            job = jobs[i]
            parts = [job.model] if several_models else []
            parts.append(method)
            for k in varying:
                shown = k.removeprefix("method.").removeprefix("strength.")
                parts.append(str(flat.get(k)) if k in PRESET_KEYS else f"{shown}={flat.get(k)}")
            parts += [f"{k}={flat.get(k)}" for k in data_keys]
            if teacher := flat.get("method.teacher.name"):
                parts.append(f"(teacher: {teacher}{' = student' if teacher == job.model else ''})")
            job.row = " ".join(parts)
            job.context = (job.model, *((k, str(flat.get(k))) for k in context_keys))


def is_strength_zero(job: Job) -> bool:
    strength = job.config.get("strength", {})
    return job.results["method"] == "ladm" and strength.get("alpha") == 0 and strength.get("beta") == 0


def baseline_rows(jobs: list[Job]) -> dict[tuple, str]:
    """Per context, the baseline row: LoRA, or LaDM at strength 0 when the context has no LoRA job."""
    baselines: dict[tuple, str] = {}
    for rule in (lambda job: job.results["method"] == "lora", is_strength_zero):
        for job in jobs:
            if rule(job):
                baselines.setdefault(job.context, job.row)
    return baselines


def read_predictions(job: Job, pair: str, ext: str) -> list[str]:
    path = job.path / "predictions" / job.results["test_set"] / f"{pair}.{ext}"
    if not path.is_file():
        raise LadmError(f"{path} is missing: the significance test needs the saved predictions; re-run that job")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise LadmError(f"{path} is not readable UTF-8 text ({type(err).__name__}): a damaged prediction file; "
                        "re-run that job (force=true)") from err


def resampled_differences(metric, ours: list[str], theirs: list[str], refs: list[str]) -> list[float]:
    """The corpus-score differences ours − theirs over the paired bootstrap's resamples, drawn as sacrebleu's
    paired test draws them (the same sentence indices for both systems, N_RESAMPLES draws seeded by
    SACREBLEU_SEED), from sacrebleu's own sentence statistics."""
    import numpy as np

    seed = os.environ.get("SACREBLEU_SEED", "12345")
    rng = np.random.default_rng(None if seed.lower() == "none" else int(seed))
    indices = rng.choice(len(ours), size=(N_RESAMPLES, len(ours)), replace=True)
    scores = []
    for hyps in (ours, theirs):
        # float64, not sacrebleu's float32: the integer counts sum exactly either way, and float32 scalars promote
        # differently under numpy 1 and 2 (NEP 50), which moved the scores in their seventh digit between the two
        stats = np.array(metric._extract_corpus_statistics(hyps, [refs]), dtype="float64")
        scores.append(np.array([metric._compute_score_from_stats(stats[i].sum(0)).score for i in indices]))
    return (scores[0] - scores[1]).tolist()


def interval_se(differences: list[float]) -> float:
    """The standard error that the 95% percentile interval of resampled differences implies: half its width
    over z_0.975 (METHODS.md §5, minimum detectable difference)."""
    import numpy as np

    low, high = np.percentile(differences, [2.5, 97.5])
    return float(high - low) / (2 * Z_INTERVAL)


def minimum_detectable_difference(compared: list[tuple[list[float], list[float]]], n_seeds: int) -> float | None:
    """METHODS.md §5: MDD = (z_{1−α/2} + z_{power}) · sqrt(B² + V / S). `compared` holds, per compared row, the
    bootstrap standard errors of its difference to the baseline (one per seed) and the differences themselves
    (one per seed); B² is the mean squared standard error over every row and seed (test-set sampling, the same
    sentences for every seed, so more seeds do not shrink it), V the mean over rows of the seed-to-seed variance
    of the difference (training noise; rows with one seed contribute none), S the seeds per cell."""
    errors = [se for ses, _ in compared for se in ses]
    if not errors:
        return None
    spreads = [statistics.variance(diffs) for _, diffs in compared if len(diffs) > 1]
    variance = statistics.fmean(se ** 2 for se in errors) + (statistics.fmean(spreads) / n_seeds if spreads else 0.0)
    return Z_DETECT * math.sqrt(variance)


def paired_bootstrap(jobs: list[Job], baselines: dict[tuple, str]) -> None:
    """p-values (two-sided), the direction of the difference and its resampled values, of every job against its
    baseline job of the same context, pair and seed, per resampled metric."""
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest

    by_key = {(job.context, job.row, job.seed, pair): job for job in jobs for pair in job.results["pairs"]}
    for job in jobs:
        for pair in job.results["pairs"]:
            baseline = by_key.get((job.context, baselines.get(job.context), job.seed, pair))
            if baseline is None or baseline.row == job.row:
                continue
            metrics = {}
            if job.value(pair, "chrf++") is not None:
                metrics["chrf++"] = CHRF(word_order=2)
            if job.value(pair, "spbleu") is not None:
                metrics["spbleu"] = BLEU(tokenize="flores200")
            if not metrics:
                continue
            ours, theirs, refs = read_predictions(job, pair, "hyp"), read_predictions(baseline, pair, "hyp"), \
                read_predictions(baseline, pair, "ref")
            if not len(ours) == len(theirs) == len(refs):
                raise LadmError(f"{pair}: {job.path} has {len(ours)} hypotheses, {baseline.path} {len(theirs)} and "
                                f"{len(refs)} references: the predictions must cover the same test set; re-run the job")
            for metric, scorer in metrics.items():
                difference = job.value(pair, metric) - (baseline.value(pair, metric) or 0.0)
                job.directions[(pair, metric)] = (difference > 0) - (difference < 0)
                job.differences[(pair, metric)] = [0.0] * N_RESAMPLES if ours == theirs else \
                    resampled_differences(scorer, ours, theirs, refs)
            if ours == theirs:  # sacrebleu's test gives p = 1/(n+1) for identical systems; there is no difference
                job.p_values |= {(pair, metric): 1.0 for metric in metrics}
                continue
            test = PairedTest([("baseline", theirs), ("system", ours)], metrics,
                              references=[refs], test_type="bs", n_samples=N_RESAMPLES)
            _, scores = test()  # keyed 'System', then each metric's display name, in insertion order
            for metric, name in zip(metrics, list(scores)[1:], strict=True):
                job.p_values[(pair, metric)] = float(scores[name][1].p_value)


@dataclass
class Cell:
    """One metric of one row and pair (or the pair average) over seeds."""

    by_seed: dict[object, float]

    @property
    def n(self) -> int:
        return len(self.by_seed)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.by_seed.values())

    @property
    def std(self) -> float:
        return statistics.stdev(self.by_seed.values()) if self.n > 1 else 0.0


@dataclass
class Row:
    label: str
    jobs: list[Job]
    cells: dict[str, Cell]  # per pair, and "avg" when every pair has the same seeds
    baseline: str | None
    delta: Cell | None  # the average's difference to the baseline, per shared seed
    p_max: dict[str, float]  # per pair: the largest p-value over seeds (all seeds tested)
    direction: dict[str, int]  # per pair: +1 / −1 when every seed's difference has that sign, else 0
    budget: tuple | None = None  # (steps per pair, examples per pair) of its jobs; None: not trained
    compared: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)  # see `_compared`

    def mark(self, column: str) -> str:
        """↑ / ↓: significant (p < 0.05 in every seed) in the direction every seed shows."""
        if self.p_max.get(column, 1.0) >= P_THRESHOLD or not self.direction.get(column):
            return ""
        return "↑" if self.direction[column] > 0 else "↓"


@dataclass
class Table:
    metric: str
    pairs: list[str]
    rows: list[Row]
    test_set: str
    n_test: dict[str, int]
    signature: str | None

    def detectable(self, column: str) -> float | None:
        """The design's minimum detectable difference in `column`, pooled over the trained rows compared with a
        baseline (METHODS.md §5)."""
        compared = [row.compared[column] for row in self.rows if row.budget is not None and column in row.compared]
        return minimum_detectable_difference(compared, _usual_n(self)) if compared else None


def _cells(jobs: list[Job], pairs: list[str], metric: str) -> dict[str, Cell]:
    cells: dict[str, Cell] = {}
    for pair in pairs:
        values = {job.seed: v for job in jobs if pair in job.results["pairs"] and (v := job.value(pair, metric)) is not None}
        if values:
            cells[pair] = Cell(values)
    seeds = [set(cells[p].by_seed) for p in pairs if p in cells]
    if len(seeds) == len(pairs) and seeds and all(s == seeds[0] for s in seeds):
        cells["avg"] = Cell({seed: statistics.fmean(cells[p].by_seed[seed] for p in pairs) for seed in sorted(seeds[0], key=str)})
    return cells


def _compared(group: list[Job], own: dict[str, Cell], base: dict[str, Cell], pairs: list[str],
              metric: str) -> dict[str, tuple[list[float], list[float]]]:
    """Per column (each pair, and avg): per seed that both rows have, the standard error of the row's difference
    to the baseline implied by its paired-bootstrap interval (avg: of the resample-wise mean over the pairs) and
    the difference itself."""
    jobs = {(job.seed, pair): job for job in group for pair in job.results["pairs"]}
    compared = {}
    for column in [*pairs, "avg"]:
        if column not in own or column not in base:
            continue
        errors, differences = [], []
        for seed in sorted(set(own[column].by_seed) & set(base[column].by_seed), key=str):
            resampled = [jobs[(seed, pair)].differences.get((pair, metric)) if (seed, pair) in jobs else None
                         for pair in (pairs if column == "avg" else [column])]
            if any(values is None for values in resampled):
                continue
            errors.append(interval_se([statistics.fmean(values) for values in zip(*resampled, strict=True)]))
            differences.append(own[column].by_seed[seed] - base[column].by_seed[seed])
        if errors:
            compared[column] = (errors, differences)
    return compared


def build_tables(jobs: list[Job]) -> list[Table]:
    """One table per measured metric: cells over seeds, Δ of the average against the baseline on shared seeds."""
    pairs = list(dict.fromkeys(pair for job in jobs for pair in job.results["pairs"]))
    baselines = baseline_rows(jobs)
    paired_bootstrap(jobs, baselines)
    grouped: dict[tuple, list[Job]] = defaultdict(list)
    for job in jobs:
        grouped[(job.context, job.row)].append(job)
    tables = []
    for metric in METRICS:
        if not any(job.value(p, metric) is not None for job in jobs for p in job.results["pairs"]):
            continue
        cells = {key: _cells(group, pairs, metric) for key, group in grouped.items()}
        rows = []
        for (context, label), group in grouped.items():
            base_label = baselines.get(context)
            own, base = cells[(context, label)].get("avg"), cells.get((context, base_label), {}).get("avg")
            delta = None
            if own and base and base_label != label and (shared := set(own.by_seed) & set(base.by_seed)):
                delta = Cell({seed: own.by_seed[seed] - base.by_seed[seed] for seed in shared})
            p_max, direction = {}, {}
            for pair in pairs:
                tested = [job for job in group if pair in job.results["pairs"]]
                p_values = [job.p_values.get((pair, metric)) for job in tested]
                if tested and all(p is not None for p in p_values):
                    p_max[pair] = max(p_values)
                    signs = {job.directions[(pair, metric)] for job in tested}
                    direction[pair] = signs.pop() if len(signs) == 1 else 0
            budgets = {job.examples_per_pair for job in group}
            compared = _compared(group, cells[(context, label)], cells.get((context, base_label), {}), pairs, metric) \
                if base_label != label and metric in BOOTSTRAPPED else {}
            rows.append(Row(label, group, cells[(context, label)], base_label if base_label != label else None, delta,
                            p_max, direction, budgets.pop() if len(budgets) == 1 else ("mixed", "mixed"), compared))
        order = {label: i for i, label in enumerate(baselines.values())}
        rows.sort(key=lambda r: (r.jobs[0].results["method"] != "zero_shot", order.get(r.label, len(order)), r.label))
        first = jobs[0].results
        signature = next((job.results.get("signatures", {}).get(metric) for job in jobs
                          if job.results.get("signatures", {}).get(metric)), None)
        tables.append(Table(metric, pairs, rows, first["test_set"],
                            {p: next(j.results["n_test"][p] for j in jobs if p in j.results["pairs"]) for p in pairs}, signature))
    return tables


def _fmt(value: float | None, signed: bool = False) -> str:
    return "–" if value is None else (f"{value:+.2f}" if signed else f"{value:.2f}")


def _cell_text(cell: Cell | None, usual_n: int) -> str:
    if cell is None:
        return "–"
    text = f"{cell.mean:.2f} ± {cell.std:.2f}" if cell.n > 1 else f"{cell.mean:.2f}"
    return text if cell.n == usual_n else f"{text} (n={cell.n})"


def _best(table: Table, column: str) -> float | None:
    means = [r.cells[column].mean for r in table.rows if column in r.cells]
    return max(means) if len(means) > 1 else None


def _usual_n(table: Table) -> int:
    """The most common number of seeds per cell (other counts are marked in their cells)."""
    return statistics.mode(cell.n for row in table.rows for cell in row.cells.values())


def caption(table: Table) -> str:
    """What a reader needs under the table: metric, test set and size, seeds, signature, the dagger's test."""
    sizes = sorted(set(table.n_test.values()))
    size = f"{sizes[0]} sentences per pair" if len(sizes) == 1 else ", ".join(f"{p} {n}" for p, n in table.n_test.items())
    baselines = sorted({r.baseline for r in table.rows if r.baseline})
    n = _usual_n(table)
    spread = f"mean ± sample std over {n} seeds" if n > 1 else "one seed per cell"
    text = (f"{METRICS[table.metric]} on {table.test_set} ({size}); {spread} (other counts marked n=); "
            "best mean per column in bold.")
    if baselines:
        text += (f" Δ: the average's difference to {' / '.join(baselines)} (same model, seeds in common).")
        if table.metric in BOOTSTRAPPED:
            text += (f" ↑ / ↓: significantly better / worse than {' / '.join(baselines)}: two-sided p < {P_THRESHOLD} "
                     f"in sacrebleu's paired bootstrap ({N_RESAMPLES} resamples) for every seed, each against the "
                     "baseline of the same seed, with the difference in the direction shown in every seed.")
    text += detectable_note(table)
    text += budget_note(table.rows)
    if table.signature:
        text += f" Signature: {table.signature}."
    return text


DESIGN_ROW = "minimum detectable Δ"


def detectable_note(table: Table) -> str:
    """What the design can detect (METHODS.md §5), and that an unmarked difference below it is no evidence of no
    effect."""
    values = {column: value for column in [*table.pairs, "avg"] if (value := table.detectable(column)) is not None}
    if not values:
        return ""
    baselines = " / ".join(sorted({r.baseline for r in table.rows if r.baseline}))
    name = METRICS[table.metric]
    where = f"{values['avg']:.2f} {name} on the average" if "avg" in values else ""
    per_pair = ", ".join(f"{pair} {value:.2f}" for pair, value in values.items() if pair != "avg")
    where = f"{where} ({per_pair})" if where else f"{per_pair} {name}"
    one_seed = (" With one seed per cell the training noise is not in it, so the real threshold is higher."
                if _usual_n(table) == 1 else "")
    return (f" {DESIGN_ROW[0].upper()}{DESIGN_ROW[1:]} (METHODS.md §5): the true difference to {baselines} that a "
            f"two-sided test at {P_THRESHOLD} detects with {POWER:.0%} power in this design, from the paired-bootstrap "
            f"intervals of the trained rows' differences and their seed-to-seed spread: differences smaller than "
            f"{where} cannot be told from noise in this table, so an unmarked difference below it is inconclusive, "
            f"not evidence of no effect.{one_seed}")


def _budget_text(budget: tuple) -> str:
    steps, examples = budget
    if "mixed" in budget:
        return "differs between its seeds"
    return f"{_count(steps)} optimizer steps and {_count(examples)} training examples per pair"


def _count(value: int | tuple | None) -> str:
    """A budget count: `?` where unrecorded, `5/6` where the pairs of a run had different counts."""
    return "?" if value is None else "/".join(map(str, value)) if isinstance(value, tuple) else str(value)


def differing_budget(rows: list[Row]) -> set[str]:
    """Labels of trained rows whose (steps, examples) per pair is not the most common one, or is unknown."""
    budgets = [row.budget for row in rows if row.budget is not None]
    if not budgets:
        return set()
    usual = statistics.mode(budgets)
    return {row.label for row in rows if row.budget is not None and (row.budget != usual or "mixed" in row.budget)}


def budget_note(rows: list[Row]) -> str:
    """The training budget per pair (METHODS.md §5): one sentence when every trained row had the same, else each
    row's, with ‡ on the rows that differ."""
    trained = [row for row in rows if row.budget is not None]
    if not trained:
        return ""
    untrained = [row.label for row in rows if row.budget is None]
    rest = f" ({', '.join(untrained)}: not trained)" if untrained else ""
    differing = differing_budget(rows)
    if not differing:
        return f" Training: {_budget_text(trained[0].budget)} in every trained row{rest}."
    return (" ‡: the training budget differs between rows: "
            + "; ".join(f"{row.label} {_budget_text(row.budget)}" for row in trained) + f"{rest}.")


def _row_cells(table: Table, row: Row, bold: Callable[[str], str]) -> list[str]:
    out, usual_n = [], _usual_n(table)
    for column in [*table.pairs, "avg"]:
        cell = row.cells.get(column)
        text = _cell_text(cell, usual_n) + row.mark(column)
        best = _best(table, column)
        out.append(bold(text) if cell is not None and best is not None and cell.mean == best else text)
    return out


def length_lines(jobs: list[Job]) -> list[str]:
    """Per run and pair: the length budgets and what they cut (METHODS.md §5, lengths)."""
    rows = []
    for job in jobs:
        r = job.results
        for pair in r["pairs"]:
            truncated, hit = r.get("truncated_train", {}).get(pair), r.get("hit_generation_budget", {}).get(pair)
            if truncated is not None or hit is not None:
                rows.append(f"| {job.row} | {job.seed} | {pair} | {r.get('train', {}).get('max_length', '–')} | "
                            f"{_share(truncated)} | {r.get('max_new_tokens', {}).get(pair, '–')} | {_share(hit)} |")
    if not rows:
        return []
    return ["", "### Length budgets", "", "| run | seed | pair | train.max_length | truncated training examples "
            "| eval.max_new_tokens | hypotheses that hit the budget |", "|---|---|---|---:|---:|---:|---:|", *rows]


def _share(counted: dict | None) -> str:
    return "–" if counted is None else f"{100 * counted['share']:.1f}% ({counted['count']}/{counted['of']})"


def _label(table: Table, row: Row) -> str:
    return row.label + ("‡" if row.label in differing_budget(table.rows) else "")


def _detectable_cells(table: Table) -> list[str]:
    """The design's minimum detectable difference per column; empty when the metric has none."""
    values = [table.detectable(column) for column in [*table.pairs, "avg"]]
    return [] if all(v is None for v in values) else [_fmt(v) for v in values]


def to_markdown(tables: list[Table], failed: list[dict], jobs: list[Job]) -> str:
    out = []
    for t in tables:
        out += [f"### {METRICS[t.metric]}", "", "| method | " + " | ".join(t.pairs) + " | avg | Δ avg |",
                "|---|" + "---:|" * (len(t.pairs) + 2)]
        for row in t.rows:
            delta = "–" if row.delta is None else f"{row.delta.mean:+.2f}" + (f" ± {row.delta.std:.2f}" * (row.delta.n > 1))
            out.append(f"| {_label(t, row)} | " + " | ".join(_row_cells(t, row, lambda s: f"**{s}**")) + f" | {delta} |")
        if detectable := _detectable_cells(t):
            out.append(f"| *{DESIGN_ROW}* | " + " | ".join(detectable) + " | |")
        out += ["", caption(t), ""]
    out += length_lines(jobs)
    if failed:
        out += ["", "### Failed or unfinished jobs", ""] + [f"- `{f['job']}`: {f['error']}" for f in failed]
    return "\n".join(out) + "\n"


def to_csv(tables: list[Table]) -> str:
    """One line per row, column and metric: mean, std, n, the seeds' values, Δ to the baseline, the largest
    per-seed p-value."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["row", "column", "metric", "mean", "std", "n", "values_by_seed", "baseline", "delta_avg_vs_baseline",
                     "p_value_max_over_seeds", "direction", "steps_per_pair", "examples_per_pair", "test_set",
                     "min_detectable_difference"])
    for t in tables:
        for row in t.rows:
            for column, cell in row.cells.items():
                delta = row.delta.mean if column == "avg" and row.delta else ""
                detectable = minimum_detectable_difference([row.compared[column]], cell.n) \
                    if column in row.compared else None
                writer.writerow([row.label, column, t.metric, cell.mean, cell.std, cell.n,
                                 json.dumps({str(k): v for k, v in cell.by_seed.items()}), row.baseline or "", delta,
                                 row.p_max.get(column, ""), row.direction.get(column, ""),
                                 *(row.budget or ("", "")), t.test_set, "" if detectable is None else detectable])
        for column in [*t.pairs, "avg"]:
            if (detectable := t.detectable(column)) is not None:
                writer.writerow([f"({DESIGN_ROW})", column, t.metric, *[""] * 10, t.test_set, detectable])
    return buffer.getvalue()


def to_latex(tables: list[Table], experiment: str) -> str:
    """booktabs tables, best mean per column in bold, a caption and a label each."""
    symbols = {"_": r"\_", "%": r"\%", "↑": r"$^\uparrow$", "↓": r"$^\downarrow$", "‡": r"$^\ddagger$", "±": r"$\pm$"}
    escape = lambda text: "".join(symbols.get(c, c) for c in text)  # noqa: E731
    out = []
    for t in tables:
        out += [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{l" + "r" * (len(t.pairs) + 2) + "}", r"\toprule",
                "Method & " + " & ".join(t.pairs) + r" & Avg & $\Delta$ \\", r"\midrule"]
        for row in t.rows:
            delta = "--" if row.delta is None else f"{row.delta.mean:+.2f}"
            cells = [escape(c).replace("–", "--") for c in _row_cells(t, row, lambda s: rf"\textbf{{{s}}}")]
            out.append(escape(_label(t, row)) + " & " + " & ".join(cells) + f" & {delta} \\\\")
        if detectable := _detectable_cells(t):
            out += [r"\midrule", r"\textit{Min.\ detectable $\Delta$} & " + " & ".join(c.replace("–", "--")
                                                                                   for c in detectable) + r" & \\"]
        label = f"tab:{experiment}-{t.metric}".replace("+", "p").replace("_", "-")
        out += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{escape(caption(t))}}}", rf"\label{{{label}}}",
                r"\end{table}", ""]
    return "\n".join(out)


LADM_AXES = {"strength.alpha": "strength s (α = β)", "method.k_tal": "k_TAL", "method.k_lil": "k_LIL",
             "method.tau_tal": "τ_TAL", "method.tau_lil": "τ_LIL", "method.ratio_tal": "ratio_TAL",
             "method.ratio_lil": "ratio_LIL"}  # LaDM knobs a sweep varies: each gets a plot of the metric against it


def ladm_axes(jobs: list[Job]) -> list[tuple[str, ...]]:
    """The LADM_AXES keys that take two or more values over the sweep's LaDM jobs; keys equal to each other in
    every job (k_tal = k_lil) form one axis."""
    flats = [_flatten(job.config) for job in jobs if job.results["method"] == "ladm"]
    varying = [key for key in LADM_AXES if len({str(flat.get(key)) for flat in flats}) > 1]
    axes: list[tuple[str, ...]] = []
    for key in varying:
        together = next((axis for axis in axes if all(flat.get(axis[0]) == flat.get(key) for flat in flats)), None)
        if together is None:
            axes.append((key,))
        else:
            axes[axes.index(together)] = (*together, key)
    return axes


def plot_ladm_axis(jobs: list[Job], metric: str, axis: tuple[str, ...], path: Path) -> None:
    """The metric against one LaDM knob (`axis`), one panel per pair, mean ± std over seeds as error bars, one
    line per setting of the sweep's other varying LaDM knobs, LoRA's mean dashed."""
    others = [key for other in ladm_axes(jobs) if other != axis for key in other[:1]]
    points: dict[str, dict[tuple, dict[float, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    lora: dict[str, list[float]] = defaultdict(list)
    for job in jobs:
        flat = _flatten(job.config)
        for pair in job.results["pairs"]:
            if (value := job.value(pair, metric)) is None:
                continue
            if job.results["method"] == "ladm":
                points[pair][tuple(flat.get(k) for k in others)][flat.get(axis[0])].append(value)
            elif job.results["method"] == "lora":
                lora[pair].append(value)
    plt = pyplot()
    pairs = sorted(points, key=list(dict.fromkeys(p for job in jobs for p in job.results["pairs"])).index)
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.2 * len(pairs), 3.2), squeeze=False, sharey=True)
    for ax, pair in zip(axes[0], pairs, strict=True):
        for setting, by_x in sorted(points[pair].items(), key=str):
            xs = sorted(by_x)
            means = [statistics.fmean(by_x[x]) for x in xs]
            stds = [statistics.stdev(by_x[x]) if len(by_x[x]) > 1 else 0.0 for x in xs]
            label = " ".join(f"{LADM_AXES[k]}={v}" for k, v in zip(others, setting, strict=True)) or "LaDM"
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=f"LaDM {label}".replace("LaDM LaDM", "LaDM"))
        if lora.get(pair):
            ax.axhline(statistics.fmean(lora[pair]), color="grey", linestyle="--", linewidth=0.8, label="LoRA")
        ax.set_title(pair)
        ax.set_xlabel(" = ".join(LADM_AXES[k] for k in axis))
    axes[0][0].set_ylabel(METRICS[metric])
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


def axis_name(axis: tuple[str, ...]) -> str:
    """The plot file's stem for an axis: `strength`, `k_tal_k_lil`, ..."""
    return "_".join(key.split(".")[-1] for key in axis).replace("alpha", "strength")


def plot_delta_r(jobs: list[Job], path: Path) -> bool:
    """ΔR per layer for each (model, pair) of the sweep, as the LaDM jobs recorded it: one panel each, TAL/LIL and
    the modulated layers marked, bootstrap intervals where the probe recorded them."""
    panels = {}
    for job in jobs:
        details = job.results.get("method_details", {})
        if "delta_r" in details:
            panels.setdefault((job.model, details["pair"]), details | {"model": job.model})
    if not panels:
        return False
    plt = pyplot()
    n_layers = max(len(p["delta_r"]) for p in panels.values())
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.35 * n_layers), 3 * len(panels)), squeeze=False)
    for ax, (_, report) in zip(axes[:, 0], sorted(panels.items()), strict=True):
        draw_delta_r(ax, report, delta_r_title(report))
    save_figure(fig, path)
    return True


def plot_delta_r_trajectory(jobs: list[Job], path: Path) -> bool:
    """Dynamic ΔR (`method.reprobe_every`): for each LaDM job that re-measured it, ΔR per layer at every
    measurement and the selected layers (one panel per job); False when no job did."""
    dynamic = [job for job in jobs if job.results.get("method_details", {}).get("trajectory")]
    if not dynamic:
        return False
    plt = pyplot()
    n_layers = max(len(job.results["method_details"]["delta_r"]) for job in dynamic)
    fig, axes = plt.subplots(len(dynamic), 1, figsize=(max(6, 0.4 * n_layers), 2.5 * len(dynamic)), squeeze=False)
    for ax, job in zip(axes[:, 0], dynamic, strict=True):
        details = job.results["method_details"]
        draw_delta_r_trajectory(ax, details, f"{job.model} {job.row} {details['pair']} seed {job.seed}: ΔR every "
                                             f"{details['reprobe_every']} steps")
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
    tables = build_tables(jobs)
    out_dir = out_dir or sweep_dir / "report"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LadmError(f"--out {out_dir} cannot be a folder ({type(err).__name__}: {err.strerror or err}): give a "
                        "folder path (it is created)") from err
    markdown = to_markdown(tables, failed, jobs)
    written = {"md": out_dir / "report.md", "csv": out_dir / "report.csv", "tex": out_dir / "report.tex"}
    write_text_atomic(written["md"], markdown)
    write_text_atomic(written["csv"], to_csv(tables))
    write_text_atomic(written["tex"], to_latex(tables, str(jobs[0].config.get("name", "sweep"))))
    for table in tables:
        for axis in ladm_axes(jobs):
            name = f"{axis_name(axis)}_{table.metric}"
            plot_ladm_axis(jobs, table.metric, axis, out_dir / f"{name}.png")
            written[name] = out_dir / f"{name}.png"
    if plot_delta_r(jobs, out_dir / "delta_r.png"):
        written["delta_r"] = out_dir / "delta_r.png"
    if plot_delta_r_trajectory(jobs, out_dir / "delta_r_trajectory.png"):
        written["delta_r_trajectory"] = out_dir / "delta_r_trajectory.png"
    if wandb_log:
        log_to_wandb(jobs, markdown, [p for k, p in written.items() if p.suffix == ".png"])
    print(markdown)
    skipped = {m: reason for job in jobs for m, reason in job.results.get("skipped", {}).items()}
    for metric, reason in skipped.items():
        print(f"{metric} not reported: {reason} (ladm-fetch-metrics fetches it; see README, Metrics)")
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
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        print(f"ladm-report: error: --out {args.out} is a file: give a folder for the report (it is created)",
              file=sys.stderr)
        sys.exit(2)
    try:
        report(args.sweep_dir, args.out, wandb_log=not args.no_wandb, test_set=args.test_set)
    except LadmError as err:
        print(f"ladm-report: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
