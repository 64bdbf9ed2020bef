"""Hydra entry points that report user errors (`LadmError`) as one line with exit code 2."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ladm import CONFIG_DIR, LadmError
from ladm.checkpoint import hold_run_folder, release_run_folder
from ladm.distributed import run_stamp
from ladm.files import write_json_atomic, write_text_atomic
from ladm.metrics import validation_mean
from ladm.schema import is_component
from ladm.trainer import Preempted

log = logging.getLogger("ladm")


def config_dirs(argv: list[str]) -> list[Path] | None:
    """ladm's conf/ and the user's config folders on Hydra's search path (`--config-dir`/`-cd`, and `file://`
    entries of `hydra.searchpath=[...]`); None when the path holds a `pkg://` entry this check cannot list."""
    dirs = [CONFIG_DIR]
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(Path(argv[i + 1]))
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.split("=", 1)[1]))
        elif arg.lstrip("+").startswith("hydra.searchpath="):
            for entry in arg.split("=", 1)[1].strip("[]").split(","):
                entry = entry.strip().strip("'\"")
                if entry.startswith("pkg://"):
                    return None
                if entry:
                    dirs.append(Path(entry.removeprefix("file://")))
    return [d.expanduser() for d in dirs]


PLUGINS = {"hparams_search": ("hydra_plugins.hydra_optuna_sweeper", "Hydra's Optuna sweeper", "optuna"),
           "hydra/launcher": ("hydra_plugins.hydra_submitit_launcher", "Hydra's submitit launcher", "slurm")}


def check_plugins(overrides: list[str]) -> None:
    """A search or a SLURM launch asked for without its Hydra plugin installed is one line naming the extra."""
    import importlib.util

    for arg in overrides:
        group, _, value = arg.lstrip("+").partition("=")
        if group in PLUGINS and value and value != "null" and (group != "hydra/launcher" or value == "slurm"):
            module, what, extra = PLUGINS[group]
            if importlib.util.find_spec(module) is None:
                raise LadmError(f"{group}={value} needs {what}, which is not installed: pip install 'ladm[{extra}]' "
                                "(make install has it)")


def group_options(dirs: list[Path] | None) -> dict[str, set[str]]:
    """Each config group's options (file stems) in `dirs`; empty when the search path cannot be listed."""
    groups: dict[str, set[str]] = {}
    for folder in dirs or []:
        for group in (p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else ():
            groups.setdefault(group.name, set()).update(f.stem for f in group.glob("*.yaml"))
    return groups


def _parsed(overrides: list[str]) -> list | None:
    """Hydra's parse of the `key=value` arguments; None when Hydra should report malformed ones itself."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides([a for a in overrides if "=" in a and not a.startswith("-")])
    except Exception:  # noqa: BLE001 - let Hydra report malformed overrides itself
        return None


def check_group_choices(overrides: list[str]) -> None:
    """Name an unknown config-group option (model=, pair=, method=, ...) in one line, listing valid ones (ladm's
    and those in the user's config folders on the search path); refuse a `name=` that is not a plain folder name
    before Hydra creates its folder."""
    dirs = config_dirs(overrides)
    groups = group_options(dirs)
    parsed = _parsed(overrides)
    if parsed is None:
        return
    for override in parsed:
        if override.key_or_group.lstrip("+") == "name" and not override.is_delete():
            names = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
            for name in names:  # before Hydra makes the run folder outputs/<name>/...
                if not isinstance(name, str) or not is_component(name):
                    raise LadmError(f"name must be a name without '/', '\\' or '..' (it becomes a folder name), "
                                    f"got {name!r}")
        group = override.key_or_group.lstrip("+")
        if dirs is None or group not in groups or override.is_delete() or group == "hydra":
            continue
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        for value in values:
            if str(value) not in groups[group]:
                extra = f" (or add {group}/{value}.yaml to a folder given by --config-dir)" if group == "model" else ""
                raise LadmError(f"unknown {group} '{value}': choose one of {', '.join(sorted(groups[group]))}{extra}")


def check_user_configs(argv: list[str]) -> None:
    """Every YAML file in the user's config folders (`--config-dir`, `hydra.searchpath`) parses, and each one in a
    group folder is a mapping: a broken file or a list where a group option goes is one line naming the file."""
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    for folder in [d for d in config_dirs(argv) or [] if d != CONFIG_DIR]:
        for path in sorted(folder.rglob("*.yaml")) if folder.is_dir() else ():
            try:
                node = OmegaConf.load(path)
            except (YAMLError, OmegaConfBaseException, UnicodeDecodeError) as err:
                where = getattr(err, "problem_mark", None)
                at = f" at line {where.line + 1}" if where is not None else ""
                reason = getattr(err, "problem", None) or str(err).splitlines()[0]
                raise LadmError(f"{path} is not valid YAML ({reason}{at}): fix that file in your config folder") \
                    from err
            if not isinstance(node, DictConfig):
                raise LadmError(f"{path} holds a {type(node).__name__.removesuffix('Config').lower()}, not a mapping of "
                                "keys: a config file is `key: value` lines (see conf/ for examples)")


SEARCH_GROUPS = ("hparams_search", "hydra/sweeper")


def check_search_space(config_name: str, overrides: list[str]) -> None:
    """A search (`hparams_search=...`): every parameter of `hydra.sweeper.params` and of the command line checked
    before Optuna starts, one line naming it: intervals with low < high (> 0 on a log scale), non-empty choices of
    known presets, values the schema allows; `hydra.sweeper.n_trials` ≥ 1."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    from ladm.schema import rule_for

    parsed = _parsed(overrides)
    if parsed is None or not any(o.key_or_group.lstrip("+") in SEARCH_GROUPS for o in parsed):
        return
    dirs = config_dirs(overrides)
    given = [d for d in dirs or [] if d != CONFIG_DIR]  # --config-dir folders (or hydra.searchpath's, given already)
    plain = [o.input_line for o in parsed if not o.is_sweep_override()]
    if given and not any(o.key_or_group.lstrip("+") == "hydra.searchpath" for o in parsed):
        plain.append(f"hydra.searchpath=[{','.join(f'file://{d.resolve()}' for d in given)}]")  # --config-dir
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name, overrides=plain, return_hydra_config=True)
    except Exception:  # noqa: BLE001 - Hydra reports a config that does not compose itself
        return
    sweeper = cfg.hydra.sweeper
    n_trials = sweeper.get("n_trials")
    if n_trials is not None and (isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1):
        raise LadmError(f"hydra.sweeper.n_trials must be a positive integer, got {n_trials!r}")
    params = {str(k): str(v) for k, v in (sweeper.get("params") or {}).items()}
    params |= {o.key_or_group: o.input_line.split("=", 1)[1] for o in parsed if o.is_sweep_override()}
    groups = group_options(dirs)
    parser = OverridesParser.create()
    for key, text in params.items():
        where = f"hydra.sweeper.params.{key}: {text}"
        try:
            sweep = parser.parse_override(f"{key}={text}").value()
        except Exception as err:  # noqa: BLE001 - Hydra's grammar error, first line
            raise LadmError(f"{where} is not a search space ({str(err).splitlines()[0]}): use choice(...), "
                            "interval(low, high) or tag(log, interval(low, high))") from err
        if isinstance(sweep, IntervalSweep):
            values = [sweep.start, sweep.end]
            if not sweep.start < sweep.end:
                raise LadmError(f"{where} is empty or reversed: give interval(low, high) with low < high")
            if "log" in sweep.tags and sweep.start <= 0:
                raise LadmError(f"{where}: a log-scale interval needs low > 0")
        elif isinstance(sweep, RangeSweep):
            values = list(parser.parse_override(f"{key}={text}").sweep_iterator())
            if not values:
                raise LadmError(f"{where} is empty: give range(start, stop) with start < stop")
        elif isinstance(sweep, ChoiceSweep):
            values = list(sweep.list)
            if not values:
                raise LadmError(f"{where} is empty: give at least one choice")
        else:
            continue
        if key in groups:
            unknown = [str(v) for v in values if str(v) not in groups[key]]
            if unknown:
                raise LadmError(f"{where}: unknown {key} '{unknown[0]}': choose among {', '.join(sorted(groups[key]))}")
        elif (rule := rule_for(key)) is not None:
            bad = [v for v in values if not rule.ok(v)]
            if bad:
                raise LadmError(f"{where}: {key} must {rule.allowed()}, and {bad[0]!r} is not")


def save_hydra_files(cfg: DictConfig, hydra_cfg: DictConfig, out_dir: Path) -> None:
    """What Hydra writes into a job's `.hydra/` (config, hydra config, overrides), written by ladm once the job holds
    its folder's lock (conf/hydra/default.yaml turns Hydra's own writing off)."""
    folder = out_dir / ".hydra"
    write_text_atomic(folder / "config.yaml", OmegaConf.to_yaml(cfg))
    write_text_atomic(folder / "hydra.yaml", OmegaConf.to_yaml({"hydra": hydra_cfg}))
    write_text_atomic(folder / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.overrides.task))


