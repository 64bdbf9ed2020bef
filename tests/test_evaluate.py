"""ladm-eval: any saved model on several test sets; the hypotheses a run wrote are reproduced by reloading its
saved state, saved hypotheses are scored again without generating, and the report files the results."""

import csv
import html
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
from hydra import compose, initialize_config_dir
from sacrebleu.metrics import CHRF

from ladm import CONFIG_DIR, REPO_ROOT
from ladm import evaluation as ladm_evaluation
from ladm.evaluate import run as evaluate
from ladm.train import run as train

ENV = os.environ | {"HF_HUB_OFFLINE": "1"}
MLAS = ["method=mlas_lora", "probe.n_sentences=4", "probe.batch_size=4", "method.r_gen=4", "method.r_spe=4",
        "method.pairs=[zh-lo,zh-km]"]
LANDERMT = ["method=landermt", "method.pairs=[zh-lo,zh-km]", "method.lambda=0.6", "probe.n_sentences=4",
            "probe.batch_size=2", "method.k_layers=2"]


@pytest.fixture
def eval_cfg(cache_dir):
    def _make(*overrides: str):
        base = ["logger=none", "eval.metrics=[chrf++]", f"cache_dir={cache_dir}"]
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            return compose("evaluate", overrides=base + list(overrides))

    return _make


def hypotheses(folder, test_set, pair):
    return (folder / "predictions" / test_set / f"{pair}.hyp").read_text(encoding="utf-8").splitlines()


def prediction_meta(folder, test_set="files", pair="zh-lo") -> dict:
    return json.loads((folder / "predictions" / test_set / f"{pair}.json").read_text())


@pytest.mark.parametrize("method", [["method=lora", "train.lr=1e-2"], MLAS, LANDERMT], ids=["lora", "mlas_lora", "landermt"])
def test_a_run_folder_reloads_to_its_own_hypotheses(make_cfg, eval_cfg, files_overrides, tmp_path, method):
    """Evaluating a run folder whose predictions are gone regenerates them from adapter/: the same hypotheses
    as the run wrote right after training (every pair, with its own adapters), and the same scores."""
    common = [*files_overrides, "train.max_steps=3", "train.batch_size=4", "train.warmup_ratio=0",
              "eval.max_new_tokens=8", "data.validation_size=0"]
    trained = train(make_cfg(*method, *common), tmp_path / "run")
    shutil.copytree(tmp_path / "run" / "predictions", tmp_path / "saved")
    shutil.rmtree(tmp_path / "run" / "predictions")
    results = evaluate(eval_cfg(f"evaluate.run={tmp_path / 'run'}"), tmp_path / "eval")
    assert results["method"] == trained["method"] and results["pairs"] == trained["pairs"]
    assert results["evaluated"]["kind"] == "run" and results["test_set"] == "files"
    for pair in trained["pairs"]:
        expected = (tmp_path / "saved" / "files" / f"{pair}.hyp").read_text(encoding="utf-8").splitlines()
        assert hypotheses(tmp_path / "eval", "files", pair) == expected
        assert results["metrics"][pair]["chrf++"] == pytest.approx(trained["metrics"][pair]["chrf++"])
    # The reloaded state has the trained one's digest: with the run's predictions back, nothing is generated.
    shutil.copytree(tmp_path / "saved", tmp_path / "run" / "predictions")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ladm_evaluation, "translate", lambda *a, **k: pytest.fail("generated again"))
        again = evaluate(eval_cfg(f"evaluate.run={tmp_path / 'run'}"), tmp_path / "eval-again")
    assert again["metrics"] == results["metrics"]


