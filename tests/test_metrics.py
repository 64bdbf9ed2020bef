"""Metrics against sacrebleu / sentencepiece / COMET called directly; honest labels for spBLEU."""

import json
import subprocess
from pathlib import Path

import pytest
import sentencepiece
from omegaconf import OmegaConf
from sacrebleu.metrics import BLEU, CHRF

from ladm import REPO_ROOT, LadmError
from ladm import metrics as ladm_metrics
from ladm.metrics import Scorer
from ladm.train import run

SRC = ["今天天气很好。", "我们去公园吧。", "他在读书。"]
HYP = ["ມື້ນີ້ອາກາດດີ.", "ພວກເຮົາໄປສວນສາທາລະນະ.", "ລາວອ່ານປຶ້ມ"]
REF = ["ມື້ນີ້ອາກາດດີຫຼາຍ.", "ໄປສວນສາທາລະນະກັນເທາະ.", "ລາວກຳລັງອ່ານປຶ້ມ."]


def eval_cfg(**changes):
    cfg = OmegaConf.load(REPO_ROOT / "conf" / "eval" / "default.yaml")
    return OmegaConf.merge(cfg, changes)


@pytest.fixture(scope="module")
def standin_spm(tmp_path_factory) -> Path:
    """A SentencePiece model trained offline on shipped text: *not* the official FLORES-200 one."""
    root = tmp_path_factory.mktemp("sacrebleu")
    (root / "models").mkdir()
    sentencepiece.SentencePieceTrainer.train(
        input=str(REPO_ROOT / "data/flores200/dev/lao_Laoo.dev"), model_prefix=str(root / "spm"),
        vocab_size=300, character_coverage=1.0, minloglevel=2)
    (root / "spm.model").rename(root / "models" / "flores200sacrebleuspm")
    return root


@pytest.fixture
def sacrebleu_dir(standin_spm, monkeypatch) -> Path:
    from sacrebleu.tokenizers import tokenizer_spm

    monkeypatch.setattr(tokenizer_spm, "SACREBLEU_DIR", str(standin_spm))
    return standin_spm / "models" / "flores200sacrebleuspm"


def samples(src, hyp, ref):
    return [{"src": s, "mt": h, "ref": r} for s, h, r in zip(src, hyp, ref, strict=True)]


SAMPLE_SETS = {"all": samples(SRC, HYP, REF), "zh-lo": samples(SRC[:2], HYP[:2], REF[:2]),
               "zh-km": samples(SRC[2:], HYP[2:], REF[2:])}


@pytest.fixture(scope="module")
def tiny_comet(tmp_path_factory) -> tuple[Path, dict]:
    """The stand-in COMET checkpoint (tests/comet_standin.py) and the saved model's own scores of SAMPLE_SETS, built
    in this process where unbabel-comet scores here, else in the COMET environment ladm would use (.venv-comet)."""
    root = tmp_path_factory.mktemp("comet")
    if ladm_metrics.comet_installed():
        from comet_standin import build

        reference = build(root, SAMPLE_SETS)
    else:
        python = ladm_metrics.comet_python(eval_cfg())
        if python is None:
            pytest.skip("no environment with unbabel-comet (make install builds .venv-comet)")
        (root / "samples.json").write_text(json.dumps(SAMPLE_SETS), encoding="utf-8")
        built = subprocess.run([python, str(Path(__file__).with_name("comet_standin.py")), str(root),
                                str(root / "samples.json")], capture_output=True, text=True)
        assert built.returncode == 0, built.stderr[-3000:]
        reference = json.loads((root / "reference.json").read_text(encoding="utf-8"))
    return root / "tiny-comet", reference


def in_process_comet_only():
    if not ladm_metrics.comet_installed():
        pytest.skip("patches COMET's own download in this process: runs where unbabel-comet scores in process "
                    "(make test-lower)")


def test_chrf_plus_plus_equals_sacrebleu():
    scores, signatures = Scorer.preflight(eval_cfg(metrics=["chrf++"])).score(SRC, HYP, REF)
    expected = CHRF(word_order=2).corpus_score(HYP, [REF])
    assert scores == {"chrf++": pytest.approx(expected.score)}
    assert "nw:2" in signatures["chrf++"]


def test_missing_spm_model_stops_before_training_by_default(monkeypatch, tmp_path):
    from sacrebleu.tokenizers import tokenizer_spm

    monkeypatch.setattr(tokenizer_spm, "SACREBLEU_DIR", str(tmp_path))
    with pytest.raises(LadmError, match="flores200sacrebleuspm .*ladm-fetch-metrics"):
        Scorer.preflight(eval_cfg(metrics=["spbleu"]))
    scorer = Scorer.preflight(eval_cfg(metrics=["spbleu"], on_missing="skip"))
    scores, signatures = scorer.score(SRC, HYP, REF)
    assert scores == {"spbleu": None} and signatures == {} and "spbleu" in scorer.skipped


