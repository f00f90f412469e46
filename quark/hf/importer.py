"""`quark import`: a Llama-family checkpoint from elsewhere (an HF `LlamaForCausalLM` folder or a llama-architecture
GGUF file) as a Quark model folder.

Choices:
- The folder written is at once a Quark model folder and a plain HF Llama folder: `model.safetensors` with
  Llama's tensor names (the tied head left out) and Quark's SHA-256 plus the tokenizer's hash in its metadata,
  `config.json` = the Llama config with Quark's own config under "quark" and `quark_source` (what it was imported
  from: path, format, the source file's SHA-256, when), the model's own tokenizer files (its chat template and
  special tokens) and `generation_config.json` (the source's own, or for a GGUF only the stop ids: no sampling
  defaults are invented for someone else's model).
- Everything Quark cannot run is refused from the config alone, before any weights load
  (`weights.config_from_llama` names the field). The weights are read through `weights.read_weights`, the one
  reader `quark.load` uses too, so an imported folder and the source load to the same tensors.
- Assembled in a temporary sibling folder and renamed into place; the source is never written to, and an
  existing non-empty `out` is replaced only with `overwrite`.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import torch

from ..io import atomic_write_text
from ..model import Quark
from ..tokenizer import Tokenizer, read_json_object
from ..weights import (
    TOKENIZER_KEY,
    config_for,
    is_gguf,
    load_state_into,
    load_tokenizer_for,
    read_weights,
    resolve_model_path,
    save_safetensors,
)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def generation_config(src: Path, tok: Tokenizer) -> dict:
    """The source's own generation_config.json (its authors' defaults) with the stop ids Quark reads from the
    tokenizer; for a GGUF, which has none, the ids alone (no sampling defaults of Quark's own)."""
    from .export import eos_ids

    own = read_json_object(src / "generation_config.json") if src.is_dir() else None
    return {**(own or {}), "bos_token_id": tok.bos_id, "eos_token_id": eos_ids(tok), "pad_token_id": tok.eot_id}


def source_license(src: Path) -> str | None:
    """The licence the source declares: a GGUF's general.license, or an HF folder's README front matter."""
    if is_gguf(src):
        from .gguf_import import read_header

        lic = read_header(src).fields.get("general.license")
        return lic if isinstance(lic, str) else None
    readme = src / "README.md" if src.is_dir() else None
    if readme is not None and readme.exists():
        m = re.search(r"^license:\s*(\S+)", readme.read_text(encoding="utf-8", errors="replace"), re.M)
        return m.group(1) if m else None
    return None


def import_model(src: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the model at `src` (HF Llama folder or .gguf file) as a Quark model folder at `out`."""
    from .export import check_not_source, llama_config_dict, staged_folder

    src_path, out = resolve_model_path(src), Path(out)
    check_not_source(out, src_path)
    cfg = config_for(src_path)  # refuses what Quark cannot run, before any weights load
    tok = load_tokenizer_for(src_path)
    sd = read_weights(src_path, cfg)
    with torch.device("meta"):
        model = Quark(cfg)
    load_state_into(model.to_empty(device="cpu"), sd, str(src_path))  # names and shapes checked
    keep = {k: v.float().contiguous() for k, v in sd.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    source = {"path": str(Path(src).resolve()), "format": "gguf" if is_gguf(src_path) else "hf",
              "imported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if src_path.is_file():
        source["sha256"] = file_sha256(src_path)
    if (lic := source_license(src_path)) is not None:
        source["license"] = lic
    with staged_folder(out, overwrite) as tmp:
        save_safetensors(keep, tmp / "model.safetensors", metadata={"format": "pt", TOKENIZER_KEY: tok.sha256()})
        config = {**llama_config_dict(cfg, tok), "quark": cfg.to_dict(), "quark_source": source}
        atomic_write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        atomic_write_text(tmp / "generation_config.json", json.dumps(generation_config(src_path, tok), indent=2) + "\n")
        tok.save(tmp, model_max_length=cfg.context_length)
    return out
