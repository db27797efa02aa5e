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
window of data steps (``self.skip_windows``).
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
from model.llada import build_model
from model.objective import Objective, bucket_row_stats, t_bucket_index
from train.checkpoint import (
    AsyncSave,
    CheckpointError,
    checked_checkpoint,
    checkpoint_group,
    discard_checkpoints_after,
    list_checkpoints,
    load_into_engine,
    load_rng,
    load_training_state_json,
    read_model_config,
    remove_stale_temporaries,
    resume_candidates,
    save_checkpoint,
    verify_checkpoint,
)
from train.config import ConfigError, RunConfig, to_yaml
from train.engine import MicroBatch
from train.local_engine import LocalEngine
from train.guards import GuardError, StepGuard
from train.hardware import current_device_name, mfu
from train.metrics import EventLog, MetricsLogger
from train.performance import compile_blocks
from train.runlock import RunLock
from train.schedule import wsd_lr


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def attention_kernel(backend: str, precision: str, device: torch.device) -> str:
    """The attention kernel this run uses, as a log line; an explicit kernel that cannot run here
    (e.g. ``flash`` without a working flash-attn) is a ConfigError (one line), not a fallback."""
    from model.attention import resolve_backend

    try:
        return resolve_backend(backend, device, torch.bfloat16 if precision == "bf16" else torch.float32)
    except ValueError as e:
        raise ConfigError(f"train.attention_backend={backend}: {e}") from None


