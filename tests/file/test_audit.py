"""The loading audit itself: it sees a real unpickling, and tensorkeep's loads trigger none."""

import os
import pickle
import subprocess
import sys

import torch

import tensorkeep as tk
from support import TESTS_DIR


def test_audit_hook_would_catch_an_unsafe_load(tmp):
    code = f"""
import sys, pickle, os
sys.path.insert(0, {TESTS_DIR!r})
import conftest
from tensorkeep.file.audit import audited
audited(lambda: pickle.loads(pickle.dumps(os.path.join)))()  # find_class runs, as if inside a read
print(conftest._events)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "pickle.find_class" in out


def test_loads_of_every_kind_raise_no_audit_event(tmp, audit_events):
    sd = {"w": torch.randn(3, 3)}
    paths = {"tk": os.path.join(tmp, "a.tk"), "pt": os.path.join(tmp, "a.pt")}
    tk.save(sd, paths["tk"])
    torch.save(sd, paths["pt"])
    for p in paths.values():
        tk.load(p)
        tk.load(p, lazy=True)
        with tk.open(p) as f:
            f.get("w")
    evil = os.path.join(tmp, "evil.pt")
    with open(evil, "wb") as f:
        pickle.dump({"x": os.system}, f, protocol=2)
    try:
        tk.load(evil)
    except tk.FormatError:
        pass
    assert audit_events == []
