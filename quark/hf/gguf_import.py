"""Import a llama-architecture GGUF file (llama.cpp's format) as an HF Llama config, float32 weights and tokenizer files.

Choices:
- Only `general.architecture = "llama"` is read. Every `llama.*` metadata key is either mapped to the HF config,
  checked to be harmless (`expert_count` 0), or refused by name: a key Quark does not understand could change the
  model's arithmetic, so it is an error rather than silently ignored. MoE (`expert_count` > 0), sliding-window
  attention, attention biases (`blk.N.attn_q.bias`, ...) and any tensor outside the plain Llama set are refused.
- The header (metadata and tensor table) is parsed by a small struct walk here, not gguf's `GGUFReader`, which spends
  ~3 s building numpy views of a 49k-token vocabulary on every call; tensor bytes are then memory-mapped one at a
  time. `gguf_llama_config` reads no tensor data except the tiny `rope_freqs.weight` (head_dim/2 floats) that
  llama.cpp writes for llama3-style rope scaling. Little-endian GGUF v2/v3 only (what llama.cpp writes).
- Rope scaling: `rope_freqs.weight` holds llama.cpp's per-frequency divisors. It is mapped back to HF's
  `{"rope_type": "llama3", ...}`: `factor` is the largest divisor, `original_max_position_embeddings` is 8192 (the value
  llama.cpp's converter always uses; HF's llama3 formula depends only on its ratios to the two other factors, so the
  choice loses nothing), `low_freq_factor`/`high_freq_factor` are fitted to the smoothed middle band (or llama.cpp's
  defaults 1 and 4 when that band has under two points). The fit is then checked by recomputing HF's formula; a
  `rope_freqs.weight` it does not reproduce is refused. `llama.rope.scaling.type` "linear" (or the old
  `llama.rope.scale_linear`) maps to `{"rope_type": "linear", "factor"}`, "yarn" to `{"rope_type": "yarn", "factor",
  "original_max_position_embeddings"}`; yarn's tuning keys, other scaling types, and rope_freqs combined with a
  scaling type are refused.
- Tied embeddings: a file without `output.weight` gives `tie_word_embeddings: True` and no `lm_head.weight` tensor
  (HF ties it to `model.embed_tokens.weight`); with `output.weight`, `lm_head.weight` is returned and the flag is False.
- Weights are dequantized with `gguf.quants.dequantize` (the llama.cpp project's own numpy code: F32/F16/BF16, Q4_0..Q8_0,
  K-quants, IQ types, ...) into float32; a type it cannot dequantize is refused naming the tensor. q/k rows are
  un-permuted from llama.cpp's interleaved RoPE order with `unpermute_from_llama_cpp`.
- Tokenizer: transformers' own GGUF conversion (`AutoTokenizer.from_pretrained(folder, gguf_file=name)`), saved and read
  back, so the files are what transformers users get. Added to them: `chat_template`, `added_tokens_decoder` and
  `tokenizer_class: PreTrainedTokenizerFast` in tokenizer_config.json (transformers 5 writes the template to
  chat_template.jinja, omits the added tokens, and names a class transformers 4 lacks), a special_tokens_map.json and a
  generation_config.json. transformers ignores `tokenizer.ggml.pre` (it splits as GPT-2), so the split that key names
  is put back where it is known ("smollm": digits one by one, then GPT-2's rule, as SmolLM's own tokenizer.json;
  "llama-bpe": Llama-3's) and the key is kept as `quark_gguf_pre` for quark's GGUF export.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # gguf, torch and transformers are imported where they are used (the `hf` extra)
    import torch

ARCH = "llama"
LLAMA3_ORIGINAL_CONTEXT = 8192  # llama.cpp's convert_hf_to_gguf.py always uses this for rope_freqs
LLAMA3_DEFAULT_LOW_HIGH = (1.0, 4.0)

# llama.* keys read into the config (rope scaling keys are handled in `_rope_scaling`)
MAPPED_KEYS = {"context_length", "embedding_length", "block_count", "feed_forward_length", "vocab_size",
               "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
               "attention.key_length", "attention.value_length", "rope.dimension_count", "rope.freq_base",
               "rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length",
               "rope.scale_linear", "expert_count", "expert_used_count"}

GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
BLOCK_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
ATTN_BIAS_RE = re.compile(r"blk\.\d+\.attn_(q|k|v|output|qkv)\.bias")


def permute_for_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection from half-split RoPE order to llama.cpp's interleaved order, per head."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_from_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `permute_for_llama_cpp` (used to read a GGUF back)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_llama_config(path: str | Path) -> dict:
    """The GGUF's metadata as an HF Llama config.json dict; ValueError naming the field for what Quark cannot run."""
    return _config(read_header(path), path)


