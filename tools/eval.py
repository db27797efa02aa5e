"""``python -m tools.eval [lm-eval flags]``: lm-evaluation-harness's own CLI with difftron registered.

Every lm-eval 0.4.13 flag works (``--tasks``, ``--num_fewshot``, ``--limit``, ``--include_path``,
``--output_path``, ``--log_samples``, ``--gen_kwargs``, ``--seed`` ...); ``--model difftron``
selects :class:`tools.lm_eval_model.DifftronLM` (its ``--model_args`` are listed there), and
lm-eval's own models (``hf``, ``dummy`` ...) stay available. For data-parallel evaluation launch it
with ``torchrun --nproc_per_node=N -m tools.eval ...`` (or ``accelerate launch -m tools.eval``).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    import lm_eval.models  # noqa: F401  (lm-eval's own models first: the registry loads them lazily only when empty)

    import tools.lm_eval_model  # noqa: F401  (registers "difftron")
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
