"""Shipping a pruned model (robop_lightning.export): Hugging Face and compressed-tensors round trips,
the atomic new-directory rule, and the 2:4 semi-structured swap (refused cleanly without a GPU)."""

from __future__ import annotations

import doctest
import json
import sys

import pytest
import torch
from torch import nn

from robop_lightning import export
from robop_lightning.export import is_two_four, load_pruned, save_pruned, to_semi_structured
from robop_lightning.pipeline.prune import prune_model
from tests.engine_helpers import MLP, state, tiny_llama, token_batches

pytestmark = pytest.mark.usefixtures("one_thread")


def _pruned_llama(pattern: str = "unstructured", dtype: torch.dtype = torch.float32):
    model = tiny_llama().to(dtype)
    sparsity = None if pattern == "2:4" else 0.5
    report = prune_model(model, token_batches(vocab=128), sparsity=sparsity, pattern=pattern, solver="sparsegpt",
                         uncertainty="baseline", progress=False)
    return model, report


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _weights_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _layer_bytes(path, names) -> int:
    """Bytes of the tensors stored for the layers ``names`` (their weight, or its sparse encoding)."""
    from safetensors.torch import load_file

    tensors = {k: v for f in path.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    return sum(v.numel() * v.element_size() for k, v in tensors.items() if k.rsplit(".", 1)[0] in names)


def _compressed_tensors():
    return pytest.importorskip("compressed_tensors.compressors.sparse_compressors",
                               reason='needs compressed-tensors 0.10 - 0.13: pip install "robop-lightning[export]"')


# --------------------------------------------------------------------------- "hf"
@pytest.mark.parametrize("pattern,dtype", [("unstructured", torch.float32), ("2:4", torch.bfloat16)])
def test_hf_round_trip_keeps_the_weights_the_dtype_and_records_the_sparsity(tmp_path, pattern, dtype):
    from transformers import AutoModelForCausalLM

    model, report = _pruned_llama(pattern, dtype)
    before = state(model)
    out = save_pruned(model, tmp_path / "ckpt", report=report)
    assert _same(state(model), before) and not hasattr(model.config, "robop")  # the model is left as it was
    again = AutoModelForCausalLM.from_pretrained(out)
    assert again.dtype == dtype  # a bf16 model pruned in float32 arithmetic is saved, and reloads, as bf16
    assert _same(state(again), before)
    entry = json.loads((out / "config.json").read_text())["robop"]
    assert entry["format"] == "hf" and again.config.robop["measured"] == entry["measured"]
    assert entry["pruning"] == {"pattern": pattern, "sparsity": 0.5, "solver": "sparsegpt",
                                "uncertainty": "baseline", "radius": None}
    measured = entry["measured"]
    assert measured["layers"] == len(report.masks) == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    assert measured["sparsity"] == pytest.approx(0.5, abs=0.01) and measured["two_four"] == (pattern == "2:4")
    assert not [p for p in tmp_path.iterdir() if p.name != "ckpt"]  # no temporary sibling left behind


def test_a_plain_module_is_saved_as_a_state_dict_and_a_json(tmp_path):
    torch.manual_seed(0)
    net = MLP()
    report = prune_model(net, [torch.randn(32, 16)], sparsity=0.5, solver="sparsegpt", uncertainty="baseline",
                         progress=False)
    out = save_pruned(net, tmp_path / "mlp", report=report)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "robop.json"]
    entry = json.loads((out / "robop.json").read_text())["robop"]
    assert entry["measured"]["layers"] == 2 and entry["measured"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert _same(state(load_pruned(out, MLP)), state(net))
    with pytest.raises(ValueError, match="pass the model"):
        load_pruned(out)
    pickled = save_pruned(net, tmp_path / "pickled", report=report, safe_serialization=False)
    assert sorted(p.name for p in pickled.iterdir()) == ["pytorch_model.bin", "robop.json"]
    assert _same(state(load_pruned(pickled, MLP)), state(net))
    with pytest.raises(ValueError, match="safe_serialization=True"):
        save_pruned(net, tmp_path / "ct", format="compressed-tensors", safe_serialization=False)


# --------------------------------------------------------------------------- "compressed-tensors"
@pytest.mark.parametrize("pattern,fmt", [("unstructured", "sparse-bitmask"), ("2:4", "sparse-24-bitmask")])
def test_compressed_tensors_round_trip_is_lossless_and_smaller(tmp_path, pattern, fmt):
    _compressed_tensors()
    model, report = _pruned_llama(pattern)
    before = state(model)
    dense = save_pruned(tiny_llama(), tmp_path / "dense")
    out = save_pruned(model, tmp_path / "ct", format="compressed-tensors", report=report)
    assert _same(state(model), before)
    config = json.loads((out / "config.json").read_text())
    sparsity_config = config["quantization_config"]["sparsity_config"]
    assert sparsity_config["format"] == fmt and sparsity_config["targets"] == sorted(report.masks)
    assert sparsity_config["global_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert config["robop"]["format"] == "compressed-tensors"
    # Measured on this tiny float32 Llama, whose embedding and head (8k of its 27k weights) stay dense: the file
    # is 83,128 of 109,248 bytes at 50 % (0.76) and 77,648 at 2:4 (0.71); the pruned linears' own tensors take
    # 43,264 and 39,168 of 73,728 bytes (0.59 and 0.53: half the values, 1 bit of mask per weight, and at 50 %
    # an 8-byte row offset per row). On an 8B model, where the linears are 95 % of the weights, the file follows
    # the linears' ratio.
    ratio = _weights_bytes(out) / _weights_bytes(dense)
    assert ratio < (0.78 if pattern == "2:4" else 0.8), ratio
    linears = _layer_bytes(out, report.masks) / _layer_bytes(dense, report.masks)
    assert linears < (0.55 if pattern == "2:4" else 0.6), linears
    again = load_pruned(out)
    assert again.dtype == torch.float32 and not hasattr(again.config, "quantization_config")
    assert _same(state(again), before)
    ids = token_batches(vocab=128)[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_compressed_tensors_keeps_bf16_and_finds_the_pruned_linears_without_a_report(tmp_path):
    _compressed_tensors()
    model, report = _pruned_llama("2:4", torch.bfloat16)
    out = save_pruned(model, tmp_path / "ct", format="compressed-tensors")  # no report: linears >= 40 % zeros
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["sparsity_config"]["targets"] == sorted(report.masks)
    assert "pruning" not in config["robop"] and config["robop"]["measured"]["two_four"]
    again = load_pruned(out)
    assert again.dtype == torch.bfloat16 and _same(state(again), state(model))


def test_compressed_tensors_for_a_plain_module(tmp_path):
    _compressed_tensors()
    torch.manual_seed(0)
    net = MLP(n_in=16, hidden=64)
    report = prune_model(net, [torch.randn(32, 16)], sparsity=0.5, solver="magnitude", progress=False)
    out = save_pruned(net, tmp_path / "mlp", format="compressed-tensors", report=report)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "robop.json"]
    assert _same(state(load_pruned(out, lambda: MLP(n_in=16, hidden=64))), state(net))


def test_a_missing_compressed_tensors_names_the_extra(tmp_path, monkeypatch):
    for name in [n for n in sys.modules if n.split(".")[0] == "compressed_tensors"] + ["compressed_tensors"]:
        monkeypatch.setitem(sys.modules, name, None)  # importing it (or any of its modules) -> ImportError
    model, report = _pruned_llama()
    with pytest.raises(ImportError, match=r'pip install "robop-lightning\[export\]"'):
        save_pruned(model, tmp_path / "ct", format="compressed-tensors", report=report)
    assert not tmp_path.joinpath("ct").exists()


# --------------------------------------------------------------------------- a new directory, all or nothing
def test_an_existing_directory_is_refused_unless_overwrite(tmp_path):
    model, report = _pruned_llama()
    target = tmp_path / "ckpt"
    target.mkdir()
    save_pruned(model, target, report=report)  # an empty directory is fine
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        save_pruned(model, target, report=report)
    assert (target / "notes.txt").read_text() == "mine"
    save_pruned(model, target, report=report, overwrite=True)
    assert not (target / "notes.txt").exists() and (target / "config.json").exists()
    with pytest.raises(FileExistsError, match="is a file"):
        save_pruned(model, target / "config.json", report=report)
    with pytest.raises(ValueError, match="format is"):
        save_pruned(model, tmp_path / "other", format="gguf")


@pytest.mark.parametrize("existing", [False, True])
def test_an_interrupted_save_leaves_no_partial_directory(tmp_path, monkeypatch, existing):
    model, report = _pruned_llama()
    target = tmp_path / "ckpt"
    if existing:
        target.mkdir()
        (target / "old.txt").write_text("the previous checkpoint")
    real = model.save_pretrained

    def dies_halfway(path, **kwargs):
        real(path, **kwargs)  # everything written ...
        raise OSError("No space left on device")  # ... then the disk fills up

    monkeypatch.setattr(model, "save_pretrained", dies_halfway)
    with pytest.raises(OSError, match="No space left"):
        save_pruned(model, target, report=report, overwrite=existing)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["ckpt"] if existing else [])
    if existing:
        assert [p.name for p in target.iterdir()] == ["old.txt"]  # the old checkpoint is untouched

    monkeypatch.setattr(export, "save_model", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_pruned(MLP(), tmp_path / "mlp")
    assert not (tmp_path / "mlp").exists() and len(list(tmp_path.iterdir())) == (1 if existing else 0)


# --------------------------------------------------------------------------- 2:4 semi-structured kernels
def _two_four_layer(out_f: int = 64, in_f: int = 64, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_f, out_f)
    with torch.no_grad():
        groups = layer.weight.view(-1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.abs().topk(2, dim=1).indices, True)
        groups.mul_(keep)
    return layer


def test_to_semi_structured_refuses_a_layer_that_is_not_two_four():
    model = nn.Sequential(_two_four_layer(), nn.ReLU(), nn.Linear(64, 64))
    with pytest.raises(ValueError, match=r"^2: its weight is not 2:4 sparse \(row 0, columns 0\.\.3 hold 4 non-zeros"):
        to_semi_structured(model, names=["0", "2"])
    with pytest.raises(ValueError, match="not an nn.Linear"):
        to_semi_structured(model, names=["1"])
    with pytest.raises(ValueError, match="no nn.Linear of the model holds a 2:4-sparse weight"):
        to_semi_structured(nn.Sequential(nn.Linear(8, 8)))
    assert not is_two_four(torch.ones(2, 6)) and is_two_four(model[0].weight)


def test_to_semi_structured_refuses_cleanly_without_a_gpu():
    model = nn.Sequential(_two_four_layer())
    weight = model[0].weight.detach().clone()
    with pytest.raises(RuntimeError) as info:
        to_semi_structured(model)  # the weights are on the CPU (and float32), whatever the machine has
    message = str(info.value)
    for needed in ("CUDA GPU of compute capability 8.0+", "float16 / bfloat16", "multiples of 16"):
        assert needed in message
    assert "no CUDA device" in message or "0 is on cpu" in message
    assert type(model[0].weight) is nn.Parameter and torch.equal(model[0].weight, weight)  # left as it was


def test_the_module_examples_run():
    result = doctest.testmod(export, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
                    reason="needs a CUDA GPU of compute capability 8.0+")
def test_to_semi_structured_runs_on_the_gpu_close_to_the_dense_masked_layers():
    model = nn.Sequential(_two_four_layer(128, 256, seed=1), nn.ReLU(), _two_four_layer(64, 128, seed=2))
    model = model.to("cuda", torch.bfloat16).eval()
    x = torch.randn(4, 32, 256, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        dense = model(x)
    assert to_semi_structured(model) == ["0", "2"]
    assert isinstance(model[0].weight, torch.sparse.SparseSemiStructuredTensor)
    with torch.inference_mode():
        sparse = model(x)
    assert sparse.shape == dense.shape
    assert float((sparse.float() - dense.float()).abs().max()) <= 0.02 * float(dense.float().abs().max())
    assert to_semi_structured(model, names=["0"]) == []  # already swapped: nothing to do


def test_a_shrunk_model_is_refused_with_what_to_use_instead(tmp_path):
    from robop_lightning.pipeline.prune import prune_model
    from tests.engine_helpers import tiny_llama, token_batches

    model = tiny_llama()
    prune_model(model, token_batches(), sparsity=0.5, pattern="structured", progress=False)
    with pytest.raises(ValueError, match="save_structured"):
        save_pruned(model, tmp_path / "shrunk")
    assert not (tmp_path / "shrunk").exists()
