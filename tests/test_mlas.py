"""MLAS-LoRA (METHODS.md §3) against independent computations; training isolation; bad input."""

import json
import logging
import math

import pytest
import torch
from peft import PeftModel

from ladm import LadmError
from ladm.analysis.awareness import awareness_per_pair
from ladm.analysis.split import lambda_split, pick
from ladm.data import SequenceFormat, collate, read_split
from ladm.methods import build_method
from ladm.methods.mlas_lora import extract, linear_maps, load_or_compute
from ladm.models import decoder_layers, load_model, load_tokenizer
from ladm.schema import validate
from ladm.train import run

FAST = ["probe.n_sentences=4", "probe.batch_size=4", "method.r_gen=4", "method.r_spe=4", "method.pairs=[zh-lo,zh-km]"]


def gated_phi(model, batch, maps: dict, sides=("in", "out")) -> dict:
    """Independent Φ (METHODS.md §3.2): a gate s = 1 of one value per token and unit on each map's input and output,
    L_p = mean over sentences of each sentence's mean answer-token CE through the model's own logits, and
    ∂L_p/∂s[n, t, j] = g·h of that map alone (autograd); taylor = |Σ_n Σ_t|, abs = Σ_n Σ_t |·|."""
    gates, handles = {}, []

    def gate(name, side, tensor):
        gates[(name, side)] = torch.ones_like(tensor, requires_grad=True)
        return tensor * gates[(name, side)]

    for name, module in maps.items():
        if "in" in sides:
            handles.append(module.register_forward_pre_hook(lambda m, args, name=name: (gate(name, "in", args[0]),)))
        if "out" in sides:
            handles.append(module.register_forward_hook(lambda m, args, out, name=name: gate(name, "out", out)))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for handle in handles:
        handle.remove()
    labels = batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100,
                                                  reduction="none")
    loss = (per_token.sum(1) / (labels != -100).sum(1)).mean()
    grads = dict(zip(gates, torch.autograd.grad(loss, list(gates.values())), strict=True))
    mask = batch["attention_mask"].bool()
    return {key: {"taylor": grad[mask].sum(0).abs(), "abs": grad[mask].abs().sum(0)} for key, grad in grads.items()}


def frozen_model_and_examples(make_cfg, n: int):
    """The default tiny model with frozen weights and its first `n` zh→lo training examples."""
    cfg = make_cfg()
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tokenizer).eval().requires_grad_(False)
    return tokenizer, model, SequenceFormat.from_cfg(tokenizer, cfg).encode(read_split(cfg.data.train).head(n), cfg.pair)


@pytest.mark.parametrize("estimate", ["taylor", "abs"])
def test_phi_equals_autograd_of_unit_gates(make_cfg, estimate):
    tokenizer, model, examples = frozen_model_and_examples(make_cfg, 3)
    # q and k share their input: each gets the gradient through itself alone
    maps = linear_maps(decoder_layers(model)[1], ["q_proj", "k_proj", "down_proj"])
    result = awareness_per_pair(model, {"zh-lo": examples}, {name: (m, ("out", "in")) for name, m in maps.items()},
                                tokenizer.pad_token_id, batch_size=2, estimate=estimate)
    expected = gated_phi(model, collate(examples, tokenizer.pad_token_id), maps)
    for key, by_estimate in expected.items():
        torch.testing.assert_close(result.phi[key][0].float(), by_estimate[estimate], rtol=1e-4, atol=1e-9)
    q_in, k_in = expected[("self_attn.q_proj", "in")][estimate], expected[("self_attn.k_proj", "in")][estimate]
    assert not torch.allclose(q_in, k_in)  # not the shared input's total gradient
    stats = result.per_pair["zh-lo"]
    assert stats["tokens_per_sentence"] == sum(len(e.input_ids) for e in examples) / 3
    assert stats["phi_mean"] == pytest.approx(float(torch.cat([v[estimate] for v in expected.values()]).mean()), rel=1e-4)


