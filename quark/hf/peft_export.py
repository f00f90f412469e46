"""`quark export --format peft`: a LoRA checkpoint's adapters as a PEFT adapter folder (adapter_config.json +
adapter_model.safetensors) that `peft.PeftModel.from_pretrained(base, folder)` loads onto the transformers base.

Choices:
- Quark's adapter names are PEFT's less the wrapper prefix (quark/lora.py), so the export renames
  `model.layers.0.self_attn.q_proj.lora_A.weight` to `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`
  and copies the tensors unchanged (float32).
- `base_model_name_or_path` is `--base-model` when given (a Hub id or the transformers folder the adapters will
  be loaded onto), else the base the run recorded in lora.json; a .gguf base is named as recorded, and
  transformers loads that one with `from_pretrained(folder, gguf_file=name)`.
- The tokenizer files travel with the adapters (PEFT adapter repos usually carry them), so the chat template the
  adapters were trained with goes along.
- Written in a temporary sibling and renamed into place, like every export.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..io import atomic_write_text
from ..tokenizer import Tokenizer
from ..weights import ADAPTER_FILE, LORA_JSON, read_lora_json, read_safetensors, resolve_model_path, save_safetensors
from .export import check_not_source, staged_folder

PREFIX = "base_model.model."


def peft_adapter_config(lora: dict, base_model: str) -> dict:
    """adapter_config.json of a LoRA adapter, as peft.LoraConfig(...).save_pretrained writes it."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": lora["rank"], "lora_alpha": lora["alpha"], "lora_dropout": lora["dropout"],
            "target_modules": sorted(lora["targets"]), "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "use_rslora": False,
            "use_dora": False, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
            "alpha_pattern": {}, "revision": None}


def export_peft(checkpoint: str | Path, out: str | Path, *, overwrite: bool = False,
                base_model: str | None = None) -> Path:
    """Write the adapters of a LoRA checkpoint (or run folder) as a PEFT adapter folder at `out`."""
    out = Path(out)
    folder = resolve_model_path(checkpoint)
    if not (folder.is_dir() and (folder / LORA_JSON).exists()):
        raise ValueError(f"{folder}: not a LoRA checkpoint (no {LORA_JSON}); --format peft exports the adapters of a "
                         "`quark sft --set lora_rank=R` run; export full weights with --format hf, llama or gguf")
    check_not_source(out, Path(checkpoint))
    lora = read_lora_json(folder)
    tensors = {PREFIX + k: v for k, v in read_safetensors(folder / ADAPTER_FILE).items()}
    tok = Tokenizer.load(folder)
    with staged_folder(out, overwrite) as tmp:
        save_safetensors(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        config = peft_adapter_config(lora, base_model or lora["base"])
        atomic_write_text(tmp / "adapter_config.json", json.dumps(config, indent=2) + "\n")
        tok.save(tmp)
    return out
