"""Hugging Face ecosystem: the model-folder export (remote code), Llama and GGUF exports, and the model card.

`configuration_quark.py` and `modeling_quark.py` here are templates for exported folders (they import their
siblings `config.py`, `model.py`, `generate.py`, `sampling.py` relatively, which exist only in such a folder);
import `quark.hf.export`, `quark.hf.gguf_export` and `quark.hf.card` from Python.
"""
