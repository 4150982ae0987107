"""Side by side with llm-compressor: SparseGPT and Wanda, robop-lightning against ``oneshot``, in one run.

    .venv/bin/python benchmarks/peer_llmcompressor.py --threads 2          # Gemma 3 270M, minutes
    .venv/bin/python benchmarks/peer_llmcompressor.py --fast --out /tmp/p  # a tiny random Llama, seconds

Per method, on the same calibration windows (32 Shakespeare windows of 128 tokens, BOS first, as in
``sets_whole.py``) and the same dense checkpoint:

* ``sparsegpt``: robop-lightning ``prune_model(solver="sparsegpt", uncertainty="baseline",
  sparsity=0.5)`` (damping 0.01 mean(diag H), block size 128) against llm-compressor's
  ``SparseGPTModifier(sparsity=0.5, dampening_frac=0.01, block_size=128)``;
* ``wanda``: robop-lightning ``solver="wanda", pattern="row"`` against ``WandaPruningModifier(sparsity=0.5)``
  (llm-compressor's Wanda keeps the same share of every output row).

Both prune every ``nn.Linear`` of the decoder layers and leave ``lm_head`` dense (llm-compressor:
``targets=["Linear"], ignore=["re:.*lm_head"]``). llm-compressor lives in its own virtual environment
(``.venv-peer`` at the repository root: it pins ``torch<=2.14.0`` and ``transformers<=5.17``), made
here when missing with ``pip install torch==2.13.0 llmcompressor==0.14.0.1``. Its side runs in a child
process of that venv's Python, after robop's side and never at the same time, with the same thread
count: the child reads the model directory and the calibration windows (a LongTensor saved to a
temporary ``.pt``, so both sides see identical tokens), times ``oneshot`` alone (model loading
excluded on both sides) and writes the pruned decoder linears to a safetensors file. Those weights are
loaded back here into a copy of the same dense model, so both pruned models are scored by the same
code (``sets_whole.window_nll``) on the same held-out Shakespeare (in-domain) and Brown (OOD)
windows: only the pruning differs. The robop / peer perplexity ratios come with a paired bootstrap
95 % interval over windows.

``--fast``: a tiny random Llama (``--fast-arch gemma3``: a tiny random Gemma 3) saved with
``save_pretrained`` to a temporary directory, random token windows; without an existing
``.venv-peer`` the peer side is reported as missing (CI installs no second torch) unless
``--install-peer`` is given. The default run makes the peer venv when it is missing.

Writes ``<out>.json`` (``command``, ``commit``, ``machine``, ``protocol``, ``peer``, ``rows``: one per
method x side with ``status``, ``seconds``, ``ppl_in-domain``, ``ppl_ood``, ``sparsity`` of the
decoder linears; ``ratios``: robop / peer per method) and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _real_layers as R  # noqa: E402
from sets_whole import window_nll  # noqa: E402

from robop_lightning import prune_model  # noqa: E402
from robop_lightning.robustness.stats import format_ci, perplexity_ratio_ci  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
PEER_VENV = ROOT / ".venv-peer"
PEER_REQUIREMENTS = ["torch==2.13.0", "llmcompressor==0.14.0.1"]  # torch 2.13.0: the CPU wheel on local disk
METHODS = {
    # method: (robop prune_model keyword arguments, llm-compressor modifier)
    "sparsegpt": {"solver": "sparsegpt", "pattern": "unstructured"},
    "wanda": {"solver": "wanda", "pattern": "row"},
}
SPLITS = ("in-domain", "ood")

# The llm-compressor side, run by the peer venv's Python: ``python child.py job.json``.
CHILD = r'''
import json, sys, time
job = json.load(open(sys.argv[1]))
import torch
torch.set_num_threads(job["threads"])
from torch.utils.data import DataLoader
from safetensors.torch import save_file
import transformers
from transformers import AutoModelForCausalLM
import llmcompressor
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

windows = torch.load(job["windows"])
model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32).eval()
common = dict(sparsity=job["sparsity"], targets=["Linear"], ignore=["re:.*lm_head"])
if job["method"] == "sparsegpt":
    modifier = SparseGPTModifier(dampening_frac=job["damping"], block_size=job["block_size"], **common)
else:
    modifier = WandaPruningModifier(**common)
items = [{"input_ids": w} for w in windows]
loader = DataLoader(items, batch_size=job["batch_size"], shuffle=False)
# processor=None: oneshot loads the tokenizer saved beside the weights (unused with a DataLoader, but required)
start = time.perf_counter()
oneshot(model=model, dataset=loader, recipe=modifier, num_calibration_samples=len(windows),
        max_seq_length=windows.shape[1], shuffle_calibration_samples=False, pipeline=job["pipeline"])
seconds = time.perf_counter() - start
state = {n + ".weight": model.get_submodule(n).weight.detach().float().contiguous().clone() for n in job["targets"]}
save_file(state, job["weights"])
json.dump({"seconds": seconds, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "transformers": transformers.__version__, "llmcompressor": llmcompressor.__version__,
           "pipeline": job["pipeline"]}, open(job["result"], "w"))
'''


# --------------------------------------------------------------------------- peer environment
def peer_python(venv: pathlib.Path) -> pathlib.Path:
    return venv / "bin" / "python"


def peer_versions(venv: pathlib.Path) -> dict | None:
    """``{"llmcompressor", "torch", "transformers"}`` installed in ``venv`` (no heavy import), or ``None``."""
    python = peer_python(venv)
    if not python.exists():
        return None
    code = ("import json, importlib.metadata as m; "
            "print(json.dumps({p: m.version(p) for p in ('llmcompressor', 'torch', 'transformers')}))")
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=_child_env(1))
    return json.loads(done.stdout) if done.returncode == 0 else None


def install_peer(venv: pathlib.Path) -> dict:
    """Make ``venv`` with llm-compressor (network and disk bound: minutes, about 1.5 GB)."""
    print(f"installing llm-compressor into {venv} ({' '.join(PEER_REQUIREMENTS)}) ...", flush=True)
    if not peer_python(venv).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    _ignore_itself(venv)
    pip = [str(peer_python(venv)), "-m", "pip"]
    subprocess.run([*pip, "install", "--quiet", "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "install", "--quiet", *PEER_REQUIREMENTS], check=True)
    versions = peer_versions(venv)
    if versions is None:
        raise RuntimeError(f"{venv}: llm-compressor still not importable after the install")
    return versions


def _ignore_itself(venv: pathlib.Path) -> None:
    """``venv/.gitignore`` with ``*``, as Python 3.13's ``venv`` writes: git never lists the peer venv."""
    if venv.is_dir() and not (venv / ".gitignore").exists():
        (venv / ".gitignore").write_text("# created by benchmarks/peer_llmcompressor.py\n*\n")


