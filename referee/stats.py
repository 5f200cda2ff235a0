"""stats: the referee's statistics, pure functions of tensors: no language model, no model,
nothing of the project. replicate.py and stages34.py import it; it imports only torch and the
standard library. Sections, in the order data flows:
  intervals           bootstrap weights (resamples over windows, features or prompts, paired across
                      models), percentile intervals, Student / Welch t intervals, Wilson's interval,
                      summarise / across (a figure over seeds), fmt_ci
  verdicts            rule: the one holds / no / unclear rule (intervals against the smallest effect
                      that counts, a test's p); verdict (a summarised figure); majority (seeds);
                      gap_reading (one model against another, beyond its path noise or within X)
  distribution shape  weighted moments, Sarle's bimodality coefficient, two-Gaussian mixtures and
                      delta BIC, pearson: the decoder-norm analysis's statistics
  the 2 x 2 design    cell moments, stage 4's contrasts and their Welch errors, each tested by
                      permutations against its own null (restricted permutations for a main
                      effect, Freedman-Lane for the interaction)
  selection and test  features chosen on the selection prompts with their directions, minimum
                      effects and routes (preregister), tested on matched items (judge_items: the
                      items' own contrasts, by a t test of means or a hurdle for sparse features)
  plasmode            simulated items from a feature's own selection distributions: the route's
                      rejection rate under its null, and the minimal detectable effect
  controls            an intervention's effect against random controls (rank p) and a paired one;
                      with_controls: a control that is not beaten, or is empty, keeps "unclear"

Dimension letters as in dualenc.py, and P prompts, I items, C cells or controls, R bootstrap
resamples or permutations, S seeds (or simulated sets).
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


@functools.cache  # a pure function of df, asked for once per degrees of freedom
def t_cdf_table(df):
    """Student's t CDF at t = 0 .. 100 in steps of 5e-4, from the density integrated numerically:
    no scipy needed. Returns (t, cdf), each [200,001], 3 MiB a df (the hurdle route asks for up
    to 62 of them). Beyond 100 only 1 or 2 degrees of freedom leave a tail above 1e-4, which
    t_tail then reads as at 100: larger, on the safe side."""
    t = torch.linspace(0, 100, 200_001, dtype=torch.float64)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = torch.exp(log_c - (df + 1) / 2 * torch.log1p(t.square() / df))
    return t, torch.cat([torch.tensor([0.5], dtype=torch.float64),
                         0.5 + torch.cumulative_trapezoid(pdf, t)])


def t_quantile(p, df):
    """Student's t quantile (p > 1/2)."""
    t, cdf = t_cdf_table(df)
    return t[torch.searchsorted(cdf, p)].item()


def t_tail(t_F, df):
    """One-sided p of Student's t statistics: P(T >= t) for each of t [F] (df a whole number)."""
    grid, cdf = t_cdf_table(df)
    t_F = torch.as_tensor(t_F, dtype=torch.float64)
    at = cdf[torch.searchsorted(grid, t_F.abs()).clamp_max(len(grid) - 1)]
    return torch.where(t_F >= 0, 1 - at, at)


def t_interval(value, se, df, level=0.95):
    """value +- t_{df} se, with df rounded down (a slightly wider interval; t_quantile is cached per
    whole df): Student's or Welch's interval for a mean or a contrast of a few units."""
    half = t_quantile((1 + level) / 2, max(1, math.floor(df))) * se
    return [value - half, value + half]


def seed_interval(values, level=0.95):
    """mean +- t sd / sqrt(S) over S seeds: the spread that training (initialisation, batch order)
    adds."""
    v = torch.as_tensor(values, dtype=torch.float64)
    return t_interval(v.mean().item(), v.std().item() / len(v) ** 0.5, len(v) - 1, level)


