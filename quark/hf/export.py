"""Export a Quark checkpoint as a Hugging Face model folder (remote code, as its model card describes) or a plain
Llama folder, each with tokenizer files, generation defaults, a generated model card and the licence.

Choices:
- HF format: `config.json` is a Llama config with Quark's config nested under "quark" (read by `quark.weights`
  too) and `modeling_quark.QuarkForCausalLM` in `auto_map` (no `AutoConfig` entry: loading the config or the
  tokenizer needs no custom code, so nothing asks "run the custom code? [y/N]"). The modeling file wraps
  verbatim copies of `quark/model.py`, `generate.py`, `sampling.py`, `config.py` placed beside it: one
  implementation of the transformer, readable in one sitting, importing only torch and transformers.
- Llama format: Quark uses Llama's parameter names and RoPE layout, so the weights are copied unchanged and
  only `config.json` differs; `transformers.LlamaForCausalLM` (and Llama-serving engines) load it without
  remote code.
- Weights are float32 safetensors; the tied `lm_head` is not stored.
- `model.safetensors` records its SHA-256 in the safetensors metadata (`quark.weights`), which transformers
  ignores and Quark verifies when it loads the folder.
- The folder is assembled in a temporary sibling and renamed into place, so a failed export never leaves a
  half-written folder; an existing non-empty folder is replaced only with `overwrite=True`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import QuarkConfig
from ..io import atomic_write_text, write_error
from ..sampling import RECOMMENDED as SAMPLING_RECOMMENDED
from ..tokenizer import Tokenizer
from ..weights import (
    TOKENIZER_KEY,
    load_model_and_tokenizer,
    resolve_model_path,
    save_safetensors,
    state_dict_for_save,
)
from .remote_code import remote_code_files

# Only the model is remote code: config.json is a LlamaConfig (see configuration_quark.py), so AutoConfig and
# AutoTokenizer load the folder without asking to run custom code.
AUTO_MAP = {"AutoModelForCausalLM": "modeling_quark.QuarkForCausalLM"}
# The card's "Recommended starting configuration" for generate_text(), in transformers' names.
RECOMMENDED = {("repetition_penalty" if k == "rep_penalty" else k): v for k, v in SAMPLING_RECOMMENDED.items()}
FORMATS = ("hf", "llama", "gguf", "peft")


def _transformers_version() -> str | None:
    try:
        import transformers

        return transformers.__version__
    except ImportError:
        return None


def hf_config_dict(cfg: QuarkConfig, tok: Tokenizer | None = None) -> dict:
    """config.json for the remote-code folder: a Llama config (what the architecture is, so every tool reads it
    without custom code) plus Quark's own config under "quark" and the `auto_map` to `QuarkForCausalLM`."""
    return {**llama_config_dict(cfg, tok), "auto_map": dict(AUTO_MAP), "quark": cfg.to_dict()}


def eos_ids(tok: Tokenizer | None) -> int | list[int] | None:
    """generation's eos_token_id: the tokenizer's stop ids less the end-of-text id (one id stays an int)."""
    if tok is None:
        return None
    ids = [i for i in tok.stop_ids if i != tok.eot_id] or tok.stop_ids
    return ids[0] if len(ids) == 1 else ids


def llama_config_dict(cfg: QuarkConfig, tok: Tokenizer | None = None) -> dict:
    """config.json that `transformers.LlamaForCausalLM` reads as exactly this model."""
    rope = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    d = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff,
        "max_position_embeddings": cfg.context_length,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "rope_scaling": cfg.rope_scaling,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "bos_token_id": tok.bos_id if tok else None,
        "eos_token_id": eos_ids(tok),
        "pad_token_id": tok.eot_id if tok else 0,
        "dtype": "float32",
        "use_cache": True,
    }
    if (v := _transformers_version()) is not None:
        d["transformers_version"] = v
    return d


def generation_config_dict(cfg: QuarkConfig, tok: Tokenizer) -> dict:
    """The card's recommended sampling for `generate()`. Its max_new_tokens=200 stays `generate_text()`'s default
    only: in generation_config.json it would override every caller's `max_length` (lm-evaluation-harness
    passes max_length), so the file caps generation at the context length instead."""
    sampling = {k: v for k, v in RECOMMENDED.items() if k != "max_new_tokens"}
    return {"do_sample": True, **sampling, "max_length": cfg.context_length, "bos_token_id": tok.bos_id,
            "eos_token_id": eos_ids(tok), "pad_token_id": tok.eot_id}


