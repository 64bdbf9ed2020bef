"""ΔR probe: R against independent computations; selection tables (METHODS.md §1–§2)."""

import pytest
import torch
from torch import nn

import ladm.analysis.relevance as relevance_module
from ladm.analysis.relevance import (
    LayerRelevance,
    activation_disparity,
    bootstrap_delta_r,
    delta_r_report,
    layer_relevance,
    normalise,
    pair_probe_key,
)
from ladm.data import render_prompt
from ladm.methods.ladm import Selection
from ladm.models import load_model, load_tokenizer


@pytest.fixture
def tiny(make_cfg):
    cfg = make_cfg()
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tokenizer).eval()
    texts = [render_prompt(s, cfg.pair) for s in ["你好", "今天天气很好，我们去公园散步吧。", "他在读一本很长的书。", "一"]]
    return model, tokenizer, tokenizer(texts).input_ids


def relevance_from_hidden_states(model, token_ids) -> torch.Tensor:
    """Independent R: unpadded sentences one by one, differences of `output_hidden_states`
    (the final norm swapped for identity so the last entry is the last layer's raw output)."""
    final_norm, model.model.norm = model.model.norm, nn.Identity()
    try:
        per_sentence = []
        with torch.no_grad():
            for ids in token_ids:
                states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
                per_sentence.append(torch.stack([(states[l + 1] - states[l]).abs().sum(-1).mean()
                                                 for l in range(len(states) - 1)]))
    finally:
        model.model.norm = final_norm
    return torch.stack(per_sentence).mean(0).double()


def test_streamed_relevance_equals_whole_set_computation(tiny):
    model, tokenizer, ids = tiny
    streamed = layer_relevance(model, ids, [0] * len(ids), tokenizer.pad_token_id, batch_size=3)
    torch.testing.assert_close(streamed, relevance_from_hidden_states(model, ids), rtol=1e-5, atol=1e-5)


