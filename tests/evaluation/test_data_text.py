"""TextDataModule: windows, disjoint contiguous splits, OOD loader, corpora readers."""

from __future__ import annotations

import re

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.trainers import WordLevelTrainer
from transformers import PreTrainedTokenizerFast

from robop_lightning.assets import AssetMissingError, is_available
from robop_lightning.data.text import TextDataModule, draw_windows, load_corpus, split_regions, windows


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A real character-level tokenizer (``tokenizers`` WordLevel) trained on the pydoc topics."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.train_from_iterator(load_corpus("pydoc_topics"), WordLevelTrainer(special_tokens=["<unk>", "<bos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return char_tokenizer()


def test_windows_drop_tail_and_do_not_overlap():
    ids = torch.arange(103)
    w = windows(ids, 10)
    assert w.shape == (10, 10)
    assert torch.equal(w.flatten(), ids[:100])
    assert windows(ids, 10, limit=3).shape == (3, 10)


def test_split_regions_are_contiguous_disjoint_and_cover():
    regions = split_regions(10_000, 640, 0.05, 0.1)
    spans = list(regions.values())
    assert spans[0].start == 0 and spans[-1].stop == 10_000
    for a, b in zip(spans, spans[1:]):
        assert a.stop == b.start
    assert len(regions["calibration"]) == 640 and len(regions["test"]) == 1000
    with pytest.raises(ValueError, match="calibration"):
        split_regions(100, 200, 0.1, 0.1)


@pytest.mark.parametrize("add_bos", [False, True])
def test_splits_never_share_a_text_region(tokenizer, add_bos):
    dm = TextDataModule("pydoc_topics", ood_corpus=None, tokenizer=tokenizer, seqlen=64, calibration_windows=16,
                        val_fraction=0.05, test_fraction=0.1, add_bos=add_bos, batch_size=8)
    dm.setup("fit")
    stream = torch.tensor(tokenizer("\n\n".join(load_corpus("pydoc_topics")), add_special_tokens=False)["input_ids"])
    owner = torch.full((stream.numel(),), -1)
    for k, name in enumerate(("calibration", "train", "val", "test")):
        region = dm.regions[name]
        data = dm.splits[name]
        if add_bos:
            assert torch.all(data[:, 0] == tokenizer.bos_token_id)
            data = data[:, 1:]
        assert data.shape[1] == 64
        for i, window in enumerate(data):
            start = region.start + i * 64
            assert start + 64 <= region.stop, f"{name} window {i} straddles its region"
            assert torch.equal(window, stream[start : start + 64])
            assert torch.all(owner[start : start + 64] == -1), f"{name} window {i} shares tokens with another split"
            owner[start : start + 64] = k
    assert len(dm.splits["calibration"]) == 16
    assert len(next(iter(dm.calibration_dataloader()))) == 8
    assert dm.hparams.seqlen == 64 and "tokenizer" not in dm.hparams


def test_ood_loader_is_second_and_train_shuffle_is_seeded(tokenizer):
    ood = ["An entirely different kind of text, about rivers and mountains. " * 40]
    make = lambda seed: TextDataModule("pydoc_topics", ood_corpus=ood, tokenizer=tokenizer, seqlen=32,  # noqa: E731
                                       calibration_windows=4, max_eval_windows=5, batch_size=4, seed=seed)
    dm = make(0)
    loaders = dm.test_dataloader()
    assert len(loaders) == 2
    assert len(loaders[0].dataset) == 5 and len(loaders[1].dataset) == 5
    ood_first = next(iter(loaders[1]))[0]
    assert tokenizer.decode(ood_first[1:]).startswith("An entirely")
    first = lambda m: next(iter(m.train_dataloader()))  # noqa: E731
    assert torch.equal(first(dm), first(make(0)))
    assert not torch.equal(first(dm), first(make(1)))


def _locate(stream: torch.Tensor, window: torch.Tensor) -> int:
    """Start of ``window`` in ``stream`` (the first match)."""
    hits = (stream.unfold(0, len(window), 1) == window).all(1).nonzero()
    assert len(hits) >= 1, "window not found in the stream"
    return int(hits[0])


