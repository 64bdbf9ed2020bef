"""chrF++, spBLEU and COMET (METHODS.md §5), with honest handling of missing models.

spBLEU is sacrebleu BLEU with `tokenize="flores200"` *and* the official FLORES-200
SentencePiece model. A score computed with any other SentencePiece model is reported as
`bleu_spm_unofficial`, never as `spbleu`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import signal
import subprocess
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from sacrebleu.metrics import BLEU, CHRF

from ladm import REPO_ROOT, LadmError

log = logging.getLogger(__name__)

OFFICIAL_SPM_SHA256 = "14bb8dfb35c0ffdea7bc01e56cea38b9e3d5efcdcb9c251d6b40538e1aab555a"
OFFICIAL_SPM_BYTES = 4_852_054
KNOWN_METRICS = ("chrf++", "spbleu", "comet")


def validation_mean(key: str, validation: dict | None) -> float | None:
    """`key` = `validation/<metric>`: the mean over pairs of that metric in `validation` ({pair: {metric: value}});
    None when a pair lacks it or it is not a finite number."""
    metric = key.split("/", 1)[1]
    scores = [by_pair.get(metric) for by_pair in (validation or {}).values()]
    if not scores or any(not isinstance(s, (int, float)) or not math.isfinite(s) for s in scores):
        return None
    return sum(scores) / len(scores)


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


def spm_loads(path: Path) -> bool:
    """Whether SentencePiece can load `path` (a file that is not the official model may still be one)."""
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError):
        return False
    return True


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
    """unbabel-comet can score in this process: installed, with the transformers < 5 its releases need (2.2.7
    imports under transformers 5 but fails when it loads a checkpoint)."""
    import transformers

    return importlib.util.find_spec("comet") is not None and int(transformers.__version__.split(".")[0]) < 5


WORKER = Path(__file__).with_name("comet_worker.py")


def comet_python(eval_cfg: DictConfig) -> str | None:
    """The Python whose environment scores COMET through the worker, or None to score in this process.
    `eval.comet.python` when set; else this process when unbabel-comet imports here; else `$LADM_COMET_PYTHON`;
    else the checkout's `.venv-comet` (built by `make install`) if it exists; else None."""
    given = eval_cfg.comet.get("python")
    if given:
        return str(Path(given).expanduser())
    if comet_installed():
        return None
    found = os.environ.get("LADM_COMET_PYTHON") or str(REPO_ROOT / ".venv-comet" / "bin" / "python")
    return found if Path(found).is_file() else None