def test_saved_hypotheses_are_scored_again_without_generating(make_cfg, eval_cfg, files_overrides, tmp_path,
                                                               monkeypatch):
    trained = train(make_cfg("method=zero_shot", "eval.max_new_tokens=6", *files_overrides), tmp_path / "run")
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    generated_with = prediction_meta(tmp_path / "run")["generated_with"]
    assert generated_with == ({"commit": head.stdout.strip(), "dirty": generated_with["dirty"]}
                              if head.returncode == 0 else None)
    # hypotheses scored again keep the commit that generated them, not the one that scored them
    meta_file = tmp_path / "run" / "predictions" / "files" / "zh-lo.json"
    meta_file.write_text(json.dumps(prediction_meta(tmp_path / "run") | {"generated_with": {"commit": "abc"}}))
    monkeypatch.setattr(ladm_evaluation, "translate", lambda *a, **k: pytest.fail("generated again"))
    results = evaluate(eval_cfg(f"evaluate.run={tmp_path / 'run'}", "eval.metrics=[chrf++,spbleu]",
                                "eval.on_missing=skip"), tmp_path / "eval")
    hyps, refs = hypotheses(tmp_path / "run", "files", "zh-lo"), (tmp_path / "run" / "predictions" / "files" /
                                                                 "zh-lo.ref").read_text(encoding="utf-8").splitlines()
    assert hypotheses(tmp_path / "eval", "files", "zh-lo") == hyps
    assert prediction_meta(tmp_path / "eval")["generated_with"] == {"commit": "abc"}
    assert results["metrics"]["zh-lo"]["chrf++"] == pytest.approx(CHRF(word_order=2).corpus_score(hyps, [refs]).score)
    assert results["metrics"]["zh-lo"]["chrf++"] == pytest.approx(trained["metrics"]["zh-lo"]["chrf++"])
    with pytest.raises(pytest.fail.Exception, match="generated again"):  # other decoding settings: generate
        evaluate(eval_cfg(f"evaluate.run={tmp_path / 'run'}", "eval.num_beams=2"), tmp_path / "eval-beams")


LORA_RUN = ["method=lora", "train.max_steps=3", "train.batch_size=4", "train.warmup_ratio=0", "eval.max_new_tokens=8"]


def test_a_rerun_with_another_lr_in_the_same_folder_generates_again(make_cfg, files_overrides, tmp_path):
    """The folder's saved hypotheses came from other weights: the rerun's are those of a fresh run."""
    train(make_cfg(*LORA_RUN, *files_overrides, "train.lr=1e-2"), tmp_path / "job")
    old = hypotheses(tmp_path / "job", "files", "zh-lo")
    rerun = train(make_cfg(*LORA_RUN, *files_overrides, "train.lr=3e-2"), tmp_path / "job")
    fresh = train(make_cfg(*LORA_RUN, *files_overrides, "train.lr=3e-2"), tmp_path / "fresh")
    assert hypotheses(tmp_path / "job", "files", "zh-lo") == hypotheses(tmp_path / "fresh", "files", "zh-lo") != old
    assert rerun["metrics"] == fresh["metrics"]
    meta = json.loads((tmp_path / "job" / "predictions" / "files" / "zh-lo.json").read_text())
    assert meta["generated_by"]["base_model"]["name"] == "tiny-llama3" and meta["generated_by"]["method"] == "lora"


def test_an_unchanged_rerun_scores_the_saved_hypotheses(make_cfg, files_overrides, tmp_path, monkeypatch):
    """Scoring failed after generation; the rerun trains the same weights again (exact), so its model's
    hypotheses are on disk already: scored, not generated."""
    from ladm.metrics import Scorer

    score = Scorer.score
    monkeypatch.setattr(Scorer, "score", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("scorer down")))
    with pytest.raises(RuntimeError, match="scorer down"):
        train(make_cfg(*LORA_RUN, *files_overrides), tmp_path)
    saved = hypotheses(tmp_path, "files", "zh-lo")
    monkeypatch.setattr(Scorer, "score", score)
    monkeypatch.setattr(ladm_evaluation, "translate", lambda *a, **k: pytest.fail("generated again"))
    results = train(make_cfg(*LORA_RUN, *files_overrides), tmp_path)
    assert results["status"] == "complete" and hypotheses(tmp_path, "files", "zh-lo") == saved


