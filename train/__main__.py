"""``python -m train CONFIG.yaml [key=value ...]``: train, single process or under torchrun/srun."""

from __future__ import annotations

import sys

USAGE = """usage: python -m train CONFIG.yaml [key=value ...]

Trains a masked-diffusion LM. CONFIG is a run config (see configs/demo.yaml); each key=value
overrides one entry, e.g. train.max_steps=200 train.lr=3e-4 parallel.tp=2.
Under torchrun or srun every rank runs this same command."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    from train.config import ConfigError, load_config
    from train.guards import GuardError

    try:
        cfg = load_config(argv[0], argv[1:])
        from train.trainer import Trainer

        trainer = Trainer(cfg)
        trainer.fit()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except GuardError as e:  # the run diverged and cannot roll back: one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
