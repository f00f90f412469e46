"""QuarkConfig for transformers (`trust_remote_code`): a `PretrainedConfig` around Quark's own config.

This file is copied into every exported model folder, beside `config.py` (a verbatim copy of `quark/config.py`),
and imports nothing but transformers and that sibling.

Choices:
- The source of truth is Quark's config, nested under the key "quark" in `config.json`; the `quark` package
  reads that key back, so one `config.json` serves both loaders.
- The exported `config.json` says `model_type: "llama"` (the architecture is exactly Llama's) and maps only
  `AutoModelForCausalLM` to remote code: `AutoConfig` / `AutoTokenizer` then load it with no custom code and no
  "run the custom code? [y/N]" question, plain `AutoModelForCausalLM` gives `LlamaForCausalLM`, and
  `trust_remote_code=True` gives `QuarkForCausalLM`, built through `core_config()` from that `LlamaConfig`.
- The standard transformers names (`hidden_size`, `num_hidden_layers`, `num_key_value_heads`, ...) are mirrored
  at the top level for tools that read them (lm-evaluation-harness, vLLM, pipelines). A mirrored value that
  disagrees with the "quark" entry is an error naming both fields, never a silent choice.
"""

from transformers import PretrainedConfig

from .config import QuarkConfig as CoreConfig

# transformers name -> Quark field
MIRRORED = {
    "vocab_size": "vocab_size",
    "hidden_size": "d_model",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "intermediate_size": "d_ff",
    "max_position_embeddings": "context_length",
    "rope_theta": "rope_theta",
    "rms_norm_eps": "norm_eps",
    "tie_word_embeddings": "tie_embeddings",
    "initializer_range": "init_std",
}


def core_config(config) -> CoreConfig:
    """Quark's own config from a transformers config that carries the "quark" entry (the `LlamaConfig` that
    `config.json` loads as, or a `QuarkConfig`); a mirrored field that disagrees is an error naming both."""
    quark = getattr(config, "quark", None)
    if not isinstance(quark, dict):
        raise ValueError("config.json: no 'quark' entry (this folder was not exported by Quark)")
    core = CoreConfig.from_dict(dict(quark), source="config.json 'quark'")
    for hf_name, field in {**MIRRORED, "head_dim": "head_dim"}.items():
        value = getattr(config, hf_name, None)
        if value is not None and value != getattr(core, field):
            raise ValueError(f"config.json: {hf_name}={value!r} disagrees with quark.{field}={getattr(core, field)!r}")
    return core


class QuarkConfig(PretrainedConfig):
    model_type = "quark"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(self, quark: dict | None = None, **kwargs):
        core = CoreConfig.from_dict(dict(quark), source="config.json 'quark'") if quark else CoreConfig()
        for hf_name, field in MIRRORED.items():
            if hf_name in kwargs and kwargs[hf_name] != getattr(core, field):
                raise ValueError(f"config.json: {hf_name}={kwargs[hf_name]!r} disagrees with "
                                 f"quark.{field}={getattr(core, field)!r}")
            kwargs.pop(hf_name, None)
        head_dim = kwargs.pop("head_dim", core.head_dim)
        if head_dim != core.head_dim:
            raise ValueError(f"config.json: head_dim={head_dim!r} disagrees with quark d_model/n_heads={core.head_dim}")
        self.quark = core.to_dict()
        for hf_name, field in MIRRORED.items():
            setattr(self, hf_name, getattr(core, field))
        self.head_dim = core.head_dim
        self.hidden_act = "silu"
        kwargs.setdefault("bos_token_id", None)
        kwargs.setdefault("eos_token_id", None)
        kwargs.setdefault("pad_token_id", 0)
        super().__init__(**kwargs)
        self.tie_word_embeddings = core.tie_embeddings  # some transformers versions reset it in __init__

    def core_config(self) -> CoreConfig:
        """Quark's own config (the dataclass `model.py` is built from)."""
        return core_config(self)