def run_bounded(command: list[str], timeout: float) -> subprocess.CompletedProcess:
    """`command` in a process group of its own, its output in temporary files (a child cannot block on a full pipe);
    past `timeout` seconds, or when this process is interrupted, the whole group is killed (TimeoutExpired)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(command, code, out.read().decode(errors="replace"),
                                           err.read().decode(errors="replace"))


@functools.lru_cache(maxsize=8)
def worker_problem(python: str, timeout: float) -> str | None:
    """Why the COMET environment at `python` cannot score (not runnable, unbabel-comet does not import there, or
    the import does not finish within `timeout` seconds: `eval.comet.check_timeout`)."""
    log.info("checking the COMET environment: `import comet` in %s (at most %g s)", python, timeout)
    try:
        check = run_bounded([python, "-c", "import comet"], timeout)
    except subprocess.TimeoutExpired:
        return (f"`import comet` in {python} did not finish within eval.comet.check_timeout={timeout:g} s (a hung "
                "environment, or a very slow file system): check that environment, or raise eval.comet.check_timeout")
    except OSError as err:
        return f"the COMET environment's Python {python} cannot run ({type(err).__name__}: {err})"
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["?"])[-1]
        return f"unbabel-comet does not import in {python} ({last}): rebuild it with `make install`"
    return None


def worker_timeout(eval_cfg: DictConfig, n_segments: int) -> float:
    """`eval.comet.timeout` in seconds; `auto`: 10 minutes to load the checkpoint plus 2 s per segment (COMET-22
    on a CPU scores about one segment a second)."""
    given = eval_cfg.comet.get("timeout", "auto")
    return 600 + 2 * n_segments if given == "auto" else float(given)


def comet_problem(eval_cfg: DictConfig) -> str | None:
    """Why COMET cannot be scored here: no environment with unbabel-comet, or its checkpoint, or its encoder's
    tokenizer/config, is not here (offline)."""
    name = eval_cfg.comet.model
    python = comet_python(eval_cfg)
    if python is None and not comet_installed():
        return ("unbabel-comet is not installed here and no COMET environment was found (its last release needs "
                "transformers<5 and numpy<2): `make install` builds .venv-comet beside .venv; elsewhere set "
                "eval.comet.python (or LADM_COMET_PYTHON) to the Python of an environment with unbabel-comet 2.2")
    # the files first (a look on disk), then the environment (starting a Python: seconds, once per process)
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
    return worker_problem(python, float(eval_cfg.comet.get("check_timeout", 120))) if python is not None else None


def fetch_comet(eval_cfg: DictConfig) -> None:
    """COMET's own `download_model` (the checkpoint; in the COMET environment when that is another one), then its
    encoder's tokenizer and config."""
    name, python = eval_cfg.comet.model, comet_python(eval_cfg)
    if python is None:
        from comet import download_model

        folder = download_model(name)
    else:
        code = "import sys; from comet import download_model; print(download_model(sys.argv[1]))"
        fetched = subprocess.run([python, "-c", code, name], capture_output=True, text=True, check=True)
        folder = fetched.stdout.strip().splitlines()[-1]
    encoder = comet_encoder(Path(folder))
    if encoder is not None:
        load_encoder_files(encoder, local_files_only=False)


