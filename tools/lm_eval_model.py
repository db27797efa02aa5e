"""difftron as an lm-evaluation-harness (0.4.13) model, registered as ``difftron``.

    python -m tools.eval --model difftron --model_args pretrained=DIR[,key=value...] --tasks ...

- ``loglikelihood``: LLaDA's Monte-Carlo bound (``model.likelihood.mc_loglikelihood``), ``mc_num``
  samples per request, stratified mask counts, masks only on the continuation, weight L/l,
  optional CFG (``cfg``). ``is_greedy`` is checked only with ``is_check_greedy=True`` (LLaDA's
  ``suffix_greedy_prediction``: one most-confident token per step, temperature 0).
- ``loglikelihood_rolling``: the bound over the whole text, in disjoint windows of ``max_length``.
- ``generate_until``: LLaDA's reverse process (``tools.generate.complete``), cut at EOS/EoT and
  at the task's ``until`` strings.
- Data parallel: under ``torchrun``/``accelerate launch`` (``WORLD_SIZE`` > 1) each process joins
  the default process group and reports its ``rank``/``world_size``; lm-eval then gives every
  rank its share of the documents and gathers the metrics. The likelihood noise is keyed by the
  request's tokens, so scores do not depend on the number of ranks.

Model arguments (defaults in parentheses): ``pretrained`` (required: run, checkpoint or HF
folder), ``mc_num`` (128), ``mc_batch_size`` (32 rows per forward pass), ``cfg`` (0.0),
``is_check_greedy`` (False), ``gen_length`` (the task's ``max_gen_toks``), ``steps``
(= gen_length), ``block_length`` (= gen_length), ``temperature`` (0.0), ``remasking``
(low_confidence), ``logits_eos_inf`` (False), ``confidence_eos_eot_inf`` (False), ``add_bos``
(False), ``max_length`` (the model's max_sequence_length), ``dtype`` (float32), ``seed`` (1234).
lm-eval's ``--batch_size`` is the number of prompts generated together; ``--device`` the device.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from model.likelihood import loglikelihood_rolling, mc_loglikelihood
from model.sampling import GenerationConfig, generate
from tools.generate import complete
from tools.loading import load_for_inference

log = logging.getLogger(__name__)

GEN_KWARG_KEYS = ("gen_length", "steps", "block_length", "temperature", "cfg_scale", "remasking",
                  "logits_eos_inf", "confidence_eos_eot_inf")


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
        is_check_greedy: bool = False,
        gen_length: int | None = None,
        steps: int | None = None,
        block_length: int | None = None,
        temperature: float = 0.0,
        remasking: str = "low_confidence",
        logits_eos_inf: bool = False,
        confidence_eos_eot_inf: bool = False,
        add_bos: bool = False,
        max_length: int | None = None,
        dtype: str = "float32",
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
            gen_length=_int_or_none(gen_length), steps=_int_or_none(steps), block_length=_int_or_none(block_length),
            temperature=float(temperature), cfg_scale=float(cfg), remasking=str(remasking),
            logits_eos_inf=_bool(logits_eos_inf), confidence_eos_eot_inf=_bool(confidence_eos_eot_inf),
        )
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
        ids = list(self.tokenizer(string, add_special_tokens=False)["input_ids"])
        if self.add_bos and add_special_tokens is not False:
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

    def _is_greedy(self, context: list[int], continuation: list[int]) -> bool:
        n = len(continuation)
        out = generate(self.model, [context], gen_length=n, steps=n, block_length=n, temperature=0.0, seed=self.seed)
        return out[0, -n:].tolist() == continuation

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [self._fit(list(ctx), list(cont)) for _, ctx, cont in requests]
        results: list[tuple[float, bool]] = []
        chunk = max(1, 256 // self.mc_num)  # requests per call; noise is keyed per request
        bar = tqdm(total=len(pairs), desc="difftron loglikelihood", disable=disable_tqdm or self.rank != 0)
        for i in range(0, len(pairs), chunk):
            part = pairs[i : i + chunk]
            lls = mc_loglikelihood(self.model, part, mc_num=self.mc_num, batch_size=self.mc_batch_size,
                                   cfg_scale=self.cfg_scale, seed=self.seed)
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
                                       seed=self.seed)
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
                opts[key] = kw[key]
        if opts["gen_length"] is None:
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
                texts = complete(self.model, self.tokenizer, [requests[i].args[0] for i in batch], options,
                                 stop=until, add_bos=self.add_bos, seed=self.seed, batch_size=len(batch),
                                 max_length=self.max_length)
                for i, text in zip(batch, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return results
