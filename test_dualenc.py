"""Tests for dualenc, written as examples of its API. Offline: tiny random transformers models built
from a config for the plumbing, and the real SmolLM2 GGUF for one end-to-end --quick run."""

import itertools
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import dualenc as de

D, FEATS, K, M = 16, 64, 8, 12


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
    # the sparse decode is the dense formula x_s = W_dec f + b_dec
    torch.testing.assert_close(recon, codes @ sae.W_dec + sae.b_dec)


def test_sae_starts_as_the_papers_linear_layer_with_the_encoder_its_transpose():
    d, f = 576, 4608
    sae = de.TopKSAE(d, f, K)
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    assert sae.W_dec.abs().max() <= f ** -0.5  # nn.Linear(F, D)'s default: uniform(-1/sqrt(F), 1/sqrt(F))
    assert sae.W_dec.norm(dim=-1).mean().item() == pytest.approx((d / (3 * f)) ** 0.5, rel=0.01)  # 0.20
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
        sum(vals[b, i] * vals[b, j] * v[idx[b, i]] * v[idx[b, j]] for i, j in itertools.combinations(range(K), 2))
        for b in range(3)])
    torch.testing.assert_close(nfm.pair(vals, idx), explicit, rtol=1e-5, atol=1e-6)


def test_nfm_reads_only_the_largest_codes():
    nfm = de.NFM(FEATS, D, M, n_read=3).eval()
    vals = torch.tensor([[5.0, 0.1, 4.0, 0.2, 3.0]])
    idx = torch.tensor([[1, 2, 3, 4, 5]])
    keep = torch.tensor([[5.0, 4.0, 3.0]]), torch.tensor([[1, 3, 5]])
    for a, b in zip(nfm(vals, idx), nfm(*keep)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("n_read", [K, K // 2])
def test_sparse_nfm_equals_the_dense_reference(n_read):
    from bench_dualenc import dense_nfm

    torch.manual_seed(0)
    nfm = de.NFM(FEATS, D, M, n_read=n_read).eval()
    vals, idx = de.TopKSAE(D, FEATS, K).encode(torch.randn(6, D))
    vals = vals.detach().requires_grad_(True)
    outputs, grads = [], []
    for forward in (nfm, lambda v, i: dense_nfm(nfm, v, i)):
        linear, interaction = forward(vals, idx)
        (linear.sin().sum() + interaction.cos().sum()).backward()
        outputs.append((linear, interaction))
        grads.append([vals.grad.clone()] + [p.grad.clone() for p in nfm.parameters()])
        vals.grad = None
        nfm.zero_grad()
    for a, b in zip(outputs[0], outputs[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


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


def test_param_counts_match_a_hand_count():
    model = de.DualEncoder(de.TopKSAE(D, FEATS, K), de.NFM(FEATS, D, M))
    counts = de.param_counts(model)
    assert counts == {"sae_encoder": D * FEATS + FEATS, "sae_decoder": FEATS * D + D,
                      "nfm_linear": FEATS * D, "nfm_embed": FEATS * M,
                      "nfm_mlp": (M * M + M) + M * D}  # b_dec is the one output bias
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())
    assert de.params_used(model, ()) == counts["sae_encoder"] + counts["sae_decoder"]
    assert de.params_used(model, de.PATHWAYS) == sum(counts.values())


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
        torch.testing.assert_close(x_hat, codes @ model.sae.W_dec + read @ model.nfm.W_lin + model.sae.b_dec,
                                   rtol=1e-5, atol=1e-5)
        merged = codes @ (model.sae.W_dec + model.nfm.W_lin) + model.sae.b_dec
        assert torch.allclose(x_hat, merged, rtol=1e-5, atol=1e-5) == (n_read == K)


def test_an_ablation_keeps_the_one_output_bias():
    model = de.DualEncoder(de.TopKSAE(D, FEATS, K), de.NFM(FEATS, D, M)).eval()
    nn.init.normal_(model.sae.b_dec)
    assert [n for n, _ in model.named_parameters() if "bias" in n or n.startswith("b_") or ".b_" in n] == \
        ["sae.b_enc", "sae.b_dec", "nfm.mlp.0.bias"]  # no b_lin, no MLP output bias
    x = torch.randn(5, D)
    with de.pathways(model):
        torch.testing.assert_close(model(x), model.sae(x)[0])  # b_dec stays when both pathways are off


def test_zeroing_a_pathway_removes_exactly_that_pathway():
    model = de.DualEncoder(de.TopKSAE(D, FEATS, K), de.NFM(FEATS, D, M)).eval()
    x = torch.randn(9, D)
    linear, interaction = model.nfm(*model.sae.encode(x))
    full = model(x)
    with de.pathways(model, "linear"):
        torch.testing.assert_close(full - model(x), interaction)
    with de.pathways(model, "interaction"):
        torch.testing.assert_close(full - model(x), linear)


def test_bimodality_statistics_separate_two_modes_from_one():
    g = torch.Generator().manual_seed(0)
    unimodal = torch.randn(4000, generator=g)
    bimodal = torch.cat([0.05 + 0.01 * torch.randn(2000, generator=g), 0.37 + 0.03 * torch.randn(2000, generator=g)])
    assert de.bimodality_coefficient(unimodal) < 0.4 < 5 / 9 < de.bimodality_coefficient(bimodal)
    fit = de.gmm2(bimodal)
    assert fit["means"].tolist() == pytest.approx([0.05, 0.37], abs=0.01)
    assert fit["weights"].tolist() == pytest.approx([0.5, 0.5], abs=0.02)
    assert de.two_modes(fit) and not de.two_modes(de.gmm2(unimodal))


def test_bic_prefers_two_gaussians_only_for_a_bimodal_sample():
    g = torch.Generator().manual_seed(1)
    normal = 0.4 + 0.1 * torch.randn(4000, generator=g)
    bimodal = torch.cat([0.05 + 0.02 * torch.randn(1500, generator=g), 0.37 + 0.05 * torch.randn(2500, generator=g)])
    assert de.gmm_bic(normal) < 0 < 10 < de.gmm_bic(bimodal)


def test_weighted_statistics_equal_the_statistics_of_the_resampled_sample():
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(300, generator=g), torch.rand(300, generator=g)
    w = de.bootstrap_weights(300, 3, g)
    drawn = torch.repeat_interleave(torch.arange(300), w[2].long())  # resample 2 written out
    assert de.bimodality_coefficient(x, w)[2] == pytest.approx(de.bimodality_coefficient(x[drawn]).item(), rel=1e-9)
    assert de.pearson(x, y, w)[2] == pytest.approx(de.pearson(x[drawn], y[drawn]).item(), rel=1e-9)
    assert de.bimodality_coefficient(x, w)[0] == pytest.approx(de.bimodality_coefficient(x).item(), rel=1e-12)


# ----------------------------------------------------------------------------- intervals and verdicts

def test_bootstrap_of_a_constant_is_a_point_and_widens_with_noise():
    g = torch.Generator().manual_seed(0)
    w = de.bootstrap_weights(40, 500, g)
    assert w.shape == (501, 40) and (w[0] == 1).all() and (w.sum(-1) == 40).all()
    widths = []
    for noise in (0.0, 0.1, 1.0):
        per_window = 2.0 + noise * torch.randn(40, generator=g, dtype=torch.float64)
        s = de.summarise((w @ per_window) / 40)
        assert s["value"] == pytest.approx(per_window.mean().item())
        widths.append(s["ci"][1] - s["ci"][0])
    assert widths[0] == pytest.approx(0.0, abs=1e-12) and 0 < widths[1] < widths[2]


def test_seed_interval_is_students_t():
    assert de.t_quantile(0.975, 1) == pytest.approx(12.706, abs=2e-3)
    assert de.t_quantile(0.975, 2) == pytest.approx(4.303, abs=2e-3)
    lo, hi = de.seed_interval([1.0, 2.0, 3.0])
    assert (lo + hi) / 2 == pytest.approx(2.0) and (hi - lo) / 2 == pytest.approx(4.303 / 3 ** 0.5, abs=2e-3)
    s = de.summarise(torch.tensor([[1.0, 0.9, 1.1], [3.0, 2.9, 3.1]]))
    assert s["value"] == 2.0 and s["per_seed"] == [1.0, 3.0] and "seed_ci" in s


@pytest.mark.parametrize("ci, seed_ci, expected", [
    ([0.30, 0.40], None, "holds"), ([0.05, 0.10], None, "no"), ([0.10, 0.30], None, "unclear"),
    ([0.30, 0.40], [0.10, 0.50], "unclear"), ([0.30, 0.40], [0.25, 0.45], "holds")])
def test_verdict_needs_every_interval_on_one_side(ci, seed_ci, expected):
    summary = {"value": sum(ci) / 2, "ci": ci, **({"seed_ci": seed_ci} if seed_ci else {})}
    assert de.verdict(summary, 0.2, above=True) == expected


def fake_seed(R=200, seed=0, joint_kl=0.5, noise=0.01):
    """One seed's samples as analyse_seed returns them, with chosen values and bootstrap noise."""
    g = torch.Generator().manual_seed(seed)

    def sample(v):
        return v + torch.cat([torch.zeros(1), noise * torch.randn(R, generator=g)]).double()

    names = ("sae", "sae_matched", "sequential", "joint", "joint_sae_path", "joint_interaction_only", "joint_no_linear")
    models = {n: {"mse": sample(1.0), "kl": sample(1.0)} for n in names}
    models["joint"] = {"mse": sample(0.5), "kl": sample(joint_kl)}
    models["sequential"] = {"mse": sample(1.1), "kl": sample(1.0)}  # worse than the SAE
    models["joint_interaction_only"] = models["joint_no_linear"] = {"mse": sample(1.0), "kl": sample(0.9)}
    norms = {"r_sq_norm_vs_nfm_share": sample(-0.9), "bc_joint_W_dec": sample(0.7), "bc_joint_merged": sample(0.4),
             "bc_sae": sample(0.3), "delta_bic_joint_W_dec": sample(50.0), "delta_bic_joint_merged": sample(-5.0),
             "delta_bic_sae": sample(-20.0)}
    return {"models": models, "contrib": {"joint": sample(0.06)}, "norms": norms}


def test_claims_give_a_verdict_per_reading_from_their_intervals():
    rows = {c["claim"]: c["readings"] for c in de.claims([fake_seed()])}
    assert rows["joint vs SAE, KL reduction"]["fair"]["verdict"] == "holds"
    assert rows["sequential vs SAE, reconstruction error reduction"]["paper_way"]["verdict"] == "no"
    assert rows["nonlinear part alone, share of the joint model's KL gain"]["fair"]["value"] == pytest.approx(0.2)
    assert rows["nonlinear part alone, its own KL reduction"]["fair"]["value"] == pytest.approx(0.1)
    assert rows["joint decoder sq. norms bimodal: bimodality coef."]["paper_way"]["verdict"] == "holds"
    assert rows["joint decoder sq. norms bimodal: bimodality coef."]["fair"]["verdict"] == "no"
    assert not any("parameters" in claim for claim in rows)  # the parameter share is a design figure
    # a KL reduction at the threshold, with noise: the interval straddles it
    rows = {c["claim"]: c["readings"] for c in de.claims([fake_seed(joint_kl=1 - 0.258, noise=0.05)])}
    assert rows["joint vs SAE, KL reduction"]["fair"]["verdict"] == "unclear"
    # two seeds: the seed interval is reported beside the bootstrap one and both decide
    rows = {c["claim"]: c["readings"] for c in de.claims([fake_seed(seed=0), fake_seed(seed=1, joint_kl=0.8)])}
    fair = rows["joint vs SAE, KL reduction"]["fair"]
    assert fair["per_seed"] == pytest.approx([0.5, 0.2]) and fair["verdict"] == "unclear"


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


def test_same_seed_same_history():
    x, cfg = synthetic_acts(), small_cfg(epochs=1)
    assert trained("joint", x, cfg)[0] == trained("joint", x, cfg)[0]


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


# ----------------------------------------------------------------------------- hook, extraction, splicing

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
    assert de.token_mean(m["nll"]["zero"], m["nll_mask"]) > de.token_mean(m["nll"]["clean"], m["nll_mask"])


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
    assert de.token_mean(got["kl"]["zero"], got["kl_mask"]) == pytest.approx(kl[:, 8:].mean().item(), rel=1e-5)
    assert de.token_mean(got["nll"]["zero"], got["nll_mask"]) == pytest.approx(nll[:, 8:].mean().item(), rel=1e-5)
    torch.testing.assert_close(got["kl"]["zero"][:, 8:], kl[:, 8:], rtol=1e-4, atol=1e-5)  # per token, per window
    assert (got["kl"]["zero"][:, :8] == 0).all() and (got["nll"]["zero"][:, -1] == 0).all()


def test_eps_random_has_the_errors_norm():
    h, h_hat = torch.randn(3, 7, D), torch.randn(3, 7, D)
    eps = de.eps_random(h, h_hat, torch.Generator().manual_seed(0))
    torch.testing.assert_close((eps - h).norm(dim=-1), (h_hat - h).norm(dim=-1))
    cos = F.cosine_similarity(eps - h, h_hat - h, dim=-1)
    assert cos.abs().mean() < 0.5  # a different direction


def test_keep_mask_drops_position_zero_and_massive_tokens():
    acts = torch.ones(2, 5, 4)
    acts[1, 3] *= 1000
    keep = de.keep_mask(acts, max_norm=10.0)
    assert not keep[:, 0].any() and not keep[1, 3]
    assert keep.sum() == 2 * 4 - 1


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kw, msg", [
    (dict(k=100, features=50), "exceeds"),
    (dict(features=0), "positive"),
    (dict(batch_size=-1), "positive"),
    (dict(nfm_k=100), "nfm-k"),
    (dict(lr=0.0), "lr"),
])
def test_bad_settings_raise(kw, msg):
    with pytest.raises(de.DualencError, match=msg):
        de.Config(**kw)


def test_layer_outside_the_model_raises():
    with pytest.raises(de.DualencError, match="outside"):
        de.extract_activations(tiny_llama(), torch.zeros(1, 4, dtype=torch.long), layer=4)


def test_text_errors(tmp_path):
    with pytest.raises(de.DualencError, match="no text"):
        de.read_text(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(de.DualencError, match="empty"):
        de.read_text(str(tmp_path / "empty.txt"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(de.DualencError, match="no text"):
        de.read_text(str(tmp_path / "empty_dir"))
    tok = lambda text, verbose=False: {"input_ids": list(range(len(text.split())))}  # noqa: E731
    with pytest.raises(de.DualencError, match="longer text"):
        de.make_windows(tok, "a few words only", n_tokens=4096, ctx=128)


def test_stdlib_corpus_is_long_and_deterministic():
    text = de.stdlib_docstrings()
    assert len(text) > 500_000 and text == de.stdlib_docstrings.__wrapped__()  # a fresh parse, not the cache


def test_device_and_output_errors(tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(de.DualencError, match="CUDA"):
            de.resolve_device("cuda")
    with pytest.raises(de.DualencError, match="auto, cpu or cuda"):
        de.resolve_device("tpu")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(de.DualencError, match="cannot write"):
        de.prepare_out(str(blocker / "run"))


def test_missing_model_raises():
    with pytest.raises(de.DualencError, match="no such"):
        de.load_lm("./no/such/model", "cpu")
    with pytest.raises(de.DualencError, match="no such file"):
        de.load_lm("missing.gguf", "cpu")


def run_cli(*args):
    return subprocess.run([sys.executable, "dualenc.py", *args], capture_output=True, text=True,
                          cwd=Path(__file__).parent, timeout=600)


@pytest.mark.parametrize("args, msg", [
    (["--k", "5000", "--features", "100"], "exceeds"),
    (["--model", "./nowhere/model"], "no such model folder"),
    (["--text", "/nonexistent.txt", "--out", "OUT"], "no text"),
])
def test_cli_bad_input_is_one_line_and_nonzero(args, msg, tmp_path):
    out = tmp_path / "run"
    r = run_cli(*[str(out) if a == "OUT" else a for a in args])
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in r.stderr
    assert not (out / "results.json").exists()


def test_cli_flags_mirror_the_config():
    cfg = de.parse_args(["--features", "128", "--k", "4", "--layer", "3", "--lr", "0.01"])
    assert (cfg.features, cfg.k, cfg.layer, cfg.lr, cfg.embed_dim) == (128, 4, 3, 0.01, 64)
    quick = de.parse_args(["--quick", "--k", "8"])
    assert quick.quick and quick.k == 8 and quick.tokens == de.QUICK["tokens"]
    assert de.parse_args(["--resume", "runs/x", "--device", "cpu"]).resume == "runs/x"
    with pytest.raises(de.DualencError, match="only --device"):
        de.parse_args(["--resume", "runs/x", "--epochs", "5"])


# ----------------------------------------------------------------------------- end to end, real LM

def test_quick_run_on_smollm2_writes_complete_results(tmp_path):
    r = run_cli("--quick", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert {"config", "data", "models", "clean_ce", "zero_ce", "timings_s"} <= res.keys()
    assert res["data"]["d_model"] == 576 and res["data"]["layer"] == 15
    assert res["data"]["train_tokens"] > 10_000 and res["data"]["excluded_tokens"] >= res["config"]["tokens"] // 128
    for name in ("sae", "sae_matched", "sequential", "joint", "joint_sae_path"):
        m = res["models"][name]
        assert {"params", "mse", "fvu", "kl", "kl_eps_random", "pathology_ratio", "ce", "ce_recovered"} <= m.keys()
        assert 0 < m["fvu"] < 1 and m["kl"] > 0 and 0 < m["ce_recovered"] < 1
        for metric in ("kl", "ce", "fvu"):
            lo, hi = m["ci"][metric]
            assert lo < m[metric] < hi
    assert abs(res["models"]["sae_matched"]["params"] / res["models"]["joint"]["params"] - 1) < 0.02
    assert res["zero_ce"] > res["models"]["sae"]["ce"] > res["clean_ce"]
    for name in ("joint_linear_only", "joint_interaction_only", "joint_no_linear"):
        assert res["models"][name]["fvu"] > 0
    analysis = res["analysis"]
    assert {"interaction_share_of_nfm_output", "params", "interaction_param_share", "decoder_norms",
            "claims"} <= analysis.keys()
    assert len(analysis["claims"]) == 12
    for claim in analysis["claims"]:
        for reading in claim["readings"].values():
            assert reading["verdict"] in ("holds", "no", "unclear") and len(reading["ci"]) == 2
    assert res["status"] == "complete" and res["stages_done"][-1] == "analyse"
    for name in de.STAGES:
        assert {"cfg.json", "sae_weights.safetensors", "normalization.safetensors"} <= {
            p.name for p in (tmp_path / name).iterdir()}
    for figure in ("curves.png", "decoder_norms.png", "models.png"):
        assert (tmp_path / figure).read_bytes()[:4] == b"\x89PNG"


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
    assert not any(isinstance(b, de._Cached) for b in de.decoder_blocks(lm))  # the real blocks are back


# ----------------------------------------------------------------------------- checkpoints, resume, determinism

def trained_models():
    torch.manual_seed(0)
    mean, std = torch.randn(D), torch.rand(D) + 0.5
    return {"sae": de.DualEncoder(de.TopKSAE(D, FEATS, K), None, mean, std),
            "joint": de.DualEncoder(de.TopKSAE(D, FEATS, K), de.NFM(FEATS, D, M, n_read=K // 2), mean, std),
            "joint_no_linear": de.DualEncoder(de.TopKSAE(D, FEATS, K), de.NFM(FEATS, D, M, linear=False), mean, std)}


@pytest.mark.parametrize("name", ["sae", "joint", "joint_no_linear"])
def test_save_load_round_trip_is_exact(name, tmp_path):
    model = trained_models()[name].eval()
    de.save_model(model, tmp_path / name, {"model_name": "test", "hook_name": "blocks.1.hook_resid_post",
                                           "context_size": 16})
    loaded = de.load_model(tmp_path / name)
    h = torch.randn(3, 5, D) * 3
    assert torch.equal(loaded.reconstruct(h), model.reconstruct(h))
    assert loaded.state_dict().keys() == model.state_dict().keys()


def test_saelens_files_have_the_v6_layout_and_work_on_raw_activations(tmp_path):
    from safetensors.torch import load_file

    model = trained_models()["sae"].eval()
    de.save_model(model, tmp_path, {"model_name": "m", "hook_name": "blocks.1.hook_resid_post", "context_size": 16})
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert {"d_in", "d_sae", "dtype", "device", "architecture", "k", "apply_b_dec_to_input",
            "normalize_activations", "metadata"} <= cfg.keys()
    assert (cfg["d_in"], cfg["d_sae"], cfg["k"], cfg["architecture"]) == (D, FEATS, K, "topk")
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is False
    assert {"model_name", "hook_name", "context_size", "prepend_bos", "exclude_special_tokens",
            "sae_lens_version"} <= cfg["metadata"].keys()
    w = load_file(tmp_path / "sae_weights.safetensors")
    assert {k: tuple(v.shape) for k, v in w.items()} == {"W_enc": (D, FEATS), "b_enc": (FEATS,),
                                                         "W_dec": (FEATS, D), "b_dec": (D,)}
    # a TopK SAE written from the SAELens tensors alone, fed RAW activations
    h = torch.randn(20, D) * 3 + 1
    vals, idx = F.relu(h @ w["W_enc"] + w["b_enc"]).topk(K, dim=-1)
    raw_recon = de.to_dense(vals, idx, FEATS) @ w["W_dec"] + w["b_dec"]
    torch.testing.assert_close(raw_recon, model.reconstruct(h), rtol=1e-4, atol=1e-4)


def test_damaged_checkpoints_fail_with_one_line(tmp_path):
    model = trained_models()["joint"]
    meta = {"model_name": "m", "hook_name": "h", "context_size": 16}
    de.save_model(model, tmp_path / "ok", meta)
    truncated = tmp_path / "truncated"
    de.save_model(model, truncated, meta)
    data = (truncated / "nfm.safetensors").read_bytes()
    (truncated / "nfm.safetensors").write_bytes(data[: len(data) // 2])
    other_d = tmp_path / "other_d"
    de.save_model(model, other_d, meta)
    cfg = json.loads((other_d / "cfg.json").read_text())
    (other_d / "cfg.json").write_text(json.dumps({**cfg, "d_in": D + 1}))
    missing = tmp_path / "missing"
    de.save_model(model, missing, meta)
    (missing / "normalization.safetensors").unlink()
    for folder in (truncated, other_d, missing, tmp_path / "nowhere"):
        with pytest.raises(de.DualencError, match="cannot load") as err:
            de.load_model(folder)
        assert "\n" not in str(err.value)
    de.load_model(tmp_path / "ok")


@pytest.fixture(scope="session")
def tiny_lm_folder(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer, saved as a local model folder: the whole pipeline
    runs on it in seconds."""
    folder = tmp_path_factory.mktemp("tiny_lm")
    _, tokenizer = de.load_lm(de.SMOLLM2, "cpu")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_run_cfg(model, out, **kw):
    return de.Config(**{"model": model, "tokens": 4096, "ctx": 32, "features": 64, "k": 8, "embed_dim": 8,
                        "epochs": 2, "batch_size": 128, "eval_every": 5, "splice_tokens": 256, "out": str(out),
                        "device": "cpu", **kw})


@pytest.fixture(scope="session")
def tiny_run(tiny_lm_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_run")
    return out, de.run(tiny_run_cfg(tiny_lm_folder, out))


def test_same_seed_gives_identical_results(tiny_lm_folder, tiny_run, tmp_path):
    _, first = tiny_run
    second = de.run(tiny_run_cfg(tiny_lm_folder, tmp_path))
    assert second["models"] == first["models"] and second["curves"] == first["curves"]
    assert second["analysis"]["claims"] == first["analysis"]["claims"]


def test_eval_only_reproduces_a_saved_run(tiny_run):
    out, first = tiny_run
    again = de.run(de.Config(eval_only=str(out), device="cpu"))
    for name, metrics in first["models"].items():
        for metric, value in metrics.items():
            if metric != "ci":
                assert again["models"][name][metric] == pytest.approx(value, rel=1e-6, abs=1e-6)
        assert again["models"][name]["ci"]["kl"] == pytest.approx(metrics["ci"]["kl"], rel=1e-6, abs=1e-6)
    assert (out / "results_eval_only.json").exists()
    models, report = de.load_run(out)
    assert set(models) == set(de.STAGES) and report["status"] == "complete"


def test_interrupted_run_resumes_to_the_same_result(tiny_lm_folder, tiny_run, tmp_path, monkeypatch):
    _, uninterrupted = tiny_run
    calls, real_step = [0], de.train_step
    steps = uninterrupted["data"]["steps_per_model"]

    def flaky_step(*args):
        calls[0] += 1
        if calls[0] == 3 * steps + 12:  # the joint model's 12th step: last checkpoint at step 10
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(de, "train_step", flaky_step)
    with pytest.raises(KeyboardInterrupt):
        de.run(tiny_run_cfg(tiny_lm_folder, tmp_path))
    partial = json.loads((tmp_path / "results.json").read_text())
    assert partial["status"] == "incomplete" and partial["stages_done"] == ["sae", "sae_matched", "sequential"]
    assert (tmp_path / "joint" / "train_state.pt").exists() and not (tmp_path / "joint" / "cfg.json").exists()
    with pytest.raises(de.DualencError, match="unfinished"):
        de.run(de.Config(eval_only=str(tmp_path), device="cpu"))

    monkeypatch.setattr(de, "train_step", real_step)
    resumed = de.run(de.Config(resume=str(tmp_path), device="cpu"))
    assert resumed["curves"]["joint"][-1]["train_mse"] == uninterrupted["curves"]["joint"][-1]["train_mse"]
    assert resumed["models"] == uninterrupted["models"]
    assert not (tmp_path / "joint" / "train_state.pt").exists()


def test_sae_matched_has_the_joint_models_parameter_budget(tiny_run):
    _, report = tiny_run
    models = report["models"]
    assert abs(models["sae_matched"]["params"] / models["joint"]["params"] - 1) < 0.02
    assert models["sae_matched"]["params"] > 1.2 * models["sae"]["params"]
    # at the default config: the joint model with F 4608 and an SAE widened to its budget
    joint = de.DualEncoder(de.TopKSAE(576, 4608, 64), de.NFM(4608, 576, 64, 32))
    n_joint = sum(p.numel() for p in joint.parameters())
    wide = de.TopKSAE(576, de.matched_features(576, n_joint), 64)
    assert abs(sum(p.numel() for p in wide.parameters()) / n_joint - 1) < 0.001


def test_two_seeds_report_both_runs_and_a_seed_interval(tiny_lm_folder, tiny_run, tmp_path):
    _, one_seed = tiny_run
    report = de.run(tiny_run_cfg(tiny_lm_folder, tmp_path, seeds=2))
    assert report["seeds"] == [0, 1] and (tmp_path / "seed1" / "joint" / "cfg.json").exists()
    joint = report["models"]["joint"]
    assert len(joint["per_seed"]["kl"]) == 2 and joint["per_seed"]["kl"][0] == one_seed["models"]["joint"]["kl"]
    assert joint["kl"] == pytest.approx(sum(joint["per_seed"]["kl"]) / 2)
    lo, hi = joint["seed_ci"]["kl"]
    assert lo < joint["kl"] < hi and len(joint["ci"]["kl"]) == 2
    for claim in report["analysis"]["claims"]:
        for reading in claim["readings"].values():
            assert "seed_ci" in reading and len(reading["per_seed"]) == 2
    models, _ = de.load_run(tmp_path)
    assert set(models) == {*de.STAGES, *(f"seed1/{name}" for name in de.STAGES)}


# ----------------------------------------------------------------------------- bring your own SAE

def write_saelens(folder, d_in=32, d_sae=48, k=6, seed=0, **cfg):
    """A random TopK SAE in SAELens' v6 layout, as someone else's training would leave it."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"W_enc": torch.randn(d_in, d_sae, generator=g), "b_enc": 0.1 * torch.randn(d_sae, generator=g),
               "W_dec": torch.randn(d_sae, d_in, generator=g), "b_dec": torch.randn(d_in, generator=g)},
              folder / "sae_weights.safetensors")
    meta = {"model_name": "m", "hook_name": "blocks.2.hook_resid_post", "context_size": 32, "prepend_bos": False,
            "exclude_special_tokens": False, "sae_lens_version": "6.0.0"}
    (folder / "cfg.json").write_text(json.dumps({
        "d_in": d_in, "d_sae": d_sae, "k": k, "dtype": "float32", "device": "cpu", "architecture": "topk",
        "apply_b_dec_to_input": False, "normalize_activations": "none", "metadata": meta, **cfg}))
    return folder


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_imported_sae_computes_what_saelens_computes_on_raw_activations(apply_b_dec, tmp_path):
    from safetensors.torch import load_file

    folder = write_saelens(tmp_path / "sae", apply_b_dec_to_input=apply_b_dec)
    w = load_file(folder / "sae_weights.safetensors")
    mean, std = torch.randn(32), torch.rand(32) + 0.5
    model = de.import_sae(de.read_saelens(folder), mean, std)
    h = 3 * torch.randn(40, 32) + 1
    pre = (h - w["b_dec"] if apply_b_dec else h) @ w["W_enc"] + w["b_enc"]
    vals, idx = F.relu(pre).topk(6, dim=-1)
    expected = de.to_dense(vals, idx, 48) @ w["W_dec"] + w["b_dec"]
    torch.testing.assert_close(model.reconstruct(h), expected, rtol=1e-5, atol=1e-4)
    got_vals, got_idx = model.sae.encode(model.normalize(h))
    torch.testing.assert_close(de.to_dense(got_vals, got_idx, 48), de.to_dense(vals, idx, 48), rtol=1e-5, atol=1e-4)


def test_a_runs_exported_sae_comes_back_through_sae(tiny_lm_folder, tiny_run, tmp_path):
    out, first = tiny_run
    original = de.load_run(out)[0]["sae"]
    imported = de.import_sae(de.read_saelens(out / "sae"), original.mean_D, original.std_D)
    x = 2 * torch.randn(64, 32)
    (v1, i1), (v2, i2) = original.sae.encode(x), imported.sae.encode(x)
    torch.testing.assert_close(de.to_dense(v2, i2, 64), de.to_dense(v1, i1, 64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(imported(x), original(x), rtol=1e-5, atol=1e-5)

    report = de.run(tiny_run_cfg(tiny_lm_folder, tmp_path / "byo", sae=str(out / "sae")))
    assert set(report["models"]) == {"sae", "sequential"}
    assert report["models"]["sae"]["fvu"] == pytest.approx(first["models"]["sae"]["fvu"], rel=1e-5)
    assert report["models"]["sae"]["kl"] == pytest.approx(first["models"]["sae"]["kl"], rel=1e-4)
    assert report["models"]["sequential"]["fvu"] < report["models"]["sae"]["fvu"]
    assert {c["claim"] for c in report["analysis"]["claims"]} == {
        "sequential vs SAE, reconstruction error reduction", "sequential vs SAE, KL reduction"}
    again = de.run(de.Config(eval_only=str(tmp_path / "byo"), device="cpu"))  # the run folder is complete
    assert again["models"]["sequential"]["fvu"] == pytest.approx(report["models"]["sequential"]["fvu"], rel=1e-6)


def break_sae(folder, case):
    """One way an SAE folder can be unusable."""
    if case == "missing file":
        (folder / "sae_weights.safetensors").unlink()
    elif case == "truncated safetensors":
        data = (folder / "sae_weights.safetensors").read_bytes()
        (folder / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    else:
        cfg = json.loads((folder / "cfg.json").read_text())
        change = {"wrong hook": {"metadata": {**cfg["metadata"], "hook_name": "blocks.2.hook_resid_pre"}},
                  "hook outside the model": {"metadata": {**cfg["metadata"], "hook_name": "blocks.9.hook_resid_post"}},
                  "unsupported architecture": {"architecture": "jumprelu"},
                  "normalised activations": {"normalize_activations": "layer_norm"}}[case]
        (folder / "cfg.json").write_text(json.dumps({**cfg, **change}))


@pytest.mark.parametrize("case, msg", [
    ("missing file", "cannot read the SAE"), ("truncated safetensors", "cannot read the SAE"),
    ("wrong hook", "not a block output"), ("hook outside the model", "outside the model's blocks"),
    ("unsupported architecture", "'jumprelu' is not supported"), ("normalised activations", "'layer_norm'"),
    ("wrong d_in", "d_in 16"), ("other layer", "--layer 1, but the SAE reads blocks.2")])
def test_a_bad_sae_folder_fails_with_one_line_before_any_slow_work(case, msg, tiny_lm_folder, tmp_path, monkeypatch,
                                                                    capsys):
    folder = write_saelens(tmp_path / "sae", d_in=16 if case == "wrong d_in" else 32)
    if case not in ("wrong d_in", "other layer"):
        break_sae(folder, case)
    monkeypatch.setattr(de, "read_text", lambda path: pytest.fail("the corpus was read"))
    args = ["--model", tiny_lm_folder, "--sae", str(folder), "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_:
        de.main(args + (["--layer", "1"] if case == "other layer" else []))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and msg in err, err


def test_layer_outside_the_model_fails_before_the_corpus_is_read(tiny_lm_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(de, "read_text", lambda path: pytest.fail("the corpus was read"))
    with pytest.raises(SystemExit) as exit_:
        de.main(["--model", tiny_lm_folder, "--layer", "999", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.strip() == "dualenc: error: --layer 999 is outside the model's blocks 0..3"


def test_sae_settings_that_the_sae_fixes_are_refused():
    with pytest.raises(de.DualencError, match="--k do not apply"):
        de.parse_args(["--sae", "some/sae", "--k", "16"])


# ----------------------------------------------------------------------------- stages 3-4

def tiny_joint_and_secondary(x):
    torch.manual_seed(0)
    joint = de.DualEncoder(de.TopKSAE(D, FEATS, K), de.NFM(FEATS, D, M, n_read=K))
    de.train_joint(joint, x, x, small_cfg())
    secondary, curve, h_eval = de.train_secondary(joint, x, x, small_cfg())
    return joint.eval(), secondary.eval(), curve, h_eval


def test_secondary_sae_learns_the_interaction_hidden_layer():
    x = synthetic_acts()
    joint, secondary, curve, h_eval = tiny_joint_and_secondary(x)
    assert secondary.sae.W_dec.shape == (25 * M, M) and secondary.sae.k == round(M * 250 / 300)
    assert curve[-1]["train_mse"] < curve[0]["train_mse"] and curve[-1]["fvu"] < curve[0]["fvu"]
    torch.testing.assert_close(secondary.normalize(de.interaction_hidden(joint, x)), h_eval)
    # the pipeline with the secondary SAE in place reconstructs x, a little worse than the joint model
    pipeline = de.IntegrationPipeline(joint, secondary).eval()
    assert de.evaluate(joint, x)["fvu"] <= de.evaluate(pipeline, x)["fvu"] < 1


def test_scaling_by_one_or_a_silent_feature_by_zero_changes_nothing():
    x = synthetic_acts(n=256)
    joint, secondary, _, _ = tiny_joint_and_secondary(x)
    pipeline = de.IntegrationPipeline(joint, secondary).eval()
    with torch.no_grad():
        base = pipeline(x)
        active = pipeline.secondary_codes(x)
        busy, silent = int(active.count_nonzero(0).argmax()), int((active.count_nonzero(0) == 0).nonzero()[0])
        pipeline.scale = ("secondary", torch.tensor([busy]), 1.0)
        assert torch.equal(pipeline(x), base)
        pipeline.scale = ("secondary", torch.tensor([silent]), 0.0)
        assert torch.equal(pipeline(x), base)
        pipeline.scale = ("secondary", torch.tensor([busy]), 0.0)
        assert not torch.allclose(pipeline(x), base)
    # and through the LM: x1 leaves the next-token log-probabilities where they were
    lm, ids = tiny_llama(), torch.randint(0, 97, (3, 10))
    joint_lm, secondary_lm = de.DualEncoder(de.TopKSAE(32, FEATS, K), de.NFM(FEATS, 32, M)).eval(), None
    secondary_lm = de.DualEncoder(de.TopKSAE(M, 25 * M, 8), None).eval()
    pipe = de.IntegrationPipeline(joint_lm, secondary_lm).eval()
    prompts, words = [(i, 0) for i in ids], {c: torch.tensor([1, 2, 3]) for c in "abcd"}

    def keep_fn(h):
        return torch.ones(h.shape[:-1], dtype=torch.bool)

    base = de.word_logprobs(lm, 2, prompts, words, pipe, keep_fn)
    changes, inter = de.intervention_effect(lm, 2, prompts, words, pipe, keep_fn, ("secondary", torch.tensor([0])), base)
    pipe.scale = ("secondary", torch.tensor([0]), 1.0)
    torch.testing.assert_close(de.word_logprobs(lm, 2, prompts, words, pipe, keep_fn), base, rtol=0, atol=1e-5)
    assert set(changes) == set(de.SCALES) and inter[0.0].shape == (3,)


def planted_design(effect, seed=0, per_cell=16, n_features=30):
    """Per-prompt activations of a 2 x 2 design; feature 3 gets an interaction of size `effect`."""
    g = torch.Generator().manual_seed(seed)
    cell = torch.arange(4).repeat_interleave(per_cell)
    A = torch.rand(4 * per_cell, n_features, generator=g)
    A[:, 3] += effect * torch.tensor([1.0, -1.0, -1.0, 1.0])[cell] / 4
    return A, cell


def test_a_planted_interaction_is_found_and_its_permutation_p_is_small():
    A, cell = planted_design(effect=1.0)
    value, t = de.contrasts(A, cell)["interaction"]
    assert int(t.abs().argmax()) == 3 and value[3].item() == pytest.approx(1.0, abs=0.3)
    assert de.permutation_p(A[:, 3], cell, "interaction", 999, torch.Generator().manual_seed(0)) < 0.01
    null, cell = planted_design(effect=0.0)
    assert de.contrasts(null, cell)["interaction"][1][3].abs() < 3
    assert de.permutation_p(null[:, 3], cell, "interaction", 999, torch.Generator().manual_seed(0)) > 0.05
    # main effects: a feature that only rises with the first factor has no interaction
    A[:, 5] += 2.0 * (cell < 2)
    c = de.contrasts(A, cell)
    assert int(c["main_a"][1].abs().argmax()) == 5 and c["interaction"][1][5].abs() < 3


@pytest.mark.parametrize("content, msg", [
    ("{not json", "stimuli"), ('{"factors": {"a": ["x", "y"]}}', "not a 2 x 2 design"),
    ('{"factors": {"a": ["x", "y"], "b": ["u", "v"]}, "prompts": {}, "words": {}}', "not a 2 x 2 design"),
    (json.dumps({"factors": {"a": ["x", "y"], "b": ["u", "v"]},
                 "prompts": {c: ["p"] * 3 for c in ("x u", "x v", "y u", "y v")},
                 "words": {c: ["w"] for c in ("x u", "x v", "y u", "y v")}}), "at least 4 prompts")])
def test_a_malformed_stimulus_file_fails_with_one_line(content, msg, tmp_path):
    path = tmp_path / "s.json"
    path.write_text(content)
    with pytest.raises(de.DualencError, match=msg) as err:
        de.read_stimuli(path)
    assert "\n" not in str(err.value)


def test_the_shipped_stimuli_are_a_full_design_of_single_token_words():
    spec = de.read_stimuli(None)
    _, tokenizer = de.load_lm(de.SMOLLM2, "cpu")
    design = de.load_stimuli(spec, tokenizer)
    assert [sum(1 for _, c in design["prompt_ids"] if c == i) for i in range(4)] == [16, 16, 16, 16]
    assert all(len(w) == 8 for w in design["word_ids"].values())
    bad = {**spec, "words": {**spec["words"], spec["cells"][0]: ["extraordinarily-long-word"]}}
    with pytest.raises(de.DualencError, match="single tokens"):
        de.load_stimuli(bad, tokenizer)


def test_stage34_on_a_tiny_run_writes_its_table_figure_and_secondary_sae(tiny_run, capsys):
    out, first = tiny_run
    report = de.run(de.Config(eval_only=str(out), device="cpu", stage34=True))
    saved = json.loads((out / "results.json").read_text())
    assert saved["stage34"] == json.loads(json.dumps(report["stage34"]))  # added to the run's results.json
    assert saved["models"] == json.loads(json.dumps(first["models"]))  # whose evaluation stands
    st = report["stage34"]
    assert st["x1_max_change"] < 1e-5 and set(st["selected"]) == set(de.CONTRASTS)
    assert set(st["intervention"]) == {"selected", "random_matched", "primary_read", "shuffled_selection"}
    assert st["verdicts"]["overall"] in ("holds", "no", "unclear")
    assert (out / "stage34.png").read_bytes()[:4] == b"\x89PNG" and (out / "stage34.txt").exists()
    cfg = json.loads((out / "secondary" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post.nfm.hook_interaction_pre_relu"
    assert "stage 4" in capsys.readouterr().out


def test_an_intervention_holds_only_beyond_every_control():
    def rows(selected, *controls):
        return {"selected": {4.0: {"effect": sum(selected) / 2, "ci": selected}},
                **{f"c{i}": {4.0: {"effect": sum(c) / 2, "ci": c}} for i, c in enumerate(controls)}}
    assert de.beyond_controls(rows([0.5, 0.9], [-0.1, 0.1], [0.0, 0.3]), 4.0) == "holds"
    assert de.beyond_controls(rows([-0.9, -0.5], [-0.1, 0.1]), 4.0) == "holds"
    assert de.beyond_controls(rows([0.5, 0.9], [-0.1, 0.1], [1.0, 2.0]), 4.0) == "no"  # a control moves them more
    assert de.beyond_controls(rows([0.5, 0.9], [0.6, 0.8]), 4.0) == "no"
    assert de.beyond_controls(rows([0.2, 0.9], [-0.1, 0.3]), 4.0) == "unclear"
