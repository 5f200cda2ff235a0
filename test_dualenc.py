"""Tests of dualenc.py, the method, written as examples of its API: synthetic activations, and tiny
random transformers models built from a config for the hook and the splice. Self-contained: copied
beside dualenc.py into any folder, `python -m pytest test_dualenc.py` passes there, offline.

The sections follow dualenc.py's: the SAE and the NFM, their fast paths against their dense forms;
training; the hook, extraction and splicing; the run (text, split, end to end on a tiny model);
bad input. The referee's tests import the
sizes, the synthetic data and the tiny Llama from here."""

import ast
import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import dualenc as de

D, FEATS, K, M = 16, 64, 8, 12  # d_model, features, active, NFM embedding: tiny, for the CPU


def small_cfg(**kw):
    return de.Config(**{"features": FEATS, "k": K, "embed_dim": M, "epochs": 4, "batch_size": 64,
                        "eval_every": 10, "lr": 3e-3, **kw})


def synthetic_acts(n=1024, d=D, seed=0):
    """Sparse-ish data with pairwise structure, so every model has something to learn."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(32, d, generator=g)
    w = F.relu(torch.randn(n, 32, generator=g) - 1.0)
    x = w @ atoms + 0.5 * (w[:, :1] * w[:, 1:2]) * atoms[2]
    return (x - x.mean(0)) / x.std(0)


def tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=97, n_embd=32, n_layer=4, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


TINY_LMS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


# ----------------------------------------------------------------------------- SAE and NFM

def test_sae_shapes_and_exactly_k_active():
    sae = de.TopKSAE(D, FEATS, K)
    x = torch.randn(5, D)
    vals, idx = sae.encode(x)
    assert vals.shape == idx.shape == (5, K)
    codes = de.to_dense(vals, idx, FEATS)
    assert codes.shape == (5, FEATS)
    assert ((codes != 0).sum(-1) == K).all()
    recon, (vals2, idx2) = sae(x)
    assert recon.shape == (5, D)
    torch.testing.assert_close(recon, codes @ sae.W_dec + sae.b_dec)  # x_s = f @ W_dec + b_dec


@pytest.mark.parametrize("b,d,f,k,bias,x_grad", [
    (512, 64, 1024, 16, 0.0, True), (97, 48, 300, 7, 0.0, False),
    (64, 32, 200, 180, -0.5, True)])  # the last: many f = 0
def test_the_sparse_encoder_backward_equals_the_dense_one(b, d, f, k, bias, x_grad):
    g = torch.Generator().manual_seed(b)
    x = torch.randn(b, d, generator=g).requires_grad_(x_grad)
    sae = de.TopKSAE(d, f, k)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, f, generator=g) / d ** 0.5)
        sae.b_enc.copy_(bias + 0.1 * torch.randn(f, generator=g))
    (vals, idx), (dense_vals, dense_idx) = sae.encode(x), sae.encode_dense(x)
    assert torch.equal(vals, dense_vals) and torch.equal(idx, dense_idx)
    inputs, grad_vals = ([t for t in (x, sae.W_enc, sae.b_enc) if t.requires_grad],
                         torch.randn(vals.shape, generator=g))
    for sparse, dense in zip(torch.autograd.grad(vals, inputs, grad_vals),
                             torch.autograd.grad(dense_vals, inputs, grad_vals)):
        torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    if bias < 0:  # the ReLU's mask matters here: a third or more of the selected values are 0
        assert (vals == 0).float().mean() > 0.3


def test_the_sparse_encoder_backward_equals_the_dense_one_in_bf16():
    # Under autocast both pick the same k from the same bf16 product; the dense backward's GEMMs
    # round their outputs to bf16 (8 bits), the sparse one sums in fp32: equal to bf16's precision.
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 64, generator=g).requires_grad_()
    W_enc = (torch.randn(64, 1024, generator=g) / 8).requires_grad_()
    b_enc = (0.1 * torch.randn(1024, generator=g)).requires_grad_()

    def dense_bf16(x_BD, W_enc_DF, b_enc_F, k):  # TopKEncode.forward, differentiated by autograd
        pre_BF = x_BD @ W_enc_DF
        return F.relu(pre_BF + b_enc_F.to(pre_BF.dtype)).topk(k, dim=-1, sorted=False)
    with de.autocast("bf16", x.device):
        (vals, idx), (dense_vals, dense_idx) = (de.TopKEncode.apply(x, W_enc, b_enc, 16),
                                                dense_bf16(x, W_enc, b_enc, 16))
    assert dense_vals.dtype == torch.bfloat16 and vals.dtype == torch.float32
    assert torch.equal(idx, dense_idx) and torch.equal(vals, dense_vals.float())
    grad_vals = torch.randn(vals.shape, generator=g)
    sparse = torch.autograd.grad(vals, (x, W_enc, b_enc), grad_vals)
    dense = torch.autograd.grad(dense_vals, (x, W_enc, b_enc), grad_vals.bfloat16())
    for s, d in zip(sparse, dense):
        assert s.dtype == d.dtype == torch.float32
        assert (s - d).abs().max() <= 2 ** -7 * d.abs().max()  # bf16's rounding, and some


def test_the_sparse_encoder_passes_gradcheck():
    g = torch.Generator().manual_seed(5)
    x, W_enc, b_enc = (torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
                       for shape in [(6, 5), (5, 12), (12,)])
    pre = (x @ W_enc + b_enc).detach()  # a step of 1e-6 must not reorder TopK nor cross ReLU's kink
    assert pre.abs().min() > 1e-4 and (pre.sort(-1).values.diff(dim=-1) > 1e-4).all()
    assert torch.autograd.gradcheck(lambda *a: de.TopKEncode.apply(*a, 7)[0], (x, W_enc, b_enc))


def test_sae_starts_as_the_papers_linear_layer_with_the_encoder_its_transpose():
    d, f = 576, 4608
    sae = de.TopKSAE(d, f, K)
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    # nn.Linear(F, D)'s default: uniform(-1/sqrt(F), 1/sqrt(F))
    assert sae.W_dec.abs().max() <= f ** -0.5
    assert sae.W_dec.norm(dim=-1).mean().item() == pytest.approx((d / (3 * f)) ** 0.5,  # 0.20
                                                                 rel=0.01)
    assert (sae.b_enc == 0).all() and (sae.b_dec == 0).all()
    unit = de.TopKSAE(d, f, K, init="unit")
    torch.testing.assert_close(unit.W_dec.norm(dim=-1), torch.ones(f))
    torch.testing.assert_close(unit.W_enc, unit.W_dec.T)
    with pytest.raises(ValueError, match="init"):
        de.TopKSAE(d, f, K, init="xavier")


def test_nfm_shapes():
    nfm = de.NFM(FEATS, D, M)
    vals, idx = de.TopKSAE(D, FEATS, K).encode(torch.randn(5, D))
    linear, interaction = nfm(vals, idx)
    assert linear.shape == interaction.shape == (5, D)
    assert nfm.pair(vals, idx).shape == (5, M)


def test_pair_equals_sum_over_pairs():
    nfm = de.NFM(FEATS, D, M)
    vals, idx = torch.rand(3, K), torch.stack([torch.randperm(FEATS)[:K] for _ in range(3)])
    v = nfm.embed
    explicit = torch.stack([
        sum(vals[b, i] * vals[b, j] * v[idx[b, i]] * v[idx[b, j]]
            for i, j in itertools.combinations(range(K), 2))
        for b in range(3)])
    torch.testing.assert_close(nfm.pair(vals, idx), explicit, rtol=1e-5, atol=1e-6)


def test_nfm_reads_only_the_largest_codes():
    nfm = de.NFM(FEATS, D, M, n_read=3).eval()
    vals = torch.tensor([[5.0, 0.1, 4.0, 0.2, 3.0]])
    idx = torch.tensor([[1, 2, 3, 4, 5]])
    keep = torch.tensor([[5.0, 4.0, 3.0]]), torch.tensor([[1, 3, 5]])
    for a, b in zip(nfm(vals, idx), nfm(*keep)):
        torch.testing.assert_close(a, b)


def test_the_pair_sums_equal_the_dense_pair_sum_in_value_and_gradient():
    torch.manual_seed(0)
    nfm = de.NFM(FEATS, D, M)
    vals, idx = de.TopKSAE(D, FEATS, K).encode(torch.randn(6, D))
    vals = vals.detach().requires_grad_(True)
    outputs, grads = [], []
    for pair in (nfm.pair, nfm.pair_dense):  # the embedding_bag identity, then every pair i < j
        out = pair(vals, idx)
        out.sin().sum().backward()
        outputs.append(out)
        grads.append((vals.grad.clone(), nfm.embed.grad.clone()))
        vals.grad = nfm.embed.grad = None
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_sparse_decoder_equals_the_dense_product():
    sae = de.TopKSAE(D, FEATS, K)
    vals, idx = sae.encode(torch.randn(6, D))
    torch.testing.assert_close(sae.decode(vals, idx), sae.decode_dense(vals, idx))


def test_sparse_sae_decode_equals_dense_matmul_in_gradients():
    sae = de.TopKSAE(D, FEATS, K)
    vals, idx = sae.encode(torch.randn(6, D))
    sae.decode(vals, idx).sin().sum().backward()
    sparse_grad = sae.W_dec.grad.clone()
    sae.W_dec.grad = None
    (de.to_dense(vals.detach(), idx, FEATS) @ sae.W_dec + sae.b_dec).sin().sum().backward()
    torch.testing.assert_close(sparse_grad, sae.W_dec.grad)


def test_nfm_without_linear_term_outputs_zero_linear():
    nfm = de.NFM(FEATS, D, M, linear=False)
    linear, interaction = nfm(*de.TopKSAE(D, FEATS, K).encode(torch.randn(4, D)))
    assert (linear == 0).all() and interaction.abs().sum() > 0
    assert nfm.W_lin is None


def test_dual_encoder_sums_its_pathways():
    model = de.DualEncoder(de.TopKSAE(D, FEATS, K), de.NFM(FEATS, D, M)).eval()
    x = torch.randn(6, D)
    x_s, code = model.sae(x)
    linear, interaction = model.nfm(*code)
    torch.testing.assert_close(model(x), x_s + linear + interaction)
    with de.pathways(model):
        torch.testing.assert_close(model(x), x_s)
    with de.pathways(model, "interaction"):
        torch.testing.assert_close(model(x), x_s + interaction)
    assert model.pathways == de.PATHWAYS


def test_reconstruct_inverts_the_normalisation():
    mean, std = torch.randn(D), torch.rand(D) + 0.5
    model = de.DualEncoder(de.TopKSAE(D, FEATS, K), None, mean, std).eval()
    h = torch.randn(2, 3, D) * 4
    expected = model(((h - mean) / std).reshape(-1, D)).reshape(h.shape) * std + mean
    torch.testing.assert_close(model.reconstruct(h), expected)


def test_merged_decoder_is_exact_only_on_the_codes_the_nfm_reads():
    x = torch.randn(7, D)
    for n_read in (K, K // 2):
        model = de.DualEncoder(de.TopKSAE(D, FEATS, K), de.NFM(FEATS, D, M, n_read=n_read)).eval()
        vals, idx = model.sae.encode(x)
        codes = de.to_dense(vals, idx, FEATS)
        read = de.to_dense(*model.nfm.read(vals, idx), FEATS)
        with de.pathways(model, "linear"):
            x_hat = model(x)
        # x_s + linear(f) = W_dec f + W_lin f_read + b_dec, whatever n_read is
        expected = codes @ model.sae.W_dec + read @ model.nfm.W_lin + model.sae.b_dec
        torch.testing.assert_close(x_hat, expected, rtol=1e-5, atol=1e-5)
        merged = codes @ (model.sae.W_dec + model.nfm.W_lin) + model.sae.b_dec
        assert torch.allclose(x_hat, merged, rtol=1e-5, atol=1e-5) == (n_read == K)


def test_an_ablation_keeps_the_one_output_bias():
    model = de.DualEncoder(de.TopKSAE(D, FEATS, K), de.NFM(FEATS, D, M)).eval()
    nn.init.normal_(model.sae.b_dec)
    biases = [n for n, _ in model.named_parameters()
              if "bias" in n or n.startswith("b_") or ".b_" in n]
    assert biases == ["sae.b_enc", "sae.b_dec", "nfm.W_1.bias"]  # no b_lin, no MLP output bias
    x = torch.randn(5, D)
    with de.pathways(model):
        # b_dec stays when both pathways are off
        torch.testing.assert_close(model(x), model.sae(x)[0])


def test_zeroing_a_pathway_removes_exactly_that_pathway():
    model = de.DualEncoder(de.TopKSAE(D, FEATS, K), de.NFM(FEATS, D, M)).eval()
    x = torch.randn(9, D)
    linear, interaction = model.nfm(*model.sae.encode(x))
    full = model(x)
    with de.pathways(model, "linear"):
        torch.testing.assert_close(full - model(x), interaction)
    with de.pathways(model, "interaction"):
        torch.testing.assert_close(full - model(x), linear)


# ----------------------------------------------------------------------------- training

def trained(kind, x, cfg):
    torch.manual_seed(0)
    sae = de.DualEncoder(de.TopKSAE(D, FEATS, K))
    if kind == "sae":
        return de.train_sae(sae, x, x, cfg), sae
    if kind == "sequential":
        de.train_sae(sae, x, x, cfg)
        model = de.DualEncoder(sae.sae, de.NFM(FEATS, D, M, n_read=K))
        return de.train_sequential(model, x, x, cfg), model
    model = de.DualEncoder(de.TopKSAE(D, FEATS, K), de.NFM(FEATS, D, M, n_read=K))
    return de.train_joint(model, x, x, cfg), model


@pytest.mark.parametrize("kind", ["sae", "sequential", "joint"])
def test_training_loss_decreases(kind):
    x = synthetic_acts()
    cfg = small_cfg()
    history, model = trained(kind, x, cfg)
    assert history[-1]["step"] == cfg.epochs * (len(x) // cfg.batch_size)
    assert history[-1]["mse"] < 0.9 * history[0]["mse"]
    assert history[-1]["train_mse"] < history[0]["train_mse"]


def test_sequential_leaves_the_sae_untouched_and_beats_it():
    x, cfg = synthetic_acts(), small_cfg()
    _, model = trained("sequential", x, cfg)
    before = model.sae.W_dec.clone()
    de.train_sequential(model, x, x, cfg)
    torch.testing.assert_close(model.sae.W_dec, before)
    with de.pathways(model):
        sae_only = de.evaluate(model, x)
    assert de.evaluate(model, x)["mse"] < sae_only["mse"]


def test_clipping_reads_only_what_the_optimiser_trains():
    # sequential: the frozen SAE may still hold stage 1's last gradient, which must not count
    torch.manual_seed(0)
    model = de.DualEncoder(de.TopKSAE(D, FEATS, K), de.NFM(FEATS, D, M, n_read=K))
    x = 100 * synthetic_acts(n=64)
    F.mse_loss(model(x), x).backward()  # stage 1 leaves gradients on every SAE parameter
    model.sae.requires_grad_(False)
    nfm_before = [p.detach().clone() for p in model.nfm.parameters()]
    de.train_step(model, torch.optim.SGD(model.nfm.parameters(), lr=1.0), x, clip_norm=1.0)
    step = torch.cat([(p.detach() - b).flatten()
                      for p, b in zip(model.nfm.parameters(), nfm_before)])
    assert step.norm().item() == pytest.approx(1.0, rel=1e-4)


def test_same_seed_same_history():
    x, cfg = synthetic_acts(), small_cfg(epochs=1)
    assert trained("joint", x, cfg)[0] == trained("joint", x, cfg)[0]


def test_a_bf16_run_agrees_with_an_fp32_run():
    # Same data, seed and batches; only the forward's precision differs. Stated tolerance: the
    # training and held-out MSE within 1 % of fp32's at every evaluation (measured: 0.2 %), the
    # SAE's weights within 2 % of their norm (measured: under 1 %).
    x = synthetic_acts()
    (h32, m32), (h16, m16) = (trained("joint", x, small_cfg(precision=p)) for p in ("fp32", "bf16"))
    assert all(p.dtype == torch.float32 for p in m16.parameters())
    for a, b in zip(h32, h16):
        assert a["step"] == b["step"] and b["mse"] == pytest.approx(a["mse"], rel=0.01)
        assert b["train_mse"] == pytest.approx(a["train_mse"], rel=0.01)
    assert not torch.equal(m32.sae.W_enc, m16.sae.W_enc)  # bf16 did run
    for a, b in zip(m32.sae.parameters(), m16.sae.parameters()):
        assert (a - b).norm() <= 0.02 * a.norm()


def test_bf16_extraction_is_close_to_fp32():
    lm = tiny_llama()
    ids = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(0))
    fp32, bf16 = (de.extract_activations(lm, ids, 2, precision=p) for p in ("fp32", "bf16"))
    assert bf16.dtype == torch.float32 and not torch.equal(fp32, bf16)
    assert (bf16 - fp32).norm() <= 0.02 * fp32.norm()


def test_evaluate_fvu_is_centred():
    x = synthetic_acts() + 3.0
    model = de.DualEncoder(de.TopKSAE(D, FEATS, K))
    with torch.no_grad():
        model.sae.W_dec.zero_()
        model.sae.b_dec.copy_(x.mean(0))  # predicts the mean: explains no variance
    assert de.evaluate(model, x)["fvu"] == pytest.approx(1.0, rel=1e-4)


def test_lr_schedule_is_the_papers():
    cfg = small_cfg(lr=1e-4, lr_end=0.1, decay_frac=0.8)
    assert de.lr_at(0, 100, cfg) == pytest.approx(1e-4)
    assert de.lr_at(40, 100, cfg) == pytest.approx(0.55e-4)
    assert de.lr_at(80, 100, cfg) == de.lr_at(99, 100, cfg) == pytest.approx(1e-5)
    warm = small_cfg(lr=1e-4, lr_end=0.1, decay_frac=0.8, warmup_steps=10)
    assert de.lr_at(0, 100, warm) == pytest.approx(1e-5)
    assert de.lr_at(4, 100, warm) == pytest.approx(5e-5)
    assert de.lr_at(40, 100, warm) == de.lr_at(40, 100, cfg)  # then the paper's schedule


def test_clipping_bounds_the_step_and_leaves_small_gradients_alone():
    torch.manual_seed(0)
    x = 100 * synthetic_acts(n=64)  # off scale: the first gradient is large
    norms = {}
    for clip in (0.0, 1.0, 1e9):
        torch.manual_seed(0)
        model = de.DualEncoder(de.TopKSAE(D, FEATS, K))
        sgd = torch.optim.SGD(model.parameters(), lr=1.0)
        before = [p.detach().clone() for p in model.parameters()]
        de.train_step(model, sgd, x, clip_norm=clip)
        step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
        norms[clip] = step.norm().item()  # SGD at lr 1: the step is the (clipped) gradient
    assert norms[0.0] > 10 and norms[1.0] == pytest.approx(1.0, rel=1e-4)
    assert norms[1e9] == pytest.approx(norms[0.0], rel=1e-6)


def test_nan_activations_fail_loudly():
    lm = tiny_llama()
    with torch.no_grad():
        de.decoder_blocks(lm)[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(de.DualencError, match="NaN"):
        de.extract_activations(lm, torch.randint(0, 97, (2, 8)), layer=1)


def test_nan_in_training_fails_loudly():
    x = synthetic_acts()
    x[3, 2] = float("nan")
    with pytest.raises(de.DualencError, match="non-finite|nan"):
        de.train_sae(de.DualEncoder(de.TopKSAE(D, FEATS, K)), x, x, small_cfg())


# ----------------------------------------------------------------------- hook, extraction, splicing

@pytest.mark.parametrize("arch", TINY_LMS)
def test_hook_captures_what_the_model_computes(arch):
    lm = TINY_LMS[arch]()
    ids = torch.randint(0, 97, (3, 10))
    acts = de.extract_activations(lm, ids, layer=1)
    with torch.no_grad():
        hidden = lm(ids, output_hidden_states=True).hidden_states
    assert acts.shape == (3, 10, 32)
    torch.testing.assert_close(acts, hidden[2])  # hidden_states[0] is the embeddings


@pytest.mark.parametrize("arch", TINY_LMS)
def test_early_exit_extraction_equals_full_forward(arch):
    lm = TINY_LMS[arch]()
    ids = torch.randint(0, 97, (5, 12))
    seen = []
    with torch.no_grad(), de.block_hook(lm, 2, seen.append):
        lm(ids)
    assert torch.equal(de.extract_activations(lm, ids, 2, batch_size=2), seen[0])


class ToyBlock(nn.Module):
    def __init__(self, as_tuple):
        super().__init__()
        self.lin, self.as_tuple = nn.Linear(4, 4), as_tuple

    def forward(self, h):
        h = h + self.lin(h)
        return (h, "extra") if self.as_tuple else h


class ToyLM(nn.Module):
    def __init__(self, as_tuple):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=3)
        self.blocks = nn.ModuleList(ToyBlock(as_tuple) for _ in range(3))

    def forward(self, h):
        for block in self.blocks:
            out = block(h)
            h = out[0] if isinstance(out, tuple) else out
        return h


@pytest.mark.parametrize("as_tuple", [False, True])
def test_block_hook_reads_and_replaces_tuple_or_tensor_outputs(as_tuple):
    lm, h = ToyLM(as_tuple), torch.randn(2, 5, 4)
    seen = []
    with de.block_hook(lm, 1, seen.append):
        clean = lm(h)
    assert seen[0].shape == (2, 5, 4)
    with de.block_hook(lm, 1, lambda x: x + 1.0):
        shifted = lm(h)
    assert not torch.allclose(clean, shifted)
    with de.block_hook(lm, 2, torch.zeros_like):
        assert (lm(h) == 0).all()
    assert torch.equal(lm(h), clean)  # the hook is removed on exit


@pytest.mark.parametrize("arch", TINY_LMS)
def test_splicing_the_identity_changes_nothing(arch):
    lm = TINY_LMS[arch]()
    ids = torch.randint(0, 97, (4, 16))
    m = de.splice_metrics(lm, ids, 1, {"same": lambda h: h})
    assert m["kl"]["same"].abs().max() < 1e-6
    torch.testing.assert_close(m["nll"]["same"], m["nll"]["clean"], rtol=0, atol=1e-6)
    assert de.token_mean(m["nll"]["clean"], m["nll_mask"]) > 0


def test_splicing_zeros_hurts():
    lm = tiny_llama()
    ids = torch.randint(0, 97, (4, 16))
    m = de.splice_metrics(lm, ids, 1, {"same": lambda h: h, "zero": torch.zeros_like})
    assert de.token_mean(m["kl"]["same"], m["kl_mask"]) == pytest.approx(0.0, abs=1e-6)
    assert de.token_mean(m["kl"]["zero"], m["kl_mask"]) > 0.01
    assert (de.token_mean(m["nll"]["zero"], m["nll_mask"])
            > de.token_mean(m["nll"]["clean"], m["nll_mask"]))


def test_splice_touches_and_averages_only_kept_positions():
    lm = tiny_llama()
    ids = torch.randint(0, 97, (2, 16))
    keep = torch.zeros(ids.shape, dtype=torch.bool)
    keep[:, 8:] = True
    got = de.splice_metrics(lm, ids, 1, {"zero": torch.zeros_like}, keep_NT=keep)

    def zero_late(h):
        h = h.clone()
        h[:, 8:] = 0
        return h

    with torch.no_grad():
        clean = F.log_softmax(lm(ids).logits, -1)
        with de.block_hook(lm, 1, zero_late):
            spliced = F.log_softmax(lm(ids).logits, -1)
    kl = (clean.exp() * (clean - spliced)).sum(-1)
    nll = -spliced[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert kl[:, :8].abs().max() < 1e-6  # causal: positions before the splice are unchanged
    assert (de.token_mean(got["kl"]["zero"], got["kl_mask"])
            == pytest.approx(kl[:, 8:].mean().item(), rel=1e-5))
    assert (de.token_mean(got["nll"]["zero"], got["nll_mask"])
            == pytest.approx(nll[:, 8:].mean().item(), rel=1e-5))
    # per token, per window
    torch.testing.assert_close(got["kl"]["zero"][:, 8:], kl[:, 8:], rtol=1e-4, atol=1e-5)
    assert (got["kl"]["zero"][:, :8] == 0).all() and (got["nll"]["zero"][:, -1] == 0).all()


@pytest.mark.parametrize("arch", TINY_LMS)
def test_cached_prefix_splice_equals_full_forward_splice(arch):
    lm = TINY_LMS[arch]()
    ids = torch.randint(0, 97, (5, 12))
    acts = de.extract_activations(lm, ids, 2)
    reps = {"zero": torch.zeros_like, "half": lambda h: 0.5 * h}
    full = de.splice_metrics(lm, ids, 2, reps, batch_size=2)
    cached = de.splice_metrics(lm, ids, 2, reps, acts_NTD=acts, batch_size=2)
    for kind in ("kl", "nll"):
        for name, v in full[kind].items():
            torch.testing.assert_close(cached[kind][name], v, rtol=1e-5, atol=1e-6)
    assert de.token_mean(full["kl"]["zero"], full["kl_mask"]) > 0.001
    # the real blocks are back
    assert not any(isinstance(b, de._Cached) for b in de.decoder_blocks(lm))


def test_eps_random_has_the_errors_norm():
    h, h_hat = torch.randn(3, 7, D), torch.randn(3, 7, D)
    eps = de.eps_random(h, h_hat, torch.Generator().manual_seed(0))
    torch.testing.assert_close((eps - h).norm(dim=-1), (h_hat - h).norm(dim=-1))
    cos = F.cosine_similarity(eps - h, h_hat - h, dim=-1)
    assert cos.abs().mean() < 0.5  # a different direction


# ----------------------------------------------------------------------------- the run

def test_text_is_cut_into_windows_of_its_first_tokens(tmp_path):
    class Letters:  # a tokenizer of one id a character, as transformers' are called
        def __call__(self, text, **kw):
            return {"input_ids": [ord(c) for c in text]}
    text = "".join(chr(97 + i % 26) for i in range(5000))
    windows = de.make_windows(Letters(), text, n_tokens=1000, ctx=50)
    assert windows.shape == (20, 50) and windows.flatten().tolist() == [ord(c) for c in text[:1000]]
    pieces = de.tokenise(Letters(), "ab\n\ncd\n\nef", piece=2)  # cut before blank lines
    assert pieces.tolist() == [ord(c) for c in "ab\n\ncd\n\nef"]
    with pytest.raises(de.DualencError, match="need at least"):
        de.make_windows(Letters(), "too short", n_tokens=1000, ctx=50)
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b.txt").write_text("second")
    assert de.read_text(tmp_path) == "first\n\nsecond" and de.read_text(None) is de.default_text


def test_keep_mask_drops_position_zero_and_massive_tokens():
    acts = torch.ones(2, 5, 4)
    acts[1, 3] *= 1000
    keep = de.keep_mask(acts.norm(dim=-1), max_norm=10.0)
    assert not keep[:, 0].any() and not keep[1, 3]
    assert keep.sum() == 2 * 4 - 1


def test_windows_are_split_whole_and_the_threshold_is_fitted_on_the_training_windows():
    norms_NT = torch.ones(10, 4)
    norms_NT[:, 0] = 100.0  # position 0 never counts, nor sets the threshold
    norms_NT[3, 2] = 1000.0  # one massive token
    order_W = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    split = de.split_windows(norms_NT, order_W, outlier_factor=10.0, n_splice=5)
    assert torch.equal(split.train_W, order_W[:9]) and torch.equal(split.eval_W, order_W[9:])
    assert torch.equal(split.splice_W, split.eval_W)  # at most the held-out windows
    assert split.max_norm == 10.0 and split.n_massive == 1
    assert not split.keep_NT[:, 0].any() and not split.keep_NT[3, 2] and split.keep_NT.sum() == 29


def tiny_model_folder(folder, words):
    """A tiny random Llama and a word-level tokenizer of `words`, saved as a local model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=64)
                     ).save_pretrained(folder)
    return str(folder)


