"""torchrun worker for the layout parity suite (launched by tests/train/test_parallel_engine.py).

    python -m torch.distributed.run --standalone --nproc_per_node=N parity_worker.py OUT.json CASE [CASE ...]

Each rank computes the single-process reference itself (LocalEngine, same model config, seed,
data and keyed noise), then builds each case's layout in turn, trains 5 optimizer steps and
compares losses, grad norms, per-row sums, an eval pass and the final full weights. Rank 0
writes ``{case: {metric: worst value over ranks}}`` to OUT.json. A case name is
``tp{T}_pp{P}_z{Z}[_ac-{mode}][_load][_sp][_split{a}{b}][_resume]`` (dp = world / (T·P)):
``_load`` initializes the engine with ``load_model_state_dict`` from a model of another seed
instead of the drawn weights; ``_sp`` turns on sequence parallelism; ``_split13`` gives
``pp_split=[1, 3]``; ``_resume`` saves a checkpoint (``train.checkpoint``) after step 2, builds a fresh engine, loads the
checkpoint and goes on (resume in the same layout); ``_bf16`` trains in DeepSpeed bf16 (fp32
masters) against the fp32 reference.
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from model.config import ModelConfig  # noqa: E402
from model.llada import build_model  # noqa: E402
from model.objective import draw_noise, forward_process, row_weights  # noqa: E402
from train.engine import MicroBatch  # noqa: E402
from train.local_engine import LocalEngine  # noqa: E402

SEED, OTHER_SEED = 1234, 99
G, L, MBS, STEPS = 8, 16, 2, 5
OPT = dict(weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, grad_clip=0.5)


def tiny_config(n_layers: int = 4) -> ModelConfig:
    return ModelConfig(
        d_model=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, mlp_hidden_size=128, vocab_size=128,
        embedding_size=128, max_sequence_length=32, mask_token_id=127, eos_token_id=126,
        pad_token_id=126, bos_token_id=125,
    )


def lr_at(step: int) -> float:
    return 1e-2 * (step + 1) / STEPS


def step_batch(step: int, config: ModelConfig) -> MicroBatch:
    """The step's global batch: random tokens, keyed noise by global sample index."""
    tokens = torch.randint(0, 125, (G, L), generator=torch.Generator().manual_seed(1000 + step))
    noise = draw_noise(SEED, step, step * G + torch.arange(G), L, G)
    noisy, masked = forward_process(tokens, noise, config.mask_token_id)
    return MicroBatch(noisy, tokens, masked, noise.p_mask, row_weights(G, L, G))


def split(batch: MicroBatch, rows: range, mbs: int) -> list[MicroBatch]:
    out = []
    for start in range(rows.start, rows.stop, mbs):
        sl = slice(start, start + mbs)
        out.append(MicroBatch(*(getattr(batch, f)[sl] for f in batch.__dataclass_fields__)))
    return out


