"""torchrun worker for the resharding suite (launched by tests/train/test_engine_state.py).

    python -m torch.distributed.run --standalone --nproc_per_node=2 reshard_worker.py OUT.json CASE [CASE ...]

A case ``A-to-B[_nostate]`` names two layouts, each ``local`` (LocalEngine: TP1, PP1, DP1) or
``tp{T}_pp{P}_z{Z}`` (ParallelEngine; dp = world / (T·P)). Layout A trains K=2 steps; its full
weights (``model_state_dict``) and full optimizer state (``full_optimizer_state``) are taken;
A is saved as a checkpoint (``train.checkpoint.save_checkpoint`` of ``checkpoint_state()``: every
rank writes its own chunks) and then goes on one more step (the uninterrupted run). Layout B is
built from scratch (other initial weights), loads the checkpoint
(``train.checkpoint.load_into_engine``: every rank reads its own chunks) and trains that same step. Reported: relative differences of the
step's loss and grad norm, the largest absolute weight difference after it (B vs uninterrupted
A), and how far A's full optimizer state after K steps is from LocalEngine's (relative to the
tensor's largest value). ``_nostate`` loads zero moments instead (a control: the weights must
then differ). Rank 0 writes ``{case: {metric: worst value over ranks}}`` to OUT.json.
"""

from __future__ import annotations

import os
import re
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import yaml  # noqa: E402

from model.llada import build_model  # noqa: E402
from parity_worker import G, MBS, OPT, SEED, finish, lr_at, rel, run_cases, split, step_batch, tiny_config  # noqa: E402
from train.local_engine import LocalEngine  # noqa: E402

K = 2  # steps before the layout change; step K is taken after it
OTHER_SEED = 7


class Runner:
    """One engine in one layout, fed the rows of its data-parallel rank."""

    def __init__(self, layout: str, config, world: int, seed: int) -> None:
        self.layout = layout
        if layout == "local":
            self.engine = LocalEngine(build_model(config, seed), lr=1e-2, precision="fp32", device=torch.device("cpu"), **OPT)
            self.rows = range(G)
            return
        from train.layout import ParallelConfig
        from train.parallel_engine import build_parallel_engine

        m = re.fullmatch(r"tp(\d)_pp(\d)_z(\d)", layout)
        if not m:
            raise ValueError(f"bad layout {layout}")
        self.engine = build_parallel_engine(
            config, ParallelConfig(tp=int(m[1]), pp=int(m[2]), zero_stage=int(m[3])), world_size=world,
            seed=seed, lr=1e-2, precision="fp32", micro_batch_size=MBS, global_batch_size=G, **OPT,
        )
        per_dp = G // self.engine.dp_size
        self.rows = range(self.engine.dp_rank * per_dp, (self.engine.dp_rank + 1) * per_dp)

    def step(self, step: int, config):
        return self.engine.train_step(split(step_batch(step, config), self.rows, MBS), lr_at(step))

    def close(self) -> None:
        if self.layout != "local":
            self.engine.close()


def state_distance(a: dict, b: dict) -> float:
    if set(a) != set(b):
        raise AssertionError(f"optimizer state keys differ: {sorted(set(a) ^ set(b))[:5]}")
    worst = 0.0
    for k, v in b.items():
        if k == "::step":
            if int(a[k]) != int(v):
                return float("inf")
            continue
        worst = max(worst, float((a[k] - v).abs().max()) / max(float(v.abs().max()), 1e-30))
    return worst


def hf_logits_distance(ckpt, weights: dict, config, folder: str, name: str) -> float:
    """Rank 0: ``tools.convert_to_hf`` of the multi-rank checkpoint (fp32), loaded back; the
    largest logit difference from a model holding the training engine's gathered weights."""
    if dist.get_rank() != 0:
        return 0.0
    from tools.convert_to_hf import convert_checkpoint
    from tools.loading import load_for_inference, model_from_state_dict

    hf = convert_checkpoint(ckpt, os.path.join(folder, name + "-hf"), dtype="fp32")
    exported, _ = load_for_inference(hf, require_tokenizer=False)
    trained = model_from_state_dict(config, weights)
    ids = torch.randint(0, 125, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return float((exported(ids) - trained(ids)).abs().max())


def run_case(name: str, world: int, config, ref_state: dict, folder: str) -> dict:
    from train.checkpoint import load_into_engine, save_checkpoint

    m = re.fullmatch(r"(\w+?)-to-(\w+?)(_nostate)?", name)
    if not m:
        raise ValueError(f"bad case name {name}")
    a = Runner(m[1], config, world, SEED)
    for step in range(K):
        a.step(step, config)
    opt = a.engine.full_optimizer_state()
    res = {"state": state_distance(opt, ref_state), "step_count": int(opt["::step"])}
    ckpt = save_checkpoint(os.path.join(folder, name), K, state=a.engine.checkpoint_state(), trainer_state={},
                           config_yaml=yaml.safe_dump({"model": config.to_dict()}), tokenizer_dir=None, rng=False)
    res["hf_logits"] = hf_logits_distance(ckpt, a.engine.model_state_dict(), config, folder, name)
    want = a.step(K, config)
    want_weights = a.engine.model_state_dict()
    a.close()
    if m[3]:
        opt = {k: v if k == "::step" else torch.zeros_like(v) for k, v in opt.items()}
    b = Runner(m[2], config, world, OTHER_SEED)
    load_into_engine(ckpt, b.engine)
    if m[3]:
        b.engine.load_full_optimizer_state(opt)
    got = b.step(K, config)
    got_weights = b.engine.model_state_dict()
    b.close()
    res["loss"] = rel(got.loss, want.loss)
    res["norm"] = rel(got.grad_norm, want.grad_norm)
    res["weights"] = max(float((got_weights[k] - v).abs().max()) for k, v in want_weights.items())
    return res


def main() -> int:
    out_path, cases = sys.argv[1], sys.argv[2:]
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*(CUDA_DEVICE_MAX_CONNECTIONS|Transformer Engine|Apex).*")
    from train.distributed import init_distributed

    init_distributed(use_cuda=False)
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    config = tiny_config()
    ref = Runner("local", config, world, SEED)
    for step in range(K):
        ref.step(step, config)
    ref_state = ref.engine.full_optimizer_state()
    folder = os.path.join(os.path.dirname(os.path.abspath(out_path)), "checkpoints")
    merged = run_cases(cases, lambda case: run_case(case, world, config, ref_state, folder))
    if rank == 0:
        for case, per_rank in merged.items():
            if "error" not in per_rank:
                keys = ("loss", "norm", "weights", "state", "step_count", "hf_logits")
                merged[case] = {k: max(r[k] for r in per_rank) for k in keys}
    return finish(out_path, merged)


if __name__ == "__main__":
    sys.exit(main())