def test_phi_does_not_depend_on_the_probe_batch_size(make_cfg):
    tokenizer, model, examples = frozen_model_and_examples(make_cfg, 4)
    maps = linear_maps(decoder_layers(model)[2], ["v_proj", "up_proj"])
    sources = {name: (m, ("out", "in")) for name, m in maps.items()}
    for estimate in ("taylor", "abs"):
        one, four = (awareness_per_pair(model, {"p": examples}, sources, tokenizer.pad_token_id, b, estimate).phi
                     for b in (1, 4))
        for key in one:
            torch.testing.assert_close(one[key], four[key], rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("phi,lam,general,owner", [
    ([[1.0, 0.1, 3.0], [1.0, 0.9, 1.0]], 0.6, [True, False, False], [0, 1, 0]),   # shares .5/.5, .1/.9, .75/.25
    ([[1.0, 0.1, 3.0], [1.0, 0.9, 1.0]], 0.95, [True, True, True], [0, 1, 0]),
    ([[2.0, 0.0], [1.0, 0.0], [1.0, 4.0]], 0.4, [False, False], [0, 2]),           # shares .5/.25/.25, 0/0/1
    ([[2.0, 0.0], [1.0, 0.0], [1.0, 4.0]], 0.5, [True, False], [0, 2]),
])
def test_lambda_classification_table(phi, lam, general, owner):
    is_general, specific = lambda_split(torch.tensor(phi), lam)
    assert is_general.tolist() == general
    assert specific.tolist() == [[o == p and not g for o, g in zip(owner, general, strict=True)] for p in range(len(phi))]


def test_per_pair_normalisation_stops_a_high_loss_pair_claiming_every_neuron():
    phi = torch.tensor([[10.0, 20.0, 30.0, 40.0], [1.0, 4.0, 3.0, 2.0]])  # pair 0 has ~10× the loss
    assert lambda_split(phi, 0.6)[1][0].tolist() == [True, True, True, True]
    # per pair: [0.4, 0.8, 1.2, 1.6] vs [0.4, 1.6, 1.2, 0.8] → largest shares .5 (0), .67 (1), .5 (0), .67 (0)
    general, specific = lambda_split(phi, 0.6, "per_pair")
    assert general.tolist() == [True, False, True, False]
    assert specific.tolist() == [[False, False, False, True], [False, True, False, False]]


def test_lambda_at_or_below_uniform_share_warns(make_cfg, caplog):
    with caplog.at_level(logging.WARNING):
        build_method(make_cfg("method=mlas_lora", "method.pairs=[zh-lo,zh-km]", "method.lambda=0.5", "method.init=random"))
    assert "every neuron is language-specific" in caplog.text


def test_seven_pairs_give_general_neurons_so_the_ablations_differ(make_cfg):
    """The default seven zh→X pairs with λ = 0.2 (> 1/7): the tiny teacher has general neurons, and the submatrix
    the general LoRA starts from (-Mr-gen, -Ms-gen) differs from the one of all neurons (-Mr-a, -Ms-a)."""
    cfg = make_cfg("method=mlas_lora", "probe.n_sentences=4", "probe.batch_size=4", "method.r_gen=4", "method.r_spe=4")
    assert len(cfg.method.pairs) == 7
    tokenizer = load_tokenizer(cfg.model)
    factors, summary = load_or_compute(cfg, tokenizer, torch.device("cpu"))
    assert sum(c["out"]["general"] + c["in"]["general"] for c in summary["counts"].values()) > 0
    differs = [key for key in factors if key.endswith(".gen.rows") or key.endswith(".gen.cols")
               if not torch.equal(factors[key], factors[key.replace(".gen.", ".all.")])]
    assert differs


def test_extraction_keeps_original_order_and_highest_awareness():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3])
    candidates = torch.tensor([True, True, False, True, True])
    assert pick(scores, candidates, 3).tolist() == [1, 3, 4]  # best three candidates, in index order
    assert pick(scores, torch.tensor([False, True, False, False, False]), 3).tolist() == [1, 2, 3]  # topped up
    weight = torch.arange(20.0).reshape(4, 5)
    assert extract(weight, torch.tensor([0, 2]), torch.tensor([1, 4])).tolist() == [[1.0, 4.0], [11.0, 14.0]]