def mean_interval(x_P, level=0.95):
    """(mean, Student's t interval) of per-prompt values x [P]: prompts are the units."""
    x_P = x_P.double()
    return x_P.mean().item(), t_interval(x_P.mean().item(), x_P.std().item() / len(x_P) ** 0.5,
                                         len(x_P) - 1, level)


def wilson(successes, n, level=0.95):
    """Wilson's interval for a proportion successes / n (how many carried features replicate)."""
    z = 2 ** 0.5 * torch.erfinv(torch.tensor(level, dtype=torch.float64)).item()
    centre = (successes + z * z / 2) / (n + z * z)
    half = z / (n + z * z) * math.sqrt(successes * (n - successes) / n + z * z / 4)
    return [max(0.0, centre - half), min(1.0, centre + half)]


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

ALPHA = 0.05  # every test's level, fixed before any data are read


def rule(cis, direction, threshold, p=None, alpha=ALPHA):
    """The referee's one verdict rule (the claims, stage 4's selectivity and its intervention), with
    each interval [lo, hi] of `cis` read in `direction` (+1: the effect is upwards, -1: downwards)
    and `threshold` where the smallest effect that counts lies on the figure's axis (direction x
    the minimum effect, for an effect against 0), fixed before the data:
        holds    every interval lies at or beyond the threshold, and p <= alpha when there is a test
        no       every interval lies wholly short of it: an effect of the size that counts is ruled
                 out (the equivalence margin; an effect of the opposite sign is its far end)
        unclear  otherwise, and for an undefined interval (a ratio whose denominator may be 0)"""
    if any(ci is None for ci in cis):
        return "unclear"
    spans = [sorted((direction * lo, direction * hi)) for lo, hi in cis]
    if all(lo >= direction * threshold for lo, _ in spans) and (p is None or p <= alpha):
        return "holds"
    return "no" if all(hi < direction * threshold for _, hi in spans) else "unclear"


def verdict(summary, threshold, above):
    """rule on a summarised figure: its bootstrap interval and, over seeds, its seed interval, at
    or above the threshold (above) or at or below it."""
    cis = [summary["ci"]] + ([summary["seed_ci"]] if "seed_ci" in summary else [])
    return rule(cis, 1 if above else -1, threshold)


def majority(verdicts):
    """Several seeds' verdicts on one question, by the rule fixed before they are run: holds (no)
    where more than half of them hold (say no), unclear otherwise."""
    verdicts = list(verdicts)
    for v in ("holds", "no"):
        if 2 * verdicts.count(v) > len(verdicts):
            return v
    return "unclear"


def gap_reading(reduction, noise_share):
    """The second long run's rule (fixed before its runs), on a model's relative reduction of a
    baseline's error (positive: it is ahead), a summarised figure with its paired interval, and the
    pair's path noise as a share of the baseline's figure (0 where none is known):
        behind     the interval wholly below 0 and the gap beyond the noise
        ahead      the interval wholly above 0 and the gap beyond the noise
        within X   otherwise: X the largest of |either bound| and the noise"""
    (lo, hi), r = reduction["ci"], reduction["value"]
    if hi < 0 and -r > noise_share:
        return {"reading": "behind", "gap": -r, "noise": noise_share}
    if lo > 0 and r > noise_share:
        return {"reading": "ahead", "gap": r, "noise": noise_share}
    return {"reading": "within", "within": max(abs(lo), abs(hi), noise_share),
            "noise": noise_share}


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


def cell_moments(A_PF, cell_P, weights_RP=None):
    """Each cell's size [R, 4, 1], mean and unbiased variance [R, 4, F] of the per-prompt
    activations A [P, F], for every row of weights_RP [R, P] (bootstrap counts; one row of ones, the
    prompts themselves, when None)."""
    onehot_PC = F.one_hot(cell_P, 4).double()
    w_RP = torch.ones(1, len(cell_P), dtype=torch.float64) if weights_RP is None else weights_RP
    n_RC1 = (w_RP @ onehot_PC)[..., None]
    mean_RCF = torch.einsum("rp,pc,pf->rcf", w_RP, onehot_PC, A_PF.double()) / n_RC1
    sq_RCF = torch.einsum("rp,pc,pf->rcf", w_RP, onehot_PC, A_PF.double().square()) / n_RC1
    return n_RC1, mean_RCF, (sq_RCF - mean_RCF.square()).clamp_min(0) * n_RC1 / (n_RC1 - 1)


