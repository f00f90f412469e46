"""Training checkpoints: a model folder plus the full training state, written atomically, last K kept.

Layout of `RUN/checkpoints/step_NNNNNN/`:
    config.json, model.safetensors, tokenizer files     (a model folder: `quark chat`, `eval`, `export` load it;
                                                         a LoRA run writes adapter.safetensors + lora.json instead
                                                         of model.safetensors: the adapters only, see quark.weights)
    train_state.safetensors                             (AdamW moments and step counts, RNG states)
    train_state.json                                    (step, tokens, elapsed time, schedule plan, loader
                                                         state, optimizer hyper-parameters, train config)
Choices:
- No pickle anywhere: tensors go to safetensors, everything else to JSON.
- The step folder is written under a temporary name and renamed into place only when complete, so a crash or a
  full disk during a save leaves the previous checkpoints untouched (and at most a `.tmp-*` folder, removed by
  the next run).
- Both safetensors files record their SHA-256 (`quark.weights`) and are verified when read; the SHA-256 of
  train_state.json's bytes is a tensor (`sha256.train_state_json`) of train_state.safetensors, so that file's hash
  covers the JSON state too (step, loader position, schedule): an edited or damaged train_state.json fails
  verification like a flipped byte in the weights (checkpoints written before it was recorded load unchecked).
- Resuming tries the newest checkpoint first and falls back to older ones: a checkpoint that fails verification
  (corrupt, truncated, NaN/Inf weights, an edited train_state.json) is renamed to `corrupt-step_NNNNNN` with a
  warning saying so, so it is neither loaded nor counted by `keep_last` again, and is kept for inspection.
  "Last good checkpoint" means `latest_good_checkpoint`, which verifies.
- Optimizer tensors are keyed by parameter name (`exp_avg.model.norm.weight`), so a checkpoint is readable with
  any safetensors tool and a mismatch names the parameter.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from .. import weights
from ..io import atomic_write_text
from ..textio import read_utf8

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
STATE_JSON_HASH = "sha256.train_state_json"  # a uint8 tensor in STATE_TENSORS, so that file's own hash covers it


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    ckpts = Path(run_dir) / "checkpoints"
    if not ckpts.is_dir():
        return []
    return sorted(p for p in ckpts.glob("step_*") if (p / STATE_JSON).exists() and model_file(p).exists())


def model_file(ckpt: Path) -> Path:
    """The weights a checkpoint holds: the LoRA adapters of a LoRA run, else the whole model."""
    return ckpt / weights.ADAPTER_FILE if (ckpt / weights.LORA_JSON).exists() else ckpt / "model.safetensors"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_state_json(ckpt: Path) -> dict:
    try:
        return json.loads(read_utf8(ckpt / STATE_JSON))
    except json.JSONDecodeError as e:
        raise weights.IntegrityError(f"{ckpt / STATE_JSON}: not valid JSON ({e})") from None
    except ValueError as e:  # not UTF-8
        raise weights.IntegrityError(str(e)) from None


def check_state_json(ckpt: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Raise IntegrityError when train_state.json's bytes do not hash to what train_state.safetensors records."""
    want = tensors.get(STATE_JSON_HASH)
    if want is None:  # written before the hash was recorded
        return
    want = bytes(want.tolist()).hex()
    got = hashlib.sha256((ckpt / STATE_JSON).read_bytes()).hexdigest()
    if got != want:
        raise weights.IntegrityError(f"{ckpt / STATE_JSON}: content hash mismatch (sha256 {got[:12]}..., "
                                     f"{STATE_TENSORS} records {want[:12]}...): the file was edited or is corrupt; "
                                     "restore it or use an earlier checkpoint")


def verify_checkpoint(ckpt: str | Path) -> None:
    """Raise IntegrityError (or FileNotFoundError) naming the file when a checkpoint is incomplete or corrupt."""
    ckpt = Path(ckpt)
    read_state_json(ckpt)
    weights.config_from_folder(ckpt)
    if (ckpt / weights.LORA_JSON).exists():
        weights.read_lora_json(ckpt)
    weights.read_safetensors(model_file(ckpt))
    check_state_json(ckpt, weights.read_safetensors(ckpt / STATE_TENSORS))


