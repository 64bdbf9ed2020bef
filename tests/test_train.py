"""The real entry point end to end on tiny models and tiny data (torchtune style)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel

from ladm import REPO_ROOT
from ladm.data import SequenceFormat, render_prompt
from ladm.generation import translate
from ladm.models import load_model, load_tokenizer
from ladm.train import run
from ladm.trainer import steps_taken


def test_lora_loss_falls_and_adapter_reloads_with_same_generations(make_cfg, files_overrides, tmp_path):
    cfg = make_cfg("method=lora", "train.max_steps=20", "train.batch_size=4", "train.lr=1e-2",
                   "train.warmup_ratio=0", "eval.max_new_tokens=24", *files_overrides)
    results = run(cfg, tmp_path)
    losses = results["losses"]
    assert len(losses) == 20
    # A LoRA on a random 64-wide base cannot reshape 128,256-way logits much: from ~12 to below 9.5.
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0], losses

    written = json.loads((tmp_path / "results.json").read_text())
    assert written["status"] == "complete" and written["method"] == "lora"
    steps = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]  # W&B off
    assert [s["step"] for s in steps] == list(range(1, 21)) and [s["loss"] for s in steps] == losses
    # the rate applied at step s under the cosine schedule without warm-up: lr·½(1 + cos(π(s−1)/20))
    assert [s["lr"] for s in steps] == pytest.approx([1e-2 * 0.5 * (1 + math.cos(math.pi * k / 20)) for k in range(20)])
    assert all(s["tokens"] > 0 and s["tokens_per_s"] > 0 and s["grad_norm"] > 0 for s in steps)
    assert set(written["versions"]) >= {"torch", "transformers", "peft", "sacrebleu"}
    hyps = (tmp_path / "predictions" / "files" / "zh-lo.hyp").read_text(encoding="utf-8").splitlines()
    refs = (tmp_path / "predictions" / "files" / "zh-lo.ref").read_text(encoding="utf-8").splitlines()
    assert len(hyps) == len(refs) == 4

    # A fresh base model + the saved adapter, loaded by PEFT itself, generates the same text.
    tok = load_tokenizer(cfg.model)
    reloaded = PeftModel.from_pretrained(load_model(cfg.model, tok), tmp_path / "adapter")
    prompts = [tok(render_prompt(s, cfg.pair)).input_ids for s in (tmp_path / "train.zh").read_text().splitlines()[:4]]
    stop_ids = SequenceFormat.from_cfg(tok, cfg).stop_ids(reloaded.generation_config)
    assert translate(reloaded, tok, prompts, stop_ids, batch_size=2, max_new_tokens=24).hypotheses == hyps


def test_zero_shot_trains_nothing_and_scores(make_cfg, files_overrides, tmp_path):
    results = run(make_cfg("method=zero_shot", "eval.max_new_tokens=8", *files_overrides), tmp_path)
    assert results["train"] == {} and not (tmp_path / "adapter").exists()
    assert results["metrics"]["zh-lo"]["chrf++"] >= 0


def test_cli_tiny_qwen2_zh_km_lora(tmp_path, cache_dir):
    """`ladm-train model=tiny-qwen2.5 pair=zh-km method=lora` as a user types it (shortened)."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "ladm.train", "model=tiny-qwen2.5", "pair=zh-km", "method=lora",
         "train.max_steps=3", "data.max_train_samples=32", "eval.max_samples=4", "eval.max_new_tokens=8",
         "eval.on_missing=skip", "logger=none", f"cache_dir={cache_dir}", f"hydra.run.dir={out}"],
        cwd=REPO_ROOT, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "tiny-qwen2.5" and results["pairs"] == ["zh-km"]
    assert results["metrics"]["zh-km"]["spbleu"] is None and "spbleu" in results["skipped"]
    assert (out / "predictions" / "flores200-devtest" / "zh-km.hyp").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_tiny_gemma2_trains(make_cfg, files_overrides, tmp_path):
    results = run(make_cfg("model=tiny-gemma2", "train.max_steps=2", "eval.max_new_tokens=4", *files_overrides),
                  tmp_path)
    assert torch.isfinite(torch.tensor(results["losses"])).all()


