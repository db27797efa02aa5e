"""``python -m tools.bench comm``: bytes each rank sends per optimizer step, by collective and by
process group (TP, DP, PP), next to the minimum for the layout, and when the gradient reductions
go out relative to the backward pass.

Each layout is built by ``train.parallel_engine.build_parallel_engine`` on gloo (a tiny LLaDA),
trains one warm-up step, then one counted step under ``tools.benchmarks.collectives.CollectiveCounter``.
A case is ``tp{T}_pp{P}_dp{D}_z{Z}[_sp][_bf16][_before]`` (world = T·P·D ranks; ``_before``: the
DeepSpeed config before issue 16, ``deepspeed_config(..., overlap=False)``). Cases are grouped
by world size, one ``torchrun`` per size. Formulas: docs/communication.md, ``tools.plan_comm``.

    python -m tools.bench comm [--cases tp1_pp1_dp2_z1_bf16 ...] [--out comm.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

LAYOUTS = [
    "tp1_pp1_dp2_z0", "tp1_pp1_dp2_z1", "tp1_pp1_dp2_z2", "tp1_pp1_dp2_z3", "tp1_pp1_dp2_z1_bf16",
    "tp1_pp1_dp2_z2_bf16", "tp1_pp1_dp4_z1_bf16", "tp2_pp1_dp1_z0", "tp2_pp1_dp2_z1_bf16",
    "tp2_pp1_dp2_z1_sp_bf16", "tp1_pp2_dp1_z0", "tp1_pp2_dp2_z1_bf16",
]
DEFAULT_CASES = [c for layout in LAYOUTS for c in (layout + "_before", layout)]  # before issue 16, now
CASE_RE = re.compile(r"tp(\d)_pp(\d)_dp(\d)_z(\d)(_sp)?(_bf16)?(_before)?")
GLOBAL_BATCH, SEQ, MBS, SEED = 16, 16, 2, 1234


def parse_case(name: str) -> dict:
    m = CASE_RE.fullmatch(name)
    if not m:
        raise ValueError(f"bad case {name!r}: expected tp{{T}}_pp{{P}}_dp{{D}}_z{{Z}}[_sp][_bf16][_before]")
    tp, pp, dp, zero = (int(m[i]) for i in range(1, 5))
    return dict(tp=tp, pp=pp, dp=dp, zero=zero, sp=bool(m[5]), bf16=bool(m[6]), before=bool(m[7]), world=tp * pp * dp)


def tiny_config():
    from model.config import ModelConfig

    return ModelConfig(
        d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, mlp_hidden_size=128, vocab_size=128,
        embedding_size=128, max_sequence_length=32, mask_token_id=127, eos_token_id=126,
        pad_token_id=126, bos_token_id=125,
    )


def _batches(step: int, config, rows: range):
    import torch

    from model.objective import draw_noise, forward_process
    from train.engine import MicroBatch

    g = GLOBAL_BATCH
    tokens = torch.randint(0, 125, (g, SEQ), generator=torch.Generator().manual_seed(1000 + step))
    noise = draw_noise(SEED, step, step * g + torch.arange(g), SEQ, g)
    noisy, masked = forward_process(tokens, noise, config.mask_token_id)
    full = MicroBatch(noisy, tokens, masked, noise.p_mask, torch.full((g,), 1.0 / (g * SEQ)))
    return [
        MicroBatch(*(getattr(full, f)[s : s + MBS] for f in full.__dataclass_fields__))
        for s in range(rows.start, rows.stop, MBS)
    ]


def _track_pipeline_backward(engine, counter) -> None:
    """DeepSpeed's pipeline engine runs backward through ``_INSTRUCTION_MAP`` (class-level); give
    this engine a copy whose BackwardPass entry reports to the counter."""
    from deepspeed.runtime.pipe import schedule

    table = dict(type(engine)._INSTRUCTION_MAP)
    original = table[schedule.BackwardPass]

    def backward_pass(self, buffer_id):
        counter.backward_started()
        try:
            return original(self, buffer_id)
        finally:
            counter.backward_finished()

    table[schedule.BackwardPass] = backward_pass
    engine._INSTRUCTION_MAP = table


def run_case(name: str) -> dict:
    import torch
    import torch.distributed as dist

    import train.parallelize as parallelize_module
    from tools.benchmarks.collectives import CollectiveCounter, bracket_backward
    from train.layout import ParallelConfig
    from train.parallel_engine import build_parallel_engine

    c = parse_case(name)
    if c["world"] != dist.get_world_size():
        raise ValueError(f"{name} needs {c['world']} ranks, this run has {dist.get_world_size()}")
    config = tiny_config()
    original_config = parallelize_module.deepspeed_config
    if c["before"]:
        parallelize_module.deepspeed_config = lambda *a, **k: original_config(*a, **{**k, "overlap": False})
    try:
        engine = build_parallel_engine(
            config, ParallelConfig(tp=c["tp"], pp=c["pp"], zero_stage=c["zero"], sequence_parallel=c["sp"]),
            world_size=c["world"], seed=SEED, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,
            grad_clip=1.0, precision="bf16" if c["bf16"] else "fp32", micro_batch_size=MBS,
            global_batch_size=GLOBAL_BATCH,
        )
    finally:
        parallelize_module.deepspeed_config = original_config
    per_dp = GLOBAL_BATCH // engine.dp_size
    rows = range(engine.dp_rank * per_dp, (engine.dp_rank + 1) * per_dp)
    engine.train_step(_batches(0, config, rows), 1e-3)  # warm-up: lazy buffers, first-step paths
    params = [p for layer in engine.pm.layers for p in layer.parameters()]
    psi = sum(int(getattr(p, "ds_numel", p.numel())) for p in params)
    micro = _batches(1, config, rows)
    masked = int(sum(int(mb.masked.sum()) for mb in micro))
    ds = engine.engine
    with CollectiveCounter() as counter:
        counter.track_backward(params)
        if c["pp"] > 1:
            _track_pipeline_backward(ds, counter)
            undo = lambda: None  # noqa: E731
        else:
            undo = bracket_backward(ds, counter)
        counter.reset()
        out = engine.train_step(micro, 1e-3)
        undo()
    optimizer = ds.optimizer
    result = dict(
        case=name, **c, psi=psi, micro_batches=engine.layout.grad_accum_steps, tokens=MBS * SEQ, masked=masked,
        stage_layers=len([lay for lay in engine.pm.layers if type(lay).__name__ == "TransformerLayer"]),
        d_model=config.d_model, optimizer=type(optimizer).__name__, loss=out.loss,
        totals=counter.totals(), timing=counter.gradient_timing(),
        grad_bytes_by_micro_step={str(k): v for k, v in counter.sent_by_micro_step().items()}, unwrapped=list(counter.unwrapped),
    )
    engine.close()
    torch.manual_seed(0)
    return result


def worker(out_path: str, cases: list[str]) -> int:
    import warnings

    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    from train.distributed import init_distributed

    init_distributed(use_cuda=False)
    results = {}
    for case in cases:
        try:
            results[case] = run_case(case)
        except Exception as exc:  # noqa: BLE001 - reported, the other ranks fail the same way
            import traceback

            results[case] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
            print(results[case]["trace"], file=sys.stderr, flush=True)
            break
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        with open(out_path + ".tmp", "w") as f:
            json.dump({case: [g.get(case) for g in gathered] for case in cases}, f)
        os.replace(out_path + ".tmp", out_path)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def launch(cases: list[str], timeout: float = 1200) -> dict:
    """Run ``cases`` (grouped by world size, one torchrun each); ``{case: [per-rank result]}``."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    by_world: dict[int, list[str]] = {}
    for case in cases:
        by_world.setdefault(parse_case(case)["world"], []).append(case)
    results: dict = {}
    for world, group in sorted(by_world.items()):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "comm.json")
            env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
            env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                   "-m", "tools.benchmarks.comm", "--worker", out, *group]
            proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0 or not os.path.exists(out):
                raise RuntimeError(f"torchrun ({world} ranks) failed, rc={proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
            with open(out) as f:
                results.update(json.load(f))
    return results


# ----- report -----------------------------------------------------------------------------------
def group_bytes(rank_result: dict, group: str) -> float:
    return sum(cell["sent"] for cell in rank_result["totals"].get(group, {}).values())


def minimum(r: dict) -> dict:
    """The layout's minimum bytes per rank per step (tools.plan_comm) for one rank's result."""
    from tools.plan_comm import dp_minimum, pp_bytes, tp_minimum

    grad_bytes = weight_bytes = 2 if r["bf16"] else 4  # bf16 runs: bf16 gradients on the wire
    act = 2 if r["bf16"] else 4
    dp = dp_minimum(r["psi"], r["dp"], r["zero"], grad_bytes, weight_bytes, r["micro_batches"])
    return {
        "DP": dp["grad"] + dp["param"], "DP_grad": dp["grad"], "DP_param": dp["param"],
        "TP": tp_minimum(r["tokens"], r["d_model"], r["stage_layers"], r["tp"], act, r["micro_batches"]),
        "PP": pp_bytes(r["tokens"], r["d_model"], act, r["micro_batches"], r["pp"]),
    }


def summarize(results: dict) -> list[dict]:
    rows = []
    for case, per_rank in results.items():
        if any(r is None or "error" in r for r in per_rank):
            err = next((r for r in per_rank if r and "error" in r), {"error": "not run"})["error"]
            rows.append({"case": case, "error": err})
            continue
        r0 = per_rank[0]
        worst = lambda g, per_rank=per_rank: max(group_bytes(r, g) for r in per_rank)  # noqa: E731
        mins = [minimum(r) for r in per_rank]
        timing = r0["timing"] or {}
        rows.append({
            "case": case, "optimizer": r0["optimizer"], "micro_batches": r0["micro_batches"],
            "DP": worst("DP"), "DP_min": max(m["DP"] for m in mins),
            "TP": worst("TP"), "TP_min": max(m["TP"] for m in mins),
            "PP": worst("PP"), "PP_min": max(m["PP"] for m in mins),
            "other": max(sum(group_bytes(r, g) for g in r["totals"] if g not in ("DP", "TP", "PP")) for r in per_rank),
            "during": timing.get("during_backward"), "after": timing.get("after_backward"),
            "first_ready": timing.get("first_ready"), "last_ready": timing.get("last_ready"),
            "unwrapped": sum(len(r["unwrapped"]) for r in per_rank),
            "ops": {g: {op: cell["calls"] for op, cell in ops.items()} for g, ops in r0["totals"].items()},
        })
    return rows


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else ("-" if not a else "inf")


def format_table(rows: list[dict]) -> str:
    head = ("| case | optimizer | m | DP bytes/rank | DP min | DP/min | TP bytes | TP min | PP bytes | PP min "
            "| grad reductions during / after bwd | grads ready at first / last |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | error: {r['error'][:80]} |" + " |" * 10)
            continue
        ready = "-" if r["first_ready"] is None else f"{r['first_ready']:.2f} / {r['last_ready']:.2f}"
        lines.append(
            f"| {r['case']} | {r['optimizer']} | {r['micro_batches']} | {r['DP']:,.0f} | {r['DP_min']:,.0f} | "
            f"{_ratio(r['DP'], r['DP_min'])} | {r['TP']:,.0f} | {r['TP_min']:,.0f} | {r['PP']:,.0f} | {r['PP_min']:,.0f} | "
            f"{r['during']} / {r['after']} | {ready} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--worker":
        return worker(argv[1], argv[2:])
    ap = argparse.ArgumentParser(prog="python -m tools.bench comm", description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=DEFAULT_CASES)
    ap.add_argument("--out", help="write the per-rank results and the summary as JSON here")
    args = ap.parse_args(argv)
    try:
        for case in args.cases:
            parse_case(case)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = launch(args.cases)
    rows = summarize(results)
    print(format_table(rows))
    if any(r.get("unwrapped") for r in rows):
        print("warning: c10d operators ran outside the counter's wrappers: " +
              ", ".join(r["case"] for r in rows if r.get("unwrapped")), file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"results": results, "summary": rows}, f, indent=1)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
