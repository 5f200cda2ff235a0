"""stats: the referee's statistics, pure functions of tensors: no language model, no model,
nothing of the project. replicate.py and stages34.py import it; it imports only torch and the
standard library. Sections, in the order data flows:
  intervals           bootstrap weights (resamples over windows, features or prompts, paired across
                      models), percentile and Student-t seed intervals, summarise / across (a figure
                      over seeds), fmt_ci
  verdicts            the holds / no / unclear rule of intervals against a threshold
  distribution shape  weighted moments, Sarle's bimodality coefficient, two-Gaussian mixtures and
                      delta BIC, pearson: the decoder-norm analysis's statistics
  the 2 x 2 design    stage 4's contrasts, each tested by permutations against its own null
                      (restricted permutations for a main effect, Freedman-Lane for the interaction)
  held-out selection  a feature chosen on one half of the prompts, tested on the other
  beyond controls     an intervention's effect against its controls, paired over prompt resamples

Dimension letters as in dualenc.py, and P prompts, C cells or controls, R bootstrap resamples or
permutations, S seeds.
"""

import functools
import math

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------- intervals

def bootstrap_weights(n, n_boot, generator):
    """[1 + R, n] float64: row 0 all ones (the estimate itself), row r how often each of the n units
    (windows, or features) is drawn in resample r. A sum over units becomes a matrix product, and
    one matrix serves every model, so the resamples are paired across models (§9.6)."""
    draws = torch.randint(n, (n_boot, n), generator=generator)
    ones = torch.ones(n_boot, n, dtype=torch.float64)
    counts = torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(1, draws, ones)
    return torch.cat([torch.ones(1, n, dtype=torch.float64), counts])


def interval(samples, level=0.95):
    """Percentile bootstrap interval."""
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    return torch.quantile(samples.double(), q).tolist()


@functools.cache  # a pure function of (p, df), asked for once per figure summarised
def t_quantile(p, df):
    """Student's t quantile (p > 1/2), from the density integrated numerically: no scipy needed."""
    t = torch.linspace(0, 1000, 2_000_001, dtype=torch.float64)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = torch.exp(log_c - (df + 1) / 2 * torch.log1p(t.square() / df))
    cdf = 0.5 + torch.cumulative_trapezoid(pdf, t)
    return t[1 + torch.searchsorted(cdf, p)].item()


def seed_interval(values, level=0.95):
    """mean +- t sd / sqrt(S) over S seeds: the spread that training (initialisation, batch order)
    adds."""
    v = torch.as_tensor(values, dtype=torch.float64)
    half = t_quantile((1 + level) / 2, len(v) - 1) * v.std() / len(v) ** 0.5
    return [(v.mean() - half).item(), (v.mean() + half).item()]


def summarise(samples_SR):
    """A figure measured on S seeds, each on 1 + R bootstrap resamples (row 0 the estimate):
    its mean over seeds, the bootstrap interval of that mean (resamples paired across seeds), and
    with S > 1 the seed interval and each seed's value. The two intervals are shown side by side,
    never merged."""
    samples_SR = torch.as_tensor(samples_SR, dtype=torch.float64).reshape(-1, samples_SR.shape[-1])
    mean_R = samples_SR.mean(0)
    out = {"value": mean_R[0].item(), "ci": interval(mean_R[1:])}
    if len(samples_SR) > 1:
        out.update(seed_ci=seed_interval(samples_SR[:, 0]), per_seed=samples_SR[:, 0].tolist())
    return out


def across(per_seed, figure):
    """summarise figure(seed's samples) over every seed."""
    return summarise(torch.stack([figure(s) for s in per_seed]))


def fmt_num(x):
    """A figure as the tables print it."""
    return "undefined" if x is None else f"{x:.3f}" if abs(x) < 100 else f"{x:.0f}"


def fmt_ci(ci):
    """An interval as the tables print it."""
    return "-" if ci is None else f"[{fmt_num(ci[0])}, {fmt_num(ci[1])}]"


# ----------------------------------------------------------------------------- verdicts

