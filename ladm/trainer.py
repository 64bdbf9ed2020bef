"""The training loop: AdamW, a transformers schedule, accumulation, clipping, DDP-ready."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm
from transformers import get_scheduler, set_seed

from ladm import LadmError
from ladm.checkpoint import all_finite, rng_state, save_checkpoint, set_rng_state, trained_parameters
from ladm.data import IGNORE_INDEX, Example, collate
from ladm.distributed import DistEnv
from ladm.files import write_failure, write_lines_atomic
from ladm.losses import answer_loss
from ladm.metrics import validation_mean
from ladm.tracking import Tracker

log = logging.getLogger(__name__)


OPTIMIZERS = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on a bf16-capable GPU under `auto`; plain fp32 elsewhere."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _batches(loader: DataLoader, sampler: DistributedSampler, consumed: int = 0) -> Iterator[dict]:
    """Endless batches, one reshuffled epoch after another, starting after `consumed` batches."""
    epoch, skip = divmod(consumed, len(loader))
    while True:
        sampler.set_epoch(epoch)
        yield from itertools.islice(loader, skip, None)
        epoch, skip = epoch + 1, 0


def learning_rates(base_lr: float, group_base_lrs: list[float], current: list[float], optimizer) -> dict[str, float]:
    """`train/lr`: the configured lr under the schedule; with several parameter groups (LaDM's per-layer
    rates), each group's own rate as `train/lr/<group name>`."""
    rates = {"train/lr": base_lr * current[0] / group_base_lrs[0] if group_base_lrs[0] else base_lr}
    if len(current) > 1:
        rates |= {f"train/lr/{group.get('name', i)}": lr for i, (group, lr) in enumerate(zip(optimizer.param_groups, current,
                                                                                             strict=True))}
    return rates


class Selection:
    """`train.select_on`: the best validation score so far, the step and a copy of the trained tensors that gave
    it, and `train.early_stop_patience` (stop after that many evaluations without a better score; 0: never).
    Its state travels in every checkpoint, so a resumed run chooses exactly as an uninterrupted one."""

    def __init__(self, select_on: str, patience: int):
        self.select_on, self.patience = select_on, patience
        self.step: int | None = None
        self.score: float | None = None
        self.validation: dict | None = None  # the chosen step's validation scores, every metric, per pair
        self.weights: dict[str, torch.Tensor] | None = None
        self.history: list[list] = []  # [step, score] of every evaluation
        self.without_gain = 0

    def update(self, step: int, validation: dict | None, trained: dict[str, torch.nn.Parameter]) -> bool:
        """Record the evaluation at `step` ({pair: {metric: value}}); True when patience has run out."""
        score = validation_mean(self.select_on, validation)
        self.history.append([step, score])
        if score is not None and (self.score is None or score > self.score):
            self.step, self.score, self.validation, self.without_gain = step, score, validation, 0
            self.weights = {name: p.detach().cpu().clone() for name, p in trained.items()}
        else:
            self.without_gain += 1
        return 0 < self.patience <= self.without_gain

    def state(self) -> dict:
        return {"step": self.step, "score": self.score, "validation": self.validation, "weights": self.weights,
                "history": self.history, "without_gain": self.without_gain}

    def load(self, state: dict) -> None:
        self.step, self.score, self.validation = state["step"], state["score"], state["validation"]
        self.weights, self.history, self.without_gain = state["weights"], state["history"], state["without_gain"]

    def summary(self, last_step: int, stopped_early: bool) -> dict:
        """What results.json records (`train.selection`)."""
        return {"select_on": self.select_on, "chosen_step": self.step, "score": self.score, "last_step": last_step,
                "stopped_early": stopped_early, "patience": self.patience, "history": self.history}


GRAD_SPIKE = 1e3       # a pre-clipping gradient norm this many times the median of the (up to 50) steps before it
STALLED_STEPS = 3      # this many consecutive steps with a zero gradient: nothing trains any more
LOSS_RISE = 1.5        # the last quarter's mean loss this many times the first quarter's


