"""NumPy scalars and 0-d arrays in a distributed checkpoint come back as they were saved, whole
(``tk.load``) and into a state (``load_distributed``). Both failed before: a 0-d array was read as
shape (1,), and a scalar into a state raised TypeError ('Ref' object is not subscriptable)."""

import numpy as np
import pytest
import torch

import tensorkeep as tk

VALUES = {
    "float32 scalar": np.float32(1.5),
    "int64 scalar": np.int64(-7),
    "bool scalar": np.bool_(True),
    "0-d array": np.array(2.25),
    "1-d array": np.arange(3, dtype=np.int16),
}


def _same(a, b) -> bool:
    return type(a) is type(b) and np.asarray(a).dtype == np.asarray(b).dtype and np.array_equal(a, b)


@pytest.mark.parametrize("name", VALUES)
def test_numpy_values_round_trip(tmp, name):
    v = VALUES[name]
    tk.save_distributed({"w": torch.ones(2), "v": v, "nested": [v]}, f"{tmp}/ck")
    whole = tk.load(f"{tmp}/ck")
    assert _same(whole["v"], v) and _same(whole["nested"][0], v)
    state = {"w": torch.zeros(2), "v": 0.0, "nested": [None]}
    tk.load_distributed(state, f"{tmp}/ck")
    assert _same(state["v"], v) and _same(state["nested"][0], v) and torch.equal(state["w"], torch.ones(2))