def test_ladm_eval_after_the_adapter_was_replaced_generates_again(make_cfg, eval_cfg, files_overrides, tmp_path):
    """Same command, same output folder, another adapter/ in the run folder: evaluated again (not skipped as
    complete, saved hypotheses not reused), giving the new adapter's own hypotheses."""
    for name, lr in (("a", "1e-2"), ("b", "3e-2")):
        train(make_cfg(*LORA_RUN, *files_overrides, f"train.lr={lr}"), tmp_path / name)
    command = eval_cfg(f"evaluate.run={tmp_path / 'a'}")
    evaluate(command, tmp_path / "eval")
    assert hypotheses(tmp_path / "eval", "files", "zh-lo") == hypotheses(tmp_path / "a", "files", "zh-lo")
    assert hypotheses(tmp_path / "a", "files", "zh-lo") != hypotheses(tmp_path / "b", "files", "zh-lo")
    shutil.rmtree(tmp_path / "a" / "adapter")
    shutil.copytree(tmp_path / "b" / "adapter", tmp_path / "a" / "adapter")
    evaluate(command, tmp_path / "eval")
    assert hypotheses(tmp_path / "eval", "files", "zh-lo") == hypotheses(tmp_path / "b", "files", "zh-lo")


def test_plain_peft_adapter_and_base_model(make_cfg, eval_cfg, files_overrides, tmp_path):
    """A run's adapter/ given as a plain PEFT folder reproduces the run; the base model reproduces zero-shot."""
    lora = train(make_cfg("method=lora", "train.max_steps=3", "train.batch_size=4", "train.lr=1e-2",
                          "eval.max_new_tokens=8", *files_overrides), tmp_path / "lora")
    peft = evaluate(eval_cfg(f"evaluate.adapter={tmp_path / 'lora' / 'adapter'}", "eval.max_new_tokens=8",
                             *files_overrides), tmp_path / "peft")
    assert peft["method"] == "peft_adapter" and peft["evaluated"]["path"] == str(tmp_path / "lora" / "adapter")
    assert hypotheses(tmp_path / "peft", "files", "zh-lo") == hypotheses(tmp_path / "lora", "files", "zh-lo")
    assert peft["metrics"]["zh-lo"]["chrf++"] == pytest.approx(lora["metrics"]["zh-lo"]["chrf++"])
    train(make_cfg("method=zero_shot", "eval.max_new_tokens=8", *files_overrides), tmp_path / "zero")
    base = evaluate(eval_cfg("eval.max_new_tokens=8", *files_overrides), tmp_path / "base")
    assert base["method"] == "zero_shot" and base["evaluated"] == {"kind": "base_model"}
    assert hypotheses(tmp_path / "base", "files", "zh-lo") == hypotheses(tmp_path / "zero", "files", "zh-lo")


def tmx_segments(zip_name: str, lang: str) -> dict[str, str]:
    """An independent reading of a TICO-19 memory: regular expressions over the raw XML."""
    with zipfile.ZipFile(REPO_ROOT / "data" / "tico19" / zip_name) as archive:
        xml = archive.read(archive.namelist()[0]).decode("utf-8")
    units = re.findall(r'<tu tuid="([^"]+)">(.*?)</tu>', xml, flags=re.S)
    found = {}
    for tuid, body in units:
        match = re.search(rf'<tuv xml:lang="{lang}">\s*<seg>(.*?)</seg>', body, flags=re.S)
        found[tuid] = " ".join(html.unescape(match.group(1)).split())  # the XML's character entities
    return found


