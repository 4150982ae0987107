"""``robop_lightning.robustness.harness.lm_eval`` on an offline task file: lm-eval scores the model in memory."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

pytest.importorskip("lm_eval")

from robop_lightning.robustness.harness import lm_eval  # noqa: E402
from tests.script_loader import load_script  # noqa: E402

DOCS = [
    {"question": "def add(a, b): return a", "choices": ["+ b", "* b", "- b"], "label": 0},
    {"question": "import os\nos.path.", "choices": ["join", "banana", "zzz"], "label": 0},
    {"question": "for i in", "choices": ["range(3):", "while", "%%%"], "label": 0},
    {"question": "class Foo", "choices": ["(object):", "??", "1 2 3"], "label": 0},
    {"question": "if x is", "choices": ["None:", "##", "qq"], "label": 0},
    {"question": "return", "choices": ["value", "!!!", ")))"], "label": 0},
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    (d / "toy.jsonl").write_text("\n".join(json.dumps(doc) for doc in DOCS) + "\n")
    (d / "toy.yaml").write_text(
        "task: robop_toy\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {d / 'toy.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n")
    return d


@pytest.fixture(scope="module")
def tiny():
    tok = load_script("recipes/llama_alps.py").bpe_tokenizer("pydoc_topics", vocab_size=256)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval(), tok


def _manual_acc(model, tok) -> float:
    """Accuracy by the rule lm-eval documents: the choice with the largest summed log-likelihood of
    its tokens after the question (whole string encoded, the question's tokens split off)."""
    right = 0
    for doc in DOCS:
        scores = []
        for choice in doc["choices"]:
            ctx = tok(doc["question"], add_special_tokens=False)["input_ids"]
            whole = tok(doc["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx):]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = model(ids).logits.log_softmax(-1)[0]
            scores.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        right += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return right / len(DOCS)


def test_the_model_in_memory_is_scored(tiny, task_dir):
    model, tok = tiny
    scores = lm_eval(model, tok, tasks=["robop_toy"], include_path=task_dir, device="cpu")
    acc = scores["robop_toy"]["acc,none"]
    assert acc == pytest.approx(_manual_acc(model, tok))
    with torch.no_grad():  # change the weights in memory: lm-eval must see the change (no reload)
        model.lm_head.weight.mul_(-1)
    flipped = lm_eval(model, tok, tasks=["robop_toy"], include_path=task_dir, device="cpu")["robop_toy"]["acc,none"]
    assert flipped == pytest.approx(_manual_acc(model, tok))
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)


def test_a_module_without_a_causal_lm_is_refused(tiny, task_dir):
    with pytest.raises(TypeError, match="Hugging Face causal LM"):
        lm_eval(torch.nn.Linear(2, 2), tiny[1], tasks=["robop_toy"], include_path=task_dir)
