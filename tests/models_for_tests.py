"""Importable model classes for save_model / load_model tests."""

from torch import nn
from torch.nn import functional as F


class MLP(nn.Module):
    def __init__(self, in_features: int = 20, hidden: int = 256, out: int = 10):
        super().__init__()
        self.hidden = nn.Linear(in_features, hidden)
        self.output = nn.Linear(hidden, out)

    def forward(self, x):
        return self.output(F.relu(self.hidden(x)))


class MLPFull(nn.Module):
    """input -> hidden -> hidden2 -> output, for the reuse-part-of-a-model recipe."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(20, 256)
        self.hidden2 = nn.Linear(256, 128)
        self.output = nn.Linear(128, 10)

    def forward(self, x):
        return self.output(F.relu(self.hidden2(F.relu(self.hidden(x)))))


class MLPPart(nn.Module):
    """The first two layers of MLPFull, under new names."""

    def __init__(self):
        super().__init__()
        self.hidden1 = nn.Linear(20, 256)
        self.hidden2 = nn.Linear(256, 128)

    def forward(self, x):
        return self.hidden2(F.relu(self.hidden1(x)))


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.BatchNorm1d(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