def reference(config: ModelConfig, seed: int) -> dict:
    engine = LocalEngine(build_model(config, seed), lr=1e-2, precision="fp32", device=torch.device("cpu"), **OPT)
    losses, norms, rows = [], [], []
    for step in range(STEPS):
        out = engine.train_step(split(step_batch(step, config), range(G), MBS), lr_at(step))
        losses.append(out.loss), norms.append(out.grad_norm), rows.append(out.per_sample)
    evals = engine.eval_loss(split(step_batch(0, config), range(G), MBS))
    return dict(losses=losses, norms=norms, rows=rows, eval=evals, state=engine.model_state_dict())


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def run_case(name: str, world: int, config: ModelConfig, refs: dict) -> dict:
    from train.layout import ParallelConfig
    from train.parallel_engine import build_parallel_engine

    m = re.fullmatch(r"tp(\d)_pp(\d)_z(\d)(?:_ac-([a-z]+))?(_load)?(_sp)?(?:_split(\d+))?(_resume)?(_bf16)?", name)
    if not m:
        raise ValueError(f"bad case name {name}")
    tp, pp, zero = int(m[1]), int(m[2]), int(m[3])
    ac, load, sp, resume = m[4] or "none", bool(m[5]), bool(m[6]), bool(m[8])
    pp_split = [int(c) for c in m[7]] if m[7] else None
    precision = "bf16" if m[9] else "fp32"

    def build():
        return build_parallel_engine(
            config, ParallelConfig(tp=tp, pp=pp, zero_stage=zero, sequence_parallel=sp, pp_split=pp_split),
            world_size=world, seed=SEED, lr=1e-2, precision=precision, micro_batch_size=MBS,
            global_batch_size=G, activation_checkpointing=ac, **OPT,
        )

    engine = build()
    ref = refs[OTHER_SEED if load else SEED]
    if load:
        engine.load_model_state_dict(build_model(config, OTHER_SEED).state_dict())
    per_dp = G // engine.dp_size
    mine = range(engine.dp_rank * per_dp, (engine.dp_rank + 1) * per_dp)
    res = dict(loss=0.0, norm=0.0, rows=0.0, eval=0.0, weights=0.0, losses=[], norms=[])
    for step in range(STEPS):
        out = engine.train_step(split(step_batch(step, config), mine, MBS), lr_at(step))
        res["losses"].append(out.loss), res["norms"].append(out.grad_norm)
        res["loss"] = max(res["loss"], rel(out.loss, ref["losses"][step]))
        res["norm"] = max(res["norm"], rel(out.grad_norm, ref["norms"][step]))
        want = ref["rows"][step][mine.start : mine.stop]
        res["rows"] = max(res["rows"], float(((out.per_sample - want).abs() / want.abs()).max()))
        if resume and step == 2:
            from train.checkpoint import load_into_engine, save_checkpoint

            ckpt = save_checkpoint(os.path.join(os.environ["PARITY_TMP"], name), step + 1, state=engine.checkpoint_state(),
                                   trainer_state={}, config_yaml="", tokenizer_dir=None, rng=False)
            engine.close()
            engine = build()
            load_into_engine(ckpt, engine)
    evals = engine.eval_loss(split(step_batch(0, config), mine, MBS))
    want = ref["eval"][mine.start : mine.stop]
    res["eval"] = float(((evals - want).abs() / want.abs()).max())
    state = engine.model_state_dict()
    if list(state) != list(ref["state"]):
        raise AssertionError(f"state dict names differ: {sorted(set(state) ^ set(ref['state']))[:5]}")
    res["weights"] = max(float((state[k] - v).abs().max()) for k, v in ref["state"].items())
    # the checkpoint path's gather to rank 0 only gives rank 0 the same dict, the others nothing
    only0 = engine.model_state_dict(only_rank0=True)
    if dist.get_rank() == 0:
        if only0.keys() != state.keys() or not all(torch.equal(only0[k], v) for k, v in state.items()):
            raise AssertionError("model_state_dict(only_rank0=True) differs from the all-ranks gather on rank 0")
    elif only0:
        raise AssertionError(f"model_state_dict(only_rank0=True) returned {len(only0)} tensors on rank {dist.get_rank()}")
    engine.close()
    return res


def run_cases(cases: list[str], run) -> dict:
    """Run ``run(case)`` for each case on every rank (stopping at the first error, reported) and
    gather the results. Every rank returns case -> the list of per-rank results, or
    ``{"error": ...}`` when a case failed on some rank or was not reached."""
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for case in cases:
        try:
            results[case] = run(case)
        except Exception as exc:  # report, and keep the other ranks in step as far as possible
            results[case] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
            print(f"[rank {rank}] {case}: {results[case]['trace']}", file=sys.stderr, flush=True)
            break
    gathered: list = [None] * world
    dist.all_gather_object(gathered, results)
    merged: dict = {}
    for case in cases:
        per_rank = [g.get(case) for g in gathered]
        if any(r is None for r in per_rank):
            merged[case] = {"error": "not run (an earlier case failed)"}
            continue
        errors = [r["error"] for r in per_rank if "error" in r]
        merged[case] = {"error": errors[0]} if errors else per_rank
    return merged


def finish(out_path: str, merged: dict) -> int:
    """Rank 0 writes ``merged`` to ``out_path`` atomically; every rank leaves the process group."""
    if dist.get_rank() == 0:
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(merged, f, indent=1)
        os.replace(tmp, out_path)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def main() -> int:
    out_path, cases = sys.argv[1], sys.argv[2:]
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's c10d renames used by megatron
    warnings.filterwarnings("ignore", message=".*(CUDA_DEVICE_MAX_CONNECTIONS|Transformer Engine|Apex).*")
    from train.distributed import init_distributed

    init_distributed(use_cuda=False)
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    config = tiny_config()
    refs = {SEED: reference(config, SEED)}
    if any("_load" in c for c in cases):
        refs[OTHER_SEED] = reference(config, OTHER_SEED)
    merged = run_cases(cases, lambda case: run_case(case, world, config, refs))
    if rank == 0:
        for case, per_rank in merged.items():
            if "error" in per_rank:
                continue
            merged[case] = {k: max(r[k] for r in per_rank) for k in ("loss", "norm", "rows", "eval", "weights")}
            merged[case]["same_on_all_ranks"] = all(
                r["losses"] == per_rank[0]["losses"] and r["norms"] == per_rank[0]["norms"] for r in per_rank
            )
            merged[case]["losses"] = per_rank[0]["losses"]
            merged[case]["norms"] = per_rank[0]["norms"]
        merged["_reference"] = {"losses": refs[SEED]["losses"], "norms": refs[SEED]["norms"]}
    return finish(out_path, merged)


if __name__ == "__main__":
    sys.exit(main())