def contrasts(A_PF, cell_P, weights_RP=None):
    """Per feature, the 2 x 2 contrasts of per-prompt activations A [P, F] with cell indices 0..3 in
    the order (a1 b1, a1 b2, a2 b1, a2 b2), from the cell means m:
        interaction = m11 - m12 - m21 + m22    main_a = (m11 + m12 - m21 - m22) / 2
        main_b likewise
    and t = contrast / se, se^2 = sum_c k_c^2 s_c^2 / n_c from the within-cell variances s_c^2
    (Welch's form; 0 for a feature silent within its cells). {name: (value [F], t [F])}; with
    weights_RP [R, P] (bootstrap counts), [R, F] each, a row per resample."""
    n_RC1, mean_RCF, var_RCF = cell_moments(A_PF, cell_P, weights_RP)
    out = {}
    for name, k in CONTRASTS.items():
        k_C = torch.tensor(k, dtype=torch.float64)
        value_RF = torch.einsum("c,rcf->rf", k_C, mean_RCF)
        se_RF = torch.einsum("c,rcf->rf", k_C.square(), var_RCF / n_RC1).sqrt()
        t_RF = torch.where(se_RF > 0, value_RF / se_RF.clamp_min(1e-300), 0.0)
        out[name] = (value_RF, t_RF) if weights_RP is not None else (value_RF[0], t_RF[0])
    return out


def welch(A_PF, cell_P, contrast):
    """Per feature, a contrast's value, its Welch standard error and Welch-Satterthwaite degrees of
    freedom, each [F]:
        se^2 = sum_c u_c,  u_c = k_c^2 s_c^2 / n_c,   df = se^4 / sum_c u_c^2 / (n_c - 1)
    (df = P - 4 for a feature silent within its cells, whose se is 0)."""
    n_C1, mean_CF, var_CF = (m[0] for m in cell_moments(A_PF, cell_P))
    k_C1 = torch.tensor(CONTRASTS[contrast], dtype=torch.float64)[:, None]
    u_CF = k_C1.square() * var_CF / n_C1
    se_F = u_CF.sum(0).sqrt()
    df_F = torch.where(se_F > 0, u_CF.sum(0).square()
                       / (u_CF.square() / (n_C1 - 1)).sum(0).clamp_min(1e-300), len(cell_P) - 4.0)
    return (k_C1 * mean_CF).sum(0), se_F, df_F


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


def null_samples(A_PF, cell_P, contrast, n_perm, generator):
    """[R, P, F]: n_perm samples of the contrast's own null:
        main_a: A permuted within each level of b (b's effect kept);
        main_b: within each level of a;
        interaction: Freedman-Lane (both main effects kept).
    Shuffling all four labels would sample "nothing differs" instead, removing the main effects the
    null must keep. Memory goes as n_perm P F: for the features carried over."""
    if contrast == "interaction":
        return freedman_lane(A_PF, cell_P, n_perm, generator)
    return shuffle_within(A_PF, cell_P % 2 if contrast == "main_a" else cell_P // 2, n_perm,
                          generator)


def null_t(A_PF, cell_P, contrast, n_perm, generator):
    """[R, F]: the contrast's t on each of null_samples, in one batch."""
    null_RPF = null_samples(A_PF, cell_P, contrast, n_perm, generator)
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


# ----------------------------------------------------------------------------- selection and test
# The plan is chosen on the selection prompts (unpaired, a cell's own topics) and tested on matched
# items: one situation written in all four cells, so that an item's four prompts differ in the two
# factors only and the item, not the prompt, is the unit.

