"""dualenc: identity SAE + integration network (NFM), trained sequentially and jointly.

The method of O. Claflin, "Feature Integration Spaces: Joint Training Reveals Dual Encoding in
Neural Network Representations" (arXiv 2507.00269; docs/method.md, cited as §N): an SAE explains an
activation as a sparse sum of feature directions ("identity"); a Neural Factorization Machine reads
the same code and adds what depends on which features fire together ("integration"). The method
only (runner.py: text, LM, runs, flags; replicate.py: referee). Sections, in the order data flows:
  settings      Config: the method's settings; autocast, the one switch of precision
  extraction    the block hook, block-L activations, the keep mask and the z-score (§2), the
                split of windows (WindowSplit) and the prepared data (Activations)
  identity SAE  TopKEncode (the sparse backward, §15), TopKSAE (§3)
  integration   NFM (§4)
  dual encoder  DualEncoder: z-score + SAE + NFM, with switchable pathways (§5)
  training      train_step, OneProcess (what fit knows of data-parallel ranks), fit, and the three
                regimes side by side: sae, sequential, joint
  evaluation    evaluate (MSE, FVU), splice_metrics (per-token KL / CE), eps_random, splices (what
                a splice pass runs), evaluate_models
Dimension letters in names and shape comments: N windows (or tokens), T tokens per window, B batch,
D d_model, F features, K active features, M embedding dim, V vocabulary.
"""

import copy
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm


class DualencError(Exception):
    """A problem with the user's input or environment; the command line prints it as one line."""


# ----------------------------------------------------------------------------- settings

def setting(default, help, metavar=None):
    """A Config field; `help` and `metavar` are what the command line shows for it."""
    return field(default=default, metadata={"help": help, "metavar": metavar})


@dataclass
class Config:
    """The method's settings; runner.RunConfig adds the data's and the run's."""

    POSITIVE = ("features", "k", "embed_dim", "epochs", "batch_size", "eval_every", "curve_windows")
    PRECISIONS = ("fp32", "bf16")
    SCHEDULES = ("paper", "wsd")

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
                            "steps; wsd: constant, then decays over the last --wsd-decay (and a "
                            "checkpoint is a branch that decays on its own)", "{paper,wsd}")
    decay_frac: float = setting(0.8, "fraction of steps over which lr decays linearly (paper: 0.8)")
    wsd_decay: float = setting(0.2, "with --schedule wsd: the last fraction of a run's (or a "
                               "checkpoint branch's) steps, over which lr decays to --lr-end")
    warmup_steps: int = setting(0, "steps over which lr first rises linearly to --lr (paper: "
                                "none)")
    clip_norm: float = setting(0.0, "clip the gradient's norm to this before each step, 0 for "
                               "none (paper's code: 1.0)")
    eval_every: int = setting(100, "steps between held-out evaluations and log lines")
    curve_windows: int = setting(128, "held-out windows (the first ones, the same for every model) "
                                 "that the curve's evaluations read every --eval-every steps; the "
                                 "end and the checkpoints read them all")
    precision: str = setting("fp32", "training's forward: fp32, or bf16 autocast (matrix products "
                             "in bf16; weights, Adam, loss and evaluation fp32)", "{fp32,bf16}")
    extract_precision: str = setting("fp32", "the LM's forward when activations are extracted: "
                                     "fp32 or bf16 autocast (the splice's LM passes after the "
                                     "block are fp32, from these activations)",
                                     "{fp32,bf16}")
    outlier_factor: float = setting(10.0, "drop tokens whose norm exceeds this times the median "
                                    "(§2)")
    seed: int = setting(0, "seed for the data split, batch order, initialisation and the "
                        "epsilon-random baseline")

    def __post_init__(self):
        for name in self.POSITIVE:
            if (value := getattr(self, name)) <= 0:
                raise DualencError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if not (self.lr > 0 and self.outlier_factor > 0 and 0 <= self.dropout < 1):
            raise DualencError("--lr and --outlier-factor must be positive and --dropout in [0, 1)")
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