def read_gguf_tensors(path: str | Path, config: dict) -> dict[str, torch.Tensor]:
    """All weights as float32 tensors under HF Llama names and shapes (`config` from `gguf_llama_config`)."""
    import torch

    # imported here: gguf_export imports quark.weights, which may import this module
    r = read_header(path)
    _check_architecture(r, path)
    expected = _expected_shapes(config)
    out = {}
    for t in r.tensors:
        if t.name == "rope_freqs.weight":  # already in config["rope_scaling"]
            continue
        name = _hf_name(t.name, path)
        shape = t.shape
        if name not in expected:
            raise ValueError(f"{path}: tensor {t.name} ({name}) is not in a Llama model with "
                             f"num_hidden_layers={config['num_hidden_layers']}")
        if shape != expected[name]:
            raise ValueError(f"{path}: tensor {t.name} has shape {shape}; the config wants {expected[name]}")
        w = _dequantize(r, t)
        if name.endswith("q_proj.weight"):
            w = unpermute_from_llama_cpp(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute_from_llama_cpp(w, config["num_key_value_heads"])
        out[name] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))  # a copy: the file is a read-only map
    missing = [n for n in expected if n not in out and n != "lm_head.weight"]
    if missing:
        raise ValueError(f"{path}: missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    if not config["tie_word_embeddings"] and "lm_head.weight" not in out:
        raise ValueError(f"{path}: config says tie_word_embeddings=False but the file has no output.weight")
    return out


def gguf_tokenizer_files(path: str | Path) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and generation_config.json as text, from
    transformers' own conversion of the GGUF's tokenizer."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        tokenizer_json = (Path(d) / "tokenizer.json").read_text(encoding="utf-8")
        tok_config = json.loads((Path(d) / "tokenizer_config.json").read_text(encoding="utf-8"))
    for provenance in ("is_local", "local_files_only"):  # where this load came from, not part of the tokenizer
        tok_config.pop(provenance, None)
    pre = read_header(path).fields.get("tokenizer.ggml.pre")
    if isinstance(pre, str):
        tokenizer_json = with_gguf_pre(tokenizer_json, pre)
        tok_config["quark_gguf_pre"] = pre  # what quark's GGUF export writes back
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if tok.chat_template is not None:
        tok_config["chat_template"] = tok.chat_template
    tok_config["added_tokens_decoder"] = {str(i): _added_token_dict(t) for i, t in
                                          sorted(tok.added_tokens_decoder.items())}
    special = {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)}
    tok_config.update(special)
    generation = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    generation = {k: v for k, v in generation.items() if v is not None}
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": _dumps(tok_config),
            "special_tokens_map.json": _dumps(special), "generation_config.json": _dumps(generation)}


def with_gguf_pre(tokenizer_json: str, pre: str) -> str:
    """tokenizer.json with the text splitting llama.cpp's `tokenizer.ggml.pre` names, where transformers' conversion
    (which ignores that key and splits as GPT-2) would tokenize differently: "smollm" splits digits one by one
    before GPT-2's rule (SmolLM's own tokenizer.json), "llama-bpe" / "llama3" is Llama-3's split."""
    from tokenizers import Regex, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from ..tokenizer import SPLIT_REGEX

    split = {"smollm": [pre_tokenizers.Digits(individual_digits=True),
                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)],
             "llama-bpe": [pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated"),
                           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]}
    split["llama3"] = split["llama-bpe"]
    if pre not in split:
        return tokenizer_json
    tk = HFTokenizer.from_str(tokenizer_json)
    tk.pre_tokenizer = pre_tokenizers.Sequence(split[pre])
    return tk.to_str(pretty=True)


def _dumps(d: dict) -> str:
    return json.dumps(d, indent=2, ensure_ascii=False) + "\n"


