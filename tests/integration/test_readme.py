"""The README's examples run, in order, as a learner would run them."""

import os
import re
import sys
import types

import pytest

from support import ROOT


def _blocks(name):
    text = open(os.path.join(ROOT, name), encoding="utf-8").read()
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.mark.parametrize("name", ["README.md", "README.zh-CN.md"])
@pytest.mark.slow
def test_readme_examples_run(name, tmp_path, monkeypatch, capsys):
    if not os.path.exists(os.path.join(ROOT, name)):
        pytest.skip(f"{name} not written yet")
    blocks = _blocks(name)
    assert blocks, f"{name} has no python examples"
    monkeypatch.chdir(tmp_path)
    mod = types.ModuleType("__readme__")  # a real module, so torch.save(net) can pickle MLP like in a script
    monkeypatch.setitem(sys.modules, "__readme__", mod)
    ns = mod.__dict__
    for i, code in enumerate(blocks):
        exec(compile(code, f"{name}[block {i}]", "exec"), ns)  # our own README
    out = capsys.readouterr().out
    assert "tensor([0, 1, 2, 3])" in out