def test_standin_spm_is_never_labelled_spbleu(sacrebleu_dir):
    with pytest.raises(LadmError, match="is not the official FLORES-200"):
        Scorer.preflight(eval_cfg(metrics=["spbleu"]))
    scores, signatures = Scorer.preflight(eval_cfg(metrics=["spbleu"], on_missing="skip")).score(SRC, HYP, REF)
    assert scores["spbleu"] is None
    # Independent: segment with the same SentencePiece model ourselves, then plain BLEU.
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sacrebleu_dir))
    pieces = lambda lines: [" ".join(sp.encode(line, out_type=str)) for line in lines]  # noqa: E731
    expected = BLEU(tokenize="none").corpus_score(pieces(HYP), [pieces(REF)]).score
    assert scores["bleu_spm_unofficial"] == pytest.approx(expected)
    assert "tok:flores200" in signatures["bleu_spm_unofficial"]


def test_a_garbage_spm_file_with_on_missing_skip_scores_null_without_raising(tmp_path, monkeypatch):
    from sacrebleu.tokenizers import tokenizer_spm

    monkeypatch.setattr(tokenizer_spm, "SACREBLEU_DIR", str(tmp_path))
    ladm_metrics.spm_model_path().parent.mkdir(parents=True, exist_ok=True)
    ladm_metrics.spm_model_path().write_bytes(b"not a sentencepiece model")
    with pytest.raises(LadmError, match="is not the official FLORES-200"):
        Scorer.preflight(eval_cfg(metrics=["spbleu"]))
    scores, signatures = Scorer.preflight(eval_cfg(metrics=["chrf++", "spbleu"], on_missing="skip")).score(SRC, HYP, REF)
    assert scores["spbleu"] is None and "bleu_spm_unofficial" not in scores and set(signatures) == {"chrf++"}


def test_official_checksum_is_what_earns_the_spbleu_label(sacrebleu_dir, monkeypatch):
    monkeypatch.setattr(ladm_metrics, "OFFICIAL_SPM_SHA256", ladm_metrics._sha256(sacrebleu_dir))
    scores, _ = Scorer.preflight(eval_cfg(metrics=["spbleu"])).score(SRC, HYP, REF)
    assert scores["spbleu"] == pytest.approx(BLEU(tokenize="flores200").corpus_score(HYP, [REF]).score)


def test_comet_through_real_predict_path(tiny_comet):
    checkpoint_dir, reference = tiny_comet
    scores, _ = Scorer.preflight(eval_cfg(metrics=["comet"], comet={"model": str(checkpoint_dir)})).score(SRC, HYP, REF)
    assert scores["comet"] == pytest.approx(reference["all"]["system"], abs=1e-5)


def test_comet_loads_once_and_scores_every_pair_in_one_call(tiny_comet):
    """Two pairs in one predict call (one checkpoint load) equal each pair's own system and segment scores from
    the reference model; in process the model stays loaded for the next call, through the worker each call loads
    it once."""
    checkpoint_dir, reference = tiny_comet
    scorer = Scorer.preflight(eval_cfg(metrics=["comet"], comet={"model": str(checkpoint_dir)}))
    triples = {"zh-lo": (SRC[:2], HYP[:2], REF[:2]), "zh-km": (SRC[2:], HYP[2:], REF[2:])}
    scores = scorer.comet_by_pair(triples)
    assert scorer.comet_loads == 1
    for pair in triples:
        assert scores[pair] == pytest.approx(reference[pair]["system"], abs=1e-5)
        assert scorer.comet_segments[pair] == pytest.approx(reference[pair]["scores"], abs=1e-5)
    scorer.comet_by_pair(triples)
    assert scorer.comet_loads == (1 if scorer.comet_python is None else 2)


def test_missing_comet_checkpoint(tmp_path):
    with pytest.raises(LadmError, match="COMET checkpoint 'Unbabel/not-a-cached-model' is not in the Hugging Face cache"):
        Scorer.preflight(eval_cfg(metrics=["comet"], comet={"model": "Unbabel/not-a-cached-model"}))
    scorer = Scorer.preflight(eval_cfg(metrics=["comet"], on_missing="skip", comet={"model": str(tmp_path)}))
    assert scorer.score(SRC, HYP, REF)[0] == {"comet": None} and "comet" in scorer.skipped