def test_non_finite_loss_stops_with_a_clear_message(make_cfg, files_overrides, tmp_path, monkeypatch):
    """A loss that overflows (here: the real loss times inf, as a diverged model gives) stops before the step."""
    import ladm.trainer
    from ladm import LadmError

    loss = ladm.trainer.answer_loss
    monkeypatch.setattr(ladm.trainer, "answer_loss", lambda *a, **k: loss(*a, **k) * float("inf"))
    with pytest.raises(LadmError, match="the training loss became inf at step 1"):
        run(make_cfg("method=lora", "train.max_steps=2", *files_overrides), tmp_path)
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("losses,norms,expected", [
    ([3.0, 2.9, 2.8, 2.7, 2.6, 2.5, 2.4, 2.3], [2.0, 2.5, 2.2, 2.1, 2.4, 1.9, 2.0, 2.2], None),
    ([3.0, 3.0, 3.1, 3.0], [2.0, 2.2, 4e3, 2.5], "jumped to 4e+03 at step 3 (median 2.1 before)"),
    ([12.0, 11.8, 11.7, 11.7, 11.7], [2.0, 2.1, 0.5, 0.0, 0.0], None),  # two zero steps: not yet
    ([12.0, 11.8, 11.7, 11.7, 11.7, 11.7], [2.0, 2.1, 0.5, 0.0, 0.0, 0.0], "zero from step 4 on (loss 11.7"),
    ([2.0] * 4 + [4.0] * 4, [1.0] * 8, "the loss rose from 2 (first quarter) to 4 (last quarter)"),
])
def test_divergence_names_what_went_wrong(losses, norms, expected):
    from ladm.trainer import divergence

    found = divergence(losses, norms)
    assert found == expected if expected is None else expected in found


def test_a_diverging_run_warns_by_name_and_records_it(make_cfg, files_overrides, tmp_path, caplog):
    """`train.lr=1e6` (the reported case): the gradient explodes, then the weights die; the run ends with a
    WARNING naming the model, method and pair, and results.json says why."""
    cfg = make_cfg("method=lora", "train.lr=1e6", "train.max_steps=6", "train.batch_size=4", "train.warmup_ratio=0",
                   "train.scheduler=constant", *files_overrides)
    with caplog.at_level("WARNING", logger="ladm.train"):
        results = run(cfg, tmp_path)
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["train"]["divergence"] == results["train"]["divergence"] and "gradient" in stored["train"]["divergence"]
    assert any("tiny-llama3 lora zh-lo: training diverged: " in r.getMessage() for r in caplog.records)
    healthy = run(make_cfg("method=lora", "train.max_steps=6", "train.batch_size=4", *files_overrides), tmp_path / "ok")
    assert healthy["train"]["divergence"] is None


def test_gradient_checkpointing_gives_the_same_training(make_cfg, files_overrides, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import ladm.train

    common = ("method=lora", "method.dropout=0.0", "train.max_steps=3", "train.batch_size=4", "train.lr=1e-2",
              "eval.max_new_tokens=2", "eval.max_samples=1", *files_overrides)
    run(make_cfg(*common), tmp_path / "plain")
    seen = []
    monkeypatch.setattr(ladm.train, "fit", lambda model, *a, fit=ladm.train.fit, **k: seen.append(
        model.base_model.model.is_gradient_checkpointing) or fit(model, *a, **k))
    run(make_cfg(*common, "train.gradient_checkpointing=true"), tmp_path / "checkpointed")
    assert seen == [True]
    plain = load_file(tmp_path / "plain" / "adapter" / "adapter_model.safetensors")
    checkpointed = load_file(tmp_path / "checkpointed" / "adapter" / "adapter_model.safetensors")
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


def test_grouped_batches_cut_padding_and_split_like_one_big_batch(make_cfg):
    """FLORES zh→my under Llama-3: grouped batches pad far less than random ones; two ranks with batch 4 see
    exactly the batches of one rank with batch 8; the order is a function of seed and epoch."""
    from ladm.data import SequenceFormat, read_split
    from ladm.trainer import GroupedBatches

    cfg = make_cfg("pair=zh-my")
    tokenizer = load_tokenizer(cfg.model)
    lengths = [len(e.input_ids) for e in SequenceFormat.from_cfg(tokenizer, cfg).encode(
        read_split(cfg.data.train).head(400), cfg.pair)]

    def padding_share(batches):
        cells = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        return 1 - sum(lengths[i] for b in batches for i in b) / cells

    one = GroupedBatches(lengths, 8, 1, 0, seed=3)
    grouped = list(one)
    generator = torch.Generator().manual_seed(3)
    shuffled = torch.randperm(len(lengths), generator=generator).tolist()
    random = [shuffled[i:i + 8] for i in range(0, len(shuffled) - 7, 8)]
    assert padding_share(grouped) < 0.5 * padding_share(random)
    ranks = [list(GroupedBatches(lengths, 4, 2, r, seed=3)) for r in range(2)]
    assert [sorted(a + b) for a, b in zip(*ranks, strict=True)] == [sorted(b) for b in grouped]
    assert list(GroupedBatches(lengths, 8, 1, 0, seed=3)) == grouped
    one.set_epoch(1)
    assert list(one) != grouped and sorted(i for b in one for i in b) == sorted(i for b in grouped for i in b)


def test_generation_survives_out_of_memory_by_halving_the_batch(make_cfg):
    """A model that runs out of memory above 2 sentences per batch still translates everything, exactly as
    with batch 2; the batch-size search finds the largest power-of-two fraction that fits."""
    from ladm.generation import largest_fitting_batch

    cfg = make_cfg()
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tok)
    fmt = SequenceFormat.from_cfg(tok, cfg)
    prompts = fmt.prompt_ids(["你好", "今天天气很好。", "他在读书。", "一", "二"], cfg.pair)
    stop_ids = fmt.stop_ids(model.generation_config)
    expected = translate(model, tok, prompts, stop_ids, batch_size=2, max_new_tokens=3)
    generate = model.generate

    def small_memory(*args, **kwargs):
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return generate(*args, **kwargs)

    model.generate = small_memory
    assert translate(model, tok, prompts, stop_ids, batch_size=8, max_new_tokens=3) == expected
    assert largest_fitting_batch(lambda b: b <= 48) == 32 and largest_fitting_batch(lambda b: False) == 1