@pytest.fixture
def mlas_setup(make_cfg):
    def build(*overrides):
        cfg = make_cfg("method=mlas_lora", *FAST, *overrides)
        tokenizer = load_tokenizer(cfg.model)
        method = build_method(cfg)
        base = load_model(cfg.model, tokenizer)
        reference = load_model(cfg.model, tokenizer)
        return cfg, tokenizer, method, method.prepare_model(base, tokenizer), reference
    return build


def lora_modules(model):
    return {path: m for path, m in model.named_modules() if hasattr(m, "lora_A") and path.endswith(("q_proj", "down_proj"))}


def test_svd_init_is_the_best_rank_r_approximation(mlas_setup):
    """W_s rebuilt from the teacher's own weights and the chosen rows/columns; B·A against torch.linalg.svd."""
    cfg, tokenizer, method, model, _ = mlas_setup()
    factors, summary = load_or_compute(cfg, tokenizer, torch.device("cpu"))
    teacher_layers = decoder_layers(load_model(cfg.method.teacher, tokenizer))
    for path, module in lora_modules(model).items():
        k = int(path.split(".layers.")[1].split(".")[0])
        local = path.split(f".layers.{k}.")[1]
        teacher_weight = teacher_layers[summary["teacher_layers"][k]].get_submodule(local).weight.detach()
        for adapter, source in (("general", "gen"), ("pair_zh-km", "spe.zh-km")):
            prefix = f"layer{k}.{local}.{source}"
            rows, cols = factors[f"{prefix}.rows"], factors[f"{prefix}.cols"]
            assert (rows.diff() > 0).all() and (cols.diff() > 0).all()  # original order kept
            w = teacher_weight[rows][:, cols].double()  # the reference in float64, like the stage's own SVD
            assert w.shape == module.base_layer.weight.shape
            product = (module.lora_B[adapter].weight @ module.lora_A[adapter].weight).double()
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            torch.testing.assert_close(product, (u[:, :4] * s[:4]) @ vh[:4], rtol=1e-4, atol=1e-6)
            # Eckart–Young: the residual is exactly the discarded singular values.
            residual = torch.linalg.matrix_norm(w - product) ** 2
            torch.testing.assert_close(residual, (torch.linalg.svdvals(w)[4:] ** 2).sum(), rtol=1e-3, atol=1e-4)
            assert module.scaling[adapter] == 1.0


def test_subtract_offset_leaves_the_student_unchanged_at_step_zero(mlas_setup):
    cfg, tokenizer, method, model, reference = mlas_setup("method.init_offset=subtract")
    ids = tokenizer(["Translate the following Chinese text into Lao.\nChinese: 你好\nLao:"], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(ids).logits
        for pair in ("zh-lo", "zh-km"):
            method.select_adapters(model, pair)
            torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-4)
    _, _, keep_method, keep_model, _ = mlas_setup()
    with torch.no_grad():
        assert not torch.allclose(keep_model(ids).logits, expected, atol=1e-3)  # `keep` adds B·A as written


def test_only_the_general_and_active_pair_adapters_train(make_cfg, files_overrides, tmp_path, monkeypatch):
    """Stopped (SIGTERM, a fault-injection knob) after step 1 of 2, which trains zh-lo (the first pair): the
    checkpoint's zh-km adapter is bit-identical to its initialisation; the general and zh-lo ones moved."""
    from ladm.checkpoint import load_latest
    from ladm.trainer import Preempted

    overrides = ["method=mlas_lora", *FAST, "train.max_steps=1", "train.warmup_ratio=0", "train.batch_size=4", "train.lr=1e-2",
                 "eval.max_new_tokens=2", "eval.max_samples=1", "data.max_train_samples=8"]
    monkeypatch.setenv("LADM_FAULT_SIGNAL_AT_STEP", "1:SIGTERM")
    with pytest.raises(Preempted):
        run(make_cfg(*overrides), tmp_path / "one")
    _, state = load_latest(tmp_path / "one")
    assert state["step"] == 1
    cfg = make_cfg(*overrides)
    tokenizer = load_tokenizer(cfg.model)
    from transformers import set_seed

    set_seed(cfg.train.seed)
    initial = build_method(cfg).prepare_model(load_model(cfg.model, tokenizer), tokenizer)
    before = {n: p.detach().clone() for n, p in initial.named_parameters() if "lora_" in n}
    trained = state["trainable"]
    for adapter, changes in (("general", True), ("pair_zh-lo", True), ("pair_zh-km", False)):
        names = [n for n in trained if n.endswith(f".{adapter}.weight") and "lora_B" in n]
        assert names
        for name in names:
            assert torch.equal(trained[name], before[name]) != changes, (adapter, name)