def verdict(summary, threshold, above):
    """holds when every interval of `summary` lies on the rule's side of the threshold (>= when
    above, <= otherwise), no when every interval lies wholly on the other side, unclear
    otherwise."""
    if summary["ci"] is None:  # an undefined figure (a ratio over a denominator that may be 0)
        return "unclear"
    cis = [summary["ci"]] + ([summary["seed_ci"]] if "seed_ci" in summary else [])
    meets = [lo >= threshold if above else hi <= threshold for lo, hi in cis]
    misses = [hi < threshold if above else lo > threshold for lo, hi in cis]
    return "holds" if all(meets) else "no" if all(misses) else "unclear"


def on_side(ci, sign, at=0.0):
    """Whether the interval [lo, hi] lies wholly beyond `at` in the direction sign
    (+1: lo > at; -1: hi < at)."""
    return ci[0] > at if sign > 0 else ci[1] < at


# ----------------------------------------------------------------------------- distribution shape

def weighted_moments(x, w):
    """Mean and central moments 2..4 of x [n] under weights w [..., n] that sum to n (bootstrap
    counts)."""
    n = x.shape[-1]
    mean = (w * x).sum(-1, keepdim=True) / n
    c = [(w * (x - mean) ** p).sum(-1) / n for p in (2, 3, 4)]
    return mean.squeeze(-1), *c


def bimodality_coefficient(x, w=None):
    """Sarle's bimodality coefficient with the sample-size correction:
        BC = (g^2 + 1) / (kappa + 3 (n-1)^2 / ((n-2)(n-3)))     g skewness, kappa excess kurtosis
    BC > 5/9 (its value for a uniform distribution) suggests two modes; a normal sample gives ~1/3.
    It cannot tell skew from two modes (an exponential sample scores 5/9 too), hence gmm_bic beside
    it. w [..., n]: bootstrap counts, one BC per row."""
    x = x.double()
    w = torch.ones_like(x) if w is None else w
    n = x.shape[-1]
    _, m2, m3, m4 = weighted_moments(x, w)
    g = (n * (n - 1)) ** 0.5 / (n - 2) * m3 / m2 ** 1.5
    kappa = (n - 1) / ((n - 2) * (n - 3)) * ((n + 1) * m4 / m2 ** 2 - 3 * (n - 1))
    return (g ** 2 + 1) / (kappa + 3 * (n - 1) ** 2 / ((n - 2) * (n - 3)))


def gmm_floor(x):
    """gmm2's sd floor, the sample's resolution (Silverman's rule-of-thumb bandwidth)
        h = 0.9 sd(x) n^(-1/5)
    n points cannot resolve structure narrower than h. Taken from the sample, not a resample's
    weights, so every resample shares it. As each point's mixture density is at most
    1 / (h sqrt(2 pi)), two Gaussians beat one (of sd s_w, the resample's) by at most
    n (ln(s_w / h) + 1/2) nats, whatever the ties a bootstrap resample piles up (about 1.7 n at
    n = 200, where a floor of 1e-6 sd allowed 14 n). A bound, not a guarantee: a resample with a big
    enough tie can still pass delta BIC's threshold of 10."""
    x = x.double()
    return 0.9 * x.std().clamp_min(1e-300) * x.shape[-1] ** -0.2


def gmm2(x, w=None, iters=200):
    """Two-component 1-D Gaussian mixture fitted by EM from the quartiles, under weights w [..., n]
    (bootstrap counts; one fit per row): means, stds and weights [..., 2] sorted by mean, and the
    log-likelihood [...]."""
    x = x.double()
    w = torch.ones_like(x) if w is None else w
    n = x.shape[-1]
    lead = w.shape[:-1]
    mu = torch.quantile(x, torch.tensor([0.25, 0.75], dtype=x.dtype)).expand(*lead, 2).clone()
    sd, pi = x.std().expand(*lead, 2).clone(), torch.full((*lead, 2), 0.5, dtype=x.dtype)
    # a component collapsing onto tied points gains no more than the resolution allows
    floor = gmm_floor(x)

    def log_joint():  # log pi_c + log N(x | mu_c, sd_c): [..., n, 2]
        return (torch.log(pi) - torch.log(sd) - 0.5 * math.log(2 * math.pi))[..., None, :] \
            - 0.5 * ((x[:, None] - mu[..., None, :]) / sd[..., None, :]) ** 2

    for _ in range(iters):
        r = torch.softmax(log_joint(), dim=-1) * w[..., None]  # responsibilities, weighted
        n_c = r.sum(-2)
        pi, mu = n_c / n, (r * x[:, None]).sum(-2) / n_c.clamp_min(1e-300)
        sd = ((r * (x[:, None] - mu[..., None, :]) ** 2).sum(-2) / n_c.clamp_min(1e-300)).sqrt() \
            .clamp_min(floor)
    loglik = (torch.logsumexp(log_joint(), dim=-1) * w).sum(-1)
    order = mu.argsort(-1)
    return {"means": mu.gather(-1, order), "stds": sd.gather(-1, order),
            "weights": pi.gather(-1, order), "loglik": loglik}


