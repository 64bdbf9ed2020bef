"""ladm-report on synthetic results (known answers) and on a real tiny sweep."""

import csv
import json
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
POOR = [f"dog {i}" for i in range(40)]  # far from them


def fake_job(root, name, method, pair, hyps, strength=None, test_set="flores200-devtest", status="complete"):
    job = root / name
    write_lines_atomic(job / "predictions" / test_set / f"{pair}.hyp", hyps)
    write_lines_atomic(job / "predictions" / test_set / f"{pair}.ref", REFS)
    config = {"name": "synthetic", "model": {"name": "tiny-llama3"}, "method": {"name": method}, "pair": {"name": pair},
              "logger": {"name": "none", "mode": "disabled"}}
    details = {}
    if strength is not None:
        config["strength"] = {"name": f"s{strength}", "alpha": strength, "beta": strength}
        details = {"pair": pair, "delta_r": [0.1, -0.2, 0.05, 0.0]}
    write_json_atomic(job / "results.json", {
        "status": status, "model": "tiny-llama3", "method": method, "pairs": [pair], "test_set": test_set,
        "n_test": {pair: len(REFS)}, "metrics": {pair: {"chrf++": CHRF(word_order=2).corpus_score(hyps, [REFS]).score,
                                                "spbleu": None}},
        "method_details": details, "config": config, "train": {"max_length": 300}, "max_new_tokens": {pair: 50},
        "truncated_train": {pair: {"count": 3, "of": 200, "share": 3 / 200}},
        "hit_generation_budget": {pair: {"count": 1, "of": len(REFS), "share": 1 / len(REFS)}}})


@pytest.fixture
def sweep(tmp_path):
    for pair in ("zh-lo", "zh-km"):
        fake_job(tmp_path, f"lora-{pair}", "lora", pair, POOR)
        fake_job(tmp_path, f"zs-{pair}", "zero_shot", pair, POOR[:20] + GOOD[20:])
        for s, hyps in ((0.5, GOOD[:30] + POOR[30:]), (1.0, GOOD)):
            fake_job(tmp_path, f"ladm-{s}-{pair}", "ladm", pair, hyps, strength=s)
    write_json_atomic(tmp_path / "broken" / "results.json", {"status": "failed", "error": "LadmError: out of memory"})
    return tmp_path


def test_tables_match_independent_scores_and_mark_significance(sweep, capsys):
    written = report(sweep, wandb_log=False)
    rows = list(csv.DictReader(written["csv"].open()))
    chrf = CHRF(word_order=2)
    by_row = {(r["row"], r["pair"]): r for r in rows if r["metric"] == "chrf++"}
    assert float(by_row[("ladm s1.0", "zh-lo")]["value"]) == pytest.approx(chrf.corpus_score(GOOD, [REFS]).score)
    assert float(by_row[("ladm s1.0", "zh-km")]["p_value_vs_lora"]) < 0.05  # far better than LoRA
    assert by_row[("lora", "zh-lo")]["p_value_vs_lora"] == ""  # the baseline itself

    markdown = written["md"].read_text()
    good, poor = chrf.corpus_score(GOOD, [REFS]).score, chrf.corpus_score(POOR, [REFS]).score
    assert f"| ladm s1.0 | {good:.2f}† | {good:.2f}† | {good:.2f} | {good - poor:+.2f} |" in markdown
    hit = f"{100 / len(REFS):.1f}% (1/{len(REFS)})"
    assert f"| lora | zh-km | 300 | 1.5% (3/200) | 50 | {hit} |" in markdown  # the length budgets and their cuts
    assert f"| lora | {poor:.2f} | {poor:.2f} | {poor:.2f} | +0.00 |" in markdown
    assert "spBLEU" not in markdown  # never measured, never shown
    assert "`broken`: LadmError: out of memory" in markdown
    assert r"\begin{tabular}" in written["tex"].read_text() and r"$^\dagger$" in written["tex"].read_text()
    assert written["strength_chrf++"].stat().st_size > 0 and written["delta_r"].stat().st_size > 0
    assert "ladm s0.5" in capsys.readouterr().out


def test_no_results_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no complete results.json" in capsys.readouterr().err


def test_mixed_test_sets_for_one_pair_are_refused(sweep):
    fake_job(sweep, "other", "lora", "zh-lo", POOR, test_set="ntrex128")
    with pytest.raises(LadmError, match="pair zh-lo was tested on different test sets"):
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
])
def test_damaged_sweeps_are_one_line(sweep, damage, message):
    from ladm import LadmError

    damage(sweep / "ladm-1.0-zh-lo")
    with pytest.raises(LadmError, match=re.escape(message)):
        report(sweep, wandb_log=False)
