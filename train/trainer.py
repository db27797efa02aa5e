"""The training loop: batches -> noise -> micro-batches -> engine step -> metrics -> checkpoints.

One step, as data (see the README's architecture section):

1. the loader gives this data-parallel rank its slice of global step ``s`` (token windows and
   their global sample indices);
2. ``model.objective`` draws t and the masks from (seed, s, global index): the same in every
   layout; 1 % of steps train on a random prefix length;
3. the engine (single process, or DeepSpeed/megatron-core for a parallel layout) runs forward,
   loss, backward over the micro-batches, clips and steps; the WSD schedule sets the rate;
4. the step guard (``train.guards``) may veto the update: a non-finite loss or grad norm, or a
   loss spike for the step's t-mix, skips it on every rank; K vetoed steps in a row roll the run
   back to the last checkpoint from before them, and their data window is never trained on;
5. metrics are logged on the logging rank (guard events also to ``events.jsonl``); every N steps
   a checkpoint is written atomically.

Optimizer steps and data steps: ``self.step`` counts optimizer steps (it sets the learning rate;
a vetoed step still counts); ``self.data_step`` is the next batch of the loader (it keys the
batch, the noise and the random length). They are equal until a rollback makes the run skip a
window of data steps (``self.run_guard.skip_windows``).
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from data.loader import build_loader
from data.shards import load_tokenizer_dir
from model.llada import build_model
from model.objective import Objective, bucket_row_stats, t_bucket_index
from train.checkpoint import Checkpointer, remove_stale_temporaries
from train.config import ConfigError, RunConfig, to_yaml
from train.engine import Engine, MicroBatch
from train.device import compile_blocks, resolve_device
from train.local_engine import LocalEngine
from train.guards import GuardError, RunGuard
from train.hardware import current_device_name, mfu
from train.metrics import EventLog, MetricsLogger
from train.runlock import RunLock
from train.schedule import wsd_lr


def attention_kernel(backend: str, precision: str, device: torch.device) -> str:
    """The attention kernel this run uses, as a log line; an explicit kernel that cannot run here
    (e.g. ``flash`` without a working flash-attn) is a ConfigError (one line), not a fallback."""
    from model.attention import resolve_backend

    try:
        return resolve_backend(backend, device, torch.bfloat16 if precision == "bf16" else torch.float32)
    except ValueError as e:
        raise ConfigError(f"train.attention_backend={backend}: {e}") from None


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux -> GB


class Trainer:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        t = cfg.train
        # Install the stop-signal handlers first: a SIGUSR1 that arrives during setup (the
        # launchers ignore USR1 until here) is honoured after the first step; SIGTERM/SIGINT
        # during setup stop at once (nothing trained yet, nothing to save).
        self.stop_signal: int | None = None
        self._in_loop = False  # False during setup: SIGTERM/SIGINT then exit at once (nothing to save)
        self.preempted = False  # set when a stop signal ended the run (after its checkpoint)
        self._previous_handlers = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        try:
            self.device = resolve_device(t.device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.attention_kernel = attention_kernel(t.attention_backend, t.precision, self.device)  # fails fast
        self.out_dir = Path(t.out_dir)
        # one run per out_dir: global rank 0 holds its lock until it exits (train/runlock.py)
        self._run_lock = RunLock(self.out_dir) if int(os.environ.get("RANK", "0")) == 0 else None
        self.engine = self._build_engine()
        self.dp_rank = self.engine.dp_rank
        self.dp_size = self.engine.dp_size
        self.is_logging_rank = self.engine.is_logging_rank
        self.device = self.engine.device
        self.length_multiple = self.engine.sequence_multiple
        if t.seq_len % self.length_multiple:
            raise ConfigError(
                f"train.seq_len ({t.seq_len}) must be a multiple of parallel.tp ({self.length_multiple}) "
                "with parallel.sequence_parallel=true"
            )
        self.objective = objective_of(t, cfg.model.mask_token_id, self.length_multiple)
        if t.global_batch_size % (t.micro_batch_size * self.dp_size):
            raise ConfigError(
                f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                f"micro_batch_size x data-parallel size ({t.micro_batch_size} x {self.dp_size})"
            )
        self.loader = build_loader(
            cfg.data, seq_len=t.seq_len, global_batch_size=t.global_batch_size,
            dp_rank=self.dp_rank, dp_size=self.dp_size, seed=t.seed,
        )
        self._check_vocabulary()
        self.val_loader = None
        if cfg.eval.every > 0:
            self.val_loader = build_loader(
                cfg.data, seq_len=t.seq_len, global_batch_size=t.global_batch_size,
                dp_rank=self.dp_rank, dp_size=self.dp_size, seed=t.seed, split="validation",
            )
        self.init_run_state()
        # every process group is made now (the checkpoints' own): making one later needs the
        # launcher's store, so ranks orphaned by a killed launcher would die at their first save
        self.checkpoints = Checkpointer(
            self.out_dir, self.engine, loader=self.loader, run_guard=self.run_guard, model_config=cfg.model,
            config_yaml=to_yaml(cfg), keep_last=t.keep_last, async_save=t.async_save,
        )
        if self.is_logging_rank:  # leftovers of a killed or failed save (no save is running yet)
            remove_stale_temporaries(self.out_dir, log=tqdm.write)
        if self.is_logging_rank:
            tqdm.write(f"attention: {self.attention_kernel}")
        if t.resume:
            self._resume()
        elif t.init_from is not None:
            self.checkpoints.init_from(t.init_from)
        self.metrics = MetricsLogger(
            str(self.out_dir), enabled=self.is_logging_rank, wandb_mode=cfg.logging.wandb,
            project=cfg.logging.wandb_project, run_name=cfg.logging.run_name,
            config=_plain_config(cfg),
        )

    # ----- setup ------------------------------------------------------------------------------
    def init_run_state(self) -> None:
        """The loop's counters, the guard's run state and the event log (from ``cfg``,
        ``out_dir``, ``is_logging_rank``); a checkpoint restore overwrites them."""
        self.step = 0  # optimizer steps taken (vetoed ones included)
        self.data_step = 0  # the loader's next batch (before skip windows are applied)
        self.run_guard = RunGuard(self.cfg.guard)  # step guard, counters, streak, skip windows
        self.events = EventLog(str(self.out_dir), enabled=self.is_logging_rank)

    def _build_engine(self) -> Engine:
        t = self.cfg.train
        p = self.cfg.parallel
        trivial_layout = p.tp == 1 and p.pp == 1 and p.zero_stage == 0
        if self.world_size > 1 or not trivial_layout:
            if t.compile:
                raise ConfigError("train.compile=true is supported by the single-process engine only (for now)")
            from train.parallel_engine import build_parallel_engine  # imports DeepSpeed/megatron

            return build_parallel_engine(
                self.cfg.model, p, world_size=self.world_size, seed=t.seed, lr=t.lr,
                weight_decay=t.weight_decay, betas=tuple(t.betas), eps=t.adam_eps,
                grad_clip=t.grad_clip, precision=t.precision, micro_batch_size=t.micro_batch_size,
                global_batch_size=t.global_batch_size,
                activation_checkpointing=t.activation_checkpointing,
                attention_backend=t.attention_backend, collective_timeout_s=t.collective_timeout_s,
            )
        torch.manual_seed(t.seed)
        model = build_model(self.cfg.model, seed=t.seed)
        model.set_activation_checkpointing(t.activation_checkpointing)
        model.set_attention_backend(t.attention_backend)
        if t.compile:
            compile_blocks(model)
        return LocalEngine(
            model, lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.betas), eps=t.adam_eps,
            grad_clip=t.grad_clip, precision=t.precision, device=self.device,
        )

    def _check_vocabulary(self) -> None:
        m = self.cfg.model
        if self.loader.vocab_size > m.vocab_size:
            raise ConfigError(
                f"the data's tokenizer has {self.loader.vocab_size} tokens but model.vocab_size is {m.vocab_size}"
            )
        tok = load_tokenizer_dir(self.loader.tokenizer_path)
        if tok.mask_token_id is not None and tok.mask_token_id != m.mask_token_id:
            raise ConfigError(
                f"model.mask_token_id ({m.mask_token_id}) differs from the tokenizer's mask token id "
                f"({tok.mask_token_id}, {tok.mask_token!r}) in {self.loader.tokenizer_path}"
            )

    def _resume(self) -> None:
        def log(message: str) -> None:
            self.events.write("checkpoint_damaged", step=self.step, message=message, console=message)

        found = self.checkpoints.resume(log)
        if found is None:
            if self.is_logging_rank:
                tqdm.write(f"resume: no checkpoint in {self.checkpoints.where}; starting from step 0")
            return
        ckpt, self.step, self.data_step = found
        if self.step > self.cfg.train.max_steps:
            raise ConfigError(
                f"resume: {ckpt} is at step {self.step}, past train.max_steps={self.cfg.train.max_steps}; "
                f"raise train.max_steps to train on, or use another train.out_dir to start over"
            )
        if self.is_logging_rank:
            tqdm.write(f"resume: continuing from {ckpt} (step {self.step})")

    # ----- one step ---------------------------------------------------------------------------
    def micro_batches(self, batch: dict, step: int, *, seed: int, length: int) -> tuple[list[MicroBatch], torch.Tensor]:
        """Noise, masks and loss weights (``self.objective``) for this rank's share of a step,
        split into micro-batches; also returns the rows' diffusion times."""
        p = self.objective.prepare(batch, seed, step, length)
        mbs = []
        for lo in range(0, p.noisy.shape[0], self.cfg.train.micro_batch_size):
            sl = slice(lo, lo + self.cfg.train.micro_batch_size)
            mbs.append(MicroBatch(p.noisy[sl], p.targets[sl], p.masked[sl], p.p_mask[sl], p.row_weight[sl]))
        return mbs, p.t

    def train_step(self) -> dict:
        t = self.cfg.train
        step = self.step
        data_step = self.run_guard.next_data_step(self.data_step)
        start = time.perf_counter()
        batch = self.loader.batch(data_step)
        try:
            self.objective.check_batch(batch)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        length = self.objective.step_length(batch, t.seed, data_step)
        mbs, times = self.micro_batches(batch, data_step, seed=t.seed, length=length)
        lr = wsd_lr(
            step, lr=t.lr, max_steps=t.max_steps, warmup_steps=t.warmup_steps, drop_step=t.drop_step,
            drop_lr=t.drop_lr, decay_steps=t.decay_steps, final_lr=t.final_lr,
        )
        gate = self.run_guard.gate(times, judge_spikes=self.objective.judge_spikes(length))
        out = self.engine.train_step(mbs, lr, gate=gate)
        elapsed = time.perf_counter() - start
        self.data_step = data_step + 1
        self.step += 1
        verdict = gate.verdict
        self.run_guard.record(gate, (out.skip_reason or "nonfinite") if out.skipped else None, data_step)
        if out.skipped:
            self._log_skip(out, verdict, data_step)
        values = {
            "loss": out.loss,
            "lr": lr,
            "grad_norm": out.grad_norm,
            "seq_len": length,
            "data_step": data_step,
            "tokens_per_s": t.global_batch_size * length / elapsed,
            "step_time_s": elapsed,
            "mem_gb": peak_memory_gb(self.device),
            "skipped_steps": self.run_guard.skipped_steps,
            "skipped_nonfinite": self.run_guard.counts["nonfinite"],
            "skipped_spike": self.run_guard.counts["spike"],
            "rollbacks": self.run_guard.counts["rollbacks"],
            "spike_z": verdict.z if verdict is not None else float("nan"),
        }
        if self.device.type == "cuda":  # MFU only on GPUs, from the bidirectional FLOP count
            values["mfu"] = mfu(
                values["tokens_per_s"], self.cfg.model.flops_per_token(length), self.world_size,
                current_device_name(),
            )
        values.update(self._bucket_losses(times, out.per_sample, length))
        return values

    def _log_skip(self, out, verdict, data_step: int) -> None:
        reason = out.skip_reason or "nonfinite"
        g = self.run_guard
        z = verdict.z if verdict is not None else float("nan")
        detail = f"loss {out.loss:.6g}, grad norm {out.grad_norm:.6g}"
        if reason == "spike":
            detail += f", z {z:.1f} > {self.cfg.guard.spike_z:g} (worst t-bucket {verdict.worst_bucket})"
        self.events.write(
            "skip", step=self.step, data_step=data_step, reason=reason, loss=out.loss, grad_norm=out.grad_norm,
            z=z, bad_streak=g.bad_streak, console=(
                f"guard: step {self.step} skipped ({reason}: {detail}); {g.skipped_steps} skipped so far, "
                f"{g.bad_streak} in a row"
            ),
        )

    def rollback(self) -> None:
        """Go back to the last checkpoint from before the bad streak (``RunGuard.plan_rollback``);
        never train on the streak's data window again. Every rank calls it at the same step (the
        verdicts are agreed)."""
        self.checkpoints.wait()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # the logging rank's checkpoint files are complete
        plan = self.run_guard.plan_rollback(self.data_step, self.checkpoints.saved_data_steps(), str(self.checkpoints.where))
        from_step, before = self.step, self.run_guard.state_dict()
        self.step, self.data_step = self.checkpoints.restore(plan.target)
        self.run_guard.rolled_back(plan, before)
        self.checkpoints.discard_after(plan.target, is_logging_rank=self.is_logging_rank)
        # re-save the target with the new skip window (this also points `latest` at it), so a
        # crash before the next checkpoint resumes without walking into the window again; until
        # then `latest` names a deleted folder and resume falls back to the newest left: the target
        self.save()
        self.checkpoints.wait()
        w = plan.window
        self.events.write(
            "rollback", step=from_step, to_step=self.step, checkpoint=plan.target.name, skip_window=w,
            console=(
                f"guard: {plan.where}: rolled back from step {from_step} to {plan.target.name}; data steps "
                f"{w[0]}..{w[1] - 1} will be skipped ({self.run_guard.counts['rollbacks']} rollback(s) so far)"
            ),
        )

    def _bucket_losses(self, times: torch.Tensor, per_sample: torch.Tensor, length: int) -> dict:
        """Mean per-token loss by t-bucket over the whole global batch."""
        n = self.cfg.logging.t_buckets
        if per_sample.numel() == times.numel():
            stats = bucket_row_stats(t_bucket_index(times, n), per_sample / length, n)
            sums, counts = stats[1], stats[0]
        else:  # this rank holds no loss rows (e.g. a pipeline stage before the last)
            sums, counts = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():  # on the engine's device (NCCL serves no CPU tensors)
            both = torch.cat([sums, counts]).to(self.device)
            dist.all_reduce(both)
            sums, counts = both[:n].cpu(), both[n:].cpu()
        return {
            f"loss_t{i}": (float(sums[i] / counts[i]) if counts[i] > 0 else float("nan"))
            for i in range(n)
        }

    @torch.no_grad()
    def evaluate(self) -> float:
        """The bound (per-token loss) on held-out batches with fixed noise: same masks every time."""
        t, e = self.cfg.train, self.cfg.eval
        total = torch.zeros(2, dtype=torch.float64)
        for k in range(e.batches):
            batch = self.val_loader.batch(k)
            mbs, _ = self.micro_batches(batch, k, seed=e.seed, length=t.seq_len)
            rows = self.engine.eval_loss(mbs)
            total += torch.tensor([float(rows.sum()) / t.seq_len, float(rows.numel())], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            total = total.to(self.device)
            dist.all_reduce(total)
        return float(total[0] / total[1])

    # ----- checkpoints and signals ------------------------------------------------------------
    def save(self) -> Path:
        """Write a checkpoint of the current step (collective: every rank must call it): every
        rank writes its own chunks of the full weights and AdamW state, so it resumes in any
        layout (``train.checkpoint``)."""
        return self.checkpoints.save(self.step, self.data_step)

    def wait_for_save(self) -> None:
        """Block until a background checkpoint write has finished; re-raise its error if any."""
        self.checkpoints.wait()

    def _on_signal(self, signum, _frame) -> None:
        """SIGUSR1 (a preemption warning), SIGTERM and SIGINT (Ctrl-C): finish the step, save, exit 0.
        Before the loop starts (setup) SIGTERM/SIGINT exit at once: nothing has been trained yet."""
        if not self._in_loop and signum != signal.SIGUSR1:
            raise Interrupted(f"signal {signal.Signals(signum).name} during setup: nothing trained yet; exiting")
        if self.stop_signal is None:
            self.stop_signal = signum
            print(
                f"signal {signal.Signals(signum).name}: saving a checkpoint after this step, then exiting "
                "(Ctrl-\\ aborts without saving)", file=sys.stderr, flush=True,
            )

    def _stop_requested(self) -> bool:
        """Whether any rank got a stop signal; every rank gets the same answer (and signal number),
        so all of them save after the same step, whichever ranks the signal reached."""
        local = int(self.stop_signal or 0)
        agreed = local
        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([local], dtype=torch.int64, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            agreed = int(flag.item())
        if agreed and self.stop_signal is None:
            self.stop_signal = agreed  # the signal reached another rank only
        return agreed != 0

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    # ----- the loop ---------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        t, log = self.cfg.train, self.cfg.logging
        history = []
        bar = None
        if self.is_logging_rank and log.progress_bar:
            bar = tqdm(total=t.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        self._in_loop = True
        try:
            if self.step >= t.max_steps:  # resumed at the end: nothing to train, nothing to save
                if self.is_logging_rank:
                    tqdm.write(f"done: already at step {self.step} = train.max_steps; nothing to train (raise train.max_steps to go on)")
                return history
            if self.val_loader is not None and self.cfg.eval.at_start and self.step == 0:
                self.metrics.log(0, {"eval_bound": self.evaluate()})  # the bound the training starts from
            while self.step < t.max_steps:
                values = self.train_step()
                if self.run_guard.rollback_due():
                    history.append({"step": self.step, **values})
                    self.metrics.log(self.step, values, console=False)
                    self.rollback()
                    if bar is not None:
                        bar.n = self.step
                        bar.refresh()
                    continue
                if self.val_loader is not None and self.step % self.cfg.eval.every == 0:
                    values["eval_bound"] = self.evaluate()
                history.append({"step": self.step, **values})
                if self.step % log.log_every == 0 or self.step in (1, t.max_steps):
                    self.metrics.log(self.step, values, console=True)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{values['loss']:.4f}")
                if self._stop_requested():
                    path = self.save()
                    self.wait_for_save()
                    name = signal.Signals(self.stop_signal).name
                    self.events.write(
                        "preempted", step=self.step, signal=int(self.stop_signal), signal_name=name,
                        checkpoint=str(path), console=f"signal {name}: saved {path} at step {self.step}; exiting",
                    )
                    self.preempted = True
                    return history
                if t.checkpoint_every > 0 and self.step % t.checkpoint_every == 0 and self.step < t.max_steps:
                    self.save()
            path = self.save()
            self.wait_for_save()
            if self.is_logging_rank:
                tqdm.write(f"done: step {self.step}, checkpoint {path}")
            return history
        except GuardError:
            raise
        except RuntimeError as e:  # torch.distributed.DistBackendError is a RuntimeError
            if not (dist.is_available() and dist.is_initialized() and self.world_size > 1):
                raise
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CollectiveError(
                f"rank {dist.get_rank()}: a collective failed at step {self.step + 1} ({first}); "
                f"{likely_cause(first)}; waits longer than train.collective_timeout_s="
                f"{self.cfg.train.collective_timeout_s} fail. Relaunch with train.resume=true to continue from "
                "the last checkpoint"
            ) from e
        finally:
            self._in_loop = False
            self._restore_signal_handlers()
            if self._run_lock is not None:
                self._run_lock.release()
            if bar is not None:
                bar.close()
            self.metrics.close()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Interrupted(BaseException):
    """A stop signal before training started: exit at once (``python -m train`` exits 0). A
    BaseException, like KeyboardInterrupt, so that no library's ``except Exception`` swallows it."""


class CollectiveError(RuntimeError):
    """A collective failed (a peer rank died, hangs or disagrees): one line for the user."""


def objective_of(t, mask_token_id: int, length_multiple: int) -> Objective:
    """The run's objective (``train.objective``), chosen once from the train config."""
    return Objective(
        sft=t.objective == "sft", seq_len=t.seq_len, global_batch_size=t.global_batch_size,
        mask_token_id=mask_token_id, mask_eps=t.mask_eps, stratified=t.stratified_t, keyed=t.keyed_noise,
        random_length_prob=t.random_length_prob, length_multiple=length_multiple,
    )


def likely_cause(error: str) -> str:
    """What a failed collective most likely means, from the backend's error text."""
    text = error.lower()
    if "timed out" in text or "timeout" in text:
        return (
            "likely cause: another rank stopped taking part (hung, stuck in I/O, much slower) or died "
            "without closing its connections; check the other ranks' logs and exit codes"
        )
    if any(k in text for k in ("connection closed", "connection reset", "broken pipe", "peer", "socket closed")):
        return "likely cause: another rank died or was killed (check the other ranks' logs and exit codes)"
    if any(k in text for k in ("size", "shape", "mismatch", "count")):
        return "likely cause: the ranks disagree on the layout or config (tensor sizes differ between ranks)"
    return (
        "likely cause: another rank died or was killed (check the other ranks' logs and exit codes), or "
        "the ranks disagree on the layout/config"
    )


def _plain_config(cfg: RunConfig) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg))
