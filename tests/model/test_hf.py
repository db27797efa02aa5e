"""model.hf (names, config.json, reading HF folders) and the exported remote code
(model/hf_remote), loaded through transformers' AutoModel with trust_remote_code=True."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from model.hf import (
    config_from_hf,
    config_to_hf,
    expected_hf_tensors,
    from_hf_name,
    load_hf_dir,
    to_hf_name,
)
from model.llada import LLaDAModel
from tests.conftest import tiny_model_config
from tests.tools.test_convert import make_checkpoint
from tools.convert_to_hf import convert_checkpoint
from train.checkpoint import load_model_weights

# transformers 4.x releases checked (slow); each installs with its own tokenizers/huggingface_hub
# into a scratch folder (pip --target) that goes first on PYTHONPATH.
TRANSFORMERS_4 = ("4.46.3", "4.51.3")

# LLaDA-8B-Base config.json (reference/llada.md 2.2), without transformers_version.
LLADA_8B_CONFIG = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
                 "AutoModel": "modeling_llada.LLaDAModelLM"},
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 4096,
    "embedding_dropout": 0.0, "embedding_size": 126464, "eos_token_id": 126081, "flash_attention": False,
    "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "mask_token_id": 126336, "max_sequence_length": 4096,
    "mlp_hidden_size": 12288, "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None,
    "n_heads": 32, "n_kv_heads": 32, "n_layers": 32, "pad_token_id": 126081, "precision": "amp_bf16",
    "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
    "rope_theta": 500000.0, "scale_logits": False, "use_cache": False, "vocab_size": 126464,
    "weight_tying": False,
}


def llada_8b_tensors() -> dict[str, tuple[int, ...]]:
    """LLaDA-8B's 291 tensors (reference/llada.md 2.4), written out independently of the model."""
    d, f, v = 4096, 12288, 126464
    per_block = {"attn_norm": (d,), "q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "attn_out": (d, d),
                 "ff_norm": (d,), "ff_proj": (f, d), "up_proj": (f, d), "ff_out": (d, f)}
    table = {"model.transformer.wte.weight": (v, d)}
    for n in range(32):
        table.update({f"model.transformer.blocks.{n}.{k}.weight": s for k, s in per_block.items()})
    table["model.transformer.ln_f.weight"] = (d,)
    table["model.transformer.ff_out.weight"] = (v, d)
    return table


# ----- names and config.json ----------------------------------------------------------------------
def test_names_are_a_prefix():
    assert to_hf_name("transformer.blocks.3.ff_out.weight") == "model.transformer.blocks.3.ff_out.weight"
    assert from_hf_name("model.transformer.ff_out.weight") == "transformer.ff_out.weight"
    with pytest.raises(ValueError, match="unknown tensor name 'lm_head.weight'"):
        from_hf_name("lm_head.weight")


def test_8b_names_and_shapes_match_llada_on_meta_device():
    expected = expected_hf_tensors(ModelConfig())  # built on the meta device
    assert len(expected) == 291
    assert expected == llada_8b_tensors()
    numel = sum(torch.Size(s).numel() for s in expected.values())
    assert numel == 8_015_581_184 and 2 * numel == 16_031_162_368  # LLaDA-8B's index total_size (bf16)


def test_8b_config_json_has_llada_keys_and_values():
    hf = config_to_hf(ModelConfig())
    version = hf.pop("transformers_version")
    assert re.match(r"\d+\.\d+", version)
    assert hf == LLADA_8B_CONFIG
    assert list(hf) == sorted(hf)
    assert config_to_hf(ModelConfig(), torch.bfloat16)["torch_dtype"] == "bfloat16"


def test_config_round_trip_and_defaults():
    cfg = tiny_model_config(n_kv_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6)
    assert config_from_hf(config_to_hf(cfg), {"bos_token_id": 0}) == cfg
    hf = config_to_hf(cfg)
    hf.update(n_kv_heads=None, embedding_size=None, mlp_hidden_size=None, mlp_ratio=3)
    back = config_from_hf(hf, {"bos_token_id": 0})
    assert (back.n_kv_heads, back.embedding_size, back.mlp_hidden_size) == (4, 256, 192)


@pytest.mark.parametrize("key,value", [
    ("include_bias", True), ("weight_tying", True), ("alibi", True), ("layer_norm_type", "default"),
    ("bias_for_layer_norm", True), ("rope", False), ("block_type", "sequential"), ("activation_type", "gelu"),
    ("include_qkv_bias", True), ("attention_layer_norm", True), ("scale_logits", True),
])
def test_config_from_hf_rejects_other_architectures(key, value):
    hf = config_to_hf(tiny_model_config())
    hf[key] = value
    with pytest.raises(ValueError, match=rf"^config\.json: {key}={re.escape(json.dumps(value))} is not LLaDA's architecture"):
        config_from_hf(hf, {"bos_token_id": 0})


