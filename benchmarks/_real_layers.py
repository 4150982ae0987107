"""Shared helpers of the benchmarks: real models, real calibration data, captured layer inputs.

Not a benchmark by itself. ``gemma()`` / ``deit()`` load the embedded Gemma-3-270M and the
recipe's cached tiny DeiT (both offline); ``capture()`` records the inputs of named linears of the
*dense* model with forward pre-hooks; ``machine()`` describes where the numbers were taken.
"""

from __future__ import annotations

import glob
import os
import pathlib
import platform
import resource
import statistics
import sys
import time

import torch
from torch import nn

DEIT_GLOB = "~/.cache/robop_lightning/recipes/deit_cap-*.ckpt"


def machine(device: torch.device | str = "cpu") -> dict:
    """Processor, threads, torch version, device and the load average at call time."""
    device = torch.device(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "loadavg": list(os.getloadavg()),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_line(info: dict) -> str:
    gpu = f", {info['gpu']}" if "gpu" in info else ""
    load = ", ".join(f"{x:.2f}" for x in info["loadavg"])
    return (f"{info['cpu']} ({info['cpu_count']} cores visible, {info['threads']} torch threads), "
            f"torch {info['torch']}, device {info['device']}{gpu}; load average (1, 5, 15 min) {load}")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - t)
    return statistics.median(seconds)


def command_line(script: str, argv) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join([".venv/bin/python", script, *args]).strip()


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse_with_fast(parser, argv, fast: list[str]):
    """``parser``'s arguments; with ``--fast``, ``fast`` first so that the options given still win."""
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)
    return parser.parse_args(fast + raw) if args.fast else args


def git_commit() -> str | None:
    """The commit the results are made on (``+dirty`` with uncommitted changes), or ``None`` outside a
    checkout: the recipes' :func:`_common.git_commit`."""
    recipes = str(pathlib.Path(__file__).resolve().parents[1] / "recipes")
    if recipes not in sys.path:  # called once per run: do not grow sys.path each time
        sys.path.insert(0, recipes)
    from _common import git_commit as commit

    return commit()


def write_results(out: str | pathlib.Path, payload: dict, markdown: str) -> tuple[pathlib.Path, pathlib.Path]:
    """Write ``out.json`` and ``out.md`` atomically (the suffix appended: ``--out runs/x_0.25`` keeps its dot)."""
    import json

    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = (out.parent / (out.name + ".json"), out.parent / (out.name + ".md"))
    for path, text in zip(paths, (json.dumps(payload, indent=2, default=str) + "\n", markdown)):
        tmp = path.parent / (path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return paths


def publish(out: str | pathlib.Path, payload: dict, markdown: str) -> None:
    """Write ``out.json`` / ``out.md`` and print the markdown and where it went (every benchmark's ending)."""
    paths = write_results(out, payload, markdown)
    print(markdown)
    print(f"wrote {paths[0]} and {paths[1]}")


def setting_label(pattern: str, sparsity: float | None) -> str:
    """``"70%"`` for an unstructured sparsity, the pattern itself (``"2:4"``) otherwise."""
    return pattern if pattern != "unstructured" else f"{sparsity:.0%}"


# --------------------------------------------------------------------------- models and data
def gemma():
    """The embedded Gemma-3-270M (float32, eval mode)."""
    from robop_lightning.models.causal_lm import load_causal_lm

    return load_causal_lm("embedded").float().eval()


def text_batches(windows: int, seqlen: int = 128, split: str = "calibration", batch_size: int = 8):
    """Token batches ``(B, seqlen + 1)`` of the cached Shakespeare corpus (BOS included)."""
    from robop_lightning.data import TextDataModule

    dm = TextDataModule(seqlen=seqlen, calibration_windows=max(windows, 1), ood_corpus=None, batch_size=batch_size)
    dm.setup()
    data = dm.splits[split][:windows]
    return [data[i : i + batch_size] for i in range(0, len(data), batch_size)]


def deit_path() -> str | None:
    found = sorted(glob.glob(os.path.expanduser(DEIT_GLOB)))
    return found[0] if found else None


def deit():
    """The recipe's cached tiny DeiT (Fashion-MNIST, 28 px), or ``None`` when it is not cached."""
    from robop_lightning.models.deit import DeiTClassifier

    path = deit_path()
    if path is None:
        return None
    return DeiTClassifier.load_from_checkpoint(path, map_location="cpu", pretrained=False).float().eval()


def image_batches(images: int, split: str = "calibration", batch_size: int = 64):
    """Fashion-MNIST image batches ``(B, 1, 28, 28)`` (the first ``images`` of ``split``)."""
    from robop_lightning.data import FashionMNISTDataModule

    dm = FashionMNISTDataModule(img_size=28, calibration_size=max(images, 1), batch_size=batch_size)
    dm.setup()
    loader = {"calibration": dm.calibration_dataloader, "val": dm.val_dataloader}[split]()
    out, seen = [], 0
    for batch in loader:
        x = batch[0]
        out.append(x[: images - seen])
        seen += len(out[-1])
        if seen >= images:
            break
    return out


@torch.no_grad()
def capture(model: nn.Module, batches, names: list[str]) -> dict[str, torch.Tensor]:
    """Inputs ``(samples, tokens, in_features)`` of each named linear over ``batches`` (dense model)."""
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = []
    for name in names:
        module = model.get_submodule(name)

        def hook(mod, args, name=name):
            x = args[0].detach().float()
            store[name].append(x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() >= 3 else x[:, None])

        hooks.append(module.register_forward_pre_hook(hook))
    try:
        for batch in batches:
            model(batch)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in store.items()}
