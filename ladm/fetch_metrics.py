"""`ladm-fetch-metrics`: download every model the metrics need, on a machine with network access.

    ladm-fetch-metrics                                   # spBLEU model + Unbabel/wmt22-comet-da (+ xlm-roberta-large)
    ladm-fetch-metrics eval.comet.model=Unbabel/XCOMET-XL

sacrebleu and COMET download with their own code into their own caches ($SACREBLEU, $HF_HOME); copy those
folders to an offline cluster. Exit 0 when everything is in place, 1 when a download failed, 2 on bad input.
"""

from __future__ import annotations

import sys

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from ladm import CONFIG_DIR, LadmError
from ladm.metrics import asset_folders, comet_checkpoint, fetch_missing, metric_problems, online, spm_model_path
from ladm.schema import validate_eval


def main(argv: list[str] | None = None) -> None:
    overrides = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in overrides):
        print(__doc__)
        return
    bad = [a for a in overrides if not a.startswith("eval.") or "=" not in a]
    if bad:
        print(f"ladm-fetch-metrics: error: {bad[0]!r} is not an eval.<key>=<value> override "
              "(e.g. eval.comet.model=Unbabel/wmt22-comet-da)", file=sys.stderr)
        sys.exit(2)
    defaults = OmegaConf.create({"eval": OmegaConf.load(CONFIG_DIR / "eval" / "default.yaml")})
    OmegaConf.set_struct(defaults, True)
    try:
        cfg = OmegaConf.merge(defaults, OmegaConf.from_dotlist(overrides)).eval
        validate_eval(cfg)
    except ConfigKeyError as err:
        print(f"ladm-fetch-metrics: error: {err.full_key} is not an eval key: see conf/eval/default.yaml", file=sys.stderr)
        sys.exit(2)
    except LadmError as err:
        print(f"ladm-fetch-metrics: error: {err}", file=sys.stderr)
        sys.exit(2)
    problems = metric_problems(cfg)
    if problems and not online():
        print("ladm-fetch-metrics: error: HF_HUB_OFFLINE is set, nothing can be downloaded: unset it on a machine "
              "with network access", file=sys.stderr)
        sys.exit(2)
    problems = fetch_missing(cfg, problems) if problems else {}
    if problems:
        for metric, problem in problems.items():
            print(f"ladm-fetch-metrics: {metric}: {problem}", file=sys.stderr)
        sys.exit(1)
    if "spbleu" in cfg.metrics:
        print(f"spbleu: official FLORES-200 SentencePiece model at {spm_model_path()}")
    if "comet" in cfg.metrics:
        print(f"comet: {cfg.comet.model} at {comet_checkpoint(cfg.comet.model)}")
    print(f"For an offline machine, copy {asset_folders()} to the same places there.")


if __name__ == "__main__":
    main()