N_CARRIED = 5  # features carried to the test items, per contrast and code: 15 tests a code
# the smallest contrast that counts, in the feature's within-cell standard deviations on the
# selection prompts (pooled over the cells): cells half a spread apart
MIN_SELECTIVITY = 0.5
# a feature silent on more than this share of any cell's selection prompts takes the hurdle route:
# its cell means are mostly a firing rate, and a t test of means does not keep its level there
SILENT_SHARE = 0.5


def top_features(A_PF, cell_P, contrast="interaction", n=1, exclude=()):
    """The n features with the largest |t| of a contrast (none of `exclude`), largest first, as
    (feature, sign of t: +1 for t = 0, t)."""
    t_F = contrasts(A_PF, cell_P)[contrast][1]
    size_F = t_F.abs().index_fill(0, torch.tensor(list(exclude), dtype=torch.long), -1.0)
    return [(j, 1 if t_F[j] >= 0 else -1, t_F[j].item()) for j in size_F.topk(n).indices.tolist()]


def route(values_P, cell_P):
    """"hurdle" for a feature silent on more than SILENT_SHARE of any cell's prompts, else
    "mean"."""
    silent_C = torch.stack([(values_P[cell_P == c] <= 0).double().mean() for c in range(4)])
    return "hurdle" if bool((silent_C > SILENT_SHARE).any()) else "mean"


def preregister(A_sel_PF, cell_sel_P, n=N_CARRIED):
    """What the test items will be asked, from the selection prompts alone: per contrast the n
    features of largest |t|, each with its direction (the sign of its t), the smallest test
    contrast that counts (MIN_SELECTIVITY times its pooled within-cell standard deviation there),
    its route, and its selection values (the plasmode reads them). {contrast: [{feature,
    direction, selection_t, sd, min_effect, route, selection_values}]}."""
    plan = {}
    for name in CONTRASTS:
        chosen = top_features(A_sel_PF, cell_sel_P, name, n)
        n_C1, _, var_CN = (m[0] for m in cell_moments(A_sel_PF[:, [j for j, _, _ in chosen]],
                                                      cell_sel_P))
        sd_N = (((n_C1 - 1) * var_CN).sum(0) / (len(cell_sel_P) - 4)).sqrt()
        plan[name] = [{"feature": j, "direction": sign, "selection_t": t, "sd": sd,
                       "min_effect": MIN_SELECTIVITY * sd,
                       "route": route(A_sel_PF[:, j], cell_sel_P),
                       "selection_values": A_sel_PF[:, j].tolist()}
                      for (j, sign, t), sd in zip(chosen, sd_N.tolist())]
    return plan


def item_contrasts(A_ICF, contrast):
    """[I, F]: each item's own contrast of its four prompts' activations A [I, 4, F] (cells in
    CONTRASTS' order). Their mean over items is the contrast of the cell means."""
    k_C = torch.tensor(CONTRASTS[contrast], dtype=torch.float64)
    return torch.einsum("c,icf->if", k_C, A_ICF.double())


def mean_test(d_IF, direction_F):
    """The mean route: per feature the mean of the items' contrasts d, its standard error over
    items, and Student's t in `direction`, direction x mean / se (0 for a feature whose contrast is
    the same on every item: no spread, no evidence)."""
    mean_F, se_F = d_IF.mean(0), d_IF.std(0) / math.sqrt(len(d_IF))
    t_F = torch.where(se_F > 0, torch.as_tensor(direction_F) * mean_F / se_F.clamp_min(1e-300),
                      0.0)
    return mean_F, se_F, t_F


