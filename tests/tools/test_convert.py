"""tools.convert_to_hf / tools.convert_from_hf: layout, round trips and errors.

Checkpoints are written with ``train.checkpoint.save_checkpoint`` from a built model's state dict
(``config.yaml`` with a ``model:`` section, a tiny HF tokenizer), so these tests do not depend on
the trainer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.hf import INDEX_FILE, expected_hf_tensors
from model.llada import build_model
from tests.conftest import REPO, run_module
from tests.tiny import tiny_model_config
from tools import convert_from_hf, convert_to_hf
from train.checkpoint import MODEL_PREFIX, load_model_weights, save_checkpoint, whole

SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<unk>"]  # ids 0, 1, 2, 3


# ----- fixtures built by hand ---------------------------------------------------------------------
def make_tokenizer(folder: Path) -> Path:
    """A tiny BPE tokenizer: <|startoftext|>=0, <|endoftext|>=1, <|mdm_mask|>=2, <unk>=3."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "masked diffusion models"], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>", mask_token="<|mdm_mask|>", unk_token="<unk>",
    )
    fast.save_pretrained(folder)
    return folder


def make_checkpoint(
    run_dir: Path, config: ModelConfig | None = None, *, seed: int = 1, step: int = 5,
    tokenizer: bool = True, state: dict | None = None,
) -> Path:
    """A run folder ``run_dir/checkpoints/step_X/`` in train.checkpoint's layout. Returns run_dir."""
    config = config or tiny_model_config()
    if state is None:
        state = build_model(config, seed=seed).state_dict()
    run_config = {"model": config.to_dict(), "train": {"seed": seed}}
    tok = make_tokenizer(run_dir.parent / f"{run_dir.name}-tokenizer") if tokenizer else None
    save_checkpoint(run_dir, step, state={MODEL_PREFIX + k: whole(v) for k, v in state.items()}, trainer_state={},
                    config_yaml=OmegaConf.to_yaml(OmegaConf.create(run_config)), tokenizer_dir=tok)
    return run_dir


def hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    index = json.loads((hf_dir / INDEX_FILE).read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(hf_dir / shard))
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return make_checkpoint(tmp_path / "run")


# ----- export -------------------------------------------------------------------------------------
def test_export_layout_shards_and_metadata(run_dir, tmp_path):
    out = tmp_path / "hf"
    convert_to_hf.convert_checkpoint(run_dir, out, dtype="fp32", max_shard_size="70KB")
    config = tiny_model_config()
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    tensors = hf_tensors(out)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected_hf_tensors(config)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tensors.values())
    for shard in shards:  # at most one shard's worth of data per file (no tensor here exceeds it)
        with safe_open(out / shard, framework="pt") as f:
            assert sum(f.get_tensor(k).numel() * 4 for k in f.keys()) <= 70_000
    _, state = load_model_weights(run_dir)
    for name, t in state.items():
        assert torch.equal(tensors["model." + name], t)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llada" and cfg["architectures"] == ["LLaDAModelLM"]
    assert cfg["auto_map"]["AutoModel"] == "modeling_llada.LLaDAModelLM"
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_llada.LLaDAModelLM"
    assert cfg["auto_map"]["AutoConfig"] == "configuration_llada.LLaDAConfig"
    assert (cfg["d_model"], cfg["n_layers"], cfg["mask_token_id"], cfg["use_cache"]) == (64, 2, 2, False)
    assert cfg["torch_dtype"] == "float32"

    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"], gen["mask_token_id"]) == (0, 1, 1, 2)
    assert (gen["steps"], gen["gen_length"], gen["block_length"], gen["remasking"]) == (128, 128, 128, "low_confidence")

    for name in ("configuration_llada.py", "modeling_llada.py"):
        text = (out / name).read_text()
        assert "difftron" not in text.split('"""', 2)[-1]  # no project import after the docstring
        assert "from model" not in text and "import model" not in text

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert (tok.bos_token_id, tok.eos_token_id, tok.mask_token_id) == (0, 1, 2)
    # portable across transformers 4.x and 5.x (5.x writes "TokenizersBackend")
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (out / "tokenizer.json").read_bytes() == (run_dir / "checkpoints/step_00000005/tokenizer/tokenizer.json").read_bytes()
    assert not list(tmp_path.glob(".hf.tmp-*"))  # the temporary folder was renamed away