def test_config_from_hf_rejects_other_model_types_and_bad_values():
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        config_from_hf({"model_type": "llama", "hidden_size": 64})
    hf = config_to_hf(tiny_model_config())
    del hf["d_model"]
    with pytest.raises(ValueError, match="missing key.*d_model"):
        config_from_hf(hf)
    hf = config_to_hf(tiny_model_config())
    with pytest.raises(ValueError, match="bos_token_id"):  # LLaDA's 126080 default is outside a 256-token vocab
        config_from_hf(hf)


# ----- the exported model under the installed transformers --------------------------------------------
def export(tmp_path: Path, config: ModelConfig, seed: int = 3, tokenizer: bool = False) -> tuple[Path, LLaDAModel]:
    run = make_checkpoint(tmp_path / "run", config, seed=seed, tokenizer=tokenizer)
    out = convert_checkpoint(run, tmp_path / "hf", dtype="fp32", max_shard_size="100KB")
    cfg, state = load_model_weights(run)
    reference = LLaDAModel(cfg)
    reference.load_state_dict(state)
    return out, reference.eval()


def padded_inputs(config: ModelConfig, batch: int = 3, seq: int = 19, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, config.vocab_size, (batch, seq), generator=g)
    ids[:, ::4] = config.mask_token_id
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 13:] = 0  # right padding
    mask[2, :6] = 0  # left padding
    ids[mask == 0] = config.pad_token_id
    return ids, mask


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_exported_logits_equal_training_model(tmp_path, n_kv_heads):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = tiny_model_config(n_kv_heads=n_kv_heads, rope_theta=10000.0)
    out, reference = export(tmp_path, config)
    model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    assert type(model).__name__ == "LLaDAModelLM" and model.dtype == torch.float32
    assert type(AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)).__name__ == "LLaDAModelLM"
    hf_config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert hf_config.model_type == "llada" and hf_config.use_cache is False
    assert (hf_config.num_hidden_layers, hf_config.hidden_size, hf_config.num_attention_heads) == (2, 64, 4)
    assert hf_config.rope_theta == 10000.0

    ids, mask = padded_inputs(config)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(ids), atol=1e-5, rtol=0)
        padded = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(padded, reference(ids, attention_mask=mask), atol=1e-5, rtol=0)
        # padding is honoured: the real tokens of row 1 see the same as the unpadded prefix alone
        alone = model(input_ids=ids[1:2, :13]).logits
        torch.testing.assert_close(padded[1:2, :13], alone, atol=1e-5, rtol=0)
        assert (padded[1, :13] - model(input_ids=ids[1:2]).logits[0, :13]).abs().max() > 1e-4
        positions = torch.arange(19).expand(3, 19) + 2
        torch.testing.assert_close(model(input_ids=ids, position_ids=positions).logits,
                                   reference(ids, position_ids=positions), atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    config = tiny_model_config()
    out, reference = export(tmp_path, config)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(out, trust_remote_code=True)
    assert model.supports_gradient_checkpointing
    ids, mask = padded_inputs(config)
    weights = torch.randn(3, 19, config.embedding_size, generator=torch.Generator().manual_seed(1))

    def grads(module, forward):
        module.zero_grad()
        (forward() * weights).sum().backward()
        return {n.removeprefix("model."): p.grad.clone() for n, p in module.named_parameters()}

    model.train()
    plain = grads(model, lambda: model(input_ids=ids, attention_mask=mask).logits)
    model.gradient_checkpointing_enable()
    assert model.model.gradient_checkpointing
    calls = []
    inner = model.model._gradient_checkpointing_func
    model.model._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or inner(*a, **k)
    checkpointed = grads(model, lambda: model(input_ids=ids, attention_mask=mask).logits)
    assert len(calls) == config.n_layers  # every block went through the checkpoint function
    ours = grads(reference, lambda: reference(ids, attention_mask=mask))
    assert set(plain) == set(ours)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-5, rtol=0)
        torch.testing.assert_close(plain[name], ours[name], atol=1e-5, rtol=1e-5)


def test_forward_options(tmp_path):
    from transformers import AutoModel

    config = tiny_model_config()
    out, _ = export(tmp_path, config)
    model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    ids, _ = padded_inputs(config)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert isinstance(model(input_ids=ids, return_dict=False), tuple)
        torch.testing.assert_close(model(input_ids=ids, return_dict=False)[0], logits)
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        assert len(hidden) == config.n_layers + 1
        embeds = model.get_input_embeddings()(ids)
        torch.testing.assert_close(model(inputs_embeds=embeds).logits, logits)
        with pytest.raises(ValueError, match="KV cache"):
            model(input_ids=ids, use_cache=True)
        with pytest.raises(ValueError, match="attention_mask must be"):
            model(input_ids=ids, attention_mask=torch.ones(3, 5))
        with pytest.warns(UserWarning, match="labels are ignored"):
            model(input_ids=ids, labels=ids)