def binomial_tail(k_F, n_F):
    """P(X >= k), X ~ Binomial(n, 1/2), exactly, per element of k [F] and n [F] (k <= n)."""
    k_F, n_F = torch.as_tensor(k_F).long(), torch.as_tensor(n_F).long()
    top = int(n_F.max()) if len(n_F) else 0
    n_N1 = torch.arange(top + 1, dtype=torch.float64)[:, None]
    j_1J = torch.arange(top + 1, dtype=torch.float64)[None, :]
    log_pmf = (torch.lgamma(n_N1 + 1) - torch.lgamma(j_1J + 1)
               - torch.lgamma((n_N1 - j_1J).clamp_min(0) + 1) - n_N1 * math.log(2))
    pmf_NJ = torch.where(j_1J <= n_N1, log_pmf.exp(), 0.0)
    return pmf_NJ.flip(1).cumsum(1).flip(1)[n_F, k_F].clamp_max(1.0)


def hurdle_test(A_ICF, contrast, direction_F):
    """The hurdle route's one-sided p, per feature, Bonferroni over its two parts:
        firing  the items' contrasts of "fires" (activation > 0): an exact sign test over the items
                whose contrast is not 0 (#{direction e_i > 0} against Binomial(n, 1/2))
        size    the items where it fires in all four cells: Student's t of their contrasts
                (p = 1 with fewer than 3 such items)
    p = min(1, 2 min(p_firing, p_size))."""
    direction_F = torch.as_tensor(direction_F, dtype=torch.float64)
    e_IF = direction_F * item_contrasts((A_ICF > 0).double(), contrast)
    p_fire_F = binomial_tail((e_IF > 0).sum(0), (e_IF != 0).sum(0))
    d_IF = direction_F * item_contrasts(A_ICF, contrast)
    all_IF = (A_ICF > 0).all(1)
    n_F = all_IF.sum(0)
    mean_F = (d_IF * all_IF).sum(0) / n_F.clamp_min(1)
    var_F = ((d_IF - mean_F).square() * all_IF).sum(0) / (n_F - 1).clamp_min(1)
    se_F = (var_F / n_F.clamp_min(1)).sqrt()
    p_size_F = torch.ones(len(n_F), dtype=torch.float64)
    for n in n_F.unique().tolist():
        at = (n_F == n) & (se_F > 0)
        if n >= 3 and at.any():
            p_size_F[at] = t_tail(mean_F[at] / se_F[at], n - 1)
    return (2 * torch.minimum(p_fire_F, p_size_F)).clamp_max(1.0)


def route_statistic(A_ICF, contrast, direction_F, routes):
    """Per feature [F]: the contrast of cell means (the mean of the items' contrasts, the paper's
    estimand), its standard error over items, and its route's statistic, larger for more evidence
    in `direction`: the mean route's t, the hurdle route's -log p (hurdle_test); a route's own
    null distribution turns it into a p (plasmode_null, calibrated_p)."""
    mean_F, se_F, t_F = mean_test(item_contrasts(A_ICF, contrast), direction_F)
    hurdle = torch.tensor([r == "hurdle" for r in routes])
    stat_F = t_F
    if hurdle.any():
        stat_F = torch.where(hurdle, -hurdle_test(A_ICF, contrast, direction_F).log(), t_F)
    return mean_F, se_F, stat_F


def calibrated_p(stat_Q, null_RS):
    """p of each of Q statistics against one feature's own null samples, one row per assumed
    item correlation [R, S]: (1 + #{null >= stat}) / (1 + S), the largest over the rows (the
    correlation is not known before the test)."""
    sorted_RS = null_RS.sort(-1).values
    queries_RQ = (torch.as_tensor(stat_Q, dtype=torch.float64) - TIE_TOLERANCE).expand(
        len(sorted_RS), -1).contiguous()
    exceed_RQ = sorted_RS.shape[-1] - torch.searchsorted(sorted_RS, queries_RQ)
    return ((1 + exceed_RQ) / (1 + sorted_RS.shape[-1])).amax(0)


