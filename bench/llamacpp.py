"""CPU decode: Quark vs llama.cpp (llama-cpp-python) on the same weights, threads and machine state; prints ratios.

    pip install llama-cpp-python   # compiles llama.cpp (~11 min on 2 cores); the `llamacpp` extra
    PYTHONPATH=. python bench/llamacpp.py                     # quark-72m random weights, idle and shared
    PYTHONPATH=. python bench/llamacpp.py --phases idle --rounds 1 --new-tokens 32   # a quick look
    PYTHONPATH=. python bench/llamacpp.py --model .../SmolLM2-135M-Instruct.Q4_1.gguf  # a real model's own file

The AVX2 phase (where most laptops are: no AVX-512): Quark forced to its AVX2 tier against llama.cpp built for AVX2
only, in a folder of its own so it does not replace another build:

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
        pip install --no-cache-dir --no-deps --target /tmp/lcp-avx2 llama-cpp-python==0.3.36
    PYTHONPATH=. python bench/llamacpp.py --isa avx2 --llama-path /tmp/lcp-avx2 --phases idle,shared,shared-mem

What runs, per precision (ours fp32 / int8 / int4 beside llama.cpp f32 / q8_0 / q4_0 of the same weights, exported
by `quark export --format gguf [--quant]`): greedy decoding of `--new-tokens` after an 8-token prompt, batch 1 and
batch 8 (llama.cpp: 8 sequences in one llama_batch, its low-level API), tok/s = new tokens x rows / wall time,
prompt included, as a user sees it. Ours runs through the serving engine (`--path engine`: what
`quark.load(...).generate`, `quark chat` and `quark serve` run, a 2048-slot cache) or `quark.generate.generate`.
- Every measurement runs in a fresh subprocess (a llama.cpp crash is a row, not the end of the bench); processes
  alternate ours / llama.cpp, and each figure is the best of `--rounds` rounds.
- Out of the box: ours = no settings (QUARK_CPU_ISA from --isa, else the best tier here; decode threads on the
  free cores, quark/cpu_settings.py); llama.cpp = llama-cpp-python's `Llama()` thread defaults (n_threads =
  cores // 2, n_threads_batch = cores), its other defaults as they are.
- At its best: each tool over threads {auto, 1, all cores} and OMP_WAIT_POLICY {unset, ACTIVE} (`--policies`;
  both link libgomp); the fastest setting is shown with its figure.
- Phases: idle; shared (a `while True` process spins on one core the whole phase); shared-mem (a memory-bound
  process on one core: another model's weights read over and over, as an evaluation does).
The header prints the CPU model, core count, load average, our tier and llama.cpp's build; the first greedy tokens
of each pair are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

PAIRS = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}  # ours -> llama.cpp's type for the same weights
POLICIES = ("unset", "ACTIVE")
HERE = Path(__file__).resolve()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---- weights -------------------------------------------------------------------------------------------------------
def prepare(work: Path, preset: str, model: str | None) -> tuple[Path, dict[str, Path]]:
    """A model folder (random `preset` weights and a tokenizer of its vocabulary size, unless `model` is given) and
    its GGUF exports f32 / q8_0 / q4_0, cached in `work`. A `model` that is a .gguf file (e.g. the shipped
    SmolLM2-135M-Instruct.Q4_1.gguf) is imported (`quark import`) for ours, and llama.cpp runs that very file beside
    our int4 instead of a q4_0 export; f32 / q8_0 are exported from the import."""
    import sysconfig

    from quark import Quark
    from quark.config import QuarkConfig
    from quark.hf.gguf_export import export_gguf
    from quark.tokenizer import train_tokenizer
    from quark.weights import save_model

    folder = Path(model) if model else work / f"{preset}-random"
    shipped = folder if folder.suffix == ".gguf" else None
    if shipped:
        from quark.hf.importer import import_model

        folder = work / shipped.stem
        if not (folder / "config.json").is_file():
            import_model(shipped, folder)
    if not model and not (folder / "config.json").is_file():
        cfg = QuarkConfig.from_name(preset)
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.rglob("*.py"))]
        print(f"# training a {(cfg.vocab_size - 2)}-token tokenizer on the stdlib for the random {preset}", flush=True)
        tok = train_tokenizer(texts, vocab_size=(cfg.vocab_size - 2), show_progress=False)
        save_model(Quark(cfg).init_weights(seed=0), folder)
        tok.save(folder)
    ggufs = {}
    for kind in PAIRS.values():
        if shipped and kind == "q4_0":
            ggufs[kind] = shipped
            continue
        path = work / f"{folder.name}-{kind}.gguf"
        if not path.is_file():
            export_gguf(folder, path, quant=None if kind == "f32" else kind)
        ggufs[kind] = path
    return folder, ggufs


# ---- workers: one process each ---------------------------------------------------------------------------------
def _prompts(batch: int, n: int, vocab: int) -> list[list[int]]:
    return [[1 + (97 * r + 31 * i) % (vocab - 1) for i in range(n)] for r in range(batch)]


def _decode_ours(model, engine, prompts: list[list[int]], n: int) -> list[list[int]]:
    """n greedy new tokens per prompt through `engine` (quark's serving engine), or quark.generate.generate."""
    from quark.generate import generate
    from quark.serve.engine import SamplingParams

    if engine is None:
        return generate(model, prompts, max_new_tokens=n, temperature=0.0)
    reqs = [engine.submit(p, SamplingParams(n, 0.0, 1.0, 1.0)) for p in prompts]
    return [list(engine.iter_tokens(r)) for r in reqs]


def worker_ours(spec: dict) -> dict:
    import torch

    from quark import kernels
    from quark.quantize import quantize_int4, quantize_int8
    from quark.serve.engine import Engine
    from quark.weights import load_model

    model = load_model(spec["model"], device="cpu", dtype=torch.float32).eval()
    model = {"fp32": lambda m: m, "int8": quantize_int8, "int4": quantize_int4}[spec["precision"]](model)
    out = {}
    for threads in spec["threads"]:
        os.environ["QUARK_THREADS"] = str(threads)  # "auto": the free cores; N: decode steps pinned to N
        for batch in spec["batches"]:
            prompts = _prompts(batch, spec["prompt_len"], (model.config.vocab_size - 2))
            # the engine: as quark.load(...).generate, `quark chat` and `quark serve` decode
            engine = Engine(model, stop_ids=[], max_batch=batch) if spec.get("path", "engine") == "engine" else None
            _decode_ours(model, engine, prompts, 8)
            t0 = time.perf_counter()
            toks = _decode_ours(model, engine, prompts, spec["new_tokens"])
            out[f"{threads} b{batch}"] = {"tok_s": batch * spec["new_tokens"] / (time.perf_counter() - t0),
                                          "tokens": toks[0][:16]}
    tier = kernels.chosen_tier() if kernels.available() else "torch"
    out["build"] = {"tok_s": 0.0, "tokens": [], "info": f"Quark's CPU tier {tier}"}
    return out


def _llama_decode(L, ctx, b, n_vocab: int, rows: list[list[int]], start: int) -> list[int]:
    """One llama_decode of equal-length rows (sequence s = row s) at positions start..; greedy next token per row."""
    import numpy as np

    b.n_tokens = 0
    for s, row in enumerate(rows):
        for i, t in enumerate(row):
            j = b.n_tokens
            b.token[j], b.pos[j], b.n_seq_id[j], b.seq_id[j][0] = t, start + i, 1, s
            b.logits[j] = int(i == len(row) - 1)
            b.n_tokens += 1
    if L.llama_decode(ctx, b) != 0:
        raise RuntimeError("llama_decode failed")
    last = [(s + 1) * len(rows[0]) - 1 for s in range(len(rows))]
    return [int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, j), shape=(n_vocab,)))) for j in last]


