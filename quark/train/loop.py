"""The one training loop, for pre-training and SFT, on one CPU, one GPU, or many processes under torchrun.

Choices:
- Every optimizer step covers a fixed global batch: `batch_size` rows per micro-batch per process, times the
  world size, times `accum` micro-batches (`tokens_per_step` / one micro-batch's tokens, rounded, at least 1; a
  value that is not a whole number of micro-batches runs the nearest one, with a warning naming both: the packaged
  SFT config's 131,072 is less than one micro-batch on 8 GPUs, so refusing it would stop `speedrun --nproc 8`). The loss of a micro-batch is a *sum* over its
  target tokens, scaled by world_size / (targets in the global step), so the gradient is exactly the mean over
  all target tokens of the step, whatever the split across processes and micro-batches (SFT masks included).
- CUDA: bf16 autocast, `torch.compile` on the loss module, fused AdamW. CPU: fp32 (bf16 backward is ~50x slower).
- Nothing random happens in a step (no dropout; data order is a function of the seed and the step), so a run
  resumed from a checkpoint repeats an uninterrupted run's losses exactly on the same hardware.
- A non-finite loss or gradient norm stops the run before the optimizer step: the bad update is never applied
  and never saved; weights holding NaN/Inf are never written as a checkpoint either. Resume falls back past
  checkpoints that fail verification (`checkpoint.set_aside`), and "the last good checkpoint" is one that verifies.
- LoRA (`lora_rank` > 0): the base loads as for full SFT, then `quark.lora.apply_lora` freezes it and wraps the
  target linears; the optimizer sees only the adapters, checkpoints hold only them (plus lora.json naming the
  base and its weights' fingerprint), and loading a checkpoint anywhere else gives the merged model.
- `train_step` is public so benchmarks (bench/gpu.py, bench/train_cpu.py) time the very same step.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ..data.loader import unhashed_warning
from ..model import Quark
from ..weights import IntegrityError, first_nonfinite, load_model
from . import checkpoint as ckpt
from . import distributed as dist_
from .config import TrainConfig
from .inputs import (
    base_config,
    base_model_path,
    check_vocab,
    load_data_manifest,
    load_tokenizer,
    make_train_loaders,
    model_config,
)
from .metrics import Monitor, bits_per_byte, fmt_duration, now_iso, progress_line, summed_loss, write_run_json
from .optim import build_optimizer, lr_at, set_lr

PRETRAIN_PROMPTS = ["The ", "def ", "Once upon a time", "Il numero"]
SFT_PROMPTS = ["What is 12 + 7?", "Write a Python function that reverses a string.", "Ciao! Come stai?"]


class LossModule(nn.Module):
    """`forward(idx, targets, loss_mask)` -> summed cross-entropy; the unit that DDP wraps and torch.compile
    compiles (DDP only syncs gradients for computations that go through its forward)."""

    def __init__(self, model: Quark, chunk_rows: int | None = None):
        super().__init__()
        self.model, self.chunk_rows = model, chunk_rows

    def forward(self, idx, targets, loss_mask=None):
        # CPU: chunks of 256 rows keep each chunk's (rows x vocab) softmax in cache (~1.5x faster cross-entropy
        # than 2048-row chunks on the tiny preset); GPUs prefer big matmuls.
        chunk = self.chunk_rows or (4096 if self.model.lm_head.weight.is_cuda else 256)
        return self.model.loss(idx, targets, loss_mask, chunk_rows=chunk, reduction="sum")


def autocast_for(device: torch.device, precision: str):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward_backward(step_model: nn.Module, micro_batches: list, n_targets: int, world_size: int = 1,
                     autocast=contextlib.nullcontext, ddp: bool = False) -> torch.Tensor:
    """Accumulate the gradients of one global step; returns this process's summed loss (a 0-dim tensor)."""
    total = None
    last = len(micro_batches) - 1
    for j, (x, y, m) in enumerate(micro_batches):
        sync = step_model.no_sync() if ddp and j < last else contextlib.nullcontext()
        with sync:
            with autocast():
                ls = step_model(x, y, m)
            (ls * (world_size / n_targets)).backward()
        total = ls.detach() if total is None else total + ls.detach()
    return total