def test_export_bf16_and_sampler_options(run_dir, tmp_path):
    out = tmp_path / "hf"
    rc = convert_to_hf.main([str(run_dir), str(out), "--steps", "64", "--gen-length", "64",
                             "--block-length", "32", "--remasking", "random"])
    assert rc == 0
    tensors = hf_tensors(out)
    _, state = load_model_weights(run_dir)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    for name, t in state.items():
        assert torch.equal(tensors["model." + name], t.to(torch.bfloat16))
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["steps"], gen["gen_length"], gen["block_length"], gen["remasking"]) == (64, 64, 32, "random")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_parse_size():
    assert convert_to_hf.parse_size("5GB") == 5 * 10**9
    assert convert_to_hf.parse_size("2GiB") == 2 * 2**30
    assert convert_to_hf.parse_size("500mb") == 500 * 10**6
    with pytest.raises(ValueError, match="max-shard-size"):
        convert_to_hf.parse_size("lots")


# ----- import and round trips ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_hf_to_checkpoint_to_hf_is_bit_identical(run_dir, tmp_path, dtype):
    first = tmp_path / "hf1"
    convert_to_hf.convert_checkpoint(run_dir, first, dtype=dtype, max_shard_size="100KB")
    ckpt = convert_from_hf.convert_hf_dir(first, tmp_path / "run2")
    second = tmp_path / "hf2"
    convert_to_hf.convert_checkpoint(tmp_path / "run2", second, dtype=dtype, max_shard_size="100KB")
    a, b = hf_tensors(first), hf_tensors(second)
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
        assert torch.equal(bits(a[name]), bits(b[name])), name
    assert (first / "config.json").read_text() == (second / "config.json").read_text()
    assert (first / "generation_config.json").read_text() == (second / "generation_config.json").read_text()
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    assert ckpt == tmp_path / "run2" / "checkpoints" / "step_00000000"


def test_from_hf_checkpoint_layout(run_dir, tmp_path):
    hf = tmp_path / "hf"
    convert_to_hf.convert_checkpoint(run_dir, hf, dtype="bf16")
    out = tmp_path / "imported"
    assert convert_from_hf.main([str(hf), str(out), "--step", "7"]) == 0
    ckpt = out / "checkpoints" / "step_00000007"
    assert (out / "checkpoints" / "latest").read_text() == "step_00000007"
    raw = OmegaConf.to_container(OmegaConf.load(ckpt / "config.yaml"))
    assert list(raw) == ["model"] and ModelConfig.from_dict(raw["model"]) == tiny_model_config()
    config, state = load_model_weights(out)  # what train.init_from=OUT reads
    assert config == tiny_model_config()
    _, original = load_model_weights(run_dir)
    assert sorted(state) == sorted(original)
    for name, t in original.items():
        assert state[name].dtype == torch.float32
        assert torch.equal(state[name], t.to(torch.bfloat16).float())
    assert (ckpt / "tokenizer" / "tokenizer.json").is_file()
    # the imported weights build the same model
    model = build_model(config, device="meta")
    model.load_state_dict(state, assign=True)


def test_from_hf_single_file_without_index(run_dir, tmp_path):
    hf = tmp_path / "hf"
    convert_to_hf.convert_checkpoint(run_dir, hf, dtype="fp32")
    tensors = hf_tensors(hf)
    for shard in hf.glob("model-*.safetensors"):
        shard.unlink()
    (hf / INDEX_FILE).unlink()
    save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    convert_from_hf.convert_hf_dir(hf, tmp_path / "imported", dtype="bf16")
    _, state = load_model_weights(tmp_path / "imported")
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    assert torch.equal(state["transformer.ln_f.weight"], tensors["model.transformer.ln_f.weight"].bfloat16())


# ----- errors -----------------------------------------------------------------------------------
@pytest.fixture
def hf_dir(run_dir, tmp_path) -> Path:
    out = tmp_path / "hf"
    convert_to_hf.convert_checkpoint(run_dir, out, dtype="fp32", max_shard_size="100KB")
    return out