def latest_good_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run that passes `verify_checkpoint`, or None."""
    for p in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(p)
        except (ValueError, FileNotFoundError):
            continue
        return p
    return None


def set_aside(ckpt: Path) -> Path:
    """Rename a checkpoint that failed verification to `corrupt-<name>` (kept for inspection, never loaded)."""
    dst = ckpt.with_name(f"corrupt-{ckpt.name}")
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(ckpt, dst)
    return dst


def clean_partial(run_dir: str | Path) -> None:
    """Remove temporary folders left by a save that was interrupted."""
    for p in (Path(run_dir) / "checkpoints").glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict, list]:
    """(tensors keyed `<stat>.<param name>`, JSON-able param_groups) from an optimizer's state_dict."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{k}.{names[idx]}"] = v.detach().to("cpu").contiguous() if torch.is_tensor(v) \
                else torch.tensor(v)
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    for g in groups:
        g["params"] = [names[i] for i in g["params"]]
    return tensors, groups


def optimizer_param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """Index used by optimizer.state_dict() -> parameter name."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    out, i = {}, 0
    for g in optimizer.param_groups:
        for p in g["params"]:
            out[i] = by_id[id(p)]
            i += 1
    return out


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, tokenizer,
                    optimizer: torch.optim.Optimizer, state: dict, *, keep_last: int = 3, lora: dict | None = None) -> Path:
    """Write `RUN/checkpoints/step_NNNNNN/` atomically, then delete all but the newest `keep_last`. With `lora`
    (the lora.json contents) only the model's adapters are written."""
    ckpts = Path(run_dir) / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    final = ckpts / step_dir_name(step)
    tmp = ckpts / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        if lora is not None:
            weights.save_adapter(model, tmp, lora, tokenizer=tokenizer)
        else:
            weights.save_model(model, tmp, tokenizer=tokenizer)  # the tokenizer's hash goes into the weights' metadata
        names = optimizer_param_names(model, optimizer)
        tensors, groups = optimizer_tensors(optimizer, names)
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and next(model.parameters()).is_cuda:
            tensors["rng.cuda"] = torch.cuda.get_rng_state(next(model.parameters()).device)
        text = json.dumps(dict(state, optimizer={"param_groups": groups}), indent=2) + "\n"
        tensors[STATE_JSON_HASH] = torch.tensor(list(hashlib.sha256(text.encode()).digest()), dtype=torch.uint8)
        weights.save_safetensors(tensors, tmp / STATE_TENSORS, metadata={"format": "pt"})
        atomic_write_text(tmp / STATE_JSON, text)
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. the end of a resumed run): swap, then drop the old one
            old = ckpts / f".tmp-old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(ckpts)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep_last]:
        if old != final:  # a newer leftover (from a run resumed at an older step) never pushes out this save
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Load weights (and optimizer moments, RNG) from a checkpoint folder into model/optimizer; return the
    JSON training state."""
    ckpt = Path(ckpt)
    state = read_state_json(ckpt)
    weights.config_from_folder(ckpt)
    device = next(model.parameters()).device
    sd = weights.read_safetensors(model_file(ckpt), device=device)
    if (ckpt / weights.LORA_JSON).exists():
        from ..lora import load_lora_state

        load_lora_state(model, sd, str(model_file(ckpt)))
    else:
        with torch.no_grad():
            weights.load_state_into(model, sd, str(ckpt / "model.safetensors"))
    tensors = weights.read_safetensors(ckpt / STATE_TENSORS)
    check_state_json(ckpt, tensors)
    if optimizer is not None:
        names = optimizer_param_names(model, optimizer)
        idx_of = {n: i for i, n in names.items()}
        groups = state["optimizer"]["param_groups"]
        if len(groups) != len(optimizer.param_groups) or \
                [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
            raise ValueError(f"{ckpt}: optimizer parameter groups do not match the model")
        opt_state: dict[int, dict] = {}
        for key, t in tensors.items():
            if key.startswith(("rng.", "sha256.")):
                continue
            stat, name = key.split(".", 1)
            if name not in idx_of:
                raise ValueError(f"{ckpt / STATE_TENSORS}: optimizer state for unknown parameter {name!r}")
            opt_state.setdefault(idx_of[name], {})[stat] = t
        for g in groups:
            g["params"] = [idx_of[n] for n in g["params"]]
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    return state
