"""Ship a pruned model: checkpoints other tools read, and 2:4 weights on the GPU's sparse kernels.

* :func:`save_pruned` writes a new directory, in one of two formats:

  - ``"hf"``: ``save_pretrained`` in the model's own dtype; ``config.json`` gains a ``"robop"`` entry
    (what was asked of :func:`robop_lightning.pipeline.prune.prune_model` and the sparsity measured in the
    weights). Reload with ``AutoModelForCausalLM.from_pretrained(path)``, nothing else needed.
  - ``"compressed-tensors"``: the pruned weights stored as their non-zero values plus a bitmask
    (the ``sparse-bitmask`` format, or ``sparse-24-bitmask`` when every pruned weight is 2:4) by the
    ``compressed-tensors`` package's own compressors, with its ``sparsity_config`` in ``config.json``;
    the file shrinks with the sparsity. Reload with :func:`load_pruned`.

* :func:`to_semi_structured` swaps 2:4 weights for ``torch.sparse`` semi-structured tensors, which
  run on the sparse tensor cores of CUDA GPUs of compute capability 8.0+ (fp16 / bf16).

The sparse formats need ``pip install "robop-lightning[export]"``: compressed-tensors 0.10 to 0.13,
the releases that still carry the sparse compressors (0.14 requires transformers < 5; from 0.15 on
the package and transformers' loader read quantized checkpoints only). For the same reason
``from_pretrained`` of transformers 5 cannot read a ``sparsity_config`` (it asks for compressed-tensors
0.15+, and with that leaves the sparse-encoded layers randomly initialised): :func:`load_pruned`
decompresses the weights with compressed-tensors and hands them to ``from_pretrained``::

    from robop_lightning.export import load_pruned, save_pruned
    save_pruned(model, "llama-2of4", format="compressed-tensors", report=report)
    model = load_pruned("llama-2of4")   # the same weights, the same dtype
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from robop_lightning.report import PruneReport
from robop_lightning.pipeline.surgery.io import structured_shapes
from robop_lightning.pipeline.targets import find_hf_model, is_linear

__all__ = ["CONFIG_KEY", "EXPORT_EXTRA", "is_two_four", "load_pruned", "save_pruned", "to_semi_structured"]

CONFIG_KEY = "robop"  # the entry of config.json (robop.json beside a plain state dict) describing the pruning
EXPORT_EXTRA = 'pip install "robop-lightning[export]"'
MIN_ZEROS = 0.4  # without a report, a linear whose weight is at least this share of zeros counts as pruned
SEMI_STRUCTURED_NEEDS = ("a CUDA GPU of compute capability 8.0+ (Ampere or newer), float16 / bfloat16 weights on it, "
                         "and weight shapes the kernels accept (rows and columns multiples of 16 with cuSPARSELt, "
                         "of 32 x 64 with CUTLASS)")


def is_two_four(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive entries of each row of ``weight`` holds at most 2 non-zeros.

    Example:
        >>> import torch
        >>> is_two_four(torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 3.0]]))
        True
        >>> is_two_four(torch.tensor([[1.0, 2.0, 3.0, 0.0]]))
        False
    """
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.detach() != 0).reshape(-1, 4).sum(dim=1) <= 2).all())


def _first_dense_group(weight: torch.Tensor) -> str:
    counts = (weight.detach() != 0).reshape(weight.shape[0], -1, 4).sum(dim=2)
    row, group = (int(i) for i in (counts > 2).nonzero()[0])
    return f"row {row}, columns {4 * group}..{4 * group + 3} hold {int(counts[row, group])} non-zeros"


# --------------------------------------------------------------------------- what to save
def _pruned_layers(root: nn.Module, prefix: str, report: PruneReport | None) -> dict[str, nn.Module]:
    """The pruned layers of ``root`` by name: ``report.masks``' names, or every linear with >= 40 % zeros."""
    if report is not None:
        cut = f"{prefix}." if prefix else ""
        named = dict(root.named_modules())
        out = {}
        for name in report.masks:
            local = name[len(cut):] if cut and name.startswith(cut) else name
            weight = getattr(named.get(local), "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                raise ValueError(f"report.masks names {name!r}, which is not a layer with a 2-D weight in the model "
                                 "given; save the model that was pruned (the same one passed to prune_model).")
            out[local] = named[local]
        return out
    holders: dict[int, int] = {}
    for _, p in root.named_parameters(remove_duplicate=False):
        holders[id(p)] = holders.get(id(p), 0) + 1
    return {n: m for n, m in root.named_modules() if is_linear(m) and holders.get(id(m.weight)) == 1
            and m.weight.numel() and float((m.weight == 0).float().mean()) >= MIN_ZEROS}