def _llama_generate(L, ctx, b, n_vocab: int, prompts: list[list[int]], n_new: int) -> list[int]:
    """Greedy decoding of all rows from an empty cache; row 0's new tokens."""
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    nxt, first = _llama_decode(L, ctx, b, n_vocab, prompts, 0), []
    for k in range(n_new - 1):
        first.append(nxt[0])
        nxt = _llama_decode(L, ctx, b, n_vocab, [[t] for t in nxt], len(prompts[0]) + k)
    return first + [nxt[0]]


def worker_llama(spec: dict) -> dict:
    import ctypes

    if spec.get("llama_path"):
        sys.path.insert(0, spec["llama_path"])
    import llama_cpp as L

    L.llama_backend_init()
    quiet = L.llama_log_callback(lambda level, text, data: None)
    L.llama_log_set(quiet, ctypes.c_void_p(0))
    model = L.llama_model_load_from_file(spec["gguf"].encode(), L.llama_model_default_params())
    if not model:
        raise RuntimeError(f"llama.cpp could not load {spec['gguf']}")
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    cores = os.cpu_count() or 1
    out = {}
    for threads in spec["threads"]:
        n_threads = max(cores // 2, 1) if threads == "auto" else int(threads)  # auto: llama-cpp-python's Llama()
        for batch in spec["batches"]:
            cp = L.llama_context_default_params()
            cp.n_ctx, cp.n_batch, cp.n_seq_max = 512 * batch, 512, batch
            cp.n_threads, cp.n_threads_batch = n_threads, cores if threads == "auto" else n_threads
            ctx = L.llama_init_from_model(model, cp)
            b = L.llama_batch_init(512, 0, batch)
            prompts = _prompts(batch, spec["prompt_len"], n_vocab - 2)
            _llama_generate(L, ctx, b, n_vocab, prompts, 8)
            t0 = time.perf_counter()
            toks = _llama_generate(L, ctx, b, n_vocab, prompts, spec["new_tokens"])
            out[f"{threads} b{batch}"] = {"tok_s": batch * spec["new_tokens"] / (time.perf_counter() - t0),
                                          "tokens": toks[:16]}
            L.llama_batch_free(b)
            L.llama_free(ctx)
    L.llama_model_free(model)
    info = f"{Path(L.__file__).parent}: {L.llama_print_system_info().decode().strip()}"
    out["build"] = {"tok_s": 0.0, "tokens": [], "info": info}
    return out


def run_worker(tool: str, spec: dict, policy: str, timeout: float = 900) -> dict:
    """One worker process; a crash or error comes back as {"error": ...}."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "QUARK_THREADS", "GOMP_SPINCOUNT")}
    if tool == "ours" and spec.get("isa"):
        env["QUARK_CPU_ISA"] = spec["isa"]
    if policy != "unset":
        env["OMP_WAIT_POLICY"] = policy
    try:
        p = subprocess.run([sys.executable, str(HERE), "--worker", tool, "--spec", json.dumps(spec)], env=env,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or [""])[-1][:160]
        return {"error": f"exit {p.returncode}" + (f" (signal {-p.returncode})" if p.returncode < 0 else "") +
                         (f": {tail}" if tail else "")}
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---- the comparison ------------------------------------------------------------------------------------------------
BUSY = {"shared": "while True: pass",  # CPU-bound, one core
        # memory-bound, one core: 256 MB of weights read over and over, as another model's evaluation does
        "shared-mem": "import torch\ntorch.set_num_threads(1)\nw = torch.randn(64 << 20)\nwhile True: w.sum()"}


class Competitor:
    """Another process on one core for the whole phase (BUSY[phase])."""

    def __init__(self, phase: str):
        self.code = BUSY[phase]

    def __enter__(self):
        self.p = subprocess.Popen([sys.executable, "-c", self.code])
        return self

    def __exit__(self, *exc):
        self.p.kill()
        self.p.wait()


def measure(args, folder: Path, ggufs: dict[str, Path]) -> dict:
    """{phase: {(tool, precision, setting, batch): best tok/s or error}} plus greedy tokens for the pairs."""
    threads = args.threads or (["auto", "1", str(os.cpu_count() or 1)] if (os.cpu_count() or 1) > 1 else ["auto"])
    base = {"new_tokens": args.new_tokens, "prompt_len": 8, "batches": args.batches, "threads": threads,
            "path": args.path, "isa": args.isa, "llama_path": args.llama_path}
    results: dict = {}
    builds = results.setdefault("builds", {})
    for phase in args.phases:
        res = results[phase] = {}
        ctx = Competitor(phase) if phase in BUSY else None
        if ctx:
            ctx.__enter__()
        try:
            for r in range(args.rounds):
                for ours in args.precisions:
                    for policy in args.policies:
                        jobs = [("ours", {**base, "model": str(folder), "precision": ours}),
                                ("llama.cpp", {**base, "gguf": str(ggufs[PAIRS[ours]])})]
                        for tool, spec in (jobs if r % 2 == 0 else jobs[::-1]):
                            got = run_worker(tool, spec, policy)
                            if "build" in got:
                                builds[tool] = got.pop("build")["info"]
                            print(f"# {phase} round {r + 1} {tool} {ours if tool == 'ours' else args.labels[ours]} "
                                  f"OMP_WAIT_POLICY={policy}: " + (got["error"] if "error" in got else ", ".join(
                                      f"{k} {v['tok_s']:.1f}" for k, v in got.items())), flush=True)
                            record(res, tool, ours, policy, got)
        finally:
            if ctx:
                ctx.__exit__(None, None, None)
    return results


def record(res: dict, tool: str, ours: str, policy: str, got: dict) -> None:
    if "error" in got:
        res.setdefault((tool, ours, "error"), got["error"])
        return
    for key, v in got.items():
        threads, batch = key.split(" ")
        k = (tool, ours, f"{policy} t={threads}", batch)
        old = res.get(k)
        if old is None or v["tok_s"] > old["tok_s"]:
            res[k] = v


def table(results: dict, args) -> list[str]:
    lines = ["| phase | ours | llama.cpp | batch | ours out of the box | llama.cpp out of the box | ratio | "
             "ours at best | llama.cpp at best | ratio |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for phase, res in results.items():
        if phase == "builds":
            continue
        for ours in args.precisions:
            for batch in (f"b{b}" for b in args.batches):
                cells = []
                for tool in ("ours", "llama.cpp"):
                    err = res.get((tool, ours, "error"))
                    rows = {k[2]: v for k, v in res.items() if len(k) == 4 and k[:2] == (tool, ours) and k[3] == batch}
                    dflt = rows.get("unset t=auto")
                    best = max(rows.items(), key=lambda kv: kv[1]["tok_s"]) if rows else None
                    cells.append((dflt, best, err))
                (od, ob, oe), (ld, lb, le) = cells

                def fig(x, err):
                    return f"{x['tok_s']:.1f}" if x else (f"failed: {err}" if err else "-")

                def ratio(a, b):
                    return f"{a['tok_s'] / b['tok_s']:.2f}x" if a and b else "-"

                def best_fig(x, err):
                    return f"{x[1]['tok_s']:.1f} ({x[0]})" if x else fig(None, err)

                lines.append(f"| {phase} | {ours} | {args.labels[ours]} | {batch[1:]} | {fig(od, oe)} | "
                             f"{fig(ld, le)} | {ratio(od, ld)} | {best_fig(ob, oe)} | {best_fig(lb, le)} | "
                             f"{ratio(ob[1] if ob else None, lb[1] if lb else None)} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="quark-72m")
    ap.add_argument("--model", help="a model folder, or a .gguf file (imported; llama.cpp runs the file beside "
                    "our int4), instead of random preset weights")
    ap.add_argument("--work", default="runs/bench-llamacpp", help="cache for the model folder and GGUF files")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best counts")
    ap.add_argument("--precisions", default="fp32,int8,int4")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--phases", default="idle,shared")
    ap.add_argument("--policies", default=",".join(POLICIES), help="OMP_WAIT_POLICY values for the best-of grid")
    ap.add_argument("--path", choices=("engine", "generate"), default="engine",
                    help="ours through the serving engine (quark.load(...).generate, chat, serve) or "
                         "quark.generate.generate")
    ap.add_argument("--isa", choices=("avx512", "avx2", "portable", "torch"),
                    help="QUARK_CPU_ISA for ours (default: the best tier here)")
    ap.add_argument("--llama-path", help="a folder holding the llama_cpp package to run (e.g. an AVX2-only build)")
    ap.add_argument("--threads", help="thread settings to run, e.g. auto (each tool's default only); default "
                    "auto,1,<cores>")
    ap.add_argument("--worker", choices=("ours", "llama.cpp"), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(args.spec)
        print(json.dumps((worker_ours if args.worker == "ours" else worker_llama)(spec)))
        return 0
    args.precisions = [p for p in args.precisions.split(",") if p]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.phases = [p for p in args.phases.split(",") if p]
    args.policies = [p for p in args.policies.split(",") if p]
    args.threads = [t for t in (args.threads or "").split(",") if t]
    bad = [p for p in args.precisions if p not in PAIRS] + [p for p in args.phases if p not in ("idle", *BUSY)]
    bad += [p for p in args.policies if p not in ("unset", "ACTIVE", "PASSIVE")]
    if bad:
        raise SystemExit(f"unknown precision/phase {bad}; allowed: {', '.join(PAIRS)} / idle, {', '.join(BUSY)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folder, ggufs = prepare(work, args.preset, args.model)
    args.labels = dict(PAIRS)
    if args.model and args.model.endswith(".gguf"):  # llama.cpp runs the given file beside our int4
        args.labels["int4"] = f"{Path(args.model).stem.rsplit('.', 1)[-1]} (the file)"
    print(f"# bench/llamacpp.py  model {folder}  {cpu_model()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f}; greedy, prompt 8, {args.new_tokens} new tokens, best of {args.rounds} rounds; "
          f"ours through {args.path}")
    t0 = time.time()
    results = measure(args, folder, ggufs)
    print()
    print("\n".join(table(results, args)))
    print(f"\n# {time.time() - t0:.0f} s; load average after: {os.getloadavg()[0]:.2f}. Out of the box: ours unset "
          "policy + threads on the free cores; llama.cpp: llama-cpp-python's Llama() threads (cores // 2). Best: over "
          f"threads {{auto, 1, all}} x OMP_WAIT_POLICY {{{', '.join(args.policies)}}}.")
    for tool, info in results.pop("builds").items():
        print(f"# {tool}: {info}")
    for phase, res in results.items():
        for ours in args.precisions:
            a, b = res.get(("ours", ours, "unset t=auto", "b1")), res.get(("llama.cpp", ours, "unset t=auto", "b1"))
            if a and b:
                same = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), None)
                print(f"# {phase} greedy tokens {ours} vs {args.labels[ours]}: "
                      + ("first 16 equal" if same is None else f"first difference at token {same}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