def test_run_records_all_three_metrics_honestly(make_cfg, files_overrides, sacrebleu_dir, tiny_comet, tmp_path):
    cfg = make_cfg("method=zero_shot", "eval.metrics=[chrf++,spbleu,comet]", "eval.on_missing=skip",
                   f"eval.comet.model={tiny_comet[0]}", "eval.max_new_tokens=8", *files_overrides)
    run(cfg, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    scores = results["metrics"]["zh-lo"]
    hyps = (tmp_path / "predictions" / "files" / "zh-lo.hyp").read_text(encoding="utf-8").splitlines()
    refs = (tmp_path / "predictions" / "files" / "zh-lo.ref").read_text(encoding="utf-8").splitlines()
    assert scores["chrf++"] == pytest.approx(CHRF(word_order=2).corpus_score(hyps, [refs]).score)
    assert scores["spbleu"] is None and "bleu_spm_unofficial" in scores and "spbleu" in results["skipped"]
    segments = [float(v) for v in (tmp_path / "predictions" / "files" / "zh-lo.comet").read_text().splitlines()]
    assert len(segments) == len(hyps) and scores["comet"] == pytest.approx(sum(segments) / len(segments), abs=1e-5)


def test_target_script_ratio_counts_letters_of_the_target_script():
    from ladm.metrics import target_script_ratio

    assert target_script_ratio(["ສະບາຍດີ"], "lo") == 1.0
    assert target_script_ratio(["ສະບາຍດີ hello"], "lo") == pytest.approx(7 / 12)  # 7 Lao code points, 5 Latin
    assert target_script_ratio(["你好"], "lo") == 0.0 and target_script_ratio(["xin chào"], "vi") is None
    assert target_script_ratio(["မင်္ဂလာပါ"], "my") == 1.0 and target_script_ratio(["សួស្តី"], "km") == 1.0


@pytest.fixture
def fake_hub(tiny_comet, standin_spm, tmp_path, monkeypatch):
    """An 'online' machine without network: sacrebleu's download copies the stand-in SentencePiece model, the
    hub serves the tiny COMET checkpoint once it has been downloaded (local_files_only fails before)."""
    in_process_comet_only()
    import comet.models
    import huggingface_hub
    import sacrebleu.utils
    from sacrebleu.tokenizers import tokenizer_spm

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(tokenizer_spm, "SACREBLEU_DIR", str(tmp_path / "sacrebleu"))
    downloads, cached = [], set()

    def download_file(url, dest):
        downloads.append(url)
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).write_bytes((standin_spm / "models" / "flores200sacrebleuspm").read_bytes())

    def snapshot_download(repo_id, local_files_only=False, **_):
        if repo_id != "Unbabel/tiny-comet" or (local_files_only and repo_id not in cached):
            raise FileNotFoundError(f"{repo_id} is not cached")
        if not local_files_only:
            downloads.append(repo_id)
            cached.add(repo_id)
        return str(tiny_comet[0])

    monkeypatch.setattr(sacrebleu.utils, "download_file", download_file)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(comet.models, "snapshot_download", snapshot_download)
    return downloads


def test_online_preflight_lets_sacrebleu_and_comet_fetch_then_checks_the_checksum(fake_hub, tiny_comet, monkeypatch):
    cfg = eval_cfg(metrics=["chrf++", "spbleu", "comet"], comet={"model": "Unbabel/tiny-comet"})
    with pytest.raises(LadmError, match="is not the official FLORES-200") as caught:  # the 'download' is the stand-in
        Scorer.preflight(cfg)
    assert "comet" not in str(caught.value).split("):")[0] and fake_hub[0].startswith("https://")
    assert "Unbabel/tiny-comet" in fake_hub
    fake_hub.clear()
    # A file with the official checksum earns the label; nothing is downloaded twice.
    monkeypatch.setattr(ladm_metrics, "OFFICIAL_SPM_SHA256", ladm_metrics._sha256(ladm_metrics.spm_model_path()))
    scorer = Scorer.preflight(cfg)
    assert fake_hub == [] and scorer.skipped == {}
    scores, _ = scorer.score(SRC, HYP, REF)
    assert scores["spbleu"] == pytest.approx(BLEU(tokenize="flores200").corpus_score(HYP, [REF]).score)
    assert isinstance(scores["comet"], float)