def test_cli_several_test_sets_and_the_report(tmp_path, cache_dir):
    """`ladm-eval` on FLORES-200, NTREX-128 and TICO-19 at once: each with its own sentences, metrics and
    signatures; TICO-19's zh→km pairs are the memories' units aligned by id; ladm-report tabulates the job."""
    out = tmp_path / "eval"
    proc = subprocess.run(
        [sys.executable, "-m", "ladm.evaluate", "pair=zh-km", "eval.test_sets=[flores200,ntrex128,tico19]",
         "eval.max_samples=3", "eval.max_new_tokens=4", "eval.metrics=[chrf++]", "logger=none",
         f"cache_dir={cache_dir}", f"hydra.run.dir={out}"], cwd=REPO_ROOT, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results["test_sets"]) == ["flores200-devtest", "ntrex128", "tico19"]
    assert results["test_set"] == "flores200-devtest"
    assert results["metrics"] == results["test_sets"]["flores200-devtest"]["metrics"]
    zh, km = tmx_segments("all.en-zh.tmx.zip", "zh"), tmx_segments("all.en-km.tmx.zip", "km")
    first = list(zh)[:3]
    assert (out / "predictions" / "tico19" / "zh-km.src").read_text(encoding="utf-8").splitlines() == [zh[i] for i in first]
    assert (out / "predictions" / "tico19" / "zh-km.ref").read_text(encoding="utf-8").splitlines() == [km[i] for i in first]
    ntrex_ref = (REPO_ROOT / "data" / "ntrex128" / "newstest2019-ref.khm.txt").read_bytes().decode().split("\r\n")[:3]
    assert (out / "predictions" / "ntrex128" / "zh-km.ref").read_text(encoding="utf-8").splitlines() == ntrex_ref
    for name, entry in results["test_sets"].items():
        hyps = hypotheses(out, name, "zh-km")
        refs = (out / "predictions" / name / "zh-km.ref").read_text(encoding="utf-8").splitlines()
        assert entry["n_test"] == {"zh-km": 3} and "nw:2" in entry["signatures"]["chrf++"]
        assert entry["metrics"]["zh-km"]["chrf++"] == pytest.approx(CHRF(word_order=2).corpus_score(hyps, [refs]).score)
    for test_set, shown in ((None, "flores200-devtest"), ("tico19", "tico19")):
        report = subprocess.run([sys.executable, "-m", "ladm.report", str(out), "--no-wandb", "--out", str(tmp_path / shown),
                                 *(["--test-set", test_set] if test_set else [])],
                                cwd=REPO_ROOT, capture_output=True, text=True, env=ENV)
        assert report.returncode == 0, report.stderr[-2000:]
        rows = [r for r in csv.DictReader((tmp_path / shown / "report.csv").open(encoding="utf-8"))
                if r["metric"] == "chrf++" and r["column"] == "zh-km"]
        assert [(r["row"], r["test_set"]) for r in rows] == [("zero_shot", shown)]
        assert float(rows[0]["mean"]) == pytest.approx(results["test_sets"][shown]["metrics"]["zh-km"]["chrf++"])


