"""LaDM modulation against plain LoRA from the same seed (METHODS.md §2), end to end, bad input."""

import json
import re

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from ladm import LadmError
from ladm.methods import build_method
from ladm.methods.ladm import layer_of
from ladm.models import load_model, load_tokenizer
from ladm.train import run

# ΔR = R_hi − R_lo (normalisation none) = [0.3, -0.2, 0.05, -0.4]; top-1 per side, alpha = 1, beta = 1
# → m = [2, 1, 1, 0]: amplified, untouched ×2, frozen.
R_HI, R_LO = [1.3, 0.8, 1.05, 0.6], [1.0, 1.0, 1.0, 1.0]
MULTIPLIERS = [2.0, 1.0, 1.0, 0.0]


@pytest.fixture
def delta_r_file(tmp_path):
    path = tmp_path / "delta_r.json"
    path.write_text(json.dumps({"model": "tiny-llama3", "n_layers": 4, "reference_pair": "zh-en", "pair": "zh-lo",
                                "n_sentences": 8, "R_hi": R_HI, "R_lo": R_LO}))
    return path


def ladm_overrides(delta_r_file, mode="step", strength="s1"):
    return ["method=ladm", f"method.delta_r_path={delta_r_file}", "probe.normalisation=none", "method.select=topk",
            "method.k_tal=1", "method.k_lil=1", f"strength={strength}", f"method.mode={mode}"]


def trained_lora_weights(make_cfg, files_overrides, tmp_path, name, *overrides, steps=1, clip="1e9"):
    """Adapter weights after `steps` optimizer steps (no dropout, no warm-up; no clipping unless `clip`)."""
    cfg = make_cfg(f"train.max_steps={steps}", "train.batch_size=4", "train.lr=1e-2", "train.warmup_ratio=0",
                   "train.scheduler=constant", f"train.max_grad_norm={clip}", "method.dropout=0.0",
                   "eval.max_new_tokens=2", "eval.max_samples=1", *files_overrides, *overrides)
    out = tmp_path / name
    run(cfg, out)
    return load_file(out / "adapter" / "adapter_model.safetensors")


def per_layer(weights, kind):
    return {name: tensor for name, tensor in weights.items() if f"lora_{kind}" in name}


def test_step_mode_scales_the_first_adamw_update_by_m(make_cfg, files_overrides, tmp_path, delta_r_file):
    lora = trained_lora_weights(make_cfg, files_overrides, tmp_path, "lora", "method=lora")
    ladm = trained_lora_weights(make_cfg, files_overrides, tmp_path, "ladm", *ladm_overrides(delta_r_file))
    for name, b_lora in per_layer(lora, "B").items():
        m = MULTIPLIERS[layer_of(name)]
        assert b_lora.abs().sum() > 0
        torch.testing.assert_close(ladm[name], m * b_lora, rtol=1e-4, atol=0)
    for name, a_lora in per_layer(lora, "A").items():  # B = 0 at step 0, so A receives no gradient yet
        assert torch.equal(ladm[name], a_lora)


def test_grad_mode_under_adamw_leaves_the_step_unchanged(make_cfg, files_overrides, tmp_path, delta_r_file):
    """Documented: Adam normalises the gradient scale away, so `grad` mode is (nearly) inert."""
    lora = trained_lora_weights(make_cfg, files_overrides, tmp_path, "lora", "method=lora")
    grad = trained_lora_weights(make_cfg, files_overrides, tmp_path, "grad", *ladm_overrides(delta_r_file, "grad"))
    for name, b_lora in per_layer(lora, "B").items():
        m = MULTIPLIERS[layer_of(name)]
        if m != 0.0:  # a zero gradient is the one scale Adam cannot undo
            # equal up to Adam's ε (it matters only for elements whose gradient is ~ε) ...
            assert (grad[name] - b_lora).norm() < 1e-2 * b_lora.norm()
        if m == 2.0:  # ... and nowhere near the intended 2× step
            assert (grad[name] - 2 * b_lora).norm() > 0.4 * (2 * b_lora).norm()


