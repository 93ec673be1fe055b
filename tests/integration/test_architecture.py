"""What ARCHITECTURE.md promises about the source, checked: no import cycles anywhere in the package
(the import-linter contract in pyproject.toml checks the order of the layers, not cycles inside one),
no module over 500 lines, no function-level import of tensorkeep dodging a cycle, and one place that
tells a URL from a path."""

import os
import re
import sys

import grimp

from support import ROOT

SRC = os.path.join(ROOT, "src", "tensorkeep")


def _modules():
    for d, _, files in os.walk(SRC):
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(d, f)


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.find_modules_directly_imported_by(w)))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycles():
    sys.path.insert(0, os.path.join(ROOT, "src"))
    assert _cycles(grimp.build_graph("tensorkeep", cache_dir=None)) == []


def test_every_module_is_at_most_500_lines():
    long = {os.path.relpath(p, SRC): n for p in _modules() if (n := sum(1 for _ in open(p, encoding="utf-8"))) > 500}
    assert long == {}


def test_no_function_level_imports_of_tensorkeep():
    """Outside docstrings; a lazy import of an optional extra (fsspec) is not one of ours."""
    found = []
    for p in _modules():
        text = re.sub(r'"""[\s\S]*?"""', "", open(p, encoding="utf-8").read())
        found += [
            f"{os.path.relpath(p, SRC)}: {m.strip()}"
            for m in re.findall(r"\n([ \t]+(?:from|import) tensorkeep\S*)", text)
        ]
    # storage imports its fsspec backend on first use: fsspec is the optional [s3] extra
    assert found == ["storage/__init__.py: from tensorkeep.storage.objects"]


def test_urls_are_told_from_paths_in_one_place():
    callers = {
        os.path.relpath(p, SRC)
        for p in _modules()
        if re.search(r"\bis_url\(|\"://\" in|'://' in", open(p, encoding="utf-8").read())
    }
    assert callers <= {"storage/__init__.py"}, callers