def judge_items(A_ICF, plan, nulls, alpha=ALPHA):
    """The plan's features on the test items A [I, 4, F]: per feature its contrast, Student's t
    interval over items, its route's one-sided p in its direction against the feature's own null
    (nulls {contrast: [R, F, S]}, plasmode_null at each assumed correlation), p_bonferroni over
    every feature the plan carries, and rule's verdict against its min_effect; per contrast how
    many hold, with Wilson's interval for that share. The first feature of each contrast is "the"
    selected one."""
    n_tests, n_items = sum(len(rows) for rows in plan.values()), len(A_ICF)
    out = {}
    for name, rows in plan.items():
        j = [r["feature"] for r in rows]
        direction_F = torch.tensor([r["direction"] for r in rows], dtype=torch.float64)
        value_F, se_F, stat_F = route_statistic(A_ICF[:, :, j], name, direction_F,
                                                [r["route"] for r in rows])
        p_F = torch.stack([calibrated_p(stat[None], null_RS)[0]
                           for stat, null_RS in zip(stat_F, nulls[name].transpose(0, 1))])
        tested = []
        for r, value, se, p in zip(rows, value_F.tolist(), se_F.tolist(), p_F.tolist()):
            ci, p_bonferroni = t_interval(value, se, n_items - 1), min(1.0, p * n_tests)
            kept = {k: v for k, v in r.items() if k != "selection_values"}
            tested.append({**kept, "test": value, "test_ci": ci, "p": p,
                           "p_bonferroni": p_bonferroni,
                           "verdict": rule([ci], r["direction"], r["direction"] * r["min_effect"],
                                           p_bonferroni, alpha)})
        holds = sum(r["verdict"] == "holds" for r in tested)
        out[name] = {"features": tested, "holds": holds, "carried": len(tested),
                     "holds_share_ci": wilson(holds, len(tested))}
    return out


def paper_way(A_PF, cell_P, n_perm, generator):
    """The paper's way, for comparison: per contrast the top feature picked and tested on all
    prompts, two-sided and uncorrected."""
    out = {}
    for name in CONTRASTS:
        j = top_features(A_PF, cell_P, name)[0][0]
        out[name] = {"feature": j, "contrast": contrasts(A_PF[:, [j]], cell_P)[name][0].item(),
                     "p_same_prompts_uncorrected": permutation_p(A_PF[:, [j]], cell_P, name,
                                                                 n_perm, generator).item()}
    return out


# ----------------------------------------------------------------------------- plasmode
# Simulated test items whose cells have a real feature's own distributions on the selection
# prompts, moved so that the contrast is absent (or planted at a size): how often a route rejects
# at the level it is used, and the smallest effect it would find. An item's four prompts are tied
# by a Gaussian copula: the selection prompts are unpaired, so how alike an item's prompts are
# cannot be measured before the test; ITEM_CORRELATION is assumed, and calibration is also checked
# without it.

ITEM_CORRELATION = 0.5
POWER = 0.8  # the minimal detectable effect is found with this probability


def marginals(values_P, cell_P, route_name):
    """Each cell's distribution as (firing share q, sorted values v): for the mean route q = 1 and v
    all the cell's values; for the hurdle route q the share above 0 and v the values above 0 (a
    cell that never fired takes the other cells' firing values)."""
    values_P = torch.as_tensor(values_P, dtype=torch.float64)
    cells = [values_P[cell_P == c] for c in range(4)]
    if route_name == "mean":
        return [(1.0, v.sort().values) for v in cells]
    pooled = values_P[values_P > 0].sort().values
    return [((v > 0).double().mean().item(),
             v[v > 0].sort().values if (v > 0).any() else pooled) for v in cells]


