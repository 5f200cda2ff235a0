"""Tests for stats.py, the referee's pure statistics, written as examples of its API: bootstrap and
seed intervals, the holds / no / unclear rule, the decoder-norm statistics, and stage 4's
permutation tests, held-out selection and controls, all on constructed data:
no model, no language model."""

import math

import pytest
import torch

import stats as st


# ----------------------------------------------------------------------------- intervals

def test_bootstrap_of_a_constant_is_a_point_and_widens_with_noise():
    g = torch.Generator().manual_seed(0)
    w = st.bootstrap_weights(40, 500, g)
    assert w.shape == (501, 40) and (w[0] == 1).all() and (w.sum(-1) == 40).all()
    widths = []
    for noise in (0.0, 0.1, 1.0):
        per_window = 2.0 + noise * torch.randn(40, generator=g, dtype=torch.float64)
        s = st.summarise((w @ per_window) / 40)
        assert s["value"] == pytest.approx(per_window.mean().item())
        widths.append(s["ci"][1] - s["ci"][0])
    assert widths[0] == pytest.approx(0.0, abs=1e-12) and 0 < widths[1] < widths[2]


def test_seed_interval_is_students_t():
    assert st.t_quantile(0.975, 1) == pytest.approx(12.706, abs=2e-3)
    assert st.t_quantile(0.975, 2) == pytest.approx(4.303, abs=2e-3)
    lo, hi = st.seed_interval([1.0, 2.0, 3.0])
    assert ((lo + hi) / 2 == pytest.approx(2.0)
            and (hi - lo) / 2 == pytest.approx(4.303 / 3 ** 0.5, abs=2e-3))
    s = st.summarise(torch.tensor([[1.0, 0.9, 1.1], [3.0, 2.9, 3.1]]))
    assert s["value"] == 2.0 and s["per_seed"] == [1.0, 3.0] and "seed_ci" in s


# ----------------------------------------------------------------------------- verdicts

@pytest.mark.parametrize("ci, seed_ci, expected", [
    ([0.30, 0.40], None, "holds"), ([0.05, 0.10], None, "no"), ([0.10, 0.30], None, "unclear"),
    ([0.30, 0.40], [0.10, 0.50], "unclear"), ([0.30, 0.40], [0.25, 0.45], "holds")])
def test_verdict_needs_every_interval_on_one_side(ci, seed_ci, expected):
    summary = {"value": sum(ci) / 2, "ci": ci, **({"seed_ci": seed_ci} if seed_ci else {})}
    assert st.verdict(summary, 0.2, above=True) == expected


# ----------------------------------------------------------------------------- distribution shape

def test_bimodality_statistics_separate_two_modes_from_one():
    g = torch.Generator().manual_seed(0)
    unimodal = torch.randn(4000, generator=g)
    bimodal = torch.cat([0.05 + 0.01 * torch.randn(2000, generator=g),
                         0.37 + 0.03 * torch.randn(2000, generator=g)])
    assert st.bimodality_coefficient(unimodal) < 0.4 < 5 / 9 < st.bimodality_coefficient(bimodal)
    fit = st.gmm2(bimodal)
    assert fit["means"].tolist() == pytest.approx([0.05, 0.37], abs=0.01)
    assert fit["weights"].tolist() == pytest.approx([0.5, 0.5], abs=0.02)
    assert st.two_modes(fit) and not st.two_modes(st.gmm2(unimodal))


def test_bic_prefers_two_gaussians_only_for_a_bimodal_sample():
    g = torch.Generator().manual_seed(1)
    normal = 0.4 + 0.1 * torch.randn(4000, generator=g)
    bimodal = torch.cat([0.05 + 0.02 * torch.randn(1500, generator=g),
                         0.37 + 0.05 * torch.randn(2500, generator=g)])
    assert st.gmm_bic(normal) < 0 < 10 < st.gmm_bic(bimodal)