def readme_command(start: str) -> str:
    """The README's command line that starts with `start`, as printed."""
    return next(line for line in (REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines() if line.startswith(start))


def test_readme_ladm_eval_commands_run_as_printed(make_cfg, files_overrides, tmp_path, cache_dir):
    """The README's `ladm-eval` lines over sweep job folders (names hold '=' and ','), run by bash exactly as
    printed: only the sweep folder, `<job>` and `ladm-eval` itself (→ this Python) are substituted, and small-run
    settings appended. The sweep's report/ and wandb/ folders are not jobs."""
    sweep = tmp_path / "multirun" / "my_sweep"
    runs = [sweep / f"method=zero_shot,pair=zh-km,seed={seed}" for seed in (1, 2)]
    for seed, folder in enumerate(runs, 1):
        train(make_cfg("method=zero_shot", "pair=zh-km", f"train.seed={seed}", "eval.max_new_tokens=2",
                       "eval.max_samples=2", "data.max_train_samples=16"), folder)
    (sweep / "report").mkdir()
    (sweep / "wandb").mkdir()
    small = f" eval.max_new_tokens=3 eval.max_samples=2 logger=none cache_dir={cache_dir}"
    ladm_eval = f"{sys.executable} -m ladm.evaluate"
    listing = tmp_path / "my_jobs.txt"
    listing.write_text(f"{runs[1]}\n\n")
    many = readme_command('ladm-eval -m "evaluate.run=multirun/my_sweep/*"').replace("multirun/my_sweep", str(sweep))
    listed = readme_command("ladm-eval -m evaluate.run=@my_jobs.txt").replace("my_jobs.txt", str(listing))
    one = readme_command('ladm-eval "evaluate.run=').replace("multirun/ladm_vs_lora/<job>", str(runs[0]))
    for name, command in (("many", many), ("listed", listed), ("one", one)):
        command = command.replace("ladm-eval", ladm_eval, 1)
        out = tmp_path / f"eval-{name}"
        where = f" hydra.run.dir={out}" if name == "one" else f" hydra.sweep.dir={out}"
        proc = subprocess.run(["bash", "-c", command.split("  #")[0] + small + where], cwd=REPO_ROOT,
                              capture_output=True, text=True, env=ENV)
        assert proc.returncode == 0, proc.stderr[-3000:]
        found = [json.loads(p.read_text()) for p in out.rglob("results.json")]
        expected = {"many": runs, "listed": runs[1:], "one": runs[:1]}[name]
        assert sorted(r["evaluated"]["path"] for r in found) == sorted(map(str, expected))
        assert all(r["status"] == "complete" and r["max_new_tokens"] == {"zh-km": 3} for r in found)
    assert list(json.loads(next((tmp_path / "eval-one").rglob("results.json")).read_text())["test_sets"]) == [
        "flores200-devtest", "ntrex128", "tico19"]


@pytest.mark.parametrize("args,message", [
    (["pair=zh-lo", "eval.test_sets=[tico19]"], "has no translation memory for 'lo'"),
    (["eval.test_sets=[wmt19]"], "eval.test_sets must be a non-empty list of flores200 | ntrex128 | tico19"),
    (["evaluate.run=/nonexistent/run"], "is not a folder"),
    (["evaluate.adapter=/nonexistent/adapter"], "is not a folder"),
    (["evaluate.run=/nonexistent/sweep/*"], "names no run folder"),
    (["evaluate.run=@/nonexistent/jobs.txt"], "no such file"),
    (["evaluate.allow_other_base=abc"], "evaluate.allow_other_base must be true or false or null, got 'abc'"),
    ([f"evaluate.run={REPO_ROOT}/*"], "names no run folder"),
])
def test_bad_evaluation_input_is_one_line(tmp_path, cache_dir, args, message):
    """Refused before any model is loaded, in one line, exit code 2."""
    proc = subprocess.run([sys.executable, "-m", "ladm.evaluate", *args, "logger=none", f"cache_dir={cache_dir}",
                           f"hydra.run.dir={tmp_path / 'out'}"], cwd=REPO_ROOT, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1


def test_a_run_that_stopped_before_its_adapter_is_refused(make_cfg, eval_cfg, files_overrides, tmp_path):
    from ladm import LadmError

    train(make_cfg("method=lora", "train.max_steps=1", "train.save_adapter=false", "eval.max_new_tokens=2",
                   *files_overrides), tmp_path / "run")
    with pytest.raises(LadmError, match="has no adapter/"):
        evaluate(eval_cfg(f"evaluate.run={tmp_path / 'run'}"), tmp_path / "eval")


@pytest.mark.parametrize("pair", ["zh-en", "en-zh"])
def test_tico19_pairs_with_the_pivot_language_read_one_memory(make_cfg, pair):
    """X→en and en→X: both sides come from all.en-X.tmx (the pivot side is that memory's English)."""
    from ladm.data import read_split, test_set_configs

    (tico,) = test_set_configs(make_cfg(f"pair={pair}", "eval.test_sets=[tico19]"))
    corpus = read_split(tico)
    zh, en = tmx_segments("all.en-zh.tmx.zip", "zh"), tmx_segments("all.en-zh.tmx.zip", "en")
    ids = [i for i in zh if zh[i] and en[i]]
    src, tgt = (zh, en) if pair == "zh-en" else (en, zh)
    assert corpus.src == [src[i] for i in ids] and corpus.tgt == [tgt[i] for i in ids] and len(ids) == 3071


def test_a_foreign_run_folder_is_read_without_reading_this_machine(make_cfg, tmp_path, monkeypatch):
    """A run folder's config that calls `${oc.env:...}` (outside the keys ladm-eval replaces) is refused in one
    line, and the variable's value appears nowhere; a corrupt config.yaml or a results.json holding a list are one
    line too. ladm's own config (cache_dir and logger read the environment) is accepted."""
    from omegaconf import OmegaConf

    from ladm import LadmError
    from ladm.evaluate import run_config

    monkeypatch.setenv("SOME_SECRET", "hunter2")
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    config = OmegaConf.to_container(make_cfg("method=zero_shot"), resolve=False)
    config["cache_dir"] = "${oc.env:LADM_CACHE,/tmp}"
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(config))
    assert run_config(run_dir)[0].method.name == "zero_shot"

    config["prompt"]["template"] = "${oc.env:SOME_SECRET} {src}"
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(config))
    with pytest.raises(LadmError, match=r"prompt.template in .*does not resolve \$\{oc.env:...\}") as err:
        run_config(run_dir)
    assert "hunter2" not in str(err.value)

    (run_dir / ".hydra" / "config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(LadmError, match="config.yaml is not a readable config"):
        run_config(run_dir)
    (run_dir / "results.json").write_text("[1, 2]")
    with pytest.raises(LadmError, match="holds a JSON list"):
        run_config(run_dir)


def test_readme_quick_loop_runs_as_printed(tmp_path, cache_dir):
    """The README's four-line loop (a debug run, a small sweep, ladm-eval over the sweep's folders, ladm-report),
    run by bash exactly as printed in a fresh folder; only `ladm-*` → this Python's `-m ladm.*`."""
    lines = (REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ladm-train model=tiny-qwen2.5 pair=zh-km method=lora"))
    script = "\n".join(lines[start:start + 4])
    for tool, module in (("ladm-train", "train"), ("ladm-eval", "evaluate"), ("ladm-report", "report")):
        script = script.replace(tool, f"{sys.executable} -m ladm.{module}")
    proc = subprocess.run(["bash", "-ec", script], cwd=tmp_path, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "outputs" / "debug").rglob("results.json"))) == 1
    assert len(list((tmp_path / "multirun" / "quick").glob("*/results.json"))) == 4
    evaluated = [json.loads(p.read_text()) for p in (tmp_path / "multirun" / "quick-ntrex").glob("*/results.json")]
    assert len(evaluated) == 4 and all(list(r["test_sets"]) == ["ntrex128"] for r in evaluated)
    assert "| zero_shot |" in proc.stdout and "| lora |" in proc.stdout