def moved(margins, contrast, route_name, effect):
    """The cells moved so that the contrast of their means is `effect` (0: the null). The mean route
    shifts every value of cell c by (effect - k.m) k_c / |k|^2 (k the contrast's coefficients, m
    the cell means): the other contrasts keep their values. The hurdle route makes the firing
    shares and the firing values' means each additive the same way (q, and v scaled): its null is
    that neither part has the contrast; an effect then moves the firing shares so that the cell
    means' contrast is `effect` (short of it where a share would leave [0, 1])."""
    k_C = torch.tensor(CONTRASTS[contrast], dtype=torch.float64)
    kk = k_C.square().sum()
    if route_name == "mean":
        m_C = torch.stack([v.mean() for _, v in margins])
        shift_C = (effect - k_C @ m_C) * k_C / kk
        return [(q, v + shift) for (q, v), shift in zip(margins, shift_C.tolist())]
    q_C = torch.tensor([q for q, _ in margins], dtype=torch.float64)
    q_C = (q_C - (k_C @ q_C) * k_C / kk).clamp(1e-3, 1.0)
    m_C = torch.stack([v.mean() for _, v in margins])
    target_C = torch.maximum(m_C - (k_C @ m_C) * k_C / kk, 1e-3 * m_C.abs().max())
    if effect:  # through the firing shares, as a sparse feature's cell means mostly move
        step = (effect - k_C @ (q_C * target_C)) / (k_C.square() @ target_C / kk)
        q_C = (q_C + step * k_C / kk).clamp(1e-3, 1.0)
    return [(q, v * (t / v.mean())) for q, (_, v), t in zip(q_C.tolist(), margins,
                                                             target_C.tolist())]


def plasmode_items(margins, n_items, n_sims, generator, rho=ITEM_CORRELATION):
    """[I, 4, S]: S simulated sets of n_items items, each cell drawn from its (q, v) through a
    Gaussian copula with correlation rho between an item's four prompts: a value is 0 below the
    uniform's 1 - q, else v at the rank the rest of the uniform gives."""
    z_SI1 = torch.randn(n_sims, n_items, 1, generator=generator, dtype=torch.float64)
    z_SIC = (math.sqrt(rho) * z_SI1 + math.sqrt(1 - rho)
             * torch.randn(n_sims, n_items, 4, generator=generator, dtype=torch.float64))
    u_SIC = 0.5 * (1 + torch.erf(z_SIC / math.sqrt(2)))
    out = torch.zeros_like(u_SIC)
    for c, (q, v) in enumerate(margins):
        rank = ((u_SIC[..., c] - (1 - q)) / q).clamp(0, 1 - 1e-12)
        out[..., c] = torch.where(u_SIC[..., c] >= 1 - q, v[(rank * len(v)).long()], 0.0)
    return out.permute(1, 2, 0)


def plasmode_statistics(row, cell_P, contrast, n_items, n_sims, generator, effect=0.0,
                        rho=ITEM_CORRELATION, chunk=4000):
    """One carried feature (a plan row) on n_sims plasmode sets of n_items items, its contrast moved
    to `effect` in its direction: (value [S], se [S], its route's statistic [S])."""
    margins = moved(marginals(row["selection_values"], cell_P, row["route"]), contrast,
                    row["route"], row["direction"] * effect)
    parts = []
    for start in range(0, n_sims, chunk):
        A_ICS = plasmode_items(margins, n_items, min(chunk, n_sims - start), generator, rho)
        n = A_ICS.shape[-1]
        parts.append(route_statistic(A_ICS, contrast, torch.full((n,), row["direction"]),
                                     [row["route"]] * n))
    return [torch.cat(x) for x in zip(*parts)]


def plasmode_null(row, cell_P, contrast, n_items, n_sims, generator, rho=ITEM_CORRELATION):
    """[S]: the route's statistic on n_sims plasmode sets with the contrast absent: the feature's
    own null, sealed with the plan, which calibrated_p reads."""
    return plasmode_statistics(row, cell_P, contrast, n_items, n_sims, generator, rho=rho)[2]


