"""``python3 tools/gpu_check.py [--wheels DIR] [--out FILE] [--dry-run]``: the one-command GPU check
(``make gpu-check``).

On a machine with one CUDA GPU and only torch installed (the lent machines: Python 3.12, torch
2.11), it

1. installs what the project needs from wheels carried along in ``--wheels`` (``make gpu-wheels``
   builds them here: the project, deepspeed, megatron-core and their dependencies; flash-attn when
   a wheel is there), offline (``pip --no-index``);
2. prepares the embedded corpus into token shards;
3. runs ``python -m train`` under torchrun with NCCL (DeepSpeed ZeRO-1, bf16, one rank: the
   parallel engine with a ``cpu:gloo,cuda:nccl`` process group) on a 2-layer model of LLaDA-8B
   width at seq 4096 for 20 steps, once per attention backend available (sdpa; flash when
   flash-attn imports);
4. runs ``tools.bench layer``, ``tools.bench attention`` and ``tools.bench step``;
5. writes one JSON file: per backend the median tokens/s, TFLOP/s, MFU and peak memory of the
   training run against the planner's prediction for it, and each bench's output.

``--dry-run`` (tested on CPU) does everything but install and run: it checks the wheels folder,
builds every command, loads the training config with its overrides, computes the planner's
prediction and writes the JSON with the commands it would run. This file imports only the
standard library at module level, so it starts on a bare torch install.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["difftron", "deepspeed", "megatron-core"]  # installed from the wheels, with their dependencies
MODEL = {  # LLaDA-8B width, 2 blocks; the demo tokenizer's vocabulary (the embedded corpus)
    "model.n_layers": 2, "model.d_model": 4096, "model.n_heads": 32, "model.n_kv_heads": 32,
    "model.mlp_hidden_size": 12288, "model.max_sequence_length": 4096,
}
BENCHES = (["layer"], ["attention"], ["step"])


def train_overrides(out_dir: Path, data_dir: Path, backend: str, steps: int, seq_len: int) -> list[str]:
    values = {
        **MODEL,
        "train.seq_len": seq_len, "train.micro_batch_size": 1, "train.global_batch_size": 4,
        "train.max_steps": steps, "train.warmup_steps": 2, "train.decay_steps": 0, "train.precision": "bf16",
        "train.attention_backend": backend, "train.random_length_prob": 0, "train.checkpoint_every": 0,
        "train.out_dir": str(out_dir), "data.sources": f"[{{path: {data_dir}}}]", "parallel.zero_stage": 1,
        "logging.wandb": "disabled", "logging.progress_bar": "false", "logging.log_every": 1, "eval.every": 0,
    }
    return [f"{k}={v}" for k, v in values.items()]


def plan_commands(args, work: Path, backends: list[str]) -> dict[str, list[str]]:
    py = sys.executable
    wheels = Path(args.wheels)
    extra = [p.name for p in sorted(wheels.glob("flash_attn-*.whl"))]
    cmds = {
        "install": [py, "-m", "pip", "install", "--no-index", "--find-links", str(wheels), *PACKAGES,
                    *(str(wheels / name) for name in extra)],
        "prepare": [py, "-m", "data.prepare", "--input", "embedded", "--output", str(work / "data")],
    }
    for backend in backends:
        cmds[f"train_{backend}"] = [
            py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "train",
            str(REPO / "configs" / "demo.yaml"),
            *train_overrides(work / f"train_{backend}", work / "data", backend, args.steps, args.seq_len),
        ]
    for bench in BENCHES:
        cmds["bench_" + bench[0]] = [py, "-m", "tools.bench", *bench]
    return cmds


def planner_prediction(overrides: list[str]) -> dict:
    """The planner's memory for the training run (TP1, PP1, DP1, ZeRO-1, no checkpointing)."""
    from tools.plan import GB, layout_memory
    from train.config import load_config

    cfg = load_config(REPO / "configs" / "demo.yaml", overrides, check_paths=False)
    t = cfg.train
    parts, total = layout_memory(
        cfg.model, tp=1, pp=1, dp=1, zero_stage=1, seq_len=t.seq_len, micro_batch=t.micro_batch_size,
        grad_accum=t.global_batch_size // t.micro_batch_size, checkpointing=t.activation_checkpointing,
        reserve_bytes=0,
    )
    return {"total_gb": total / GB, "parts_gb": {k: v / GB for k, v in parts.items()},
            "flops_per_token": cfg.model.flops_per_token(t.seq_len)}