def test_load_hf_dir_returns_our_names(tmp_path):
    config = tiny_model_config()
    out, reference = export(tmp_path, config)
    cfg, state = load_hf_dir(out)
    assert cfg == config
    for name, t in reference.state_dict().items():
        assert torch.equal(state[name], t)


# ----- the export loads without difftron, under this and a 4.x transformers ---------------------------
CHECK_SCRIPT = r'''
import json, sys
for blocked in ("model", "train", "tools", "data"):  # the export must not need difftron
    sys.modules[blocked] = None
import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

export, inputs = sys.argv[1], sys.argv[2]
data = torch.load(inputs, weights_only=True)
model = AutoModel.from_pretrained(export, trust_remote_code=True).eval()
lm = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)
config = AutoConfig.from_pretrained(export, trust_remote_code=True)
result = {"version": transformers.__version__, "class": type(model).__name__, "lm_class": type(lm).__name__,
          "model_type": config.model_type, "layers": config.num_hidden_layers, "use_cache": config.use_cache}
tokenizer = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
result["special_ids"] = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.mask_token_id]
with torch.no_grad():
    result["err_plain"] = (model(input_ids=data["ids"]).logits - data["plain"]).abs().max().item()
    padded = model(input_ids=data["ids"], attention_mask=data["mask"]).logits
    result["err_padded"] = (padded - data["padded"]).abs().max().item()

def grads():
    model.zero_grad()
    (model(input_ids=data["ids"], attention_mask=data["mask"]).logits * data["weights"]).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}

model.train()
plain = grads()
model.gradient_checkpointing_enable()
result["checkpointing"] = bool(model.model.gradient_checkpointing)
checkpointed = grads()
result["err_grad_checkpointing"] = max((plain[n] - checkpointed[n]).abs().max().item() for n in plain)
result["err_grad_reference"] = max((plain["model." + n] - g).abs().max().item() for n, g in data["grads"].items())
print("RESULT " + json.dumps(result))
'''


def check_export_in_subprocess(tmp_path: Path, pythonpath: str | None) -> dict:
    """Export a tiny model, then load it in a fresh interpreter where difftron is blocked."""
    config = tiny_model_config()
    out, reference = export(tmp_path, config, tokenizer=True)
    ids, mask = padded_inputs(config)
    weights = torch.randn(3, 19, config.embedding_size, generator=torch.Generator().manual_seed(2))
    reference.zero_grad()
    (reference(ids, attention_mask=mask) * weights).sum().backward()
    with torch.no_grad():
        data = {"ids": ids, "mask": mask, "weights": weights, "plain": reference(ids),
                "padded": reference(ids, attention_mask=mask),
                "grads": {n: p.grad for n, p in reference.named_parameters()}}
    torch.save(data, tmp_path / "inputs.pt")
    (tmp_path / "check.py").write_text(CHECK_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run([sys.executable, str(tmp_path / "check.py"), str(out), str(tmp_path / "inputs.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"check failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


def assert_check(result: dict) -> None:
    assert result["class"] == result["lm_class"] == "LLaDAModelLM"
    assert (result["model_type"], result["layers"], result["use_cache"]) == ("llada", 2, False)
    assert result["special_ids"] == [0, 1, 2]
    assert result["err_plain"] <= 1e-5 and result["err_padded"] <= 1e-5
    assert result["checkpointing"] and result["err_grad_checkpointing"] <= 1e-5
    assert result["err_grad_reference"] <= 1e-4


def test_export_is_self_contained(tmp_path):
    import transformers

    result = check_export_in_subprocess(tmp_path, pythonpath=None)
    assert result["version"] == transformers.__version__
    assert_check(result)


PIP_OFFLINE = ("No matching distribution", "Could not find a version", "NewConnectionError", "Network is unreachable",
               "Temporary failure in name resolution", "ConnectTimeout", "ProxyError", "Max retries exceeded")


@pytest.mark.slow
@pytest.mark.parametrize("version", TRANSFORMERS_4)
def test_export_loads_under_transformers_4(tmp_path, version):
    target = tmp_path / f"transformers-{version}"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-warn-conflicts",
         "--target", str(target), f"transformers=={version}"],
        capture_output=True, text=True, timeout=900,
    )
    if proc.returncode != 0:
        output = proc.stdout + proc.stderr
        if any(marker in output for marker in PIP_OFFLINE):
            pytest.skip(f"pip cannot reach the package registry to install transformers=={version}")
        raise AssertionError(f"pip install transformers=={version} failed:\n{output[-3000:]}")
    result = check_export_in_subprocess(tmp_path, pythonpath=str(target))
    assert result["version"] == version
    assert_check(result)