def test_grad_and_step_coincide_under_sgd(make_cfg, files_overrides, tmp_path, delta_r_file):
    sgd = ("train.optimizer=sgd", "train.lr=0.5")
    step = trained_lora_weights(make_cfg, files_overrides, tmp_path, "step", *ladm_overrides(delta_r_file, "step"),
                                *sgd, steps=3)
    grad = trained_lora_weights(make_cfg, files_overrides, tmp_path, "grad", *ladm_overrides(delta_r_file, "grad"),
                                *sgd, steps=3)
    initial = trained_lora_weights(make_cfg, files_overrides, tmp_path, "lora", "method=lora", *sgd, steps=1)
    assert step.keys() == grad.keys()
    for name in step:
        torch.testing.assert_close(step[name], grad[name], rtol=1e-6, atol=1e-9)
    frozen = [n for n in step if layer_of(n) == 3]
    # one step moves no A (B starts at 0), so `initial` holds A's initialisation
    assert all(torch.equal(step[n], initial[n]) for n in frozen if "lora_A" in n)
    assert all(step[n].abs().sum() == 0 for n in frozen if "lora_B" in n)  # B never leaves zero


def test_step_mode_is_exact_under_the_default_clipping(make_cfg, files_overrides, tmp_path, delta_r_file):
    """select=all, strength=s1: m = 2 on every TAL layer, 0 on every LIL layer; one AdamW step with the default
    max_grad_norm=1.0 moves every layer by exactly m_l × plain LoRA's step (m_l = 0: not at all)."""
    all_layers = [*ladm_overrides(delta_r_file), "method.select=all"]
    lora = trained_lora_weights(make_cfg, files_overrides, tmp_path, "lora", "method=lora", clip="1.0")
    ladm = trained_lora_weights(make_cfg, files_overrides, tmp_path, "ladm", *all_layers, clip="1.0")
    unclipped = trained_lora_weights(make_cfg, files_overrides, tmp_path, "free", "method=lora", "train.optimizer=sgd",
                                     "train.lr=1.0")  # one SGD step at lr 1 from B = 0: B = −gradient
    assert torch.cat([b.flatten() for b in per_layer(unclipped, "B").values()]).norm() > 1.0  # the clip is active
    multipliers = {0: 2.0, 1: 0.0, 2: 2.0, 3: 0.0}  # ΔR = [0.3, -0.2, 0.05, -0.4]
    for name, b_lora in per_layer(lora, "B").items():
        assert b_lora.abs().sum() > 0
        torch.testing.assert_close(ladm[name], multipliers[layer_of(name)] * b_lora, rtol=1e-6, atol=0)


