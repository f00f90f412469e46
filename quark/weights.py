"""Safe model weights: safetensors + JSON only, never pickle; clear errors for truncated or mismatched files.

Choices:
- A model folder holds `config.json` + `model.safetensors`. `config.json` is either our plain QuarkConfig
  dict, an HF export's config (ours nested under "quark"), or a Llama config whose shapes fit.
- Tied `lm_head.weight` is not stored (as in HF Llama with `tie_word_embeddings`).
- Writes go through `quark.io` (a temp file in the same folder, renamed into place), so a crash never leaves a
  half-written file behind, and a failed write is an OSError naming the file.
- Pickle files (`*.bin`, `*.pt`, `*.pth`, `*.ckpt`) are refused: loading them can run arbitrary code.
- Integrity: every safetensors file Quark writes records `quark_sha256` in its `__metadata__` (transformers and
  other readers ignore unknown keys): SHA-256 over the tensors in name order, each as `name|dtype|shape\n` then its
  raw bytes, so flipped, lost or reordered bytes anywhere in the file change it. Loading recomputes it from the
  tensors just read (0.2-0.5 s for quark-72m's 287 MB on 2 CPU cores, dev/LOG.md); `QUARK_NO_VERIFY=1` skips that.
  Files without the key (HF or Llama folders from elsewhere) load unverified. Every file, ours or not, is
  refused at load when a tensor holds NaN or Inf, and `save_safetensors` refuses to write one.
- A LoRA checkpoint (quark/lora.py) is `config.json` (the base's) + `adapter.safetensors` (the adapters only) +
  `lora.json` (rank, alpha, dropout, targets, the base's path and `base_fingerprint`, a hash of its weights).
  `load_model` loads the base, refuses it when its fingerprint differs, applies the adapters and merges them:
  every reader of a model folder (chat, serve, eval, export) gets plain weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import QuarkConfig
from .io import atomic_write, atomic_write_text
from .model import Quark
from .textio import read_utf8
from .tokenizer import Tokenizer

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HASH_KEY = "quark_sha256"
TOKENIZER_KEY = "quark_tokenizer_sha256"
LORA_JSON, ADAPTER_FILE = "lora.json", "adapter.safetensors"
NO_VERIFY_ENV = "QUARK_NO_VERIFY"


class IntegrityError(ValueError):
    """A file that fails an integrity check: unreadable, truncated, a hash mismatch, NaN/Inf values. Resume skips
    a checkpoint raising it; any other ValueError (a mismatch with the run's settings) stops the run instead."""


def state_dict_for_save(model: Quark) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors in name order, each as `name|dtype|shape\n` followed by its raw bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}\n".encode())
        h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> tuple[str, int] | None:
    """(name, count of NaN/Inf values) of the first floating tensor (in name order) holding any, else None."""
    for name in sorted(tensors):
        t = tensors[name]
        if not t.is_floating_point() or t.numel() == 0:
            continue
        lo, hi = torch.aminmax(t)  # one pass, no temporary; NaN propagates to both (40x faster than isfinite().all())
        if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
            return name, int((~torch.isfinite(t)).sum())
    return None


