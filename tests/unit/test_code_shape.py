"""Small files, short functions (STYLE 10): no source or test file over 400 lines, no
function over 60 lines. Generated protobuf stubs are exempt."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("proto", "controller", "workers", "loadgen", "tests", "scripts")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def python_files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py") if "_pb2" not in p.name)


def oversized(path: Path) -> list[str]:
    text = path.read_text()
    found = []
    lines = len(text.splitlines())
    rel = path.relative_to(ROOT)
    if lines > MAX_FILE_LINES:
        found.append(f"{rel}: {lines} lines (at most {MAX_FILE_LINES})")
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{rel}:{node.lineno} {node.name}: {length} lines (at most {MAX_FUNCTION_LINES})")
    return found


def test_files_and_functions_are_small():
    found = [line for path in python_files() for line in oversized(path)]
    assert not found, "split these:\n" + "\n".join(found)


def test_the_check_sees_a_long_function(tmp_path, monkeypatch):
    monkeypatch.setattr(__import__("sys").modules[__name__], "ROOT", tmp_path)
    path = tmp_path / "long.py"
    path.write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    assert oversized(path) == [f"long.py:1 f: {MAX_FUNCTION_LINES + 1} lines (at most {MAX_FUNCTION_LINES})"]