def summarize_run(run_dir: Path, flops_per_token: float) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steady = records[2:] or records  # the first steps include warm-up and autotuning
    tps = statistics.median(r["tokens_per_s"] for r in steady)
    out = {
        "steps": len(records), "final_loss": records[-1]["loss"], "tokens_per_s": tps,
        "tflops_per_s": tps * flops_per_token / 1e12, "peak_mem_gb": max(r["mem_gb"] for r in records),
    }
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    out["mfu"] = statistics.median(mfus) if mfus else None
    return out


def run(cmd: list[str], env: dict, log) -> tuple[int, float, str]:
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.time() - start
    log.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
    return proc.returncode, seconds, (proc.stdout + proc.stderr)[-6000:]


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python3 tools/gpu_check.py", description=__doc__.splitlines()[0])
    ap.add_argument("--wheels", default=str(REPO / "dist" / "gpu-wheels"), help="folder of carried wheels")
    ap.add_argument("--out", default="gpu_check.json", help="the JSON file of results")
    ap.add_argument("--work", default="runs/gpu_check", help="scratch folder (shards, run folders, log)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--no-install", action="store_true", help="the packages are installed already")
    ap.add_argument("--dry-run", action="store_true", help="check and write the plan, run nothing (CPU)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    work = (REPO / args.work).resolve() if not os.path.isabs(args.work) else Path(args.work)
    wheels = Path(args.wheels)
    result: dict = {"dry_run": args.dry_run, "python": platform.python_version(), "machine": platform.node()}
    if not args.no_install and not wheels.is_dir():
        print(f"error: no wheels folder {wheels} (build it with `make gpu-wheels`, or pass --no-install)", file=sys.stderr)
        return 2
    result["wheels"] = sorted(p.name for p in wheels.glob("*.whl")) if wheels.is_dir() else []
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="disabled")
    if args.dry_run:
        backends = ["sdpa", "flash"] if any(n.startswith("flash_attn-") for n in result["wheels"]) else ["sdpa"]
        cmds = plan_commands(args, work, backends)
        result["commands"] = cmds
        result["planner"] = planner_prediction(train_overrides(work / "x", work / "data", "sdpa", args.steps, args.seq_len))
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"gpu-check dry run: {len(cmds)} commands, planner {result['planner']['total_gb']:.1f} GB; wrote {args.out}")
        return 0

    import torch  # the one package the machine has

    if not torch.cuda.is_available():
        print("error: gpu-check needs a CUDA GPU (use --dry-run to check the plan on CPU)", file=sys.stderr)
        return 2
    result.update(device=torch.cuda.get_device_name(0), torch=torch.__version__, cuda=torch.version.cuda)
    work.mkdir(parents=True, exist_ok=True)
    log = open(work / "gpu_check.log", "w")
    steps: dict = {}
    result["steps"] = steps
    try:
        if not args.no_install:
            cmds = plan_commands(args, work, [])
            rc, sec, tail = run(cmds["install"], env, log)
            steps["install"] = {"rc": rc, "seconds": sec, **({"output": tail} if rc else {})}
            if rc:
                raise SystemExit(f"install failed (see {work / 'gpu_check.log'})")
        probe = subprocess.run([sys.executable, "-c", "import flash_attn"], env=env, capture_output=True)
        backends = ["sdpa"] + (["flash"] if probe.returncode == 0 else [])
        cmds = plan_commands(args, work, backends)
        if not (work / "data").is_dir():
            rc, sec, tail = run(cmds["prepare"], env, log)
            steps["prepare"] = {"rc": rc, "seconds": sec, **({"output": tail} if rc else {})}
        prediction = planner_prediction(train_overrides(work / "x", work / "data", "sdpa", args.steps, args.seq_len))
        result["planner"] = prediction
        result["train"] = {}
        for backend in backends:
            run_dir = work / f"train_{backend}"
            shutil.rmtree(run_dir, ignore_errors=True)
            rc, sec, tail = run(cmds[f"train_{backend}"], env, log)
            entry = {"rc": rc, "seconds": sec}
            if rc == 0:
                entry.update(summarize_run(run_dir, prediction["flops_per_token"]))
                entry["attention_line"] = next((ln for ln in tail.splitlines() if ln.startswith("attention:")), None)
                entry["peak_over_planner"] = entry["peak_mem_gb"] / prediction["total_gb"]
            else:
                entry["output"] = tail
            result["train"][backend] = entry
        result["bench"] = {}
        for bench in BENCHES:
            rc, sec, tail = run(cmds["bench_" + bench[0]], env, log)
            result["bench"][bench[0]] = {"rc": rc, "seconds": sec, "output": tail}
    except SystemExit as e:
        result["error"] = str(e)
    finally:
        log.close()
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"gpu-check: wrote {args.out}")
    failed = [k for k, v in {**steps, **result.get("train", {}), **result.get("bench", {})}.items() if v.get("rc")]
    return 1 if failed or "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