def test_the_run_end_to_end_on_a_tiny_model(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    words = [f"w{i}" for i in range(40)]
    text = tmp_path / "text.txt"
    text.write_text(" ".join(words[i] for i in torch.randint(40, (3000,), generator=g)))
    cfg = de.Config(model=tiny_model_folder(tmp_path / "lm", words), text=str(text), tokens=2048,
                    ctx=32, splice_tokens=256, features=FEATS, k=K, embed_dim=M, batch_size=128,
                    eval_every=5, device="cpu", out=str(tmp_path / "out"))
    models, curves, results = de.run(cfg)
    printed = capsys.readouterr().out
    assert list(models) == list(curves) == list(results) == ["sae", "sequential", "joint"]
    for name in models:
        assert f"\n{name} " in printed and 0 < results[name]["fvu"] < 1.5
        assert curves[name][-1]["step"] == cfg.epochs * (57 * 31 // 128)  # 90 % of 64 windows
        saved = torch.load(tmp_path / "out" / f"{name}.pt")
        assert all(torch.equal(v, models[name].state_dict()[k])
                   for k, v in saved["state_dict"].items())
    assert results["joint"]["params"] > results["sae"]["params"] and "zero-ablation ce" in printed


def test_the_command_line_is_the_config_and_its_errors_are_one_line(capsys):
    cfg = de.parse_args(["--quick", "--k", "8", "--lr", "0.01"])
    assert cfg.quick and (cfg.k, cfg.lr, cfg.tokens) == (8, 0.01, de.QUICK["tokens"])
    for bad, msg in ((["--k", "many"], "invalid int value"), (["--text", "/nowhere.txt"],
                                                             "no text found")):
        with pytest.raises(SystemExit) as exit_:
            de.main(bad)
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and err.startswith("dualenc: error:") and msg in err
        assert "\n" not in err


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kw, msg", [
    (dict(k=100, features=50), "exceeds"),
    (dict(features=0), "positive"),
    (dict(batch_size=-1), "positive"),
    (dict(nfm_k=100), "nfm-k"),
    (dict(lr=0.0), "lr"),
    (dict(precision="fp16"), "--precision must be fp32 or bf16"),
    (dict(extract_precision="half"), "--extract-precision must be"),
    (dict(ctx=1), "--ctx must be at least 2"),
    (dict(decay_frac=0.0), "--decay-frac"),
    (dict(lr_end=-3.0), "--lr-end"),
    (dict(tokens=100), "fewer than 10 windows"),
    (dict(clip_norm=-1.0), "--clip-norm"),
    (dict(warmup_steps=-5), "--warmup-steps"),
    (dict(schedule="cosine"), "--schedule must be one of paper, wsd"),
    (dict(wsd_decay=0.0), "--wsd-decay"),
])
def test_bad_settings_raise(kw, msg):
    with pytest.raises(de.DualencError, match=msg):
        de.Config(**kw)


def test_layer_outside_the_model_raises():
    with pytest.raises(de.DualencError, match="outside"):
        de.extract_activations(tiny_llama(), torch.zeros(1, 4, dtype=torch.long), layer=4)


def test_the_method_file_imports_only_the_standard_library_torch_tqdm_and_transformers():
    tree = ast.parse((Path(__file__).parent / "dualenc.py").read_text())
    imported = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
                for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names}
    assert imported - set(__import__("sys").stdlib_module_names) == {"torch", "tqdm",
                                                                     "transformers"}
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not {"rank", "parallel", "distributed"} & names  # one process: ranks are a runner's