def test_a_scoring_failure_keeps_the_adapter_and_predictions(make_cfg, files_overrides, tmp_path, monkeypatch):
    """Scoring comes last: when it fails, the trained adapter, the sources, hypotheses and references are on
    disk and results.json says `failed` with the error."""
    import json

    from ladm.metrics import Scorer

    def broken(*args, **kwargs):
        raise RuntimeError("COMET checkpoint cannot be loaded")

    monkeypatch.setattr(Scorer, "score", broken)
    with pytest.raises(RuntimeError, match="cannot be loaded"):
        run(make_cfg("method=lora", "train.max_steps=2", "eval.max_new_tokens=4", *files_overrides), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed" and "COMET checkpoint cannot be loaded" in results["error"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    lines = {ext: (tmp_path / "predictions" / "files" / f"zh-lo.{ext}").read_text(encoding="utf-8").splitlines()
             for ext in ("src", "hyp", "ref")}
    assert len(lines["src"]) == len(lines["hyp"]) == len(lines["ref"]) == 4


@pytest.mark.parametrize("damage", ['{"status": "compl', "[1, 2]"])
def test_a_damaged_results_file_is_kept_aside_and_the_job_runs_again(make_cfg, files_overrides, tmp_path, damage):
    cfg = make_cfg("method=zero_shot", "eval.max_new_tokens=4", *files_overrides)
    first = run(cfg, tmp_path)
    (tmp_path / "results.json").write_text(damage)
    again = run(cfg, tmp_path)
    assert again["status"] == "complete" and again["metrics"] == first["metrics"]
    assert [p.read_text() for p in tmp_path.glob("results.damaged-*.json")] == [damage]


SELECT = ["method=lora", "train.eval_every=2", "train.select_on=validation/chrf++", "train.scheduler=constant",
          "train.warmup_ratio=0", "train.batch_size=4", "train.lr=1e-2", "eval.max_new_tokens=4"]


def saved_adapter(folder):
    from safetensors.torch import load_file

    return load_file(folder / "adapter" / "adapter_model.safetensors")


def scripted_validation(monkeypatch, scores):
    """The validation score of each evaluation in turn (the selection logic is what is tested, not chrF++)."""
    import ladm.trainer

    sequence = iter(scores)
    monkeypatch.setattr(ladm.trainer, "validation_mean", lambda key, validation: next(sequence))


def test_select_on_tests_and_saves_the_best_validation_step(make_cfg, files_overrides, tmp_path, monkeypatch):
    """Scores 1, 3, 2 at steps 2, 4, 6: the weights of step 4 are saved and tested, and they equal those of a
    run that trained 4 steps only (a constant schedule: the first four steps are the same)."""
    scripted_validation(monkeypatch, [1.0, 3.0, 2.0])
    selected = run(make_cfg(*SELECT, "train.max_steps=6", *files_overrides), tmp_path / "selected")
    chosen = selected["train"]["selection"]
    assert chosen | {"history": None} == {"select_on": "validation/chrf++", "chosen_step": 4, "score": 3.0,
                                          "last_step": 6, "stopped_early": False, "patience": 0, "history": None}
    assert chosen["history"] == [[2, 1.0], [4, 3.0], [6, 2.0]] and selected["train"]["steps"] == 6
    short = run(make_cfg(*SELECT[:1], *SELECT[3:], "train.max_steps=4", *files_overrides), tmp_path / "short")
    ours, theirs = saved_adapter(tmp_path / "selected"), saved_adapter(tmp_path / "short")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    hyp = lambda name: (tmp_path / name / "predictions" / "files" / "zh-lo.hyp").read_text(encoding="utf-8")  # noqa: E731
    assert hyp("selected") == hyp("short") and selected["metrics"] == short["metrics"]
    assert selected["validation"] == chosen_validation(tmp_path / "selected")