def test_weighted_statistics_equal_the_statistics_of_the_resampled_sample():
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(300, generator=g), torch.rand(300, generator=g)
    w = st.bootstrap_weights(300, 3, g)
    drawn = torch.repeat_interleave(torch.arange(300), w[2].long())  # resample 2 written out
    assert (st.bimodality_coefficient(x, w)[2]
            == pytest.approx(st.bimodality_coefficient(x[drawn]).item(), rel=1e-9))
    assert st.pearson(x, y, w)[2] == pytest.approx(st.pearson(x[drawn], y[drawn]).item(), rel=1e-9)
    assert (st.bimodality_coefficient(x, w)[0]
            == pytest.approx(st.bimodality_coefficient(x).item(), rel=1e-12))


@pytest.mark.parametrize("tie", [0, 150], ids=["tie_in_the_tail", "tie_at_the_centre"])
def test_a_tied_resample_cannot_collapse_a_mixture_component(tie):
    """30 % of a resample's weight on one value: every sd stays at the floor or above, and the gain
    over one Gaussian within n (ln(s_w / h) + 1/2) nats (a floor of 1e-6 sd allowed about 14 n)."""
    g = torch.Generator().manual_seed(9)
    n = 200
    x = torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.full((n,), 0.7 * n / (n - 1), dtype=torch.float64)
    w[tie] = 0.3 * n
    fit, floor = st.gmm2(x, torch.stack([torch.ones(n, dtype=torch.float64), w])), st.gmm_floor(x)
    assert (fit["stds"] >= floor * (1 - 1e-12)).all() and torch.isfinite(fit["loglik"]).all()
    s_w = st.weighted_moments(x, w)[1].sqrt()
    gain = (fit["loglik"][1] + 0.5 * n * (torch.log(2 * math.pi * s_w ** 2) + 1)).item()
    assert gain <= n * (math.log(s_w / floor) + 0.5) and gain < 0.5 * n


# ----------------------------------------------------------------------------- the 2 x 2 design

CELL = torch.arange(4).repeat_interleave(16)  # 16 prompts per cell, (a1 b1, a1 b2, a2 b1, a2 b2)
UNBALANCED = torch.arange(4).repeat_interleave(torch.tensor([10, 16, 22, 14]))
CONTRAST_K = {name: torch.tensor(k, dtype=torch.float64) for name, k in st.CONTRASTS.items()}