def _fail(prog: str, err: LadmError) -> None:
    print(f"{prog}: error: {err}", file=sys.stderr)
    sys.exit(2)


def objective_value(objective: str | None, results: object) -> float | None:
    """What a sweeper (Optuna) optimises: `objective` = `validation/<metric>`, the mean over the job's pairs; None
    for a failed job or a missing score (a NaN would make the sweeper abort the whole study)."""
    if objective is None:
        return None
    return validation_mean(objective, results.get("validation") if isinstance(results, dict) else None)


def stop_a_search_that_failed_throughout(prog: str, hydra_cfg: DictConfig, sweep: dict[str, list[Path]]) -> None:
    """When the last trial of a search (`hydra.sweeper.n_trials`) that ran in this process has failed like every
    other, exit 1 with the closing line here: Optuna would end in a "No trials are completed yet" traceback."""
    n_trials = OmegaConf.select(hydra_cfg, "sweeper.n_trials")
    if isinstance(n_trials, int) and len(sweep["jobs"]) == len(sweep["failed"]) == n_trials:
        print(f"{prog}: all {n_trials} trials of the search failed, so there is no best one: see the results.json of "
              f"{', '.join(p.name for p in sweep['failed'])} in {sweep['failed'][0].parent} (`ladm-report` lists them)",
              file=sys.stderr)
        sys.exit(1)