def test_grad_mode_clips_the_modulated_norm_under_sgd(make_cfg, files_overrides, tmp_path, delta_r_file):
    """README's claim: `step` clips the unmodulated gradient g (plain LoRA's norm) and scales each layer's step by
    m_l; `grad` clips m⊙g. So one clipped SGD step is m_l·lr·g·min(1, c/‖g‖) in step mode and
    m_l·lr·g·min(1, c/‖m⊙g‖) in grad mode, with g read off an unclipped step."""
    sgd = ("train.optimizer=sgd", "train.lr=0.5")
    free = trained_lora_weights(make_cfg, files_overrides, tmp_path, "free", "method=lora", *sgd)
    step = trained_lora_weights(make_cfg, files_overrides, tmp_path, "step", *ladm_overrides(delta_r_file, "step"),
                                *sgd, clip="1.0")
    grad = trained_lora_weights(make_cfg, files_overrides, tmp_path, "grad", *ladm_overrides(delta_r_file, "grad"),
                                *sgd, clip="1.0")
    gradient = {name: -b / 0.5 for name, b in per_layer(free, "B").items()}  # B = 0 before: B = −lr·g
    norm = torch.cat([g.flatten() for g in gradient.values()]).norm()
    modulated = torch.cat([(MULTIPLIERS[layer_of(n)] * g).flatten() for n, g in gradient.items()]).norm()
    assert norm > 1.0 and modulated > 1.0 and not torch.isclose(norm, modulated)
    for name, g in gradient.items():
        m = MULTIPLIERS[layer_of(name)]
        torch.testing.assert_close(step[name], -0.5 * m * g / norm, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(grad[name], -0.5 * m * g / modulated, rtol=1e-4, atol=1e-9)


def test_strength_zero_reproduces_lora_exactly(make_cfg, files_overrides, tmp_path, delta_r_file):
    lora = trained_lora_weights(make_cfg, files_overrides, tmp_path, "lora", "method=lora", steps=3)
    ladm = trained_lora_weights(make_cfg, files_overrides, tmp_path, "s0", *ladm_overrides(delta_r_file, strength="s0"),
                                steps=3)
    assert lora.keys() == ladm.keys() and all(torch.equal(lora[n], ladm[n]) for n in lora)


def test_forward_mode_scales_lora_output_and_survives_reload(make_cfg, delta_r_file, tmp_path):
    cfg = make_cfg(*ladm_overrides(delta_r_file, "forward"))
    tokenizer = load_tokenizer(cfg.model)
    model = build_method(cfg).prepare_model(load_model(cfg.model, tokenizer), tokenizer)
    base_scaling = cfg.method.alpha / cfg.method.r
    for name, module in model.named_modules():
        if name.endswith("q_proj") and hasattr(module, "scaling"):
            assert module.scaling["default"] == pytest.approx(MULTIPLIERS[layer_of(name + ".")] * base_scaling)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_model(cfg.model, tokenizer), tmp_path / "adapter")
    scalings = {n: m.scaling["default"] for n, m in reloaded.named_modules() if n.endswith("q_proj") and hasattr(m, "scaling")}
    assert sorted(scalings.values()) == pytest.approx(sorted(m * base_scaling for m in MULTIPLIERS))


def test_ladm_end_to_end_probes_trains_and_saves_a_peft_adapter(make_cfg, files_overrides, tmp_path, monkeypatch):
    import ladm.analysis.relevance as relevance

    calls = []
    original = relevance.sentence_relevance
    monkeypatch.setattr(relevance, "sentence_relevance", lambda *a, **k: calls.append(1) or original(*a, **k))
    common = ("method=ladm", "probe.n_sentences=8", "probe.batch_size=4", "train.max_steps=3", "train.log_every=1",
              "logger=wandb", "eval.max_new_tokens=4", *files_overrides)
    results = run(make_cfg(*common), tmp_path / "a")
    assert len(calls) == 2  # reference and target pair
    details = results["method_details"]
    assert len(details["multipliers"]) == 4 and details["mode"] == "step"
    assert set(details["selected_tal"]) <= set(details["tal"]) and set(details["selected_lil"]) <= set(details["lil"])
    assert all(m == 1.5 for l, m in enumerate(details["multipliers"]) if l in details["selected_tal"])
    written = json.loads((tmp_path / "a" / "results.json").read_text())
    assert written["method_details"]["multipliers"] == details["multipliers"]

    from test_tracking import read_wandb_records

    history, _, config, _ = read_wandb_records(tmp_path / "a")
    assert {"grad_norm/tal", "grad_norm/lil", "grad_norm/other"} <= set(history[0])
    assert config["method_details"]["multipliers"] == details["multipliers"]

    tokenizer = load_tokenizer(make_cfg().model)
    PeftModel.from_pretrained(load_model(make_cfg().model, tokenizer), tmp_path / "a" / "adapter")

    run(make_cfg(*common, "strength=s1"), tmp_path / "b")  # a strength sweep reuses the cached ΔR
    assert len(calls) == 2