def check_finite(tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    bad = first_nonfinite(tensors)
    if bad is not None:
        raise IntegrityError(f"{source}: tensor {bad[0]} holds {bad[1]:,} non-finite value(s) (NaN/Inf); these "
                             "weights are broken: use an earlier checkpoint")


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """Write tensors atomically with their SHA-256 in the metadata; refuses NaN/Inf values."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    check_finite(tensors, path)
    metadata = dict(metadata or {}, **{HASH_KEY: tensors_sha256(tensors)})
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_model(model: Quark, folder: str | Path, dtype: torch.dtype | None = None,
               tokenizer: Tokenizer | None = None) -> Path:
    """Write `config.json` + `model.safetensors` into folder (created if needed); with `tokenizer`, its files
    too, and its hash in the weights' metadata (checked when the folder is loaded)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = state_dict_for_save(model)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    meta = {"format": "pt"}
    if tokenizer is not None:
        tokenizer.save(folder, model_max_length=model.config.context_length)
        meta[TOKENIZER_KEY] = tokenizer.sha256()
    save_safetensors(sd, folder / "model.safetensors", metadata=meta)
    atomic_write_text(folder / "config.json", json.dumps(model.config.to_dict(), indent=2) + "\n")
    return folder


def save_adapter(model: Quark, folder: str | Path, lora: dict, tokenizer: Tokenizer | None = None) -> Path:
    """Write a LoRA checkpoint folder: config.json, adapter.safetensors (adapters only), lora.json (`lora`: rank,
    alpha, dropout, targets, base, base_fingerprint) and the tokenizer files."""
    from .lora import lora_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt"}
    if tokenizer is not None:
        tokenizer.save(folder, model_max_length=model.config.context_length)
        meta[TOKENIZER_KEY] = tokenizer.sha256()
    save_safetensors(lora_state_dict(model), folder / ADAPTER_FILE, metadata=meta)
    atomic_write_text(folder / LORA_JSON, json.dumps(lora, indent=2) + "\n")
    atomic_write_text(folder / "config.json", json.dumps(model.config.to_dict(), indent=2) + "\n")
    return folder


def read_lora_json(folder: Path) -> dict:
    try:
        d = json.loads(read_utf8(folder / LORA_JSON))
        return {"rank": int(d["rank"]), "alpha": float(d["alpha"]), "dropout": float(d.get("dropout", 0.0)),
                "targets": list(d["targets"]), "base": str(d["base"]), "base_fingerprint": d.get("base_fingerprint")}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise IntegrityError(f"{folder / LORA_JSON}: not a LoRA description (rank, alpha, targets, base): {e}") from None


def weights_fingerprint(path: str | Path) -> str:
    """SHA-256 naming a model's weights: over each weight file's recorded `quark_sha256` (Quark-written files)
    or its bytes' SHA-256 (any other file, a .gguf included)."""
    path = resolve_model_path(path)
    h = hashlib.sha256()
    if path.is_dir() and (path / LORA_JSON).exists():  # a LoRA checkpoint as the base: its base, then its adapters
        h.update(str(read_lora_json(path)["base_fingerprint"]).encode())
        files = [path / ADAPTER_FILE]
    else:
        files = [path] if path.is_file() else weight_files(path)
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                rec = (sf.metadata() or {}).get(HASH_KEY)
        except (SafetensorError, OSError, ValueError):
            rec = None
        if rec is None:
            fh = hashlib.sha256()
            with open(f, "rb") as fp:
                while block := fp.read(1 << 24):
                    fh.update(block)
            rec = fh.hexdigest()
        h.update(rec.encode())
    return h.hexdigest()


def load_adapted(folder: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Quark:
    """A LoRA checkpoint as a plain model: its base, checked against `base_fingerprint`, plus the merged adapters."""
    from .lora import apply_lora, load_lora_state, merge_lora

    lora = read_lora_json(folder)
    adapters = read_safetensors(folder / ADAPTER_FILE)
    base = Path(lora["base"])
    if not base.exists():
        raise FileNotFoundError(f"{folder / LORA_JSON}: base model {base} not found; these adapters need the "
                                "model they were trained on (edit \"base\" there if it moved)")
    if lora["base_fingerprint"] and (got := weights_fingerprint(base)) != lora["base_fingerprint"]:
        raise IntegrityError(f"{folder / LORA_JSON}: base model {base} has weights {got[:12]}..., the adapters "
                             f"were trained on {lora['base_fingerprint'][:12]}...: not the same base model")
    model = load_model(base, device=device, dtype=torch.float32)
    if model.config != config_from_folder(folder):
        raise ValueError(f"{folder / 'config.json'}: differs from the base model {base}'s config")
    apply_lora(model, lora["rank"], lora["alpha"], targets=lora["targets"])
    load_lora_state(model, adapters, str(folder / ADAPTER_FILE))
    return merge_lora(model).to(dtype).eval()


def read_safetensors(path: str | Path, device: str | torch.device = "cpu", verify: bool | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, never unpickling. The recorded SHA-256 is checked unless `verify` is
    False (default: on unless $QUARK_NO_VERIFY is set); NaN/Inf values are always refused."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: refusing to load a pickle file ({path.suffix}); unpickling can run arbitrary "
                         "code. Convert it to safetensors first (safetensors.torch.save_file).")
    if not path.exists():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        out = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            want = (f.metadata() or {}).get(HASH_KEY)
            for k in f.keys():
                out[k] = f.get_tensor(k)
    except (SafetensorError, OSError, ValueError) as e:
        raise IntegrityError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    if verify is None:
        verify = not os.environ.get(NO_VERIFY_ENV)
    if want and verify and (got := tensors_sha256(out)) != want:
        raise IntegrityError(f"{path}: content hash mismatch (sha256 {got[:12]}..., the file records "
                             f"{want[:12]}...): the file is corrupt; restore it or use an earlier checkpoint")
    check_finite(out, path)
    return out if str(device) == "cpu" else {k: v.to(device) for k, v in out.items()}


def config_from_folder(folder: str | Path) -> QuarkConfig:
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        pickles = [p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES]
        hint = f" (found pickle files {pickles}, which Quark refuses to load)" if pickles else ""
        raise FileNotFoundError(f"{cfg_path}: missing config.json{hint}")
    return config_from_file(cfg_path)


def config_from_file(path: str | Path) -> QuarkConfig:
    """A QuarkConfig from a JSON file: ours, an HF export's config.json (ours nested under "quark"), or a Llama
    config.json."""
    path = Path(path)
    try:
        d = json.loads(read_utf8(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: config file not found") from None
    except json.JSONDecodeError as e:
        raise IntegrityError(f"{path}: not valid JSON ({e})") from None
    except ValueError as e:  # not UTF-8
        raise IntegrityError(str(e)) from None
    if not isinstance(d, dict):
        raise IntegrityError(f"{path}: expected a JSON object of model settings, got {type(d).__name__}")
    if "quark" in d:
        return QuarkConfig.from_dict(d["quark"], source=f"{path} 'quark'")
    if "model_type" in d or "architectures" in d:
        return config_from_llama(d, str(path))
    return QuarkConfig.from_dict(d, source=str(path))


LLAMA_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


def llama_rope_scaling(d: dict, source: str) -> dict | None:
    """The rope_scaling rule of an HF Llama config (`rope_scaling` or transformers 5's `rope_parameters`), as
    QuarkConfig keeps it: None, or {"rope_type": "linear" | "llama3", ...its parameters}."""
    rs = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if not isinstance(rs, dict):
        raise ValueError(f"{source}: field rope_scaling={rs!r} is not an object")
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ("linear", "llama3"):
        raise ValueError(f"{source}: field rope_scaling.rope_type={kind!r} is not supported by Quark "
                         "(supported: default, linear, llama3)")
    keys = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                              "original_max_position_embeddings")}[kind]
    return {"rope_type": kind, **{k: rs.get(k) for k in keys}}


def config_from_llama(d: dict, source: str) -> QuarkConfig:
    """A QuarkConfig for an HF Llama config.json, or a ValueError naming the one field Quark cannot run (another
    architecture, attention/MLP bias, sliding windows, experts, another activation or RoPE rule), read before
    any weights load."""
    arch = d.get("architectures") or []
    if d.get("model_type", "llama") != "llama" or (arch and "LlamaForCausalLM" not in arch):
        raise ValueError(f"{source}: model_type={d.get('model_type')!r} architectures={arch} is not supported: "
                         "Quark runs Llama-architecture models (LlamaForCausalLM)")
    for field, ok in (("hidden_act", d.get("hidden_act", "silu") == "silu"),
                      ("attention_bias", not d.get("attention_bias", False)),
                      ("mlp_bias", not d.get("mlp_bias", False)),
                      ("sliding_window", d.get("sliding_window") is None),
                      ("num_local_experts", not d.get("num_local_experts")),
                      ("num_experts", not d.get("num_experts"))):
        if not ok:
            raise ValueError(f"{source}: field {field}={d.get(field)!r} is not supported by Quark")
    missing = [k for k in LLAMA_REQUIRED if k not in d]
    if missing:
        raise ValueError(f"{source}: a Llama config needs {', '.join(missing)}; this file has none of them")
    params = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
    rope_theta = d.get("rope_theta") or params.get("rope_theta") or 10000.0
    n_heads = d["num_attention_heads"]
    head_dim = d.get("head_dim") or 0
    if isinstance(head_dim, int) and isinstance(n_heads, int) and head_dim * n_heads == d["hidden_size"]:
        head_dim = 0  # derived: d_model / n_heads
    try:
        return QuarkConfig(n_layers=d["num_hidden_layers"], d_model=d["hidden_size"], n_heads=n_heads,
                           n_kv_heads=d.get("num_key_value_heads") or n_heads, d_ff=d["intermediate_size"],
                           vocab_size=d["vocab_size"], context_length=d.get("max_position_embeddings", 2048),
                           rope_theta=float(rope_theta), norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                           tie_embeddings=bool(d.get("tie_word_embeddings", False)), head_dim=head_dim,
                           rope_scaling=llama_rope_scaling(d, source))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: {e}") from None


def load_state_into(model: Quark, sd: dict[str, torch.Tensor], source: str) -> Quark:
    """Copy tensors into model, checking names and shapes; errors name the file and tensor."""
    expected = state_dict_for_save(model)
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected) - {"lm_head.weight"})
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        raise ValueError(f"{source}: unexpected tensor(s) {extra[:5]}{' ...' if len(extra) > 5 else ''} "
                         "(a checkpoint of another architecture?)")
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ValueError(f"{source}: tensor {k} has shape {tuple(sd[k].shape)}, the config expects "
                             f"{tuple(v.shape)}")
    if model.config.tie_embeddings and "lm_head.weight" in sd and not torch.equal(
            sd["lm_head.weight"], sd["model.embed_tokens.weight"]):
        raise ValueError(f"{source}: config says tie_embeddings but lm_head.weight differs from the embedding")
    model.load_state_dict({k: sd[k] for k in expected}, strict=False)
    return model


