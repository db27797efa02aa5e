"""The lm-eval adapter against LLaDA's ``eval_llada.py`` (issue #19 items 1, 4, 5, 7): the
generated text keeps what follows an EOS, the greedy check uses CFG, an empty context is encoded
as is, LLaDA's defaults, and the HF export's ``special_tokens_map.json``."""

import inspect
import json

import pytest
import torch
from lm_eval.api.instance import Instance

from model.likelihood import mc_loglikelihood
from tests.model import llada_reference as ref
from tests.tools.test_generate import make_tiny_run
from tools.lm_eval_model import DifftronLM


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("eval_parity"))


@pytest.fixture(scope="module")
def lm(run_dir):
    return DifftronLM(pretrained=str(run_dir), mc_num=8, mc_batch_size=8, dtype="float32", device="cpu")


class Scripted(torch.nn.Module):
    """Generates ``script`` after a prompt of ``prompt_len`` tokens (one huge logit per position)."""

    def __init__(self, config, prompt_len: int, script: list[int]):
        super().__init__()
        self.config, self.prompt_len, self.script = config, prompt_len, script
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids, attention_mask=None, position_ids=None):
        logits = torch.zeros(*ids.shape, self.config.embedding_size)
        for i, token in enumerate(self.script):
            logits[:, self.prompt_len + i, token] = 50.0 - i  # also fixes the commit order
        return logits


def test_generate_until_keeps_text_after_eos_like_llada(lm, monkeypatch):
    tok, eos = lm.tokenizer, lm.config.eos_token_id
    context = "Question: two plus two?"
    script = tok(" Hello there.", add_special_tokens=False)["input_ids"] + [eos] + \
        tok(" More text after EOS.", add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(lm, "model", Scripted(lm.config, len(lm.tok_encode(context)), script))
    monkeypatch.setitem(lm.gen_defaults, "gen_length", len(script))
    until = ["\n\n", "Question:"]
    got = lm.generate_until([Instance("generate_until", {}, (context, {"until": until}), 0)])[0]
    assert got == ref.generate_until_text(tok, script, until) == " Hello there. More text after EOS."
    monkeypatch.setattr(lm, "stop_at_eos", True)  # our option
    assert lm.generate_until([Instance("generate_until", {}, (context, {"until": until}), 0)])[0] == " Hello there."


def test_empty_context_is_encoded_as_is(lm):
    # LLaDA's adapter encodes "" with the tokenizer (here: no tokens); lm-eval's TemplateLM would
    # condition on BOS
    (ll, _), = lm.loglikelihood([Instance("loglikelihood", {}, ("", "Paris"), 0)])
    ctx, cont = lm.tokenizer("")["input_ids"], lm.tokenizer("Paris")["input_ids"]
    assert ctx == []
    assert ll == pytest.approx(mc_loglikelihood(lm.model, [(ctx, cont)], mc_num=8, batch_size=8, seed=lm.seed)[0])


@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_greedy_flags_equal_llada_with_and_without_cfg(run_dir, cfg):
    lm = DifftronLM(pretrained=str(run_dir), mc_num=1, mc_batch_size=1, cfg=cfg, is_check_greedy=True,
                    dtype="float32", device="cpu")
    mask = lm.config.mask_token_id
    cases = []
    for text in ["The quick brown", "Paris is the capital of", "def add(a, b):", "Question: what is"]:
        ctx = lm.tok_encode(text)
        for n in (1, 2, 4):
            greedy = ref.suffix_greedy_decode(lm.model, ctx, n, cfg_scale=cfg, mask_id=mask)
            cases += [(ctx, greedy), (ctx, [(t + 1) % lm.config.vocab_size for t in greedy])]
    theirs = [ref.suffix_greedy(lm.model, c, t, cfg_scale=cfg, mask_id=mask) for c, t in cases]
    ours = [g for _, g in lm._loglikelihood_tokens([(("", ""), c, t) for c, t in cases], disable_tqdm=True)]
    assert ours == theirs
    assert sum(theirs) >= len(cases) // 2  # every greedy target is accepted by LLaDA's check


def test_defaults_are_llada_adapter_defaults(run_dir):
    params = inspect.signature(DifftronLM.__init__).parameters
    defaults = {k: params[k].default for k in ("mc_num", "mc_batch_size", "cfg", "is_check_greedy", "gen_length",
                                                "temperature", "remasking", "dtype", "stop_at_eos", "restrict_vocab",
                                                "confidence_eos_eot_zero", "confidence_fp64", "add_bos")}
    assert defaults == dict(mc_num=128, mc_batch_size=32, cfg=0.0, is_check_greedy=True, gen_length=1024,
                            temperature=0.0, remasking="low_confidence", dtype="bfloat16", stop_at_eos=False,
                            restrict_vocab=False, confidence_eos_eot_zero=False, confidence_fp64=False,
                            add_bos=False)
    lm = DifftronLM(pretrained=str(run_dir), device="cpu")
    assert next(lm.model.parameters()).dtype == torch.bfloat16 and lm.is_check_greedy
    options, until = lm._generation_options({"until": ["Q:"], "max_gen_toks": 256, "do_sample": False})
    assert (options.gen_length, options.steps, options.block_length) == (1024, 1024, 1024)  # LLaDA ignores max_gen_toks
    assert until == ["Q:"]
    lm.gen_defaults["gen_length"] = None  # gen_length=max_gen_toks: the task's
    assert lm._generation_options({"until": [], "max_gen_toks": 64})[0].gen_length == 64
    # the task's other generation kwargs are ignored, as by LLaDA's adapter, unless task_gen_kwargs
    task = {"until": [], "max_gen_toks": 64, "steps": 32, "temperature": 0.5}
    assert (lm._generation_options(task)[0].steps, lm._generation_options(task)[0].temperature) == (64, 0.0)
    lm.task_gen_kwargs = True
    assert (lm._generation_options(task)[0].steps, lm._generation_options(task)[0].temperature) == (32, 0.5)


def test_hf_export_has_special_tokens_map(run_dir, tmp_path):
    convert = pytest.importorskip("tools.convert_to_hf")
    out = tmp_path / "hf"
    assert convert.main([str(run_dir), str(out), "--dtype", "fp32"]) == 0
    data = json.loads((out / "special_tokens_map.json").read_text())
    assert data["bos_token"] == "<|startoftext|>"
    assert data["eos_token"] == data["pad_token"] == "<|endoftext|>"
    assert "<|mdm_mask|>" in [data.get("mask_token"), *data.get("additional_special_tokens", [])]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|endoftext|>" and tok.bos_token == "<|startoftext|>"