@pytest.mark.parametrize("overrides,message", [
    (["pair=zh-en"], "is the reference pair itself"),
    (["strength.beta=1.5"], "strength.beta must lie in [0, 1]"),
    (["strength.alpha=-0.1"], "strength.alpha must be ≥ 0"),
    (["method.tau_tal=-0.01"], "method.tau_tal must be ≥ 0"),
    (["method.k_tal=9"], "exceed the model's 4 layers"),
    (["method.mode=sideways"], "method.mode must be one of"),
])
def test_bad_ladm_input_is_one_line(monkeypatch, capsys, tmp_path, overrides, message):
    from test_bad_input import cli_error

    assert message in cli_error(monkeypatch, capsys, tmp_path, "method=ladm", *overrides)


@pytest.mark.parametrize("field,value", [("n_layers", 32), ("model", "qwen2.5-7b")])
def test_delta_r_from_another_model_is_rejected(make_cfg, delta_r_file, field, value):
    data = json.loads(delta_r_file.read_text()) | {field: value}
    delta_r_file.write_text(json.dumps(data))
    with pytest.raises(LadmError, match=f"measured with {field}="):
        build_method(make_cfg(*ladm_overrides(delta_r_file)))


def test_ladm_with_an_unreachable_hub_model_is_one_line(make_cfg):
    with pytest.raises(LadmError, match="cannot read the config of nobody/absent"):
        build_method(make_cfg("method=ladm", "model=qwen2.5-7b", "model.path=nobody/absent"))


@pytest.mark.parametrize("content,message", [
    ('{"model": "tiny-llama3", "n_la', "is not valid JSON"),
    ("[1, 2]", "holds a JSON list"),
    (None, "R_hi must be a list of n_layers=4 finite numbers"),
])
def test_malformed_delta_r_is_one_line(make_cfg, delta_r_file, content, message):
    if content is None:  # a NaN in R: json.dumps writes it, json.loads reads it back
        data = json.loads(delta_r_file.read_text())
        data["R_hi"][1] = float("nan")
        content = json.dumps(data)
    delta_r_file.write_text(content)
    with pytest.raises(LadmError, match=re.escape(message)):
        build_method(make_cfg(*ladm_overrides(delta_r_file)))