def test_error_missing_shard(hf_dir, tmp_path, capsys):
    shard = sorted(hf_dir.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {shard.name} is listed but missing"):
        convert_from_hf.convert_hf_dir(hf_dir, tmp_path / "x")
    assert convert_from_hf.main([str(hf_dir), str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and shard.name in err[-1]
    assert not (tmp_path / "x").exists()


def test_error_config_does_not_match_weights(hf_dir, tmp_path):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["mlp_hidden_size"] = 96
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tensor model\.transformer\.blocks\.0\.ff_proj\.weight has shape \[128, 64\] "
                                         r"but the config expects \[96, 64\]"):
        convert_from_hf.convert_hf_dir(hf_dir, tmp_path / "x")
    cfg["mlp_hidden_size"], cfg["n_layers"] = 128, 3
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) model\.transformer\.blocks\.2\."):
        convert_from_hf.convert_hf_dir(hf_dir, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_error_unknown_tensor_names(hf_dir, tmp_path):
    index = json.loads((hf_dir / INDEX_FILE).read_text())
    save_file({"model.transformer.blocks.0.q_proj.bias": torch.zeros(64)}, hf_dir / "extra.safetensors",
              metadata={"format": "pt"})
    index["weight_map"]["model.transformer.blocks.0.q_proj.bias"] = "extra.safetensors"
    (hf_dir / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"unknown tensor name\(s\) model\.transformer\.blocks\.0\.q_proj\.bias"):
        convert_from_hf.convert_hf_dir(hf_dir, tmp_path / "x")


def test_error_checkpoint_weights_do_not_match_its_config(tmp_path):
    state = build_model(tiny_model_config(), seed=0).state_dict()
    state["transformer.wte.weight"] = torch.zeros(300, 64)
    run = make_checkpoint(tmp_path / "run", state=state, tokenizer=False)
    with pytest.raises(ValueError, match=r"tensor model\.transformer\.wte\.weight has shape \[300, 64\] but the config expects \[256, 64\]"):
        convert_to_hf.convert_checkpoint(run, tmp_path / "hf")
    state.pop("transformer.wte.weight")
    state["transformer.extra.weight"] = torch.zeros(2)
    run = make_checkpoint(tmp_path / "run2", state=state, tokenizer=False)
    with pytest.raises(ValueError, match="unknown tensor name"):
        convert_to_hf.convert_checkpoint(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_error_existing_output_needs_force(run_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert convert_to_hf.main([str(run_dir), str(out)]) == 1
    assert "output folder exists" in capsys.readouterr().err and (out / "keep.txt").is_file()
    assert convert_to_hf.main([str(run_dir), str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    with pytest.raises(FileExistsError, match="--force"):
        convert_from_hf.convert_hf_dir(out, run_dir)
    convert_from_hf.convert_hf_dir(out, tmp_path / "imported")
    convert_from_hf.convert_hf_dir(out, tmp_path / "imported", force=True, step=3)
    assert (tmp_path / "imported" / "checkpoints" / "latest").read_text() == "step_00000003"
    assert not (tmp_path / "imported" / "checkpoints" / "step_00000000").exists()


def test_error_missing_config_and_missing_checkpoint(hf_dir, tmp_path):
    (hf_dir / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        convert_from_hf.convert_hf_dir(hf_dir, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="not found"):
        convert_from_hf.convert_hf_dir(tmp_path / "nowhere", tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        convert_to_hf.convert_checkpoint(tmp_path / "nowhere", tmp_path / "y")


def test_error_not_llada_architecture(hf_dir, tmp_path):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "weight_tying": True}))
    with pytest.raises(ValueError, match=r"config\.json: weight_tying=true is not LLaDA's architecture"):
        convert_from_hf.convert_hf_dir(hf_dir, tmp_path / "x")


def test_cli_subprocess_error_line(tmp_path):
    proc = run_module(["-m", "tools.convert_to_hf", str(tmp_path / "missing"), str(tmp_path / "out")], check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: checkpoint not found")
    proc = run_module(["-m", "tools.convert_from_hf", str(tmp_path / "missing"), str(tmp_path / "out")], check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: HF model folder not found")
    assert REPO.is_dir()