def chosen_validation(folder):
    return json.loads((folder / "results.json").read_text())["validation"]


def test_early_stop_after_patience_evaluations_without_gain(make_cfg, files_overrides, tmp_path, monkeypatch):
    scripted_validation(monkeypatch, [1.0, 3.0, 2.0])
    results = run(make_cfg(*SELECT, "train.max_steps=10", "train.early_stop_patience=1", *files_overrides), tmp_path)
    chosen = results["train"]["selection"]
    assert (chosen["chosen_step"], chosen["last_step"], chosen["stopped_early"]) == (4, 6, True)
    assert results["train"]["steps"] == 6 and results["train"]["examples_seen"] == {"zh-lo": 6 * 4}
    assert results["train"]["steps_per_pair"] == 6  # what was trained, not the 10 planned
    assert len((tmp_path / "train_log.jsonl").read_text().splitlines()) == 6


def test_a_resume_with_another_selection_schedule_is_refused(make_cfg, files_overrides, tmp_path, monkeypatch):
    """With train.select_on, eval_every and the eval settings decide which weights are kept: a resume that changes
    them is refused, naming the key; without select_on eval_every is only when to look, and may change."""
    from ladm import LadmError
    from ladm.trainer import Preempted

    monkeypatch.setenv("LADM_FAULT_SIGNAL_AT_STEP", "3:SIGTERM")
    for folder, selecting in (("select", SELECT), ("plain", SELECT[:1] + SELECT[3:])):
        with pytest.raises(Preempted):
            run(make_cfg(*selecting, "train.max_steps=6", *files_overrides), tmp_path / folder)
    monkeypatch.delenv("LADM_FAULT_SIGNAL_AT_STEP")
    for changed in ("train.eval_every=3", "eval.max_new_tokens=5"):
        with pytest.raises(LadmError, match=rf"trained with another config \({changed.split('=')[0]}: "):
            run(make_cfg(*SELECT, "train.max_steps=6", changed, *files_overrides), tmp_path / "select")
    assert run(make_cfg(*SELECT[:1], *SELECT[3:], "train.max_steps=6", "train.eval_every=3", *files_overrides),
               tmp_path / "plain")["status"] == "complete"


@pytest.mark.parametrize("steps", [0, 1, 5, 6, 7])
def test_steps_taken_per_pair_counts_the_round_robin(steps):
    pairs = ["zh-lo", "zh-km", "zh-my"]
    counted = {pair: sum(pairs[(step - 1) % len(pairs)] == pair for step in range(1, steps + 1)) for pair in pairs}
    assert steps_taken(steps, pairs) == counted


def test_selection_resumes_exactly_after_sigterm(make_cfg, files_overrides, whole_and_resumed):
    """Stopped by SIGTERM at step 5 (after the evaluations of steps 2 and 4), resumed: the same chosen step,
    history and saved weights as an uninterrupted run (real chrF++ scores)."""
    whole, resumed, same_adapters = whole_and_resumed(
        make_cfg(*SELECT, "train.max_steps=8", "method.dropout=0.1", *files_overrides), step=5)
    assert resumed["train"]["selection"] == whole["train"]["selection"]
    assert same_adapters and resumed["metrics"] == whole["metrics"]


def test_merge_adapters_is_recorded_with_the_predictions(make_cfg, files_overrides, tmp_path):
    """`eval.merge_adapters=true` on a CPU: the test set is generated merged (recorded beside the hypotheses), with
    the hypotheses of the same run unmerged, and a later unmerged run does not take the merged ones as its own."""
    common = ["method=lora", "train.max_steps=2", "train.lr=1e-2", "eval.max_new_tokens=6", *files_overrides]
    merged = run(make_cfg(*common, "eval.merge_adapters=true"), tmp_path / "merged")
    plain = run(make_cfg(*common, "eval.merge_adapters=false"), tmp_path / "plain")
    meta = {name: json.loads((tmp_path / name / "predictions" / "files" / "zh-lo.json").read_text())["generated_by"]
            for name in ("merged", "plain")}
    assert meta["merged"].get("merged_adapters") is True and "merged_adapters" not in meta["plain"]
    hyp = lambda name: (tmp_path / name / "predictions" / "files" / "zh-lo.hyp").read_text(encoding="utf-8")  # noqa: E731
    assert hyp("merged") == hyp("plain") and merged["metrics"] == plain["metrics"]
