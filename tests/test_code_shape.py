"""Code shape: no function in quark/ is longer than 60 lines or takes more than 6 positional parameters, unless its
`def` line (or the line above it) says why in a comment `# shape: <reason>`.

Lines are counted from the `def` (decorators excluded) to the function's last line, docstring and comments
included, nested functions inside it too. Positional parameters are the positional-only and positional-or-keyword
ones, `self` and `cls` not counted; keyword-only parameters (after `*`) are free, since every call names them.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG_ROOT = Path(__file__).resolve().parents[1] / "quark"
MAX_LINES = 60
MAX_POSITIONAL = 6
MARK = "# shape:"


def positional_count(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    names = [a.arg for a in fn.args.posonlyargs + fn.args.args]
    return len(names) - (1 if names and names[0] in ("self", "cls") else 0)


def has_reason(lines: list[str], fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A `# shape: <reason>` comment (with a reason) on the def line(s) or the line above the def."""
    first = fn.lineno - 1  # the `def` line (0-based), after any decorators
    header_end = fn.body[0].lineno - 1 if fn.body else first + 1
    candidates = lines[max(first - 1, 0):max(header_end, first + 1)]
    for line in candidates:
        _, mark, reason = line.partition(MARK)
        if mark and reason.strip():
            return True
    return False


def shape_problems(path: Path, root: Path = PKG_ROOT) -> list[str]:
    """'file:line name: problem' for each function of `path` over the limits without a `# shape:` reason."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    out = []
    functions = [n for n in ast.walk(ast.parse(text, str(path))) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    for node in sorted(functions, key=lambda n: n.lineno):
        problems = []
        n_lines = node.end_lineno - node.lineno + 1
        if n_lines > MAX_LINES:
            problems.append(f"{n_lines} lines (limit {MAX_LINES})")
        n_pos = positional_count(node)
        if n_pos > MAX_POSITIONAL:
            problems.append(f"{n_pos} positional parameters (limit {MAX_POSITIONAL})")
        if problems and not has_reason(lines, node):
            out.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name}: {', '.join(problems)}")
    return out


def test_shape_check_counts_lines_parameters_and_reasons(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    src = (f"def long():\n{body}\n\n"
           f"# shape: one table of 60 rows reads best in one place\ndef long_ok():\n{body}\n\n"
           "def wide(a, b, c, d, e, f, g):\n    pass\n\n"
           "def wide_kw(a, b, c, d, e, f, *, g, h):\n    pass\n\n"
           "class C:\n    def method(self, a, b, c, d, e, f):\n        pass\n\n"
           "def wide_ok(a, b, c, d, e, f, g):  # shape: mirrors the C API\n    pass\n\n"
           "def empty_reason(a, b, c, d, e, f, g):  # shape:\n    pass\n")
    f = tmp_path / "quark" / "m.py"
    f.parent.mkdir()
    f.write_text(src)
    assert shape_problems(f, tmp_path / "quark") == [
        "quark/m.py:1 long: 61 lines (limit 60)",
        "quark/m.py:126 wide: 7 positional parameters (limit 6)",
        "quark/m.py:139 empty_reason: 7 positional parameters (limit 6)",
    ]


def test_package_functions_are_short_and_narrow():
    problems = [p for path in sorted(PKG_ROOT.rglob("*.py")) for p in shape_problems(path)]
    assert not problems, ("functions over the limits (split them, or say why on the def line: `# shape: ...`):\n"
                          + "\n".join(problems))
