"""The model card: gathered from a checkpoint and its run, rendered as a Hugging Face README.md.

Choices:
- Two steps: `card_facts()` reads every figure from its source (parameter count from the safetensors shapes,
  architecture from config.json, data mixture and token counts from the run's data manifest, training tokens,
  steps, hardware and wall time from run.json / metrics.jsonl, scores from `quark eval`'s JSON, chat-token ids
  from the tokenizer); `render_model_card()` only formats them. No figure is typed into the template, so the
  card cannot drift from the run; a missing source is said plainly ("not evaluated", "no run.json found").
- Sections, in order (Model Summary, Architecture, Quickstart, Prompt Format, Generation Parameters,
  Training Details, Evaluation & Known Limitations, Files, License) with YAML front matter for the Hub.
- `render_model_card()` is the one renderer: `quark export` writes it as README.md and `quark speedrun`'s
  report embeds the same text.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path

from ..model import Quark
from ..weights import config_from_folder, resolve_model_path
from .remote_code import remote_code_files, remote_code_imports

MIT_LICENSE = """MIT License

Copyright (c) {year} ThingAI and the Quark contributors

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


# ---- gathering -------------------------------------------------------------------------------------------------
def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: {what} is not valid JSON ({e})") from None


def count_params(folder: Path) -> int:
    """Parameters stored in `folder/model.safetensors` (read from the header; a tied lm_head is not stored)."""
    from safetensors import safe_open

    n = 0
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            shape = f.get_slice(k).get_shape()
            size = 1
            for s in shape:
                size *= s
            n += size
    return n


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(train lines, validation lines) of a metrics.jsonl; a bad line is an error naming file and line."""
    train, val = [], []
    if not path.exists():
        return train, val
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e})") from None
        (val if "val_loss" in d else train).append(d)
    return train, val


def find_run(folder: Path) -> Path | None:
    """The run folder a checkpoint belongs to (RUN/checkpoints/step_N -> RUN), when it has run.json."""
    for cand in (folder, folder.parent, folder.parent.parent):
        if (cand / "run.json").exists():
            return cand
    return None


def _checkpoint_step(folder: Path) -> int | None:
    m = re.fullmatch(r"step_(\d+)", folder.name)
    return int(m.group(1)) if m else None


def run_facts(run: Path, checkpoint: Path | None = None) -> dict:
    """Training figures of a run: run.json plus the metrics.jsonl lines up to the exported checkpoint."""
    rj = _read_json(run / "run.json", "run.json")
    train, val = read_metrics(run / "metrics.jsonl")
    step = _checkpoint_step(checkpoint) if checkpoint is not None else None
    if step is not None:
        train = [d for d in train if d.get("step", 0) <= step]
        val = [d for d in val if d.get("step", 0) <= step]
    last, last_val = (train[-1] if train else None), (val[-1] if val else None)
    return {
        "path": str(run), "kind": rj.get("kind"), "base": rj.get("base"), "hardware": rj.get("hardware"),
        "world_size": rj.get("world_size"), "started": rj.get("started"), "finished": rj.get("finished"),
        "wall_time_s": rj.get("wall_time_s"), "steps": rj.get("steps"), "tokens": rj.get("tokens"),
        "train_config": rj.get("train_config") or {}, "manifest": rj.get("data_manifest"), "data": rj.get("data"),
        "checkpoint_step": step, "last_train": last, "last_val": last_val,
    }


def _find_eval(folder: Path, run: Path | None, explicit: str | Path | None) -> tuple[dict | None, str | None]:
    if explicit is not None:
        p = Path(explicit)
        if not p.exists():
            raise FileNotFoundError(f"{p}: eval results file not found")
        return _read_json(p, "eval results"), str(p)
    for cand in [folder / "eval_results.json"] + ([run / "eval_results.json"] if run else []):
        if cand.exists():
            return _read_json(cand, "eval results"), str(cand)
    return None, None


def card_facts(checkpoint: str | Path, *, run: str | Path | None = None, eval_results: str | Path | None = None,
               name: str | None = None, repo_id: str | None = None, base_model: str | None = None,
               author: str | None = None, model: Quark | None = None) -> dict:
    """Every figure the card shows, each read from its source. `checkpoint` is a model folder or run folder.
    `base_model` is a Hub model id (the Hub rejects a local path there); without one the card names none."""
    from ..tokenizer import Tokenizer

    if base_model is not None and not _is_hf_id(base_model):
        raise ValueError(f"--base-model {base_model!r}: give a Hugging Face Hub model id such as org/name "
                         "(a local path cannot go in a model card)")

    folder = resolve_model_path(checkpoint)
    folder = folder.parent if folder.is_file() else folder
    cfg = config_from_folder(folder)
    run_dir = Path(run) if run is not None else find_run(folder)
    if run_dir is not None and not (run_dir / "run.json").exists():
        raise FileNotFoundError(f"{run_dir / 'run.json'}: run folder has no run.json")
    rf = run_facts(run_dir, folder) if run_dir is not None else None
    base = None
    if rf and rf.get("base"):
        try:
            base_ck = resolve_model_path(rf["base"])
            base_run = find_run(base_ck if base_ck.is_dir() else base_ck.parent)
            base = run_facts(base_run, base_ck) if base_run is not None else None
        except FileNotFoundError:
            base = None  # the base run is not on this machine; the card names its path only
    ev, ev_path = _find_eval(folder, run_dir, eval_results)
    tok = Tokenizer.load(folder)
    lora = (folder / "lora.json").exists()  # a LoRA checkpoint stores adapters only: count the merged model
    n_params = sum(p.numel() for p in model.parameters()) if lora and model is not None else count_params(folder)
    if model is not None and sum(p.numel() for p in model.parameters()) != n_params:
        raise RuntimeError(f"{folder}: the weights file and the loaded model disagree on the parameter count")
    finished = (rf or {}).get("finished") or ""
    year = int(finished[:4]) if re.match(r"\d{4}", finished) else _dt.date.today().year
    name = name or (Path(checkpoint).name if rf is None else Path(rf["path"]).name)
    return {
        "name": name, "repo_id": repo_id or name, "author": author, "year": year,
        "config": cfg.to_dict(), "head_dim": cfg.head_dim, "n_params": n_params,
        "n_params_config": cfg.n_params(), "kv_bytes_per_token_bf16": cfg.kv_cache_bytes_per_token(2),
        "tokenizer": {"vocab_size": tok.vocab_size, "base_vocab_size": tok.base_vocab_size, "eot_id": tok.eot_id,
                      "im_start_id": tok.im_start_id, "im_end_id": tok.im_end_id, "sha256": tok.sha256()},
        "run": rf, "base": base, "base_model": base_model,
        "eval": ev, "eval_path": ev_path,
        "remote_code": {"files": sorted(remote_code_files()), "imports": remote_code_imports()},
    }


# ---- rendering -------------------------------------------------------------------------------------------------
def _n(x: int) -> str:
    return f"{x:,}" if isinstance(x, int) else str(x)


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def _duration(s: float | None) -> str:
    if not isinstance(s, (int, float)):
        return "not recorded"
    s = round(s)
    h, m = divmod(s, 3600)
    m, sec = divmod(m, 60)
    return f"{h}h {m:02d}m {sec:02d}s" if h else f"{m}m {sec:02d}s"


def _is_hf_id(s: str) -> bool:
    return isinstance(s, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", s) is not None and not s.startswith(".")


def _yaml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # JSON strings are valid YAML scalars


def front_matter(f: dict, fmt: str) -> str:
    run = f["run"] or {}
    tags = ["quark", "llama" if fmt == "llama" else "custom_code", "small-language-model", "gqa", "rope", "swiglu"]
    if run.get("kind") == "sft":
        tags += ["chatml", "conversational"]
    lines = ["---", "license: mit", "language:", "- en", "- it", "library_name: transformers",
             "pipeline_tag: text-generation", "tags:"] + [f"- {t}" for t in tags]
    if run.get("kind") == "sft" and f.get("base_model"):
        lines.append(f"base_model: {_yaml_str(str(f['base_model']))}")
    datasets = []
    for m in (run.get("manifest"), (f.get("base") or {}).get("manifest")):
        for s in (m or {}).get("sources", []):
            for key in ("hf_dataset", "dataset", "name"):
                if _is_hf_id(s.get(key)) and s[key] not in datasets:
                    datasets.append(s[key])
                    break
    if datasets:
        lines += ["datasets:"] + [f"- {_yaml_str(d)}" for d in datasets]
    return "\n".join(lines + ["---", ""])


def _mixture_table(manifest: dict | None) -> list[str]:
    if not manifest:
        return ["The data manifest was not recorded with this run."]
    sources = manifest.get("sources", [])
    total = sum(s.get("tokens", 0) for s in sources) or 1
    out = ["| Source | Weight | Share of tokens | Tokens | Documents | UTF-8 bytes | License |",
           "|---|---|---|---|---|---|---|"]
    for s in sources:
        out.append(f"| {s.get('name')} | {s.get('weight')} | {100 * s.get('tokens', 0) / total:.1f}% | "
                   f"{_n(s.get('tokens'))} | {_n(s.get('documents'))} | {_n(s.get('bytes'))} | {s.get('license')} |")
    splits = manifest.get("splits", {})
    out.append("")
    for split in ("train", "val"):
        if split in splits:
            sp = splits[split]
            out.append(f"- `{split}` split: {_n(sp.get('tokens'))} tokens, {_n(sp.get('bytes'))} bytes of text, "
                       f"{len(sp.get('shards', []))} shard(s).")
    if "eval_dedup_removed" in manifest:
        out.append(f"- Documents removed because they matched evaluation items exactly: "
                   f"{_n(manifest['eval_dedup_removed'])}.")
    if manifest.get("seq_len"):
        out.append(f"- Conversations packed into rows of {_n(manifest['seq_len'])} tokens.")
    if manifest.get("tokenizer_sha256"):
        out.append(f"- Tokenizer SHA-256: `{manifest['tokenizer_sha256']}`.")
    return out


def _training_section(title: str, r: dict) -> list[str]:
    last, last_val = r.get("last_train") or {}, r.get("last_val") or {}
    out = [f"### {title}", "", "| | |", "|---|---|",
           f"| Optimizer steps (run) | {_n(r.get('steps'))} |", f"| Training tokens (run) | {_n(r.get('tokens'))} |"]
    if r.get("checkpoint_step") is not None and r.get("checkpoint_step") != r.get("steps"):
        out.append(f"| This checkpoint | step {_n(r['checkpoint_step'])}, {_n(last.get('tokens'))} tokens |")
    out += [f"| Hardware | {r.get('hardware') or 'not recorded'} (world size {_n(r.get('world_size'))}) |",
            f"| Wall time | {_duration(r.get('wall_time_s'))} |",
            f"| Started / finished | {r.get('started')} / {r.get('finished')} |"]
    if last:
        out.append(f"| Final train loss | {last.get('loss'):.4f} (step {_n(last.get('step'))}) |")
        if last.get("tok_per_s") is not None:
            out.append(f"| Throughput | {last['tok_per_s']:,.0f} tokens/s |")
        if last.get("mfu") is not None:
            out.append(f"| MFU | {100 * last['mfu']:.1f}% |")
    if last_val.get("val_loss") is not None:
        if last_val.get("val_bpb") is not None:
            out.append(f"| Validation loss / bits per byte | {last_val['val_loss']:.4f} / "
                       f"{last_val['val_bpb']:.4f} (step {_n(last_val.get('step'))}) |")
        else:  # SFT: the loss is over assistant tokens only, so bytes per token are not defined
            out.append(f"| Validation loss | {last_val['val_loss']:.4f} (step {_n(last_val.get('step'))}) |")
    scalars = {k: v for k, v in (r.get("train_config") or {}).items() if isinstance(v, (int, float, str, bool))}
    if scalars:
        out += ["", "Training configuration: " + ", ".join(f"`{k}={v}`" for k, v in scalars.items()) + "."]
    out += ["", "Data mixture:", ""] + _mixture_table(r.get("manifest"))
    return out + [""]


def pct(x: float | None, se: float | None = None) -> str:
    """A fraction as a percentage with its standard error; tasks without a metric (lambada has no acc_norm,
    winogrande no fixed chance) show a dash."""
    if x is None:
        return "—"
    return f"{100 * x:.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")


def _eval_section(f: dict) -> tuple[list[str], list[str]]:
    """(section lines, limitation lines derived from the scores)."""
    ev = f.get("eval")
    if not ev:
        return ([("This model has not been evaluated: no `quark eval` results were found next to the checkpoint. "
                 "Run `quark eval --model <folder>` to produce `eval_results.json` and re-export to fill this "
                 "table.")], [])
    out = [(f"Scored with `quark eval` on {ev.get('date')} (few-shot: {ev.get('fewshot')}, "
           f"limit: {ev.get('limit') if ev.get('limit') is not None else 'all items'}); accuracy is "
           "lm-evaluation-harness style log-likelihood ranking; `acc_norm` normalises by length."), "",
           "| Task | Split | Items | acc | acc_norm | Chance |", "|---|---|---|---|---|---|"]
    near_chance = []
    for task, t in (ev.get("tasks") or {}).items():
        acc, se = t.get("acc"), t.get("acc_stderr")
        out.append(f"| {task} | {t.get('split')} | {_n(t.get('n'))} | {pct(acc, se)} | "
                   f"{pct(t.get('acc_norm'), t.get('acc_norm_stderr'))} | {pct(t.get('chance'))} |")
        if se is not None and t.get("chance") is not None and abs(acc - t["chance"]) <= 2 * se:
            near_chance.append(task)
    ppl = ev.get("perplexity")
    if ppl:
        out += ["", (f"Validation perplexity: loss {ppl.get('val_loss'):.4f} nats/token, "
                    f"{ppl.get('bpb'):.4f} bits per byte over {_n(ppl.get('tokens'))} tokens.")]
    lim = []
    if near_chance:
        lim.append(f"- **Near-chance benchmarks.** On {', '.join(near_chance)} the accuracy is within two standard "
                   "errors of chance: the model has not learned these tasks measurably.")
    return out, lim


def _quickstart(f: dict, fmt: str) -> list[str]:
    repo, tk = f["repo_id"], f["tokenizer"]
    siblings = [x for x in f["remote_code"]["files"] if x not in ("configuration_quark.py", "modeling_quark.py")]
    ids = f"# in this model <|im_start|> = {tk['im_start_id']} and <|im_end|> = {tk['im_end_id']}"
    if fmt == "llama":
        return ["This folder is a plain Llama checkpoint: no remote code is needed.", "", "```python",
                "import torch", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
                f'model = AutoModelForCausalLM.from_pretrained("{repo}", dtype=torch.float32).eval()', "",
                'messages = [{"role": "user", "content": "What is the difference between a list and a tuple?"}]',
                "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
                "return_dict=True)", ids,
                f"output_ids = model.generate(**inputs, max_new_tokens={_recommended_args()['max_new_tokens']})"
                "  # sampling defaults: generation_config.json",
                'n = inputs["input_ids"].shape[1]',
                "print(tokenizer.decode(output_ids[0][n:], skip_special_tokens=True))", "```"]
    return [
        "This model uses a custom architecture and requires `trust_remote_code=True` to load `configuration_quark.py` "
        "and `modeling_quark.py` (which import " + ", ".join(f"`{x}`" for x in siblings) + " beside them).",
        "", "```bash", "pip install transformers torch", "```", "", "```python", "import torch",
        "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        'tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})',
        'im_end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")', ids, "",
        "model = AutoModelForCausalLM.from_pretrained(", f'    "{repo}",', "    trust_remote_code=True,",
        "    dtype=torch.bfloat16,   # or torch.float32 on CPU", ").eval()", "",
        ('prompt = "<|im_start|>user\\nWhat is the difference between a list and a tuple in Python?<|im_end|>\\n'
        '<|im_start|>assistant\\n"'),
        'input_ids = tokenizer.encode(prompt, add_special_tokens=False, return_tensors="pt")', "",
        "output_ids = model.generate_text(", "    input_ids,"] + [
        f"    {k}={v}," for k, v in _recommended_args().items()] + [
        "    eos_token_id=im_end_id,", ")", "",
        "response = tokenizer.decode(output_ids[0][input_ids.shape[1]:], skip_special_tokens=True)",
        "print(response)", "```", "",
        ("The standard `model.generate()` works too (KV cache, sampling defaults from `generation_config.json`), as do "
        "`pipeline(\"text-generation\")` and lm-evaluation-harness (`--model hf --model_args "
        f"pretrained={repo},trust_remote_code=True`)."), "", "### Running on GPU", "", "```python",
        "model = AutoModelForCausalLM.from_pretrained(", f'    "{repo}",', "    trust_remote_code=True,",
        "    dtype=torch.bfloat16,", ").cuda().eval()", "", "input_ids = input_ids.cuda()", "```"]


def _recommended_args() -> dict:
    from ..sampling import RECOMMENDED  # in generate_text's argument names

    order = ("max_new_tokens", "temperature", "top_p", "rep_penalty")
    return {k: RECOMMENDED[k] for k in order}


def render_model_card(source: dict | str | Path, fmt: str = "hf", **kw) -> str:
    """The README.md model card. `source` is a facts dict from `card_facts()` or a checkpoint / run folder
    (then `kw` goes to `card_facts`). `fmt`: "hf" (remote-code folder) or "llama"."""
    f = source if isinstance(source, dict) else card_facts(source, **kw)
    lines = (_summary_section(f, fmt) + _architecture_section(f) + _use_section(f, fmt) + _prompt_section(f)
             + _training_details(f) + _limitations_section(f) + _files_section(f, fmt) + _closing_section(f))
    return "\n".join(lines)


def _summary_section(f: dict, fmt: str) -> list[str]:
    c, n, kind = f["config"], f["n_params"], (f["run"] or {}).get("kind")
    what = {"sft": "an instruction-tuned (SFT) checkpoint", "pretrain": "a pre-trained base checkpoint"}.get(
        kind, "a checkpoint")
    tied = "embedding-tied" if c["tie_embeddings"] else "untied embeddings"
    lines = [front_matter(f, fmt), f"# {f['name']}", "",
             (f"{f['name']} is a compact decoder-only language model of the Quark family ({_millions(n)} parameters), "
             f"trained with Quark. It is {what}. It uses Grouped-Query "
             "Attention, RoPE, SwiGLU feed-forward layers and RMSNorm, the building blocks of current large models, "
             "scaled down to run on consumer hardware."), "",
             "## Model Summary", "", "| | |", "|---|---|"]
    if f.get("author"):
        lines.append(f"| Developed by | {f['author']} |")
    lines += ["| Model type | Decoder-only Transformer (causal language model) |",
              f"| Parameters | {_n(n)} ({_millions(n)}, {tied}) |", "| Languages | English, Italian |",
              "| License | MIT |"]
    if kind == "sft" and f.get("base_model"):
        lines.append(f"| Finetuned from | `{f['base_model']}` |")
    return lines


def _architecture_section(f: dict) -> list[str]:
    c, tk = f["config"], f["tokenizer"]
    return ["", "## Architecture", "", "| Component | Detail |", "|---|---|",
            f"| Layers | {c['n_layers']} |", f"| Hidden size (d_model) | {c['d_model']} |",
            f"| Attention heads | {c['n_heads']} query heads |",
            f"| KV heads | {c['n_kv_heads']} (Grouped-Query Attention, {c['n_heads'] // c['n_kv_heads']}:1 ratio) |",
            f"| Head dimension | {f['head_dim']} |", f"| Feed-forward | SwiGLU, d_ff = {c['d_ff']} |",
            "| Normalization | RMSNorm (pre-norm placement), eps = " + f"{c['norm_eps']:g} |",
            f"| Positional encoding | Rotary Position Embeddings (RoPE), θ = {c['rope_theta']:,g} |",
            "| Activation | SiLU (within SwiGLU gate) |",
            f"| Vocabulary size | {tk['base_vocab_size']:,} (+ 2 chat tokens) = {c['vocab_size']:,} embedding rows |",
            f"| Context length | {c['context_length']:,} tokens |",
            "| Weight tying | " + ("Input embedding and output projection share weights |" if c["tie_embeddings"]
                                  else "Separate input embedding and output projection |"),
            f"| KV cache | {f['kv_bytes_per_token_bf16']:,} bytes per token in bf16 |", ""]


def _use_section(f: dict, fmt: str) -> list[str]:
    return ["## Intended Use", "",
            ("A research and educational artifact for studying small-scale LLM architecture, training and "
             "inference; a lightweight base for self-hosted projects and further task-specific fine-tuning. "
             "Out of scope: tasks needing deep multi-step reasoning, long-context retrieval or broad world "
             "knowledge; safety-critical, medical, legal or financial use; production use without further "
             "evaluation."), "", "## Quickstart", ""] + _quickstart(f, fmt)


def _prompt_section(f: dict) -> list[str]:
    tk = f["tokenizer"]
    return ["", "## Prompt Format", "",
            (f"ChatML, with `<|im_start|>` (id {tk['im_start_id']}) and `<|im_end|>` (id {tk['im_end_id']}) as role "
             f"delimiters; `<|endoftext|>` (id {tk['eot_id']}) separates pre-training documents. Both chat tokens "
             "are stored in `tokenizer.json`, so the Quickstart's `add_special_tokens` call is a harmless no-op, "
             "and `tokenizer_config.json` ships this `chat_template` (use `apply_chat_template`):"), "", "```",
            "<|im_start|>user", "{user message}<|im_end|>", "<|im_start|>assistant", "{model response}<|im_end|>",
            "```", "", "## Generation Parameters", "",
            ("`generate_text()` takes `max_new_tokens`, `temperature` (0.0 = greedy), `top_p`, `rep_penalty` "
             "(CTRL-style penalty on every token already seen; 1.0 = off) and `eos_token_id`; a step whose logits "
             "are not finite falls back to greedy. The recommended starting configuration is below; "
             "`generation_config.json` holds its sampling part (`temperature`, `top_p`, `repetition_penalty`), "
             "which `model.generate()` uses by default (give it `max_new_tokens`):"), "", "```python",
            "model.generate_text(input_ids, " + ", ".join(f"{k}={v}" for k, v in _recommended_args().items())
            + ", eos_token_id=im_end_id)", "```", ""]


def _training_details(f: dict) -> list[str]:
    run, base = f["run"] or {}, f["base"]
    lines = ["## Training Details", ""]
    if not run:
        return lines + ["Training details were not recorded with this checkpoint (no `run.json` found beside it).", ""]
    kind = run.get("kind")
    if base:
        lines += _training_section("Pre-training (base model)", base)
    elif kind == "sft":
        lines += [f"Pre-training: the base checkpoint `{run.get('base')}` (its run is not available here).", ""]
    return lines + _training_section("Supervised fine-tuning (SFT)" if kind == "sft" else "Pre-training", run)


def _limitations_section(f: dict) -> list[str]:
    ev_lines, ev_lims = _eval_section(f)
    return ["## Evaluation & Known Limitations", ""] + ev_lines + ["", "Known limitations:", ""] + ev_lims + [
        ("- **Repetition.** Small models loop without a repetition penalty; the recommended "
         f"`rep_penalty={_recommended_args()['rep_penalty']}` helps."),
        "- **Shallow reasoning.** Do not rely on it for multi-step logical or mathematical reasoning.",
        "- **Limited world knowledge.** It will often hallucinate specific facts, dates or entities.",
        (f"- **Short effective context.** The architecture accepts {f['config']['context_length']:,} tokens, but "
         "instruction-following degrades over long inputs sooner than in larger models."), ""]


def _files_section(f: dict, fmt: str) -> list[str]:
    files = [("config.json", "Model configuration" + (" (a Llama config, Quark's own under `quark`) and `auto_map` "
                                                       "to `QuarkForCausalLM` for `trust_remote_code`" if fmt == "hf" else
                                                       " for `LlamaForCausalLM`"))]
    if fmt == "hf":
        files += [("configuration_quark.py", "`QuarkConfig` (extends `PretrainedConfig`)"),
                  ("modeling_quark.py", "`QuarkForCausalLM`, including the custom `generate_text()` method"),
                  (", ".join(x for x in f["remote_code"]["files"] if x not in ("configuration_quark.py",
                                                                               "modeling_quark.py")),
                   ("Quark's own modules (config, transformer, decoding loop, sampling, ...), copied verbatim and "
                   "imported by the two files above"))]
    files += [("model.safetensors", f"Model weights (float32, {_n(f['n_params'])} parameters)"),
              ("generation_config.json", "Default generation hyperparameters"),
              ("tokenizer.json, tokenizer_config.json, special_tokens_map.json",
               f"Byte-level BPE tokenizer ({f['tokenizer']['vocab_size']:,} ids) with the ChatML `chat_template`"),
              ("LICENSE", "MIT License")]
    lines = ["## Files in this Repository", "", "| File | Purpose |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in files]
    if fmt == "hf":
        lines += ["", "As with any `trust_remote_code` model, review `modeling_quark.py` and the files it imports "
                      "before running them; besides the standard library and each other they import only "
                      + ", ".join(f"`{m}`" for m in f["remote_code"]["imports"]) + "."]
    return lines


def _closing_section(f: dict) -> list[str]:
    return ["", "## Citation", "", "```bibtex", "@misc{quark,", f"  title  = {{{f['name']}}},",
            "  author = {ThingAI and the Quark contributors},", f"  year   = {{{f['year']}}}", "}", "```", "",
            "## License", "", ("This model is released under the MIT License (see `LICENSE`). Training data sources "
            "retain their own licenses (listed in the data mixture tables above); users are responsible for "
            "complying with them."), ""]
