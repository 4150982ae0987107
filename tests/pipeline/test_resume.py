"""robop_lightning.pipeline.resume: resume after SIGKILL / Ctrl-C, damaged files, another job's directory, atomic files."""

from __future__ import annotations

import copy
import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from robop_lightning.pipeline.prune import prune_model
from tests.engine_helpers import state

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
LAYERS = 4  # blocks of the resumable job
PER_BLOCK = 7  # q, k, v, o, gate, up, down


# --------------------------------------------------------------------------- the job
def llama_job() -> tuple[LlamaForCausalLM, list[dict[str, torch.Tensor]]]:
    """A tiny Hugging Face Llama with LAYERS blocks and its calibration batches (fixed seeds)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 64, (4, 16), generator=g)} for _ in range(4)]
    return model, batches


JOB = dict(sparsity=0.5, solver="cap", uncertainty="cvar", progress=False)


def child_script(resume: Path) -> str:
    """The child of the SIGKILL test: the same job, with only torch, transformers and the library imported."""
    return "\n".join(
        [
            "import torch",
            "from transformers import LlamaConfig, LlamaForCausalLM",
            "from robop_lightning.pipeline.prune import prune_model",
            "torch.set_num_threads(1)  # the parent runs on one thread too: the same kernels, the same bits",
            f"LAYERS = {LAYERS}",
            inspect.getsource(llama_job),
            "model, batches = llama_job()",
            f"prune_model(model, batches, resume_dir={str(resume)!r}, **{JOB!r})",
            "print('finished', flush=True)",
        ]
    )


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted run of the job (no resume_dir): the dense state, the pruned state, the report."""
    model, batches = llama_job()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    report = prune_model(model, batches, **JOB)
    return dense, {k: v.clone() for k, v in model.state_dict().items()}, report


def assert_same_result(model: nn.Module, report, reference) -> None:
    """Every tensor of the model and every mask bit-identical to the uninterrupted run's."""
    _, pruned, ref_report = reference
    after = model.state_dict()
    assert after.keys() == pruned.keys()
    for key, value in pruned.items():
        assert torch.equal(after[key], value), key
    assert report.masks.keys() == ref_report.masks.keys()
    for name, mask in ref_report.masks.items():
        assert report.masks[name].dtype == torch.bool and torch.equal(report.masks[name], mask), name
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(report.layers) == strip(ref_report.layers)
    assert report.config == ref_report.config


def manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


