"""ladm-report on synthetic results (known answers) and on a real tiny sweep."""

import csv
import json
import math
import os
import re
import subprocess
import sys

import pytest
from sacrebleu.metrics import CHRF

from ladm import REPO_ROOT, LadmError
from ladm.files import write_json_atomic, write_lines_atomic
from ladm.report import main, report

REFS = [f"the cat number {i} sat on mat {i % 7} today" for i in range(40)]
GOOD = [r.replace("today", "now") for r in REFS]  # close to the references
GOOD2 = [r.replace("mat", "rug") for r in REFS]  # close too, scored differently
POOR = [f"dog {i}" for i in range(40)]  # far from them
POOR2 = [f"dog {i} sat" for i in range(40)]
CHRF_PP = CHRF(word_order=2)
CHRF_PP.corpus_score(GOOD, [REFS])
SIGNATURE = str(CHRF_PP.get_signature())


def chrf(hyps):
    return CHRF_PP.corpus_score(hyps, [REFS]).score


def fake_job(root, name, method, pair, hyps, strength=None, test_set="flores200-devtest", status="complete", seed=1,
             experiment="synthetic", job_num=None, examples=16, data=None):
    job = root / name
    write_lines_atomic(job / "predictions" / test_set / f"{pair}.hyp", hyps)
    write_lines_atomic(job / "predictions" / test_set / f"{pair}.ref", REFS)
    if job_num is not None:
        (job / ".hydra").mkdir(parents=True, exist_ok=True)
        (job / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  job:\n    num: {job_num}\n")
    config = {"name": experiment, "model": {"name": "tiny-llama3"}, "method": {"name": method}, "pair": {"name": pair},
              "train": {"seed": seed}, "logger": {"name": "none", "mode": "disabled"},
              "data": {"name": "flores200", "train": {"src": f"{pair}.src"}, **(data or {})}}
    details = {}
    if strength is not None:
        config["strength"] = {"name": f"s{strength}", "alpha": strength, "beta": strength}
        details = {"pair": pair, "delta_r": [0.1, -0.2, 0.05, 0.0]}
    write_json_atomic(job / "results.json", {
        "status": status, "model": "tiny-llama3", "method": method, "pairs": [pair], "test_set": test_set,
        "n_test": {pair: len(REFS)}, "metrics": {pair: {"chrf++": chrf(hyps), "spbleu": None}},
        "signatures": {"chrf++": SIGNATURE},
        "method_details": details, "config": config, "max_new_tokens": {pair: 50},
        "train": {} if method == "zero_shot" else {"max_length": 300, "steps": 2, "steps_per_pair": 2,
                                                   "examples_seen": {pair: examples}},
        "truncated_train": {pair: {"count": 3, "of": 200, "share": 3 / 200}},
        "hit_generation_budget": {pair: {"count": 1, "of": len(REFS), "share": 1 / len(REFS)}}})


# Per (method row, seed): the hypotheses of both pairs.
SWEEP = {("lora", None, 1): POOR, ("lora", None, 2): POOR2, ("ladm", 1.0, 1): GOOD, ("ladm", 1.0, 2): GOOD2,
         ("ladm", 0.5, 1): GOOD, ("ladm", 0.5, 2): POOR2, ("zero_shot", None, 1): POOR[:20] + GOOD[20:]}


@pytest.fixture
def sweep(tmp_path):
    num = 0
    for pair in ("zh-km", "zh-lo"):  # run in this order: the columns follow it
        for (method, strength, seed), hyps in SWEEP.items():
            fake_job(tmp_path, f"{method}-{strength}-{pair}-{seed}", method, pair, hyps, strength=strength, seed=seed,
                     job_num=num)
            num += 1
    write_json_atomic(tmp_path / "broken" / "results.json", {"status": "failed", "error": "LadmError: out of memory"})
    return tmp_path


def mean_std(a, b):
    return (a + b) / 2, abs(a - b) / math.sqrt(2)


def test_cells_are_seed_means_with_std_and_delta_against_lora_of_the_same_seeds(sweep, capsys):
    written = report(sweep, wandb_log=False)
    markdown = written["md"].read_text()
    good, good2, poor, poor2 = chrf(GOOD), chrf(GOOD2), chrf(POOR), chrf(POOR2)
    ladm_mean, ladm_std = mean_std(good, good2)
    lora_mean, lora_std = mean_std(poor, poor2)
    delta = ((good - poor) + (good2 - poor2)) / 2
    delta_std = abs((good - poor) - (good2 - poor2)) / math.sqrt(2)
    cell = f"**{ladm_mean:.2f} ± {ladm_std:.2f}↑**"
    assert f"| ladm s1.0 | {cell} | {cell} | **{ladm_mean:.2f} ± {ladm_std:.2f}** | {delta:+.2f} ± {delta_std:.2f} |" in markdown
    lora = f"{lora_mean:.2f} ± {lora_std:.2f}"
    assert f"| lora | {lora} | {lora} | {lora} | – |" in markdown  # the baseline: no mark, no Δ
    # s0.5 equals LoRA in seed 2: significant in one seed only, so no mark.
    half_mean, half_std = mean_std(good, poor2)
    assert f"| ladm s0.5 | {half_mean:.2f} ± {half_std:.2f} | {half_mean:.2f} ± {half_std:.2f} |" in markdown
    zero = chrf(POOR[:20] + GOOD[20:])  # one seed: against LoRA of seed 1 only
    assert f"| zero_shot | {zero:.2f} (n=1)↑ | {zero:.2f} (n=1)↑ | {zero:.2f} (n=1) | {zero - poor:+.2f} |" in markdown
    assert markdown.index("| zero_shot |") < markdown.index("| lora |") < markdown.index("| ladm s0.5 |")
    assert "| method | zh-km | zh-lo | avg | Δ avg |" in markdown  # the sweep's order
    assert "on flores200-devtest (40 sentences per pair)" in markdown and f"Signature: {SIGNATURE}" in markdown
    assert ("↑ / ↓: significantly better / worse than lora: two-sided p < 0.05 in sacrebleu's paired bootstrap "
            "(1000 resamples) for every seed") in markdown
    assert ("Training: 2 optimizer steps and 16 training examples per pair in every trained row (zero_shot: not "
            "trained).") in markdown and "‡" not in markdown
    assert "mean ± sample std over 2 seeds" in markdown
    assert "spBLEU" not in markdown  # never measured, never shown
    assert "`broken`: LadmError: out of memory" in markdown
    hit = f"{100 / len(REFS):.1f}% (1/{len(REFS)})"
    assert f"| lora | 2 | zh-km | 300 | 1.5% (3/200) | 50 | {hit} |" in markdown

    rows = {(r["row"], r["column"]): r for r in csv.DictReader(written["csv"].open()) if r["metric"] == "chrf++"}
    assert float(rows[("ladm s1.0", "zh-lo")]["mean"]) == pytest.approx(ladm_mean)
    assert float(rows[("ladm s1.0", "zh-lo")]["std"]) == pytest.approx(ladm_std)
    assert float(rows[("ladm s1.0", "avg")]["delta_avg_vs_baseline"]) == pytest.approx(delta)
    assert float(rows[("ladm s1.0", "zh-km")]["p_value_max_over_seeds"]) < 0.05
    assert float(rows[("ladm s0.5", "zh-km")]["p_value_max_over_seeds"]) > 0.05
    assert rows[("ladm s1.0", "zh-km")]["direction"] == "1" and rows[("ladm s1.0", "zh-km")]["examples_per_pair"] == "16"
    assert rows[("zero_shot", "zh-lo")]["n"] == "1" and rows[("lora", "zh-lo")]["baseline"] == ""

    tex = written["tex"].read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"\label{tab:synthetic-chrfpp}" in tex
    assert rf"\textbf{{{ladm_mean:.2f} $\pm$ {ladm_std:.2f}$^\uparrow$}}" in tex
    assert written["strength_chrf++"].stat().st_size > 0 and written["delta_r"].stat().st_size > 0
    assert "ladm s0.5" in capsys.readouterr().out


def test_significantly_worse_is_marked_down_and_mixed_directions_unmarked(tmp_path):
    """↓ when every seed is significantly worse than the baseline; no mark when the seeds disagree in direction."""
    for seed, (base, worse, mixed) in enumerate(((GOOD, POOR, POOR), (GOOD2, POOR2, GOOD)), 1):
        fake_job(tmp_path, f"lora-{seed}", "lora", "zh-lo", base, seed=seed)
        fake_job(tmp_path, f"s1-{seed}", "ladm", "zh-lo", worse, strength=1.0, seed=seed)
        fake_job(tmp_path, f"s05-{seed}", "ladm", "zh-lo", mixed, strength=0.5, seed=seed)
    written = report(tmp_path, wandb_log=False)
    markdown = written["md"].read_text()
    worse_mean, worse_std = mean_std(chrf(POOR), chrf(POOR2))
    assert f"| ladm s1.0 | {worse_mean:.2f} ± {worse_std:.2f}↓ |" in markdown
    mixed_mean, mixed_std = mean_std(chrf(POOR), chrf(GOOD))
    assert f"| ladm s0.5 | {mixed_mean:.2f} ± {mixed_std:.2f} |" in markdown
    rows = {(r["row"], r["column"]): r for r in csv.DictReader(written["csv"].open()) if r["metric"] == "chrf++"}
    assert rows[("ladm s1.0", "zh-lo")]["direction"] == "-1" and rows[("ladm s0.5", "zh-lo")]["direction"] == "0"
    assert float(rows[("ladm s0.5", "zh-lo")]["p_value_max_over_seeds"]) < 0.05  # significant, but not one way


def test_rows_with_another_training_budget_are_marked(tmp_path):
    for seed in (1, 2):
        fake_job(tmp_path, f"lora-{seed}", "lora", "zh-lo", POOR, seed=seed)
        fake_job(tmp_path, f"s1-{seed}", "ladm", "zh-lo", GOOD, strength=1.0, seed=seed)
        fake_job(tmp_path, f"mlas-{seed}", "mlas_lora", "zh-lo", GOOD2, seed=seed, examples=4)
    markdown = report(tmp_path, wandb_log=False)["md"].read_text()
    assert "| mlas_lora‡ |" in markdown and "| lora |" in markdown and "| ladm |" in markdown
    assert ("‡: the training budget differs between rows: lora 2 optimizer steps and 16 training examples per pair; "
            "ladm 2 optimizer steps and 16 training examples per pair; mlas_lora 2 optimizer steps and 4 training "
            "examples per pair.") in markdown


def test_rows_trained_on_other_data_get_their_own_baseline(tmp_path):
    """data.* paths follow the pair, but data.max_train_samples differing within a pair is another context."""
    for pair in ("zh-lo", "zh-km"):
        for samples, (lora, ladm) in ((100, (POOR, GOOD)), (200, (POOR2, GOOD2))):
            extra = {"data": {"max_train_samples": samples}}
            fake_job(tmp_path, f"lora-{pair}-{samples}", "lora", pair, lora, **extra)
            fake_job(tmp_path, f"ladm-{pair}-{samples}", "ladm", pair, ladm, strength=1.0, **extra)
    markdown = report(tmp_path, wandb_log=False)["md"].read_text()
    for samples, (lora, ladm) in ((100, (POOR, GOOD)), (200, (POOR2, GOOD2))):
        assert f"| ladm data.max_train_samples={samples} | " in markdown
        assert f"| lora data.max_train_samples={samples} | " in markdown
        row = next(line for line in markdown.splitlines() if line.startswith(f"| ladm data.max_train_samples={samples} |"))
        assert row.rsplit("|", 2)[1].strip() == f"{chrf(ladm) - chrf(lora):+.2f}"


def test_an_early_stopped_multi_pair_run_states_what_each_pair_trained(tmp_path):
    """MLAS-LoRA stopped early after 5 round-robin steps over two pairs: 3 and 2 steps, as trained."""
    fake_job(tmp_path, "lora", "lora", "zh-lo", POOR)
    fake_job(tmp_path, "mlas", "mlas_lora", "zh-lo", GOOD2)
    results = json.loads((tmp_path / "mlas" / "results.json").read_text())
    results["train"] |= {"steps": 5, "steps_per_pair": {"zh-lo": 3, "zh-km": 2}, "examples_seen": {"zh-lo": 12, "zh-km": 8}}
    write_json_atomic(tmp_path / "mlas" / "results.json", results)
    markdown = report(tmp_path, wandb_log=False)["md"].read_text()
    assert "mlas_lora 2/3 optimizer steps and 8/12 training examples per pair" in markdown


def test_ladm_at_strength_zero_is_the_baseline_without_lora(tmp_path):
    for seed, (zero, one) in enumerate(((POOR, GOOD), (POOR2, GOOD2)), 1):
        fake_job(tmp_path, f"s0-{seed}", "ladm", "zh-lo", zero, strength=0.0, seed=seed)
        fake_job(tmp_path, f"s1-{seed}", "ladm", "zh-lo", one, strength=1.0, seed=seed)
    markdown = report(tmp_path, wandb_log=False)["md"].read_text()
    delta = ((chrf(GOOD) - chrf(POOR)) + (chrf(GOOD2) - chrf(POOR2))) / 2
    assert f"{delta:+.2f}" in markdown.split("| ladm s1.0 |")[1].splitlines()[0]
    assert "than ladm s0.0" in markdown


def test_no_results_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no complete results.json" in capsys.readouterr().err


def test_mixed_test_sets_for_one_pair_are_refused(sweep):
    fake_job(sweep, "other", "lora", "zh-lo", POOR, test_set="ntrex128")
    with pytest.raises(LadmError, match="pair zh-lo was tested on different test sets"):
        report(sweep, wandb_log=False)


def test_two_experiments_in_one_folder_are_refused(sweep):
    fake_job(sweep, "other", "lora", "zh-lo", POOR, experiment="another")
    with pytest.raises(LadmError, match=r"several experiments \(another, synthetic\)"):
        report(sweep, wandb_log=False)


def test_report_on_a_real_tiny_sweep(tmp_path, cache_dir, files_overrides):
    sweep = tmp_path / "sweep"
    common = ["train.max_steps=2", "train.batch_size=4", "eval.max_new_tokens=8", "eval.metrics=[chrf++]",
              "logger=wandb", "name=tiny-sweep", "probe.n_sentences=4", *files_overrides, f"cache_dir={cache_dir}",
              f"hydra.sweep.dir={sweep}"]
    for jobs in (["method=ladm", "strength=s0.5,s1"], ["method=lora"]):
        proc = subprocess.run([sys.executable, "-m", "ladm.train", "-m", *jobs, *common], cwd=REPO_ROOT,
                              capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "ladm.report", str(sweep)], cwd=REPO_ROOT, capture_output=True,
                          text=True, env=os.environ | {"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"report.md", "report.csv", "report.tex", "strength_chrf++.png", "delta_r.png"} <= {
        p.name for p in (sweep / "report").iterdir()}
    markdown = (sweep / "report" / "report.md").read_text()
    assert "| lora |" in markdown and "| ladm s0.5 |" in markdown and "| ladm s1 |" in markdown
    assert list(sweep.glob("wandb/offline-run-*")), "the report is logged to the sweep's W&B group"
    assert json.loads(next(sweep.glob("*/results.json")).read_text())["name"] == "tiny-sweep"


@pytest.mark.parametrize("damage,message", [
    (lambda job: (job / "results.json").write_text('{"status": "compl'), "is not valid JSON"),
    (lambda job: (job / "results.json").write_text("[1, 2]"), "holds a JSON list"),
    (lambda job: (job / "results.json").write_text('{"status": "complete", "metrics": {}}'), "lacks model, method"),
    (lambda job: (job / "predictions" / "flores200-devtest" / "zh-lo.hyp").unlink(), "zh-lo.hyp is missing"),
    (lambda job: (job / "predictions" / "flores200-devtest" / "zh-lo.hyp").write_text("only one line\n"), "has 1 hypotheses"),
    (lambda job: (job / "predictions" / "flores200-devtest" / "zh-lo.hyp").write_bytes(b"\xff\xfe\x00binary"),
     "zh-lo.hyp is not readable UTF-8 text (UnicodeDecodeError)"),
    (lambda job: (job / "results.json").write_text(
        (job / "results.json").read_text().replace('"chrf++": ', '"chrf++": NaN, "x": ')),
     "holds a non-finite chrf++ (nan) for zh-lo"),
])
def test_damaged_sweeps_are_one_line(sweep, damage, message):
    from ladm import LadmError

    damage(sweep / "ladm-1.0-zh-lo-1")
    with pytest.raises(LadmError, match=re.escape(message)):
        report(sweep, wandb_log=False)


def test_unfinished_jobs_are_listed_not_dropped(sweep, capsys):
    write_json_atomic(sweep / "running" / "results.json", {"status": "running"})
    markdown = (report(sweep, wandb_log=False)["md"]).read_text()
    assert "### Failed or unfinished jobs" in markdown and "`running`: not finished (status 'running')" in markdown
    assert "`broken`: LadmError: out of memory" in markdown


def test_out_that_is_a_file_is_one_line_before_reading(sweep, capsys, tmp_path):
    from ladm.report import main

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main([str(sweep), "--out", str(tmp_path / "a-file"), "--no-wandb"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"ladm-report: error: --out {tmp_path / 'a-file'} is a file: give a "
                                                    "folder for the report (it is created)"]


def test_a_key_added_later_at_its_neutral_value_does_not_split_rows(tmp_path):
    """Jobs run before `eval.merge_adapters` existed and jobs that have it at its default share one row."""
    fake_job(tmp_path, "old", "lora", "zh-lo", POOR)
    fake_job(tmp_path, "new", "lora", "zh-lo", POOR2, seed=2)
    results = json.loads((tmp_path / "new" / "results.json").read_text())
    results["config"]["eval"] = {"merge_adapters": "auto"}
    write_json_atomic(tmp_path / "new" / "results.json", results)
    markdown = report(tmp_path, wandb_log=False)["md"].read_text()
    assert "| lora |" in markdown and "merge_adapters" not in markdown


def test_the_same_data_read_from_two_checkouts_shares_one_row(tmp_path):
    """A sweep extended from another clone: the shipped data's paths differ by the checkout folder only."""
    for seed, (root, hyps) in enumerate((("/tmp/first-clone", POOR), ("/home/me/ladm", POOR2)), 1):
        fake_job(tmp_path, f"lora-{seed}", "lora", "zh-lo", hyps, seed=seed,
                 data={"test": {"path": f"{root}/data/flores200/devtest"}})
        results = json.loads((tmp_path / f"lora-{seed}" / "results.json").read_text())
        write_json_atomic(tmp_path / f"lora-{seed}" / "results.json", results | {"versions": {"ladm_root": root}})
    markdown = report(tmp_path, wandb_log=False)["md"].read_text()
    assert "| lora | {:.2f} ± {:.2f} |".format(*mean_std(chrf(POOR), chrf(POOR2))) in markdown and "data.test" not in markdown
    # without the checkout recorded, other paths are other data: rows split by them
    for seed in (1, 2):
        results = json.loads((tmp_path / f"lora-{seed}" / "results.json").read_text())
        write_json_atomic(tmp_path / f"lora-{seed}" / "results.json", results | {"versions": {}})
    assert "data.test.path=/tmp/first-clone/data/flores200/devtest" in report(tmp_path, wandb_log=False)["md"].read_text()


def test_minimum_detectable_difference_is_the_formula_of_methods_section_5():
    """MDD = (z_0.975 + z_0.8) · sqrt(B² + V/S) on synthetic scores, computed here by hand."""
    from statistics import NormalDist

    from ladm.report import minimum_detectable_difference

    errors = [[0.8, 1.1, 0.9], [1.3, 1.0, 1.2]]  # per row, per seed: bootstrap standard errors
    differences = [[0.5, -0.2, 1.4], [2.0, 1.1, 0.3]]  # per row, per seed: the difference to the baseline
    b2 = (0.8 ** 2 + 1.1 ** 2 + 0.9 ** 2 + 1.3 ** 2 + 1.0 ** 2 + 1.2 ** 2) / 6
    variances = [sum((d - sum(row) / 3) ** 2 for d in row) / 2 for row in differences]
    z = NormalDist().inv_cdf(0.975) + NormalDist().inv_cdf(0.8)
    expected = z * math.sqrt(b2 + (variances[0] + variances[1]) / 2 / 3)
    assert minimum_detectable_difference(list(zip(errors, differences, strict=True)), 3) == pytest.approx(expected)
    # one seed: no seed spread to add, the test-set part alone
    assert minimum_detectable_difference([([0.8], [0.5])], 1) == pytest.approx(z * 0.8)


def test_the_report_states_the_minimum_detectable_difference_from_the_bootstrap_and_the_seeds(tmp_path):
    """The design row and caption equal the formula applied to the paired bootstrap recomputed here with
    sacrebleu's corpus scores on sacrebleu's resampled indices (seed 12345), independently of ladm's code."""
    from statistics import NormalDist

    import numpy as np

    systems = {1: ([GOOD[i] if i % 3 else POOR[i] for i in range(40)], [GOOD[i] if i % 4 else POOR[i] for i in range(40)]),
               2: ([GOOD2[i] if i % 2 else POOR2[i] for i in range(40)], [GOOD2[i] if i % 5 else POOR[i] for i in range(40)])}
    for seed, (lora, ladm) in systems.items():
        fake_job(tmp_path, f"lora-{seed}", "lora", "zh-lo", lora, seed=seed)
        fake_job(tmp_path, f"ladm-{seed}", "ladm", "zh-lo", ladm, strength=1.0, seed=seed)
    written = report(tmp_path, wandb_log=False)

    indices = np.random.default_rng(12345).choice(len(REFS), size=(1000, len(REFS)), replace=True)
    errors, differences = [], []
    for lora, ladm in systems.values():
        resampled = [chrf_of([ladm[i] for i in row], row) - chrf_of([lora[i] for i in row], row) for row in indices]
        low, high = np.percentile(resampled, [2.5, 97.5])
        errors.append((high - low) / (2 * NormalDist().inv_cdf(0.975)))
        differences.append(chrf(ladm) - chrf(lora))
    spread = (differences[0] - differences[1]) ** 2 / 2  # the sample variance of two values
    expected = (NormalDist().inv_cdf(0.975) + NormalDist().inv_cdf(0.8)) * math.sqrt(
        (errors[0] ** 2 + errors[1] ** 2) / 2 + spread / 2)

    markdown = written["md"].read_text()
    assert f"| *minimum detectable Δ* | {expected:.2f} | {expected:.2f} | |" in markdown  # one pair: avg = zh-lo
    assert f"differences smaller than {expected:.2f} chrF++ on the average (zh-lo {expected:.2f}) cannot be told " \
           "from noise in this table, so an unmarked difference below it is inconclusive, not evidence of no effect" \
           in markdown
    design = {r["column"]: r for r in csv.DictReader(written["csv"].open())
              if r["row"] == "(minimum detectable Δ)" and r["metric"] == "chrf++"}
    assert float(design["zh-lo"]["min_detectable_difference"]) == pytest.approx(expected, rel=1e-5)
    assert "Min.\\ detectable" in written["tex"].read_text()


def chrf_of(hyps, rows):
    return CHRF_PP.corpus_score(hyps, [[REFS[i] for i in rows]]).score


def test_mlas_lora_rows_name_their_teacher(tmp_path):
    """The teacher is part of what an MLAS-LoRA row is; a teacher that is the student itself is said so."""
    fake_job(tmp_path, "lora", "lora", "zh-lo", POOR)
    for name, teacher in (("same", "tiny-llama3"), ("wider", "tiny-llama3-teacher")):
        fake_job(tmp_path, name, "mlas_lora", "zh-lo", GOOD2)
        results = json.loads((tmp_path / name / "results.json").read_text())
        results["config"]["method"]["teacher"] = {"name": teacher, "path": f"/models/{teacher}"}
        write_json_atomic(tmp_path / name / "results.json", results)
    markdown = report(tmp_path, wandb_log=False)["md"].read_text()
    assert "| mlas_lora teacher.path=/models/tiny-llama3 (teacher: tiny-llama3 = student) |" in markdown
    assert "| mlas_lora teacher.path=/models/tiny-llama3-teacher (teacher: tiny-llama3-teacher) |" in markdown


def test_a_selection_ablation_is_plotted_against_its_setting(tmp_path, monkeypatch):
    """k_tal = k_lil swept together is one axis: chrF++ against k with the seeds' mean ± std, LoRA dashed."""
    import ladm.report as report_module

    hyps = {1: (GOOD, GOOD2), 2: (POOR, GOOD), 4: (POOR, POOR2)}
    for k, by_seed in hyps.items():
        for seed, h in enumerate(by_seed, 1):
            fake_job(tmp_path, f"ladm-k{k}-{seed}", "ladm", "zh-lo", h, strength=0.5, seed=seed)
            results = json.loads((tmp_path / f"ladm-k{k}-{seed}" / "results.json").read_text())
            results["config"]["method"] |= {"k_tal": k, "k_lil": k}
            write_json_atomic(tmp_path / f"ladm-k{k}-{seed}" / "results.json", results)
    fake_job(tmp_path, "lora", "lora", "zh-lo", POOR2)
    figures = {}
    real_save = report_module.save_figure
    monkeypatch.setattr(report_module, "save_figure", lambda fig, path: (figures.setdefault(path.name, fig),
                                                                         real_save(fig, path)))
    written = report(tmp_path, wandb_log=False)
    assert "strength_chrf++" not in written and written["k_tal_k_lil_chrf++"].stat().st_size > 0
    ax = figures["k_tal_k_lil_chrf++.png"].axes[0]
    line = ax.lines[0]
    assert list(line.get_xdata()) == [1, 2, 4]
    expected = [mean_std(chrf(a), chrf(b))[0] for a, b in hyps.values()]
    assert list(line.get_ydata()) == pytest.approx(expected)
    assert ax.get_xlabel() == "k_TAL = k_LIL"
    assert any(l.get_linestyle() == "--" and l.get_ydata()[0] == pytest.approx(chrf(POOR2)) for l in ax.lines)


COMMITTED_REPORTS = sorted(path.parent for path in (REPO_ROOT / "results").glob("*/report/report.md"))


@pytest.mark.parametrize("folder", COMMITTED_REPORTS, ids=lambda path: path.parent.name)
def test_a_committed_report_regenerates_from_its_committed_results(folder, tmp_path):
    """Every committed comparison's report.md and report.csv follow from its results.json and prediction files."""
    written = report(folder.parent, tmp_path, wandb_log=False)
    for name in ("md", "csv"):
        assert written[name].read_text() == (folder / f"report.{name}").read_text(), f"report.{name} of {folder}"
