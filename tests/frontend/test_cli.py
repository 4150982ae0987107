"""``robop-prune`` end to end: a tiny Llama folder in, a pruned checkpoint and its report out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from robop_lightning.assets import is_available
from robop_lightning.cli import calibration_windows, main
from tests.script_loader import load_script


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny Llama with its own BPE tokenizer, saved as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("tiny")
    tok = load_script("recipes/llama_alps.py").bpe_tokenizer("pydoc_topics", vocab_size=256)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.bos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_windows_are_drawn_with_bos_first_and_reproducibly(tiny_folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_folder)
    a = calibration_windows(tok, "pydoc_topics", 6, 16, seed=1)
    b = calibration_windows(tok, "pydoc_topics", 6, 16, seed=1)
    assert a.shape == (6, 16) and torch.equal(a, b) and bool((a[:, 0] == tok.bos_token_id).all())
    assert not torch.equal(a, calibration_windows(tok, "pydoc_topics", 6, 16, seed=2))
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_windows(tok, ["a few words"], 2, 4096)


def test_prune_and_save_from_the_command_line(tiny_folder, tmp_path):
    out = tmp_path / "pruned"
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"def f{i}(x): return x + {i}" for i in range(400)))
    report = main(["--model", str(tiny_folder), "--calibration", str(text), "--samples", "8", "--seqlen", "32",
                   "--batch_size", "4", "--sparsity", "0.5", "--set", "trace", "--output", str(out)])
    assert report.config["solver"] == "alps" and report.config["uncertainty"] == "trace"  # the LLM default
    saved = json.loads((out / "robop_report.json").read_text())
    assert saved["totals"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    model = AutoModelForCausalLM.from_pretrained(out)
    w = model.model.layers[1].mlp.down_proj.weight
    assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)
    assert (out / "tokenizer.json").exists()
    with pytest.raises(SystemExit, match="exists and is not empty"):  # never overwritten by accident
        main(["--model", str(tiny_folder), "--calibration", str(text), "--samples", "4", "--seqlen", "32",
              "--output", str(out)])


def test_yaml_config_and_the_module_entry_point(tiny_folder, tmp_path):
    out = tmp_path / "pruned24"
    config = tmp_path / "recipe.yaml"
    config.write_text(f"model: {tiny_folder}\ncalibration: pydoc_topics\nsamples: 4\nseqlen: 32\n"
                      f"pattern: '2:4'\nsparsity: null\nsolver: sparsegpt\nset: baseline\noutput: {out}\n")
    done = subprocess.run([sys.executable, "-m", "robop_lightning", "--config", str(config), "--seed", "3"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    saved = json.loads((out / "robop_report.json").read_text())
    assert saved["config"]["pattern"] == "2:4" and saved["config"]["seed"] == 3
    w = AutoModelForCausalLM.from_pretrained(out).model.layers[0].self_attn.q_proj.weight
    assert bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all())
    helped = subprocess.run([sys.executable, "-m", "robop_lightning", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert helped.returncode == 0 and "--calibration" in helped.stdout and "--format" in helped.stdout


@pytest.mark.slow
@pytest.mark.skipif(not is_available("gemma3-270m"), reason="python -m robop_lightning.assets fetch gemma3-270m")
def test_the_embedded_gemma_from_the_command_line(tmp_path):
    out = tmp_path / "gemma"
    report = main(["--model", "embedded", "--calibration", "pydoc_topics", "--samples", "8", "--seqlen", "64",
                   "--solver", "sparsegpt", "--set", "baseline", "--output", str(out)])
    assert report.totals["sparsity"] == pytest.approx(0.5, abs=1e-3) and report.totals["layers"] == 18 * 7
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.float32