def sequence_multiple(layout) -> int:
    """What every step's sequence length must be a multiple of: TP under sequence parallelism
    (megatron scatters the sequence over the TP ranks), else 1."""
    return layout.tp if layout is not None and layout.sequence_parallel else 1


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
        self._save_thread: AsyncSave | None = None
        self._previous_handlers = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.device = resolve_device(t.device)
        self.attention_kernel = attention_kernel(t.attention_backend, t.precision, self.device)  # fails fast
        self.out_dir = Path(t.out_dir)
        # one run per out_dir: global rank 0 holds its lock until it exits (train/runlock.py)
        self._run_lock = RunLock(self.out_dir) if int(os.environ.get("RANK", "0")) == 0 else None
        self.engine = self._build_engine()
        # every process group is made now: making one later needs the launcher's store, so ranks
        # orphaned by a killed launcher would die at their first save instead of training on
        checkpoint_group()
        self.dp_rank = getattr(self.engine, "dp_rank", 0)
        self.dp_size = getattr(self.engine, "dp_size", 1)
        self.is_logging_rank = getattr(self.engine, "is_logging_rank", True)
        self.device = getattr(self.engine, "device", self.device)
        self.length_multiple = sequence_multiple(getattr(self.engine, "layout", None))
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
        if self.is_logging_rank:  # leftovers of a killed or failed save (no save is running yet)
            remove_stale_temporaries(self.out_dir, log=tqdm.write)
        if self.is_logging_rank:
            tqdm.write(f"attention: {self.attention_kernel}")
        if t.resume:
            self._resume()
        elif t.init_from is not None:
            self._init_from(t.init_from)
        self.metrics = MetricsLogger(
            str(self.out_dir), enabled=self.is_logging_rank, wandb_mode=cfg.logging.wandb,
            project=cfg.logging.wandb_project, run_name=cfg.logging.run_name,
            config=_plain_config(cfg),
        )

    # ----- setup ------------------------------------------------------------------------------
    def init_run_state(self) -> None:
        """The loop's counters, the step guard and the event log (from ``cfg``, ``out_dir``,
        ``is_logging_rank``); a checkpoint restore overwrites them."""
        self.step = 0  # optimizer steps taken (vetoed ones included)
        self.data_step = 0  # the loader's next batch (before skip windows are applied)
        self.skip_windows: list[list[int]] = []  # [start, end) data steps never trained on (rollbacks)
        self.guard = StepGuard(self.cfg.guard)
        self.guard_counts = {"nonfinite": 0, "spike": 0, "rollbacks": 0}  # kept in checkpoints
        self.bad_streak = 0  # vetoed steps in a row
        self.bad_streak_start: int | None = None  # data step of the first of them
        self.rollbacks_here = 0  # rollbacks in this process (guard.max_rollbacks)
        self.events = EventLog(str(self.out_dir), enabled=self.is_logging_rank)

    def _build_engine(self):
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
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.loader.tokenizer_path)
        if tok.mask_token_id is not None and tok.mask_token_id != m.mask_token_id:
            raise ConfigError(
                f"model.mask_token_id ({m.mask_token_id}) differs from the tokenizer's mask token id "
                f"({tok.mask_token_id}, {tok.mask_token!r}) in {self.loader.tokenizer_path}"
            )

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps vetoed by the guard (non-finite or spike), over the whole run."""
        return self.guard_counts["nonfinite"] + self.guard_counts["spike"]

    def _resume(self) -> None:
        def log(message: str) -> None:
            self.events.write("checkpoint_damaged", step=self.step, message=message, console=message)

        candidates = resume_candidates(self.out_dir)  # a broken `latest` with nothing left raises
        if not candidates:
            if self.is_logging_rank:
                tqdm.write(f"resume: no checkpoint in {self.out_dir / 'checkpoints'}; starting from step 0")
            return
        for ckpt in candidates:  # a damaged one is skipped (one line) for the next older one
            problem = verify_checkpoint(ckpt)
            if problem is None:
                try:
                    self._restore(ckpt)  # chunk CRCs are checked as they are read, on every rank
                    break
                except CheckpointError as e:  # raised on every rank alike
                    problem = str(e)
            log(f"resume: skipping damaged checkpoint {ckpt.name}: {problem}")
        else:
            raise ConfigError(f"resume: every checkpoint in {self.out_dir / 'checkpoints'} is damaged (see above)")
        if self.step > self.cfg.train.max_steps:
            raise ConfigError(
                f"resume: {ckpt} is at step {self.step}, past train.max_steps={self.cfg.train.max_steps}; "
                f"raise train.max_steps to train on, or use another train.out_dir to start over"
            )
        if self.is_logging_rank:
            tqdm.write(f"resume: continuing from {ckpt} (step {self.step})")

    def _restore(self, ckpt: Path) -> None:
        """Load weights, AdamW state, data position, RNG, guard statistics and counters. Collective."""
        saved = read_model_config(ckpt)
        if saved != self.cfg.model:
            diff = [k for k, v in saved.to_dict().items() if getattr(self.cfg.model, k) != v]
            raise ConfigError(f"checkpoint {ckpt} was written for a different model (differs in: {', '.join(diff)})")
        trainer = load_training_state_json(ckpt)
        try:
            # weights and AdamW moments are stored as chunks of the full tensors under the model's
            # parameter names; each rank reads its own chunks, so any layout resumes any other
            load_into_engine(ckpt, self.engine)
        except CheckpointError as e:
            if "no optimizer state" not in str(e):
                raise
            raise ConfigError(
                f"checkpoint {ckpt} has no optimizer state (e.g. it was converted from HF); "
                f"start from its weights with train.init_from={ckpt} instead of train.resume"
            ) from None
        self.loader.load_state_dict(trainer["loader"])
        rng = load_rng(ckpt)
        if rng is not None:
            torch.set_rng_state(rng["torch"])
        self.step = int(trainer["step"])
        self.data_step = int(trainer.get("data_step", self.step))
        self.skip_windows = [list(map(int, w)) for w in trainer.get("skip_windows", [])]
        if "guard" in trainer:
            self.guard.load_state_dict(trainer["guard"])
        counts = trainer.get("guard_counts", {"nonfinite": int(trainer.get("skipped_steps", 0))})
        self.guard_counts = {k: int(counts.get(k, 0)) for k in ("nonfinite", "spike", "rollbacks")}
        self.bad_streak, self.bad_streak_start = 0, None

    def _init_from(self, path: str) -> None:
        ckpt = checked_checkpoint(path)  # damaged: one line; chunk CRCs are checked as read
        cfg = read_model_config(ckpt)
        if cfg != self.cfg.model:
            diff = [k for k, v in cfg.to_dict().items() if getattr(self.cfg.model, k) != v]
            raise ConfigError(f"train.init_from={path} holds a different model (differs in: {', '.join(diff)})")
        load_into_engine(ckpt, self.engine, optimizer=False)

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

    def next_data_step(self, data_step: int) -> int:
        """The first data step at or after ``data_step`` outside every skip window."""
        moved = True
        while moved:
            moved = False
            for start, end in self.skip_windows:
                if start <= data_step < end:
                    data_step, moved = end, True
        return data_step

    def train_step(self) -> dict:
        t = self.cfg.train
        step = self.step
        data_step = self.next_data_step(self.data_step)
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
        gate = self.guard.gate(times, judge_spikes=self.objective.judge_spikes(length))
        out = self.engine.train_step(mbs, lr, gate=gate)
        elapsed = time.perf_counter() - start
        self.data_step = data_step + 1
        self.step += 1
        verdict = gate.verdict
        if out.skipped:
            self._on_skip(out, verdict, data_step)
        else:
            self.bad_streak, self.bad_streak_start = 0, None
            if gate.stats is not None and gate.judge_spikes:  # full-length steps only
                self.guard.observe(gate.stats)
        values = {
            "loss": out.loss,
            "lr": lr,
            "grad_norm": out.grad_norm,
            "seq_len": length,
            "data_step": data_step,
            "tokens_per_s": t.global_batch_size * length / elapsed,
            "step_time_s": elapsed,
            "mem_gb": peak_memory_gb(self.device),
            "skipped_steps": self.skipped_steps,
            "skipped_nonfinite": self.guard_counts["nonfinite"],
            "skipped_spike": self.guard_counts["spike"],
            "rollbacks": self.guard_counts["rollbacks"],
            "spike_z": verdict.z if verdict is not None else float("nan"),
        }
        if self.device.type == "cuda":  # MFU only on GPUs, from the bidirectional FLOP count
            values["mfu"] = mfu(
                values["tokens_per_s"], self.cfg.model.flops_per_token(length), self.world_size,
                current_device_name(),
            )
        values.update(self._bucket_losses(times, out.per_sample, length))
        return values

    def _on_skip(self, out, verdict, data_step: int) -> None:
        """Count and log a vetoed step; start or extend the bad streak."""
        reason = out.skip_reason or "nonfinite"
        kind = "spike" if reason == "spike" else "nonfinite"
        self.guard_counts[kind] += 1
        if self.bad_streak == 0:
            self.bad_streak_start = data_step
        self.bad_streak += 1
        z = verdict.z if verdict is not None else float("nan")
        detail = f"loss {out.loss:.6g}, grad norm {out.grad_norm:.6g}"
        if reason == "spike":
            detail += f", z {z:.1f} > {self.cfg.guard.spike_z:g} (worst t-bucket {verdict.worst_bucket})"
        self.events.write(
            "skip", step=self.step, data_step=data_step, reason=reason, loss=out.loss, grad_norm=out.grad_norm,
            z=z, bad_streak=self.bad_streak, console=(
                f"guard: step {self.step} skipped ({reason}: {detail}); {self.skipped_steps} skipped so far, "
                f"{self.bad_streak} in a row"
            ),
        )

    def rollback_due(self) -> bool:
        k = self.cfg.guard.rollback_after
        return k > 0 and self.bad_streak >= k

    def _rollback_target(self, before_data_step: int) -> Path | None:
        """The newest undamaged checkpoint written before data step ``before_data_step`` was trained."""
        for ckpt in reversed(list_checkpoints(self.out_dir)):
            try:
                trainer = load_training_state_json(ckpt)
            except (OSError, ValueError):
                continue
            if int(trainer.get("data_step", trainer.get("step", 0))) <= before_data_step and verify_checkpoint(ckpt) is None:
                return ckpt
        return None

    def rollback(self) -> None:
        """Go back to the last checkpoint from before the bad streak; never train on the streak's
        data window again. Every rank calls it at the same step (the verdicts are agreed)."""
        g = self.cfg.guard
        window = [int(self.bad_streak_start), int(self.data_step)]
        self.wait_for_save()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # the logging rank's checkpoint files are complete
        target = self._rollback_target(window[0])
        where = f"{self.bad_streak} skipped steps in a row (data steps {window[0]}..{window[1] - 1})"
        if target is None:
            raise GuardError(
                f"guard: {where} and no checkpoint from before them in {self.out_dir / 'checkpoints'} to roll back "
                "to; stopping (see events.jsonl). Lower the learning rate, check the data, or set "
                "train.checkpoint_every so that there is one"
            )
        if self.rollbacks_here >= g.max_rollbacks:
            raise GuardError(
                f"guard: {where} after {self.rollbacks_here} rollbacks already (guard.max_rollbacks={g.max_rollbacks}); "
                "stopping: the run keeps diverging (see events.jsonl)"
            )
        from_step = self.step
        counts, windows = dict(self.guard_counts), self.skip_windows + [window]
        self._restore(target)
        self.guard_counts = counts
        self.guard_counts["rollbacks"] += 1
        self.rollbacks_here += 1
        self.skip_windows = sorted(windows)
        if self.is_logging_rank:  # the abandoned timeline's checkpoints must not be resumed
            discard_checkpoints_after(self.out_dir, target)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        # re-save the target with the new skip window (this also points `latest` at it), so a
        # crash before the next checkpoint resumes without walking into the window again; until
        # then `latest` names a deleted folder and resume falls back to the newest left: the target
        self.save()
        self.wait_for_save()
        self.events.write(
            "rollback", step=from_step, to_step=self.step, checkpoint=target.name, skip_window=window,
            console=(
                f"guard: {where}: rolled back from step {from_step} to {target.name}; data steps "
                f"{window[0]}..{window[1] - 1} will be skipped ({self.guard_counts['rollbacks']} rollback(s) so far)"
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
    def save(self) -> Path | None:
        """Write a checkpoint of the current step (collective: every rank must call it).

        Every rank writes its own chunks of the weights and AdamW state (``train.checkpoint``), as
        pieces of the full tensors named like the single-device model's parameters, so the
        checkpoint resumes in any parallel layout."""
        self.wait_for_save()  # at most one checkpoint in flight
        kwargs = dict(
            trainer_state=self._trainer_state(), config_yaml=to_yaml(self.cfg),
            tokenizer_dir=self.loader.tokenizer_path, keep_last=self.cfg.train.keep_last,
        )
        if self.cfg.train.async_save:
            # blocking part: this rank's chunks are copied to CPU; the write runs in the background
            # and `latest` moves only when every rank's part is written
            self._save_thread = AsyncSave(self.out_dir, self.step, self.engine.checkpoint_state(), **kwargs)
            return self._save_thread.path
        return save_checkpoint(self.out_dir, self.step, state=self.engine.checkpoint_state(), **kwargs)

    def _trainer_state(self) -> dict:
        loader = self.loader.state_dict()
        loader["next_step"] = self.data_step
        return {
            "loader": loader, "data_step": self.data_step, "skip_windows": self.skip_windows,
            "skipped_steps": self.skipped_steps, "guard_counts": dict(self.guard_counts),
            "guard": self.guard.state_dict(),
        }

    def wait_for_save(self) -> None:
        """Block until a background checkpoint write has finished; re-raise its error if any."""
        thread, self._save_thread = self._save_thread, None
        if thread is not None:
            thread.wait()

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
                if self.rollback_due():
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
