"""Export a Quark checkpoint as one GGUF file (llama architecture) for llama.cpp and the tools built on it.

Choices:
- Written with the `gguf` package (the llama.cpp project's own writer); tensor names come from its
  `TensorNameMap` for `MODEL_ARCH.LLAMA`, so Quark's Llama-named parameters map without a hand-made table.
- llama.cpp applies RoPE to interleaved pairs while Quark (like HF Llama) rotates halves, so q_proj and
  k_proj rows are permuted per head exactly as llama.cpp's `convert_hf_to_gguf.py` does for Llama; every other
  tensor is copied as is. A tied lm_head is omitted (llama.cpp then reuses `token_embd`).
- Vocabulary: tokenizer model "gpt2" (byte-level BPE) with the token strings, merges and token types (the three
  special tokens are CONTROL). `tokenizer.ggml.pre = "llama-bpe"` because Quark splits text with Llama-3's
  regex; a tokenizer whose split regex differs is refused rather than exported with silently different
  tokenization, and a vocabulary entry that BPE does not merge back to itself (llama.cpp takes in-vocabulary
  pre-tokens whole) is warned about. No BOS is added (Quark never trains with one); eos is `<|im_end|>`, pad
  is `<|endoftext|>`.
- The ChatML template goes into `tokenizer.chat_template`. Weights are f32 (default) or f16 for matrices, or
  quantized with the `gguf` package's own quantizers (the code llama.cpp's converter runs): `q8_0` (blocks of 32
  weights, one f16 scale) or `q4_0` (4-bit blocks of 32). As in llama.cpp's converter, a matrix whose row length
  is not a multiple of 32 stays f16; norms stay f32. In q4_0 the tied embedding, which is also the output
  matrix, is q8_0: llama.cpp's own Q4_0 recipe gives the output matrix Q6_K, which gguf-py cannot write.
- `amx_safe` (`--gguf-amx-safe`): llama.cpp builds for Intel AMX CPUs repack every q4_0/q4_1/q8_0/K-quant
  matrix whose row length and row count are multiples of 32 into AMX tiles at load (ggml-cpu/amx); one such
  repack (quark-72m's ffn_down, rows of d_ff=1344, not a multiple of 256) was seen to crash. With amx_safe,
  quantized matrices whose row length is not a multiple of 256 are written bf16, a type the AMX buffer refuses,
  so they never reach the repack. Not verified on an AMX machine; `--no-repack` on llama.cpp's side avoids every
  repack (README "CPU speed").
- Written to a temporary file and renamed into place, with `<name>.gguf.sha256` beside it (the file's SHA-256
  in `sha256sum` format: `sha256sum -c model.gguf.sha256` checks it; `verify_gguf` does the same).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..io import atomic_write_text, write_error
from ..tokenizer import SPLIT_REGEX
from ..weights import load_model_and_tokenizer, resolve_model_path, state_dict_for_save
from .export import check_not_source
from .gguf_import import permute_for_llama_cpp, unpermute_from_llama_cpp  # noqa: F401 (re-exported)

if TYPE_CHECKING:  # gguf is imported where it is used (an optional extra)
    import gguf

    from ..config import QuarkConfig
    from ..model import Quark
    from ..tokenizer import Tokenizer

GGUF_PRE = "llama-bpe"
QUANT_TYPES = ("q8_0", "q4_0")


SMOLLM_PRE = [{"type": "Digits", "individual_digits": True},
              {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]


def gguf_pre(tok: Tokenizer) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: the one a GGUF import recorded, "llama-bpe" for Quark's
    Llama-3 split, "smollm" for SmolLM's digits + GPT-2 split, "gpt-2" for GPT-2's; anything else is refused (llama.cpp would split
    text differently from the model's own tokenizer)."""
    if tok.config.get("quark_gguf_pre"):
        return tok.config["quark_gguf_pre"]
    pre = json.loads(tok.tk.to_str()).get("pre_tokenizer") or {}
    if json.dumps(SPLIT_REGEX)[1:-1] in json.dumps(pre):
        return GGUF_PRE
    keys = ("type", "individual_digits", "add_prefix_space", "use_regex", "trim_offsets")
    parts = [{k: v for k, v in p.items() if k in keys} for p in pre.get("pretokenizers", [pre])]
    if parts == SMOLLM_PRE:
        return "smollm"
    if parts == SMOLLM_PRE[1:]:
        return "gpt-2"
    raise ValueError(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:120]}...) has no known llama.cpp name, so "
                     "a GGUF would tokenize differently; export --format llama and convert it with llama.cpp's "
                     "convert_hf_to_gguf.py")


