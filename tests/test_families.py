"""Llama-3, Qwen2.5 and Gemma-2 test models with their real tokenizers, through every path (METHODS.md §5).

Token sequences are checked against the tokenizer's own `apply_chat_template(..., tokenize=True)` and
its decoded text, generation against a forced end token, the loss against the model's own logits.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from ladm import REPO_ROOT
from ladm.data import LengthBudgets, SequenceFormat, collate, read_split, render_prompt
from ladm.generation import translate
from ladm.losses import answer_loss, full_logits_loss_sum
from ladm.models import load_model, load_tokenizer
from ladm.train import run

ASSETS = REPO_ROOT / "tests" / "assets"
# family: (model config, asset folder, BOS written once or None, end of turn with a chat template, EOS without)
FAMILIES = {
    "llama3": ("tiny-llama3", "llama3", "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "qwen2.5": ("tiny-qwen2.5", "qwen2.5", None, "<|im_end|>", "<|im_end|>"),
    "gemma2": ("tiny-gemma2", "gemma2", "<bos>", "<end_of_turn>", "<eos>"),
}
PAIRS = ["zh-lo", "zh-km", "zh-my"]


def family_format(make_cfg, family: str, chat: bool, pair: str = "zh-lo"):
    cfg = make_cfg(f"model={FAMILIES[family][0]}", f"model.chat_template={str(chat).lower()}", f"pair={pair}")
    tokenizer = load_tokenizer(cfg.model)
    return cfg, tokenizer, SequenceFormat.from_cfg(tokenizer, cfg)


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("family", FAMILIES)
def test_chat_sequences_equal_the_tokenizers_own_template(make_cfg, family, pair):
    cfg, tok, fmt = family_format(make_cfg, family, True, pair)
    _, _, bos, end_of_turn, _ = FAMILIES[family]
    corpus = read_split(cfg.data.train).head(6)
    kwargs = dict(cfg.model.chat_template_kwargs)
    for example, src, tgt in zip(fmt.encode(corpus, cfg.pair), corpus.src, corpus.tgt, strict=True):
        user = [{"role": "user", "content": render_prompt(src, cfg.pair)}]
        conversation = user + [{"role": "assistant", "content": tgt}]
        expected = tok.apply_chat_template(conversation, tokenize=True, return_dict=False, **kwargs)
        n = len(example.input_ids)
        assert example.input_ids == expected[:n]
        assert tok.decode(expected[n:]).strip() == ""  # only the template's trailing newline is left out
        assert tok.convert_ids_to_tokens(example.input_ids[-1]) == end_of_turn
        prompt = tok.apply_chat_template(user, tokenize=True, add_generation_prompt=True, return_dict=False, **kwargs)
        assert example.labels == [-100] * len(prompt) + example.input_ids[len(prompt):]
        assert tok.decode(example.input_ids[len(prompt):-1]) == tgt  # the answer right after the prompt, no space
        tokens = tok.convert_ids_to_tokens(example.input_ids)
        assert tokens.count(bos) == (1 if bos else 0) and (bos is None or tokens[0] == bos)


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_sequences_are_bos_prompt_space_answer_eos(make_cfg, family):
    cfg, tok, fmt = family_format(make_cfg, family, False)
    _, _, bos, _, eos = FAMILIES[family]
    corpus = read_split(cfg.data.train).head(4)
    for example, src, tgt in zip(fmt.encode(corpus, cfg.pair), corpus.src, corpus.tgt, strict=True):
        text = (bos or "") + render_prompt(src, cfg.pair) + " " + tgt + eos
        assert tok.decode(example.input_ids) == text
        answer = example.input_ids[example.n_prompt:]
        assert tok.decode(answer) == " " + tgt + eos and example.labels[example.n_prompt:] == answer


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_generation_stops_on_every_end_token(make_cfg, family, chat):
    """A model forced to emit one end token stops right there, for each end token of the family."""
    cfg, tok, fmt = family_format(make_cfg, family, chat)
    model = load_model(cfg.model, tok).eval()
    listed = json.loads((ASSETS / FAMILIES[family][1] / "generation_config.json").read_text())["eos_token_id"]
    listed = [listed] if isinstance(listed, int) else listed
    ends = set(listed) | {tok.convert_tokens_to_ids(FAMILIES[family][3 if chat else 4])}
    stop_ids = fmt.stop_ids(model.generation_config)
    assert ends <= set(stop_ids)
    prompts = fmt.prompt_ids(["你好", "今天天气很好。"], cfg.pair)
    forced = {"id": None}

    def force(module, args, output):
        output = output.clone()
        output[..., forced["id"]] += 1e4
        return output

    handle = model.get_output_embeddings().register_forward_hook(force)
    try:
        for end in sorted(ends):
            forced["id"] = end
            out = translate(model, tok, prompts, stop_ids, batch_size=2, max_new_tokens=5)
            assert out.hypotheses == ["", ""] and out.hit_budget == [False, False]
        forced["id"] = tok("a", add_special_tokens=False).input_ids[0]  # never ends
        out = translate(model, tok, prompts, stop_ids, batch_size=2, max_new_tokens=5)
        assert out.hit_budget == [True, True] and all(out.hypotheses)
    finally:
        handle.remove()


def test_auto_lengths_cover_the_data(make_cfg):
    """zh→my with Llama-3: the training budget fits ≥ 99% of examples (and no smaller one does), the
    generation budget is 1.2 × the longest reference; explicit numbers pass through, capped by the context."""
    cfg, tok, fmt = family_format(make_cfg, "llama3", False, "zh-my")
    corpus = read_split(cfg.data.train).head(200)
    examples = {"zh-my": fmt.encode(corpus, cfg.pair)}
    prompts = {"zh-my": fmt.prompt_ids(corpus.src[:10], cfg.pair)}
    budgets = LengthBudgets.choose("auto", 0.99, "auto", 1.2, 131072, examples, prompts)
    lengths = [len(e.input_ids) for e in examples["zh-my"]]
    assert sum(n <= budgets.max_length for n in lengths) >= 0.99 * len(lengths)
    assert sum(n <= budgets.max_length - 1 for n in lengths) < 0.99 * len(lengths)
    answers = [len(tok(" " + t, add_special_tokens=False).input_ids) + 1 for t in corpus.tgt]
    assert budgets.max_new_tokens == {"zh-my": math.ceil(1.2 * max(answers))}
    assert budgets.max_length > 256  # Burmese under Llama-3: the old fixed 256 would cut most examples
    fixed = LengthBudgets.choose(300, 0.99, 9999, 1.2, 1000, examples, prompts)
    assert fixed.max_length == 300 and fixed.max_new_tokens["zh-my"] == 1000 - max(map(len, prompts["zh-my"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_loss_equals_full_logits_loss_and_gradients(make_cfg, family, monkeypatch):
    """Loss and gradients through the answer-only chunked output layer equal the model's own logits
    (Gemma-2: with its final-logit soft-capping), with several chunks per batch."""
    import ladm.losses

    cfg, tok, fmt = family_format(make_cfg, family, family == "qwen2.5", "zh-km" if family == "llama3" else "zh-vi")
    monkeypatch.setattr(ladm.losses, "CHUNK_BYTES", 4 * 200 * tok.vocab_size)  # ~200 tokens a chunk
    model = load_model(cfg.model, tok)
    if family == "gemma2":
        assert model.config.final_logit_softcapping == 30.0 and model.config._attn_implementation == "eager"
    corpus = read_split(cfg.data.train).head(2 if family == "gemma2" else 3)
    batch = collate(fmt.encode(corpus, cfg.pair), tok.pad_token_id)
    weight = model.get_output_embeddings().weight
    losses, grads = [], []
    for loss_fn in (answer_loss, full_logits_loss_sum):
        model.zero_grad()
        model.requires_grad_(True)
        loss = loss_fn(model, batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append((weight.grad.clone(), model.model.layers[0].mlp.up_proj.weight.grad.clone()))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-3)
    for ours, reference in zip(grads[0], grads[1], strict=True):  # float32 sums over ~10^3 tokens, other order
        assert (ours - reference).abs().max() <= 1e-4 * reference.abs().max()


DEEPER_WIDER = [f"method.teacher.random_init.config.{key}={value}" for key, value in
                (("num_hidden_layers", 6), ("hidden_size", 96), ("intermediate_size", 192),
                 ("num_attention_heads", 6), ("num_key_value_heads", 3))]
TEACHERS = {  # a deeper, wider teacher of the same family (same tokenizer)
    "llama3": ["model@method.teacher=tiny-llama3-teacher"],
    "qwen2.5": ["model@method.teacher=tiny-qwen2.5", *DEEPER_WIDER],
    "gemma2": ["model@method.teacher=tiny-gemma2", *DEEPER_WIDER],
}


@pytest.mark.parametrize("method", ["lora", "ladm", "mlas_lora", "landermt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_on_every_family_with_chat_template(make_cfg, files_overrides, tmp_path, family, method):
    """lora, ladm (probe included), mlas_lora and landermt end to end on each family's test model, chat template on,
    with auto length budgets and their truncation counts in results.json (generation kept short, except for
    lora, where the auto generation budget runs too)."""
    extra = {"ladm": ["probe.n_sentences=4", "probe.batch_size=2", "method.k_tal=1", "method.k_lil=1"],
             "landermt": ["method.pairs=[zh-lo,zh-km]", "method.lambda=0.6", "probe.n_sentences=4", "probe.batch_size=2"],
             "mlas_lora": ["method.pairs=[zh-lo,zh-km]", "probe.n_sentences=4", "probe.batch_size=2",
                           *TEACHERS[family]]}.get(method, [])
    overrides = [f"model={FAMILIES[family][0]}", "model.chat_template=true", f"method={method}", "train.max_steps=2",
                 "train.batch_size=2", "data.max_train_samples=8", "eval.max_samples=2", *extra]
    overrides = [*files_overrides, *overrides]  # mlas_lora: the same files for both pairs
    if method != "lora":
        overrides.append("eval.max_new_tokens=8")
    results = run(make_cfg(*overrides), tmp_path)
    assert results["status"] == "complete"
    for pair in results["pairs"]:
        assert results["truncated_train"][pair]["of"] == 8
        assert results["hit_generation_budget"][pair]["of"] == 2
        assert results["max_new_tokens"][pair] >= 1
        assert len((tmp_path / "predictions" / "files" / f"{pair}.hyp").read_text(encoding="utf-8").splitlines()) == 2
    assert results["train"]["max_length"] >= 1
    if method == "ladm":
        assert len(results["method_details"]["delta_r"]) == 4


def test_newline_stop_is_built_once_and_stops_like_transformers_stop_strings(make_cfg, monkeypatch):
    """Forced to write "a", "a", "\\n", "a", ...: translate stops at the newline exactly as transformers'
    `generate(stop_strings=["\\n"])` does, and builds the stop criterion once for any number of calls."""
    from transformers import StopStringCriteria

    from ladm.generation import first_line, newline_stop

    cfg, tok, fmt = family_format(make_cfg, "llama3", False)
    model = load_model(cfg.model, tok).eval()
    stop_ids = fmt.stop_ids(model.generation_config)
    prompts = fmt.prompt_ids(["你好", "今天天气很好。"], cfg.pair)
    letter, newline = tok("a", add_special_tokens=False).input_ids[0], tok("\n", add_special_tokens=False).input_ids[0]
    calls = {"n": 0}

    def force(module, args, output):
        calls["n"] += 1
        output = output.clone()
        output[..., newline if calls["n"] == 3 else letter] += 1e4
        return output

    built = []
    original = StopStringCriteria.__init__
    monkeypatch.setattr(StopStringCriteria, "__init__", lambda self, *a, **k: built.append(1) or original(self, *a, **k))
    newline_stop.cache_clear()
    handle = model.get_output_embeddings().register_forward_hook(force)
    try:
        outputs = []
        for _ in range(2):
            calls["n"] = 0
            outputs.append(translate(model, tok, prompts, stop_ids, batch_size=2, max_new_tokens=8))
        assert len(built) == 1 and outputs[0] == outputs[1]
        assert outputs[0].hit_budget == [False, False] and outputs[0].hypotheses == ["aa", "aa"]
        for prompt, hypothesis in zip(prompts, outputs[0].hypotheses, strict=True):
            calls["n"] = 0
            out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                 eos_token_id=stop_ids, pad_token_id=tok.pad_token_id, stop_strings=["\n"], tokenizer=tok)
            assert out.shape[1] == len(prompt) + 3  # stopped right after the newline
            assert first_line(tok.decode(out[0, len(prompt):], skip_special_tokens=True)) == hypothesis
    finally:
        handle.remove()


def test_vision_language_gemma3_is_probed_and_adapted_on_its_language_model_only():
    """Gemma-3 4B/12B load as Gemma3ForConditionalGeneration: the decoder layers are the language model's, and
    LoRA adapts none of the vision tower's projections (which share the names q_proj, k_proj, v_proj)."""
    from omegaconf import OmegaConf
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Gemma3Config

    from ladm.methods.lora import lora_config, text_only
    from ladm.models import decoder_layers

    config = Gemma3Config(
        text_config=dict(num_hidden_layers=3, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, vocab_size=300),
        vision_config=dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                           image_size=28, patch_size=14), mm_tokens_per_image=4)
    model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert decoder_layers(model) is model.model.language_model.layers and len(decoder_layers(model)) == 3
    method = OmegaConf.create({"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj"]})
    model = get_peft_model(model, text_only(lora_config(method), model))
    adapted = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
    assert len(adapted) == 9 and all(".language_model." in name for name in adapted), adapted
    assert any("vision_tower" in name and name.endswith("q_proj") for name, _ in model.named_modules())
