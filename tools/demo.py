"""``python -m tools.demo``: the end-to-end demo on 2 CPU cores, in a few minutes.

1. prepare the embedded corpus (Python's own sources and docs) into token shards, training a
   small byte-level BPE tokenizer on the way;
2. train the tiny LLaDA of ``configs/demo.yaml``, showing the loss falling, saving checkpoints;
3. export the final checkpoint to Hugging Face format (LLaDA's layout, remote code included);
4. sample text from the export with LLaDA's reverse process.

Each step runs the same command a user would type; they are printed as they run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path


def run(args: list[str]) -> None:
    print(f"\n$ python {shlex.join(args)}", flush=True)
    subprocess.run([sys.executable, *args], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--steps", type=int, default=None, help="override train.max_steps")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    data_dir = run_dir / "data"
    # a fresh run each time (the prepared shards are kept and reused)
    for stale in ("checkpoints", "hf", "metrics.jsonl", "wandb"):
        path = run_dir / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    run(["-m", "data.prepare", "--input", "embedded", "--output", str(data_dir)])
    overrides = [f"train.out_dir={run_dir}", f"data.sources=[{{path: {data_dir}}}]"]
    if args.steps is not None:
        overrides.append(f"train.max_steps={args.steps}")
    run(["-m", "train", "configs/demo.yaml", *overrides])

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    early, late = records[1:4], records[-3:]  # the per-step loss is noisy: average a few logged steps
    mean = lambda rs: sum(r["loss"] for r in rs) / len(rs)  # noqa: E731
    print(
        f"\nloss: {records[0]['loss']:.3f} at step 1; mean {mean(early):.3f} at steps "
        f"{early[0]['step']}-{early[-1]['step']}; mean {mean(late):.3f} at steps {late[0]['step']}-{late[-1]['step']}"
    )

    hf_dir = run_dir / "hf"
    run(["-m", "tools.convert_to_hf", str(run_dir), str(hf_dir), "--force"])
    run([
        "-m", "tools.generate", "--checkpoint", str(hf_dir),
        "--prompt", "def read_file(path):", "--prompt", "The list type",
        "--gen-length", "48", "--steps", "48", "--block-length", "16", "--temperature", "0.8",
    ])
    print(f"\ndemo done: run folder {run_dir}, HF export {hf_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
