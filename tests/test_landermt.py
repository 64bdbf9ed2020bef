"""LANDeRMT (METHODS.md §4) against independent computations: unchanged at step 0, the routed FFN as the sum of
its restricted parts, Φ of FFN units vs autograd, the split rules by hand, frozen entries bit for bit, reload."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ladm.analysis.awareness import awareness_per_pair
from ladm.analysis.split import lambda_split, ratio_split
from ladm.data import SequenceFormat, collate, pair_config, read_split
from ladm.distributed import DistEnv
from ladm.generation import translate
from ladm.methods import build_method
from ladm.methods.landermt import LANDeRMT, RoutedFFN, routed_layers, select_pair
from ladm.models import decoder_layers, load_model, load_tokenizer
from ladm.tracking import Tracker
from ladm.train import run
from ladm.trainer import fit

FAST = ["method=landermt", "method.pairs=[zh-lo,zh-km]", "method.lambda=0.6", "probe.n_sentences=4", "probe.batch_size=2",
        "method.k_layers=2"]


@pytest.fixture
def setup(make_cfg):
    def _setup(*overrides):
        cfg = make_cfg(*FAST, *overrides)
        tokenizer = load_tokenizer(cfg.model)
        base = load_model(cfg.model, tokenizer)
        method = build_method(cfg)
        model = method.prepare_model(copy.deepcopy(base), tokenizer)
        batch = collate(SequenceFormat.from_cfg(tokenizer, cfg).encode(read_split(cfg.data.train).head(2), cfg.pair),
                        tokenizer.pad_token_id)
        return cfg, tokenizer, base, method, model, batch
    return _setup


@pytest.mark.parametrize("routing", ["gate", "none"])
def test_model_is_unchanged_at_step_zero(setup, routing):
    cfg, _, base, method, model, batch = setup(f"method.routing={routing}")
    assert len(routed_layers(model)) == 2
    with torch.no_grad():
        expected = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for pair in method.pairs:
            method.select_adapters(model, pair)
            got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_routed_ffn_at_half_is_the_sum_of_its_restricted_parts():
    """With random deltas and g = 0.5: FFN = FFN_G + FFN_S(p) + FFN_rest, each built by hand from sliced weights."""
    torch.manual_seed(0)
    mlp = torch.nn.Module()
    mlp.gate_proj, mlp.up_proj = torch.nn.Linear(6, 10, bias=False), torch.nn.Linear(6, 10, bias=False)
    mlp.down_proj, mlp.act_fn = torch.nn.Linear(10, 6, bias=False), torch.nn.SiLU()
    general, specific = torch.tensor([0, 3, 7]), {"zh-lo": torch.tensor([1, 2]), "zh-km": torch.tensor([5])}
    ffn = RoutedFFN(mlp, general, specific, ["general", "zh-lo", "zh-km"], routing=True)
    with torch.no_grad():
        for p in ffn.deltas.values():
            p.normal_()
    ffn.pair = "zh-lo"
    x = torch.randn(2, 4, 6)

    def by_hand(units, group):
        gate, up, down = mlp.gate_proj.weight[units], mlp.up_proj.weight[units], mlp.down_proj.weight[:, units]
        if group:
            gate, up = gate + ffn.deltas[f"{group}__gate_proj"], up + ffn.deltas[f"{group}__up_proj"]
            down = down + ffn.deltas[f"{group}__down_proj"]
        return F.silu(x @ gate.T) * (x @ up.T) @ down.T

    rest = torch.tensor([4, 5, 6, 8, 9])  # every unit neither general nor zh-lo's (zh-km's unit 5 included)
    torch.testing.assert_close(ffn(x), by_hand(general, "general") + by_hand(specific["zh-lo"], "zh-lo") + by_hand(rest, None))
    with torch.no_grad():  # and the plain FFN when the deltas are zero
        for p in ffn.deltas.values():
            p.zero_()
    torch.testing.assert_close(ffn(x), mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))


@pytest.mark.parametrize("estimate", ["taylor", "abs"])
def test_phi_of_ffn_units_equals_autograd_on_the_intermediate_activation(make_cfg, estimate):
    from test_mlas import frozen_model_and_examples, gated_phi

    tokenizer, model, examples = frozen_model_and_examples(make_cfg, 3)
    mlp = decoder_layers(model)[2].mlp
    result = awareness_per_pair(model, {"zh-lo": examples}, {"layer2": (mlp.down_proj, ("in",))},
                                tokenizer.pad_token_id, batch_size=3, estimate=estimate)
    expected = gated_phi(model, collate(examples, tokenizer.pad_token_id), {"layer2": mlp.down_proj}, sides=("in",))
    torch.testing.assert_close(result.phi[("layer2", "in")][0].float(), expected[("layer2", "in")][estimate],
                               rtol=1e-4, atol=1e-9)


def test_ratio_split_by_hand():
    # 5 units, 2 pairs; Φ summed: [3, 1, 4, 6, 2] → top 40% (2 units) general: units 3 and 2.
    # Others: unit 0 (2.0, 1.0) → pair 0 only; unit 1 (0.5, 0.5) → both; unit 4 (0.2, 1.8) → pair 1 (0.2 < 0.9·1.8).
    phi = torch.tensor([[2.0, 0.5, 2.0, 3.0, 0.2], [1.0, 0.5, 2.0, 3.0, 1.8]])
    general, specific = ratio_split(phi, general_ratio=0.4, partition=0.9)
    assert general.tolist() == [False, False, True, True, False]
    assert specific.tolist() == [[True, True, False, False, False], [False, True, False, False, True]]
    general, specific = lambda_split(phi, 0.6)  # shares .67/.33, .5/.5, .5/.5, .5/.5, .1/.9
    assert general.tolist() == [False, True, True, True, False]
    assert specific.tolist() == [[True, False, False, False, False], [False, False, False, False, True]]


def test_a_step_on_one_pair_moves_only_its_units(setup, tmp_path):
    """AdamW with weight decay, several steps on zh-lo: the base weights and zh-km's slices and router stay bit for
    bit; the general and zh-lo slices and router move."""
    cfg, tokenizer, base, method, model, _ = setup("train.weight_decay=0.1", "train.max_steps=3", "train.batch_size=2",
                                                   "train.lr=1e-2", "train.warmup_ratio=0")
    fmt = SequenceFormat.from_cfg(tokenizer, cfg)
    examples = {"zh-lo": fmt.encode(read_split(cfg.data.train).head(6), cfg.pair)}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    fit(model, method, examples, tokenizer.pad_token_id, cfg.train, DistEnv(), Tracker(cfg, tmp_path, False), tmp_path)
    base_state = base.state_dict()
    for name, tensor in model.state_dict().items():
        if ".mlp.mlp." in name or "deltas" not in name and "routers" not in name:
            assert torch.equal(tensor, base_state[name.replace(".mlp.mlp.", ".mlp.")]), name
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    for name in before:
        if "zh-km" in name:
            assert name not in moved, name
        elif "deltas.general" in name or "deltas.zh-lo" in name or "routers.zh-lo" in name:
            assert name in moved, name


def test_saved_state_reloads_to_the_same_hypotheses(make_cfg, files_overrides, tmp_path):
    cfg = make_cfg(*files_overrides, *FAST, "train.max_steps=3", "train.batch_size=4", "train.lr=1e-2",
                   "eval.max_new_tokens=6", "eval.max_samples=2")
    results = run(cfg, tmp_path)
    assert results["method_details"]["layers"] and (tmp_path / "adapter" / "landermt.safetensors").is_file()
    tokenizer = load_tokenizer(cfg.model)
    model = LANDeRMT.load(load_model(cfg.model, tokenizer), tmp_path / "adapter")
    fmt = SequenceFormat.from_cfg(tokenizer, cfg)
    for pair in ("zh-lo", "zh-km"):
        select_pair(model, pair)
        pair_cfg = pair_config(cfg, pair)
        prompts = fmt.prompt_ids(read_split(pair_cfg.data.test).head(2).src, pair_cfg.pair)
        hypotheses = translate(model, tokenizer, prompts, fmt.stop_ids(model.generation_config), 2, 6).hypotheses
        saved = (tmp_path / "predictions" / "files" / f"{pair}.hyp").read_text(encoding="utf-8").splitlines()
        assert hypotheses == saved
