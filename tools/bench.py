"""``python -m tools.bench SUBCOMMAND [options]``: difftron's benchmarks.

Each subcommand lives in ``tools/benchmarks/<name>.py`` and exposes ``main(argv) -> int``; tiny
sizes run on CPU (CI runs them), full sizes on GPU. Figures go into BENCHMARKS.md with the date,
device, command and config.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import tools.benchmarks


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(tools.benchmarks.__path__) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nsubcommands: " + ", ".join(names))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in names:
        print(f"bench: unknown subcommand {name!r}; choose from: {', '.join(names)}", file=sys.stderr)
        return 2
    return int(importlib.import_module(f"tools.benchmarks.{name}").main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