# --------------------------------------------------------------------------- resume
def test_sigkilled_subprocess_resumes_to_the_uninterrupted_result(tmp_path, request):
    """A real child process is SIGKILLed after two blocks; the rerun continues and matches bit for bit."""
    resume = tmp_path / "resume"
    script = tmp_path / "child.py"
    script.write_text(child_script(resume))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen(
        [sys.executable, str(script)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    killed: list[int] = []

    def kill_after_two_blocks() -> None:
        deadline = time.monotonic() + 120
        while child.poll() is None and time.monotonic() < deadline:
            if len(list(resume.glob("block-*.safetensors"))) >= 2:
                child.send_signal(signal.SIGKILL)
                killed.append(len(list(resume.glob("block-*.safetensors"))))
                return
            time.sleep(0.005)

    watcher = threading.Thread(target=kill_after_two_blocks)
    watcher.start()
    try:
        reference = request.getfixturevalue("reference")  # computed while the child starts up
        watcher.join(timeout=150)
        out, err = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert killed, f"the child was not killed mid-run (exit {child.returncode}): {err[-2000:]}"
    assert child.returncode == -signal.SIGKILL and "finished" not in out and killed[0] < LAYERS
    done = [e["unit"] for e in manifest(resume)["finished"]]
    assert 1 <= len(done) < LAYERS and done == [f"model.layers.{i}" for i in range(len(done))]

    model, batches = llama_job()
    report = prune_model(model, batches, resume_dir=resume, **JOB)
    assert len(report.resumed) == PER_BLOCK * len(done)  # the finished blocks were loaded, not redone
    assert report.resumed == [r["name"] for r in report.layers[: len(report.resumed)]]
    assert_same_result(model, report, reference)
    assert sorted(p.name for p in resume.iterdir()) == [
        *(f"block-{i:05d}.safetensors" for i in range(LAYERS)), "manifest.json"
    ]  # no temporary file left behind

    # a third call on a fresh dense model finds everything finished: nothing is pruned or replayed
    model, batches = llama_job()
    calls = []
    model.model.layers[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    report = prune_model(model, batches, resume_dir=resume, **JOB)
    assert len(report.resumed) == PER_BLOCK * LAYERS and calls == []
    assert_same_result(model, report, reference)


def test_ctrl_c_inside_a_block_restores_the_model_and_resumes(tmp_path, reference):
    resume = tmp_path / "resume"
    model, batches = llama_job()
    dense = state(model)

    def ctrl_c(module, args):  # the user presses Ctrl-C while block 2 is being calibrated
        raise KeyboardInterrupt

    handle = model.model.layers[2].mlp.down_proj.register_forward_pre_hook(ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        prune_model(model, batches, resume_dir=resume, **JOB)
    handle.remove()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in dense.items())  # every weight as it was
    assert [e["unit"] for e in manifest(resume)["finished"]] == ["model.layers.0", "model.layers.1"]
    assert not list(resume.glob(".*.tmp"))

    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: calls.append(1))
    report = prune_model(model, batches, resume_dir=resume, **JOB)
    assert report.resumed == [r["name"] for r in report.layers[: 2 * PER_BLOCK]]
    # block 0 was loaded and only replayed once per batch (an uninterrupted run calls it twice:
    # once to capture its linears' inputs, once to propagate its pruned outputs)
    assert len(calls) == len(batches)
    rows = {r["name"]: r for r in manifest(resume)["finished"][0]["layers"]}
    assert all(r["seconds"] == rows[r["name"]]["seconds"] for r in report.layers[:PER_BLOCK])
    assert_same_result(model, report, reference)


def test_a_damaged_block_file_is_recomputed(tmp_path, reference):
    resume = tmp_path / "resume"
    model, batches = llama_job()
    prune_model(model, batches, resume_dir=resume, **JOB)
    block = resume / "block-00003.safetensors"
    data = bytearray(block.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in a weight
    block.write_bytes(bytes(data))
    model, batches = llama_job()
    with pytest.warns(RuntimeWarning, match="block-00003.safetensors is missing or damaged"):
        report = prune_model(model, batches, resume_dir=resume, **JOB)
    assert len(report.resumed) == 3 * PER_BLOCK  # blocks 0-2 loaded, 3 recomputed
    assert_same_result(model, report, reference)


# --------------------------------------------------------------------------- atomicity
def test_resume_dir_of_another_job_is_refused_and_left_untouched(tmp_path):
    resume = tmp_path / "resume"
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=4).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(2)]
    job = dict(solver="wanda", uncertainty="baseline", progress=False)
    prune_model(copy.deepcopy(vit), batches, resume_dir=resume, **job)
    files = {p.name: p.read_bytes() for p in resume.iterdir()}
    before = state(vit)

    other_data = [b + 1 for b in batches]
    other_weights = copy.deepcopy(vit)
    with torch.no_grad():
        other_weights.blocks[0].norm1.weight.add_(1)  # not even a target: the activations change
    for model, data, kwargs, differs in [
        (vit, batches, {**job, "sparsity": 0.6}, "arguments"),
        (vit, other_data, job, "calibration batches"),
        (other_weights, batches, job, "model weights"),
        (vit, batches, {**job, "ignore": ["blocks.1"]}, "targets"),
    ]:
        with pytest.raises(ValueError, match=f"belongs to another pruning job: its {differs} differ") as info:
            prune_model(model, data, resume_dir=resume, **kwargs)
        assert "new resume_dir" in str(info.value) and "delete" in str(info.value)
    assert all(torch.equal(vit.state_dict()[k], v) for k, v in before.items())
    assert {p.name: p.read_bytes() for p in resume.iterdir()} == files
    with pytest.raises(ValueError, match="is a file"):
        prune_model(vit, batches, resume_dir=resume / "manifest.json", **job)
    (resume / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json is unreadable"):
        prune_model(vit, batches, resume_dir=resume, **job)


def test_files_are_replaced_never_rewritten_in_place(tmp_path):
    """A hard link to the old manifest / report keeps the old bytes: the new file is a new inode."""
    resume = tmp_path / "resume"
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    xs = [torch.randn(8, 8) for _ in range(2)]
    dense = copy.deepcopy(mlp)

    def fail_on_second_layer(module, args):  # once the first layer is pruned, not in the first forwards
        if bool((mlp[0].weight == 0).any()):
            raise RuntimeError("disk on fire")

    handle = mlp[2].register_forward_pre_hook(fail_on_second_layer)
    with pytest.raises(RuntimeError, match="disk on fire"):
        prune_model(mlp, xs, solver="sparsegpt", uncertainty="baseline", resume_dir=resume, progress=False)
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(mlp.state_dict().values(), dense.state_dict().values()))
    old = (resume / "manifest.json").read_bytes()
    os.link(resume / "manifest.json", tmp_path / "old-manifest")
    assert [e["file"] for e in json.loads(old)["finished"]] == ["layer-00000.safetensors"]  # no blocks: per layer

    report = prune_model(mlp, xs, solver="sparsegpt", uncertainty="baseline", resume_dir=resume, progress=False)
    assert report.resumed == ["0"] and [r["name"] for r in report.layers] == ["0", "2", "4"]
    assert (tmp_path / "old-manifest").read_bytes() == old  # the old file object was never written to
    assert [e["unit"] for e in manifest(resume)["finished"]] == ["0", "2", "4"]
    ref = copy.deepcopy(dense)
    ref_report = prune_model(ref, xs, solver="sparsegpt", uncertainty="baseline", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(mlp.state_dict().values(), ref.state_dict().values()))

    out = tmp_path / "report.json"
    ref_report.to_json(out)
    os.link(out, tmp_path / "old-report")
    report.to_json(out)
    assert (tmp_path / "old-report").read_bytes() != out.read_bytes()  # seconds differ: a new file
    assert json.loads((tmp_path / "old-report").read_text()) == json.loads(json.dumps(ref_report.to_dict()))
    assert not list(tmp_path.glob(".*.tmp")) and not list(resume.glob(".*.tmp"))


# --------------------------------------------------------------------------- the callback's resume_dir
def test_callback_resume_dir_continues_an_interrupted_validate(tmp_path):
    """RobOPCallback(resume_dir=...): a failed run leaves the module dense, a rerun resumes to the same masks."""
    import lightning.pytorch as pl

    from robop_lightning.callback import RobOPCallback
    from tests.frontend.test_callback import BlobData, Classifier, _trainer

    made = []

    def run(resume_dir, fail: bool = False):
        pl.seed_everything(0, verbose=False)
        model = Classifier("vit")
        dense = state(model)
        made.append((model, dense))
        robop = RobOPCallback(
            solver="sparsegpt", uncertainty="cvar", calibration_batches=4, resume_dir=resume_dir,
            progress=False, verbose=False,
        )
        if fail:
            def crash(module, args):
                raise RuntimeError("node lost")

            model.net.blocks[1].mlp.fc2.register_forward_pre_hook(crash)
        _trainer(tmp_path, [robop]).validate(model, datamodule=BlobData("vit", n=32, batch_size=4), verbose=False)
        return model, robop, dense

    with pytest.raises(RuntimeError, match="node lost"):
        run(tmp_path / "resume", fail=True)
    failed, dense = made[0]
    assert all(torch.equal(failed.state_dict()[k], v) for k, v in dense.items())  # left dense
    assert [e["unit"] for e in manifest(tmp_path / "resume" / "start")["finished"]] == ["net.blocks.0"]
    model, robop, _ = run(tmp_path / "resume")
    assert robop.reports[0].resumed == [f"net.blocks.0.{n}" for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    ref_model, ref, _ = run(None)
    assert list(robop.masks) == list(ref.masks) and len(ref.masks) == 8
    assert all(torch.equal(robop.masks[n], ref.masks[n]) for n in ref.masks)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref_model.state_dict().values()))
    with pytest.raises(ValueError, match="resume_dir must be a directory path"):
        RobOPCallback(resume_dir=3)