def _added_token_dict(t: object) -> dict:
    return {k: getattr(t, k) for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy/torch order (GGUF lists dimensions innermost first)
    type_id: int  # a GGMLQuantizationType value
    start: int  # absolute byte offset of the data in the file


@dataclass
class Header:
    """What the importer needs of a GGUF file: every metadata value and the tensor table; no tensor data."""

    path: Path
    fields: dict[str, object]
    tensors: list[TensorInfo]


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_header(path: str | Path) -> Header:
    """Parse the header: a plain struct walk over a memory map (gguf's GGUFReader builds numpy views for every part of
    every field, ~3 s for a 49k-token vocabulary; this takes ~0.2 s). Little-endian GGUF v2/v3, as llama.cpp writes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        buf = memoryview(m)
        try:
            return _parse(buf, path)
        except (struct.error, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: truncated or corrupt GGUF header ({e})") from None
        finally:
            buf.release()


def _parse(buf: memoryview, path: Path) -> Header:
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (the first bytes are {bytes(buf[:4])!r}, not b'GGUF')")
    version, n_tensors, n_fields = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} (or a big-endian file) is not supported; allowed: 2, 3")
    pos, fields = 24, {}
    for _ in range(n_fields):
        key, pos = _string(buf, pos)
        (vtype,), pos = struct.unpack_from("<I", buf, pos), pos + 4
        fields[key], pos = _value(buf, pos, vtype, path, key)
    tensors = []
    for _ in range(n_tensors):
        name, pos = _string(buf, pos)
        (n_dims,), pos = struct.unpack_from("<I", buf, pos), pos + 4
        dims, pos = struct.unpack_from(f"<{n_dims}Q", buf, pos), pos + 8 * n_dims
        type_id, offset = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        tensors.append(TensorInfo(name, tuple(reversed(dims)), type_id, offset))
    align = int(fields.get("general.alignment", 32))
    data_start = -(-pos // align) * align
    for t in tensors:
        t.start += data_start
    return Header(path, fields, tensors)


def _string(buf: memoryview, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    return str(buf[pos + 8:pos + 8 + n], "utf-8"), pos + 8 + n


def _value(buf: memoryview, pos: int, vtype: int, path: Path, key: str) -> tuple[object, int]:
    if vtype in _SCALARS:
        return struct.unpack_from(_SCALARS[vtype], buf, pos)[0], pos + struct.calcsize(_SCALARS[vtype])
    if vtype == _STRING:
        return _string(buf, pos)
    if vtype != _ARRAY:
        raise ValueError(f"{path}: metadata key {key} has value type {vtype}, which is not a GGUF type (0-12)")
    item_type, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if item_type in _SCALARS:  # one unpack for the whole array
        fmt = f"<{count}{_SCALARS[item_type][1]}"
        return list(struct.unpack_from(fmt, buf, pos)), pos + struct.calcsize(fmt)
    items = []
    for _ in range(count):
        item, pos = _value(buf, pos, item_type, path, key)
        items.append(item)
    return items, pos


def _field(r: Header, key: str, default: object = None) -> object:
    return r.fields.get(key, default)


def _require(r: Header, key: str, path: str | Path) -> object:
    if key not in r.fields:
        raise ValueError(f"{path}: metadata key {key} is missing; a llama GGUF needs it")
    return r.fields[key]


def _check_architecture(r: Header, path: str | Path) -> None:
    if (arch := _field(r, "general.architecture")) != ARCH:
        raise ValueError(f"{path}: general.architecture={arch!r} is not supported; "
                         "Quark runs llama-architecture GGUF files")


def _config(r: Header, path: str | Path) -> dict:  # shape: one flat GGUF-key -> HF-config-field mapping, checked in order
    _check_architecture(r, path)
    keys = {k[len(ARCH) + 1:]: k for k in r.fields if k.startswith(ARCH + ".")}
    for short, key in keys.items():
        if short == "attention.sliding_window":
            raise ValueError(f"{path}: {key}={_field(r, key)} (sliding-window attention) is not supported; "
                             "Quark's Llama attends to the whole context")
        if short.startswith("rope.scaling.") or short in MAPPED_KEYS:
            continue
        raise ValueError(f"{path}: metadata key {key} is not supported (Quark understands {ARCH}.<key> for "
                         f"{', '.join(sorted(MAPPED_KEYS))}, {ARCH}.attention.sliding_window and "
                         f"{ARCH}.rope.scaling.*)")
    if (experts := _field(r, f"{ARCH}.expert_count", 0)) > 0:
        raise ValueError(f"{path}: {ARCH}.expert_count={experts} (a mixture-of-experts, MoE, model) is not supported; "
                         "Quark runs dense Llama models (expert_count 0)")
    names = [t.name for t in r.tensors]
    for n in names:
        if ATTN_BIAS_RE.fullmatch(n):
            raise ValueError(f"{path}: tensor {n} is an attention bias, which Quark's Llama does not have "
                             "(attention_bias=False); this is not a plain Llama model")
        if n != "rope_freqs.weight":
            _hf_name(n, path)

    n_heads = int(_require(r, f"{ARCH}.attention.head_count", path))
    n_kv_heads = _field(r, f"{ARCH}.attention.head_count_kv", n_heads)
    if isinstance(n_kv_heads, list):  # per-layer counts: Quark's layers all have the same
        if len(set(n_kv_heads)) != 1:
            raise ValueError(f"{path}: {ARCH}.attention.head_count_kv varies by layer ({n_kv_heads}); "
                             "Quark's Llama needs one value")
        n_kv_heads = n_kv_heads[0]
    n_kv_heads = int(n_kv_heads)
    d = int(_require(r, f"{ARCH}.embedding_length", path))
    head_dim = int(_field(r, f"{ARCH}.attention.key_length", d // n_heads))
    value_dim = int(_field(r, f"{ARCH}.attention.value_length", head_dim))
    rope_dim = int(_field(r, f"{ARCH}.rope.dimension_count", head_dim))
    if value_dim != head_dim or rope_dim != head_dim:
        raise ValueError(f"{path}: attention.key_length={head_dim}, attention.value_length={value_dim}, "
                         f"rope.dimension_count={rope_dim}: Quark's Llama needs all three equal")
    if n_heads % n_kv_heads:
        raise ValueError(f"{path}: attention.head_count={n_heads} is not a multiple of head_count_kv={n_kv_heads}")
    if "token_embd.weight" not in names:
        raise ValueError(f"{path}: tensor token_embd.weight is missing")
    vocab_size = r.tensors[names.index("token_embd.weight")].shape[0]
    if (declared := _field(r, f"{ARCH}.vocab_size")) is not None and int(declared) != vocab_size:
        raise ValueError(f"{path}: {ARCH}.vocab_size={declared} but token_embd.weight has {vocab_size} rows")
    rope_theta = float(_field(r, f"{ARCH}.rope.freq_base", 10000.0))  # llama.cpp's default when absent
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d,
        "intermediate_size": int(_require(r, f"{ARCH}.feed_forward_length", path)),
        "num_hidden_layers": int(_require(r, f"{ARCH}.block_count", path)),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(_require(r, f"{ARCH}.attention.layer_norm_rms_epsilon", path)),
        "rope_theta": rope_theta,
        "max_position_embeddings": int(_require(r, f"{ARCH}.context_length", path)),
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": False,
        "mlp_bias": False,
    }
    for hf_key, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("pad_token_id", "padding_token_id")):
        if (v := _field(r, f"tokenizer.ggml.{key}")) is not None:
            cfg[hf_key] = int(v)
    if (scaling := _rope_scaling(r, path, rope_theta, head_dim)) is not None:
        cfg["rope_scaling"] = scaling
    return cfg


def _rope_scaling(r: Header, path: str | Path, rope_theta: float, head_dim: int) -> dict | None:
    """HF rope_scaling from llama.cpp's rope keys and `rope_freqs.weight` (see the module docstring)."""
    kind = _field(r, f"{ARCH}.rope.scaling.type", "none")
    factor = _field(r, f"{ARCH}.rope.scaling.factor")
    if kind == "none" and (old := _field(r, f"{ARCH}.rope.scale_linear")) is not None:
        kind, factor = "linear", old
    freqs = [t for t in r.tensors if t.name == "rope_freqs.weight"]
    understood = {"type", "factor", "finetuned"} | ({"original_context_length"} if kind == "yarn" else set())
    extra = [k for k in r.fields if k.startswith(f"{ARCH}.rope.scaling.") and k.split(".")[-1] not in understood]
    if extra and kind != "none":
        raise ValueError(f"{path}: rope scaling {kind!r} with {', '.join(extra)} is not supported "
                         f"(understood: {ARCH}.rope.scaling.{{{', '.join(sorted(understood))}}})")
    if freqs and kind != "none":
        raise ValueError(f"{path}: rope_freqs.weight together with {ARCH}.rope.scaling.type={kind!r} is not "
                         "supported (llama3-style scaling has rope_freqs.weight and no scaling type)")
    if freqs:
        divisors = _dequantize(r, freqs[0]).astype(np.float64).reshape(-1)
        return _llama3_scaling(divisors, path, rope_theta, head_dim)
    if kind == "none":
        return None
    if kind not in ("linear", "yarn"):
        raise ValueError(f"{path}: {ARCH}.rope.scaling.type={kind!r} is not supported; allowed: none, linear, yarn")
    if factor is None:
        raise ValueError(f"{path}: {ARCH}.rope.scaling.type={kind!r} needs {ARCH}.rope.scaling.factor")
    out = {"rope_type": kind, "factor": float(factor)}
    if kind == "yarn":
        out["original_max_position_embeddings"] = int(_require(r, f"{ARCH}.rope.scaling.original_context_length",
                                                               path))
    return out


def llama3_rope_divisors(rope_theta: float, head_dim: int, scaling: dict) -> np.ndarray:
    """Per-frequency divisors of HF's llama3 rope scaling (transformers' `_compute_llama3_parameters`), which is
    what llama.cpp stores as `rope_freqs.weight`."""
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (context / wavelen - low) / (high - low)
    out = 1 / ((1 - smooth) / factor + smooth)
    out[wavelen < context / high] = 1.0
    out[wavelen > context / low] = factor
    return out


def _llama3_scaling(divisors: np.ndarray, path: str | Path, rope_theta: float, head_dim: int) -> dict | None:
    if divisors.shape != (head_dim // 2,):
        raise ValueError(f"{path}: rope_freqs.weight has {divisors.size} values; head_dim={head_dim} needs "
                         f"{head_dim // 2}")
    factor = float(divisors.max())
    if np.allclose(divisors, 1.0):
        return None
    context = LLAMA3_ORIGINAL_CONTEXT
    # in the middle band the scaled frequency interpolates linearly in context/wavelen between inv_freq/factor and
    # inv_freq: smooth = (context/wavelen - low) / (high - low); fit the line through those points
    x = context * (1.0 / rope_theta ** (np.arange(0, head_dim, 2) / head_dim)) / (2 * math.pi)
    middle = (divisors > 1 + 1e-4) & (divisors < factor * (1 - 1e-4))
    low, high = LLAMA3_DEFAULT_LOW_HIGH
    if factor > 1 and middle.sum() >= 2:
        smooth = (1 / divisors[middle] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(x[middle], smooth, 1)
        low = -intercept / slope
        high = low + 1 / slope
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
               "high_freq_factor": float(high), "original_max_position_embeddings": context}
    if not (0 < low < high) or not np.allclose(llama3_rope_divisors(rope_theta, head_dim, scaling), divisors,
                                               rtol=1e-4, atol=0):
        raise ValueError(f"{path}: rope_freqs.weight {np.round(divisors, 4).tolist()} is not llama3-style rope "
                         "scaling (no factor/low_freq_factor/high_freq_factor reproduces it), which Quark cannot map")
    return scaling


def _hf_name(gguf_name: str, path: str | Path) -> str:
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    m = BLOCK_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in BLOCK_NAMES:
        allowed = ", ".join([*GLOBAL_NAMES, "rope_freqs.weight", *(f"blk.N.{b}.weight" for b in BLOCK_NAMES)])
        raise ValueError(f"{path}: tensor {gguf_name} is not supported; a Llama GGUF has {allowed}")
    return f"model.layers.{m.group(1)}.{BLOCK_NAMES[m.group(2)]}.weight"


def _dequantize(r: Header, t: TensorInfo) -> np.ndarray:
    """The tensor as float32 in its numpy shape, dequantized by `gguf.quants.dequantize` from a read-only map."""
    import gguf

    try:
        qtype = gguf.GGMLQuantizationType(t.type_id)
        byte_shape = gguf.quants.quant_shape_to_byte_shape(t.shape, qtype)
        data = np.memmap(r.path, np.uint8, "r", offset=t.start, shape=byte_shape)
        return gguf.quants.dequantize(data, qtype).reshape(t.shape)
    except NotImplementedError:
        raise ValueError(f"{r.path}: tensor {t.name} has type {qtype.name}, which the gguf package cannot "
                         "dequantize") from None
    except (ValueError, KeyError) as e:  # an unknown type id, a row length that is not whole blocks, a short file
        raise ValueError(f"{r.path}: tensor {t.name} (type id {t.type_id}, shape {t.shape}) cannot be read: {e}") from None


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    d, ff, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], d), "model.norm.weight": (d,),
              "lm_head.weight": (config["vocab_size"], d)}
    per_layer = {"input_layernorm": (d,), "self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d),
                 "self_attn.v_proj": (kv, d), "self_attn.o_proj": (d, q), "post_attention_layernorm": (d,),
                 "mlp.gate_proj": (ff, d), "mlp.up_proj": (ff, d), "mlp.down_proj": (d, ff)}
    for i in range(config["num_hidden_layers"]):
        shapes |= {f"model.layers.{i}.{k}.weight": s for k, s in per_layer.items()}
    return shapes
