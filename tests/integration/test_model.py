"""load_into, the learner's mistakes and their messages, part-model reuse, save_model/load_model."""

import os
import warnings

import pytest
import torch
from torch import nn

import tensorkeep as tk
import tensorkeep.architecture
from models_for_tests import MLP, MLPFull, MLPPart, TiedLM


@pytest.fixture
def saved(tmp):
    torch.manual_seed(0)
    net = MLP()
    p = os.path.join(tmp, "mlp.params")
    tk.save(net.state_dict(), p)
    return net, p


def _params(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_load_into_identical_outputs(saved):
    net, p = saved
    clone = MLP()
    rep = tk.load_into(clone, p)
    assert rep.ok and sorted(rep.loaded) == sorted(net.state_dict())
    X = torch.randn(2, 20)
    assert torch.equal(clone(X), net(X))
    assert "loaded 4 tensors" in str(rep)


def test_smaller_model_shape_mismatch_message_and_model_untouched(saved):
    _, p = saved
    small = MLP(hidden=128)
    before = _params(small)
    with pytest.raises(tk.MismatchError) as e:
        tk.load_into(small, p)
    msg = str(e.value)
    assert "hidden.weight: checkpoint (256, 20) vs model (128, 20)" in msg
    assert "architecture must match" in msg and "strict=False" in msg
    assert isinstance(e.value, RuntimeError)
    for k, v in small.state_dict().items():
        assert torch.equal(v, before[k]), "strict failure must not touch the model"


def test_ddp_prefix_detected_with_exact_fix(saved, tmp):
    net, _ = saved
    p = os.path.join(tmp, "ddp.params")
    tk.save({"module." + k: v for k, v in net.state_dict().items()}, p)
    with pytest.raises(tk.MismatchError) as e:
        tk.load_into(MLP(), p)
    assert "rename={'module.': ''}" in str(e.value) and "DataParallel" in str(e.value)
    clone = MLP()
    rep = tk.load_into(clone, p, rename={"module.": ""})
    assert rep.ok and torch.equal(clone.hidden.weight, net.hidden.weight)


def test_model_wrapped_but_checkpoint_plain(saved):
    _, p = saved
    wrapped = nn.Module()
    wrapped.module = MLP()
    with pytest.raises(tk.MismatchError) as e:
        tk.load_into(wrapped, p)
    assert "rename={'': 'module.'}" in str(e.value)
    assert tk.load_into(wrapped, p, rename={"": "module."}).ok


def test_compile_prefix_hint(saved, tmp):
    net, _ = saved
    p = os.path.join(tmp, "compiled.params")
    tk.save({"_orig_mod." + k: v for k, v in net.state_dict().items()}, p)
    with pytest.raises(tk.MismatchError, match=r"torch.compile.*rename=\{'_orig_mod.': ''\}"):
        tk.load_into(MLP(), p)


def test_missing_layer_with_suggestion(saved, tmp):
    net, _ = saved
    sd = net.state_dict()
    sd["outptu.weight"] = sd.pop("output.weight")
    p = os.path.join(tmp, "typo.params")
    tk.save(sd, p)
    with pytest.raises(tk.MismatchError) as e:
        tk.load_into(MLP(), p)
    msg = str(e.value)
    assert "missing from the checkpoint" in msg and "output.weight" in msg
    assert "did you mean 'outptu.weight'" in msg


def test_strict_false_partial_load_report(saved):
    net, p = saved
    small = MLP(hidden=128)
    init = _params(small)
    rep = tk.load_into(small, p, strict=False)
    assert rep.loaded == ["output.bias"] and not rep.ok
    assert {n for n, _, _ in rep.mismatched} == {"hidden.weight", "hidden.bias", "output.weight"}
    assert torch.equal(small.output.bias, net.output.bias)
    assert torch.equal(small.hidden.weight, init["hidden.weight"])
    assert "checkpoint (256, 20) vs model (128, 20)" in str(rep)


def test_reuse_part_of_a_model(tmp):
    torch.manual_seed(1)
    full = MLPFull()
    p = os.path.join(tmp, "mlp_full.params")
    tk.save(full.state_dict(), p)
    part = MLPPart()
    rep = tk.load_into(part, p, rename={"hidden.": "hidden1."}, include=["hidden1.", "hidden2."])
    assert rep.ok and set(rep.loaded) == {"hidden1.weight", "hidden1.bias", "hidden2.weight", "hidden2.bias"}
    assert set(rep.skipped) == {"output.weight", "output.bias"}
    X = torch.randn(4, 20)
    expected = full.hidden2(torch.relu(full.hidden(X)))
    assert torch.equal(part(X), expected)
    assert "hidden.weight -> hidden1.weight" in str(rep)


def test_part_model_with_new_head_reports_initial_values(tmp):
    full = MLPFull()
    p = os.path.join(tmp, "full.params")
    tk.save(full.state_dict(), p)
    m = MLP(hidden=256, out=3)  # reuses `hidden`, new 3-class head
    rep = tk.load_into(m, p, include=["hidden."], strict=False)
    assert set(rep.loaded) == {"hidden.weight", "hidden.bias"}
    assert set(rep.missing) == set() and set(rep.skipped) >= {"output.weight"}
    assert set(rep.kept) == {"output.weight", "output.bias"}
    assert "kept their initial values (left out by include) (2): output.weight, output.bias" in str(rep)
    rep = tk.load_into(m, p, strict=False)
    assert {n for n, _, _ in rep.mismatched} == {"output.weight", "output.bias"}
    assert "hidden2.weight" in rep.unexpected


def test_tied_weights_stay_tied(tmp):
    lm = TiedLM()
    p = os.path.join(tmp, "lm.tk")
    tk.save(lm.state_dict(), p)
    other = TiedLM()
    rep = tk.load_into(other, p)
    assert rep.ok
    assert other.head.weight.data_ptr() == other.embed.weight.data_ptr()
    assert torch.equal(other.embed.weight, lm.embed.weight)
    # a checkpoint that stores the tied tensor once (as transformers does) loads strictly too
    sd = lm.state_dict()
    del sd["head.weight"]
    tk.save(sd, p)
    rep = tk.load_into(TiedLM(), p)
    assert rep.ok and rep.tied == ["head.weight"]


def test_dtype_converts_floats_only(saved):
    _, p = saved
    m = nn.Module()
    m.lin = nn.Linear(3, 2)
    m.register_buffer("count", torch.tensor(5))
    sd = {"lin.weight": torch.randn(2, 3), "lin.bias": torch.randn(2), "count": torch.tensor(9)}
    rep = tk.load_into(m, sd, dtype=torch.bfloat16)
    assert m.lin.weight.dtype == torch.bfloat16 and m.count.dtype == torch.int64 and int(m.count) == 9
    assert torch.equal(m.lin.weight, sd["lin.weight"].to(torch.bfloat16))
    assert ("lin.weight", "float32", "bfloat16") in rep.converted


def test_sources_state_dict_open_handle_pt_and_safetensors(saved, tmp):
    from safetensors.torch import save_file

    net, p = saved
    for src in (net.state_dict(), tk.open(p)):
        m = MLP()
        assert tk.load_into(m, src).ok and torch.equal(m.output.weight, net.output.weight)
    pt = os.path.join(tmp, "mlp.pt")
    torch.save(net.state_dict(), pt)
    st = os.path.join(tmp, "mlp.safetensors")
    save_file(net.state_dict(), st)
    for src in (pt, st):
        m = MLP()
        assert tk.load_into(m, src).ok and torch.equal(m.hidden.bias, net.hidden.bias)


def test_chunked_copy_when_dtype_differs(saved, monkeypatch):
    import tensorkeep.model as tm

    monkeypatch.setattr(tm, "_CHUNK_BYTES", 64)  # force many row chunks through get_slice
    net, p = saved
    m = MLP().to(torch.float64)
    tk.load_into(m, p)
    assert m.hidden.weight.dtype == torch.float64
    assert torch.equal(m.hidden.weight, net.hidden.weight.double())


def test_save_model_load_model_round_trip(tmp):
    torch.manual_seed(2)
    net = MLP(hidden=64)
    p = os.path.join(tmp, "mlp.tk")
    tk.save_model(net, p, config={"in_features": 20, "hidden": 64})
    m = tk.load_model(p, allow=["models_for_tests"])
    assert isinstance(m, MLP) and not m.training
    X = torch.randn(3, 20)
    assert torch.equal(m(X), net.eval()(X))
    assert tk.load_model(p, allow=["models_for_tests"], train=True).training


def test_load_model_refuses_module_outside_allow(tmp):
    p = os.path.join(tmp, "mlp.tk")
    tk.save_model(MLP(), p)
    with pytest.raises(tk.UntrustedModelError) as e:
        tk.load_model(p, allow=["myproject"])
    assert "allow=['models_for_tests']" in str(e.value)
    with pytest.raises(tk.UntrustedModelError):
        tk.load_model(p, allow=["models_for"])  # a prefix of the name is not a parent package


def test_save_model_refuses_main_and_local_classes(tmp):
    class Local(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(1, 1)

    with pytest.raises(TypeError, match="inside a function"):
        tk.save_model(Local(), os.path.join(tmp, "x.tk"))
    Main = type("Main", (nn.Module,), {"__module__": "__main__"})
    with pytest.raises(TypeError, match="__main__"):
        tk.save_model(Main(), os.path.join(tmp, "x.tk"))
    assert not os.path.exists(os.path.join(tmp, "x.tk"))


def test_load_model_on_params_only_file_explains(saved):
    _, p = saved
    with pytest.raises(tk.FormatError, match="load_into"):
        tk.load_model(p, allow=["models_for_tests"])


def test_version_mismatch_warns_not_refuses(tmp, monkeypatch):

    p = os.path.join(tmp, "mlp.tk")
    monkeypatch.setattr(
        tensorkeep.architecture, "_versions", lambda: {"torch": "1.8.0", "python": "3.8.0", "tensorkeep": "0.0.1"}
    )
    tk.save_model(MLP(), p)
    monkeypatch.undo()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = tk.load_model(p, allow=["models_for_tests"])
    assert isinstance(m, MLP)
    assert any("torch 1.8.0" in str(x.message) for x in w)


def test_save_model_sharded(tmp):
    net = MLP()
    d = os.path.join(tmp, "mlp-dir")
    tk.save_model(net, d, max_shard_size="15KB")
    assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
    m = tk.load_model(d, allow=["models_for_tests"])
    assert torch.equal(m.hidden.weight, net.hidden.weight)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_load_and_load_into(saved):
    net, p = saved
    sd = tk.load(p, device="cuda:0")
    assert sd["hidden.weight"].is_cuda
    m = MLP().cuda()
    assert tk.load_into(m, p).ok and torch.equal(m.hidden.weight.cpu(), net.hidden.weight)


def test_verify_false_skips_checksums_and_true_catches_damage(saved, tmp):
    net, p = saved
    data = bytearray(open(p, "rb").read())
    data[-3] ^= 0x10  # one bit of output.bias flipped on disk
    bad = os.path.join(tmp, "damaged.params")
    open(bad, "wb").write(bytes(data))
    with pytest.raises(tk.ChecksumError):
        tk.load_into(MLP(), bad)
    m = MLP()
    assert tk.load_into(m, bad, verify=False).ok
    assert torch.equal(m.hidden.weight, net.hidden.weight) and not torch.equal(m.output.bias, net.output.bias)


def test_training_checkpoint_pt_hint_gives_a_working_rename(tmp):
    net = MLP()
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(2, 20)).sum().backward()
    opt.step()
    p = os.path.join(tmp, "train.pt")
    torch.save({"model_state_dict": net.state_dict(), "optimizer_state_dict": opt.state_dict(), "epoch": 3}, p)
    with pytest.raises(tk.MismatchError) as e:
        tk.load_into(MLP(), p)
    msg = str(e.value)
    fix = "rename={'model_state_dict.': '', 'optimizer_state_dict.': None}"
    assert "training checkpoint" in msg and fix in msg
    assert "hidden.bias  (did you mean 'model_state_dict.hidden.bias'?)" in msg
    m = MLP()
    rep = tk.load_into(m, p, rename={"model_state_dict.": "", "optimizer_state_dict.": None})
    assert rep.ok and torch.equal(m.output.weight, net.output.weight)
    m = MLP()  # the nested dict itself works the same way
    assert tk.load_into(m, {"model": net.state_dict(), "epoch": 3}, rename={"model.": ""}).ok
    assert torch.equal(m.hidden.bias, net.hidden.bias)


def test_rename_collision_is_an_error_not_a_silent_overwrite():
    def pair():
        m = nn.Module()
        m.a, m.b = nn.Linear(4, 4), nn.Linear(4, 4)
        return m

    src = pair()
    with pytest.raises(ValueError, match=r"maps both 'a.weight' and 'b.weight' to 'b.weight'") as e:
        tk.load_into(pair(), src.state_dict(), rename={"a.": "b."}, strict=False)
    assert "'b.weight': None" in str(e.value)
    assert tk.load_into(
        pair(), src.state_dict(), rename={"a.": "b."}, include=["a."], strict=False
    ).kept  # excluded: no clash
    m = pair()
    init = _params(m)
    rep = tk.load_into(m, src.state_dict(), rename={"a.": "b.", "b.": None}, strict=False)
    assert rep.loaded == ["b.weight", "b.bias"] and rep.missing == ["a.weight", "a.bias"] and not rep.unexpected
    assert torch.equal(m.b.weight, src.a.weight) and torch.equal(m.a.weight, init["a.weight"])


def test_float_into_integer_buffer_refused_not_truncated():
    m = nn.Module()
    m.register_buffer("count", torch.tensor(0))
    m.lin = nn.Linear(2, 2)
    sd = {"count": torch.tensor(2.7), "lin.weight": torch.ones(2, 2, dtype=torch.float64), "lin.bias": torch.zeros(2)}
    with pytest.raises(tk.MismatchError, match=r"count: checkpoint float32 vs model int64"):
        tk.load_into(m, sd)
    assert int(m.count) == 0 and not torch.equal(m.lin.weight, torch.ones(2, 2))
    rep = tk.load_into(m, sd, strict=False)
    assert int(m.count) == 0 and rep.wrong_dtype == [("count", "float32", "int64")]
    assert ("lin.weight", "float64", "float32") in rep.converted and torch.equal(m.lin.weight, torch.ones(2, 2))
    assert "floating-point into integer (1): count: checkpoint float32 vs model int64" in str(rep)
    with pytest.raises(TypeError, match="floating-point torch dtype"):
        tk.load_into(m, sd, dtype=torch.int8)


def test_save_model_checks_config_against_constructor(tmp):
    with pytest.raises(TypeError, match=r"MLP\(\*\*config\), which would fail.*hiden"):
        tk.save_model(MLP(), os.path.join(tmp, "x.tk"), config={"hiden": 256})
    assert not os.path.exists(os.path.join(tmp, "x.tk"))