def test_batch_size_and_padding_side_do_not_change_r(tiny):
    model, tokenizer, ids = tiny
    one = layer_relevance(model, ids, [0] * len(ids), tokenizer.pad_token_id, batch_size=1)
    left = layer_relevance(model, ids, [0] * len(ids), tokenizer.pad_token_id, batch_size=4)
    width = max(map(len, ids))
    right_ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids])
    right_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    relevance = LayerRelevance(model)
    with relevance.hooked():
        relevance.add_batch(model, right_ids, right_mask)
    torch.testing.assert_close(left, one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(relevance.relevance, one, rtol=1e-5, atol=1e-5)


def test_identity_layer_has_zero_relevance(tiny):
    model, tokenizer, ids = tiny
    layer = model.model.layers[2]
    with torch.no_grad():  # no attention or MLP contribution: the residual passes unchanged
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    relevance = layer_relevance(model, ids, [0] * len(ids), tokenizer.pad_token_id, batch_size=2)
    assert relevance[2] == 0
    assert (relevance[[0, 1, 3]] > 0).all()


class ToyLayer(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, hidden_states, **kwargs):
        return (self.fn(hidden_states),)


class ToyLM(nn.Module):
    """Two layers: x + [1, -2], then 3·x; embeddings are given by hand."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding.from_pretrained(torch.tensor([[0.0, 0.0], [1.0, 2.0], [-1.0, 0.5]]))
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([ToyLayer(lambda x: x + torch.tensor([1.0, -2.0])), ToyLayer(lambda x: 3 * x)])

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=0):
        x = self.embed(input_ids)
        for layer in self.model.layers:
            x = layer(x)[0]
        return x


def test_hand_computed_relevance_on_two_layer_toy():
    # Layer 0 adds [1, -2]: L1 change 3 on every token. Layer 1 maps y to 3y: change 2·|y|_1.
    # Sentence A = tokens (1, 2): y = [2, 0], [0, -1.5] → |y|_1 = 2, 1.5 → token mean 2·1.75 = 3.5
    # Sentence B = token (1):     y = [2, 0]            → 2·2 = 4.      R = [3, (3.5 + 4)/2 = 3.75]
    relevance = layer_relevance(ToyLM(), [[1, 2], [1]], [0, 0], pad_token_id=0, batch_size=2)
    torch.testing.assert_close(relevance, torch.tensor([3.0, 3.75], dtype=torch.float64))


def test_normalisations_and_sign():
    r_hi, r_lo = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0])
    torch.testing.assert_close(activation_disparity(r_hi, r_lo, "sum"), torch.tensor([-0.25, 0.25]))
    torch.testing.assert_close(activation_disparity(r_hi, r_lo, "none", "lo_minus_hi"), torch.tensor([1.0, -1.0]))
    z = normalise(torch.tensor([1.0, 2.0, 3.0]), "zscore")
    torch.testing.assert_close(z, torch.tensor([-1.0, 0.0, 1.0]))


DELTA = [0.30, -0.20, 0.05, -0.40, 0.10, 0.0]


def selection(**changes) -> Selection:
    fields = dict(tau_tal=0.0, tau_lil=0.0, select="all", k_tal=2, k_lil=2, ratio_tal=0.25, ratio_lil=0.25,
                  alpha=0.5, beta=0.5, variant="signed", m_min=0.0, m_max=2.0)
    return Selection(**(fields | changes))


@pytest.mark.parametrize("changes,tal,lil,selected_tal,selected_lil,multipliers", [
    ({}, [0, 2, 4], [1, 3], [0, 2, 4], [1, 3], [1.5, 0.5, 1.5, 0.5, 1.5, 1.0]),
    ({"tau_tal": 0.08, "tau_lil": 0.25}, [0, 4], [3], [0, 4], [3], [1.5, 1, 1, 0.5, 1.5, 1]),
    ({"select": "topk", "k_tal": 1, "k_lil": 1}, [0, 2, 4], [1, 3], [0], [3], [1.5, 1, 1, 0.5, 1, 1]),
    ({"select": "topk", "k_tal": 0, "k_lil": 2, "beta": 1.0}, [0, 2, 4], [1, 3], [], [1, 3], [1, 0, 1, 0, 1, 1]),
    ({"select": "ratio", "ratio_tal": 0.34, "ratio_lil": 0.0}, [0, 2, 4], [1, 3], [0, 4], [], [1.5, 1, 1, 1, 1.5, 1]),
    ({"variant": "proportional", "alpha": 1.0, "beta": 1.0}, [0, 2, 4], [1, 3], [0, 2, 4], [1, 3],
     [1.75, 0.5, 1.125, 0.0, 1.25, 1.0]),
    ({"variant": "proportional", "alpha": 4.0, "beta": 0.5, "m_max": 2.0, "m_min": 0.1}, [0, 2, 4], [1, 3],
     [0, 2, 4], [1, 3], [2.0, 0.75, 1.5, 0.5, 2.0, 1.0]),
])
def test_selection_table(changes, tal, lil, selected_tal, selected_lil, multipliers):
    chosen = selection(**changes)(DELTA)
    assert chosen["tal"] == tal and chosen["lil"] == lil
    assert chosen["selected_tal"] == selected_tal and chosen["selected_lil"] == selected_lil
    assert chosen["multipliers"] == pytest.approx(multipliers)


def test_bootstrap_standard_error_matches_the_analytic_one_of_a_difference_of_means():
    """Without normalisation ΔR_l is a difference of two means: its bootstrap SE must approach
    sqrt(var_hi/n_hi + var_lo/n_lo) (population variances, as the bootstrap resamples the sample itself)."""
    from omegaconf import OmegaConf

    generator = torch.Generator().manual_seed(1)
    hi = torch.rand(40, 3, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 4.0, 0.1], dtype=torch.float64)
    lo = torch.rand(25, 3, generator=generator, dtype=torch.float64) * 2
    probe_cfg = OmegaConf.create({"normalisation": "none", "sign": "hi_minus_lo"})
    boot = bootstrap_delta_r(hi.tolist(), lo.tolist(), probe_cfg, resamples=8000)
    analytic = (hi.var(0, unbiased=False) / len(hi) + lo.var(0, unbiased=False) / len(lo)).sqrt()
    torch.testing.assert_close(torch.tensor(boot["delta_r_se"], dtype=torch.float64), analytic, rtol=0.04, atol=0)
    delta = hi.mean(0) - lo.mean(0)
    assert all(l < d < h for l, d, h in zip(boot["delta_r_low"], delta.tolist(), boot["delta_r_high"], strict=True))


def test_bootstrap_tells_a_stable_selection_from_a_coin_flip(caplog):
    """Layer 0 is clearly TAL and layer 3 clearly LIL; layers 1 and 2 tie within noise for the second TAL slot:
    0 and 3 recur in every resample, 1 and 2 in about half, and the run is warned."""
    from omegaconf import OmegaConf

    generator = torch.Generator().manual_seed(0)
    noise = lambda n: torch.randn(n, 4, generator=generator, dtype=torch.float64) * 0.02
    hi = (torch.tensor([2.0, 1.5, 1.5, 0.5], dtype=torch.float64) + noise(60)).tolist()
    lo = (torch.tensor([1.0, 1.0, 1.0, 1.5], dtype=torch.float64) + noise(60)).tolist()
    probe_cfg = OmegaConf.create({"normalisation": "none", "sign": "hi_minus_lo", "bootstrap": 500})
    choose = selection(select="topk", k_tal=2, k_lil=1)
    with caplog.at_level("WARNING"):
        report = delta_r_report({"pair": "zh-xx", "n_sentences": 60, "R_hi": torch.tensor(hi).mean(0).tolist(),
                                 "R_lo": torch.tensor(lo).mean(0).tolist(), "R_hi_per_sentence": hi,
                                 "R_lo_per_sentence": lo}, probe_cfg, choose)
    boot = report["bootstrap"]
    assert "R_hi_per_sentence" not in report and report["selected_lil"] == [3]
    assert boot["recurrence"]["lil"] == {"3": 1.0} and boot["recurrence"]["tal"]["0"] == 1.0
    (second,) = set(report["selected_tal"]) - {0}
    assert 0.2 < boot["recurrence"]["tal"][str(second)] < 0.8 and boot["unstable_layers"] in ([], [second])
    assert 0.2 < boot["same_selection"] < 0.8
    assert ("unstable" in caplog.text) == bool(boot["unstable_layers"])


def test_zero_strength_is_identity():
    assert selection(alpha=0.0, beta=0.0)(DELTA)["multipliers"] == [1.0] * len(DELTA)


def test_probe_cache_key_ignores_what_does_not_change_r(make_cfg):
    key = lambda *o, weights="w1": pair_probe_key(cfg := make_cfg("method=ladm", *o), cfg, weights)  # noqa: E731
    base = key()
    assert key("strength=s1", "probe.normalisation=zscore", "probe.reference_pair=en-zh") == base
    assert key("probe.n_sentences=10") != base and key("pair=zh-km") != base and key("probe.input=prompt") != base
    assert key(weights="w2") != base  # other weights at the same path


@pytest.fixture
def probe_calls(monkeypatch) -> list[str]:
    """Each pass of the probe over a pair's sentences, by its progress label ("probe zh-en")."""
    calls = []
    original = relevance_module.sentence_relevance
    monkeypatch.setattr(relevance_module, "sentence_relevance", lambda *a, **k: calls.append(k["desc"]) or original(*a, **k))
    return calls


def test_new_weights_at_the_same_path_are_probed_again(make_cfg, tmp_path, probe_calls):
    """The relevance cache is keyed on the loaded weights' fingerprint: a model changed in place is measured
    again, the same weights are not."""
    calls = probe_calls
    cfg = make_cfg("method=ladm", "probe.n_sentences=4", "probe.batch_size=4", f"cache_dir={tmp_path}")
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tokenizer)
    first = relevance_module.measure_relevance(model, tokenizer, cfg)
    assert relevance_module.measure_relevance(model, tokenizer, cfg) == first and len(calls) == 2
    with torch.no_grad():
        next(model.parameters()).mul_(0.5)
    assert relevance_module.measure_relevance(model, tokenizer, cfg)["R_lo"] != first["R_lo"] and len(calls) == 4


