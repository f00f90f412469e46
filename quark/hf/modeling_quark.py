"""QuarkForCausalLM for transformers (`trust_remote_code`): a thin wrapper over Quark's one transformer.

This file is copied into every exported model folder beside verbatim copies of `quark/model.py`, `generate.py`,
`sampling.py` and `config.py`, and imports nothing but torch, transformers and those siblings: the transformer
itself lives only in `model.py`.

Choices:
- The wrapper registers the core `Quark`'s own submodules as `model` and `lm_head`, so parameter names are
  exactly the checkpoint's (`model.layers.0.self_attn.q_proj.weight`, ...) and `save_pretrained` round-trips.
  The core object itself is kept unregistered; its RoPE tables are rebuilt in fp32 on the weights' device
  when the model moves (transformers builds models on the `meta` device and casts with `.to()`).
- `generate_text()` is the card's method (`generate.py`'s prefill + decode loop with its own KV cache).
- `forward()` follows the transformers contract: `CausalLMOutputWithPast` with `.logits`, `labels=` gives the
  shifted next-token loss, and a transformers `Cache` (e.g. `DynamicCache`, what `generate()` passes) is used
  through `model.py`'s cache interface, so `generate()`, beam search and pipelines work unchanged.
- The RoPE position of a token is its cache slot (as in `model.py`); a left-padded row is masked with
  `attention_mask` and sees the same relative positions as an unpadded one, so `position_ids` is not needed
  and is ignored (attention with RoPE depends only on relative offsets).
"""

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_quark import QuarkConfig, core_config
from .generate import generate_text as _generate_text
from .model import Quark

# transformers 5.24 renamed the output field `past_key_values` to `cache`
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class _CacheSlots:
    """Adapts a transformers `Cache` to `model.py`'s `cache.update(layer, input_pos, k, v)` interface."""

    def __init__(self, cache):
        self.cache = cache

    def update(self, layer: int, input_pos, k, v):
        # transformers caches append (B, n_kv, T, hd) and return all keys/values so far
        return self.cache.update(k, v, layer)


class QuarkForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = QuarkConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config: QuarkConfig):
        super().__init__(config)
        core = Quark(core_config(config))  # config: the LlamaConfig config.json loads as, or a QuarkConfig
        self.model = core.model
        self.lm_head = core.lm_head
        self.__dict__["_core"] = core  # shares the modules above; not registered, so names stay the checkpoint's
        self.post_init()

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
        elif hasattr(module, "weight") and module.weight is not None and module.weight.dim() == 1:
            torch.nn.init.ones_(module.weight)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value
        self._core.lm_head = value

    @property
    def core(self) -> Quark:
        """The `model.py` Quark sharing this model's weights, with RoPE tables on the weights' device (fp32)."""
        core = self._core
        core.model, core.lm_head = self.model, self.lm_head
        weight = self.lm_head.weight
        if core.rope_cos.device != weight.device or core.rope_cos.dtype != torch.float32:
            core.reset_rope()
        return core

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,  # shape: transformers' forward signature
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, cache=None, return_dict=None,
                **kwargs) -> CausalLMOutputWithPast:
        if input_ids is None:
            raise ValueError("QuarkForCausalLM needs input_ids (inputs_embeds is not supported)")
        core = self.core
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            from transformers import DynamicCache

            cache = DynamicCache()
        T = input_ids.shape[1]
        past = cache.get_seq_length() if cache is not None else 0
        if past + T > core.config.context_length:
            raise ValueError(f"sequence length {past + T} exceeds the model's context_length="
                             f"{core.config.context_length} (max_position_embeddings)")
        key_mask = None
        if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            key_mask = attention_mask[:, :past + T].bool()
        if cache is not None:
            h = core.hidden(input_ids, _CacheSlots(cache), past, key_mask, n_keys=past + T)
        else:
            h = core.hidden(input_ids, key_mask=key_mask)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        logits = self.lm_head(h).float()

        loss = None
        if labels is not None:
            # transformers convention: labels are the inputs; position t predicts labels[t + 1]; -100 is ignored
            targets = F.pad(labels[:, 1:], (0, 1), value=-100).to(logits.device)
            n_items = kwargs.get("num_items_in_batch")
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                                   reduction="sum" if n_items is not None else "mean")
            if n_items is not None:
                loss = loss / n_items
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
        return out.to_tuple() if return_dict is False else out

    @torch.no_grad()
    def generate_text(self, input_ids, max_new_tokens: int = 200, *, temperature: float = 0.7, top_p: float = 0.9,
                      rep_penalty: float = 1.0, eos_token_id: int | None = None, attention_mask=None,
                      seed: int | None = None) -> torch.Tensor:
        """The card's generation method: (B, T) prompt ids -> (B, T + n) ids, prompt included.

        `temperature=0.0` is greedy; `rep_penalty` (1.0 = off) divides positive / multiplies negative logits of
        every token already seen; a step with non-finite logits falls back to greedy. Generation stops when
        every row produced `eos_token_id`; finished rows are padded with it."""
        device = self.lm_head.weight.device
        mask = attention_mask.to(device) if attention_mask is not None else None
        return _generate_text(self.core, input_ids.to(device), max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, rep_penalty=rep_penalty,
                              eos_token_id=eos_token_id, attention_mask=mask, seed=seed)
