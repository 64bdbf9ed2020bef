"""The benchmark scripts run: the GPU script's `--shape tiny` on a CPU goes through every measurement of the GPU
table; the stop-criterion comparison runs its rows and reports its agreement."""

import json
import re
import subprocess
import sys

from ladm import REPO_ROOT


def test_bench_gpu_runs_every_row_on_the_tiny_shape(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    monkeypatch.setattr(sys, "argv", ["bench_gpu.py"])
    import bench_gpu

    bench_gpu.main(["--shape", "tiny", "--steps", "3", "--warmup", "1", "--sentences", "4", "--max-new-tokens", "4",
                    "--out", str(tmp_path / "rows.json")])
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    trained = [(r["runner"], r["gradient_checkpointing"]) for r in rows if "runner" in r]
    assert sorted(trained) == sorted((runner, gc) for runner in ("hf_trainer", "ladm") for gc in (False, True))
    assert all(r["tokens_per_s"] > 0 and r["steps_timed"] == 2 and 0 < r["mfu"] < 1 for r in rows if "runner" in r)
    generated = [r for r in rows if "merged" in r]
    assert [r["merged"] for r in generated] == [False, True] and all(r["sentences_per_s"] > 0 for r in generated)
    assert generated[0]["identical_hypotheses"] == 1.0


def test_bench_stop_runs_and_reports_both_variants():
    """A smoke test of the script (its rows, its ratio line, its agreement count). On random weights a newline is
    rare, so agreement here says little; that the cached criterion stops exactly like `generate(stop_strings=...)`
    is tested with a forced newline in test_families."""
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_stop.py"), "--model", "tiny-llama3",
                           "--pair", "zh-km", "--sentences", "12", "--batch-size", "4"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "identical hypotheses: 12/12" in done.stdout and "batch 3/3" in done.stdout, done.stdout
    assert re.search(r"speed-up: [0-9.]+x", done.stdout)