def _child_env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1")
    return env


def run_peer(method: str, job: dict, venv: pathlib.Path, work: pathlib.Path, timeout: float) -> dict:
    """Run llm-compressor's ``method`` in the peer venv; ``{"seconds", ..., "weights": path}`` or raises."""
    job = {**job, "method": method, "weights": str(work / f"peer_{method}.safetensors"),
           "result": str(work / f"peer_{method}.json")}
    (work / "child.py").write_text(CHILD)
    (work / f"job_{method}.json").write_text(json.dumps(job))
    log = work / f"peer_{method}.log"
    cwd = work / f"cwd_{method}"  # llm-compressor may write logs into its working directory
    cwd.mkdir(exist_ok=True)
    with open(log, "w") as f:
        done = subprocess.run([str(peer_python(venv)), str(work / "child.py"), str(work / f"job_{method}.json")],
                              cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=_child_env(job["threads"]),
                              timeout=timeout)
    if done.returncode != 0 or not pathlib.Path(job["result"]).exists():
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"llm-compressor {method} exited {done.returncode}:\n{tail}")
    return {**json.loads(pathlib.Path(job["result"]).read_text()), "weights": job["weights"]}


# --------------------------------------------------------------------------- models and windows
def fast_model(directory: pathlib.Path, arch: str, vocab: int = 128) -> None:
    """A tiny random causal LM and a word-level tokenizer, saved with ``save_pretrained``."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(0)
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        model = LlamaForCausalLM(cfg)
    else:
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=16,
                               max_position_embeddings=256)
        model = Gemma3ForCausalLM(cfg)
    model.eval().save_pretrained(directory)
    words = {"<unk>": 0, **{f"t{i}": i for i in range(1, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(directory)


def fast_windows(vocab: int, seqlen: int, calibration: int, evals: int) -> tuple[torch.Tensor, dict]:
    """Random token windows: calibration and in-domain uniform over the vocabulary, OOD over its lower quarter."""
    def draw(n, high, seed):
        return torch.randint(1, high, (n, seqlen + 1), generator=torch.Generator().manual_seed(seed))
    return draw(calibration, vocab, 1), {"in-domain": draw(evals, vocab, 2), "ood": draw(evals, vocab // 4, 3)}


def text_windows(seqlen: int, calibration: int, evals: int) -> tuple[torch.Tensor, dict]:
    """Shakespeare calibration windows and held-out Shakespeare / Brown windows, as ``sets_whole.py``."""
    from robop_lightning.data import TextDataModule

    dm = TextDataModule(seqlen=seqlen, calibration_windows=calibration, ood_corpus="brown", batch_size=8)
    dm.setup()
    return dm.splits["calibration"], {"in-domain": dm.splits["test"][:evals], "ood": dm.splits["ood"][:evals]}


def decoder_linears(model: nn.Module) -> list[str]:
    """Every ``nn.Linear`` inside the decoder layers (``lm_head`` and anything outside the layers excluded)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{n}"]