def imported_card(name: str, cfg: QuarkConfig, tok: Tokenizer, source: dict, fmt: str) -> tuple[str, str]:
    """(README.md, LICENSE) for an export of an imported model: what it is and where it came from, under the
    source's own licence (Quark's card describes models trained with Quark, which this one was not)."""
    lic = source.get("license") or "unknown"
    card = "\n".join([
        "---", f"license: {lic}", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- llama",
        "- quark", "---", "", f"# {name}", "",
        f"A {cfg.n_params() / 1e6:.1f}M-parameter Llama-architecture model ({cfg.n_layers} layers, d_model "
        f"{cfg.d_model}, {cfg.n_heads} query / {cfg.n_kv_heads} KV heads, head_dim {cfg.head_dim}, SwiGLU "
        f"{cfg.d_ff}, RoPE theta {cfg.rope_theta:g}, context {cfg.context_length:,}, vocabulary {cfg.vocab_size:,}), "
        f"imported with `quark import` from `{Path(source.get('path', '?')).name}` ({source.get('format')}, "
        f"sha256 {source.get('sha256', 'n/a')}) on {source.get('imported', '?')} and exported as "
        f"{'a remote-code HF folder' if fmt == 'hf' else 'a plain Llama folder'}.",
        "", f"Licence: the source's, `{lic}`; see the original model's terms. The tokenizer and chat template are "
        f"the source's own ({tok.vocab_size:,} ids; stop ids {tok.stop_ids}).", ""])
    notice = (f"This model was imported from {Path(source.get('path', '?')).name} and is distributed under its "
              f"original licence: {lic}. See the original model's licence terms.\n")
    return card, notice


def check_not_source(out: Path, source: Path) -> None:
    """An export (or import) never replaces what it reads: `out` may be neither the source nor a folder holding it."""
    o, src = out.resolve(), source.resolve()
    if o == src or o in src.parents:
        raise ValueError(f"--out {out} is {'the source itself' if o == src else 'a folder holding the source ' + str(source)}"
                         "; exporting there would replace the model being read: choose another --out")


@contextmanager
def staged_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling folder to write into; on success it replaces `out`, on any failure it is removed and a
    full disk or read-only folder is raised as one OSError naming `out`."""
    tmp = staging_dir(out, overwrite)
    try:
        yield tmp
        move_into_place(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if (err := write_error(e, out)) is not None:  # a full disk or read-only folder: named in one line
            raise err from None
        raise


def staging_dir(out: Path, overwrite: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: folder exists and is not empty (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as e:
        raise write_error(e, out.parent) or e from None


def move_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export(checkpoint: str | Path, out: str | Path, fmt: str = "hf", *, overwrite: bool = False,
           run: str | Path | None = None, eval_results: str | Path | None = None, name: str | None = None,
           repo_id: str | None = None, base_model: str | None = None) -> Path:
    """Write `checkpoint` (a model folder, checkpoint or run folder) as a `fmt` ("hf" or "llama") model folder
    at `out`, with README.md (the generated model card) and LICENSE. Returns `out`."""
    if fmt not in ("hf", "llama"):
        raise ValueError(f"format {fmt!r}: allowed formats are {', '.join(FORMATS)} (gguf: quark.hf.gguf_export, "
                         "peft: quark.hf.peft_export)")
    from .card import MIT_LICENSE, card_facts, render_model_card

    out = Path(out)
    folder = resolve_model_path(checkpoint)
    check_not_source(out, Path(checkpoint))
    model, tok = load_model_and_tokenizer(folder)
    cfg = model.config
    facts = card_facts(folder, run=run, eval_results=eval_results, name=name or out.name, repo_id=repo_id,
                       base_model=base_model, model=model)
    with staged_folder(out, overwrite) as tmp:
        sd = {k: v.to(torch.float32) for k, v in state_dict_for_save(model).items()}
        save_safetensors(sd, tmp / "model.safetensors", metadata={"format": "pt", TOKENIZER_KEY: tok.sha256()})
        config = hf_config_dict(cfg, tok) if fmt == "hf" else llama_config_dict(cfg, tok)
        atomic_write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        atomic_write_text(tmp / "generation_config.json", json.dumps(generation_config_dict(cfg, tok), indent=2) + "\n")
        if fmt == "hf":
            for dst, src in remote_code_files().items():
                shutil.copyfile(src, tmp / dst)
        tok.save(tmp, model_max_length=cfg.context_length)
        _check_tokenizer_config(tmp, tok)
        source = (json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {})
        if isinstance(source, dict) and "quark_source" in source:  # an imported model: its own card and licence
            card, notice = imported_card(name or out.name, cfg, tok, source["quark_source"], fmt)
        else:
            card, notice = render_model_card(facts, fmt=fmt), MIT_LICENSE.format(year=facts["year"])
        atomic_write_text(tmp / "README.md", card)
        atomic_write_text(tmp / "LICENSE", notice)
    return out


def _check_tokenizer_config(folder: Path, tok: Tokenizer) -> None:
    """The exported tokenizer must carry the model's chat template and its special tokens at their ids."""
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    if tc.get("chat_template") != tok.chat_template:
        raise RuntimeError(f"{folder / 'tokenizer_config.json'}: chat_template missing or not the model's")
    back = Tokenizer.load(folder)
    if back.special != tok.special or back.stop_ids != tok.stop_ids:
        raise RuntimeError(f"{folder / 'tokenizer_config.json'}: special tokens {back.special} / stop ids "
                           f"{back.stop_ids}, the model has {tok.special} / {tok.stop_ids}")