def resolve_model_path(path: str | Path) -> Path:
    """A model folder for `path`: itself when it holds config.json, a run folder's newest checkpoint
    (`RUN/checkpoints/step_NNNNNN/`), or a file's own path."""
    path = Path(path)
    if path.is_file() or (path / "config.json").exists():
        return path
    steps = sorted((path / "checkpoints").glob("step_*"), key=lambda p: p.name) if path.is_dir() else []
    steps = [p for p in steps if (p / "config.json").exists()]
    if steps:
        return steps[-1]
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model folder, checkpoint or run")
    return path


def is_gguf(path: Path) -> bool:
    return path.suffix == ".gguf" and path.is_file()


def config_for(path: str | Path) -> QuarkConfig:
    """The QuarkConfig of a model folder, checkpoint, run folder or .gguf file, read without loading weights;
    what Quark cannot run is a ValueError naming the field."""
    path = resolve_model_path(path)
    if is_gguf(path):
        from .hf.gguf_import import gguf_llama_config

        return config_from_llama(gguf_llama_config(path), str(path))
    return config_from_folder(path if path.is_dir() else path.parent)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder: model.safetensors, or the shards its index names."""
    index = folder / "model.safetensors.index.json"
    if not (folder / "model.safetensors").exists() and index.exists():
        try:
            shards = sorted(set(json.loads(read_utf8(index))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise IntegrityError(f"{index}: not a safetensors index (weight_map of tensor -> file): {e}") from None
        return [folder / s for s in shards]
    weights = folder / "model.safetensors"
    if not weights.exists():
        pickles = [p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise ValueError(f"{folder}: only pickle weights {pickles} found; Quark loads safetensors only "
                             "because unpickling can run arbitrary code")
        raise FileNotFoundError(f"{weights}: missing model weights")
    return [weights]


def read_weights(path: Path, config: QuarkConfig, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a model (a folder's safetensors files, one .safetensors file, or a .gguf file)."""
    if is_gguf(path):
        from .hf.gguf_import import gguf_llama_config, read_gguf_tensors

        sd = read_gguf_tensors(path, gguf_llama_config(path))
        check_finite(sd, path)
        return sd if str(device) == "cpu" else {k: v.to(device) for k, v in sd.items()}
    if path.is_file():
        return read_safetensors(path, device=device)
    sd = {}
    for f in weight_files(path):
        sd.update(read_safetensors(f, device=device))
    return sd


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Quark:
    """Load a model from a folder (our checkpoint, an HF export, an HF Llama folder, sharded or not, or a run
    folder's newest checkpoint), a .safetensors file with a config.json beside it, or a llama-architecture
    .gguf file (dequantized to float32). Never unpickles."""
    path = resolve_model_path(path)
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        read_safetensors(path)  # raises the pickle refusal
    if path.is_dir() and (path / LORA_JSON).exists():
        return load_adapted(path, device, dtype)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model folder")
    files = weight_files(path) if path.is_dir() else [path]  # a missing or pickle-only folder fails first
    config = config_for(path)
    with torch.device("meta"):
        model = Quark(config)
    model = model.to_empty(device=device)
    model.reset_rope()
    load_state_into(model, read_weights(path, config, device), str(files[0] if len(files) == 1 else path))
    if config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(dtype).eval()