def test_every_pair_gets_max_steps_whatever_the_method(make_cfg, files_overrides, tmp_path):
    """METHODS.md §5 training budget: lora on zh-lo and mlas_lora / landermt on [zh-lo, zh-km] under one `train`
    config record the same training examples for zh-lo; the multi-pair runs take 2 × max_steps steps."""
    common = ["train.max_steps=2", "train.batch_size=4", "eval.max_new_tokens=2", "eval.max_samples=1",
              "data.max_train_samples=8", "probe.n_sentences=4", "probe.batch_size=4"]
    lora = run(make_cfg("method=lora", *common), tmp_path / "lora")
    assert lora["train"]["steps"] == 2 and lora["train"]["examples_seen"] == {"zh-lo": 8}
    for method in ("mlas_lora", "landermt"):
        results = run(make_cfg(f"method={method}", "method.pairs=[zh-lo,zh-km]", *common,
                               *(["method.r_gen=4", "method.r_spe=4"] if method == "mlas_lora" else [])),
                      tmp_path / method)
        assert results["train"]["examples_seen"] == {"zh-lo": 8, "zh-km": 8}
        assert results["train"]["steps"] == 4 and len(results["losses"]) == 4


def test_end_to_end_two_pairs_each_with_its_own_adapters(make_cfg, tmp_path):
    results = run(make_cfg("method=mlas_lora", *FAST, "train.max_steps=4", "train.batch_size=4",
                           "data.max_train_samples=16", "eval.max_samples=3", "eval.max_new_tokens=6"), tmp_path)
    assert results["pairs"] == ["zh-lo", "zh-km"] and set(results["metrics"]) == {"zh-lo", "zh-km"}
    for pair in ("zh-lo", "zh-km"):
        assert len((tmp_path / "predictions" / "flores200-devtest" / f"{pair}.hyp").read_text(encoding="utf-8").splitlines()) == 3
    assert len(results["method_details"]["teacher_layers"]) == 4
    cfg = make_cfg()
    tokenizer = load_tokenizer(cfg.model)
    peft_model = PeftModel.from_pretrained(load_model(cfg.model, tokenizer), tmp_path / "adapter" / "general",
                                           adapter_name="general")
    peft_model.load_adapter(tmp_path / "adapter" / "pair_zh-km", adapter_name="pair_zh-km")
    assert set(peft_model.peft_config) == {"general", "pair_zh-km"}
    assert json.loads((tmp_path / "results.json").read_text())["method_details"]["adapters"] == "general+specific"