def vocab_for_gguf(tok: Tokenizer) -> tuple[list[str], list[int], list[str]]:
    """(token strings by id, token types, merges as "a b") from the HF tokenizer.json; special tokens are
    CONTROL."""
    import gguf

    data = json.loads(tok.tk.to_str())
    gguf_pre(tok)
    vocab = tok.tk.get_vocab(with_added_tokens=True)
    n = tok.vocab_size
    tokens = [None] * n
    for t, i in vocab.items():
        if i >= n:
            raise ValueError(f"tokenizer id {i} ({t!r}) is outside the vocabulary size {n}")
        tokens[i] = t
    if None in tokens:
        raise ValueError(f"tokenizer has no token for id {tokens.index(None)}")
    special = set(tok.special)
    # llama.cpp's BPE takes a pre-token found in the vocabulary whole (ignore_merges); HF's BPE merges it.
    # The two agree exactly when every vocabulary string merges back to its own token.
    differ = [t for t, i in vocab.items() if t not in special and [x.id for x in tok.tk.model.tokenize(t)] != [i]]
    if differ:
        warnings.warn(f"{len(differ)} vocabulary entries (e.g. {differ[:3]}) do not BPE-merge to themselves; "
                      "llama.cpp will tokenize text containing them as whole words differently", stacklevel=2)
    types = [int(gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL) for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tokens, types, merges


def tensor_type(gname: str, shape: tuple[int, ...], dtype: str, quant: str | None,
                amx_safe: bool = False) -> gguf.GGMLQuantizationType:
    """The GGMLQuantizationType a tensor is written in (see the module docstring)."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) != 2:
        return T.F32
    if quant is None:
        return T.F16 if dtype == "f16" else T.F32
    if shape[1] % 32:
        return T.F16
    if amx_safe and shape[1] % 256:
        return T.BF16
    if quant == "q4_0" and gname == "token_embd.weight":
        return T.Q8_0
    return T.Q8_0 if quant == "q8_0" else T.Q4_0


def export_gguf(checkpoint: str | Path, out: str | Path, *, dtype: str = "f32", overwrite: bool = False,
                name: str | None = None, quant: str | None = None, amx_safe: bool = False) -> Path:
    """Write `checkpoint` (model / checkpoint / run folder) as a llama-architecture GGUF file at `out`;
    `quant` "q8_0" / "q4_0" quantizes the matrices (then `dtype` is not used)."""
    import gguf

    out = Path(out)
    if out.suffix != ".gguf":
        raise ValueError(f"{out}: a GGUF export is one file; give --out a name ending in .gguf")
    if dtype not in ("f32", "f16"):
        raise ValueError(f"GGUF dtype {dtype!r}: allowed values are f32, f16")
    if quant is not None and quant not in QUANT_TYPES:
        raise ValueError(f"GGUF quant {quant!r}: allowed values are {', '.join(QUANT_TYPES)}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: file exists (pass --force to replace it)")
    check_not_source(out, Path(checkpoint))
    model, tok = load_model_and_tokenizer(resolve_model_path(checkpoint))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    w = gguf.GGUFWriter(tmp, arch="llama")
    try:
        _add_metadata(w, model.config, tok, name or out.stem, dtype, quant)
        _add_tensors(w, model, dtype, quant, amx_safe)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        digest = file_sha256(tmp)
        os.replace(tmp, out)
        atomic_write_text(sha256_path(out), f"{digest}  {out.name}\n")
    except BaseException as e:
        w.close()
        tmp.unlink(missing_ok=True)
        if (err := write_error(e, out)) is not None:  # a full disk or read-only folder: named in one line
            raise err from None
        raise
    return out


def _add_metadata(w: gguf.GGUFWriter, cfg: QuarkConfig, tok: Tokenizer, name: str, dtype: str, quant: str | None) -> None:
    """The llama-architecture hyperparameters, the BPE vocabulary and merges, the special tokens and the template."""
    import gguf

    w.add_name(name)
    w.add_license("mit")
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type({"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}.get(
        quant, gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16))
    tokens, types, merges = vocab_for_gguf(tok)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(gguf_pre(tok))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_id if tok.bos_id is not None else tok.eot_id)
    w.add_eos_token_id(tok.stop_ids[0])
    w.add_pad_token_id(tok.eot_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)


def _add_tensors(w: gguf.GGUFWriter, model: Quark, dtype: str, quant: str | None, amx_safe: bool) -> None:
    """Every weight under its GGUF name (q/k rows permuted for llama.cpp's RoPE), in the type `tensor_type` picks."""
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.n_layers)
    for key, t in state_dict_for_save(model).items():
        arr = t.detach().float().cpu().numpy()
        if key.endswith("self_attn.q_proj.weight"):
            arr = permute_for_llama_cpp(arr, cfg.n_heads)
        elif key.endswith("self_attn.k_proj.weight"):
            arr = permute_for_llama_cpp(arr, cfg.n_kv_heads)
        gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise RuntimeError(f"no GGUF name for tensor {key}")
        kind = tensor_type(gname, arr.shape, dtype, quant, amx_safe)
        arr = np.ascontiguousarray(arr)
        if kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, arr)
        elif kind == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gname, arr.astype(np.float16))
        else:
            w.add_tensor(gname, gguf.quants.quantize(arr, kind), raw_dtype=kind)


def sha256_path(gguf_file: Path) -> Path:
    return gguf_file.with_name(gguf_file.name + ".sha256")


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_gguf(path: str | Path) -> None:
    """Raise ValueError naming the file when a GGUF does not match the SHA-256 recorded beside it."""
    path = Path(path)
    side = sha256_path(path)
    if not side.exists():
        raise FileNotFoundError(f"{side}: no recorded SHA-256 beside {path.name}")
    want = side.read_text().split()[0]
    if (got := file_sha256(path)) != want:
        raise ValueError(f"{path}: content hash mismatch (sha256 {got[:12]}..., {side.name} records {want[:12]}...): "
                         "the file is corrupt; export it again")