def online() -> bool:
    """False when the Hugging Face offline switch is set (then nothing is downloaded)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().upper() not in ("1", "ON", "YES", "TRUE")


def metric_problems(eval_cfg: DictConfig) -> dict[str, str]:
    """Per requested metric that needs a model (spbleu, comet), why it cannot be computed right now."""
    problems = {"spbleu": spm_problem() if "spbleu" in eval_cfg.metrics else None,
                "comet": comet_problem(eval_cfg) if "comet" in eval_cfg.metrics else None}
    return {metric: problem for metric, problem in problems.items() if problem}


def fetch_missing(eval_cfg: DictConfig, problems: dict[str, str]) -> dict[str, str]:
    """Let sacrebleu and COMET download what `problems` names; returns what is still missing afterwards
    (with the download error, if one happened)."""
    fetchers = {"spbleu": fetch_spm, "comet": lambda: fetch_comet(eval_cfg)}
    errors = {}
    for metric in problems:
        if metric == "comet" and not comet_installed() and comet_python(eval_cfg) is None:
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
    comet_python: str | None = None  # the COMET environment's worker; None: in this process
    skipped: dict[str, str] = field(default_factory=dict)
    comet_loads: int = 0  # checkpoint loads (in this process: once; through the worker: once per call)
    comet_segments: dict[str, list[float]] = field(default_factory=dict)  # the last call's segment scores per pair
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
            if scorer.spm_status == "unofficial" and not spm_loads(path):
                log.warning("%s is not a SentencePiece model either: BLEU is not computed with it (spbleu null)", path)
                scorer.spm_status = "unreadable"
        if "comet" in eval_cfg.metrics and "comet" not in problems:
            scorer.comet_ckpt = comet_checkpoint(eval_cfg.comet.model)
            scorer.comet_python = comet_python(eval_cfg)
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
        """COMET system score (the mean of its segment scores) of every pair, all pairs in one `predict` call (in
        this process, the model loaded once per process; or through the COMET environment's worker, one load per
        call); null when the checkpoint is missing (`eval.on_missing=skip`). The segment scores of each pair are
        kept in `comet_segments`."""
        if self.comet_ckpt is None:
            return {pair: None for pair in triples}
        samples, owners = [], []
        for pair, (sources, hypotheses, references) in triples.items():
            samples += [{"src": s, "mt": h, "ref": r} for s, h, r in zip(sources, hypotheses, references, strict=True)]
            owners += [pair] * len(sources)
        scores = self._segment_scores(samples)
        self.comet_segments = {pair: [] for pair in triples}
        for pair, score in zip(owners, scores, strict=True):
            self.comet_segments[pair].append(score)
        return {pair: sum(values) / len(values) for pair, values in self.comet_segments.items()}

    def _segment_scores(self, samples: list[dict[str, str]]) -> list[float]:
        batch_size = self.eval_cfg.comet.batch_size
        if self.comet_python is None:
            if self._comet_model is None:
                from comet import load_from_checkpoint

                self._comet_model = load_from_checkpoint(str(self.comet_ckpt), local_files_only=True)
                self.comet_loads += 1
            output = self._comet_model.predict(samples, batch_size=batch_size, num_workers=0, progress_bar=True,
                                               gpus=1 if torch.cuda.is_available() else 0)
            return [float(score) for score in output.scores]
        with tempfile.TemporaryDirectory(prefix="ladm-comet-") as folder:
            request, response = Path(folder) / "request.json", Path(folder) / "response.json"
            request.write_text(json.dumps({"checkpoint": str(self.comet_ckpt), "batch_size": batch_size,
                                           "device": self.eval_cfg.comet.get("device", "auto"), "samples": samples}),
                               encoding="utf-8")
            self.comet_loads += 1
            timeout = worker_timeout(self.eval_cfg, len(samples))
            try:
                done = run_bounded([self.comet_python, str(WORKER), str(request), str(response)], timeout)
            except subprocess.TimeoutExpired as err:
                raise LadmError(f"the COMET worker ({self.comet_python}) did not finish scoring {len(samples)} "
                                f"segments within eval.comet.timeout={timeout:g} s and was stopped: the adapter and "
                                "hypotheses are saved, so the same command scores them again without training; raise "
                                "eval.comet.timeout or check that environment") from err
            if done.returncode != 0 or not response.is_file():
                last = "\n".join(done.stderr.strip().splitlines()[-5:])
                raise LadmError(f"the COMET worker ({self.comet_python}) failed with exit code {done.returncode}: "
                                f"{last}")
            scores = json.loads(response.read_text(encoding="utf-8"))["scores"]
        if len(scores) != len(samples):
            raise LadmError(f"the COMET worker returned {len(scores)} scores for {len(samples)} samples")
        return [float(score) for score in scores]


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


CLD2_CODES = {"zh-Hant": "zh"}  # CLD2's codes that differ from ours (the rest are the same ISO 639-1 codes)


def identified_language(text: str) -> str:
    """The language CLD2 (pycld2; its model ships inside the package) identifies `text` as, in our codes;
    'un' when it cannot tell."""
    import pycld2

    try:
        _, _, details = pycld2.detect(text)
    except pycld2.error:  # invalid UTF-8 (e.g. lone surrogates): not identifiable
        return "un"
    code = details[0][1]
    return CLD2_CODES.get(code, code)


def target_language_rate(hypotheses: list[str], target: str) -> float | None:
    """The share of hypotheses CLD2 identifies as the target language (its top language; what it cannot identify,
    e.g. an empty or digits-only hypothesis, is off-target). Unlike the script ratio it tells id from ms and covers
    Latin-script targets. Measured on the FLORES-200 devtest references (README, Metrics): 100% for en, km, lo, my,
    th, vi, 97% zh, 91% id and 87% ms (id/ms are CLD2's one confusion). None when pycld2 is not installed."""
    try:
        import pycld2  # noqa: F401
    except ImportError:
        return None
    return sum(identified_language(text) == target for text in hypotheses) / len(hypotheses) if hypotheses else 0.0