def test_the_reference_pair_is_measured_once_for_any_number_of_target_pairs(make_cfg, tmp_path, probe_calls):
    """Three LaDM pairs probe zh-en once (4 measurements, not 6); each R equals a measurement without the cache."""
    calls = probe_calls
    cfg = make_cfg("method=ladm", "probe.n_sentences=4", "probe.batch_size=4", f"cache_dir={tmp_path / 'shared'}")
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, tokenizer)
    measured = {}
    for pair in ("zh-lo", "zh-km", "zh-my"):
        measured[pair] = relevance_module.measure_relevance(model, tokenizer, make_cfg(
            "method=ladm", f"pair={pair}", "probe.n_sentences=4", "probe.batch_size=4", f"cache_dir={tmp_path / 'shared'}"))
    assert calls == ["probe zh-en", "probe zh-lo", "probe zh-km", "probe zh-my"]
    alone = relevance_module.measure_relevance(model, tokenizer, make_cfg(
        "method=ladm", "pair=zh-my", "probe.n_sentences=4", "probe.batch_size=4", f"cache_dir={tmp_path / 'alone'}"))
    assert alone["R_hi"] == measured["zh-lo"]["R_hi"] == measured["zh-my"]["R_hi"] and alone["R_lo"] == measured["zh-my"]["R_lo"]