def divergence(losses: list[float], grad_norms: list[float]) -> str | None:
    """Why a run's training went wrong, or None: a gradient norm that explodes (GRAD_SPIKE × the median before
    it), a gradient that stays exactly zero (the weights are dead, e.g. after `train.lr=1e6`), or a loss that
    rises (the last quarter's mean LOSS_RISE × the first quarter's; runs of 8 steps or more)."""
    found = []
    for step in range(2, len(grad_norms)):
        before = statistics.median(grad_norms[max(0, step - 50):step])
        if before > 0 and grad_norms[step] > GRAD_SPIKE * before:
            found.append(f"the gradient norm jumped to {grad_norms[step]:.3g} at step {step + 1} (median {before:.3g} "
                         "before)")
            break
    for step in range(1, len(grad_norms) - STALLED_STEPS + 1):
        if all(norm == 0 for norm in grad_norms[step:step + STALLED_STEPS]):
            found.append(f"the gradient is zero from step {step + 1} on (loss {losses[step]:.4g}: the weights stopped "
                         "learning)")
            break
    quarter = len(losses) // 4
    if len(losses) >= 8 and (first := sum(losses[:quarter]) / quarter) > 0 \
            and (last := sum(losses[-quarter:]) / quarter) > LOSS_RISE * first:
        found.append(f"the loss rose from {first:.3g} (first quarter) to {last:.3g} (last quarter)")
    return "; ".join(found) or None


class TrainingHooks(Protocol):
    """What the training loop asks of a method (`ladm.methods.Method` provides all of it); declared here so
    the trainer, a foundation module, does not import the method layer above it."""

    find_unused_parameters: bool

    def param_groups(self, model: torch.nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]: ...
    def select_adapters(self, model: torch.nn.Module, pair: str) -> None: ...
    def after_backward(self, model: torch.nn.Module) -> None: ...
    def grad_norm_groups(self, model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]: ...
    def on_step(self, model: torch.nn.Module, step: int, optimizer: torch.optim.Optimizer, scheduler,
                last: bool) -> dict[str, float]: ...
    def trainer_state(self) -> dict[str, Any]: ...
    def load_trainer_state(self, state: dict[str, Any]) -> None: ...


