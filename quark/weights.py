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


def save_model(model: Quark, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write `config.json` + `model.safetensors` into folder (created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = state_dict_for_save(model)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    save_safetensors(sd, folder / "model.safetensors", metadata={"format": "pt"})
    atomic_write_text(folder / "config.json", json.dumps(model.config.to_dict(), indent=2) + "\n")
    return folder


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
    if "quark" in d:
        return QuarkConfig.from_dict(d["quark"], source=str(path))
    if d.get("model_type") == "llama" or "LlamaForCausalLM" in d.get("architectures", []):
        return config_from_llama(d, str(path))
    return QuarkConfig.from_dict(d, source=str(path))


def config_from_llama(d: dict, source: str) -> QuarkConfig:
    """A QuarkConfig for a Llama-architecture config.json, or a ValueError naming what does not fit."""
    for field, ok in (("hidden_act", d.get("hidden_act", "silu") == "silu"),
                      ("attention_bias", not d.get("attention_bias", False)),
                      ("mlp_bias", not d.get("mlp_bias", False)),
                      ("rope_scaling", not d.get("rope_scaling"))):
        if not ok:
            raise ValueError(f"{source}: field {field}={d.get(field)!r} is not supported by Quark")
    n_heads = d["num_attention_heads"]
    head_dim = d.get("head_dim") or d["hidden_size"] // n_heads
    if head_dim * n_heads != d["hidden_size"]:
        raise ValueError(f"{source}: head_dim={head_dim} * num_attention_heads={n_heads} != hidden_size")
    rope_theta = d.get("rope_theta") or (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return QuarkConfig(n_layers=d["num_hidden_layers"], d_model=d["hidden_size"], n_heads=n_heads,
                       n_kv_heads=d.get("num_key_value_heads", n_heads), d_ff=d["intermediate_size"],
                       vocab_size=d["vocab_size"], context_length=d.get("max_position_embeddings", 2048),
                       rope_theta=float(rope_theta), norm_eps=d.get("rms_norm_eps", 1e-5),
                       tie_embeddings=bool(d.get("tie_word_embeddings", False)))


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


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Quark:
    """Load a Quark model from a folder (our checkpoint, an HF export, a Llama folder, or a run folder's newest
    checkpoint) or a .safetensors file with a config.json beside it. Never unpickles."""
    path = resolve_model_path(path)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            read_safetensors(path)  # raises the pickle refusal
        folder, weights = path.parent, path
    else:
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such model folder")
        folder, weights = path, path / "model.safetensors"
        if not weights.exists():
            pickles = [p.name for p in path.glob("*") if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                raise ValueError(f"{path}: only pickle weights {pickles} found; Quark loads safetensors only "
                                 "because unpickling can run arbitrary code")
            raise FileNotFoundError(f"{weights}: missing model weights")
    config = config_from_folder(folder)
    with torch.device("meta"):
        model = Quark(config)
    model = model.to_empty(device=device)
    model.reset_rope()
    sd = read_safetensors(weights, device=device)
    load_state_into(model, sd, str(weights))
    if config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(dtype).eval()


def load_tokenizer_for(path: str | Path) -> Tokenizer:
    """The tokenizer of a model folder (or run / checkpoint), checked against the model's embedding rows
    without loading the weights."""
    folder = resolve_model_path(path)
    folder = folder.parent if folder.is_file() else folder
    tok = Tokenizer.load(folder)
    cfg = config_from_folder(folder)
    if tok.vocab_size != cfg.vocab_size:
        raise ValueError(f"{folder}: tokenizer has {tok.vocab_size} ids but the model has {cfg.vocab_size} "
                         "embedding rows (vocab_size); they must come from the same run")
    return tok


def load_model_and_tokenizer(path: str | Path, device: str | torch.device = "cpu",
                             dtype: torch.dtype = torch.float32) -> tuple[Quark, Tokenizer]:
    """(model, tokenizer) from one folder; fails before loading weights when the tokenizer is missing or its
    vocabulary disagrees with the model's embedding rows."""
    tok = load_tokenizer_for(path)
    return load_model(path, device=device, dtype=dtype), tok


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is present, else 'cpu'; a CUDA device asked for without one is an error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} asked for, but no CUDA device is available")
    return device


def load_for_inference(path: str | Path, device: str = "auto",
                       quantize: str | None = None) -> tuple[Quark, Tokenizer]:
    """(model, tokenizer) ready for generation: eval mode, on the device (bf16 on CUDA, fp32 on the CPU),
    optionally with int8 weight-only linears."""
    device = resolve_device(device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model, tokenizer = load_model_and_tokenizer(path, device=device, dtype=dtype)
    if quantize is not None:
        if quantize != "int8":
            raise ValueError(f"quantize={quantize!r}: allowed: int8")
        from .quantize import quantize_int8

        model = quantize_int8(model)
    return model.eval(), tokenizer
