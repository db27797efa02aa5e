"""``python -m train CONFIG.yaml [key=value ...]``: train, single process or under torchrun/srun."""

from __future__ import annotations

import os
import sys
from pathlib import Path

USAGE = """usage: python -m train CONFIG.yaml [key=value ...]

Trains a masked-diffusion LM. CONFIG is a run config (see configs/demo.yaml); each key=value
overrides one entry, e.g. train.max_steps=200 train.lr=3e-4 parallel.tp=2.
Under torchrun or srun every rank runs this same command.
SIGUSR1, SIGTERM and Ctrl-C (SIGINT) stop every rank after the same step, save a checkpoint and
exit 0 (relaunch with train.resume=true); Ctrl-\\ (SIGQUIT) aborts without saving."""


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _mark_clean_stop() -> None:
    """Tell launch/torchrun.sh that this rank stopped on a signal after saving (it exits 0 then,
    even when torchrun itself was signalled and reports a failure)."""
    folder = os.environ.get("DIFFTRON_STOP_DIR")
    if folder and Path(folder).is_dir():
        (Path(folder) / f"rank-{os.environ.get('LOCAL_RANK', '0')}").write_text("saved\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    try:
        return _train(argv)
    except KeyboardInterrupt:  # Ctrl-C before the trainer's handler was installed
        print("stopped: interrupted (Ctrl-C) outside the training loop; nothing saved", file=sys.stderr)
        return 130


def _train(argv: list[str]) -> int:
    from train.config import ConfigError, load_config
    from train.guards import GuardError

    try:
        cfg = load_config(argv[0], argv[1:])
        from train.trainer import CollectiveError, Interrupted, Trainer

        try:
            trainer = Trainer(cfg)
            trainer.fit()
        except Interrupted as e:  # SIGTERM/SIGINT during setup: nothing to save
            print(f"stopped: {e}", file=sys.stderr)
            _mark_clean_stop()
            return 0
        except CollectiveError as e:  # a peer rank died or hangs: one line, not ~100
            print(f"error: {_first_line(e)}", file=sys.stderr)
            return 1
        if trainer.preempted:
            _mark_clean_stop()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {_first_line(e)}", file=sys.stderr)
        return 2
    except GuardError as e:  # the run diverged and cannot roll back: one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