def fit(
    model: torch.nn.Module,
    method: TrainingHooks,
    examples: dict[str, list[Example]],
    pad_token_id: int,
    train_cfg: DictConfig,
    dist: DistEnv,
    tracker: Tracker,
    out_dir: Path,
    resume: dict | None = None,
    on_eval: Callable[[int], float | None] | None = None,
    identity: dict | None = None,
) -> dict:
    """Train `model` for `train.max_steps` optimizer steps per pair; returns losses, budget and timings.

    `examples` maps each pair to its examples; a run takes n_pairs × `train.max_steps` optimizer steps
    (METHODS.md §5, training budget), step s training pair (s − 1) mod n (round robin), so every batch, on
    every rank, holds one pair and every pair gets the same number of batches as a single-pair run. Warm-up,
    schedule and the `*_every` settings count the run's optimizer steps. The loss is the mean over all
    target tokens of the global batch (every rank, every accumulation micro-step), so N ranks
    with batch b equal one rank with batch N·b.
    With `resume` (a checkpoint's state), weights, optimizer, scheduler, RNG and data position are
    restored and training continues exactly where the checkpoint was taken. On SIGTERM or SIGUSR1
    (and SIGUSR2 under submitit) a checkpoint is written at the next step boundary, then `Preempted`.
    `on_eval(step)` scores the validation slice every `train.eval_every` steps (it returns {pair: {metric:
    value}}); with `train.select_on` the last step is scored too, the best-scoring weights are
    restored at the end and `train.early_stop_patience` may end training early (`Selection`).
    """
    set_seed(train_cfg.seed)
    device = dist.device
    pairs = list(examples)
    loaders = {}
    for pair, pair_examples in examples.items():
        if train_cfg.group_by_length:
            sampler = GroupedBatches([len(e.input_ids) for e in pair_examples], train_cfg.batch_size,
                                     dist.world_size, dist.rank, train_cfg.seed)
            loader = DataLoader(pair_examples, batch_sampler=sampler, collate_fn=lambda b: collate(b, pad_token_id))
        else:
            sampler = DistributedSampler(pair_examples, num_replicas=dist.world_size, rank=dist.rank,
                                         shuffle=True, seed=train_cfg.seed, drop_last=True)
            # Its own generator: starting an epoch must not draw from the global RNG (exact resume).
            loader = DataLoader(pair_examples, batch_size=train_cfg.batch_size, sampler=sampler, drop_last=True,
                                collate_fn=lambda b: collate(b, pad_token_id),
                                generator=torch.Generator().manual_seed(train_cfg.seed))
        if len(loader) == 0:
            raise LadmError(f"{len(pair_examples)} training sentences of {pair} cannot fill one batch of "
                            f"train.batch_size={train_cfg.batch_size} on {dist.world_size} rank(s)")
        loaders[pair] = (loader, sampler)

    total_steps = train_cfg.max_steps * len(pairs)
    optimizer = OPTIMIZERS[train_cfg.optimizer](method.param_groups(model, train_cfg.lr, train_cfg.weight_decay),
                                                lr=train_cfg.lr)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    scheduler = get_scheduler(train_cfg.scheduler, optimizer,
                              num_warmup_steps=math.ceil(train_cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    ddp = None
    if dist.world_size > 1:
        ddp = DistributedDataParallel(model, device_ids=[dist.local_rank] if device.type == "cuda" else None,
                                      find_unused_parameters=method.find_unused_parameters)
    forward_model = ddp or model
    amp = autocast_dtype(train_cfg.precision, device)

    trained = trained_parameters(model, optimizer)
    first_step, losses, grad_norms, seconds_before, finished = 1, [], [], 0.0, False
    selection = Selection(train_cfg.select_on, train_cfg.early_stop_patience) if train_cfg.select_on else None
    seen = dict.fromkeys(pairs, 0)  # training examples consumed per pair, over every rank
    base_lrs = [group["lr"] for group in optimizer.param_groups]  # before the schedule scales them
    if resume is not None:
        if "examples_seen" not in resume:
            raise LadmError("the checkpoint was written by an older ladm (steps then counted all pairs together): start "
                            "over with train.resume=never")
        if set(resume["trainable"]) != set(trained):
            raise LadmError("the checkpoint's trained tensors do not match this method's: start over with "
                            "train.resume=never")
        with torch.no_grad():
            for name, tensor in resume["trainable"].items():
                trained[name].copy_(tensor)
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        set_rng_state(resume["rng"][dist.rank])
        first_step, losses, seen = resume["step"] + 1, resume["losses"], resume["examples_seen"]
        grad_norms, seconds_before = resume.get("grad_norms", []), resume.get("seconds", 0.0)
        finished = resume.get("finished", False)  # training had ended: nothing is trained again
        method.load_trainer_state(resume.get("method_state") or {})
        if selection is not None and resume.get("selection") is not None:
            selection.load(resume["selection"])
        log.info("resuming from step %d", resume["step"])

    def checkpoint(step: int, done: bool = False) -> None:
        rng = dist.gather(rng_state())
        if dist.is_main:
            weights = {name: p.detach().cpu().clone() for name, p in trained.items()}
            if not all_finite(weights, optimizer):
                raise LadmError(f"step {step}: a weight or optimizer state is not finite, so no checkpoint is written "
                                "(the last one is intact): lower train.lr")
            save_checkpoint(out_dir, step, {"step": step, "losses": losses, "grad_norms": grad_norms, "trainable": weights,
                                            "selection": selection.state() if selection is not None else None,
                                            "method_state": method.trainer_state(),
                                            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                            "rng": rng, "wandb_id": tracker.run_id, "identity": identity,
                                            "examples_seen": seen, "finished": done,
                                            "seconds": seconds_before + time.perf_counter() - start},
                            keep=train_cfg.keep_checkpoints)
            fault_after_checkpoint(step)
        dist.barrier()

    model.train()
    taken = steps_taken(first_step - 1, pairs)
    batches = {pair: _batches(*loaders[pair], consumed=taken[pair] * train_cfg.grad_accum) for pair in pairs}
    start = time.perf_counter()
    planned = range(total_steps + 1, total_steps + 1) if finished else range(first_step, total_steps + 1)
    progress = tqdm(planned, desc="train", disable=not dist.is_main or finished, initial=first_step - 1,
                    total=total_steps)
    stop = StopSignals()
    step_log = StepLog(out_dir / "train_log.jsonl", first_step) if dist.is_main else None
    for step in progress:
        step_started = time.perf_counter()
        fault_signal(step)
        pair = pairs[(step - 1) % len(pairs)]
        micro_batches = [next(batches[pair]) for _ in range(train_cfg.grad_accum)]
        seen[pair] += sum(len(mb["input_ids"]) for mb in micro_batches) * dist.world_size  # equal shares per rank
        method.select_adapters(model, pair)
        n_tokens = dist.all_reduce_sum(
            sum((mb["labels"][:, 1:] != IGNORE_INDEX).sum() for mb in micro_batches).to(device)
        )
        loss_sum = torch.zeros((), device=device)
        for i, micro in enumerate(micro_batches):
            tensors = {k: v.to(device) for k, v in micro.items()}
            sync = ddp is None or i == len(micro_batches) - 1
            with (nullcontext() if sync else ddp.no_sync()), \
                    torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = answer_loss(forward_model, tensors)
                # DDP averages gradients over ranks; scale so the result is the global token mean.
                (loss * dist.world_size / n_tokens).backward()
            loss_sum += loss.detach()
        mean_loss = float(dist.all_reduce_sum(loss_sum) / n_tokens)
        if not math.isfinite(mean_loss):  # before the step: the weights and the last checkpoint stay good
            raise LadmError(f"the training loss became {mean_loss} at step {step}: lower train.lr or check the data")
        method.after_backward(model)
        log_now = step % train_cfg.log_every == 0 or step == total_steps
        metrics = {f"grad_norm/{name}": _grad_norm(params)
                   for name, params in method.grad_norm_groups(model).items()} if log_now else {}
        metrics["grad_norm/total"] = float(torch.nn.utils.clip_grad_norm_(trainable, train_cfg.max_grad_norm))
        applied_lr = learning_rates(train_cfg.lr, base_lrs, scheduler.get_last_lr(), optimizer)["train/lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        method_metrics = method.on_step(model, step, optimizer, scheduler, last=step == total_steps)
        if method_metrics:
            tracker.log(method_metrics, step=step)

        losses.append(mean_loss)
        grad_norms.append(metrics["grad_norm/total"])
        progress.set_postfix(loss=f"{mean_loss:.3f}")
        seconds = time.perf_counter() - step_started
        if dist.is_main and step == min(first_step + 1, total_steps) and step < total_steps:
            # the first step of a process pays one-off costs: the second one measures the rate
            log.info("training: %.1f s per optimizer step here, about %s for the %d steps left", seconds,
                     duration(seconds * (total_steps - step)), total_steps - step)
        if step_log is not None:
            step_log.write({"step": step, "pair": pair, "loss": mean_loss, "lr": applied_lr,
                            "grad_norm": metrics["grad_norm/total"], "tokens": int(n_tokens),
                            "tokens_per_s": int(n_tokens) / seconds, "seconds": seconds})
        if log_now:
            window = losses[-(step - (step - 1) // train_cfg.log_every * train_cfg.log_every):]
            tracker.log({"train/loss": sum(window) / len(window), "train/loss_step": mean_loss,
                         **learning_rates(train_cfg.lr, base_lrs, scheduler.get_last_lr(), optimizer), **metrics}, step=step)
        stop_early = False
        if on_eval is not None and train_cfg.eval_every and (step % train_cfg.eval_every == 0 and step < total_steps
                                                              or selection is not None and step == total_steps):
            validation = dist.broadcast(on_eval(step))  # every rank takes the same decision
            model.train()
            stop_early = selection is not None and selection.update(step, validation, trained) and step < total_steps
        signalled = dist.broadcast(stop.received)  # every rank stops at the same step
        if signalled and step < total_steps:
            checkpoint(step)
            stop.finish(signalled)
        if train_cfg.checkpoint_every and step % train_cfg.checkpoint_every == 0 and step < total_steps:
            checkpoint(step)
        if stop_early:
            log.info("early stop at step %d: %s has not improved for %d evaluations (best %.4g at step %d)", step,
                     train_cfg.select_on, selection.patience, selection.score, selection.step)
            break
    stop.restore()
    last_step = first_step - 1 if finished else step if first_step <= total_steps else total_steps
    if not finished:
        # the trained state as it ended (before any selection restores earlier weights): a failure after training
        # (scoring, COMET, a full disk) resumes from here and never trains the model again
        checkpoint(last_step, done=True)
    else:
        log.info("training had finished at step %d (checkpoint): evaluating its weights, not training again", last_step)
    chosen = None
    if selection is not None:
        if selection.weights is not None and selection.step != last_step:
            with torch.no_grad():
                for name, tensor in selection.weights.items():
                    trained[name].copy_(tensor)
        chosen = selection.summary(last_step, last_step < total_steps) | {"validation": selection.validation}
        log.info("selected the weights of step %s (%s %.4g; last step %d)", selection.step, train_cfg.select_on,
                 selection.score if selection.score is not None else float("nan"), last_step)
    if step_log is not None:
        step_log.close()
    model.eval()
    trained_per_pair = steps_taken(last_step, pairs)  # fewer than planned after an early stop
    counts = set(trained_per_pair.values())
    return {"steps": last_step, "steps_per_pair": counts.pop() if len(counts) == 1 else trained_per_pair,
            "examples_seen": seen,
            "losses": losses, "final_loss": losses[-1], "divergence": divergence(losses, grad_norms),
            "selection": chosen, "seconds": seconds_before + time.perf_counter() - start}


def steps_taken(steps: int, pairs: list[str]) -> dict[str, int]:
    """Optimizer steps each pair had after `steps` round-robin steps (pair i has steps i+1, i+1+n, ...)."""
    return {pair: -(-(steps - i) // len(pairs)) for i, pair in enumerate(pairs)}


def duration(seconds: float) -> str:
    """`1 h 05 min`, `12 min`, `40 s`: a time estimate for the log."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


class StepLog:
    """`train_log.jsonl` in the run folder, with or without W&B: one JSON line per optimizer step (pair, loss, the
    learning rate applied, the gradient norm before clipping, answer tokens, tokens/s), flushed as it happens. On
    resume, lines from the resumed step on (and a line cut by a kill) are dropped first."""

    def __init__(self, path: Path, first_step: int):
        kept = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line)["step"] < first_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue
        write_lines_atomic(path, kept)
        self.path = path
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the run, closed in close()

    def write(self, record: dict) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as err:  # a full disk: one line (a line cut here is dropped on resume)
            raise write_failure(self.path, err, "free disk space and run the same command again (training resumes "
                                "from its last checkpoint, if any)") from err

    def close(self) -> None:
        self.file.close()


def _grad_norm(params: list[torch.nn.Parameter]) -> float:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


class GroupedBatches:
    """Batches of similar length (`train.group_by_length`), seeded per epoch, the same on every rank.

    Each epoch the examples are shuffled (seed + epoch), cut into windows of `WINDOW` global batches, sorted
    by length inside a window and cut into global batches of world × batch_size; the batch order is shuffled
    too. Rank r takes every world-th example of a global batch, so N ranks with batch b see exactly the
    batches of one rank with batch N·b. Incomplete global batches are dropped, as `drop_last` does."""

    WINDOW = 50

    def __init__(self, lengths: list[int], batch_size: int, world_size: int, rank: int, seed: int):
        self.lengths, self.batch_size, self.world_size, self.rank, self.seed = lengths, batch_size, world_size, rank, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths) // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        size = self.batch_size * self.world_size
        window = size * self.WINDOW
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=lambda i: -self.lengths[i])
            batches += [chunk[i:i + size] for i in range(0, len(chunk) - size + 1, size)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[b][self.rank::self.world_size]


class Preempted(BaseException):  # noqa: N818 - like KeyboardInterrupt: not a failure of the job
    """A stop signal arrived; a checkpoint of the last finished step was written."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after writing a checkpoint")
        self.signum = signum


class StopSignals:
    """SIGTERM / SIGUSR1 (what SLURM sends before a time limit or a preemption; SIGUSR2 where submitit has a
    handler for it) only set a flag; the trainer checkpoints at the next step boundary and stops. The
    previous handler (submitit's requeue) is called after the checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self):
        self.received: int = 0
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self.SIGNALS:
            old = signal.getsignal(signum)
            if signum == signal.SIGUSR2 and not callable(old):
                continue  # only as submitit's time-limit signal
            self.previous[signum] = old
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.received = signum

    def restore(self) -> None:
        for signum, old in self.previous.items():
            signal.signal(signum, old)

    def finish(self, signum: int) -> None:
        self.restore()
        previous = self.previous.get(signum)
        if callable(previous):
            previous(signum, None)  # e.g. submitit: requeue the job
        raise Preempted(signum)


def fault_after_checkpoint(step: int) -> None:
    """Tests only: `LADM_FAULT_SIGKILL_AFTER_CHECKPOINT=N` kills the process right after checkpoint N."""
    if os.environ.get("LADM_FAULT_SIGKILL_AFTER_CHECKPOINT") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def fault_signal(step: int) -> None:
    """Tests only: `LADM_FAULT_SIGNAL_AT_STEP=N:SIGTERM` sends the process that signal as step N starts."""
    at, _, name = os.environ.get("LADM_FAULT_SIGNAL_AT_STEP", "").partition(":")
    if at == str(step):
        os.kill(os.getpid(), signal.Signals[name])
