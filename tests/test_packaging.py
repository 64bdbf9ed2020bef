"""A built wheel, installed into a fresh virtual environment, runs from any directory: it ships conf/ (with the
experiment presets), the default data and the tiny models' tokenizers."""

import json
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

from ladm import REPO_ROOT, __version__


def test_wheel_in_a_fresh_venv_runs_from_any_directory(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(wheels), str(REPO_ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("ladm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = "ladm/_shipped/"
    assert {shipped + "conf/config.yaml", shipped + "conf/experiment/ladm_vs_lora.yaml",
            shipped + "data/flores200/devtest/lao_Laoo.devtest", shipped + "data/tico19/all.en-km.tmx.zip",
            shipped + "tests/assets/llama3/tokenizer.json"} <= names

    # A fresh venv with ladm from the wheel. Its dependencies are then this environment's, through a .pth line
    # written *after* the install (pip would otherwise see this environment's ladm and uninstall it; a path
    # added by a .pth line does not load this environment's editable install either).
    fresh = tmp_path / "fresh"
    venv.create(fresh, with_pip=False)
    python = fresh / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                              "--ignore-installed", "-q", str(wheel)], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert install.returncode == 0, install.stderr[-3000:]
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([python, "-c", "import ladm; print(ladm.__file__)"], cwd=elsewhere, capture_output=True,
                           text=True, env=env)
    assert where.stdout.startswith(str(fresh)), where.stdout + where.stderr
    train = subprocess.run([fresh / "bin" / "ladm-train", "-m", "debug=fast", "method=zero_shot,lora",
                            f"cache_dir={tmp_path / 'cache'}"], cwd=elsewhere, capture_output=True, text=True, env=env)
    assert train.returncode == 0, train.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (elsewhere / "multirun" / "debug").glob("*/results.json")]
    assert sorted(r["method"] for r in results) == ["lora", "zero_shot"]
    assert all(r["versions"]["ladm"] == __version__ and r["versions"]["ladm_source"] is None for r in results)
    report = subprocess.run([fresh / "bin" / "ladm-report", "multirun/debug", "--no-wandb"], cwd=elsewhere,
                            capture_output=True, text=True, env=env)
    assert report.returncode == 0 and "| lora |" in report.stdout, report.stderr[-2000:]
    for script in ("ladm-eval", "ladm-probe"):
        shown = subprocess.run([fresh / "bin" / script, "--help"], cwd=elsewhere, capture_output=True, text=True, env=env)
        assert shown.returncode == 0 and "ladm" in shown.stdout, shown.stderr[-2000:]
    assert "ladm" in subprocess.run([sys.executable, "-m", "pip", "list"], capture_output=True, text=True).stdout, \
        "this environment's own ladm is untouched"


def test_a_checkout_records_its_git_commit():
    from ladm.evaluation import source_revision

    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    revision = source_revision()
    if head.returncode != 0:  # a source tree without git (e.g. an unpacked sdist)
        assert revision is None
    else:
        assert revision["commit"] == head.stdout.strip() and isinstance(revision["dirty"], bool)
