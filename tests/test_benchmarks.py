"""The GPU benchmark script runs: its `--shape tiny` on a CPU goes through every measurement of the GPU table."""

import json
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