def autocast(precision, device):
    """The forward's precision, one switch for CPU and CUDA alike: "bf16" is torch's autocast, which
    runs matrix products (the SAE's encoder GEMM, the NFM's MLP, the LM's linear layers and
    attention) in bf16 with fp32 accumulation, and leaves the rest in the inputs' fp32:
    embedding_bags (the decoder, the NFM's linear term and its pair sums, whose square-minus-squares
    would cancel away bf16's 8 bits), reductions and losses. The parameters, their gradients and
    Adam's state are fp32 in either precision. Why: the encoder GEMM is most of a training step and
    the LM's forward all of extraction, and on a CPU with AVX-512 BF16 (or a GPU) both run several
    times faster in bf16 (bench_dualenc.py --precision)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# ----------------------------------------------------------------------------- extraction

def decoder_blocks(lm):
    """The ModuleList of decoder blocks, found by its length: any causal LM, no per-model table."""
    n = lm.config.num_hidden_layers
    blocks = [m for m in lm.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not blocks:
        raise DualencError(f"cannot find the {n} decoder blocks of {type(lm).__name__}")
    return blocks[0]


@contextmanager
def block_hook(lm, layer, fn):
    """While active, every forward calls fn(h) on block `layer`'s OUTPUT h [B, T, D]; a returned
    tensor replaces h. The one hook on the residual stream (§2: not output_hidden_states, off by
    one and normed). Once fired, info["tuple"] says if blocks return (h, ...) rather than h."""
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


@torch.no_grad()
def extract_activations(lm, input_ids_NT, layer, batch_size=16, precision="fp32"):
    """Block-`layer` outputs [N, T, D] (fp32, on the LM's device) for the windows input_ids_NT, the
    LM run in `precision` (autocast: in bf16 the blocks' products are bf16, their sum fp32)."""
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


def keep_mask(norms_NT, max_norm):
    """Not position 0 (attention sink) and norm <= max_norm (massive activations, §2)."""
    keep_NT = norms_NT <= max_norm
    keep_NT[:, 0] = False
    return keep_NT


def fit_normalisation(x_ND):
    """Per-dimension mean and std (the paper's z-score, §2), from the kept training tokens."""
    return x_ND.mean(0), x_ND.std(0).clamp_min(1e-6)  # clamp: a dead dimension must not divide by 0


@dataclass
class WindowSplit:
    """Which windows train and which are held out, and which tokens count (§2, §5). Windows, not
    tokens, are split: a window's tokens share a text, so they go to one side together."""
    train_W: torch.Tensor  # [W_train] window indices, the training set
    eval_W: torch.Tensor  # [W_eval] the held-out windows
    splice_W: torch.Tensor  # [W_splice] the first held-out windows, spliced for KL / CE
    keep_NT: torch.Tensor  # [N, T] over all windows: not position 0, not a massive norm
    max_norm: float  # the massive-norm threshold, from the training windows alone
    n_massive: int  # tokens beyond it (position 0 aside), in all windows


def split_windows(norms_NT, order_W, outlier_factor, n_splice):
    """The 90/10 split of the windows in order_W (the first 90 % train; §5), the keep mask with its
    threshold outlier_factor x the training tokens' median norm (§2), and the first n_splice
    held-out windows (at least one) to splice."""
    n_train = int(0.9 * len(order_W))
    train_W, eval_W = order_W[:n_train], order_W[n_train:]
    max_norm = outlier_factor * norms_NT[train_W][:, 1:].median().item()
    return WindowSplit(train_W=train_W, eval_W=eval_W,
                       splice_W=eval_W[:max(1, min(len(eval_W), n_splice))],
                       keep_NT=keep_mask(norms_NT, max_norm), max_norm=max_norm,
                       n_massive=int((norms_NT[:, 1:] > max_norm).sum()))


def curve_subset(x_eval_ND, eval_window_N, n_windows):
    """The kept tokens of the first n_windows held-out windows (a copy, [N', D]): what the curve's
    evaluations read, the same windows for every model. At the paper's density a pass over all
    held-out tokens costs about 50 training steps; the end and the checkpoints still read them
    all."""
    return x_eval_ND[(eval_window_N.cpu() < n_windows).nonzero()[:, 0]]


@dataclass
class Activations:
    """Block-L activations ready to train on and to evaluate with, made by prepare from a
    WindowSplit. The token sets are z-scored [N, D]: tensors, or store.Tokens, which read a store
    on disk batch by batch and answer the same len, [idx], shape, device and split."""
    x_train: torch.Tensor  # [N_train, D] the training windows' kept tokens
    x_eval: torch.Tensor  # [N_eval, D] the held-out windows' kept tokens
    x_curve: torch.Tensor  # [N_curve, D] those of the first curve_windows held-out windows
    eval_window: torch.Tensor  # [N_eval] each held-out token's window: the bootstrap's unit (§9)
    mean: torch.Tensor  # [D] the z-score (§2), fitted on the training tokens
    std: torch.Tensor  # [D]
    eval_ids: torch.Tensor  # [W_eval, T] the held-out windows' token ids: where a token stands
    eval_keep: torch.Tensor  # [W_eval, T] and which of their positions count
    splice_ids: torch.Tensor  # [W_splice, T] the windows spliced for KL / CE
    splice_keep: torch.Tensor  # [W_splice, T]
    splice_acts: torch.Tensor  # [W_splice, T, D] their clean block-L outputs, reused by each splice
    layer: int  # the block studied
    n_blocks: int  # of the LM's blocks
    n_windows: int  # in all; each lost its position 0
    max_norm: float  # the massive-norm threshold (WindowSplit)
    n_massive: int  # tokens dropped by it
    corpus_sha1: str  # the sha1 of all token windows in the text's order: which text the run read

    @property
    def n_eval_windows(self):
        return len(self.eval_ids)


def prepare(split, windows_NT, tokens, mean_D, std_D, splice_acts_NTD, layer, n_blocks,
            curve_windows, corpus_sha1):
    """The Activations of a split: tokens(windows_W) gives those windows' kept tokens, z-scored
    with mean_D and std_D, in the windows' order."""
    x_eval_ND = tokens(split.eval_W)
    eval_window_N = split.keep_NT[split.eval_W].nonzero()[:, 0]
    return Activations(
        x_train=tokens(split.train_W), x_eval=x_eval_ND,
        x_curve=curve_subset(x_eval_ND, eval_window_N, curve_windows), eval_window=eval_window_N,
        mean=mean_D, std=std_D,
        eval_ids=windows_NT[split.eval_W], eval_keep=split.keep_NT[split.eval_W],
        splice_ids=windows_NT[split.splice_W], splice_keep=split.keep_NT[split.splice_W],
        splice_acts=splice_acts_NTD, layer=layer, n_blocks=n_blocks, n_windows=len(windows_NT),
        max_norm=split.max_norm, n_massive=split.n_massive, corpus_sha1=corpus_sha1)


# ----------------------------------------------------------------------------- identity SAE

class TopKEncode(torch.autograd.Function):
    """f = TopK_k(ReLU(x W_enc + b_enc)) as (values, indices) [B, K]; the backward runs through the
    k selected only (§15), O(B K D), not autograd's two O(B F D) GEMMs. With g = grad_f * [f > 0]:
        grad_b_enc[i]    = sum_{(b,j): idx_bj = i} g_bj
        grad_x[b]        = sum_j g_bj W_enc[:, idx_bj]        an embedding_bag over W_enc^T
        grad_W_enc[:, i] = sum_{(b,j): idx_bj = i} g_bj x_b   its weight gradient
    Under bf16 autocast the forward's product and top-k are bf16 (they pick which k fire); the
    values come out in x's dtype (fp32, to bf16's precision) and the backward, cheap, is fp32
    throughout: its sums over tokens accumulate in fp32, as the dense backward's bf16 GEMM
    accumulates them."""

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


class TopKSAE(nn.Module):
    """The identity SAE (§3):
        f   = TopK_k( ReLU( W_enc x + b_enc ) )    the k largest, kept as (values, indices)
        x_s = W_dec f + b_dec
    The paper's: free decoder norms (§7 needs them), no sparsity penalty, init "paper" (decoder as
    nn.Linear(F, D)'s default uniform(+-1/sqrt(F)), row norm ~sqrt(D / 3F), encoder its transpose;
    "unit", unit-norm rows, trains 15-20 % worse in short runs). Gao et al.'s TopK SAE differs in
    three ways this one does not follow, since the paper does not: it subtracts b_dec from x before
    encoding, keeps the decoder's feature directions at unit norm, and adds the AuxK loss for dead
    features. W_dec is [F, D] (SAELens'): decoding is an embedding_bag (~5x a dense matmul's speed
    on CPU); encoding is dense, since every feature competes in TopK."""

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

    def encode(self, x_BD):
        """The code f as its k largest values and their feature indices: ([B, K], [B, K])."""
        return TopKEncode.apply(x_BD, self.W_enc, self.b_enc, self.k)

    def decode(self, vals_BK, idx_BK):
        x_BD = F.embedding_bag(idx_BK, self.W_dec, per_sample_weights=vals_BK, mode="sum")
        return x_BD + self.b_dec

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
        pair(f)        = 1/2 [ (sum_i f_i v_i)^2 - sum_i (f_i v_i)^2 ]
                       = sum_{i<j} f_i f_j (v_i * v_j)
        interaction(f) = W_2 Dropout(ReLU(W_1 pair(f) + c_1))               M -> M -> D
    over the n_read largest active codes; pair's sums are embedding_bags, O(B K M), no [B, F, M].
    share = (rank, ranks): which equal share of a data-parallel step's global batch this forward
    sees ((0, 1) in one process); dropout draws the global batch's mask and keeps the share's rows,
    so the ranks together drop what one process would (every rank holds the same random state).
    Init (paper): v ~ N(0, 0.05^2), weights ~ N(0, 0.01^2). No b_lin, c_2 (paper's output biases):
    copies of the SAE's b_dec (trained, identical) that zeroing a pathway would partly take away;
    the frozen b_dec already centres sequential's residual. linear=False: no linear term (§9.3)."""

    def __init__(self, n_features, d_model, embed_dim, n_read=None, dropout=0.15, linear=True):
        super().__init__()
        # what rebuilds it: a checkpoint keeps these beside the weights
        self.config = dict(n_features=n_features, d_model=d_model, embed_dim=embed_dim,
                           n_read=n_read, dropout=dropout, linear=linear)
        self.n_read, self.dropout_p, self.share = n_read, dropout, (0, 1)
        self.embed = nn.Parameter(0.05 * torch.randn(n_features, embed_dim))  # v_i, [F, M]
        self.W_lin = nn.Parameter(0.01 * torch.randn(n_features, d_model)) if linear else None
        self.W_1 = nn.Linear(embed_dim, embed_dim)  # its bias is c_1
        self.W_2 = nn.Linear(embed_dim, d_model, bias=False)
        nn.init.normal_(self.W_1.weight, std=0.01)
        nn.init.zeros_(self.W_1.bias)
        nn.init.normal_(self.W_2.weight, std=0.01)

    def read(self, vals_BK, idx_BK):
        if self.n_read is None or self.n_read >= vals_BK.shape[-1]:
            return vals_BK, idx_BK
        vals_BK, j = vals_BK.topk(self.n_read, dim=-1, sorted=False)
        return vals_BK, idx_BK.gather(-1, j)

    def pair(self, vals_BK, idx_BK):
        sum_BM = F.embedding_bag(idx_BK, self.embed, per_sample_weights=vals_BK, mode="sum")
        sum_sq_BM = F.embedding_bag(idx_BK, self.embed.square(),
                                    per_sample_weights=vals_BK.square(), mode="sum")
        return 0.5 * (sum_BM.square() - sum_sq_BM)

    def hidden(self, vals_BK, idx_BK):
        """h = W_1 pair(f) + c_1, the interaction MLP's hidden layer before its ReLU: [B, M]."""
        return self.W_1(self.pair(vals_BK, idx_BK))

    def interaction(self, h_BM):
        """interaction(f) = W_2 Dropout(ReLU(h)) from the hidden layer h = hidden(f): [B, D]."""
        return self.W_2(self.dropout(F.relu(h_BM)))

    def dropout(self, a_BM):
        """Dropout: in one process on the CPU, nn.Dropout's draws to the bit; under data parallelism
        the global batch's mask, cut to this rank's rows (self.share)."""
        if not self.training or self.dropout_p == 0:
            return a_BM
        (rank, ranks), B = self.share, len(a_BM)
        scale_BM = a_BM.new_empty((B * ranks, a_BM.shape[1])).bernoulli_(1 - self.dropout_p)
        scale_BM.div_(1 - self.dropout_p)
        return a_BM * scale_BM[rank * B:(rank + 1) * B]

    def linear(self, vals_BK, idx_BK):
        if self.W_lin is None:
            return vals_BK.new_zeros(len(vals_BK), self.W_2.out_features)
        return F.embedding_bag(idx_BK, self.W_lin, per_sample_weights=vals_BK, mode="sum")

    def forward(self, vals_BK, idx_BK):
        """(linear(f), interaction(f)), each [B, D]; linear is zeros when the model has none."""
        vals_BK, idx_BK = self.read(vals_BK, idx_BK)
        # interaction first: autograd then sums the codes' gradients in the trained models' order
        interaction_BD = self.interaction(self.hidden(vals_BK, idx_BK))
        return self.linear(vals_BK, idx_BK), interaction_BD


# ----------------------------------------------------------------------------- dual encoder

PATHWAYS = ("linear", "interaction")


class DualEncoder(nn.Module):
    """x_hat = x_s + linear(f) + interaction(f) (§5; nfm=None: a plain SAE), pathways switchable,
    in the z-scored space; the statistics (§2) are buffers, so reconstruct() maps raw to raw."""

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


# ----------------------------------------------------------------------------- training

def lr_at(step, steps, cfg):
    """The rate at `step` of a run of `steps` steps. "paper" (§5): lr decays linearly to
    lr_end * lr over the first decay_frac of the steps. "wsd" (warm-up, stable, decay): lr, then a
    linear decay to lr_end * lr over the last wsd_decay of the steps; until then the rate does not
    depend on `steps`, so a run's state there is also the start of a shorter run's decay (a
    checkpoint's branch, decay_branch). warmup_steps > 0: first a linear rise,
    lr * (step + 1) / warmup_steps, until it meets the schedule."""
    if cfg.schedule == "paper":
        t = min(step / max(1, cfg.decay_frac * steps), 1.0)
    else:
        t = min(max(0.0, step - (1 - cfg.wsd_decay) * steps) / (cfg.wsd_decay * steps), 1.0)
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return cfg.lr * min(warm, 1 - t * (1 - cfg.lr_end))


def train_step(model, optimiser, x_BD, precision="fp32", clip_norm=0.0):
    """One step on MSE(x_hat, x); SAE frozen, this is exactly MSE(linear + interaction, x - x_s).
    The forward runs in `precision` (autocast); x_hat comes out fp32, and the loss, the backward's
    gradients and Adam are fp32. clip_norm > 0 scales the gradient down to that norm (over the
    parameters the optimiser trains, together) where it is larger, as the paper's code does at
    1.0."""
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
    """The mean of the tokens x_ND, [D], summed in batches: x_ND may be read from disk."""
    return sum(x_BD.sum(0) for x_BD in x_ND.split(batch_size)) / len(x_ND)


def evaluate(model, x_ND):
    """z-scored MSE per element and FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (§6)."""
    sse = sq_errors(model, x_ND).sum()
    mean_D = mean_token(x_ND)
    sst = sum((x_BD - mean_D).square().sum() for x_BD in x_ND.split(EVAL_BATCH))
    return {"mse": (sse / (len(x_ND) * x_ND.shape[1])).item(), "fvu": (sse / sst).item()}


def per_epoch_steps(x_train_ND, cfg):
    per_epoch = len(x_train_ND) // cfg.batch_size
    if per_epoch == 0:
        raise DualencError(f"{len(x_train_ND)} training tokens are fewer than "
                           f"--batch-size {cfg.batch_size}")
    return per_epoch


class OneProcess:
    """How fit trains across processes: here, in one. distributed.DataParallel is the same four
    members over torch.distributed's ranks, each training on its share of every global batch."""
    main = True  # this process evaluates, logs and saves

    def wrap(self, model):
        """The module the steps run through (DistributedDataParallel: it averages gradients)."""
        return model

    def share(self, rows_B):
        """This process's rows of a global batch."""
        return rows_B

    def gather(self, value):
        """A scalar of every process, [ranks]."""
        return value.reshape(1)


def batches(x_train_ND, cfg, start, stop, parallel=OneProcess()):
    """(step, batch [B, D]) for steps start..stop-1: each epoch in its own order, drawn from a seed
    of its own, so that any step's batch is known without replaying the steps before it (resuming,
    branching), and every model of a seed sees the same batches; under data parallelism, this
    rank's share of each (its rows only are read)."""
    per_epoch = per_epoch_steps(x_train_ND, cfg)
    for step in range(start, stop):
        j = step % per_epoch
        if j == 0 or step == start:
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step // per_epoch)
            order = torch.randperm(len(x_train_ND), generator=gen).to(x_train_ND.device)
        yield step, x_train_ND[parallel.share(order[j * cfg.batch_size:(j + 1) * cfg.batch_size])]


def set_lr(optimiser, lr):
    for group in optimiser.param_groups:
        group["lr"] = lr


def branch_start(stop, cfg):
    """The step at which a wsd branch to `stop` leaves the main run: its decay's first step."""
    return math.floor((1 - cfg.wsd_decay) * stop)


def decay_branch(model, optimiser, x_train_ND, cfg, stop, parallel=OneProcess()):
    """A finished model of `stop` steps (wsd), branched off a longer run at branch_start(stop):
    a copy of the run's model and Adam state trained on the run's own batches up to `stop` with
    its own decay, lr_at(step, stop), data-parallel as the run. The run's model, optimiser and
    random state are untouched, so its own steps go on bit for bit as without the branch."""
    branch = copy.deepcopy(model)
    position = {id(p): i for i, p in enumerate(model.parameters())}
    copies = list(branch.parameters())
    params = [copies[position[id(p)]] for p in optimiser.param_groups[0]["params"]]
    branch_optimiser = torch.optim.Adam(params, fused=True)  # its settings come with the state
    # a deep copy: load_state_dict may keep the run's own moment tensors, which the branch updates
    branch_optimiser.load_state_dict(copy.deepcopy(optimiser.state_dict()))
    devices = [x_train_ND.device] if x_train_ND.device.type == "cuda" else []
    trainer = parallel.wrap(branch)
    with torch.random.fork_rng(devices):  # dropout's draws in the branch leave the run's alone
        for step, batch_BD in batches(x_train_ND, cfg, branch_start(stop, cfg), stop, parallel):
            set_lr(branch_optimiser, lr_at(step, stop, cfg))
            train_step(trainer, branch_optimiser, batch_BD, cfg.precision, cfg.clip_norm)
    return branch.eval()


def fit(model, params, x_train_ND, x_curve_ND, cfg, name, state=None, on_eval=None, until=None,
        length=None, branches=(), on_branch=None, parallel=OneProcess()):
    """Adam on MSE(x_hat, x) over `params`, the same batches and steps for every model of a seed,
    the forward in cfg.precision; evaluates on the held-out tokens x_curve_ND (curve_subset) every
    eval_every steps and at the last, then on_eval(step, model). `state` (checkpoint.TrainState,
    or None): training resumes from what it holds, and it is saved anew at each evaluation;
    `until` stops after that step; `length` (default: cfg.epochs epochs) is the run's length,
    where its schedule ends. With cfg.schedule "wsd", each step of `branches` gets a finished
    model of its own (decay_branch), given to on_branch(step, model). `parallel` (OneProcess, or
    distributed.DataParallel): each rank steps on its share of the batch; the main one alone
    evaluates, calls back and saves (and returns the history). Returns the history."""
    params = [p for p in params if p.requires_grad]
    # fused: one kernel for all parameters, ~7x faster than the default Adam step on CPU (measured)
    optimiser = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), fused=True)
    steps = length or cfg.epochs * per_epoch_steps(x_train_ND, cfg)
    last = steps if until is None else min(until, steps)
    if branches and cfg.schedule != "wsd":
        raise DualencError("checkpoint branches need --schedule wsd")
    before_end = [b for b in branches if b < steps]
    branch_at = {branch_start(b, cfg): b for b in before_end}
    if len(branch_at) < len(before_end):
        raise DualencError(f"checkpoints {sorted(branches)} would branch off at the same step; "
                           "lower --wsd-decay")
    start, history = (0, []) if state is None else state.load(model, optimiser)
    trainer = parallel.wrap(model)
    loss_sum, n_sum = 0.0, 0
    model.train()
    bar = tqdm(batches(x_train_ND, cfg, start, last, parallel), desc=name, leave=False,
               initial=start, total=last, disable=not parallel.main)
    for step, batch_BD in bar:
        if step in branch_at:  # before this step: the branch starts from the same state
            branch = decay_branch(model, optimiser, x_train_ND, cfg, branch_at[step], parallel)
            if parallel.main:
                on_branch(branch_at[step], branch)
        set_lr(optimiser, lr_at(step, steps, cfg))
        loss = train_step(trainer, optimiser, batch_BD, cfg.precision, cfg.clip_norm)
        loss_sum = loss_sum + loss  # a tensor: summed on the device, read once per cadence
        n_sum += 1
        if (step + 1) % cfg.eval_every == 0 or step + 1 == last:
            # one host sync per cadence, not per step; every rank stops if any rank's loss is bad
            losses = parallel.gather(loss_sum / n_sum).tolist()
            bad = [rank for rank, value in enumerate(losses) if not math.isfinite(value)]
            if bad:  # averaged gradients carry one rank's NaN to every rank in a step
                where = f" on rank {', '.join(map(str, bad))}" if len(losses) > 1 else ""
                raise DualencError(f"{name}: training loss became {losses[bad[0]]}{where} at "
                                   f"step {step + 1}")
            loss_sum, n_sum = 0.0, 0
            if not parallel.main:
                continue
            train_loss = sum(losses) / len(losses)
            ev = evaluate(model, x_curve_ND)
            history.append({"step": step + 1, "train_mse": train_loss, **ev})
            bar.write(f"{name:>16s} step {step + 1:5d}/{steps}  train mse {train_loss:.4f}  "
                      f"held-out mse {ev['mse']:.4f}  fvu {ev['fvu']:.4f}")
            if on_eval is not None:
                on_eval(step + 1, model)
            if state is not None:
                state.save(step + 1, model, optimiser, history)
    model.eval()
    return history


def train_sae(model, x_train_ND, x_curve_ND, cfg, name="sae", **kw):
    """The SAE alone: the baseline (§9.1, and §9.5's twin) and sequential's stage 1. kw: fit's."""
    return fit(model, model.sae.parameters(), x_train_ND, x_curve_ND, cfg, name, **kw)


def train_sequential(model, x_train_ND, x_curve_ND, cfg, name="sequential", **kw):
    """Stage 2 of sequential training: the SAE is frozen and the NFM fits its residual (§5)."""
    model.sae.requires_grad_(False)
    return fit(model, model.nfm.parameters(), x_train_ND, x_curve_ND, cfg, name, **kw)


def train_joint(model, x_train_ND, x_curve_ND, cfg, name="joint", **kw):
    """SAE and NFM from scratch together on one loss MSE(x_s + linear + interaction, x) (§5)."""
    return fit(model, model.parameters(), x_train_ND, x_curve_ND, cfg, name, **kw)


def build(cfg, data, sae=None, nfm=None, n_features=None):
    """A fresh model from cfg.seed: a TopK SAE of n_features (default cfg.features), or the given
    one, and nfm None, "linear" (the NFM of §4) or "interaction" (no linear term, §9.3)."""
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

def eps_random(h, h_hat, generator=None):
    """Gurnee's epsilon-random baseline (§6): per token, h_hat - h's norm in a random direction."""
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
    replaced by fn(h) (raw space) at the kept positions (§6, §10, SAELens' protocol). Per token:
        kl[name]   [N, T]  KL(P_clean || P_spliced) at the next token, from fp32 log-softmaxes
        nll[name]  [N, T]  cross-entropy of the TRUE next token; also "clean"
    0 outside kl_mask (keep_NT; default: all but position 0) and nll_mask (kept, not last); rows are
    windows, the bootstrap's unit (§9.6). One clean pass a batch serves all; given acts_NTD (clean
    block-L outputs), cached_prefix skips blocks 0..L. A pass holds <= 3 [B, T, V] fp32 tensors."""
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
    """Every model alike (§6): MSE, FVU, spliced KL, CE, CE recovered against zero-ablation, KL_eps
    (its epsilon-random twin), KL / KL_eps (pathology ratio). Returns (the figures of each model,
    the clean CE, the zero-ablation CE)."""
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


if __name__ == "__main__":  # hand over to the runner: text, LM, run folder, the printed table
    import runpy
    runpy.run_module("runner", run_name="__main__")