def recorded_tokenizer_sha256(path: Path) -> str | None:
    """The tokenizer hash a model folder's weights were saved with (safetensors metadata), if recorded."""
    try:
        file = path / ADAPTER_FILE if (path / LORA_JSON).exists() else weight_files(path)[0]
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return (f.metadata() or {}).get(TOKENIZER_KEY)
    except (SafetensorError, OSError, ValueError):
        return None  # unreadable weights fail later, at load, with their own message


def load_tokenizer_for(path: str | Path) -> Tokenizer:
    """The tokenizer of a model folder, run, checkpoint or .gguf file, checked against the model without
    loading the weights: the ids fit the embedding rows, and it is the tokenizer the weights were saved with
    where the folder records that."""
    path = resolve_model_path(path)
    cfg = config_for(path)
    if is_gguf(path):
        import tempfile

        from .hf.gguf_import import gguf_tokenizer_files

        with tempfile.TemporaryDirectory(prefix="quark-gguf-tok-") as tmp:
            for name, text in gguf_tokenizer_files(path).items():
                Path(tmp, name).write_text(text, encoding="utf-8")
            return Tokenizer.load(tmp)
    folder = path.parent if path.is_file() else path
    tok = Tokenizer.load(folder)
    if tok.vocab_size > cfg.vocab_size or (tok.quark_layout and tok.vocab_size != cfg.vocab_size):
        raise ValueError(f"{folder}: tokenizer has {tok.vocab_size} ids but the model has {cfg.vocab_size} "
                         "embedding rows (vocab_size); they must come from the same run")
    want = recorded_tokenizer_sha256(folder) if folder.is_dir() else None
    if want and want != tok.sha256():
        raise ValueError(f"{folder}/tokenizer.json: sha256 {tok.sha256()[:12]}... is not the tokenizer these weights "
                         f"were trained with ({want[:12]}..., recorded in the weights' metadata); restore that "
                         "tokenizer.json")
    return tok


