"""Write the bundled demo corpus: docstrings of the Python standard library, as JSON lines.

    python -m sharding.demo_corpus --out runs/demo/corpus.jsonl

Every Python install has this text, so `make demo` needs no download. The
pure-Python stdlib modules are parsed with `ast` (never imported), in sorted
order; test suites, IDLE and other non-library code are skipped; each module,
class and function docstring becomes one record {"text": ...}, exact
duplicates dropped. That is about 1.7 MB (~7,000 records) on CPython 3.11;
`--max-bytes` (default 4 MB) caps it. The output is the same for the same
Python version.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

from sharding.atomic import publish

DEFAULT_MAX_BYTES = 4_000_000
MIN_DOC_CHARS = 20  # shorter ones are mostly "Return x." and teach the model little
# Directories (anywhere in the path) that hold tests, demos, tools or vendored code.
SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "idle_test",
    "lib2to3",
    "site-packages",
    "dist-packages",
    "ensurepip",
    "turtledemo",
    "__pycache__",
    "pydoc_data",
    "venv",
    "Tools",
}


def stdlib_files(root: Path) -> Iterator[Path]:
    """The stdlib's .py files in sorted order, without tests and other non-library dirs."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                yield Path(dirpath) / name


def docstrings(path: Path) -> Iterator[str]:
    """Module, class and function docstrings of one file (in `ast.walk` order)."""
    try:
        with warnings.catch_warnings():  # old escape sequences in some modules
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return  # a few stdlib files are templates or target other versions
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if isinstance(node, kinds):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= MIN_DOC_CHARS:
                yield doc.strip()


def write_corpus(out: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """Write the corpus to `out` (atomically); returns {"documents", "bytes", "path"}."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    seen: set[str] = set()
    size = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for path in stdlib_files(root):
            for doc in docstrings(path):
                if doc in seen:
                    continue
                seen.add(doc)
                line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
                size += len(line.encode("utf-8"))
                f.write(line)
                if size >= max_bytes:
                    break
            if size >= max_bytes:
                break
    publish(tmp, out)
    return {"documents": len(seen), "bytes": size, "path": str(out)}


def main(argv: list[str] | None = None) -> int:
    """CLI: `python -m sharding.demo_corpus --out FILE.jsonl [--max-bytes N]`."""
    p = argparse.ArgumentParser(prog="python -m sharding.demo_corpus", description=__doc__)
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="size cap")
    args = p.parse_args(argv)
    info = write_corpus(args.out, args.max_bytes)
    print(f"wrote {info['path']}: {info['documents']:,} docstrings, {info['bytes']:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
