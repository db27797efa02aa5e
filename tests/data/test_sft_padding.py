"""SFT padding (issue #19 item 2): every example is EOS-padded to the longest example of the GLOBAL
batch, and each row's loss is divided by its answer length counted to that length. This is LLaDA's
rule (GUIDELINES.md: pad to the mini-batch's longest) when the global batch is one mini-batch, and
it does not depend on the data-parallel or micro-batch split."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data.config import DataConfig, SourceConfig
from data.loader import build_loader
from data.prepare import prepare
from data.sources import ReadOptions
from model.objective import draw_noise
from tests.conftest import REPO, run_module
from tests.data.conftest import write_jsonl
from tests.model import llada_reference as ref

SEQ_LEN, GBS = 128, 4
EOS, MASK = 1, 2


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory, small_tokenizer):
    root = tmp_path_factory.mktemp("sft")
    rows = [{"prompt": f"Q{i} " + "alpha " * (i % 9), "response": f"A{i} " + "beta " * (2 * (i % 7))}
            for i in range(48)]
    src = write_jsonl(root / "sft.jsonl", rows)
    prepare([str(src)], str(root / "shards"), tokenizer=small_tokenizer, opts=ReadOptions(sft=True), progress=False)
    return root / "shards"


def make_loader(path, dp_rank=0, dp_size=1):
    cfg = DataConfig(sources=[SourceConfig(path=str(path))], validation_fraction=0.0)
    return build_loader(cfg, seq_len=SEQ_LEN, global_batch_size=GBS, dp_rank=dp_rank, dp_size=dp_size, seed=0)


def examples_of_step(ld, step):
    """The global batch's real examples (tokens, prompt length), read from the shard index."""
    index = step * GBS + np.arange(GBS)
    source, sample = ld.locate(index)
    out = []
    for k, s in zip(source, sample):
        src = ld.sources[int(k)]
        doc = int(src.examples[int(s)])
        lo, hi = int(src.doc_starts[doc]), int(src.doc_starts[doc + 1])
        n = min(hi - lo, SEQ_LEN)
        out.append((src.shards.read(lo, n).tolist(), int(src.prompt_lengths[doc])))
    return out


def test_examples_have_mixed_lengths(sft_dir):
    lengths = [len(e) for step in range(4) for e, _ in examples_of_step(make_loader(sft_dir), step)]
    assert min(lengths) < max(lengths) < SEQ_LEN  # padding to SEQ_LEN would differ from LLaDA's rule


def test_training_loss_and_length_follow_llada(sft_dir, tmp_path):
    """`python -m train` with train.objective=sft: the logged length of each step is its global
    batch's longest example, and the step-0 loss (before any update) equals LLaDA's SFT loss of
    that batch computed by the reference on the same initial model and the same noise."""
    out = tmp_path / "run"
    run_module([
        "-m", "train", str(REPO / "configs" / "demo.yaml"), "model=configs/model/tiny.yaml", f"train.out_dir={out}",
        "train.max_steps=3",
        "train.objective=sft", f"train.seq_len={SEQ_LEN}", f"train.global_batch_size={GBS}",
        "train.micro_batch_size=2", "train.checkpoint_every=0", f"data.sources=[{{path: {sft_dir}}}]",
        "data.validation_fraction=0.0", "logging.wandb=disabled", "logging.progress_bar=false",
        "logging.log_every=1", "eval.every=0",
    ])
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ld = make_loader(sft_dir)
    for record in logged:
        examples = examples_of_step(ld, record["data_step"])
        assert record["seq_len"] == max(len(e) for e, _ in examples), record
    import yaml

    from model.config import ModelConfig
    from model.llada import build_model

    cfg = ModelConfig(**yaml.safe_load((REPO / "configs" / "model" / "tiny.yaml").read_text()))
    model = build_model(cfg, seed=0)
    examples = examples_of_step(ld, 0)
    noise = draw_noise(0, 0, torch.arange(GBS), SEQ_LEN, GBS)
    with torch.no_grad():
        expected = ref.sft_loss(model, [e for e, _ in examples], [p for _, p in examples], noise.t, noise.uniforms,
                                eos_id=EOS, mask_id=MASK)
    first = next(r for r in logged if r["data_step"] == 0)
    assert first["loss"] == pytest.approx(float(expected), rel=1e-5)


def losses(model, ld, step, micro_batch_size):
    from train.local_engine import micro_batch_loss
    from train.trainer import Trainer, objective_of

    train = SimpleNamespace(global_batch_size=GBS, seq_len=SEQ_LEN, mask_eps=1e-3, stratified_t=True, keyed_noise=True,
                            objective="sft", micro_batch_size=micro_batch_size,
                            random_length_prob=0.0)
    fake = SimpleNamespace(cfg=SimpleNamespace(train=train, model=model.config),
                           objective=objective_of(train, model.config.mask_token_id, 1))
    batch = ld.batch(step)
    mbs, _ = Trainer.micro_batches(fake, batch, step, seed=0, length=int(batch["pad_length"]))
    with torch.no_grad():
        return int(batch["pad_length"]), sum(float(micro_batch_loss(model, mb)[0]) for mb in mbs)


def test_pad_length_and_loss_do_not_depend_on_the_split(sft_dir):
    from tests.tiny import tiny_model

    model = tiny_model(seed=0, vocab_size=512, embedding_size=512)
    for step in range(3):
        length, single = losses(model, make_loader(sft_dir), step, micro_batch_size=GBS)
        assert length == max(len(e) for e, _ in examples_of_step(make_loader(sft_dir), step))
        parts = [losses(model, make_loader(sft_dir, r, 2), step, micro_batch_size=1) for r in range(2)]
        assert [p[0] for p in parts] == [length, length]  # every rank pads to the same length
        assert sum(p[1] for p in parts) == pytest.approx(single, rel=1e-6)
