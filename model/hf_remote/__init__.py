"""Hugging Face remote code for LLaDA exports.

``configuration_llada.py`` and ``modeling_llada.py`` are copied verbatim into every export made by
``tools.convert_to_hf``, where ``transformers`` loads them with ``trust_remote_code=True``. They are
self-contained: they import only torch and transformers, never difftron.
"""
