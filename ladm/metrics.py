"""chrF++, spBLEU and COMET (METHODS.md §5), with honest handling of missing models.

spBLEU is sacrebleu BLEU with `tokenize="flores200"` *and* the official FLORES-200
SentencePiece model. A score computed with any other SentencePiece model is reported as
`bleu_spm_unofficial`, never as `spbleu`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
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


def spm_problem() -> str | None:
    """Why the official spBLEU model cannot be used (None when it is in place, checked by sha256)."""
    path = spm_model_path()
    if not path.is_file():
        return (f"the official FLORES-200 SentencePiece model is not at {path} "
                f"(sha256 {OFFICIAL_SPM_SHA256[:12]}…, {OFFICIAL_SPM_BYTES:,} bytes)")
    if (digest := _sha256(path)) != OFFICIAL_SPM_SHA256:
        return (f"{path} is not the official FLORES-200 SentencePiece model "
                f"(sha256 {digest[:12]}…, expected {OFFICIAL_SPM_SHA256[:12]}…)")
    return None


def fetch_spm() -> None:
    """sacrebleu's own download of the `flores200` model (its URL, its cache path); an empty or partial file
    left by a failed download is removed."""
    from sacrebleu.tokenizers.tokenizer_spm import SPM_MODELS
    from sacrebleu.utils import download_file

    path = spm_model_path()
    try:
        download_file(SPM_MODELS["flores200"]["url"], str(path))
    except BaseException:
        path.unlink(missing_ok=True)
        raise


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


def comet_encoder(checkpoint: Path) -> str | None:
    """The Hugging Face encoder (e.g. `xlm-roberta-large`) a COMET checkpoint loads its tokenizer and config
    from (`pretrained_model` in the checkpoint's hparams.yaml); None without a readable hparams.yaml."""
    import yaml

    hparams = checkpoint.parents[1] / "hparams.yaml"
    try:
        return str(yaml.safe_load(hparams.read_text(encoding="utf-8"))["pretrained_model"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


def load_encoder_files(encoder: str, local_files_only: bool) -> None:
    """The encoder's tokenizer and config, as COMET loads them (downloaded unless `local_files_only`)."""
    from transformers import AutoConfig, AutoTokenizer

    AutoConfig.from_pretrained(encoder, local_files_only=local_files_only)
    AutoTokenizer.from_pretrained(encoder, local_files_only=local_files_only)


def comet_installed() -> bool:
    return importlib.util.find_spec("comet") is not None


def comet_problem(name: str) -> str | None:
    """Why COMET `name` cannot be scored here: unbabel-comet is not installed, or its checkpoint, or its encoder's
    tokenizer/config, is not here (offline)."""
    if not comet_installed():
        return ("unbabel-comet is not installed in this environment (it is the optional extra ladm[comet]; its "
                "last release needs transformers<5 and numpy<2, as in `make install`'s locked environment)")
    checkpoint = comet_checkpoint(name)
    if checkpoint is None:
        return f"the COMET checkpoint '{name}' is not in the Hugging Face cache or a local folder"
    encoder = comet_encoder(checkpoint)
    if encoder is None:
        return f"{checkpoint.parents[1]} has no hparams.yaml naming its encoder: it is not a COMET checkpoint folder"
    try:
        load_encoder_files(encoder, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means "not available offline"
        return f"the tokenizer/config of '{encoder}', which COMET '{name}' loads, is not in the Hugging Face cache"
    return None


def fetch_comet(name: str) -> None:
    """COMET's own `download_model` (the checkpoint), then its encoder's tokenizer and config."""
    from comet import download_model

    encoder = comet_encoder(Path(download_model(name)))
    if encoder is not None:
        load_encoder_files(encoder, local_files_only=False)


def online() -> bool:
    """False when the Hugging Face offline switch is set (then nothing is downloaded)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().upper() not in ("1", "ON", "YES", "TRUE")


def metric_problems(eval_cfg: DictConfig) -> dict[str, str]:
    """Per requested metric that needs a model (spbleu, comet), why it cannot be computed right now."""
    problems = {"spbleu": spm_problem() if "spbleu" in eval_cfg.metrics else None,
                "comet": comet_problem(eval_cfg.comet.model) if "comet" in eval_cfg.metrics else None}
    return {metric: problem for metric, problem in problems.items() if problem}


def fetch_missing(eval_cfg: DictConfig, problems: dict[str, str]) -> dict[str, str]:
    """Let sacrebleu and COMET download what `problems` names; returns what is still missing afterwards
    (with the download error, if one happened)."""
    fetchers = {"spbleu": fetch_spm, "comet": lambda: fetch_comet(eval_cfg.comet.model)}
    errors = {}
    for metric in problems:
        if metric == "comet" and not comet_installed():
            continue  # nothing to download with
        log.info("fetching the %s model ...", metric)
        try:
            fetchers[metric]()
        except Exception as err:  # noqa: BLE001 - a failed download is reported with the rest
            errors[metric] = f"{type(err).__name__}: {err}"
    left = metric_problems(eval_cfg)
    return {m: p + (f" (download failed: {errors[m]})" if m in errors else "") for m, p in left.items()}


def asset_folders() -> str:
    """The caches sacrebleu and COMET read their models from."""
    from huggingface_hub.constants import HF_HUB_CACHE

    return f"{spm_model_path().parent} and {HF_HUB_CACHE}"


def where_to_copy(eval_cfg: DictConfig) -> str:
    """The fix for missing metric models, in one sentence."""
    return (f"run `ladm-fetch-metrics eval.comet.model={eval_cfg.comet.model}` on a machine with network access "
            f"and copy {asset_folders()} to the same places here (or point SACREBLEU and HF_HOME at copies)")


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
        """Before any training: check the spBLEU model (sha256) and the COMET checkpoint with its encoder files;
        when online and `eval.fetch`, let sacrebleu and COMET download what is missing. Whatever is still
        missing is reported in one message; `eval.on_missing` decides between stopping and null scores."""
        unknown = set(eval_cfg.metrics) - set(KNOWN_METRICS)
        if unknown:
            raise LadmError(f"unknown metric(s) {sorted(unknown)} in eval.metrics: choose from {list(KNOWN_METRICS)}")
        if eval_cfg.on_missing not in ("error", "skip"):
            raise LadmError(f"eval.on_missing must be 'error' or 'skip', got '{eval_cfg.on_missing}'")
        problems = metric_problems(eval_cfg)
        if problems and eval_cfg.get("fetch", True) and online():
            problems = fetch_missing(eval_cfg, problems)
        if problems:
            listed = "; ".join(f"{metric}: {problem}" for metric, problem in problems.items())
            if eval_cfg.on_missing == "error":
                raise LadmError(f"metric models missing ({listed}): {where_to_copy(eval_cfg)}; "
                                f"or set eval.on_missing=skip to record {' and '.join(problems)} as null")
            log.warning("metrics skipped (%s): %s", listed, where_to_copy(eval_cfg))
        scorer = cls(eval_cfg, skipped=dict(problems))
        if "spbleu" in eval_cfg.metrics:
            path = spm_model_path()
            scorer.spm_status = ("missing" if not path.is_file() else
                                 "unofficial" if "spbleu" in problems else "official")
        if "comet" in eval_cfg.metrics and "comet" not in problems:
            scorer.comet_ckpt = comet_checkpoint(eval_cfg.comet.model)
        return scorer

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