def gmm_bic(x, w=None):
    """Delta BIC = BIC(one Gaussian) - BIC(two-Gaussian mixture), BIC = p ln n - 2 ln L with p = 2
    and 5 parameters. Above 10 is strong evidence for two components (Kass & Raftery 1995). Like BC,
    it also rises for a skewed single mode, so the plain SAE's value is its control. w as in
    gmm2."""
    x = x.double()
    w = torch.ones_like(x) if w is None else w
    n = x.shape[-1]
    _, var, _, _ = weighted_moments(x, w)
    loglik1 = -0.5 * n * (torch.log(2 * math.pi * var) + 1)
    loglik2 = gmm2(x, w)["loglik"]
    return (2 * math.log(n) - 2 * loglik1) - (5 * math.log(n) - 2 * loglik2)


def two_modes(fit, grid=2000):
    """Whether a fitted two-Gaussian mixture's density has two local maxima (two overlapping
    Gaussians can fit one skewed mode better than one Gaussian does, with a single peak)."""
    lo = (fit["means"] - 4 * fit["stds"]).min()
    hi = (fit["means"] + 4 * fit["stds"]).max()
    t = torch.linspace(lo.item(), hi.item(), grid, dtype=torch.float64)
    dens = (fit["weights"] / fit["stds"]
            * torch.exp(-0.5 * ((t[:, None] - fit["means"]) / fit["stds"]) ** 2)).sum(-1)
    peaks = (dens[1:-1] > dens[:-2]) & (dens[1:-1] > dens[2:])
    return int(peaks.sum()) >= 2


def pearson(a, b, w=None):
    """Correlation of a and b [n], under weights w [..., n] (bootstrap counts; one r per row)."""
    a, b = a.double(), b.double()
    w = torch.ones_like(a) if w is None else w
    a = a - (w * a).sum(-1, keepdim=True) / a.shape[-1]
    b = b - (w * b).sum(-1, keepdim=True) / b.shape[-1]
    return (w * a * b).sum(-1) / ((w * a * a).sum(-1) * (w * b * b).sum(-1)).sqrt()


# ----------------------------------------------------------------------------- the 2 x 2 design

CONTRASTS = {"interaction": (1.0, -1.0, -1.0, 1.0), "main_a": (0.5, 0.5, -0.5, -0.5),
             "main_b": (0.5, -0.5, 0.5, -0.5)}
# permutation t values equal up to rounding count as ties (>=): p stays conservative
TIE_TOLERANCE = 1e-9


