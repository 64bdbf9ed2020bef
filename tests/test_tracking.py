"""The W&B offline run holds what the job logged (read back from the .wandb file)."""

import json

from wandb.proto import wandb_internal_pb2
from wandb.sdk.internal.datastore import DataStore

from ladm.train import run


def read_wandb_records(run_dir) -> tuple[list[dict], dict, dict]:
    """History rows, the summary and the config of an offline run, decoded from its protobuf log."""
    (log_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    store = DataStore()
    store.open_for_scan(str(log_file))
    history, summary, config = [], {}, {}
    while (data := store.scan_data()) is not None:
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
    return history, summary, config


def test_offline_wandb_run_holds_loss_lr_and_metrics(make_cfg, files_overrides, tmp_path):
    cfg = make_cfg("logger=wandb", "name=wandb-test", "train.max_steps=4", "train.log_every=1", "train.eval_every=2",
                   "eval.max_new_tokens=8", *files_overrides)
    results = run(cfg, tmp_path)
    history, summary, config = read_wandb_records(tmp_path)
    losses = [row["train/loss"] for row in history if "train/loss" in row]
    assert losses == results["losses"]
    assert all("train/lr" in row for row in history if "train/loss" in row)
    assert summary["zh-lo/chrf++"] == results["metrics"]["zh-lo"]["chrf++"]
    periodic = [row for row in history if "validation/zh-lo/chrf++" in row]
    assert len(periodic) == 1  # at step 2 (train.eval_every), on the held-out validation slice
    assert periodic[0]["validation/zh-lo/chrf++"] == results["validation"]["zh-lo"]["chrf++"]
    assert [row["test/zh-lo/chrf++"] for row in history if "test/zh-lo/chrf++" in row] == [results["metrics"]["zh-lo"]["chrf++"]]
    assert any(row.get("samples/zh-lo/_type") == "table-file" for row in history)  # the samples table
    assert config["method"]["name"] == "lora" and config["name"] == "wandb-test"
