"""Small problems shared by the test modules: layer problems, tiny models and their calibration data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM


def correlated_inputs(samples: int, tokens: int, n: int, seed: int, spread: float = 1.0) -> torch.Tensor:
    """Correlated features with uneven scales (log-uniform over ``10**[-spread, spread]``)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) / n**0.5 + 0.5 * torch.eye(n)
    latent = torch.randn(samples, tokens, n, generator=g)
    scales = torch.logspace(-spread, spread, n)[torch.randperm(n, generator=g)]
    return (latent @ mix) * scales


def random_weight(m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(m, n, generator=g)


def quad(h: torch.Tensor, e: torch.Tensor) -> float:
    """tr(E H E^T) in float64."""
    e = e.double()
    return float(torch.einsum("ij,jk,ik->", e, h.double(), e))


# --------------------------------------------------------------------------- tiny models (prune_model)
class MLP(nn.Module):
    """No repeated blocks: pruned linear by linear, the ``head`` stays dense."""

    def __init__(self, n_in: int = 16, hidden: int = 32, n_out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def tiny_vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=4).eval()


def tiny_llama(seed: int = 0, layers: int = 2, vocab: int = 128) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
    )
    return LlamaForCausalLM(config).eval()


def token_batches(vocab: int = 64, batches: int = 2, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Dict batches of ``input_ids`` (4 sequences of 12 tokens each)."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (4, 12), generator=g)} for _ in range(batches)]


def images(batches: int = 4, size: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 16, 16, generator=g) for _ in range(batches)]


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- fc1 -> dropout -> fc2 -> head
class Net(nn.Module):
    """fc1 -> dropout -> fc2 -> head, no repeated blocks (pruned linear by linear)."""

    def __init__(self, hidden: int = 32, bias: bool = True, p: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, hidden, bias=bias)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(hidden, 16, bias=bias)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(self.drop(torch.relu(self.fc1(x))))))


def _net(**kwargs) -> Net:
    torch.manual_seed(0)
    return Net(**kwargs)


def _batches(n: int = 3, size: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 16, generator=g) for _ in range(n)]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


# --------------------------------------------------------------------------- structured pruning
def _correlated(n_rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, dtype=torch.float64, generator=g) * 0.4 + torch.eye(n, dtype=torch.float64)
    return torch.randn(n_rows, n, dtype=torch.float64, generator=g) @ mix, g


def _tiny_vit(seed=0):
    """A timm DeiT (4 heads, 192 MLP channels): the structured tests' ViT."""
    torch.manual_seed(seed)
    return timm.create_model(
        "deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=5
    ).eval()


_LAUNCHER = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run_child(script: str, cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python script cwd *args`` as a fresh process (Lightning's launcher then starts the other
    ranks), without the launcher variables of any surrounding run, with the repository importable."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER}
    env["PYTHONPATH"] = f"{Path(__file__).resolve().parents[1]}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return subprocess.run([sys.executable, script, str(cwd), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