def test_offline_preflight_lists_every_missing_asset_in_one_message(tmp_path, monkeypatch, tiny_comet):
    """Offline nothing is fetched; the spBLEU model and the COMET encoder's tokenizer (xlm-roberta-large, not
    cached) are named together, with the one command that fetches them."""
    import shutil

    import yaml
    from sacrebleu.tokenizers import tokenizer_spm

    monkeypatch.setattr(tokenizer_spm, "SACREBLEU_DIR", str(tmp_path / "sacrebleu"))
    checkpoint_dir = tmp_path / "comet-needs-xlmr"
    shutil.copytree(tiny_comet[0], checkpoint_dir)
    hparams = yaml.safe_load((checkpoint_dir / "hparams.yaml").read_text())
    (checkpoint_dir / "hparams.yaml").write_text(yaml.safe_dump(hparams | {"pretrained_model": "xlm-roberta-large"}))
    cfg = eval_cfg(metrics=["spbleu", "comet"], comet={"model": str(checkpoint_dir)})
    with pytest.raises(LadmError) as caught:
        Scorer.preflight(cfg)
    message = str(caught.value)
    assert "\n" not in message and "flores200sacrebleuspm" in message and "'xlm-roberta-large'" in message
    assert "ladm-fetch-metrics" in message and "eval.on_missing=skip" in message
    scorer = Scorer.preflight(OmegaConf.merge(cfg, {"on_missing": "skip"}))
    assert set(scorer.skipped) == {"spbleu", "comet"} and scorer.score(SRC, HYP, REF)[0] == {"spbleu": None, "comet": None}


def test_fetch_metrics_command(fake_hub, monkeypatch, capsys):
    from ladm.fetch_metrics import main

    with pytest.raises(SystemExit) as bad:
        main(["comet=Unbabel/tiny-comet"])
    assert bad.value.code == 2 and "eval.<key>=<value>" in capsys.readouterr().err
    monkeypatch.setattr(ladm_metrics, "OFFICIAL_SPM_SHA256", ladm_metrics._sha256(
        REPO_ROOT / "tests" / "assets" / "llama3" / "tokenizer.json"))  # no download can match: exit 1
    with pytest.raises(SystemExit) as failed:
        main(["eval.comet.model=Unbabel/tiny-comet"])
    assert failed.value.code == 1 and "spbleu: " in capsys.readouterr().err
    monkeypatch.setattr(ladm_metrics, "OFFICIAL_SPM_SHA256", ladm_metrics._sha256(ladm_metrics.spm_model_path()))
    main(["eval.comet.model=Unbabel/tiny-comet"])
    out = capsys.readouterr().out
    assert "official FLORES-200 SentencePiece model at" in out and "model.ckpt" in out and "copy" in out


@pytest.mark.parametrize("override,message", [
    ("eval.metrics=[bleu]", "eval.metrics must be a non-empty list of chrf++ | spbleu | comet, got ['bleu']"),
    ("eval.metricss=[chrf++]", "eval.metricss is not an eval key"),
    ("eval.comet.batch_size=0", "eval.comet.batch_size must be a positive integer, got 0"),
])
def test_fetch_metrics_refuses_what_ladm_train_refuses(capsys, override, message):
    from ladm.fetch_metrics import main

    with pytest.raises(SystemExit) as bad:
        main([override])
    lines = capsys.readouterr().err.splitlines()
    assert bad.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"ladm-fetch-metrics: error: {message}")


def test_a_run_without_unbabel_comet_records_what_was_missing(make_cfg, files_overrides, tmp_path, monkeypatch):
    """COMET not installed (as on a transformers-5 environment): the run scores what it can, results.json says
    why COMET is null and records the package as absent; nothing raises."""
    import importlib.metadata

    import ladm.evaluation
    import ladm.metrics
    from ladm.train import run

    monkeypatch.setattr(ladm.metrics, "comet_installed", lambda: False)
    monkeypatch.setattr(ladm.metrics, "comet_python", lambda eval_cfg: None)  # and no COMET environment either
    real_version = importlib.metadata.version

    def version(name):
        if name == "unbabel-comet":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(ladm.evaluation, "version", version)
    with pytest.raises(LadmError, match="unbabel-comet is not installed"):
        run(make_cfg("method=zero_shot", "eval.metrics=[chrf++,comet]", *files_overrides), tmp_path / "strict")
    results = run(make_cfg("method=zero_shot", "eval.metrics=[chrf++,comet]", "eval.on_missing=skip",
                           "eval.max_new_tokens=4", *files_overrides), tmp_path / "skip")
    assert results["status"] == "complete" and results["metrics"]["zh-lo"]["comet"] is None
    assert "unbabel-comet is not installed" in results["skipped"]["comet"]
    assert results["versions"]["unbabel-comet"] is None and results["metrics"]["zh-lo"]["chrf++"] >= 0