@pytest.mark.parametrize("overrides,message", [
    (["model@method.teacher=tiny-qwen2.5", "method.teacher.random_init.config.hidden_size=256",
      "method.teacher.random_init.config.num_hidden_layers=6"], "use different tokenizers"),
    (["method.teacher.random_init.config.num_hidden_layers=2"], "has 2 layers, fewer than the student's 4"),
    (["method.teacher.random_init.config.intermediate_size=96"], "narrower than the student's"),
    (["method.lambda=0"], "method.lambda must lie in (0, 1]"),
    (["method.lambda=1.5"], "method.lambda must lie in (0, 1]"),
    (["method.r_spe=65"], "method.r_spe=65 exceeds the rank"),
])
def test_bad_mlas_input(make_cfg, tmp_path, overrides, message):
    with pytest.raises(LadmError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        cfg = make_cfg("method=mlas_lora", *FAST, *overrides)
        validate(cfg)  # as every entry point does first
        method = build_method(cfg)
        tokenizer = load_tokenizer(cfg.model)
        method.prepare_model(load_model(cfg.model, tokenizer), tokenizer)


def test_single_pair_warns(make_cfg, caplog):
    with caplog.at_level(logging.WARNING):
        build_method(make_cfg("method=mlas_lora", "method.pairs=[zh-lo]", "method.init=random"))
    assert "single pair" in caplog.text


def test_awareness_cli_writes_a_cached_summary(tmp_path, cache_dir):
    import os
    import subprocess
    import sys

    from ladm import REPO_ROOT

    out = tmp_path / "awareness"
    proc = subprocess.run([sys.executable, "-m", "ladm.awareness", *FAST, f"cache_dir={cache_dir}", f"hydra.run.dir={out}"],
                          cwd=REPO_ROOT, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "awareness.json").read_text())
    assert summary["pairs"] == ["zh-lo", "zh-km"] and len(summary["teacher_layers"]) == 4
    assert summary["teacher_layers"] == sorted(summary["teacher_layers"])
    assert list(cache_dir.glob("awareness/*/tensors.safetensors"))


def test_phi_is_length_neutral_within_a_pair(make_cfg):
    """zh-lo's 12 shortest vs 12 longest probe sentences (same language and script, ~4× the tokens): Φ does not
    follow 1/length, while the old token mean does (the bias this definition removes)."""
    from ladm.analysis.awareness import UnitAwareness

    cfg = make_cfg("method=mlas_lora")
    tokenizer = load_tokenizer(cfg.method.teacher)
    model = load_model(cfg.method.teacher, tokenizer).eval().requires_grad_(False)
    examples = SequenceFormat.from_cfg(tokenizer, cfg).encode(read_split(cfg.data.train).head(200), cfg.pair)
    examples.sort(key=lambda e: len(e.input_ids))
    sources = {f"{l}.{name}": (m, ("out", "in")) for l, layer in enumerate(decoder_layers(model))
               for name, m in linear_maps(layer, list(cfg.method.target_modules)).items()}
    mean_phi, tokens = {}, {}
    for group, chosen in (("short", examples[:12]), ("long", examples[-12:])):
        awareness = UnitAwareness(sources)
        with awareness:
            for start in range(0, 12, 4):
                awareness.add_batch(model, collate(chosen[start:start + 4], tokenizer.pad_token_id))
        tokens[group] = sum(len(e.input_ids) for e in chosen)
        mean_phi[group] = {est: float(torch.cat([s.flatten() for s in awareness.scores(est).values()]).mean())
                           for est in ("taylor", "abs")}
    length_ratio = tokens["long"] / tokens["short"]
    assert length_ratio > 3
    ratio = {est: mean_phi["long"][est] / mean_phi["short"][est] for est in ("taylor", "abs")}
    assert 0.8 < ratio["abs"] < 1.25
    assert abs(math.log(ratio["taylor"])) < 0.5 * math.log(length_ratio)
    token_mean = ratio["abs"] * tokens["short"] / tokens["long"]  # Σ|g·h| / tokens: the earlier definition
    assert token_mean == pytest.approx(1 / length_ratio, rel=0.25)


def test_seven_pairs_mean_phi_no_longer_tracks_inverse_length(make_cfg, tmp_path):
    """On the tiny teacher with the seven default pairs (the token-mean definition gave a correlation of 0.9986)."""
    cfg = make_cfg("method=mlas_lora", "probe.n_sentences=16", "probe.batch_size=8", "method.r_gen=4",
                   "method.r_spe=4", f"cache_dir={tmp_path}")
    _, summary = load_or_compute(cfg, load_tokenizer(cfg.model), torch.device("cpu"))
    per_pair = summary["awareness_per_pair"]
    assert list(per_pair) == list(cfg.method.pairs)
    phi = torch.tensor([per_pair[p]["phi_mean"] for p in per_pair])
    inverse_length = torch.tensor([1 / per_pair[p]["tokens_per_sentence"] for p in per_pair])
    assert float(torch.corrcoef(torch.stack([phi, inverse_length]))[0, 1]) < 0.5