def load_model_and_tokenizer(path: str | Path, device: str | torch.device = "cpu",
                             dtype: torch.dtype = torch.float32) -> tuple[Quark, Tokenizer]:
    """(model, tokenizer) from one folder or .gguf file; fails before loading weights when the tokenizer is
    missing or does not fit the model."""
    tok = load_tokenizer_for(path)
    return load_model(path, device=device, dtype=dtype), tok


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is present, else 'cpu'; a CUDA device asked for without one is an error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} asked for, but no CUDA device is available")
    return device


@torch.no_grad()
def check_activations(model: Quark, source: str | Path) -> None:
    """One short forward pass; weights that are finite but overflow the activations (e.g. 3e38) are refused here,
    naming the first layer whose output is Inf/NaN or too large for the next RMSNorm (its mean square overflows
    float32), instead of chatting empty replies."""
    idx = torch.arange(min(8, model.config.vocab_size), device=model.device)[None]
    seen = []

    def ok(t: torch.Tensor) -> bool:
        return bool(torch.isfinite(t.float().square().mean(-1)).all())

    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: seen.append((i, ok(out))))
             for i, layer in enumerate(model.model.layers)]
    try:
        logits = model(idx)
    finally:
        for h in hooks:
            h.remove()
    bad = next((f"layer {i}" for i, good in seen if not good), None)
    if bad is None and not bool(torch.isfinite(logits).all()):
        bad = "the output head"
    if bad is not None:
        raise IntegrityError(f"{source}: the weights overflow in {bad} (activations reach Inf/NaN on a test input, "
                             "in this dtype): these weights are broken; use an earlier checkpoint")


def load_for_inference(path: str | Path, device: str = "auto",
                       quantize: str | None = None) -> tuple[Quark, Tokenizer]:
    """(model, tokenizer) ready for generation: eval mode, on the device (bf16 on CUDA, fp32 on the CPU),
    checked to give finite activations, optionally with int8 weight-only linears."""
    device = resolve_device(device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model, tokenizer = load_model_and_tokenizer(path, device=device, dtype=dtype)
    check_activations(model, path)
    if quantize is not None:
        if quantize != "int8":
            raise ValueError(f"quantize={quantize!r}: allowed: int8")
        from .quantize import quantize_int8

        model = quantize_int8(model)
    return model.eval(), tokenizer