def contrasts(A_PF, cell_P, weights_RP=None):
    """Per feature, the 2 x 2 contrasts of per-prompt activations A [P, F] with cell indices 0..3 in
    the order (a1 b1, a1 b2, a2 b1, a2 b2), from the cell means m:
        interaction = m11 - m12 - m21 + m22    main_a = (m11 + m12 - m21 - m22) / 2
        main_b likewise
    and t = contrast / se, se^2 = sum_c k_c^2 s_c^2 / n_c from the within-cell variances s_c^2
    (Welch's form; 0 for a feature silent within its cells). {name: (value [F], t [F])}; with
    weights_RP [R, P] (bootstrap counts), [R, F] each, a row per resample."""
    onehot_PC = F.one_hot(cell_P, 4).double()
    w_RP = torch.ones(1, len(cell_P), dtype=torch.float64) if weights_RP is None else weights_RP
    n_RC1 = (w_RP @ onehot_PC)[..., None]
    mean_RCF = torch.einsum("rp,pc,pf->rcf", w_RP, onehot_PC, A_PF.double()) / n_RC1
    sq_RCF = torch.einsum("rp,pc,pf->rcf", w_RP, onehot_PC, A_PF.double().square()) / n_RC1
    var_RCF = (sq_RCF - mean_RCF.square()).clamp_min(0) * n_RC1 / (n_RC1 - 1)
    out = {}
    for name, k in CONTRASTS.items():
        k_C = torch.tensor(k, dtype=torch.float64)
        value_RF = torch.einsum("c,rcf->rf", k_C, mean_RCF)
        se_RF = torch.einsum("c,rcf->rf", k_C.square(), var_RCF / n_RC1).sqrt()
        t_RF = torch.where(se_RF > 0, value_RF / se_RF.clamp_min(1e-300), 0.0)
        out[name] = (value_RF, t_RF) if weights_RP is not None else (value_RF[0], t_RF[0])
    return out


def stratified_weights(cell_P, n_boot, generator):
    """[1 + R, P] bootstrap counts that resample the prompts within each cell (row 0 all ones)."""
    w_RP = torch.zeros(n_boot + 1, len(cell_P), dtype=torch.float64)
    for c in range(4):
        members = (cell_P == c).nonzero()[:, 0]
        w_RP[:, members] = bootstrap_weights(len(members), n_boot, generator)
    return w_RP


def random_permutations(n_perm, n, generator):
    """[R, n]: R independent uniform permutations of range(n), in one call (the argsort of
    uniforms)."""
    return torch.rand(n_perm, n, generator=generator, dtype=torch.float64).argsort(-1)


def shuffle_within(A_PF, strata_P, n_perm, generator):
    """[R, P, F]: A's rows permuted among the prompts of each stratum, R times: one factor's labels
    shuffled within each level of the other, so the other factor's effect is kept."""
    src_RP = torch.arange(len(strata_P)).expand(n_perm, -1).clone()
    for s in strata_P.unique():
        members = (strata_P == s).nonzero()[:, 0]
        src_RP[:, members] = members[random_permutations(n_perm, len(members), generator)]
    return A_PF.double()[src_RP]


