"""difftron as an lm-evaluation-harness (0.4.13) model, registered as ``difftron``.

    python -m tools.eval --model difftron --model_args pretrained=DIR[,key=value...] --tasks ...

The defaults reproduce LLaDA's own adapter (``eval_llada.py`` of ML-GSAI/LLaDA), so a score
means what it means in LLaDA's paper; the README's evaluation section lists what still differs
and the options (all off by default) that give our variants.

- ``loglikelihood``: LLaDA's Monte-Carlo bound (``model.likelihood.mc_loglikelihood``), ``mc_num``
  samples per request, stratified mask counts, masks only on the continuation, weight L/l,
  optional CFG (``cfg``). Context and continuation are encoded as LLaDA's ``_encode_pair`` does,
  an empty context included (no BOS is added for it). ``is_greedy`` is LLaDA's
  ``suffix_greedy_prediction`` (one most-confident token per step, with the same CFG as the
  likelihood), checked only with ``is_check_greedy=True`` (LLaDA's default; its authors recommend
  False, which no paper metric needs and which is much faster).
- ``loglikelihood_rolling``: the bound over the whole text, in disjoint windows of ``max_length``
  (LLaDA's adapter does not implement it).
- ``generate_until``: LLaDA's reverse process at the adapter's options; the text is decoded the
  way LLaDA's adapter does it (special tokens kept, cut at the task's ``until`` strings, then
  re-tokenized and decoded without special tokens: text after an EOS survives).
- Data parallel: under ``torchrun``/``accelerate launch`` (``WORLD_SIZE`` > 1) each process joins
  the default process group and reports its ``rank``/``world_size``; lm-eval then gives every
  rank its share of the documents and gathers the metrics. The likelihood noise is keyed by the
  request's tokens, so scores do not depend on the number of ranks.

Model arguments (defaults in parentheses, LLaDA's unless marked "ours"): ``pretrained``
(required: run, checkpoint or HF folder), ``mc_num`` (128), ``mc_batch_size`` (32 rows per
forward pass; LLaDA's ``batch_size``), ``cfg`` (0.0), ``is_check_greedy`` (True), ``gen_length``
(1024; ``gen_length=max_gen_toks`` uses the task's), ``steps`` (= gen_length), ``block_length``
(= gen_length), ``temperature`` (0.0), ``remasking`` (low_confidence), ``logits_eos_inf`` (False),
``confidence_eos_eot_inf`` (False), ``dtype`` (bfloat16), ``max_length`` (the model's
max_sequence_length; longer inputs are left-truncated), ``seed`` (1234). Ours, off by default:
``stop_at_eos`` (cut generations at the first EOS/EoT token), ``restrict_vocab`` (never sample
the mask token or padding rows; the likelihood's softmax without padding rows),
``confidence_eos_eot_zero``, ``confidence_fp64`` (see ``model.sampling``), ``likelihood_fp32``
(CFG and log-softmax in float32), ``task_gen_kwargs`` (the task's generation kwargs named like
our sampler options override these model_args; LLaDA uses only the task's ``until``),
``add_bos`` (prepend BOS to every encoded text that lacks it).
LLaDA's, off by default: ``llada_batches`` (LLaDA's mask-count rule and mini-batches in the
likelihood; ours is an unbiased stratification, see ``model.likelihood``).
lm-eval's ``--batch_size`` is the number of prompts generated together (LLaDA: 1; more are
left-padded, equal up to floating-point effects); ``--device`` the device.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from model.likelihood import loglikelihood_rolling, mc_loglikelihood, suffix_greedy
from model.sampling import GenerationConfig
from tools.generate import complete_ids
from tools.loading import load_for_inference

log = logging.getLogger(__name__)

GEN_KWARG_KEYS = ("gen_length", "steps", "block_length", "temperature", "cfg_scale", "remasking",
                  "logits_eos_inf", "confidence_eos_eot_inf", "restrict_vocab", "confidence_eos_eot_zero",
                  "confidence_fp64")
TASK_GEN_LENGTH = "max_gen_toks"  # gen_length=max_gen_toks: the task's max_gen_toks (LLaDA ignores it)


def _bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def _int_or_none(value):
    return None if value in (None, "", "None") else int(value)


@register_model("difftron")
class DifftronLM(TemplateLM):
    """An lm-eval ``LM`` over a difftron model (see the module docstring for the arguments)."""

    backend = "causal"  # how TemplateLM splits (context, continuation): encode whole, then cut

    def __init__(
        self,
        pretrained: str,
        mc_num: int = 128,
        mc_batch_size: int = 32,
        cfg: float = 0.0,
        is_check_greedy: bool = True,
        gen_length: int | str | None = 1024,
        steps: int | None = None,
        block_length: int | None = None,
        temperature: float = 0.0,
        remasking: str = "low_confidence",
        logits_eos_inf: bool = False,
        confidence_eos_eot_inf: bool = False,
        stop_at_eos: bool = False,
        restrict_vocab: bool = False,
        confidence_eos_eot_zero: bool = False,
        confidence_fp64: bool = False,
        llada_batches: bool = False,
        likelihood_fp32: bool = False,
        task_gen_kwargs: bool = False,
        add_bos: bool = False,
        max_length: int | None = None,
        dtype: str = "bfloat16",
        seed: int = 1234,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        device: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            log.warning("difftron: ignoring unknown model_args %s", sorted(kwargs))
        self._init_distributed()
        if device is None or str(device).startswith("cuda"):
            # lm-eval's default device is "cuda"; fall back to the CPU when there is none, and
            # give each data-parallel rank its own GPU
            if torch.cuda.is_available():
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if self._world_size > 1 or device is None else device
            else:
                if device is not None:
                    log.warning("difftron: no CUDA device; evaluating on the CPU")
                device = "cpu"
        self._device = torch.device(device)
        self.model, self.tokenizer = load_for_inference(pretrained, device=self._device, dtype=dtype)
        self.config = self.model.config
        self.mc_num, self.mc_batch_size = int(mc_num), int(mc_batch_size)
        self.cfg_scale = float(cfg)
        self.is_check_greedy = _bool(is_check_greedy)
        self.gen_defaults = dict(
            gen_length=None if str(gen_length) == TASK_GEN_LENGTH else _int_or_none(gen_length),
            steps=_int_or_none(steps), block_length=_int_or_none(block_length),
            temperature=float(temperature), cfg_scale=float(cfg), remasking=str(remasking),
            logits_eos_inf=_bool(logits_eos_inf), confidence_eos_eot_inf=_bool(confidence_eos_eot_inf),
            restrict_vocab=_bool(restrict_vocab), confidence_eos_eot_zero=_bool(confidence_eos_eot_zero),
            confidence_fp64=_bool(confidence_fp64),
        )
        self.stop_at_eos = _bool(stop_at_eos)
        self.task_gen_kwargs, self._ignored_gen_kwargs = _bool(task_gen_kwargs), set()
        self.likelihood_options = dict(llada_batches=_bool(llada_batches), restrict_vocab=_bool(restrict_vocab),
                                       fp32=_bool(likelihood_fp32))
        self.add_bos = _bool(add_bos)
        self._max_length = _int_or_none(max_length) or self.config.max_sequence_length
        self.seed = int(seed)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 1
        if self.mc_num <= 0 or self.mc_batch_size <= 0:
            raise ValueError(f"difftron: mc_num ({mc_num}) and mc_batch_size ({mc_batch_size}) must be positive")

    # ----- distribution (lm-eval's own data-parallel mechanism) ------------------------------
    def _init_distributed(self) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend)
        self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._world_size == 1:
            return tensor
        import torch.distributed as dist

        parts = [torch.zeros_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if self._world_size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self._world_size
        dist.all_gather_object(out, obj)
        return out if self._rank == dst else None

    def barrier(self) -> None:
        if self._world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    # ----- tokenization ----------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.config.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.config.bos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "difftron")).replace("/", "__")

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The tokenizer's own encoding, as LLaDA's adapter calls it (``tokenizer(text)``: whatever
        special tokens the tokenizer adds by itself); ``add_bos`` puts BOS first where it is not."""
        if add_special_tokens is None:
            ids = list(self.tokenizer(string)["input_ids"])
        else:
            ids = list(self.tokenizer(string, add_special_tokens=add_special_tokens)["input_ids"])
        if self.add_bos and add_special_tokens is not False and ids[:1] != [self.config.bos_token_id]:
            ids = [self.config.bos_token_id] + ids
        return ids

    def tok_decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # ----- likelihood ------------------------------------------------------------------------
    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Left-truncates so that context + continuation fits ``max_length``."""
        if len(continuation) >= self.max_length:
            log.warning("difftron: continuation of %d tokens truncated to %d", len(continuation), self.max_length - 1)
            continuation = continuation[-(self.max_length - 1):]
        keep = self.max_length - len(continuation)
        return context[-keep:] if len(context) > keep else context, continuation

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """LLaDA's ``_encode_pair``: trailing context spaces move to the continuation; the whole
        text is encoded and the continuation is what follows the context's tokens. An empty
        context is encoded like any other (lm-eval's TemplateLM would condition on BOS)."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        context_enc = self.tok_encode(context)
        return context_enc, whole[len(context_enc):]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        new_reqs = []
        for req in requests:
            context, continuation = req.args
            new_reqs.append(((context, continuation), *self.encode_pair(context, continuation)))
        return self._loglikelihood_tokens(new_reqs, disable_tqdm=disable_tqdm)

    def _is_greedy(self, context: list[int], continuation: list[int]) -> bool:
        return suffix_greedy(self.model, context, continuation, cfg_scale=self.cfg_scale)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [self._fit(list(ctx), list(cont)) for _, ctx, cont in requests]
        results: list[tuple[float, bool]] = []
        chunk = max(1, 256 // self.mc_num)  # requests per call; noise is keyed per request
        bar = tqdm(total=len(pairs), desc="difftron loglikelihood", disable=disable_tqdm or self.rank != 0)
        for i in range(0, len(pairs), chunk):
            part = pairs[i : i + chunk]
            lls = mc_loglikelihood(self.model, part, mc_num=self.mc_num, batch_size=self.mc_batch_size,
                                   cfg_scale=self.cfg_scale, seed=self.seed, **self.likelihood_options)
            for (ctx, cont), ll, req in zip(part, lls, requests[i : i + chunk]):
                greedy = self._is_greedy(ctx, cont) if self.is_check_greedy else False
                results.append((ll, greedy))
                self.cache_hook.add_partial("loglikelihood", req[0], (ll, greedy))
            bar.update(len(part))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, desc="difftron loglikelihood_rolling", disable=disable_tqdm or self.rank != 0):
            (text,) = req.args
            tokens = self.tok_encode(text, add_special_tokens=False)
            ll = loglikelihood_rolling(self.model, tokens, prefix_id=self.prefix_token_id, max_length=self.max_length,
                                       mc_num=self.mc_num, batch_size=self.mc_batch_size, cfg_scale=self.cfg_scale,
                                       seed=self.seed, **self.likelihood_options)
            out.append(ll)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), ll)
        return out

    # ----- generation ------------------------------------------------------------------------
    def _generation_options(self, gen_kwargs: dict) -> tuple[GenerationConfig, list[str]]:
        kw = dict(gen_kwargs)
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        opts = dict(self.gen_defaults)
        for key in GEN_KWARG_KEYS:
            if key in kw and kw[key] is not None:
                if self.task_gen_kwargs:
                    opts[key] = kw[key]
                elif kw[key] != opts[key] and key not in self._ignored_gen_kwargs:
                    self._ignored_gen_kwargs.add(key)
                    log.warning("difftron: ignoring the task's %s=%r (as LLaDA's adapter does; pass it in "
                                "model_args, or task_gen_kwargs=true)", key, kw[key])
        if opts["gen_length"] is None:  # gen_length=max_gen_toks
            opts["gen_length"] = int(kw.get("max_gen_toks", 256))
        opts["steps"] = opts["steps"] or opts["gen_length"]
        opts["block_length"] = opts["block_length"] or opts["gen_length"]
        return GenerationConfig(**opts), until

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[repr(sorted(req.args[1].items()))].append(i)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="difftron generate_until", disable=disable_tqdm or self.rank != 0)
        for indices in groups.values():
            options, until = self._generation_options(requests[indices[0]].args[1])
            indices = sorted(indices, key=lambda i: -len(requests[i].args[0]))  # similar lengths together
            for b in range(0, len(indices), self.batch_size):
                batch = indices[b : b + self.batch_size]
                encoded = [self.tok_encode(requests[i].args[0]) for i in batch]
                texts = complete_ids(self.model, self.tokenizer, encoded, options, stop=until,
                                     stop_at_eos=self.stop_at_eos, seed=self.seed, batch_size=len(batch),
                                     max_length=self.max_length)
                for i, text in zip(batch, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return results