def test_calibration_draws_come_from_the_training_region_and_differ(tokenizer):
    make = lambda draw: TextDataModule("pydoc_topics", ood_corpus=None, tokenizer=tokenizer, seqlen=64,  # noqa: E731
                                       calibration_windows=8, add_bos=False, calibration_draw=draw)
    stream = torch.tensor(tokenizer("\n\n".join(load_corpus("pydoc_topics")), add_special_tokens=False)["input_ids"])
    dms = [make(d) for d in (0, 1, 2, 1)]
    for dm in dms:
        dm.setup()
    assert torch.equal(dms[0].splits["calibration"], windows(stream, 64, 8))  # draw 0: the calibration region
    assert torch.equal(dms[1].splits["calibration"], dms[3].splits["calibration"])  # a draw is reproducible
    assert not torch.equal(dms[1].splits["calibration"], dms[2].splits["calibration"])
    train = dms[1].regions["train"]
    for dm in dms[1:3]:
        assert dm.splits["calibration"].shape == (8, 64)
        starts = sorted(_locate(stream, w) for w in dm.splits["calibration"])
        assert all(train.start <= s and s + 64 <= train.stop for s in starts)  # never a test window's tokens
        assert all(b - a >= 64 for a, b in zip(starts, starts[1:]))  # no overlap
        for name in ("train", "val", "test"):  # the evaluation windows do not move with the draw
            assert torch.equal(dm.splits[name], dms[0].splits[name])
    with pytest.raises(ValueError, match="calibration_draw"):
        make(-1)
    with pytest.raises(ValueError, match="fewer calibration windows"):
        draw_windows(torch.arange(100), 10, 11, seed=0)


def test_several_ood_corpora_are_named_and_tested_in_order(tokenizer):
    rivers = ["Rivers and mountains, valleys and streams. " * 40]
    code = ["def f(x):\n    return x + 1\n" * 60]
    dm = TextDataModule("pydoc_topics", ood_corpus={"rivers": rivers, "code": code}, tokenizer=tokenizer,
                        seqlen=32, calibration_windows=4, max_eval_windows=3, batch_size=4)
    loaders = dm.test_dataloader()
    assert dm.test_names == ["", "ood/rivers", "ood/code"]
    assert [len(loader.dataset) for loader in loaders] == [3, 3, 3]
    assert tokenizer.decode(next(iter(loaders[1]))[0][1:]).startswith("Rivers")
    assert tokenizer.decode(next(iter(loaders[2]))[0][1:]).startswith("def f")
    single = TextDataModule("pydoc_topics", ood_corpus=rivers, tokenizer=tokenizer, seqlen=32, calibration_windows=4)
    assert single.test_names == ["", "ood"] and "ood" in (single.setup() or single.splits)


@pytest.mark.skipif(not (is_available("python-docs") and is_available("fortunes")),
                    reason="python-docs / fortunes not cached: python -m robop_lightning.assets fetch python-docs")
def test_python_docs_and_fortunes_readers_on_the_real_files():
    docs = load_corpus("python_docs")
    assert len(docs) == 497 and any(d.startswith(".. _reporting-bugs:") for d in docs)
    fortunes = load_corpus("fortunes")
    assert len(fortunes) == 42
    assert not any(re.search(r"^%$", d, re.M) for d in fortunes)  # the entry separators are gone
    assert any("-- J. R. R. Tolkien" in d for d in fortunes)


def test_invalid_arguments_and_missing_corpus(tokenizer, tmp_path, monkeypatch):
    with pytest.raises(ValueError):
        TextDataModule("pydoc_topics", tokenizer=tokenizer, seqlen=1)
    with pytest.raises(ValueError):
        TextDataModule("pydoc_topics", tokenizer=tokenizer, val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(FileNotFoundError, match="neither"):
        load_corpus(str(tmp_path / "nope.txt"))
    monkeypatch.setenv("ROBOP_CACHE", str(tmp_path))
    with pytest.raises(AssetMissingError, match="python -m robop_lightning.assets fetch brown"):
        load_corpus("brown")
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.txt").write_text("second document")
    assert load_corpus(str(tmp_path)) == ["first document", "second document"]


@pytest.mark.skipif(not is_available("shakespeare"), reason="shakespeare not cached: python -m robop_lightning.assets fetch shakespeare")
def test_shakespeare_reader_on_the_real_files():
    docs = load_corpus("shakespeare")
    assert len(docs) == 42
    assert 4.9e6 < sum(len(d) for d in docs) < 5.3e6
    assert any("To be, or not to be" in d for d in docs)


@pytest.mark.skipif(not is_available("brown"), reason="brown not cached: python -m robop_lightning.assets fetch brown")
def test_brown_reader_strips_tags_on_the_real_files():
    docs = load_corpus("brown")
    assert len(docs) == 500
    assert docs[0].startswith("The Fulton County Grand Jury said Friday")
    assert not re.search(r"\w/(at|nn|vbd|in)\b", docs[0])
    words = sum(len(d.split()) for d in docs)
    assert 1.1e6 < words < 1.3e6