def additive_fit(A_PF, cell_P):
    """[P, F]: per feature, the least-squares fit of the main-effects-only model
        A_pf ~ mu_f + alpha_f [a_p = a2] + beta_f [b_p = b2]
    (least squares: exact on an unbalanced design too, where row + column - grand mean is not)."""
    a_P, b_P = (cell_P // 2).double(), (cell_P % 2).double()
    X_P3 = torch.stack([torch.ones_like(a_P), a_P, b_P], dim=1)
    return X_P3 @ torch.linalg.lstsq(X_P3, A_PF.double()).solution


def freedman_lane(A_PF, cell_P, n_perm, generator):
    """[R, P, F]: Freedman-Lane samples for the interaction's null, the additive fit plus its
    residuals permuted across all prompts,
        A*_r = fit + e[pi_r],  fit = additive_fit(A),  e = A - fit:
    both main effects stay, the interaction is what the shuffle removes."""
    fit_PF = additive_fit(A_PF, cell_P)
    return fit_PF + (A_PF.double() - fit_PF)[random_permutations(n_perm, len(cell_P), generator)]


def null_t(A_PF, cell_P, contrast, n_perm, generator):
    """[R, F]: the contrast's t on n_perm samples of its own null, in one batch:
        main_a: A permuted within each level of b (b's effect kept);
        main_b: within each level of a;
        interaction: Freedman-Lane (both main effects kept).
    Shuffling all four labels would test "nothing differs" instead: with a real main effect and no
    interaction, that test almost never rejects. Memory goes as n_perm P F: for the features carried
    over."""
    if contrast == "interaction":
        null_RPF = freedman_lane(A_PF, cell_P, n_perm, generator)
    else:
        null_RPF = shuffle_within(A_PF, cell_P % 2 if contrast == "main_a" else cell_P // 2,
                                  n_perm, generator)
    n_R, n_P, n_F = null_RPF.shape
    t = contrasts(null_RPF.permute(1, 0, 2).reshape(n_P, n_R * n_F),  # a sample per column
                  cell_P)[contrast][1]
    return t.reshape(n_R, n_F)


def permutation_p(A_PF, cell_P, contrast, n_perm, generator, sign=None):
    """[F]: permutation p-value of each feature's studentised contrast t against null_t,
        one-sided (sign +1 or -1, a number or [F]):  p = (1 + #{s t* >= s t}) / (1 + n_perm)
        two-sided (sign None):                       p = (1 + #{|t*| >= |t|}) / (1 + n_perm)
    The +1 counts the observed design among the permutations, so p is never 0. The restricted
    permutations are exact under "the factor has no effect at either level of the other" (so no
    interaction either), and studentising keeps them close otherwise; Freedman-Lane is approximate.
    The tests check both rates."""
    t_F = contrasts(A_PF, cell_P)[contrast][1]
    t_RF = null_t(A_PF, cell_P, contrast, n_perm, generator)
    if sign is None:
        exceed_RF = t_RF.abs() >= t_F.abs() - TIE_TOLERANCE
    else:
        s_F = torch.as_tensor(sign, dtype=torch.float64)
        exceed_RF = s_F * t_RF >= s_F * t_F - TIE_TOLERANCE
    return (1 + exceed_RF.sum(0)) / (1 + n_perm)


# ----------------------------------------------------------------------------- held-out selection

def split_halves(cell_P, generator):
    """[P] bool, True for the selection half: each cell's prompts split in two at random (the first
    floor(n_c / 2) of a random order), so both halves keep the design."""
    order = torch.randperm(len(cell_P), generator=generator)
    half_P = torch.zeros(len(cell_P), dtype=torch.bool)
    for c in range(4):
        members = order[cell_P[order] == c]
        half_P[members[: len(members) // 2]] = True
    return half_P


def top_feature(A_PF, cell_P, contrast="interaction", exclude=()):
    """(feature, sign, t): the feature with the largest |t| of a contrast (none of `exclude`), and
    the sign of its t (+1 for t = 0: a silent selection, whose test then gives p = 1)."""
    t_F = contrasts(A_PF, cell_P)[contrast][1]
    j = int(t_F.abs().index_fill(0, torch.tensor(list(exclude), dtype=torch.long), -1.0).argmax())
    return j, 1 if t_F[j] >= 0 else -1, t_F[j].item()


def held_out_verdict(p_corrected, p_opposite_corrected, value, ci, sign, alpha=0.05):
    """holds: the one-sided test in the selected direction rejects (p_corrected < alpha), with the
    estimate and its whole interval on the selected sign's side of 0; no: the same in the opposite
    direction (a sign flip that is itself significant); unclear otherwise: a test that does not
    reject is absence of evidence, not evidence of absence, and a sign flip is never "holds"."""
    if p_corrected < alpha and value * sign > 0 and on_side(ci, sign):
        return "holds"
    return "no" if p_opposite_corrected < alpha and value * sign < 0 and on_side(ci, -sign) \
        else "unclear"


def select_and_test(A_PF, cell_P, n_boot, generator, n_perm=2000, half_P=None, alpha=0.05):
    """Choose on one half, test on the other (§13). On the selection half (half_P True; split_halves
    if None) each contrast's top_feature and its sign; on the test half its contrast, a within-cell
    stratified bootstrap interval, the one-sided permutation p in the selected direction (each
    contrast against its own null), p_bonferroni = min(1, 3 p) for the len(CONTRASTS) features
    carried over, the opposite direction's p (p_opposite, for a sign flip), and held_out_verdict.
    Beside each, the paper's way: the top feature picked and tested on all prompts, two-sided and
    uncorrected. Returns (per-contrast dicts, selection indices, test indices)."""
    half_P = split_halves(cell_P, generator) if half_P is None else half_P
    sel, test = half_P.nonzero()[:, 0], (~half_P).nonzero()[:, 0]
    w_RP = stratified_weights(cell_P[test], n_boot, generator)
    out = {}
    for name in CONTRASTS:
        j, sign, t_sel = top_feature(A_PF[sel], cell_P[sel], name)
        a_P1 = A_PF[test][:, [j]]
        value_R1, t_R1 = contrasts(a_P1, cell_P[test], w_RP)[name]  # row 0: the test half itself
        p, p_opposite = (permutation_p(a_P1, cell_P[test], name, n_perm, generator, s).item()
                         for s in (sign, -sign))
        p_bonferroni, value, ci = min(1.0, p * len(CONTRASTS)), value_R1[0, 0].item(), \
            interval(value_R1[1:, 0])
        all_j = top_feature(A_PF, cell_P, name)[0]
        out[name] = {"feature": j, "sign": sign, "selection_t": t_sel, "test_half": value,
                     "test_half_ci": ci, "test_t": t_R1[0, 0].item(), "p": p,
                     "p_bonferroni": p_bonferroni, "p_opposite": p_opposite,
                     "verdict": held_out_verdict(p_bonferroni,
                                                 min(1.0, p_opposite * len(CONTRASTS)), value, ci,
                                                 sign, alpha),
                     "paper_way": {"feature": all_j,
                                   "contrast": contrasts(A_PF[:, [all_j]], cell_P)[name][0].item(),
                                   "p_same_prompts_uncorrected": permutation_p(
                                       A_PF[:, [all_j]], cell_P, name, n_perm, generator).item()}}
    return out, sel, test


# ----------------------------------------------------------------------------- beyond controls

def resampled_means(X_CP, w_RP):
    """[R, C]: each row of X [C, P] averaged over the prompts of each resample, (w X^T) / P."""
    return (w_RP @ X_CP.double().T) / X_CP.shape[-1]


def paired_difference(sel_P, ctrl_CP, w_RP, sign):
    """[R]: per prompt resample (the same prompts for both, so the prompt-to-prompt spread cancels),
    how much further the selected feature moves the lists than the control's features do, each by
    its size:
        d_r = s (w_r . sel) / P - (1/C) sum_c |(w_r . ctrl_c) / P|
        s = the selected effect's sign
    Sizes, because a control's direction means nothing: signed, controls pushing both ways would
    cancel, and one pushing the other way would count for the selected feature."""
    return sign * resampled_means(sel_P[None], w_RP)[:, 0] \
        - resampled_means(ctrl_CP, w_RP).abs().mean(-1)


def beyond_controls(sel_P, controls, w_RP, reference=()):
    """The selected feature's per-prompt effect sel_P [P] against each control {name: [C, P]}
    (C features scaled one at a time, or one set scaled together), paired over prompts by
    w_RP [1 + R, P]. Per control: its mean effect, the paired difference in size (paired_difference:
    estimate, interval), and the selected feature's rank, the fraction of the control's features
    with |effect| >= the selected one's. holds when the selected effect's own interval excludes 0
    and every deciding control's difference lies wholly above 0; no when some deciding control's
    lies wholly below 0 (it moves the lists further); unclear otherwise. Controls in `reference`
    are shown but never decide."""
    effect_R = resampled_means(sel_P[None], w_RP)[:, 0]
    sign, rows = int(torch.sign(effect_R[0])), {}
    for name, ctrl_CP in controls.items():
        d_R, effect_C = paired_difference(sel_P, ctrl_CP, w_RP, sign), ctrl_CP.double().mean(-1)
        rows[name] = {"effect": effect_C.mean().item(), "difference": d_R[0].item(),
                      "ci": interval(d_R[1:]),
                      "rank": (effect_C.abs() >= effect_R[0].abs()).double().mean().item(),
                      "reference_only": name in reference}
    selected = {"effect": effect_R[0].item(), "ci": interval(effect_R[1:])}
    deciding = [r["ci"] for r in rows.values() if not r["reference_only"]]
    holds = sign and on_side(selected["ci"], sign) and deciding \
        and all(on_side(ci, 1) for ci in deciding)
    decision = "holds" if holds else "no" if any(on_side(ci, -1) for ci in deciding) else "unclear"
    return {"selected": selected, "controls": rows, "verdict": decision}