def _entry(fmt: str, layers: dict[str, nn.Module], report: PruneReport | None) -> dict[str, Any]:
    """The ``"robop"`` entry: the pruning asked for (from the report) and the sparsity measured in the weights."""
    params = sum(m.weight.numel() for m in layers.values())
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    try:
        version = metadata.version("robop-lightning")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        version = None
    entry: dict[str, Any] = {"version": version, "format": fmt}
    if report is not None:
        c = report.config
        entry["pruning"] = {k: c.get(k) for k in ("pattern", "sparsity", "solver", "uncertainty", "radius")}
    entry["measured"] = {"layers": len(layers), "parameters": params, "zeros": zeros,
                         "sparsity": zeros / params if params else 0.0,
                         "two_four": bool(layers) and all(is_two_four(m.weight) for m in layers.values())}
    return entry


# --------------------------------------------------------------------------- a new directory, atomically
@contextlib.contextmanager
def _staged(path: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write into, renamed to ``path`` only when the block succeeds."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file; save_pruned writes a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; choose a new directory, or pass overwrite=True to "
                              "replace it (the old one stays until the new one is complete)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = path.with_name(f".{path.name}.partial-{tag}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old-{tag}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _add_entry(config_file: Path, entry: dict[str, Any]) -> None:
    data = json.loads(config_file.read_text()) if config_file.exists() else {}
    data[CONFIG_KEY] = entry
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with a copy of each tensor whose memory an earlier one shares (safetensors refuses aliases)."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        out[k] = v.detach().clone() if v.untyped_storage().data_ptr() in seen else v.detach().contiguous()
        seen.add(v.untyped_storage().data_ptr())
    return out


# --------------------------------------------------------------------------- compressed-tensors
def _compressed_tensors() -> tuple[Any, Any]:
    """compressed-tensors' ``ModelCompressor`` and ``SparsityCompressionConfig``, or a clear ImportError."""
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.compressors.sparse_compressors import BitmaskCompressor  # noqa: F401
        from compressed_tensors.config import SparsityCompressionConfig
    except ImportError as e:
        try:
            have = (f"compressed-tensors {metadata.version('compressed-tensors')} is installed, but its sparse "
                    f"compressors cannot be imported ({e}; they were removed in 0.15)")
        except metadata.PackageNotFoundError:
            have = "compressed-tensors is not installed"
        raise ImportError(f"format='compressed-tensors' needs compressed-tensors 0.10 to 0.13 (the releases with the "
                          f"sparse-bitmask compressors); {have}. Install it with: {EXPORT_EXTRA}") from e
    return ModelCompressor, SparsityCompressionConfig


def _compress(root: nn.Module, layers: dict[str, nn.Module], two_four: bool,
              sparsity: float) -> tuple[dict[str, torch.Tensor], Any]:
    """The compressed state dict of ``root`` (``layers`` sparse-encoded) and its ``ModelCompressor``."""
    ModelCompressor, SparsityCompressionConfig = _compressed_tensors()
    import transformers.modeling_utils as mu

    config = SparsityCompressionConfig.load_from_registry(
        "sparse-24-bitmask" if two_four else "sparse-bitmask", targets=sorted(layers), ignore=[],
        global_sparsity=sparsity, sparsity_structure="2:4" if two_four else "unstructured")
    compressor = ModelCompressor(sparsity_config=config)
    saved = mu.__dict__.get("dtype_byte_size")  # compress() replaces it (a float8 patch): put it back after
    try:
        with torch.no_grad():
            state = compressor.compress(root, state_dict={k: v.detach().cpu() for k, v in root.state_dict().items()})
    finally:
        if saved is None:
            mu.__dict__.pop("dtype_byte_size", None)
        else:
            mu.dtype_byte_size = saved
    return state, compressor


# --------------------------------------------------------------------------- save / load
def _check_save(model: nn.Module, format: str, safe_serialization: bool) -> None:
    """Refuse what :func:`save_pruned` cannot write, before anything is written."""
    if format not in ("hf", "compressed-tensors"):
        raise ValueError(f"format is 'hf' or 'compressed-tensors', got {format!r}")
    if format == "compressed-tensors":
        if not safe_serialization:
            raise ValueError("compressed-tensors checkpoints are safetensors files; leave safe_serialization=True")
        _compressed_tensors()  # fail before writing anything
    if structured_shapes(model) is not None:
        raise ValueError(
            "this model was pruned structurally (heads / MLP channels removed), so its layers have different "
            "sizes, which the configs of transformers' Llama / Gemma / Mistral models cannot express (one "
            "intermediate_size and one head count for every layer): from_pretrained could not rebuild it. Save it "
            "with robop_lightning.save_structured(model, path) and reload it with robop_lightning.load_structured(path)."
        )


def _write_weights(tmp: Path, model: nn.Module, root: nn.Module, is_hf: bool, state: dict[str, torch.Tensor] | None,
                   safe_serialization: bool) -> None:
    """The weights into ``tmp``: ``save_pretrained`` for a Hugging Face model, else a state dict file
    (``state``: the compressed one, else the model's)."""
    if is_hf:
        kwargs: dict[str, Any] = {} if state is None else {"state_dict": state}
        if not safe_serialization:
            if "safe_serialization" not in inspect.signature(root.save_pretrained).parameters:
                raise ValueError("this transformers writes safetensors only; leave safe_serialization=True")
            kwargs["safe_serialization"] = False
        root.save_pretrained(tmp, **kwargs)
    elif state is not None:
        save_file(_unshared(state), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text("{}\n")  # compressed-tensors 0.10 - 0.12 only update an existing one
    elif safe_serialization:
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(model.state_dict(), tmp / "pytorch_model.bin")


def save_pruned(model: nn.Module, path: str | Path, format: Literal["hf", "compressed-tensors"] = "hf",
                report: PruneReport | None = None, safe_serialization: bool = True, overwrite: bool = False) -> Path:
    """Save a pruned model to the new directory ``path``; the model itself is not changed.

    The directory is written under a temporary sibling name and renamed at the end, so an interrupted
    save leaves no half-written checkpoint (and, with ``overwrite=True``, the old one untouched).

    Args:
        model: the pruned model: a Hugging Face ``PreTrainedModel`` (or a module holding one, such as
            a LightningModule: the Hugging Face model inside is saved), or any other ``nn.Module``
            (timm, ...), saved as ``model.safetensors`` (its state dict) plus ``robop.json``.
        path: a directory that does not exist yet or is empty.
        format: ``"hf"``: ``save_pretrained``, dense weights in the model's dtype, ``config.json``
            gains ``"robop"`` (the report's pattern, sparsity, solver, uncertainty and radius, and
            ``"measured"``: the share of zeros in the pruned layers' weights, and whether all are 2:4).
            ``"compressed-tensors"``: the pruned layers stored by compressed-tensors' ``sparse-bitmask``
            (``sparse-24-bitmask`` when every one is 2:4) compressor, ``config.json`` gains its
            ``quantization_config.sparsity_config``; reload with :func:`load_pruned`. Needs
            ``pip install "robop-lightning[export]"``.
        report: what :func:`robop_lightning.pipeline.prune.prune_model` returned: its ``masks`` name the pruned
            layers, its ``config`` goes into the ``"robop"`` entry. Without it, every linear whose
            weight is at least 40 % zeros counts as pruned.
        safe_serialization: ``False`` writes a pickled ``pytorch_model.bin`` for a plain module (or a
            Hugging Face model, where the installed transformers still offers it); compressed-tensors
            checkpoints are always safetensors.
        overwrite: replace an existing non-empty directory.

    Returns:
        ``path``.

    Raises:
        FileExistsError: ``path`` exists and is not empty (without ``overwrite``), or is a file.
        ValueError: a structurally pruned (shrunk) model: its per-layer sizes do not fit a
            transformers config; use :func:`robop_lightning.pipeline.surgery.save_structured`.
        ImportError: ``format="compressed-tensors"`` without compressed-tensors 0.10 - 0.13.

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> from robop_lightning.pipeline.prune import prune_model
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
        >>> report = prune_model(net, [torch.randn(64, 16)], sparsity=0.5, solver="sparsegpt",
        ...                      uncertainty="baseline", progress=False)
        >>> d = save_pruned(net, tempfile.mkdtemp() + "/mlp", report=report)
        >>> sorted(p.name for p in d.iterdir())
        ['model.safetensors', 'robop.json']
        >>> again = load_pruned(d, nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)))
        >>> torch.equal(again[0].weight, net[0].weight), round(report.totals["sparsity"], 2)
        (True, 0.5)
        >>> save_pruned(net, d)
        Traceback (most recent call last):
        ...
        FileExistsError: ... exists and is not empty; choose a new directory, or pass overwrite=True ...
    """
    _check_save(model, format, safe_serialization)
    path = Path(path)
    found = find_hf_model(model)
    prefix, root = found if found is not None else ("", model)
    layers = _pruned_layers(root, prefix, report)
    if format == "compressed-tensors" and not layers:
        raise ValueError("no pruned layer to compress: pass the report of prune_model, or prune the model first "
                         f"(without a report, linears with at least {MIN_ZEROS:.0%} zeros are taken as pruned)")
    entry = _entry(format, layers, report)
    with _staged(path, overwrite) as tmp:
        measured = entry["measured"]
        state, compressor = (_compress(root, layers, measured["two_four"], measured["sparsity"])
                             if format == "compressed-tensors" else (None, None))
        _write_weights(tmp, model, root, found is not None, state, safe_serialization)
        if compressor is not None:
            compressor.update_config(str(tmp))  # config.json: quantization_config.sparsity_config
        _add_entry(tmp / ("config.json" if found is not None else "robop.json"), entry)
    return path


def _dense_state(path: Path, compression: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """The dense state dict of a checkpoint directory (sparse-encoded weights decompressed)."""
    if compression:
        ModelCompressor, _ = _compressed_tensors()
        compressor = ModelCompressor.from_compression_config(compression)
        return dict(compressor.sparsity_compressor.decompress(str(path)))
    files = sorted(path.glob("*.safetensors"))
    if files:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    if (path / "pytorch_model.bin").exists():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ValueError(f"{path} holds no weights (.safetensors or pytorch_model.bin); save it with save_pruned")


def load_pruned(path: str | Path, model: nn.Module | Callable[[], nn.Module] | None = None) -> nn.Module:
    """Load what :func:`save_pruned` wrote, in either format: ``load_pruned(directory)``.

    Args:
        path: the directory.
        model: for a plain (non Hugging Face) checkpoint, the same architecture freshly built, or a
            function building it; ``None`` for a Hugging Face directory: the class named in
            ``config.json`` (``architectures``) is loaded with ``from_pretrained``, in the saved dtype.

    Returns:
        The model with the saved weights (exactly: the sparse encodings are lossless), in eval mode.

    Raises:
        ValueError: no model given for a plain checkpoint, or the weights do not match the model.
        ImportError: a compressed-tensors checkpoint without compressed-tensors 0.10 - 0.13.
    """
    path = Path(path)
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    compression = config.get("quantization_config") or {}
    compression = compression if compression.get("sparsity_config") else None
    if model is None:
        if not config.get("architectures"):
            raise ValueError(f"{path} is not a Hugging Face directory; pass the model (or a function that builds it): "
                             "load_pruned(path, lambda: timm.create_model(...))")
        import transformers

        cls = getattr(transformers, config["architectures"][0])
        if not compression:
            return cls.from_pretrained(path).eval()
        hf_config = transformers.AutoConfig.from_pretrained(path)
        if hasattr(hf_config, "quantization_config"):
            delattr(hf_config, "quantization_config")  # the weights handed over are dense
        key = "dtype" if "dtype" in config else "torch_dtype"
        dtype = getattr(torch, str(config.get(key) or "float32").removeprefix("torch."))
        loaded = cls.from_pretrained(None, config=hf_config, state_dict=_dense_state(path, compression), **{key: dtype})
        if (path / "generation_config.json").exists():
            loaded.generation_config = transformers.GenerationConfig.from_pretrained(path)
        return loaded.eval()
    if not isinstance(model, nn.Module):
        model = model()
    state = _dense_state(path, compression)
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.state_dict(keep_vars=True))
    loaded_ptrs = {params[k].data_ptr() for k in state if k in params}
    missing = [k for k in missing if params[k].data_ptr() not in loaded_ptrs]  # tied weights are not stored twice
    if missing or unexpected:
        raise ValueError(f"the weights in {path} do not match the model: missing {missing[:5]}, unexpected "
                         f"{list(unexpected)[:5]}; build the same architecture that was pruned")
    return model.eval()


# --------------------------------------------------------------------------- 2:4 kernels
def _semi_structured_class() -> Any:
    cusparselt = getattr(torch.backends, "cusparselt", None)
    if cusparselt is not None and cusparselt.is_available():
        return torch.sparse.SparseSemiStructuredTensorCUSPARSELT
    return torch.sparse.SparseSemiStructuredTensorCUTLASS


def _unsupported(weights: dict[str, torch.Tensor], cls: Any) -> list[str]:
    """Why the semi-structured kernels cannot take these weights (empty: they can)."""
    if not torch.cuda.is_available():
        return ["this machine has no CUDA device"]
    problems = []
    for name, w in weights.items():
        if w.device.type != "cuda":
            problems.append(f"{name} is on {w.device} (move the model to the GPU first: model.cuda())")
            continue
        major, minor = torch.cuda.get_device_capability(w.device)
        if (major, minor) < (8, 0):
            problems.append(f"{name} is on {torch.cuda.get_device_name(w.device)}, compute capability {major}.{minor}")
        elif w.dtype not in (torch.float16, torch.bfloat16):
            problems.append(f"{name} is {str(w.dtype).removeprefix('torch.')} (cast the model: model.half() or "
                            "model.bfloat16())")
        else:
            c = cls._DTYPE_SHAPE_CONSTRAINTS[w.dtype]
            rows, cols = w.shape
            if rows % c.sparse_min_rows or cols % c.sparse_min_cols:
                problems.append(f"{name} is {rows} x {cols}, not a multiple of {c.sparse_min_rows} x "
                                f"{c.sparse_min_cols} ({cls.BACKEND})")
    return problems


def to_semi_structured(model: nn.Module, names: Iterable[str] | None = None) -> list[str]:
    """Swap 2:4-sparse ``nn.Linear`` weights for semi-structured sparse tensors, in place.

    Each ``module.weight`` becomes an ``nn.Parameter`` holding
    ``torch.sparse.to_sparse_semi_structured(weight)`` (as the PyTorch tutorial and torchao do): the
    forward then runs on the GPU's 2:4 sparse kernels (cuSPARSELt, else CUTLASS). Inference only.

    Args:
        model: the pruned model (2:4, as ``prune_model(..., pattern="2:4", sparsity=None)`` leaves it),
            on a CUDA GPU of compute capability 8.0+, in float16 or bfloat16.
        names: the linears to swap; ``None``: every ``nn.Linear`` whose weight is 2:4-sparse
            (layers already swapped are skipped).

    Returns:
        The names of the layers swapped.

    Raises:
        ValueError: a named layer is not an ``nn.Linear``, or its weight is not 2:4 (the layer and the
            first offending group are named); or ``names=None`` finds no 2:4 linear.
        RuntimeError: the kernels cannot run here: they need a CUDA GPU of compute capability 8.0+,
            fp16 / bf16 weights on it and shapes they accept (the message says which is missing).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> layer = nn.Linear(64, 64)
        >>> with torch.no_grad():
        ...     _ = layer.weight.mul_(torch.tensor([1.0, 0.0, 1.0, 0.0]).repeat(16))
        >>> is_two_four(layer.weight)
        True
        >>> to_semi_structured(nn.Sequential(layer))   # on the CPU: refused, saying what is needed
        Traceback (most recent call last):
        ...
        RuntimeError: to_semi_structured needs a CUDA GPU of compute capability 8.0+ ...
    """
    modules = dict(model.named_modules())
    swapped = torch.sparse.SparseSemiStructuredTensor
    if names is None:
        chosen = {n: m for n, m in modules.items() if isinstance(m, nn.Linear)
                  and not isinstance(m.weight, swapped) and is_two_four(m.weight) and bool((m.weight == 0).any())}
        if not chosen:
            raise ValueError("no nn.Linear of the model holds a 2:4-sparse weight: prune it with "
                             "prune_model(model, batches, pattern='2:4', sparsity=None) first")
    else:
        chosen = {}
        for n in names:
            m = modules.get(n)
            if not isinstance(m, nn.Linear):
                kind = "absent" if m is None else type(m).__name__
                raise ValueError(f"{n}: not an nn.Linear of the model ({kind})")
            if isinstance(m.weight, swapped):
                continue
            if not is_two_four(m.weight):
                detail = (f"{m.in_features} input features are not a multiple of 4" if m.in_features % 4
                          else _first_dense_group(m.weight))
                raise ValueError(f"{n}: its weight is not 2:4 sparse ({detail}); prune it with pattern='2:4' first, "
                                 "or leave it out of names")
            chosen[n] = m
    cls = _semi_structured_class()
    problems = _unsupported({n: m.weight for n, m in chosen.items()}, cls)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise RuntimeError(f"to_semi_structured needs {SEMI_STRUCTURED_NEEDS}; here: {'; '.join(problems[:3])}{more}")
    for m in chosen.values():
        m.weight = nn.Parameter(cls.from_dense(m.weight.detach().contiguous()), requires_grad=False)
    return list(chosen)
