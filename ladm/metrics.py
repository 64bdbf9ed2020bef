"""chrF++, spBLEU and COMET (METHODS.md §5), with honest handling of missing models.

spBLEU is sacrebleu BLEU with `tokenize="flores200"` *and* the official FLORES-200
SentencePiece model. A score computed with any other SentencePiece model is reported as
`bleu_spm_unofficial`, never as `spbleu`.
"""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from sacrebleu.metrics import BLEU, CHRF

from ladm import LadmError

log = logging.getLogger(__name__)

OFFICIAL_SPM_SHA256 = "14bb8dfb35c0ffdea7bc01e56cea38b9e3d5efcdcb9c251d6b40538e1aab555a"
OFFICIAL_SPM_BYTES = 4_852_054
KNOWN_METRICS = ("chrf++", "spbleu", "comet")


def spm_model_path() -> Path:
    """Where sacrebleu's `flores200` tokenizer reads its SentencePiece model."""
    from sacrebleu.tokenizers import tokenizer_spm

    return Path(tokenizer_spm.SACREBLEU_DIR) / "models" / "flores200sacrebleuspm"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def comet_checkpoint(name_or_dir: str) -> Path | None:
    """The local COMET checkpoint for a directory, a .ckpt file or a cached hub name."""
    path = Path(name_or_dir).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        ckpt = path / "checkpoints" / "model.ckpt"
        return ckpt if ckpt.is_file() else None
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_dir, local_files_only=True)) / "checkpoints" / "model.ckpt"
    except Exception:  # noqa: BLE001 - any failure means "not available offline"
        return None


@dataclass
class Scorer:
    """Decides at start-up which metrics can be computed honestly, then scores hypotheses."""

    eval_cfg: DictConfig
    spm_status: str = "absent"  # official | unofficial | missing | absent (not requested)
    comet_ckpt: Path | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    _comet_model: Any = None  # loaded once per process, on first use

    @classmethod
    def preflight(cls, eval_cfg: DictConfig) -> Scorer:
        """Check the spBLEU model and COMET checkpoint before any training (`eval.on_missing`)."""
        unknown = set(eval_cfg.metrics) - set(KNOWN_METRICS)
        if unknown:
            raise LadmError(f"unknown metric(s) {sorted(unknown)} in eval.metrics: choose from {list(KNOWN_METRICS)}")
        if eval_cfg.on_missing not in ("error", "skip"):
            raise LadmError(f"eval.on_missing must be 'error' or 'skip', got '{eval_cfg.on_missing}'")
        scorer = cls(eval_cfg)
        if "spbleu" in eval_cfg.metrics:
            path = spm_model_path()
            if not path.is_file():
                scorer.spm_status = "missing"
                scorer._missing("spbleu", f"the official FLORES-200 SentencePiece model is not at {path}: put the "
                                f"file there (sha256 {OFFICIAL_SPM_SHA256[:12]}…, {OFFICIAL_SPM_BYTES:,} bytes)")
            elif _sha256(path) != OFFICIAL_SPM_SHA256:
                scorer.spm_status = "unofficial"
                scorer._missing("spbleu", f"{path} is not the official FLORES-200 SentencePiece model "
                                f"(sha256 {_sha256(path)[:12]}…, expected {OFFICIAL_SPM_SHA256[:12]}…)")
            else:
                scorer.spm_status = "official"
        if "comet" in eval_cfg.metrics:
            scorer.comet_ckpt = comet_checkpoint(eval_cfg.comet.model)
            if scorer.comet_ckpt is None:
                scorer._missing("comet", f"COMET checkpoint '{eval_cfg.comet.model}' is not available offline: "
                                "download it (comet-score --model ...) or set eval.comet.model=/local/dir")
        return scorer

    def _missing(self, metric: str, reason: str) -> None:
        if self.eval_cfg.on_missing == "error":
            raise LadmError(f"{reason}; or set eval.on_missing=skip to record {metric} as null")
        log.warning("%s skipped: %s", metric, reason)
        self.skipped[metric] = reason

    def score(self, sources: list[str], hypotheses: list[str], references: list[str],
              comet: bool = True) -> tuple[dict, dict]:
        """Corpus scores and sacrebleu signatures; skipped metrics are null (COMET only if `comet`; several
        pairs score COMET in one call with `comet_by_pair`)."""
        metrics: dict[str, float | None] = {}
        signatures: dict[str, str] = {}
        if "chrf++" in self.eval_cfg.metrics:
            chrf = CHRF(word_order=2)
            metrics["chrf++"] = chrf.corpus_score(hypotheses, [references]).score
            signatures["chrf++"] = str(chrf.get_signature())
        if "spbleu" in self.eval_cfg.metrics:
            metrics["spbleu"] = None
            if self.spm_status in ("official", "unofficial"):
                bleu = BLEU(tokenize="flores200")
                key = "spbleu" if self.spm_status == "official" else "bleu_spm_unofficial"
                metrics[key] = bleu.corpus_score(hypotheses, [references]).score
                signatures[key] = str(bleu.get_signature())
        if comet and "comet" in self.eval_cfg.metrics:
            metrics["comet"] = self.comet_by_pair({"": (sources, hypotheses, references)})[""]
        return metrics, signatures

    def comet_by_pair(self, triples: dict[str, tuple[list[str], list[str], list[str]]]) -> dict[str, float | None]:
        """COMET system score (the mean of its segment scores) of every pair, all pairs in one `predict` call
        with the model loaded once per process; null when the checkpoint is missing (`eval.on_missing=skip`)."""
        if self.comet_ckpt is None:
            return {pair: None for pair in triples}
        if self._comet_model is None:
            from comet import load_from_checkpoint

            self._comet_model = load_from_checkpoint(str(self.comet_ckpt), local_files_only=True)
        samples, owners = [], []
        for pair, (sources, hypotheses, references) in triples.items():
            samples += [{"src": s, "mt": h, "ref": r} for s, h, r in zip(sources, hypotheses, references, strict=True)]
            owners += [pair] * len(sources)
        output = self._comet_model.predict(samples, batch_size=self.eval_cfg.comet.batch_size,
                                           gpus=1 if torch.cuda.is_available() else 0, num_workers=0, progress_bar=True)
        by_pair: dict[str, list[float]] = {pair: [] for pair in triples}
        for pair, score in zip(owners, output.scores, strict=True):
            by_pair[pair].append(float(score))
        return {pair: sum(scores) / len(scores) for pair, scores in by_pair.items()}


# Unicode blocks of the target scripts of the LaDM pairs (the Latin-script targets have no off-target measure).
SCRIPTS = {"lo": [(0x0E80, 0x0EFF)], "km": [(0x1780, 0x17FF), (0x19E0, 0x19FF)],
           "my": [(0x1000, 0x109F), (0xA9E0, 0xA9FF), (0xAA60, 0xAA7F)], "th": [(0x0E00, 0x0E7F)]}


def target_script_ratio(hypotheses: list[str], target: str) -> float | None:
    """The share of the hypotheses' letters that are in the target language's script (Unicode ranges, no
    model): low values mean off-target output, e.g. Chinese or English instead of Lao. None for targets
    whose script is not distinctive (Latin)."""
    if target not in SCRIPTS:
        return None
    letters = [c for text in hypotheses for c in text if c.isalpha() or unicodedata.category(c).startswith("M")]
    if not letters:
        return 0.0
    inside = sum(any(lo <= ord(c) <= hi for lo, hi in SCRIPTS[target]) for c in letters)
    return inside / len(letters)
