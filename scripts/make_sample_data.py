"""Build the bundled sample corpus under data/sample/ from text every Python install has.

Two sources, written in the Olmo-Mix on-disk format (zstd-compressed JSON lines with `id`, `text`,
`source`), so the sample exercises the same reader as the real corpora:

  web   English prose: the Python language reference topics (pydoc_data) and the docstrings of
        standard-library modules, classes, functions and methods, deduplicated, one document each.
  code  Python source: one document per top-level def/class of the standard-library sources.

Everything is walked in sorted order and size budgets are met by an even stride over the candidates,
so two runs on the same Python produce identical shards. Different Python versions give different
(equally valid) corpora; the committed copy was built with Python 3.11.

    python scripts/make_sample_data.py     # writes data/sample/{web,code}/part-00000.jsonl.zst, ...
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import inspect
import io
import json
import math
import os
import pkgutil
import sys
import sysconfig
import warnings
from pathlib import Path

import zstandard

# Modules with import side effects (a browser, printing, GUI or terminal setup), the test suite, and
# IDLE: nothing there is worth the risk of importing.
SKIP_MODULES = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "readline",
    "pydoc_data", "lib2to3", "ensurepip", "venv",
}
# Source folders that are generated tables, tests or GUI code rather than readable library code.
SKIP_DIRS = {
    "test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "site-packages",
    "dist-packages", "encodings", "pydoc_data", "__pycache__", "ensurepip", "config",
}
MIN_CHARS = 100  # shorter docstrings are mostly one-liners ("Return self+value.")
MAX_CHARS = 8000  # longer documents would dominate a small sample


def _import_quietly(name: str):
    """Import a module, hiding its warnings and output; None if it does not import here."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - a module may raise anything, even SystemExit
            return None


def _module_names() -> list[str]:
    """Public stdlib modules, each followed by its public submodules in sorted order."""
    names = []
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in SKIP_MODULES:
            continue
        module = _import_quietly(top)
        if module is None:
            continue
        names.append(top)
        # walk_packages recurses into subpackages (xml.etree, email.mime, concurrent.futures, ...).
        subs = pkgutil.walk_packages(getattr(module, "__path__", []), f"{top}.", onerror=lambda _: None)
        for info in sorted(subs, key=lambda m: m.name):
            parts = info.name.split(".")[1:]
            if not any(p.startswith("_") or p in SKIP_MODULES for p in parts):
                names.append(info.name)
    return names


def _docstrings(module_name: str):
    """(qualified name, docstring) for a module and the objects defined in it, in sorted order."""
    module = _import_quietly(module_name)
    if module is None:
        return
    yield module_name, inspect.getdoc(module)
    for name in sorted(dir(module)):
        obj = getattr(module, name, None)
        if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
            continue  # re-exports are documented where they are defined
        if inspect.isclass(obj) or inspect.isroutine(obj):
            yield f"{module_name}.{name}", inspect.getdoc(obj)
        if inspect.isclass(obj):
            for attr in sorted(vars(obj)):
                member = vars(obj)[attr]
                if not attr.startswith("_") and inspect.isroutine(member):
                    yield f"{module_name}.{name}.{attr}", inspect.getdoc(member)


def web_documents() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics  # the language reference, as plain text

    docs = [(f"topics/{key}", topics[key].strip()) for key in sorted(topics)]
    for module_name in _module_names():
        docs.extend((f"doc/{qualname}", doc) for qualname, doc in _docstrings(module_name) if doc)
    seen, unique = set(), []
    for key, text in docs:
        # Inherited and aliased objects repeat docstrings; keep the first occurrence only.
        if MIN_CHARS <= len(text) <= MAX_CHARS and text not in seen:
            seen.add(text)
            unique.append((key, text))
    return unique


def code_documents() -> list[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-"))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    docs = []
    for path in sorted(files, key=lambda p: p.relative_to(stdlib).as_posix()):
        rel = path.relative_to(stdlib).as_posix()
        source = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(source)
        except SyntaxError:  # e.g. files kept for 2to3 fixtures
            continue
        lines = source.splitlines(keepends=True)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                text = "".join(lines[start - 1 : node.end_lineno]).rstrip()
                if MIN_CHARS <= len(text) <= MAX_CHARS:
                    docs.append((f"{rel}:{node.name}", text))
    return docs


def stride_to_budget(docs: list[tuple[str, str]], budget: int) -> list[tuple[str, str]]:
    """Every k-th document, with the smallest k that fits the byte budget: spreads the sample over
    the whole stdlib instead of stopping at the first modules in alphabetical order."""
    total = sum(len(text.encode()) for _, text in docs)
    stride = max(1, math.ceil(total / budget))
    while sum(len(t.encode()) for _, t in docs[::stride]) > budget:
        stride += 1
    return docs[::stride]


def write_shards(out: Path, source: str, docs: list[tuple[str, str]], num_shards: int) -> int:
    """Contiguous slices of the document order, one zstd frame per shard; returns bytes written."""
    folder = out / source
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("part-*.jsonl.zst"):
        old.unlink()
    per_shard = math.ceil(len(docs) / num_shards)
    written = 0
    for shard in range(num_shards):
        rows = docs[shard * per_shard : (shard + 1) * per_shard]
        lines = "".join(
            json.dumps({"id": f"{source}/{key}", "text": text, "source": source}, ensure_ascii=False) + "\n"
            for key, text in rows
        )
        data = zstandard.ZstdCompressor(level=19).compress(lines.encode("utf-8"))
        (folder / f"part-{shard:05d}.jsonl.zst").write_bytes(data)
        written += len(data)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/sample", help="output folder")
    parser.add_argument("--shards", type=int, default=4, help="shards per source")
    parser.add_argument("--web-bytes", type=int, default=5_000_000, help="raw UTF-8 budget for web")
    parser.add_argument("--code-bytes", type=int, default=4_000_000, help="raw UTF-8 budget for code")
    args = parser.parse_args()

    out = Path(args.out)
    budgets = {"web": (web_documents, args.web_bytes), "code": (code_documents, args.code_bytes)}
    print(f"{'source':<6} {'docs':>7} {'text MB':>8} {'zst MB':>7}  shards")
    totals = [0, 0, 0]
    for source, (collect, budget) in budgets.items():
        docs = stride_to_budget(collect(), budget)
        raw = sum(len(text.encode()) for _, text in docs)
        compressed = write_shards(out, source, docs, args.shards)
        print(f"{source:<6} {len(docs):>7} {raw / 1e6:>8.2f} {compressed / 1e6:>7.2f}  {args.shards}")
        totals = [totals[0] + len(docs), totals[1] + raw, totals[2] + compressed]
    print(f"{'total':<6} {totals[0]:>7} {totals[1] / 1e6:>8.2f} {totals[2] / 1e6:>7.2f}  -> {out}")


if __name__ == "__main__":
    main()