def linear_sparsity(model: nn.Module, names: list[str]) -> float:
    zeros = total = 0
    for n in names:
        w = model.get_submodule(n).weight
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total


def evaluate(model: nn.Module, evals: dict) -> dict:
    out = {}
    for split, windows in evals.items():
        nll, tokens = window_nll(model, windows)
        out[split] = {"nll": nll, "tokens": tokens,
                      "ppl": float(torch.tensor(nll, dtype=torch.float64).sum().div(sum(tokens)).exp())}
    return out


def _row(method: str, side: str, status: str, **kw) -> dict:
    return {"method": method, "side": side, "status": status, "seconds": None, "sparsity": None,
            "ppl_in-domain": None, "ppl_ood": None, **kw}


def _scored(row: dict, scores: dict) -> dict:
    row.update({f"ppl_{s}": scores[s]["ppl"] for s in SPLITS})
    row["windows"] = {s: {"nll": scores[s]["nll"], "tokens": scores[s]["tokens"]} for s in SPLITS}
    return row


def _num(v, fmt=".2f") -> str:
    return "-" if v is None else format(v, fmt)


# --------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--damping", type=float, default=0.01, help="SparseGPT damping, a fraction of mean(diag H)")
    p.add_argument("--block-size", type=int, default=128, help="SparseGPT column block size")
    p.add_argument("--calibration-windows", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward, both sides")
    p.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=1,
                   help="timed pairs per method (robop, then the peer, alternating); the first pair is scored, "
                        "the seconds reported are the median over the pairs")
    p.add_argument("--fast", action="store_true", help="a tiny random model on random tokens (seconds; for tests)")
    p.add_argument("--fast-arch", default="llama", choices=["llama", "gemma3"])
    p.add_argument("--peer-venv", default=str(PEER_VENV))
    p.add_argument("--install-peer", action="store_true",
                   help="with --fast: make the peer venv when missing (the full run always does)")
    p.add_argument("--no-peer", action="store_true", help="robop's side only")
    p.add_argument("--peer-pipeline", default="sequential", help="llm-compressor's calibration pipeline")
    p.add_argument("--peer-timeout", type=float, default=3600.0, help="seconds for one llm-compressor run")
    p.add_argument("--work", default=None, help="keep the temporary files here (the peer's logs, its weights)")
    p.add_argument("--out", default="benchmarks/results/peer_llmcompressor")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    venv = pathlib.Path(args.peer_venv)

    if not args.fast:  # a missing asset stops here, with the fetch command, before any install
        from robop_lightning.assets import require

        model_dir = require("gemma3-270m")
    # the peer environment first: a full run should not fail after minutes of robop work
    peer: dict = {"venv": str(venv), "requirements": PEER_REQUIREMENTS}
    _ignore_itself(venv)
    versions = None if args.no_peer else peer_versions(venv)
    if versions is None and not args.no_peer and (args.install_peer or not args.fast):
        versions = install_peer(venv)
    peer.update(status="ok" if versions else ("skipped" if args.no_peer else "missing"), versions=versions)
    if versions is None and not args.no_peer:
        print(f"llm-compressor side missing: no {venv} (pass --install-peer to make it)", flush=True)

    with tempfile.TemporaryDirectory(prefix="peer_llmc_") as tmp:
        work = pathlib.Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.fast:
            model_dir = work / "model"
            fast_model(model_dir, args.fast_arch)
            seqlen, n_cal, n_eval = 32, 8, min(args.eval_windows, 8)
            calibration, evals = fast_windows(128, seqlen, n_cal, n_eval)
            label = f"tiny random {args.fast_arch} (--fast, random tokens)"
        else:
            seqlen = args.seqlen
            calibration, evals = text_windows(seqlen, args.calibration_windows, args.eval_windows)
            label = "gemma-3-270m (all 18 decoder layers)"
        from transformers import AutoModelForCausalLM

        dense = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        targets = decoder_linears(dense)
        batches = [calibration[i : i + args.batch_size] for i in range(0, len(calibration), args.batch_size)]
        torch.save(calibration.clone(), work / "calibration.pt")
        t = time.perf_counter()
        dense_scores = evaluate(dense, evals)
        eval_seconds = time.perf_counter() - t
        print(f"dense: ppl {dense_scores['in-domain']['ppl']:.2f}  OOD {dense_scores['ood']['ppl']:.2f}  "
              f"({eval_seconds:.1f}s to score)", flush=True)
        job = {"model": str(model_dir), "windows": str(work / "calibration.pt"), "targets": targets,
               "sparsity": args.sparsity, "damping": args.damping, "block_size": args.block_size,
               "batch_size": args.batch_size, "threads": args.threads, "pipeline": args.peer_pipeline}

        rows = [_scored(_row("dense", "dense", "ok", seconds=0.0, sparsity=linear_sparsity(dense, targets)),
                        dense_scores)]
        for method in args.methods:
            kw = METHODS[method]
            # robop-lightning
            model = copy.deepcopy(dense)
            report, seconds = robop_prune(model, batches, method, args)
            pruned = sorted(r["name"] for r in report.layers)
            if pruned != sorted(targets):
                raise RuntimeError(f"robop pruned {len(pruned)} linears, expected the {len(targets)} decoder linears")
            row = _scored(_row(method, "robop", "ok", seconds=seconds, sparsity=linear_sparsity(model, targets),
                               config={"uncertainty": "baseline", "damping": args.damping, **kw,
                                       **({"block_size": args.block_size} if method == "sparsegpt" else {})}),
                          evaluate(model, evals))
            rows.append(row)
            robop_zeros = {n: model.get_submodule(n).weight == 0 for n in targets}
            print(f"{method:9s} robop          {seconds:8.1f}s  ppl {row['ppl_in-domain']:9.2f}  "
                  f"OOD {row['ppl_ood']:9.2f}  sparsity {row['sparsity']:.4f}", flush=True)
            del model
            # llm-compressor, after robop's side has finished
            if peer["status"] != "ok":
                rows.append(_row(method, "llmcompressor", peer["status"]))
                del robop_zeros
                continue
            try:
                out = run_peer(method, job, venv, work, args.peer_timeout)
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                print(f"{method:9s} llmcompressor  FAILED: {err}", flush=True)
                rows.append(_row(method, "llmcompressor", "failed", error=str(err)[-3000:]))
                continue
            from safetensors.torch import load_file

            model = copy.deepcopy(dense)
            state = load_file(out.pop("weights"))
            if sorted(state) != sorted(n + ".weight" for n in targets):
                raise RuntimeError("the peer's weights do not name the decoder linears")
            with torch.no_grad():
                for name, w in state.items():
                    model.get_submodule(name.rsplit(".", 1)[0]).weight.copy_(w)
            agree = sum(int(((model.get_submodule(n).weight == 0) == z).sum()) for n, z in robop_zeros.items())
            row = _scored(_row(method, "llmcompressor", "ok", seconds=out.pop("seconds"),
                               sparsity=linear_sparsity(model, targets), child=out,
                               mask_agreement=agree / sum(z.numel() for z in robop_zeros.values())),
                          evaluate(model, evals))
            rows.append(row)
            print(f"{method:9s} llmcompressor  {row['seconds']:8.1f}s  ppl {row['ppl_in-domain']:9.2f}  "
                  f"OOD {row['ppl_ood']:9.2f}  sparsity {row['sparsity']:.4f}", flush=True)
            del model, state, robop_zeros

        for method in args.methods:  # further timed pairs, alternating sides; the seconds become medians
            mine = next(r for r in rows if r["method"] == method and r["side"] == "robop")
            theirs = next(r for r in rows if r["method"] == method and r["side"] == "llmcompressor")
            mine["seconds_all"] = [mine["seconds"]]
            if theirs["status"] == "ok":
                theirs["seconds_all"] = [theirs["seconds"]]
            for _ in range(args.repeats - 1):
                mine["seconds_all"].append(robop_prune(copy.deepcopy(dense), batches, method, args)[1])
                if theirs["status"] == "ok":
                    try:
                        theirs["seconds_all"].append(run_peer(method, job, venv, work, args.peer_timeout)["seconds"])
                    except (RuntimeError, subprocess.TimeoutExpired) as err:  # keep the pairs measured so far
                        print(f"{method:9s} llmcompressor repeat FAILED: {err}", flush=True)
                        mine["seconds_all"].pop()
                        break
                print(f"{method:9s} repeat         robop {mine['seconds_all'][-1]:.1f}s  llmcompressor "
                      f"{theirs.get('seconds_all', [math.nan])[-1]:.1f}s", flush=True)
            for r in (mine, theirs):
                if "seconds_all" in r:
                    r["seconds"] = statistics.median(r["seconds_all"])

    ratios = {}
    for method in args.methods:
        mine = next(r for r in rows if r["method"] == method and r["side"] == "robop")
        theirs = next(r for r in rows if r["method"] == method and r["side"] == "llmcompressor")
        if theirs["status"] != "ok":
            ratios[method] = None
            continue
        pairs = [a / b for a, b in zip(mine["seconds_all"], theirs["seconds_all"])]
        ratios[method] = {"seconds": mine["seconds"] / theirs["seconds"], "seconds_pairs": pairs}
        for s in SPLITS:
            a, b = mine["windows"][s], theirs["windows"][s]
            ratios[method][f"ppl_{s}"] = list(perplexity_ratio_ci(a["nll"], b["nll"], a["tokens"],
                                                                  resamples=args.resamples))

    info = R.machine()
    command = R.command_line("benchmarks/peer_llmcompressor.py", argv)
    protocol = {"model": label, "calibration_windows": len(calibration), "seqlen": seqlen,
                "eval_windows": {s: len(evals[s]) for s in SPLITS}, "sparsity": args.sparsity,
                "damping": args.damping, "block_size": args.block_size, "batch_size": args.batch_size,
                "threads": args.threads, "targets": len(targets), "repeats": args.repeats}
    md = [f"Command: `{command}`", "", f"Commit: {R.git_commit()}", "", f"Machine: {R.machine_line(info)}", "",
          f"Peer: llm-compressor {_peer_line(peer)} in `{venv.name}`, a child process run after robop's side "
          f"with the same {args.threads} torch thread(s); its pipeline `{args.peer_pipeline}`.", "",
          f"Model: {label}; {len(targets)} decoder linears pruned to {args.sparsity:g} (lm_head dense); "
          f"calibration {len(calibration)} windows of {seqlen} tokens (+BOS), identical on both sides, "
          f"{args.batch_size} per forward; perplexity on {len(evals['in-domain'])} held-out in-domain and "
          f"{len(evals['ood'])} OOD windows, both pruned models scored by the same code here. SparseGPT: "
          f"damping {args.damping:g} mean(diag H), block size {args.block_size}; Wanda: the same share "
          "pruned in every output row. Seconds: the pruning call alone (`prune_model` / `oneshot`), "
          f"model loading and scoring excluded; the median of {args.repeats} timed pair(s), robop's side then "
          "the peer's, one after the other (the first pair's models are the ones scored).", "",
          "Mask agreement: the share of decoder-linear weights that both sides prune or both keep.", "",
          "| method | side | prune s | ppl | OOD ppl | sparsity (decoder linears) | mask agreement |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            md.append(f"| {r['method']} | {r['side']} | {r['status']} | - | - | - | - |")
            continue
        secs = "-" if r["side"] == "dense" else _num(r["seconds"], ".2f")
        md.append(f"| {r['method']} | {r['side']} | {secs} | {_num(r['ppl_in-domain'])} | "
                  f"{_num(r['ppl_ood'])} | {_num(r['sparsity'], '.4f')} | {_num(r.get('mask_agreement'), '.4f')} |")
    md += ["", "Ratios robop / llm-compressor (below 1: robop faster or lower perplexity), perplexity with a "
           "paired bootstrap 95 % interval over windows:", "",
           "| method | time (median) | time per pair | ppl [95 % CI] | OOD ppl [95 % CI] |", "|---|---|---|---|---|"]
    for method, rt in ratios.items():
        if rt is None:
            md.append(f"| {method} | - | - | - | - |")
        else:
            per_pair = ", ".join(f"{x:.2f}" for x in rt["seconds_pairs"])
            md.append(f"| {method} | {rt['seconds']:.2f} | {per_pair} | {format_ci(*rt['ppl_in-domain'])} | "
                      f"{format_ci(*rt['ppl_ood'])} |")
    failed = [r for r in rows if r["status"] == "failed"]
    for r in failed:
        md += ["", f"llm-compressor {r['method']} failed:", "", "```", r["error"].strip()[-1500:], "```"]
    markdown = "\n".join(md) + "\n"
    payload = {"command": command, "commit": R.git_commit(), "machine": info, "protocol": protocol, "peer": peer,
               "rows": rows, "ratios": ratios}
    R.publish(args.out, payload, markdown)
    return payload


def robop_prune(model: nn.Module, batches: list, method: str, args) -> tuple:
    """robop-lightning's side of one job on ``model`` (in place): ``(report, seconds of prune_model)``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t = time.perf_counter()
        report = prune_model(model, batches, sparsity=args.sparsity, uncertainty="baseline",
                             damping=args.damping, progress=False,
                             solver_options={"block_size": args.block_size} if method == "sparsegpt" else None,
                             **METHODS[method])
        return report, time.perf_counter() - t


def _peer_line(peer: dict) -> str:
    v = peer.get("versions")
    if not v:
        return f"({peer['status']})"
    return f"{v['llmcompressor']} (torch {v['torch']}, transformers {v['transformers']})"


if __name__ == "__main__":
    main()