def one_adamw_update(cfg) -> dict[str, torch.Tensor]:
    """Every trainable tensor's change after one AdamW step on two fixed sentences (adapters seeded alike)."""
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tokenizer)
    method = build_method(cfg)
    torch.manual_seed(0)
    model = method.prepare_model(model, tokenizer)
    optimizer = torch.optim.AdamW(method.param_groups(model, 1e-2, 0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.tensor(tokenizer(["你好，世界。ສະບາຍດີ", "今天天气很好。ມື້ນີ້ອາກາດດີ"], padding=True).input_ids)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("base", ["lora", "dora", "rslora", "pissa", "olora", "loraplus"])
def test_ladm_scales_one_step_of_every_lora_variant_by_m(make_cfg, delta_r_file, base):
    """For each PEFT variant (`method.base`), one AdamW step of LaDM (`step` mode) changes every tensor of layer l
    by exactly m_l × the change the same variant makes unmodulated: B, A, DoRA's magnitudes, LoRA+'s faster B."""
    common = [f"method.base={base}", "method.dropout=0.0", "method.r=4"]
    plain = one_adamw_update(make_cfg("method=lora", *common))
    modulated = one_adamw_update(make_cfg(*ladm_overrides(delta_r_file), *common))
    assert plain.keys() == modulated.keys()
    moved = [name for name, change in plain.items() if change.abs().sum() > 0]
    assert len(moved) >= len(plain) // 2, moved
    if base == "dora":
        assert any("lora_magnitude_vector" in name for name in moved)
    for name, change in plain.items():
        torch.testing.assert_close(modulated[name], MULTIPLIERS[layer_of(name)] * change, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("base", ["pissa", "olora", "dora"])
def test_saved_variant_adapters_reload_onto_the_unchanged_base(make_cfg, tmp_path, base):
    """PiSSA and OLoRA move the base weights at initialisation; their saved adapter is converted to a plain LoRA on
    the unchanged base, so a fresh base model plus the saved folder (as ladm-eval loads it) gives the trained
    model's logits."""
    from ladm.methods.base import load_peft_adapters

    cfg = make_cfg("method=lora", f"method.base={base}", "method.dropout=0.0", "method.r=4")
    tokenizer = load_tokenizer(cfg.model)
    method = build_method(cfg)
    model = method.prepare_model(load_model(cfg.model, tokenizer), tokenizer)
    ids = torch.tensor(tokenizer(["你好，世界。ສະບາຍດີ"]).input_ids)
    optimizer = torch.optim.AdamW(method.param_groups(model, 1e-2, 0.0))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    method.save(model.eval(), tmp_path / "adapter")
    reloaded = load_peft_adapters(load_model(cfg.model, tokenizer), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_the_initial_adapter_of_pissa_is_removed_when_the_process_ends(tmp_path):
    """PiSSA keeps its initial adapter in a temporary folder for the conversion on save; a sweep of such jobs
    must not fill the disk with them."""
    import os
    import subprocess
    import sys

    child = """
from hydra import compose, initialize_config_dir
from ladm import CONFIG_DIR
from ladm.methods import build_method
from ladm.models import load_model, load_tokenizer
with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
    cfg = compose("config", overrides=["method=lora", "method.base=pissa", "method.r=4", "logger=none"])
tokenizer = load_tokenizer(cfg.model)
method = build_method(cfg)
method.prepare_model(load_model(cfg.model, tokenizer), tokenizer)
print(method.initial_adapter, method.initial_adapter.is_dir())
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"TMPDIR": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    folder, existed = done.stdout.split()[-2:]
    assert folder.startswith(str(tmp_path)) and existed == "True"
    assert not list(tmp_path.glob("ladm-initial-adapter-*"))


@pytest.mark.parametrize("case", ["lora", "dora", "ladm-forward", "ladm-step"])
def test_merged_adapters_generate_the_same_hypotheses(make_cfg, delta_r_file, case):
    """`eval.merge_adapters`: the adapters folded into the weights (PEFT's merge_adapter) give the very hypotheses
    of the unmerged model, for LoRA, DoRA and LaDM (forward mode's per-layer scaling is merged too), and the
    weights are back afterwards. The adapters are made large (random B) so that they change the output."""
    from ladm.data import SequenceFormat
    from ladm.generation import translate

    overrides = {"lora": ["method=lora"], "dora": ["method=lora", "method.base=dora"],
                 "ladm-forward": ladm_overrides(delta_r_file, "forward"), "ladm-step": ladm_overrides(delta_r_file)}[case]
    cfg = make_cfg(*overrides, "method.dropout=0.0")
    tokenizer = load_tokenizer(cfg.model)
    method = build_method(cfg)
    base = load_model(cfg.model, tokenizer)
    fmt = SequenceFormat.from_cfg(tokenizer, cfg)
    sources = ["你好，世界。", "今天天气很好。", "我们明天去北京。", "这是一本书。"]
    prompts = fmt.prompt_ids(sources, cfg.pair)
    stop_ids = fmt.stop_ids(base.generation_config)
    generate = lambda m: translate(m, tokenizer, prompts, stop_ids, 4, 12).hypotheses  # noqa: E731
    without_adapters = generate(base)
    model = method.prepare_model(base, tokenizer)
    with torch.no_grad():
        torch.manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    unmerged = generate(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with method.merged(model):
        assert any(m.merged for m in model.modules() if hasattr(m, "merged") and hasattr(m, "lora_A"))
        merged = generate(model)
    assert merged == unmerged != without_adapters
    for name, param in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(param, weights[name], rtol=0, atol=1e-5)


REPROBE = ["method=ladm", "probe.n_sentences=4", "probe.batch_size=4", "probe.bootstrap=0", "train.batch_size=4",
           "train.lr=5e-2", "train.warmup_ratio=0", "train.scheduler=constant", "method.dropout=0.0",
           "eval.max_new_tokens=2", "eval.max_samples=1", "method.reprobe_every=2"]


def test_dynamic_delta_r_is_measured_on_the_model_being_trained(make_cfg, files_overrides, tmp_path):
    """`method.reprobe_every=2`: the ΔR recorded at step 2 is the ΔR of the weights after step 2, computed here
    independently (a 2-step run's adapter merged into the base model, R from its hidden states, sum-normalised,
    hi − lo), and the multipliers that follow are those of its TAL/LIL selection."""
    from test_probe import relevance_from_hidden_states

    from ladm.analysis.relevance import probe_examples, reference_pair_cfg, relevance_inputs
    from ladm.data import SequenceFormat

    results = run(make_cfg(*REPROBE, "train.max_steps=5", *files_overrides), tmp_path / "dynamic")
    trajectory = results["method_details"]["trajectory"]
    assert [t["step"] for t in trajectory] == [2, 4] and results["method_details"]["reprobe_every"] == 2
    short_cfg = make_cfg(*REPROBE[:-1], "train.max_steps=2", *files_overrides)
    run(short_cfg, tmp_path / "two-steps")
    tokenizer = load_tokenizer(short_cfg.model)
    model = PeftModel.from_pretrained(load_model(short_cfg.model, tokenizer), tmp_path / "two-steps" / "adapter")
    model = model.merge_and_unload().eval()
    fmt = SequenceFormat.from_cfg(tokenizer, short_cfg)
    r = {side: relevance_from_hidden_states(model, relevance_inputs(probe_examples(c, c.pair.name, fmt), short_cfg.probe)[0])
         for side, c in (("hi", reference_pair_cfg(short_cfg)), ("lo", short_cfg))}
    expected = r["hi"] / r["hi"].sum() - r["lo"] / r["lo"].sum()
    torch.testing.assert_close(torch.tensor(trajectory[0]["delta_r"], dtype=torch.float64), expected, rtol=1e-4, atol=1e-6)
    for entry in trajectory:  # strength s0.5: 1.5 on the selected TAL, 0.5 on the selected LIL, 1 elsewhere
        assert entry["multipliers"] == [1.5 if l in entry["selected_tal"] else 0.5 if l in entry["selected_lil"] else 1.0
                                        for l in range(4)]
    from PIL import Image

    from ladm.report import report

    figure = report(tmp_path / "dynamic", wandb_log=False)["delta_r_trajectory"]
    assert Image.open(figure).size[1] > 100  # one panel: the base model's row and the two re-measurements


def test_new_multipliers_set_each_layers_learning_rate_under_the_schedule(make_cfg, delta_r_file):
    """Step mode after a re-measurement: layer l's learning rate is m_l × the unmodulated one, now and after
    the schedule moves on (its base rates follow)."""
    from transformers import get_scheduler

    cfg = make_cfg(*ladm_overrides(delta_r_file))
    tokenizer = load_tokenizer(cfg.model)
    method = build_method(cfg)
    model = method.prepare_model(load_model(cfg.model, tokenizer), tokenizer)
    optimizer = torch.optim.AdamW(method.param_groups(model, 1e-2, 0.0))
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=10)
    scheduler.step()
    new = [0.5, 1.5, 1.0, 2.0]
    method._modulate(new, optimizer, scheduler)
    for _ in range(2):
        factor = 1 - scheduler.last_epoch / 10
        for group in optimizer.param_groups:
            expected = 1e-2 * (1.0 if group["layer"] is None else new[group["layer"]]) * factor
            assert group["lr"] == pytest.approx(expected), group["name"]
        optimizer.step()
        scheduler.step()


def test_dynamic_delta_r_resumes_exactly(make_cfg, files_overrides, whole_and_resumed):
    """SIGTERM at step 3 (after the re-measurement of step 2), resumed: the same trajectory and adapter as an
    uninterrupted run (the learning rates of step mode come back with the optimizer and scheduler states)."""
    whole, resumed, same_adapters = whole_and_resumed(make_cfg(*REPROBE, "train.max_steps=6", *files_overrides), step=3)
    assert resumed["method_details"]["trajectory"] == whole["method_details"]["trajectory"] and same_adapters