def test_ladm_probe_cli_on_a_local_model_directory(make_cfg, tmp_path, cache_dir):
    """`ladm-probe` on any HF causal LM directory (here a tiny Qwen2 saved to disk)."""
    import json
    import os
    import subprocess
    import sys

    from ladm import REPO_ROOT

    cfg = make_cfg("model=tiny-qwen2.5")
    tokenizer = load_tokenizer(cfg.model)
    load_model(cfg.model, tokenizer).save_pretrained(tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")
    out = tmp_path / "probe"
    proc = subprocess.run(
        [sys.executable, "-m", "ladm.probe", "model=qwen2.5-7b", f"model.path={tmp_path / 'qwen'}", "model.dtype=float32",
         "pair=zh-th", "probe.n_sentences=6", "probe.batch_size=4", "method.k_tal=1", "method.k_lil=1",
         f"cache_dir={cache_dir}", f"hydra.run.dir={out}"],
        cwd=REPO_ROOT, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "delta_r.json").read_text())
    for key in ("model", "reference_pair", "pair", "n_sentences", "R_hi", "R_lo", "R_hi_norm", "R_lo_norm",
                "delta_r", "tal", "lil", "multipliers", "probe"):
        assert key in report, key
    assert report["pair"] == "zh-th" and report["reference_pair"] == "zh-en" and report["n_sentences"] == 6
    assert len(report["delta_r"]) == 4 and len(report["selected_tal"]) <= 1
    expected = activation_disparity(torch.tensor(report["R_hi"]), torch.tensor(report["R_lo"]), "sum")
    torch.testing.assert_close(torch.tensor(report["delta_r"]), expected)
    assert (out / "delta_r.png").read_bytes()[:4] == b"\x89PNG"
    boot = report["bootstrap"]
    assert boot["resamples"] == 1000 and len(boot["delta_r_se"]) == 4
    assert all(lo <= d <= hi for lo, d, hi in zip(boot["delta_r_low"], report["delta_r"], boot["delta_r_high"], strict=True))
    assert set(boot["recurrence"]["tal"]) == {str(l) for l in report["selected_tal"]}


def test_reference_references_from_the_same_files_are_refused_unless_given(make_cfg, files_overrides, tmp_path):
    from ladm import LadmError
    from ladm.analysis.relevance import reference_pair_cfg

    without_reference = [o for o in files_overrides if not o.startswith("probe.reference_data")]
    with pytest.raises(LadmError, match="set probe.reference_data"):
        reference_pair_cfg(make_cfg("method=ladm", "probe.input=prompt+reference", *without_reference))
    assert reference_pair_cfg(make_cfg("method=ladm", "probe.input=prompt", *without_reference)).pair.name == "zh-en"
    (tmp_path / "ref.zh").write_text("一\n", encoding="utf-8")
    (tmp_path / "ref.en").write_text("one\n", encoding="utf-8")
    given = reference_pair_cfg(make_cfg("method=ladm", "probe.input=prompt+reference", *without_reference,
                                        f"probe.reference_data={{format: text, src: {tmp_path / 'ref.zh'}, "
                                        f"tgt: {tmp_path / 'ref.en'}}}"))
    assert given.data.train.tgt == str(tmp_path / "ref.en")