@pytest.fixture
def one_thread():
    """Thousands of small tensor operations, which a second thread only slows down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def planted(g, cell=CELL, main_a=0.0, main_b=0.0, interaction=0.0, n_features=1):
    """[P, F] normal noise plus cell means whose contrasts are exactly main_a, main_b,
    interaction."""
    means_C = (main_a * CONTRAST_K["main_a"] + main_b * CONTRAST_K["main_b"]
               + interaction * CONTRAST_K["interaction"] / 4)
    return means_C[cell][:, None] + torch.randn(len(cell), n_features, generator=g,
                                                dtype=torch.float64)


def sae_like(g, n_prompts=64, n_features=200):
    """Sparse, heavy-tailed codes like the secondary SAE's: each feature fires on 3-40 % of prompts,
    with lognormal sizes."""
    density_F = torch.empty(n_features, dtype=torch.float64).uniform_(0.03, 0.4, generator=g)
    fires = torch.rand(n_prompts, n_features, generator=g, dtype=torch.float64) < density_F
    return fires * torch.randn(n_prompts, n_features, generator=g, dtype=torch.float64).exp()


def dealt(g, per_cell=16):
    """Cell labels dealt to the prompts at random: they mean nothing."""
    return torch.arange(4).repeat_interleave(per_cell)[torch.randperm(4 * per_cell, generator=g)]


def planted_design(effect, seed=0, per_cell=16, n_features=30):
    """Per-prompt activations of a 2 x 2 design; feature 3 gets an interaction of size `effect`."""
    g = torch.Generator().manual_seed(seed)
    cell = torch.arange(4).repeat_interleave(per_cell)
    A = torch.rand(4 * per_cell, n_features, generator=g)
    A[:, 3] += effect * torch.tensor([1.0, -1.0, -1.0, 1.0])[cell] / 4
    return A, cell


def test_a_planted_interaction_is_found_and_its_permutation_p_is_small():
    A, cell = planted_design(effect=1.0)
    value, t = st.contrasts(A, cell)["interaction"]
    assert int(t.abs().argmax()) == 3 and value[3].item() == pytest.approx(1.0, abs=0.3)
    assert st.permutation_p(A[:, [3]], cell, "interaction", 999,
                            torch.Generator().manual_seed(0)).item() < 0.01
    null, cell = planted_design(effect=0.0)
    assert st.contrasts(null, cell)["interaction"][1][3].abs() < 3
    assert st.permutation_p(null[:, [3]], cell, "interaction", 999,
                            torch.Generator().manual_seed(0)).item() > 0.05
    # main effects: a feature that only rises with the first factor has no interaction
    A[:, 5] += 2.0 * (cell < 2)
    c = st.contrasts(A, cell)
    assert int(c["main_a"][1].abs().argmax()) == 5 and c["interaction"][1][5].abs() < 3


@pytest.mark.parametrize("cell", [CELL, UNBALANCED], ids=["balanced", "unbalanced"])
def test_each_null_keeps_the_other_effects_and_rejects_at_its_nominal_rate(cell, one_thread):
    """The interaction (Freedman-Lane) beside two strong main effects; each main effect (restricted
    permutation) beside a strong other one: 300 designs each, alpha 0.05, 999 permutations."""
    g = torch.Generator().manual_seed(0)
    n_designs, rejected = 300, {"interaction +": 0, "interaction two-sided": 0,
                                "main_a +": 0, "main_b -": 0}
    for _ in range(n_designs):
        y = planted(g, cell, main_a=1.5, main_b=-1.0)
        rejected["interaction +"] += (
            st.permutation_p(y, cell, "interaction", 999, g, sign=1).item() < 0.05)
        rejected["interaction two-sided"] += (
            st.permutation_p(y, cell, "interaction", 999, g).item() < 0.05)
        # each main effect's null
        y_b, y_a = planted(g, cell, main_b=2.0), planted(g, cell, main_a=2.0)
        rejected["main_a +"] += st.permutation_p(y_b, cell, "main_a", 999, g, sign=1).item() < 0.05
        rejected["main_b -"] += st.permutation_p(y_a, cell, "main_b", 999, g, sign=-1).item() < 0.05
    rates = {name: count / n_designs for name, count in rejected.items()}
    assert all(0.02 <= r <= 0.08 for r in rates.values()), rates


def test_planted_effects_are_found_in_their_direction_only(one_thread):
    g = torch.Generator().manual_seed(1)
    y = planted(g, interaction=2.0)
    assert st.permutation_p(y, CELL, "interaction", 999, g, 1).item() < 0.01
    # one-sided: not the wrong way
    assert st.permutation_p(y, CELL, "interaction", 999, g, -1).item() > 0.9
    y = planted(g, main_a=-1.5, main_b=1.0)
    assert st.permutation_p(y, CELL, "main_a", 999, g, -1).item() < 0.01
    assert st.permutation_p(y, CELL, "main_b", 999, g, 1).item() < 0.01
    assert st.permutation_p(y, CELL, "interaction", 999, g).item() > 0.05
    # a silent feature
    assert st.permutation_p(torch.zeros(64, 1), CELL, "main_a", 99, g, 1).item() == 1.0
    huge = planted(g, interaction=40.0)  # no permutation reaches it: p is the +1 correction's floor
    assert st.permutation_p(huge, CELL, "interaction", 199, g, 1).item() == pytest.approx(1 / 200)


def test_the_nulls_keep_what_they_must(one_thread):
    g = torch.Generator().manual_seed(2)
    y = planted(g, UNBALANCED, main_a=1.0, main_b=2.0, n_features=3)
    fit = st.additive_fit(y, UNBALANCED)
    # additive: no interaction
    assert st.contrasts(fit, UNBALANCED)["interaction"][0].abs().max() < 1e-12
    X = torch.stack([torch.ones(len(UNBALANCED)), (UNBALANCED // 2).double(),
                     (UNBALANCED % 2).double()], 1)
    # least squares: residuals orthogonal to the design
    assert (X.T.double() @ (y - fit)).abs().max() < 1e-9
    shuffled = st.shuffle_within(y, UNBALANCED % 2, 5, g)  # main_a's null: within each level of b
    for b in range(2):
        keep = UNBALANCED % 2 == b
        assert torch.equal(shuffled[:, keep].sort(1).values,
                           y[keep].sort(0).values.expand(5, -1, -1))


# ----------------------------------------------------------------------------- held-out selection

def test_select_then_test_on_meaningless_labels_rejects_at_its_nominal_rate(one_thread):
    """400 random dealings of labels to sparse heavy-tailed codes (64 prompts, 200 features): the
    whole pipeline, selection included, gives p < 0.05 at 5 % and Bonferroni keeps "holds" rare."""
    g = torch.Generator().manual_seed(3)
    p, verdicts = [], []
    for _ in range(400):
        out, _, _ = st.select_and_test(sae_like(g), dealt(g), 200, g, n_perm=999)
        p.append([out[c]["p"] for c in st.CONTRASTS])
        verdicts.append([out[c]["verdict"] for c in st.CONTRASTS])
    rate_C = (torch.tensor(p) < 0.05).double().mean(0)
    holds_C = torch.tensor([[v == "holds" for v in row] for row in verdicts]).double()
    assert all(0.02 <= r <= 0.08 for r in rate_C.tolist()), rate_C
    # Bonferroni's third of alpha, + 2.3 binomial sd
    assert (holds_C.mean(0) <= 0.05 / 3 + 0.015).all()
    assert holds_C.max(1).values.mean() <= 0.05  # the family-wise rate Bonferroni promises


@pytest.mark.parametrize("seed", range(4))
def test_labels_without_meaning_give_no_holds(seed, one_thread):
    """Features that follow a hidden property of the prompts, not their labels: nothing holds."""
    g = torch.Generator().manual_seed(100 + seed)
    hidden_P = torch.randn(64, 1, generator=g, dtype=torch.float64)
    A = sae_like(g) * (1 + (hidden_P * torch.randn(1, 200, generator=g, dtype=torch.float64)).exp())
    out, _, _ = st.select_and_test(A, dealt(g), 500, g, n_perm=1999)
    assert all(r["verdict"] != "holds" for r in out.values()), out


def test_a_planted_interaction_is_selected_on_one_half_and_holds_on_the_other(one_thread):
    g = torch.Generator().manual_seed(4)
    A = torch.cat([planted(g, interaction=-3.0), planted(g, n_features=50)], 1)
    out, sel, test = st.select_and_test(A, CELL, 500, g, n_perm=1999)
    r = out["interaction"]
    assert (r["feature"], r["sign"], r["verdict"]) == (0, -1, "holds") and r["p_bonferroni"] < 0.01
    assert sorted(torch.cat([sel, test]).tolist()) == list(range(64))
    assert [int((CELL[test] == c).sum()) for c in range(4)] == [8, 8, 8, 8]


def test_a_sign_flip_never_holds_and_a_weak_test_is_unclear(one_thread):
    g = torch.Generator().manual_seed(5)
    half_P = st.split_halves(CELL, g)
    flip_P = torch.where(half_P, 1.0, -1.0).double()[:, None]
    flipped = torch.cat([planted(g, interaction=4.0) * flip_P, planted(g, n_features=30)], 1)
    r = st.select_and_test(flipped, CELL, 500, g, 999, half_P=half_P)[0]["interaction"]
    assert (r["feature"], r["sign"], r["verdict"]) == (0, 1, "no") and r["p"] > 0.9
    faded = torch.where(half_P[:, None], planted(g, interaction=4.0), planted(g, interaction=0.3))
    r = st.select_and_test(torch.cat([faded, planted(g, n_features=30)], 1), CELL, 500, g, 999,
                           half_P=half_P)[0]
    assert r["interaction"]["feature"] == 0 and r["interaction"]["p"] > 0.05
    assert r["interaction"]["verdict"] == "unclear"
    # the rule itself, in both directions: (p, p the other way, estimate, interval, sign)
    for sign in (1, -1):
        assert st.held_out_verdict(0.001, 1.0, sign * 0.5,
                                   [sign * 0.1, sign * 0.9][::sign], sign) == "holds"
        assert st.held_out_verdict(1.0, 0.001, -sign * 0.5,
                                   [-sign * 0.9, -sign * 0.1][::sign], sign) == "no"
        assert st.held_out_verdict(1.0, 0.3, -sign * 0.5,
                                   [-sign * 0.9, -sign * 0.1][::sign], sign) == "unclear"
        assert st.held_out_verdict(0.3, 1.0, sign * 0.5,
                                   [sign * 0.1, sign * 0.9][::sign], sign) == "unclear"
        assert st.held_out_verdict(0.001, 1.0, sign * 0.5, [-0.1, 0.9], sign) == "unclear"


def test_a_shuffled_selection_never_picks_the_selected_feature():
    A, cell = planted_design(effect=1.0)
    j = st.top_feature(A, cell)[0]
    assert j == 3 and st.top_feature(A, cell, exclude=[3])[0] != 3


# ----------------------------------------------------------------------------- beyond controls

def test_the_paired_difference_is_the_difference_of_the_written_out_resampled_means():
    g = torch.Generator().manual_seed(6)
    sel_P = torch.randn(20, generator=g, dtype=torch.float64)
    ctrl_CP = torch.randn(12, 20, generator=g, dtype=torch.float64)
    w_RP = st.bootstrap_weights(20, 30, g)
    for sign in (1, -1):
        d_R = st.paired_difference(sel_P, ctrl_CP, w_RP, sign)
        for r in range(len(w_RP)):
            drawn = torch.arange(20).repeat_interleave(w_RP[r].long())  # the resample written out
            written_out = sign * sel_P[drawn].mean() - ctrl_CP[:, drawn].mean(1).abs().mean()
            assert d_R[r].item() == pytest.approx(written_out.item(), abs=1e-12)


def test_an_intervention_holds_only_beyond_every_deciding_control():
    g = torch.Generator().manual_seed(7)
    sel_P = 1.0 + 0.3 * torch.randn(40, generator=g, dtype=torch.float64)
    quiet = 0.3 * torch.randn(12, 40, generator=g, dtype=torch.float64)
    w_RP = st.bootstrap_weights(40, 400, g)
    out = st.beyond_controls(sel_P, {"random": quiet}, w_RP)
    assert out["verdict"] == "holds" and out["controls"]["random"]["rank"] == 0.0
    assert st.beyond_controls(-sel_P, {"random": quiet}, w_RP)["verdict"] == "holds"
    stronger = {"random": quiet, "primary": 2.0 + quiet[:2]}
    # a control moves the lists further
    assert st.beyond_controls(sel_P, stronger, w_RP)["verdict"] == "no"
    out = st.beyond_controls(sel_P, stronger, w_RP, reference=("primary",))
    # shown, does not decide
    assert out["verdict"] == "holds" and out["controls"]["primary"]["rank"] == 1.0
    close = {"random": quiet, "close": 1.0 + quiet}
    assert st.beyond_controls(sel_P, close, w_RP)["verdict"] == "unclear"
    half = torch.cat([quiet[:6], 5.0 + quiet[6:]])
    assert st.beyond_controls(sel_P, {"mixed": half}, w_RP)["controls"]["mixed"]["rank"] == 0.5
    # a control's direction means nothing: features pushing both ways, or the other way,
    # still count by size
    both_ways = torch.cat([3.0 + quiet[:6], -3.0 + quiet[6:]])
    assert st.beyond_controls(sel_P, {"random": both_ways}, w_RP)["verdict"] == "no"
    assert st.beyond_controls(sel_P, {"other_way": -3.0 + quiet[:1]}, w_RP)["verdict"] == "no"
    faint = 0.05 + torch.randn(40, generator=g, dtype=torch.float64)  # its own interval contains 0
    assert st.beyond_controls(faint, {"random": 0.01 * quiet}, w_RP)["verdict"] != "holds"