def test_damaged_or_foreign_adapters_are_refused_before_the_model_loads(make_cfg, files_overrides, tmp_path, cache_dir):
    """ladm-eval on a PEFT folder: a corrupt adapter_config.json, a truncated safetensors, a rank that does not match
    the weights, and an adapter trained on another base are each one line with exit code 2 (no model loaded);
    evaluate.allow_other_base=true evaluates the last one."""
    import shutil

    run_dir = tmp_path / "run"
    train(make_cfg("method=lora", "train.max_steps=1", "train.batch_size=4", "eval.max_samples=1",
                   "eval.max_new_tokens=2", *files_overrides), run_dir)
    good = run_dir / "adapter"
    config = json.loads((good / "adapter_config.json").read_text())

    def variant(name, change):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        change(folder)
        return folder

    def with_config(**values):
        return lambda folder: (folder / "adapter_config.json").write_text(json.dumps(config | values))

    weights = good / "adapter_model.safetensors"
    cases = {
        variant("corrupt", lambda f: (f / "adapter_config.json").write_text("{not json")): "is not valid JSON",
        variant("truncated", lambda f: (f / "adapter_model.safetensors").write_bytes(weights.read_bytes()[:-100])):
            "is truncated or corrupt",
        variant("rank", with_config(r=config["r"] * 2)): f"has rank {config['r']}, but its adapter_config.json says",
        variant("foreign", with_config(base_model_name_or_path="Qwen/Qwen2.5-7B")): "was trained on Qwen/Qwen2.5-7B",
    }
    for folder, message in cases.items():
        proc = subprocess.run([sys.executable, "-m", "ladm.evaluate", f"evaluate.adapter={folder}", "logger=none",
                               f"cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'out' / folder.name}"],
                              cwd=REPO_ROOT, capture_output=True, text=True, env=ENV)
        assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], (folder.name, proc.stderr[-1500:])
        assert "Loading weights" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "ladm.evaluate", f"evaluate.adapter={tmp_path / 'foreign'}",
                           "evaluate.allow_other_base=true", *files_overrides, "eval.max_new_tokens=2", "logger=none",
                           "eval.metrics=[chrf++]",
                           f"cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'out' / 'allowed'}"],
                          cwd=REPO_ROOT, capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