def clip_and_step(model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float,
                  on_nonfinite=None) -> torch.Tensor:
    """Clip (or just measure) the global gradient norm, apply the update, clear gradients; returns the norm.
    `on_nonfinite(norm)` is called (and must raise) before the update when the norm is NaN/Inf."""
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    if on_nonfinite is not None and not math.isfinite(float(gnorm)):
        on_nonfinite(float(gnorm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return gnorm


def train_step(step_model: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list,
               *, grad_clip: float = 1.0, autocast=contextlib.nullcontext, on_nonfinite=None) -> tuple[float, float]:
    """One complete single-process optimizer step (the loop's own calls, `forward_backward` then `clip_and_step`),
    for benchmarks: micro_batches is a list of (idx, targets, loss_mask|None) on the model's device. Returns
    (mean loss, grad norm) as floats."""
    n = sum(int(y.numel()) if m is None else int(m.sum()) for _, y, m in micro_batches)
    loss = forward_backward(step_model, micro_batches, n, 1, autocast)
    gnorm = clip_and_step(model, optimizer, grad_clip, on_nonfinite)
    return float(loss) / n, float(gnorm)


class _Stop(Exception):
    pass


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) the training described by cfg; returns a summary dict (also the basis of run.json)."""
    cfg.check_budget()
    d = dist_.setup(cfg.device)
    try:
        return Trainer(cfg, d).run()
    finally:
        dist_.teardown()


def budget_plan(limits: dict[str, tuple[int, str]], max_minutes: float = 0) -> str:
    """The plan line's budget part: which of the budgets set binds, and why the others do not."""
    if not limits:
        return f"steps planned from max_minutes={max_minutes:g} after the first steps"
    binding = min(limits, key=lambda k: limits[k][0])
    steps, means = limits[binding]
    text = f"{max(1, steps)} steps" + (f" = {means}" if means else "") + f" ({binding} binds"
    others = [f"{k} ({v[0]} steps) not reached" for k, v in limits.items() if k != binding]
    if max_minutes:
        others.append(f"max_minutes={max_minutes:g} may stop it sooner")
    return text + ("; " + ", ".join(others) if others else "") + ")"


class Trainer:
    def __init__(self, cfg: TrainConfig, d: dist_.Dist):
        if not cfg.out:
            raise ValueError("train config: no run folder; pass --out FOLDER or set out")
        self.cfg, self.d, self.dev = cfg, d, d.device
        self.run_dir = Path(cfg.out)
        self.manifest = load_data_manifest(cfg)
        if d.is_main and (warning := unhashed_warning(cfg.data, self.manifest)):
            print(warning, file=sys.stderr, flush=True)
        self.tok = load_tokenizer(cfg, self.manifest)
        self.resume_from = ckpt.latest_checkpoint(self.run_dir)
        if cfg.kind == "pretrain":
            mc = model_config(cfg)
            check_vocab(mc, self.tok, f"model {cfg.model!r}")
        else:
            mc = base_config(cfg)
            check_vocab(mc, self.tok, f"base checkpoint {cfg.base}")
        if self.resume_from is not None:
            from ..weights import LORA_JSON, config_from_folder

            was_lora = (self.resume_from / LORA_JSON).exists()
            if was_lora != bool(cfg.lora_rank):
                held = "LoRA adapters" if was_lora else "full weights"
                raise ValueError(f"{self.resume_from}: the run folder holds {held}, but lora_rank={cfg.lora_rank}; "
                                 "resume with the run's own lora_rank, or use a new --out folder")

            try:
                saved = config_from_folder(self.resume_from)
            except IntegrityError:  # a corrupt checkpoint: _resume warns and falls back to an older one
                saved = mc
            if saved != mc:
                raise ValueError(f"{self.resume_from}: the run folder holds a different model ({saved}); use a new "
                                 f"--out folder or the same model config")
        self.mc = mc
        self._make_loaders()
        self._make_model()
        self._plan_budget()
        self.optimizer = build_optimizer(self.model, cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2),
                                         eps=cfg.eps, kind=cfg.optimizer, muon_lr=cfg.muon_lr)
        self.step, self.tokens, self.prior_elapsed, self.time_planned = 0, 0, 0.0, False
        self.started = now_iso()
        if self.resume_from is not None:
            self._resume()
        self.monitor = Monitor(self.run_dir, self.step, cfg.tensorboard, cfg.plot) if d.is_main else None

    # ---- set-up -------------------------------------------------------------------------------------------
    def _make_loaders(self):
        self.train_loader, self.val_loaders, self.seq_len = make_train_loaders(self.cfg, self.manifest, self.mc,
                                                                               self.d.rank, self.d.world_size)

    def _make_model(self):
        cfg = self.cfg
        if cfg.kind == "sft":
            path = base_model_path(cfg)
            try:
                model = load_model(path, device="cpu", dtype=torch.float32)
            except (ValueError, KeyError) as e:
                raise ValueError(f"base checkpoint {cfg.base}: {e}") from None
        else:
            model = Quark(self.mc).init_weights(cfg.seed)
        self.lora = None
        if cfg.lora:
            from ..lora import apply_lora
            from ..weights import weights_fingerprint

            lo = cfg.lora
            apply_lora(model, lo["rank"], lo["alpha"], dropout=lo["dropout"], targets=lo["targets"], seed=cfg.seed)
            self.lora = dict(lo, base=str(path.resolve()), base_fingerprint=weights_fingerprint(path))
        self.model = model.to(self.dev).train()
        if self.dev.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for the few fp32 matmuls left outside autocast
        self.autocast = lambda: autocast_for(self.dev, cfg.precision)
        use_compile = cfg.compile == "true" or (cfg.compile == "auto" and self.dev.type == "cuda")
        step_model: nn.Module = LossModule(self.model)
        if use_compile:
            step_model = torch.compile(step_model)
        if self.d.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            step_model = DDP(step_model, device_ids=[self.dev.index] if self.dev.type == "cuda" else None)
        self.step_model = step_model

    def _plan_budget(self):
        cfg, d = self.cfg, self.d
        rows_micro = cfg.batch_size * d.world_size
        tokens_micro = rows_micro * self.seq_len
        self.accum = max(1, round(cfg.tokens_per_step / tokens_micro)) if cfg.tokens_per_step else 1
        if cfg.tokens_per_step and cfg.tokens_per_step != tokens_micro * self.accum and d.is_main:
            valid = sorted({max(1, cfg.tokens_per_step // tokens_micro), cfg.tokens_per_step // tokens_micro + 1})
            print(f"warning: train config: tokens_per_step={cfg.tokens_per_step:,} is not a whole number of "
                  f"micro-batches of {tokens_micro:,} tokens (batch_size={cfg.batch_size} x seq_len={self.seq_len} x "
                  f"{d.world_size} process(es)); running {tokens_micro * self.accum:,} tokens per step instead; "
                  f"nearest exact values: {' or '.join(f'{n * tokens_micro:,}' for n in valid)} (set one, or change "
                  "batch_size)",
                  file=sys.stderr, flush=True)
        rows_step = self.train_loader.batch_size * d.world_size * self.accum  # SFT rows (pretrain_mix aside)
        limits = {}  # budget -> (steps, what it means)
        if cfg.max_steps:
            limits[f"max_steps={cfg.max_steps}"] = (cfg.max_steps, "")
        if cfg.max_tokens:
            limits[f"max_tokens={cfg.max_tokens}"] = (math.ceil(cfg.max_tokens / (tokens_micro * self.accum)),
                                                      f"{cfg.max_tokens:,} tokens")
        if cfg.epochs:
            limits[f"epochs={cfg.epochs:g}"] = (math.ceil(cfg.epochs * len(self.train_loader) / rows_step),
                                                f"{cfg.epochs:g} epoch(s) of {len(self.train_loader):,} rows")
        self.total = max(1, min(v[0] for v in limits.values())) if limits else None
        self.plan = budget_plan(limits, cfg.max_minutes)

    def _resume(self):
        for cand in reversed(ckpt.list_checkpoints(self.run_dir)):  # newest first; skip those that fail verification
            try:
                st = ckpt.load_checkpoint(cand, self.model, self.optimizer)
                break
            except (IntegrityError, FileNotFoundError) as e:  # other errors (settings that differ) stop the run
                if self.d.is_main:
                    print(f"warning: skipping checkpoint {cand}: {e}; moved it to {ckpt.set_aside(cand)}; trying "
                          "the next older checkpoint", file=sys.stderr, flush=True)
        else:
            raise ValueError(f"{self.run_dir / 'checkpoints'}: no checkpoint passes verification (see the warnings "
                             "above); use a new --out folder to start afresh")
        self.resume_from = cand
        self.train_loader.load_state_dict(st["loader"])
        self.step, self.tokens, self.prior_elapsed = st["step"], st["tokens"], st["elapsed_s"]
        if st.get("planned_by_time"):
            self.total, self.time_planned = st["total_steps"], True
        self.started = st.get("started", self.started)
        if self.d.is_main:
            print(f"resuming from {self.resume_from} (step {self.step}, {self.tokens:,} tokens)", flush=True)

    # ---- helpers ------------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.prior_elapsed + time.time() - self.t0

    def run_info(self, finished: bool) -> dict:
        return {"kind": self.cfg.kind, "train_config": self.cfg.to_dict(), "model_config": self.mc.to_dict(),
                "data": str(Path(self.cfg.data).resolve()), "data_manifest": self.manifest,
                "base": str(Path(self.cfg.base).resolve()) if self.cfg.base else None,
                "hardware": dist_.hardware(self.d), "world_size": self.d.world_size, "started": self.started,
                "finished": now_iso() if finished else None, "wall_time_s": round(self.elapsed(), 2),
                "steps": self.step, "tokens": self.tokens, "lora": self.lora}

    def _next_micro_batches(self):
        out = []
        for _ in range(self.accum):
            x, y, m = self.train_loader.next_batch()
            nb = self.dev.type == "cuda"
            out.append((x.to(self.dev, non_blocking=nb), y.to(self.dev, non_blocking=nb),
                        None if m is None else m.to(self.dev, non_blocking=nb)))
        return out

    def _count(self, micro) -> tuple[int, int]:
        """(target tokens, input tokens) of the global step."""
        local = torch.tensor([sum(int(y.numel()) if m is None else int(m.sum()) for _, y, m in micro),
                              sum(int(x.numel()) for x, _, _ in micro)], dtype=torch.float64)
        if self.cfg.kind == "pretrain" or not self.d.enabled:
            return int(local[0]) * self.d.world_size, int(local[1]) * self.d.world_size
        dist_.all_reduce_sum(local, self.d)
        return int(local[0]), int(local[1])

    def save(self):
        """Rank 0 writes the checkpoint; every rank learns whether it worked (so all stop together)."""
        err = None
        bad = first_nonfinite(self.model.state_dict()) if self.d.is_main else None
        if bad is not None:
            err = (f"step {self.step}: tensor {bad[0]} holds non-finite values (NaN/Inf): training diverged; not "
                   f"saving it; {self._last_good()}. Try a lower lr (--set lr=...) or more warmup_steps.")
        elif self.d.is_main:
            state = {"step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed(), "started": self.started,
                     "total_steps": self.total, "planned_by_time": self.time_planned,
                     "loader": self.train_loader.state_dict(), "world_size": self.d.world_size,
                     "train_config": self.cfg.to_dict()}
            try:
                ckpt.clean_partial(self.run_dir)
                ckpt.save_checkpoint(self.run_dir, self.step, self.model, self.tok, self.optimizer, state,
                                     keep_last=self.cfg.keep_last, lora=self.lora)
                write_run_json(self.run_dir, self.run_info(finished=False))
            except OSError as e:
                from ..cli import os_error_message

                prev = ckpt.latest_good_checkpoint(self.run_dir)
                keep = f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists"
                err = (f"saving the checkpoint of step {self.step} failed: {os_error_message(e)}; {keep}; rerun the "
                       "same command to resume.")
        err = dist_.broadcast_object(err, self.d)
        if err:
            raise RuntimeError(err)

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        if not self.val_loaders or self.cfg.eval_batches == 0:
            return None
        self.model.eval()
        rec: dict = {"step": self.step}
        for name, loader in self.val_loaders.items():
            total, n = summed_loss(self.model, loader.val_batches(self.cfg.eval_batches), self.dev, self.autocast)
            acc = torch.tensor([total, n], dtype=torch.float64, device=self.dev)
            dist_.all_reduce_sum(acc, self.d)
            rec[name] = float(acc[0] / acc[1].clamp(min=1))
            if name == "val_loss":
                val = self.manifest["splits"].get("val", {})
                # SFT scores only assistant tokens, whose bytes the manifest does not count: no bits-per-byte there
                rec["val_bpb"] = (bits_per_byte(rec[name], val.get("tokens"), val.get("bytes"))
                                  if self.cfg.kind == "pretrain" else None)
        self.model.train()
        if self.d.is_main:
            parts = [f"val loss {rec['val_loss']:.4f}" if "val_loss" in rec else ""]
            if rec.get("val_bpb") is not None:
                parts.append(f"{rec['val_bpb']:.4f} bits/byte")
            if "pretrain_val_loss" in rec:
                parts.append(f"pre-training val loss {rec['pretrain_val_loss']:.4f}")
            print(f"step {self.step}: " + ", ".join(p for p in parts if p), flush=True)
            self.monitor.write(rec)
            self.samples()
            self.monitor.plot_losses()
            self.monitor.flush()
        return rec

    @torch.no_grad()
    def samples(self):
        cfg, tok = self.cfg, self.tok
        if cfg.samples == 0:
            return
        from ..generate import generate

        texts = (cfg.sample_prompts or (PRETRAIN_PROMPTS if cfg.kind == "pretrain" else SFT_PROMPTS))[:cfg.samples]
        if cfg.kind == "sft":
            prompts, eos = [tok.render_prompt([{"role": "user", "content": t}]) for t in texts], tok.stop_ids
        else:
            prompts, eos = [tok.encode(t) or [tok.eot_id] for t in texts], tok.eot_id
        n = min(cfg.sample_tokens, self.mc.context_length - max(len(p) for p in prompts))
        if n <= 0:
            return
        self.model.eval()
        with self.autocast():
            # fast=False under LoRA: the fast decoder fuses plain nn.Linear weights, not adapter layers
            outs = generate(self.model, prompts, max_new_tokens=n, temperature=0.8, top_p=0.95, eos_token_id=eos,
                            seed=cfg.seed, fast=False if self.lora else None)
        self.model.train()
        lines = []
        for t, o in zip(texts, outs):
            lines.append(f"  {t!r} -> {tok.decode(o, skip_special_tokens=False)!r}")
        print("samples:\n" + "\n".join(lines), flush=True)
        self.monitor.text("samples", "\n\n".join(lines), self.step)

    def _maybe_plan_by_time(self, steps_here: int, t_first: float):
        """After a few steps of this process, size a time-bounded run from its measured speed (the smaller of that
        and the other budgets), so the cosine reaches its floor when the time is up."""
        cfg = self.cfg
        if self.time_planned or not cfg.max_minutes or steps_here < 6:
            return
        per_step = (time.time() - t_first) / (steps_here - 1)
        left = cfg.max_minutes * 60 - self.elapsed()
        n_evals = (left / per_step) / cfg.eval_every if cfg.eval_every else 0
        eval_cost = per_step * cfg.eval_batches / (3 * self.accum)  # a forward is ~1/3 of forward + backward
        est = self.step + max(1, int(0.95 * (left - (n_evals + 1) * eval_cost) / per_step))
        est = dist_.broadcast_object(est, self.d)
        self.total = min(self.total, est) if self.total else est
        self.time_planned = True
        if self.d.is_main:
            print(f"planned {self.total} steps to fit max_minutes={cfg.max_minutes:g} "
                  f"({per_step:.3f}s per step)", flush=True)

    def _params_line(self) -> str:
        line = f"{self.mc.n_params() / 1e6:.2f}M params"
        if self.lora:
            n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            line += (f" (LoRA rank {self.lora['rank']} on {', '.join(self.lora['targets'])}: {n / 1e6:.2f}M "
                     "trainable, base frozen)")
        return line

    # ---- the loop -----------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, d = self.cfg, self.d
        self.t0 = time.time()
        if d.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_run_json(self.run_dir, self.run_info(finished=False))
            print(f"{cfg.kind}: {self._params_line()} on {dist_.hardware(d)}; "
                  f"{cfg.batch_size} x {self.seq_len} tokens x {d.world_size} process(es) x {self.accum} accum per "
                  f"step; {self.plan}; run folder {self.run_dir}", flush=True)
        total_for_lr = self.total or 10**9
        peak = dist_.bf16_peak_flops(self.dev)
        fpt = self.mc.flops_per_token(self.seq_len)
        steps_here, t_first, t_log, tok_log = 0, None, time.time(), self.tokens
        while self.total is None or self.step < self.total:
            if cfg.max_minutes and dist_.broadcast_object(self.elapsed() >= cfg.max_minutes * 60, d):
                if d.is_main:
                    print(f"max_minutes={cfg.max_minutes:g} reached at step {self.step}", flush=True)
                break
            total_for_lr = self.total or total_for_lr
            lr = lr_at(self.step, total_for_lr, cfg.lr, cfg.min_lr, cfg.warmup_steps)
            set_lr(self.optimizer, lr)
            micro = self._next_micro_batches()
            n_targets, n_inputs = self._count(micro)
            loss_sum = forward_backward(self.step_model, micro, max(1, n_targets), d.world_size, self.autocast,
                                        d.enabled)
            loss = float(dist_.all_reduce_sum(loss_sum.float().reshape(1), d)) / max(1, n_targets)
            if not math.isfinite(loss):
                self._diverged("loss", loss)
            gnorm = clip_and_step(self.model, self.optimizer, cfg.grad_clip,
                                  lambda g: self._diverged("gradient norm", g))
            self.step += 1
            self.tokens += n_inputs
            steps_here += 1
            if steps_here == 1:
                t_first = time.time()  # the first step pays for compilation; speeds are measured after it
            self._maybe_plan_by_time(steps_here, t_first)
            last = self.total is not None and self.step >= self.total
            if d.is_main and (self.step % cfg.log_every == 0 or last):
                now = time.time()
                tok_s = (self.tokens - tok_log) / max(1e-9, now - t_log)
                t_log, tok_log = now, self.tokens
                mfu = tok_s * fpt / (peak * d.world_size) if peak else None
                eta = None
                if self.total and tok_s > 0:
                    eta = (self.total - self.step) * (n_inputs / tok_s)
                if cfg.max_minutes:
                    left = cfg.max_minutes * 60 - self.elapsed()
                    eta = left if eta is None else min(eta, left)
                print(progress_line(self.step, self.total or 0, loss, lr, float(gnorm), tok_s, mfu=mfu, eta_s=eta),
                      flush=True)
                self.monitor.write({"step": self.step, "tokens": self.tokens, "loss": loss, "lr": lr,
                                    "grad_norm": float(gnorm), "tok_per_s": round(tok_s, 1),
                                    "mfu": None if mfu is None else round(mfu, 4),
                                    "elapsed_s": round(self.elapsed(), 2)})
            if cfg.eval_every and self.step % cfg.eval_every == 0 and not last:
                self.evaluate()
            if cfg.save_every and self.step % cfg.save_every == 0 and not last:
                self.save()
        return self._finish()

    def _last_good(self) -> str:
        last = ckpt.latest_good_checkpoint(self.run_dir)
        return f"the last good checkpoint is {last}" if last else "no good checkpoint was written yet"

    def _diverged(self, what: str, value: float):
        raise RuntimeError(f"{what} is {value} at step {self.step + 1}: training diverged, stopping without "
                           f"applying the update; {self._last_good()}. Try a lower lr (--set lr=...) or more "
                           "warmup_steps.")

    def _finish(self) -> dict:
        d = self.d
        latest = ckpt.latest_checkpoint(self.run_dir)
        already = latest is not None and latest.name == ckpt.step_dir_name(self.step) and self.resume_from == latest
        val = self.evaluate() if not already else None
        if not already:
            self.save()
        info = self.run_info(finished=True)
        if d.is_main:
            write_run_json(self.run_dir, info)
            if self.monitor:
                self.monitor.plot_losses()
                self.monitor.close()
            last = ckpt.latest_checkpoint(self.run_dir)
            size = ckpt.model_file(last).stat().st_size
            what = "adapters only" if self.lora else "weights"
            print(f"done: {self.step} steps, {self.tokens:,} tokens in {fmt_duration(self.elapsed())}; "
                  f"checkpoint {last} ({what}: {size / 1e6:.1f} MB)", flush=True)
        if val:
            info.update({k: v for k, v in val.items() if k != "step"})
        return info