def test_target_language_rate_is_cld2s_verdict_per_hypothesis():
    """Against pycld2 called directly: FLORES devtest references identified as their own language, a half-and-half
    mix, CLD2's id/ms confusion, and what CLD2 cannot identify (off-target)."""
    import pycld2

    from ladm import REPO_ROOT
    from ladm.metrics import target_language_rate

    devtest = REPO_ROOT / "data" / "flores200" / "devtest"
    thai = (devtest / "tha_Thai.devtest").read_text(encoding="utf-8").splitlines()[:20]
    english = (devtest / "eng_Latn.devtest").read_text(encoding="utf-8").splitlines()[:20]
    malay = (devtest / "zsm_Latn.devtest").read_text(encoding="utf-8").splitlines()[:100]
    assert target_language_rate(thai, "th") == 1.0 and target_language_rate(english, "th") == 0.0
    assert target_language_rate(thai[:10] + english[:10], "th") == 0.5
    direct = sum(pycld2.detect(s)[2][0][1] == "ms" for s in malay) / len(malay)
    assert target_language_rate(malay, "ms") == pytest.approx(direct) and 0.5 < direct < 1.0  # some read as id
    unidentified = ["០១", "", "xin chao"]  # Khmer digits, nothing, too little Vietnamese: CLD2 says 'un'
    assert [pycld2.detect(s)[2][0][1] for s in unidentified] == ["un"] * 3
    assert target_language_rate(unidentified, "km") == target_language_rate(unidentified, "vi") == 0.0


def hanging_python(folder: Path, imports: bool) -> Path:
    """A stand-in for a COMET environment's Python that never finishes: on every call, or (imports=True) only when
    it runs the worker, so that its `import comet` check passes. What it does is fixed, not timed: a kill is the
    only way it ends."""
    script = folder / "hung-python"
    script.write_text("#!/bin/sh\n" + ('[ "$1" = "-c" ] && exit 0\n' if imports else "") + "exec sleep 3600\n")
    script.chmod(0o755)
    return script


def test_a_hanging_comet_environment_is_one_line_at_start_up(tiny_comet, tmp_path):
    cfg = eval_cfg(metrics=["chrf++", "comet"], comet={"model": str(tiny_comet[0]), "check_timeout": 1,
                                                       "python": str(hanging_python(tmp_path, imports=False))})
    with pytest.raises(LadmError, match=r"`import comet` in .*hung-python did not finish within "
                                        r"eval.comet.check_timeout=1 s"):
        Scorer.preflight(cfg)


def test_a_hung_comet_worker_fails_the_job_and_a_rerun_scores_without_training(make_cfg, files_overrides, tiny_comet,
                                                                                 tmp_path, monkeypatch):
    """The worker is stopped at eval.comet.timeout: one line, results.json `failed`, adapter and hypotheses kept.
    The same command then scores the saved hypotheses: no optimizer step, no generation."""
    import ladm.evaluation
    import ladm.trainer

    common = ["method=lora", "train.max_steps=2", "eval.max_new_tokens=4", "eval.metrics=[chrf++,comet]",
              f"eval.comet.model={tiny_comet[0]}", *files_overrides]
    hung = hanging_python(tmp_path, imports=True)
    job = tmp_path / "job"
    with pytest.raises(LadmError, match=r"did not finish scoring 4 segments within eval.comet.timeout=2 s"):
        run(make_cfg(*common, f"eval.comet.python={hung}", "eval.comet.timeout=2"), job)
    failed = json.loads((job / "results.json").read_text())
    assert failed["status"] == "failed" and (job / "adapter" / "adapter_model.safetensors").is_file()
    hypotheses = (job / "predictions" / "files" / "zh-lo.hyp").read_text(encoding="utf-8")

    calls = {"steps": 0, "generations": 0}
    real_loss, real_translate = ladm.trainer.answer_loss, ladm.evaluation.translate
    monkeypatch.setattr(ladm.trainer, "answer_loss", lambda *a, **k: calls.__setitem__("steps", calls["steps"] + 1)
                        or real_loss(*a, **k))
    monkeypatch.setattr(ladm.evaluation, "translate", lambda *a, **k: calls.__setitem__(
        "generations", calls["generations"] + 1) or real_translate(*a, **k))
    again = run(make_cfg(*common), job)
    assert calls == {"steps": 0, "generations": 0}
    assert again["status"] == "complete" and again["metrics"]["zh-lo"]["comet"] is not None
    assert (job / "predictions" / "files" / "zh-lo.hyp").read_text(encoding="utf-8") == hypotheses
    assert again["train"]["steps"] == 2 and not (job / "checkpoints").exists()  # the end-of-training one is gone
