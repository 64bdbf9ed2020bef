"""Weights & Biases: one run per job, offline by default, never fatal."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class Tracker:
    """A W&B run on the main rank, or a no-op (`logger=none`, other ranks, or W&B failing)."""

    def __init__(self, cfg: DictConfig, out_dir: Path, is_main: bool = True, resume_id: str | None = None):
        self.run = None
        if cfg.logger.name == "none" or cfg.logger.mode == "disabled" or not is_main:
            return
        try:
            import wandb

            self.run = wandb.init(
                project=cfg.logger.project, entity=cfg.logger.entity, group=cfg.name,
                name=out_dir.name, job_type=cfg.method.name,  # the job folder: its swept axes, unique in the sweep
                config=OmegaConf.to_container(cfg, resolve=True), mode=cfg.logger.mode, dir=str(out_dir),
                reinit="finish_previous", settings=wandb.Settings(silent=True),
                id=resume_id, resume="allow" if resume_id else None,
            )
        except Exception as err:  # noqa: BLE001 - tracking must never stop a run
            log.warning("W&B is unavailable, continuing without it: %s", err)

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else self.run.id

    def config(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.config.update(values, allow_val_change=True)

    def log(self, values: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(values, step=step)

    def table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self.run is not None:
            import wandb

            try:
                self.run.log({key: wandb.Table(columns=columns, data=rows)})
            except Exception as err:  # noqa: BLE001 - tracking must never stop a run
                log.warning("W&B could not log %s: %s", key, err)

    def artifact(self, kind: str, paths: list[Path]) -> None:
        """Files and folders (results.json, predictions/) as one artifact of this run."""
        if self.run is None:
            return
        import wandb

        try:
            artifact = wandb.Artifact(f"{kind}-{self.run.id}", type=kind)
            for path in paths:
                if path.is_dir():
                    artifact.add_dir(str(path), name=path.name)
                elif path.is_file():
                    artifact.add_file(str(path))
            self.run.log_artifact(artifact)
        except Exception as err:  # noqa: BLE001 - tracking must never stop a run
            log.warning("W&B could not log the %s artifact: %s", kind, err)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
