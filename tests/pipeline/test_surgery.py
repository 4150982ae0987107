"""robop_lightning.pipeline.surgery: shrunk timm ViT blocks and Llama decoder layers equal masked dense ones; save / load."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from robop_lightning import prune_model
from robop_lightning.pipeline.shrink_step import prune_model_structured
from robop_lightning.pipeline.surgery import load_structured, save_structured
from tests.engine_helpers import _tiny_vit

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- timm surgery
def test_vit_shrunk_equals_masked_dense_and_counts_parameters():
    dense = _tiny_vit()
    shrunk = copy.deepcopy(dense)
    batches = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    report = prune_model(shrunk, batches, sparsity=0.5, pattern="structured", uncertainty="cvar")
    rows = {r["name"]: r for r in report.layers}
    masked = copy.deepcopy(dense)
    removed_params = 0
    for i in range(2):
        db, sb, mb = dense.blocks[i], shrunk.blocks[i], masked.blocks[i]
        heads = rows[f"blocks.{i}.attn.proj"]["removed"]
        chans = rows[f"blocks.{i}.mlp.fc2"]["removed"]
        assert len(heads) == 2 and len(chans) == 96 and sb.attn.num_heads == 2
        kept_heads = [h for h in range(4) if h not in heads]
        kept_cols = torch.tensor([h * 12 + d for h in kept_heads for d in range(12)])
        with torch.no_grad():
            mb.attn.proj.weight.zero_()
            mb.attn.proj.weight[:, kept_cols] = sb.attn.proj.weight
            mb.attn.proj.bias.copy_(sb.attn.proj.bias)
            kept_ch = torch.tensor([c for c in range(192) if c not in chans])
            mb.mlp.fc2.weight.zero_()
            mb.mlp.fc2.weight[:, kept_ch] = sb.mlp.fc2.weight
            mb.mlp.fc2.bias.copy_(sb.mlp.fc2.bias)
            # the producers of the shrunk block are exactly the dense rows of the kept heads / channels
            qkv_rows = torch.cat([kept_cols + t * 48 for t in range(3)])
            torch.testing.assert_close(sb.attn.qkv.weight, db.attn.qkv.weight[qkv_rows], rtol=0, atol=0)
            torch.testing.assert_close(sb.mlp.fc1.weight, db.mlp.fc1.weight[kept_ch], rtol=0, atol=0)
        removed_params += 2 * (3 * 12 * 49 + 12 * 48) + 96 * (49 + 48)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(shrunk(x), masked(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(shrunk(x), dense(x), atol=1e-3)  # something was really removed
    n_dense = sum(p.numel() for p in dense.parameters())
    assert sum(p.numel() for p in shrunk.parameters()) == n_dense - removed_params
    assert report.totals["sparsity"] == pytest.approx(0.5, abs=1e-9)
    assert report.config["params_removed"] == pytest.approx(0.5, abs=1e-9)


def test_save_load_round_trip_timm(tmp_path):
    vit = _tiny_vit()
    prune_model_structured(vit, [torch.randn(8, 3, 32, 32)], sparsity=0.6, uncertainty="e")
    save_structured(vit, tmp_path)
    again = load_structured(tmp_path, _tiny_vit)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), vit(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------- Llama (GQA)
def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64,
    )
    return LlamaForCausalLM(cfg).eval()


def test_llama_removes_whole_kv_groups_and_matches_masked_dense(tmp_path):
    dense = _tiny_llama()
    lm = copy.deepcopy(dense)
    batches = [{"input_ids": torch.randint(0, 64, (4, 12))} for _ in range(2)]
    report = prune_model(lm, batches, sparsity=0.5, pattern="structured", uncertainty="trace")
    rows = {r["name"]: r for r in report.layers}
    masked = copy.deepcopy(dense)
    for i in range(2):
        attn, mattn = lm.model.layers[i].self_attn, masked.model.layers[i].self_attn
        (gone,) = rows[f"model.layers.{i}.self_attn.o_proj"]["removed"]
        keep = 1 - gone
        assert attn.num_key_value_heads == 1 and attn.num_heads == 2
        assert attn.q_proj.weight.shape == (16, 32) and attn.k_proj.weight.shape == (8, 32)
        # the kept KV head and exactly its two query heads (GQA: q heads 2g, 2g+1 read kv head g)
        dattn = dense.model.layers[i].self_attn
        assert torch.equal(attn.k_proj.weight, dattn.k_proj.weight[keep * 8 : keep * 8 + 8])
        assert torch.equal(attn.q_proj.weight, dattn.q_proj.weight[keep * 16 : keep * 16 + 16])
        mlp, mmlp = lm.model.layers[i].mlp, masked.model.layers[i].mlp
        chans = rows[f"model.layers.{i}.mlp.down_proj"]["removed"]
        kept_ch = torch.tensor([c for c in range(64) if c not in chans])
        assert mlp.intermediate_size == 32 == kept_ch.numel()
        with torch.no_grad():
            mattn.o_proj.weight.zero_()
            mattn.o_proj.weight[:, keep * 16 : keep * 16 + 16] = attn.o_proj.weight
            mmlp.down_proj.weight.zero_()
            mmlp.down_proj.weight[:, kept_ch] = mlp.down_proj.weight
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, masked(ids).logits, rtol=1e-5, atol=1e-5)
        out = lm.generate(ids[:, :4], max_new_tokens=5, do_sample=False)  # KV cache with the smaller heads
    assert out.shape == (2, 9)
    save_structured(lm, tmp_path)
    again = load_structured(tmp_path).eval()  # rebuilt from config.json alone
    assert again.model.layers[0].self_attn.k_proj.out_features == 8
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, lm(ids).logits, rtol=0, atol=0)
