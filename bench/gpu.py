"""The one prepared GPU benchmark (a lent H100/H200, under 6 minutes, compile included): ours vs HF, same run.

    PYTHONPATH=. python bench/gpu.py                 # on the GPU box; prints a summary table (and JSON to $OUT)
    PYTHONPATH=. python bench/gpu.py --dry-run       # CPU, `test` preset: checks this script's logic in seconds

Sections (each guarded: a failure is reported and the next section still runs; each has a time budget and is
skipped when the total budget would be exceeded):
  A. training tokens/s of quark-72m at context 2048: bf16 autocast, torch.compile, fused AdamW. Ours runs the
     training loop's own `train_step` (quark.train.loop) with the chunked/fused cross-entropy of `Quark.loss`;
     HF `LlamaForCausalLM` (sdpa, bf16 autocast, torch.compile, fused AdamW, loss from `labels=`). MFU against
     the GPU's dense bf16 peak; peak memory of each.
  B. decode tok/s, quark-72m random bf16 weights, greedy, 256 new tokens after a 16-token prompt, batch 1 and
     batch 64: ours (`generate`: static cache + CUDA-graph step) vs HF `generate`. The first call of ours
     (compile + capture) is timed separately; greedy tokens of the fast path are compared with the plain path.
  C. speedrun-style smoke: tokenizer trained on local text (the Python stdlib) -> a pre-training data folder ->
     `quark.train.loop.train` of the quark-72m shape (vocab of that tokenizer) for a few hundred steps ->
     the checkpoint loaded back and sampled through the fast path (CUDA graph of eager kernels, no compile).
Targets (issues 5, 9, 10; H200): train >= 650k tok/s and >= 1.45x HF compiled; decode bs=1 >= 2,000 tok/s,
bs=64 >= 50,000 tok/s. Uses only torch, transformers, tokenizers, safetensors, numpy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from quark import Quark  # noqa: E402
from quark.config import QuarkConfig  # noqa: E402

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0, "L40S": 362.0}


class Clock:
    def __init__(self, total_s: float):
        self.t0, self.total = time.perf_counter(), total_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.total - self.elapsed()


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_tflops(dev) -> float | None:
    if dev.type != "cuda":
        return None
    try:
        from quark.train.distributed import bf16_peak_flops

        f = bf16_peak_flops(dev)
        if f:
            return f / 1e12
    except ImportError:
        pass
    name = torch.cuda.get_device_name(dev)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def llama_twin(model: Quark, dev, dtype=None):
    import transformers

    c = model.config
    cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.context_length, rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps,
        tie_word_embeddings=c.tie_embeddings, attention_bias=False, mlp_bias=False, bos_token_id=None,
        eos_token_id=None, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(cfg)
    hf.load_state_dict(model.state_dict(), strict=False)
    hf.tie_weights()
    return hf.to(dev, dtype=dtype or model.dtype)


def timed_steps(step, dev, warmup: int, max_steps: int, max_s: float) -> tuple[int, float, float]:
    """Run `warmup` untimed steps (compile), then steps until max_steps or max_s; (steps, seconds, warm-up s)."""
    w0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(dev)
    warm = time.perf_counter() - w0
    t0, n = time.perf_counter(), 0
    while n < max_steps and (n < 2 or time.perf_counter() - t0 < max_s):
        step()
        n += 1
    sync(dev)
    return n, time.perf_counter() - t0, warm


# ---- A. training throughput ---------------------------------------------------------------------------------------
def bench_train(a, dev, cfg: QuarkConfig, results: dict):
    T, B = a.train_ctx, a.train_batch
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" else contextlib.nullcontext
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, (cfg.vocab_size - 2), (B, T), generator=g).to(dev)
    y = torch.randint(0, (cfg.vocab_size - 2), (B, T), generator=g).to(dev)
    flops_tok = cfg.replace(context_length=max(T, cfg.context_length)).flops_per_token(T)
    peak = peak_tflops(dev)
    out = results.setdefault("train", {"ctx": T, "batch": B, "flops_per_token": flops_tok})

    def record(name, n, secs, warm):
        tps = n * B * T / secs
        row = {"tok_per_s": round(tps), "steps": n, "compile_warmup_s": round(warm, 1),
               "peak_mem_gb": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if dev.type == "cuda" else None}
        if peak:
            row["mfu"] = round(tps * flops_tok / (peak * 1e12), 4)
        out[name] = row
        print(f"  {name}: {tps:,.0f} tok/s over {n} steps (warm-up/compile {warm:.0f}s)"
              + (f", MFU {row['mfu']:.1%}" if peak else "") + (f", peak {row['peak_mem_gb']} GB" if row["peak_mem_gb"]
                                                                 else ""), flush=True)

    def ours(comp: bool):  # the training loop's own step
        torch.manual_seed(0)
        model = Quark(cfg).init_weights(seed=0).to(dev).train()
        try:
            from quark.train.loop import LossModule, train_step
            from quark.train.optim import build_optimizer

            opt = build_optimizer(model, lr=1e-4)
            step_model = LossModule(model)
            how = "quark.train.loop.train_step"
        except ImportError:  # the training package is absent: the same step from Quark.loss directly
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda" or None)

            class _Loss(torch.nn.Module):
                def __init__(self, m):
                    super().__init__()
                    self.model = m

                def forward(self, i, t, mask=None):
                    return self.model.loss(i, t, mask, reduction="sum")

            step_model = _Loss(model)
            how = "Quark.loss"

            def train_step(sm, m, o, mb, clip, ac):
                xx, yy, _ = mb[0]
                with ac():
                    ls = sm(xx, yy)
                (ls / yy.numel()).backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
                o.step()
                o.zero_grad(set_to_none=True)
                return float(ls) / yy.numel(), 0.0
        if comp:
            step_model = torch.compile(step_model)
        out["ours_step"] = how + (" (compiled)" if comp else " (eager)")
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        n, secs, warm = timed_steps(lambda: train_step(step_model, model, opt, [(x, y, None)], grad_clip=1.0, autocast=autocast), dev,
                                    a.warmup, a.train_steps, a.train_seconds)
        record("ours", n, secs, warm)
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    def hf_llama(comp: bool):  # HF LlamaForCausalLM, the same shape
        import transformers  # noqa: F401  (fail here, inside the guarded section, if missing)

        hf = llama_twin(Quark(cfg).init_weights(seed=0), dev, torch.float32).train()
        hopt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=dev.type == "cuda" or None)
        hf_fwd = torch.compile(hf) if comp else hf
        out["hf_mode"] = "compiled" if comp else "eager"

        def hf_step():
            with autocast():
                loss = hf_fwd(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            hopt.step()
            hopt.zero_grad(set_to_none=True)
            return float(loss.detach())

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        n, secs, warm = timed_steps(hf_step, dev, a.warmup, a.train_steps, a.train_seconds)
        record("hf", n, secs, warm)
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    for name, fn in (("ours", ours), ("hf", hf_llama)):  # each guarded: one failing keeps the other's figure
        for comp in ([True, False] if a.compile else [False]):  # a failed compile is retried eagerly
            try:
                fn(comp)
                break
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                results.setdefault("errors", {})[f"train-{name}{'-compiled' if comp else ''}"] = \
                    f"{type(e).__name__}: {e}"[:500]
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    if "tok_per_s" in out.get("ours", {}) and "tok_per_s" in out.get("hf", {}):
        out["ratio"] = round(out["ours"]["tok_per_s"] / out["hf"]["tok_per_s"], 3)


# ---- B. decode throughput -----------------------------------------------------------------------------------------
def bench_decode(a, dev, cfg: QuarkConfig, results: dict, clock: Clock):
    from quark.generate import generate

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = Quark(cfg).init_weights(seed=0).to(dev, dtype=dtype).eval()
    model.reset_rope()  # fp32 RoPE tables, as a loaded model has
    hf = llama_twin(model, dev, dtype).eval()
    n = a.new_tokens
    out = results.setdefault("decode", {"new_tokens": n, "dtype": str(dtype)})
    g = torch.Generator().manual_seed(1)
    for bs in a.decode_batches:
        if clock.left() < a.decode_min_s:
            out[f"bs{bs}"] = {"skipped": "time budget"}
            continue
        prompts = torch.randint(1, (cfg.vocab_size - 2), (bs, 16), generator=g)
        row = out.setdefault(f"bs{bs}", {})
        t0 = time.perf_counter()
        first = generate(model, prompts, max_new_tokens=n, temperature=0.0)  # compile + capture on CUDA
        sync(dev)
        row["ours_first_call_s"] = round(time.perf_counter() - t0, 1)
        best = 0.0
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            again = generate(model, prompts, max_new_tokens=n, temperature=0.0)
            sync(dev)
            best = max(best, bs * n / (time.perf_counter() - t0))
        row["ours_tok_per_s"] = round(best, 1)
        row["ours_repeatable"] = again == first
        if bs == 1:  # the fast path against the plain reference path (bf16: early tokens should agree)
            plain = generate(model, prompts, max_new_tokens=min(n, 64), temperature=0.0, fast=False)[0]
            diff = next((i for i, (p, q) in enumerate(zip(plain, first[0])) if p != q), None)
            row["fast_vs_plain_first_diff"] = diff  # None: all equal
        ids = prompts.to(dev)
        kw = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "pad_token_id": 0,
              "attention_mask": torch.ones_like(ids)}
        hf.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        hbest = 0.0
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            hf.generate(ids, **kw)
            sync(dev)
            hbest = max(hbest, bs * n / (time.perf_counter() - t0))
        row["hf_tok_per_s"] = round(hbest, 1)
        row["ratio"] = round(best / hbest, 2)
        print(f"  bs={bs}: ours {best:,.0f} tok/s (first call {row['ours_first_call_s']}s), HF {hbest:,.0f} tok/s, "
              f"{row['ratio']}x", flush=True)
    del model, hf
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ---- C. speedrun-style smoke --------------------------------------------------------------------------------------
def _local_texts(limit_bytes: int) -> list[str]:
    import sysconfig

    texts, total = [], 0
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            t = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(t)
        total += len(t)
        if total >= limit_bytes:
            break
    return texts


def bench_smoke(a, dev, cfg: QuarkConfig, results: dict, clock: Clock):
    out = results.setdefault("smoke", {})
    work = Path(tempfile.mkdtemp(prefix="quark_gpu_smoke_"))
    before = os.environ.get("QUARK_COMPILE")
    os.environ["QUARK_COMPILE"] = "0"  # samples here use CUDA graphs of eager kernels: no third compile
    try:
        _smoke(a, dev, cfg, out, clock, work)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
        if before is None:
            os.environ.pop("QUARK_COMPILE", None)
        else:
            os.environ["QUARK_COMPILE"] = before


def _smoke(a, dev, cfg: QuarkConfig, out: dict, clock: Clock, work: Path):
    import numpy as np

    from quark.tokenizer import train_tokenizer
    from quark.train.config import TrainConfig
    from quark.train.loop import train
    from quark.weights import load_model_and_tokenizer

    t0 = time.perf_counter()
    texts = _local_texts(a.smoke_bytes)
    tok = train_tokenizer(texts, vocab_size=a.smoke_vocab, show_progress=False)
    data = work / "data"
    tok.save(data)
    split = max(1, len(texts) // 20)
    manifest = {"kind": "pretrain", "tokenizer_sha256": tok.sha256(), "vocab_size": tok.vocab_size, "seed": 0,
                "dtype": "uint16", "sources": [{"name": "python-stdlib", "weight": 1.0, "license": "PSF",
                                                 "documents": len(texts), "tokens": 0, "bytes": 0}], "splits": {},
                "eval_dedup_removed": 0, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for name, part in (("val", texts[:split]), ("train", texts[split:])):
        ids = [i for enc in tok.encode_batch(part) for i in ([*enc, tok.eot_id])]
        (data / name).mkdir(parents=True, exist_ok=True)
        np.save(data / name / "shard_00000.npy", np.asarray(ids, dtype=np.uint16))
        manifest["splits"][name] = {"shards": ["shard_00000.npy"], "tokens": len(ids),
                                    "bytes": sum(len(t.encode()) for t in part)}
    (data / "manifest.json").write_text(json.dumps(manifest, indent=2))
    out["data_s"] = round(time.perf_counter() - t0, 1)
    out["train_tokens_available"] = manifest["splits"]["train"]["tokens"]
    mcfg = cfg.replace(vocab_size=tok.vocab_size, context_length=a.smoke_ctx)
    mcfg.save(work / "model.json")
    minutes = max(0.3, min(a.smoke_seconds, clock.left() - 30) / 60)
    tc = TrainConfig(model=str(work / "model.json"), data=str(data), out=str(work / "run"), max_steps=a.smoke_steps,
                     max_minutes=minutes, batch_size=a.smoke_batch, seq_len=a.smoke_ctx, lr=3e-3, min_lr=3e-4,
                     warmup_steps=min(50, a.smoke_steps // 5), eval_every=0, eval_batches=4, save_every=0,
                     log_every=max(1, a.smoke_steps // 10), samples=1, sample_tokens=24, tensorboard=False,
                     plot=False, compile="true" if (a.compile and clock.left() > 150) else "false")
    t0 = time.perf_counter()
    train(tc)
    out["train_s"] = round(time.perf_counter() - t0, 1)
    out["compile"] = tc.compile
    lines = [json.loads(s) for s in (work / "run" / "metrics.jsonl").read_text().splitlines() if s.strip()]
    tr = [m for m in lines if "loss" in m]
    va = [m for m in lines if "val_loss" in m]
    if tr:
        out.update(first_loss=round(tr[0]["loss"], 3), last_loss=round(tr[-1]["loss"], 3), steps=tr[-1]["step"],
                   tok_per_s=round(tr[-1].get("tok_per_s", 0)))
    if va:
        out.update(val_loss=round(va[-1]["val_loss"], 3), val_bpb=va[-1].get("val_bpb"))
    from quark.generate import generate

    m, t = load_model_and_tokenizer(work / "run", device=dev)
    ids = generate(m.eval(), [t.encode("def ")], max_new_tokens=32, temperature=0.0)[0]
    out["sample"] = "def " + t.decode(ids)
    print(f"  smoke: loss {out.get('first_loss')} -> {out.get('last_loss')} in {out.get('steps')} steps "
          f"({out['train_s']}s, compile={tc.compile}); sample: {out['sample'][:80]!r}", flush=True)


# ---- main ---------------------------------------------------------------------------------------------------------
def run_section(name: str, fn, results: dict, clock: Clock, min_left: float):
    if clock.left() < min_left:
        results.setdefault("skipped", []).append(name)
        print(f"== {name}: skipped ({clock.left():.0f}s left of the budget)", flush=True)
        return
    print(f"== {name} (t={clock.elapsed():.0f}s)", flush=True)
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 -- one failing section must not lose the others
        traceback.print_exc()
        results.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"[:500]
    results.setdefault("section_s", {})[name] = round(time.perf_counter() - t0, 1)


def fmt(v, spec=",.0f"):
    return "-" if v is None else format(v, spec)


def summary(results: dict):
    print("\n================ summary ================")
    print(f"{results['device']}  torch {results['torch']}  transformers {results.get('transformers')}  "
          f"total {results.get('total_s')}s")
    tr = results.get("train", {})
    o, h = tr.get("ours", {}), tr.get("hf", {})
    print(f"{'measure':34s} {'ours':>12s} {'HF':>12s} {'ratio':>7s}   target (H200)")
    print(f"{'train tok/s ctx ' + str(tr.get('ctx')):34s} {fmt(o.get('tok_per_s')):>12s} {fmt(h.get('tok_per_s')):>12s}"
          f" {fmt(tr.get('ratio'), '.2f'):>7s}   >= 650,000 and >= 1.45x")
    print(f"{'train MFU':34s} {fmt(o.get('mfu'), '.1%'):>12s} {fmt(h.get('mfu'), '.1%'):>12s} {'':7s}   >= 40%")
    print(f"{'train peak memory GB':34s} {fmt(o.get('peak_mem_gb'), '.1f'):>12s} {fmt(h.get('peak_mem_gb'), '.1f'):>12s}")
    for key, row in results.get("decode", {}).items():
        if not key.startswith("bs"):
            continue
        target = {"bs1": ">= 2,000", "bs64": ">= 50,000"}.get(key, "")
        print(f"{'decode tok/s ' + key:34s} {fmt(row.get('ours_tok_per_s')):>12s} {fmt(row.get('hf_tok_per_s')):>12s}"
              f" {fmt(row.get('ratio'), '.2f'):>7s}   {target}" + (f"  ({row['skipped']})" if "skipped" in row else ""))
    sm = results.get("smoke")
    if sm:
        print(f"{'smoke: loss first -> last':34s} {fmt(sm.get('first_loss'), '.3f'):>12s} "
              f"{fmt(sm.get('last_loss'), '.3f'):>12s}   steps {sm.get('steps')}, {fmt(sm.get('tok_per_s'))} tok/s")
    b1 = results.get("decode", {}).get("bs1", {})
    if "fast_vs_plain_first_diff" in b1:
        d = b1["fast_vs_plain_first_diff"]
        print(f"decode bs1 greedy, fast path vs plain path (bf16, 64 tokens): "
              f"{'all equal' if d is None else f'first difference at token {d}'}")
    for name, err in results.get("errors", {}).items():
        print(f"ERROR in {name}: {err}")
    if results.get("skipped"):
        print(f"skipped (time budget): {', '.join(results['skipped'])}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Quark GPU benchmark: training, decode, smoke (ours vs HF)")
    ap.add_argument("--dry-run", action="store_true", help="CPU + `test` preset: check the script in seconds")
    ap.add_argument("--budget", type=float, default=330.0, help="total seconds (sections are skipped past it)")
    ap.add_argument("--sections", default="train,decode,smoke")
    ap.add_argument("--json", default=None, help="results JSON (default: $OUT/gpu_bench.json when $OUT is set)")
    a = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.dry_run else "cpu")
    if a.dry_run:
        preset, a.train_ctx, a.train_batch, a.warmup, a.train_steps, a.train_seconds = "test", 128, 4, 1, 3, 2.0
        a.new_tokens, a.decode_batches, a.repeats, a.decode_min_s, a.compile = 16, [1, 4], 1, 5, False
        a.smoke_bytes, a.smoke_vocab, a.smoke_ctx, a.smoke_steps, a.smoke_batch, a.smoke_seconds = \
            300_000, 512, 64, 6, 4, 30
    else:
        preset, a.train_ctx, a.train_batch, a.warmup, a.train_steps, a.train_seconds = "quark-72m", 2048, 16, 3, 200, 12
        a.new_tokens, a.decode_batches, a.repeats, a.decode_min_s, a.compile = 256, [1, 64], 2, 40, True
        a.smoke_bytes, a.smoke_vocab, a.smoke_ctx, a.smoke_steps, a.smoke_batch, a.smoke_seconds = \
            6_000_000, 8192, 1024, 300, 32, 60
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = QuarkConfig.from_name(preset)
    clock = Clock(a.budget)
    results: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (dry run)",
                     "torch": torch.__version__, "preset": preset}
    try:
        import transformers

        results["transformers"] = transformers.__version__
    except ImportError:
        pass
    print(f"# bench/gpu.py on {results['device']}, torch {torch.__version__}, preset {preset}, budget {a.budget}s",
          flush=True)
    wanted = set(a.sections.split(","))
    if "train" in wanted:
        run_section("train", lambda: bench_train(a, dev, cfg, results), results, clock, 60 if not a.dry_run else 0)
    if "decode" in wanted:
        run_section("decode", lambda: bench_decode(a, dev, cfg, results, clock), results, clock,
                    a.decode_min_s)
    if "smoke" in wanted:
        run_section("smoke", lambda: bench_smoke(a, dev, cfg, results, clock), results, clock,
                    45 if not a.dry_run else 0)
    results["total_s"] = round(clock.elapsed(), 1)
    summary(results)
    path = a.json or (str(Path(os.environ["OUT"]) / "gpu_bench.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).write_text(json.dumps(results, indent=2, default=str))
        print(f"results: {path}")
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
