"""The W&B offline run holds what the job logged (read back from the .wandb file)."""

import json
import struct

import pytest
from wandb.proto import wandb_internal_pb2

from ladm.train import run

BLOCK, HEADER = 32768, 7


def wandb_log_records(path):
    """The records of a .wandb file: a 7-byte ':W&B' header, then the leveldb log format (32 KiB blocks of records
    `crc32 uint32 | length uint16 | type uint8 | data`, type FULL=1 or FIRST=2 … MIDDLE=3 … LAST=4; a block's
    tail shorter than a record header is zero padding). Written here because wandb ≥ 0.30 has no Python reader."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    index, pending = HEADER, b""
    while index + HEADER <= len(data):
        if BLOCK - index % BLOCK < HEADER:
            index += BLOCK - index % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[index:index + HEADER])
        if kind == 0:  # the zero padding of a preallocated or unfinished tail
            break
        chunk = data[index + HEADER:index + HEADER + length]
        index += HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            yield pending


def read_wandb_records(run_dir) -> tuple[list[dict], dict, dict, dict]:
    """History rows, the summary, the config and (run name, artifacts) of an offline run, decoded from its
    protobuf log."""
    (log_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    history, summary, config, other = [], {}, {}, {"artifacts": [], "name": None}
    for data in wandb_log_records(log_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            summary |= {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.summary.update}
        elif kind in ("config", "run"):
            items = record.config.update if kind == "config" else record.run.config.update
            config |= {item.key: json.loads(item.value_json) for item in items}
            if kind == "run":
                other["name"] = record.run.display_name
        elif kind == "artifact":
            other["artifacts"].append((record.artifact.type, [entry.path for entry in record.artifact.manifest.contents]))
    return history, summary, config, other


def test_offline_wandb_run_holds_loss_lr_and_metrics(make_cfg, files_overrides, tmp_path):
    cfg = make_cfg("logger=wandb", "name=wandb-test", "train.max_steps=4", "train.log_every=1", "train.eval_every=2",
                   "eval.max_new_tokens=8", *files_overrides)
    results = run(cfg, tmp_path)
    history, summary, config, other = read_wandb_records(tmp_path)
    losses = [row["train/loss"] for row in history if "train/loss" in row]
    assert losses == results["losses"]  # train.log_every=1: the window is one step
    assert all("train/lr" in row for row in history if "train/loss" in row)
    assert summary["files/zh-lo/chrf++"] == results["metrics"]["zh-lo"]["chrf++"]
    periodic = [row for row in history if "validation/zh-lo/chrf++" in row]
    assert len(periodic) == 1  # at step 2 (train.eval_every), on the held-out validation slice
    assert periodic[0]["validation/zh-lo/chrf++"] == results["validation"]["zh-lo"]["chrf++"]
    tested = [row["files/zh-lo/chrf++"] for row in history if "files/zh-lo/chrf++" in row]
    assert tested == [results["metrics"]["zh-lo"]["chrf++"]]
    assert any(row.get("samples/files/zh-lo/_type") == "table-file" for row in history)  # the samples table
    assert config["method"]["name"] == "lora" and config["name"] == "wandb-test"
    assert other["name"] == tmp_path.name  # the job folder: in a sweep, its swept axes
    (paths,) = [paths for kind, paths in other["artifacts"] if kind == "results"]
    assert {"results.json", "predictions/files/zh-lo.hyp", "predictions/files/zh-lo.src"} <= set(paths)


def test_loss_is_averaged_over_the_logging_window_and_every_layer_rate_is_logged(make_cfg, files_overrides, tmp_path):
    """LaDM (step mode): `train/lr` is the configured rate under the schedule, `train/lr/layerK` each layer's
    modulated rate; `train/loss` is the mean of the steps since the last log."""
    cfg = make_cfg("method=ladm", "method.mode=step", "strength=s1", "logger=wandb", "train.max_steps=5",
                   "train.log_every=2", "train.scheduler=constant", "train.warmup_ratio=0", "train.lr=3e-4",
                   "probe.n_sentences=4", "eval.max_new_tokens=4", *files_overrides)
    results = run(cfg, tmp_path)
    history, *_ = read_wandb_records(tmp_path)
    logged = [row for row in history if "train/loss" in row]
    steps = [row["_step"] for row in logged]
    assert steps == [2, 4, 5]
    windows = [results["losses"][0:2], results["losses"][2:4], results["losses"][4:5]]
    assert [row["train/loss"] for row in logged] == pytest.approx([sum(w) / len(w) for w in windows])
    assert [row["train/loss_step"] for row in logged] == pytest.approx([results["losses"][s - 1] for s in steps])
    multipliers = results["method_details"]["multipliers"]
    for row in logged:
        assert row["train/lr"] == pytest.approx(3e-4)
        for layer, multiplier in enumerate(multipliers):  # m_l = 0 layers too: their rate is 0
            assert row[f"train/lr/layer{layer}"] == pytest.approx(3e-4 * multiplier)
    assert 0.0 in multipliers and len([k for k in logged[0] if k.startswith("train/lr/layer")]) == len(multipliers)


def test_wandb_project_and_entity_come_from_wandbs_own_variables(make_cfg, tmp_path, monkeypatch):
    import wandb

    from ladm.tracking import Tracker

    monkeypatch.setenv("WANDB_PROJECT", "lowres-mt")
    monkeypatch.setenv("WANDB_ENTITY", "my-lab")
    seen = {}
    monkeypatch.setattr(wandb, "init", lambda **kwargs: seen.update(kwargs))
    Tracker(make_cfg("logger=wandb"), tmp_path)
    assert (seen["project"], seen["entity"]) == ("lowres-mt", "my-lab")
    monkeypatch.delenv("WANDB_PROJECT")
    monkeypatch.delenv("WANDB_ENTITY")
    Tracker(make_cfg("logger=wandb", "logger.entity=other"), tmp_path)
    assert (seen["project"], seen["entity"]) == ("ladm", "other")


def test_a_run_without_wandb_installed_goes_on_without_it(make_cfg, tmp_path, monkeypatch, caplog):
    """logger=wandb where wandb cannot be imported: a warning, no run, every call a no-op."""
    import sys

    from ladm.tracking import Tracker

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with caplog.at_level("WARNING"):
        tracker = Tracker(make_cfg("logger=wandb", "logger.mode=offline"), tmp_path)
    assert tracker.run is None and "W&B is unavailable" in caplog.text
    tracker.log({"a": 1.0}, step=1)
    tracker.summary({"a": 1.0})


def test_a_search_or_slurm_launch_without_its_plugin_is_one_line(monkeypatch):
    import importlib.util

    from ladm import LadmError
    from ladm.cli import check_plugins

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins") else real(name, *a))
    with pytest.raises(LadmError, match=r"needs Hydra's Optuna sweeper, which is not installed: pip install 'ladm\[optuna\]'"):
        check_plugins(["-m", "hparams_search=optuna_ladm"])
    with pytest.raises(LadmError, match=r"ladm\[slurm\]"):
        check_plugins(["hydra/launcher=slurm"])
    check_plugins(["hparams_search=null", "method=lora"])  # nothing asked for