def cli_main(prog: str, config_name: str, task: Callable[[DictConfig, Path], object],
             prepare_argv: Callable[[list[str]], list[str]] | None = None) -> Callable[[], None]:
    """`main()` for a console script: validate group names, compose `conf/<config_name>`, run `task`; the job
    returns `objective_value` to the sweeper. A sweep whose jobs ran in this process (Hydra's basic launcher, the
    Optuna sweeper) exits 1 after all of them ran when any failed, with one closing line. `prepare_argv` may rewrite
    the command line first (ladm-eval expands globs and path files of run folders)."""
    sweep: dict[str, list[Path]] = {"jobs": [], "failed": []}

    @hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")
    def hydra_main(cfg: DictConfig) -> float | None:
        hydra_cfg = HydraConfig.get()
        out_dir = Path(hydra_cfg.runtime.output_dir)
        objective = cfg.get("objective")
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        if multirun:
            sweep["jobs"].append(out_dir)
        if int(os.environ.get("RANK", "0")) == 0:
            try:  # before anything is written: a refused run (folder in use, a link leaving it) changes nothing there
                hold_run_folder(out_dir)
            except LadmError as err:
                if not multirun:
                    _fail(prog, err)
                print(f"{prog}: job {out_dir.name} not run: {err}", file=sys.stderr)
                sweep["failed"].append(out_dir)
                stop_a_search_that_failed_throughout(prog, hydra_cfg, sweep)
                return objective_value(objective, None)
        try:
            if int(os.environ.get("RANK", "0")) == 0:
                save_hydra_files(cfg, hydra_cfg, out_dir)  # a full disk here is the job's one-line failure
            return objective_value(objective, task(cfg, out_dir))
        except Exception as err:
            if hydra_cfg.mode != RunMode.MULTIRUN:
                if isinstance(err, LadmError):
                    _fail(prog, err)
                raise
            # In a sweep one failed job must not stop the others: record it and go on.
            log.error("job %s failed: %s", out_dir.name, err)
            sweep["failed"].append(out_dir)
            record = out_dir / "results.json"
            failed_before = record.is_file() and '"status": "failed"' in record.read_text(encoding="utf-8")
            if int(os.environ.get("RANK", "0")) == 0 and not failed_before:  # keep the fuller record the run wrote
                try:
                    write_json_atomic(out_dir / "results.json", {
                        "status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(),
                        "config": OmegaConf.to_container(cfg, resolve=False)})
                except OSError as write_err:  # e.g. the disk is full: the sweep still goes on
                    log.error("could not record the failure of %s: %s", out_dir.name, write_err)
            stop_a_search_that_failed_throughout(prog, hydra_cfg, sweep)
            return objective_value(objective, None)
        finally:
            release_run_folder(out_dir)

    def main() -> None:
        # One time stamp for the whole launch: every job of a sweep without `name=` shares one `adhoc-<time>` name
        # (submitit's jobs inherit the environment), whatever hydra.sweep.dir is.
        os.environ.setdefault("LADM_RUN_STAMP", run_stamp())
        try:
            if prepare_argv is not None:
                sys.argv[1:] = prepare_argv(sys.argv[1:])
            check_plugins(sys.argv[1:])
            check_user_configs(sys.argv[1:])
            check_group_choices(sys.argv[1:])
            check_search_space(config_name, sys.argv[1:])
        except LadmError as err:
            _fail(prog, err)
        try:
            hydra_main()
        except Preempted as stop:
            print(f"{prog}: {stop}; run the same command again to resume", file=sys.stderr)
            sys.exit(128 + stop.signum)
        if sweep["failed"]:
            folders = sorted({str(path.parent) for path in sweep["failed"]})
            print(f"{prog}: {len(sweep['failed'])} of {len(sweep['jobs'])} jobs failed: see the results.json of "
                  f"{', '.join(p.name for p in sweep['failed'])} in {', '.join(folders)} (`ladm-report` lists them)",
                  file=sys.stderr)
            sys.exit(1)

    return main
