"""tools.generate and tools.loading on a tiny checkpoint written in the training layout.

``make_tiny_run`` (also used by tests/tools/test_eval.py) trains a byte-level BPE tokenizer with
special tokens <|startoftext|>=0, <|endoftext|>=1, <|mdm_mask|>=2 and saves a random tiny model
with ``train.checkpoint.save_checkpoint``. When the lead's session fixture ``tiny_run`` (a trained
model) lands in tests/conftest.py, the ``tiny_run_dir`` fixture below can return it instead.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from model.sampling import GenerationConfig
from tests.tiny import tiny_model
from tools.generate import complete, main
from tools.loading import load_for_inference

REPO = Path(__file__).resolve().parents[2]
SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is two plus two? Answer: four.",
    "Paris is the capital of France. Rome is the capital of Italy.",
    "def add(a, b):\n    return a + b\n",
] * 20


def train_tokenizer(out: Path, vocab_size: int = 300) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[1],
                                   pad_token=SPECIALS[1], mask_token=SPECIALS[2])
    fast.save_pretrained(out)
    return out


def make_tiny_run(root: Path, seed: int = 0) -> Path:
    """A run folder ``root/run`` holding checkpoints/step_00000001 (random tiny model) + tokenizer."""
    from train.checkpoint import MODEL_PREFIX, save_checkpoint, whole

    tok_dir = train_tokenizer(root / "tok")
    model = tiny_model(seed=seed, vocab_size=304, embedding_size=320, max_sequence_length=256)
    cfg = model.config
    run = root / "run"
    state = {MODEL_PREFIX + k: whole(v) for k, v in model.state_dict().items()}
    save_checkpoint(run, 1, state=state, trainer_state={},
                    config_yaml=yaml.safe_dump({"model": cfg.to_dict()}), tokenizer_dir=tok_dir)
    return run


@pytest.fixture(scope="module")
def tiny_run_dir(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("gen"))


def test_load_for_inference_from_run_and_checkpoint_dirs(tiny_run_dir):
    model, tok = load_for_inference(tiny_run_dir)
    assert model.config.vocab_size == 304 and not model.training
    assert tok.convert_tokens_to_ids("<|mdm_mask|>") == model.config.mask_token_id
    step = tiny_run_dir / "checkpoints" / "step_00000001"
    model2, _ = load_for_inference(step, dtype="bf16")
    assert model2.transformer.wte.weight.dtype == torch.bfloat16
    assert torch.allclose(model.transformer.wte.weight, model2.transformer.wte.weight.float(), atol=1e-2)


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_for_inference(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_for_inference(tmp_path)


def test_complete_batches_and_stops(tiny_run_dir):
    model, tok = load_for_inference(tiny_run_dir)
    opts = GenerationConfig(gen_length=8, steps=8, block_length=4, temperature=0.0)
    prompts = ["The quick", "Question: what is two plus two? Answer:"]
    batched = complete(model, tok, prompts, opts, seed=0, batch_size=2)
    alone = [complete(model, tok, [p], opts, seed=0)[0] for p in prompts]
    assert batched == alone  # padding does not change a prompt's output (greedy)
    assert all(isinstance(t, str) for t in batched)
    # a stop string cuts the text
    full = complete(model, tok, prompts[:1], opts)[0]
    assert full
    stop = full[-1]
    assert complete(model, tok, prompts[:1], opts, stop=[stop])[0] == full[: full.index(stop)]


def test_cli_prints_completions(tiny_run_dir, capsys):
    rc = main(["--checkpoint", str(tiny_run_dir), "--prompt", "The quick", "--prompt", "Paris is",
               "--gen-length", "8", "--steps", "4", "--block-length", "4", "--temperature", "0.5", "--seed", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.count("=== ") == 2 and "The quick" in out and "Paris is" in out
    main(["--checkpoint", str(tiny_run_dir), "--prompt", "The quick", "--gen-length", "8", "--steps", "4",
          "--block-length", "4", "--temperature", "0.5", "--seed", "3"])
    again = capsys.readouterr().out
    assert again.split("=== ")[1] == out.split("=== ")[1]  # fixed seed -> same text


def test_cli_bad_input_one_error_line(tiny_run_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "tools.generate", "--checkpoint", str(tiny_run_dir), "--prompt", "x",
                        "--gen-length", "10", "--block-length", "4"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == ["error: gen_length (10) must be a multiple of block_length (4)"]
    r = subprocess.run([sys.executable, "-m", "tools.generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "x"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and r.stderr.strip().startswith("error: model path not found")


def test_load_for_inference_from_hf_export(tiny_run_dir, tmp_path):
    convert = pytest.importorskip("tools.convert_to_hf")
    out = tmp_path / "hf"
    assert convert.main([str(tiny_run_dir), str(out), "--dtype", "fp32"]) == 0
    hf_model, hf_tok = load_for_inference(out)
    model, tok = load_for_inference(tiny_run_dir)
    for (name, a), (_, b) in zip(hf_model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    assert hf_tok("Paris is")["input_ids"] == tok("Paris is")["input_ids"]
    opts = GenerationConfig(gen_length=8, steps=8, block_length=8)
    assert complete(hf_model, hf_tok, ["Paris is"], opts) == complete(model, tok, ["Paris is"], opts)