def plasmode_rates(row, null_RS, cell_P, contrast, n_items, level, n_sims, generator, effect=0.0,
                   rho=ITEM_CORRELATION):
    """How often, over n_sims plasmode sets with the contrast moved to `effect`, the calibrated p
    (against null_RS, calibrated_p's) is at most `level`, and how often the rule would say "holds"
    (that p, and the t interval over items at or beyond the minimum effect)."""
    value_S, se_S, stat_S = plasmode_statistics(row, cell_P, contrast, n_items, n_sims, generator,
                                                effect, rho)
    rejected_S = calibrated_p(stat_S, null_RS) <= level
    low_S = row["direction"] * value_S - t_quantile(0.975, n_items - 1) * se_S
    return (rejected_S.double().mean().item(),
            (rejected_S & (low_S >= row["min_effect"])).double().mean().item())


def minimal_detectable(row, null_RS, cell_P, contrast, n_items, level, generator, n_sims=400,
                       steps=8):
    """The smallest contrast, in the feature's own pooled sd, at which the rule says "holds" with
    probability POWER on n_items plasmode items (bisection up to 64 sd; None beyond)."""
    if row["sd"] <= 0:
        return None
    seed = int(torch.randint(2**31, (1,), generator=generator))

    def power(size):  # the same draws at every size (common random numbers)
        return plasmode_rates(row, null_RS, cell_P, contrast, n_items, level, n_sims,
                              torch.Generator().manual_seed(seed), size * row["sd"])[1]
    lo, hi = 0.0, 64.0
    if power(hi) < POWER:
        return None
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if power(mid) >= POWER else (mid, hi)
    return hi


# ----------------------------------------------------------------------------- controls

MIN_CONTROLS = 19  # active random controls a rank needs: (1 + 0) / (1 + 19) = 0.05 is its floor


def rank_p(effect, control_effects_C):
    """The selected effect's rank among C controls' as a permutation p:
        p = (1 + #{|control| >= |selected|}) / (1 + C)."""
    c = torch.as_tensor(control_effects_C, dtype=torch.float64)
    return (1 + int((c.abs() >= abs(effect)).sum())) / (1 + len(c))


def against_random(effect, control_effects_C, active_C, alpha=ALPHA):
    """The selected feature's mean effect against a random set of control features' (each scaled
    alone): the rank p over the controls that are active on the test prompts. "beyond" when
    p <= alpha, "empty" with fewer than MIN_CONTROLS active (silent features change nothing: they
    would make any effect look large), "not beyond" otherwise."""
    active = torch.as_tensor(control_effects_C, dtype=torch.float64)[torch.as_tensor(active_C)]
    if len(active) < MIN_CONTROLS:
        return {"status": "empty", "active": len(active), "p": None, "effect": None}
    p = rank_p(effect, active)
    return {"status": "beyond" if p <= alpha else "not beyond", "active": len(active), "p": p,
            "effect": active.abs().mean().item()}


def against_paired(effect_P, control_P, direction, active):
    """The selected feature's per-prompt effect against one control set's on the same prompts, in
    size: d_p = direction x effect_p - s x control_p, s the sign of the control's mean effect
    (whichever way it moves the lists counts for it). "beyond" when the t interval of d lies wholly
    above 0, "empty" when the control's features are silent on the test prompts."""
    if not active:
        return {"status": "empty", "difference": None, "ci": None, "effect": 0.0}
    s = 1.0 if control_P.double().mean() >= 0 else -1.0
    d, ci = mean_interval(direction * effect_P.double() - s * control_P.double())
    return {"status": "beyond" if ci[0] > 0 else "not beyond", "difference": d, "ci": ci,
            "effect": control_P.double().mean().item()}


def with_controls(effect_verdict, controls):
    """An effect's verdict beside its controls: "holds" stands only when every control is
    "beyond"; otherwise it becomes "unclear" (an empty control cannot fail, so it cannot pass, and
    one not run cannot pass either). "no" and "unclear" stand."""
    if effect_verdict == "holds" and any(c["status"] != "beyond" for c in controls.values()):
        return "unclear"
    return effect_verdict
