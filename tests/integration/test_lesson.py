"""The classic lesson's flows, exactly as a learner types them."""

import torch
from torch import nn
from torch.nn import functional as F

import tensorkeep as tk


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(20, 256)
        self.output = nn.Linear(256, 10)

    def forward(self, x):
        return self.output(F.relu(self.hidden(x)))


def test_one_tensor(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x = torch.arange(4)
    tk.save(x, "x-file")
    x2 = tk.load("x-file")
    assert torch.equal(x2, x) and x2.dtype == x.dtype


def test_list_of_tensors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x, y = torch.arange(4), torch.zeros(4)
    tk.save([x, y], "x-files")
    x2, y2 = tk.load("x-files")
    assert torch.equal(x2, x) and torch.equal(y2, y)


def test_dict_with_chinese_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x, y = torch.arange(4), torch.zeros(4)
    mydict = {"第一个张量": x, "第二个张量": y}
    tk.save(mydict, "mydict")
    mydict2 = tk.load("mydict")
    assert list(mydict2) == ["第一个张量", "第二个张量"]
    assert torch.equal(mydict2["第一个张量"], x)


def test_mlp_params(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net = MLP()
    X = torch.randn(size=(2, 20))
    Y = net(X)
    tk.save(net.state_dict(), "mlp.params")
    clone = MLP()
    clone.load_state_dict(tk.load("mlp.params"))
    clone.eval()
    assert (clone(X) == Y).all()
