"""Watching a run: the progress line, `metrics.jsonl`, TensorBoard, the loss-curve PNG, `run.json`.

Choices:
- `metrics.jsonl` is the record other tools read (the model card, the speedrun report): train lines
  `{"step","tokens","loss","lr","grad_norm","tok_per_s","mfu","elapsed_s"}` and validation lines
  `{"step","val_loss","val_bpb"}`. On resume, lines after the checkpoint's step are dropped, so the file reads
  like one uninterrupted run.
- TensorBoard and matplotlib are optional: without them the run goes on and says once what it skipped.
- The PNG is drawn from metrics.jsonl (Agg backend, no display) and written atomically.
- Only rank 0 creates a Monitor.
- Validation loss is computed one way everywhere (`summed_loss`: the training loop's evaluation, `quark eval
  --perplexity`, `quark quantize --data`): the summed cross-entropy of loader batches and the number of target
  tokens, so the mean is exact over unequal batches and across processes.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from ..io import atomic_write_text


def fmt_duration(s: float) -> str:
    s = int(max(0, s))
    h, m = divmod(s // 60, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s % 60:02d}s"


def bits_per_byte(loss_nats: float, tokens: int | None, n_bytes: int | None) -> float | None:
    """bpb = loss * tokens / (bytes * ln 2), from a split's token and UTF-8 byte counts in the manifest."""
    if not tokens or not n_bytes or not math.isfinite(loss_nats):
        return None
    return loss_nats * tokens / (n_bytes * math.log(2))


class Monitor:
    def __init__(self, run_dir: str | Path, resume_step: int | None, tensorboard: bool = True, plot: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.plot = plot
        self._truncate(resume_step)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:
                print("note: tensorboard is not installed; skipping TensorBoard logs (pip install tensorboard)")

    def _truncate(self, resume_step: int | None) -> None:
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if resume_step is not None and rec.get("step", 0) <= resume_step:
                keep.append(json.dumps(rec))
        atomic_write_text(self.path, "".join(f"{line}\n" for line in keep))

    def write(self, rec: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(f"{'val' if k.startswith('val') else 'train'}/{k}", v, rec["step"])

    def text(self, tag: str, text: str, step: int) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text, step)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def plot_losses(self) -> None:
        if not self.plot:
            return
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("note: matplotlib is not installed; skipping loss.png (pip install matplotlib)")
            self.plot = False
            return
        recs = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        if train:
            ax.plot(*zip(*train), label="train loss", lw=1)
        if val:
            ax.plot(*zip(*val), "o-", label="val loss", ms=3)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats)")
        ax.set_title(self.run_dir.name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.run_dir / f".loss.png.{os.getpid()}.tmp"
        fig.savefig(tmp, format="png")
        plt.close(fig)
        os.replace(tmp, self.run_dir / "loss.png")


def progress_line(step: int, total: int, loss: float, lr: float, gnorm: float, tok_s: float, *, mfu: float | None,
                  eta_s: float | None) -> str:
    parts = [f"step {step}/{total}", f"loss {loss:.4f}", f"lr {lr:.2e}", f"gnorm {gnorm:.3f}",
             f"{tok_s / 1000:.1f}k tok/s" if tok_s >= 1000 else f"{tok_s:.0f} tok/s"]
    if mfu is not None:
        parts.append(f"mfu {100 * mfu:.1f}%")
    if eta_s is not None:
        parts.append(f"eta {fmt_duration(eta_s)}")
    return " | ".join(parts)


def summed_loss(model, batches, device=None, autocast=None) -> tuple[float, int]:
    """(summed next-token cross-entropy, target tokens) over `batches` of (inputs, targets, loss_mask|None) as the
    data loaders yield them; the caller divides (after summing across processes, if any). No gradients."""
    import contextlib

    import torch

    device = device if device is not None else model.device
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    with torch.no_grad():
        for x, y, m in batches:
            x, y = x.to(device), y.to(device)
            m = None if m is None else m.to(device)
            with autocast() if autocast is not None else contextlib.nullcontext():
                total += model.loss(x, y, m, reduction="sum").double()
            count += int(y.numel()) if m is None else int(m.sum())
    return float(total), count


def write_run_json(run_dir: str | Path, info: dict) -> None:
    atomic_write_text(Path(run_dir) / "run.json", json.dumps(info, indent=2) + "\n")


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
