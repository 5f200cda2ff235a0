"""replicate: the referee beside dualenc.py. Does the paper hold, and against which baseline?

dualenc.py is the method (SAE, NFM, the sequential and joint loops, their evaluation), runner.py
runs it (run folders, the command line; the text from corpus.py, the LM from language_model.py,
models on disk in checkpoint.py), store.py keeps activations on disk. This file
adds what a careful reviewer asks for (docs/method.md §9, §13): baselines with the method's care,
intervals over windows and seeds, the paper's claims each read three ways with a verdict, the
decoder-norm analysis, figures, and the paper's stages 3-4. `python -m referee` runs all of it;
it takes every flag of dualenc.py and the referee's own. Beside it, stats.py holds the pure
statistics (paired bootstrap, seed intervals, the holds / no / unclear rule, mixtures, permutation
tests), stages34.py the paper's stages 3-4, report.py the figures and tables and browser.py the
feature browser's page; this file imports all four. Sections, in the order data flows:
  config           Config: dualenc's and runner's settings and the referee's (--seeds, --n-boot,
                   --stage34, --stimuli, --sae, --store, --models, --checkpoints, --combine,
                   --compare)
  baselines        the models a reviewer adds (sae_matched, joint_no_linear), the variants
                   evaluated (the joint model's own SAE path, the pathway ablations),
                   evaluate_variants (sums per window)
  metrics          every variant's figures (§6) on every window resample (paired bootstrap,
                   stats.py)
  analyses         parameter counts, contributions, decoder norms, the claims table
  training length  checkpoints along the training length: each model and claim at log-spaced steps
  your own SAE     read_saelens, import_sae: study a SAELens TopK SAE instead of training one
  run              run (the whole replication; stages 3-4 from stages34.py, figures and tables from
                   report.py, the feature browser's page from browser.py, its secondary SAE loaded
                   or trained here), --combine, --compare, main

Dimension letters as in dualenc.py, and R bootstrap resamples.
"""

import functools
import json
import math
import resource
import subprocess
import sys
from typing import NamedTuple
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import dualenc as de
from referee import browser, checkpoint, distributed, runner, training
from referee import report as rep
from referee import stages34 as s34
from referee import stats as st
from referee.store import load_data


# ----------------------------------------------------------------------------- config

STORE = "runs/activations"  # where activation stores go unless --store says


@dataclass
class Config(runner.RunConfig):
    """dualenc's settings, the runner's and the referee's."""

    STAGES = ("sae", "sae_matched", "sequential", "joint", "joint_no_linear")  # trained in order
    RUN_FLAGS = (*runner.RunConfig.RUN_FLAGS, "stage34", "stimuli", "store", "browser")
    POSITIVE = (*runner.RunConfig.POSITIVE, "seeds", "n_boot")
    PROG, COMMAND = "referee", "python -m referee"
    DESCRIPTION = sys.modules[__module__].__doc__.split("\n\n")[0]  # the module docstring

    seeds: int = de.setting(1, "train every model this many times, with seeds seed, seed+1, ... "
                            "(the data split stays)")
    n_boot: int = de.setting(1000, "bootstrap resamples behind every 95%% interval")
    stage34: bool = de.setting(False, "also run the paper's stages 3-4 on the joint model: "
                               "integration features (secondary SAE) and the 2 x 2 intervention "
                               "with controls (§13); with --eval-only RUN_DIR, added to a "
                               "finished run, its evaluation as it stands")
    stimuli: str | None = de.setting(None, "2 x 2 stimulus design for --stage34, JSON like "
                                     "stimuli.json (the default)", "PATH")
    browser: bool = de.setting(False, "with --eval-only RUN_DIR: write RUN_DIR/browser.html, the "
                               "run's identity and integration features on one offline page "
                               "(trains stage 3's secondary SAE first if the run has none)")
    sae: str | None = de.setting(None, "study an existing SAELens TopK SAE (folder with cfg.json "
                                 "and sae_weights.safetensors): no SAE training, the NFM learns "
                                 "its residual", "SAE_DIR")
    store: str | None = de.setting(None, "folder of activation stores, one per model, layer, "
                                   "text, tokens and ctx: extracted once, reused by every run "
                                   f"with the same key (default: {STORE}, or with --resume / "
                                   "--eval-only the run's own)", "DIR")
    store_dtype: str = de.setting("float32", "activations on disk: float32, or float16 (half the "
                                  "disk)", "{float32,float16}")
    models: str | None = de.setting(None, "the models to train, comma-separated (default: all "
                                    "five; sequential brings sae, whose SAE it builds on); "
                                    "--combine joins runs that each trained some", "NAMES")
    checkpoints: int = de.setting(0, "also evaluate every model at this many log-spaced steps, the "
                                  "first near 0.2 M token presentations (or a tenth of the run), "
                                  "the last the end: intervals and claims at each (0: the end "
                                  "only); with --schedule wsd each a finished model, a branch "
                                  "decaying to its step")
    combine: str | None = de.setting(None, "run folders, comma-separated, that trained different "
                                     "--models with otherwise the same settings: one report of "
                                     "all their models, paired, with intervals and claims at "
                                     "every checkpoint, into --out", "DIRS")
    compare: str | None = de.setting(None, "two finished runs A,B of the same models on the same "
                                     "activations that differ in settings (--precision, say): "
                                     "each model's FVU, KL and CE difference B - A with paired "
                                     "window intervals, and every claim's verdict in each, into "
                                     "--out", "A,B")

    def __post_init__(self):
        super().__post_init__()
        if self.store_dtype not in ("float32", "float16"):
            raise de.DualencError(f"--store-dtype must be float32 or float16, "
                                  f"got {self.store_dtype!r}")
        if self.models is not None and not set(self.models.split(",")) <= set(self.STAGES):
            raise de.DualencError(f"--models takes some of {', '.join(self.STAGES)}, "
                                  f"got {self.models!r}")
        if self.browser and not self.eval_only:
            raise de.DualencError("--browser shows a finished run's features: give it with "
                                  "--eval-only RUN_DIR")
        if self.checkpoints < 0 or self.checkpoints == 1:
            raise de.DualencError(f"--checkpoints must be 0 or at least 2, got {self.checkpoints}")

    def stages(self):
        if self.sae:
            return ("sequential",)  # with --sae, only the NFM on its residual
        chosen = set(self.STAGES if self.models is None else self.models.split(","))
        if "sequential" in chosen:
            chosen.add("sae")  # sequential's NFM is trained on the SAE trained alone
        return tuple(m for m in self.STAGES if m in chosen)

    def model_names(self):  # the models each seed has: with --sae, the imported SAE as well
        return ("sae", *self.stages()) if self.sae else self.stages()

    def model_keys(self):  # with --sae, the imported SAE ("sae") serves every seed
        return {run_key(self, seed, name) for seed in range(self.seed, self.seed + self.seeds)
                for name in self.model_names()}

    @classmethod
    def check_flags(cls, given):
        super().check_flags(given)
        from_sae = given.keys() & {"features", "k", "nfm_k", "sae_init"}
        if given.get("sae") and from_sae:
            flags = ", ".join(sorted("--" + k.replace("_", "-") for k in from_sae))
            raise de.DualencError(f"--sae brings its own dictionary size and k (the NFM reads its "
                                  f"top k/2); {flags} do not apply")
        for flag in ("combine", "compare"):
            if given.get(flag) and given.keys() - {flag, "out"}:
                raise de.DualencError(f"--{flag} takes the runs' own settings; only --out may be "
                                      "given with it")


# ----------------------------------------------------------------------------- baselines

# name -> (model, NFM pathways on)
VARIANTS = {"sae": ("sae", ()), "sae_matched": ("sae_matched", ()),
            "sequential": ("sequential", de.PATHWAYS), "joint": ("joint", de.PATHWAYS),
            "joint_sae_path": ("joint", ()), "joint_linear_only": ("joint", ("linear",)),
            "joint_interaction_only": ("joint", ("interaction",)),
            "joint_no_linear": ("joint_no_linear", ("interaction",))}


def variants(models):
    """Every reconstruction that is evaluated: name -> (model, NFM pathways switched on), for the
    models that were trained (with --sae, only sae and sequential).
    joint_sae_path is the paper's "SAE" baseline (§9.1), sae_matched the parameter-matched one
    (§9.5); the rest are the §9.3 ablations."""
    return {name: (models[model], paths) for name, (model, paths) in VARIANTS.items()
            if model in models}


# the joint model with one pathway zeroed (§9.3)
ABLATIONS = ("joint_linear_only", "joint_interaction_only")


def evaluate_variants(lm, evaluated, data, generator):
    """Every variant {name: (model, pathways)} evaluated the same way (§6), kept as sums per window
    so that each figure can be recomputed on bootstrap resamples of the windows (statistics
    section):
      over the held-out windows: sum ||x - x_hat||^2 per variant ("sse"); shared: token counts and
        sum ||x - mean(x)||^2 (MSE and centred FVU)
      over the spliced windows: sums of KL and next-token NLL with the variant's reconstruction
        spliced, and of KL with its epsilon-random twin; shared: clean and zero-ablation NLL, token
        counts.
    One splice_metrics call, so the clean pass (and the zero-ablation) serves all of them. The
    pathway ablations get no epsilon-random twin: their pathology ratio enters no claim, and each
    splice pass costs as much as the rest of a variant's evaluation."""
    x_ND = data.x_eval
    mean_D = de.mean_token(x_ND)
    replacements = de.splices(evaluated, generator, eps_for=evaluated.keys() - ABLATIONS)
    m = de.splice_metrics(lm, data.splice_ids, data.layer, replacements, data.splice_keep,
                          data.splice_acts)
    kl, nll = ({k: v.double().sum(-1) for k, v in m["kl"].items()},
               {k: v.double().sum(-1) for k, v in m["nll"].items()})
    shared = {"tokens": window_sums(torch.ones(len(x_ND)), data),
              "sst": window_sums(torch.cat([(x_BD - mean_D).square().sum(-1)
                                            for x_BD in x_ND.split(de.EVAL_BATCH)]), data),
              "kl_tokens": m["kl_mask"].sum(-1).double(),
              "nll_tokens": m["nll_mask"].sum(-1).double(),
              "clean_nll": nll["clean"], "zero_nll": nll["zero"]}
    sums = {}
    for name, (model, paths) in evaluated.items():
        with de.pathways(model, *paths):
            sse = window_sums(de.sq_errors(model, x_ND), data)
        sums[name] = {"sse": sse, "kl": kl[name], "nll": nll[name]}
        if name not in ABLATIONS:
            sums[name]["kl_eps"] = kl[name + "/eps"]
    return sums, shared


def model_key(name, seed, first_seed):
    """Where a seed's model lives: <name>/ for the first seed, seedS/<name>/ for the others."""
    return name if seed == first_seed else f"seed{seed}/{name}"


def matched_features(d_model, n_params):
    """The dictionary size at which a TopK SAE (2 F D + F + D parameters) has n_params (§9.5)."""
    return round((n_params - d_model) / (2 * d_model + 1))


def recipes(cfg, data):
    """dualenc's models and the reviewer's, in training order (name -> (make, train), as
    dualenc.recipes): sae_matched, a TopK SAE with the same k widened to the joint model's
    parameter count (§9.5), and joint_no_linear, the joint model without the NFM's linear term
    (§9.3). The same seed, data, batches and steps as the method's models. With --sae, the imported
    SAE stands in for "sae"."""
    def matched(done):
        joint_params = de.n_params(de.build(cfg, data, nfm="linear"))
        return de.build(cfg, data,
                        n_features=matched_features(data.x_train.shape[1], joint_params))

    every = {**de.recipes(cfg, data), "sae_matched": (matched, de.train_sae),
             "joint_no_linear": (lambda done: de.build(cfg, data, nfm="interaction"),
                                 de.train_joint)}
    return {name: every[name] for name in cfg.model_names()}


# ----------------------------------------------------------------------------- metrics

def window_sums(values_N, data):
    """A per-token figure of the held-out tokens, summed per held-out window: [n_eval_windows]."""
    sums = torch.zeros(data.n_eval_windows, dtype=torch.float64, device=values_N.device)
    return sums.index_add_(0, data.eval_window.to(values_N.device), values_N.double()).cpu()


def model_stats(sums, shared, w_eval, w_splice, d_model):
    """Every variant's figures (§6) on every window resample: {name: {metric: [1 + R]}}, row 0 the
    figure on the windows as they are. w_eval resamples the held-out windows, w_splice the spliced
    ones; a resampled total is a weighted sum, w @ per-window sums."""
    n_nll, n_kl = w_splice @ shared["nll_tokens"], w_splice @ shared["kl_tokens"]
    n_tokens, sst = w_eval @ shared["tokens"], w_eval @ shared["sst"]
    clean_ce, zero_ce = ((w_splice @ shared[k]) / n_nll for k in ("clean_nll", "zero_nll"))
    stats = {}
    for name, v in sums.items():
        sse, kl, ce = w_eval @ v["sse"], (w_splice @ v["kl"]) / n_kl, (w_splice @ v["nll"]) / n_nll
        stats[name] = {"mse": sse / (n_tokens * d_model), "fvu": sse / sst, "kl": kl, "ce": ce,
                       "ce_recovered": (zero_ce - ce) / (zero_ce - clean_ce)}
        if "kl_eps" in v:
            kl_eps = (w_splice @ v["kl_eps"]) / n_kl
            stats[name].update(kl_eps_random=kl_eps, pathology_ratio=kl / kl_eps)
    return stats, {"clean_ce": clean_ce, "zero_ce": zero_ce}


# ----------------------------------------------------------------------------- analyses

def param_counts(model):
    """Parameters per component (§7): SAE encoder / decoder, NFM linear / embeddings / MLP."""
    groups = {"sae_encoder": ("sae.W_enc", "sae.b_enc"), "sae_decoder": ("sae.W_dec", "sae.b_dec"),
              "nfm_linear": ("nfm.W_lin",), "nfm_embed": ("nfm.embed",),
              "nfm_mlp": ("nfm.W_1.", "nfm.W_2.")}
    named = dict(model.named_parameters())
    return {g: sum(p.numel() for n, p in named.items() if n.startswith(prefixes))
            for g, prefixes in groups.items()}


def params_used(model, paths):
    """Parameters a variant actually uses: the SAE, plus the NFM parts of its switched-on
    pathways."""
    counts = param_counts(model)
    parts = ["sae_encoder", "sae_decoder"] + (["nfm_linear"] if "linear" in paths else []) \
        + (["nfm_embed", "nfm_mlp"] if "interaction" in paths else [])
    return sum(counts[p] for p in parts)


@torch.no_grad()
def contributions(model, x_ND, batch_size=de.EVAL_BATCH):
    """Per token, sum over dimensions of |linear(f)| and of |interaction(f)|: ([N], [N]). Their
    totals give each pathway's share of the NFM's output magnitude (§7; paper: 94 % / 6 %)."""
    lin, inter = [], []
    for x_BD in x_ND.split(batch_size):
        linear_BD, interaction_BD = model.nfm(*model.sae.encode(x_BD))
        lin.append(linear_BD.abs().sum(-1))
        inter.append(interaction_BD.abs().sum(-1))
    return torch.cat(lin), torch.cat(inter)


# each resample is a full EM fit on every feature; 200 keep the analysis to seconds
BIC_RESAMPLES = 200


@torch.no_grad()
def decoder_sq_norms(model, x_eval_ND):
    """The per-feature figures behind decoder_norm_analysis, for the features that fire on held-out
    tokens: ||W_dec[i]||^2, and with an NFM ||W_dec[i] + W_lin[i]||^2, ||W_lin[i]||^2, ||v_i||^2."""
    alive = s34.firing_counts(model.sae, x_eval_ND) > 0
    dec = model.sae.W_dec[alive]
    norms = {"W_dec": dec.square().sum(-1)}
    if model.nfm is not None:
        lin = model.nfm.W_lin[alive]
        norms.update(merged=(dec + lin).square().sum(-1), W_lin=lin.square().sum(-1),
                     embed=model.nfm.embed[alive].square().sum(-1))
    return {k: v.cpu() for k, v in norms.items()}


def decoder_norm_analysis(norms, n_boot, generator, bins=60):
    """§7 and the §9.2 control, from decoder_sq_norms of the standalone SAE and the joint model:
    squared decoder norms ||W_dec[i]||^2 of the features that fire on held-out tokens, for the
    standalone SAE, the joint model's W_dec, and the joint model's merged linear decoder
    W_dec + W_lin. The merge is exact only where the NFM reads: the linear term sees the n_read
    largest of the k codes (as the paper's code does), so
    x_s + linear(f) = W_dec f + W_lin f_read + b_dec, which equals (W_dec + W_lin) f + b_dec on
    those codes and W_dec f + b_dec on the others.
    Also the correlation of a feature's squared norm with its NFM share
        share_i = ||W_lin[i]||^2 / (||W_dec[i]||^2 + ||W_lin[i]||^2)
    which has ||W_dec[i]||^2 in its denominator, so a negative r is partly built in; the direct
    correlations with ||W_lin[i]||^2 and with the interaction embedding ||v_i||^2 are the controls.
    Statistics come with n_boot bootstrap resamples over features ("samples", row 0 the estimate);
    Delta BIC with BIC_RESAMPLES of them."""
    joint = norms["joint"]
    sq = {"sae": norms["sae"]["W_dec"], "joint_W_dec": joint["W_dec"],
          "joint_merged": joint["merged"]}
    share = joint["W_lin"] / (joint["W_dec"] + joint["W_lin"])
    w = {k: st.bootstrap_weights(len(v), n_boot, generator) for k, v in sq.items()}
    w["joint_merged"] = w["joint_W_dec"]  # the same features
    samples = {f"bc_{k}": st.bimodality_coefficient(v, w[k]) for k, v in sq.items()}
    samples.update({f"delta_bic_{k}": st.gmm_bic(v, w[k][:1 + BIC_RESAMPLES])
                    for k, v in sq.items()})
    sq_F, w_RF = sq["joint_W_dec"], w["joint_W_dec"]
    samples.update(r_sq_norm_vs_nfm_share=st.pearson(sq_F, share, w_RF),
                   r_sq_norm_vs_W_lin_sq_norm=st.pearson(sq_F, joint["W_lin"], w_RF),
                   r_sq_norm_vs_embed_sq_norm=st.pearson(sq_F, joint["embed"], w_RF))
    hi = max(v.max().item() for v in sq.values())
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    fits = {k: st.gmm2(v) for k, v in sq.items()}
    return samples, {
        "alive_features": {"sae": len(sq["sae"]), "joint": len(sq["joint_W_dec"])},
        "histogram_edges": torch.linspace(0, hi, bins + 1).tolist(),
        "histograms": {k: torch.histc(v, bins, 0, hi).long().tolist() for k, v in sq.items()},
        "summary": {k: {"mean": v.mean().item(),
                        "quantiles_5_25_50_75_95": torch.quantile(v.double(), q).tolist(),
                        "gmm2": {p: fits[k][p].tolist() for p in ("means", "stds", "weights")},
                        "gmm2_has_two_modes": st.two_modes(fits[k])} for k, v in sq.items()}}


def reduction(base, new):
    """Error reduction of `new` over `base` (§6): (err_base - err_new) / err_base."""
    return (base - new) / base


class Reading(NamedTuple):
    """How a claim is read on one seed's samples s: `figure` maps s to the figure's samples, or is
    a pair (numerator, denominator) of such maps for a ratio (ratio_summary); `reads` names the
    entries of s it needs, (part, key) for s[part][key]. A run that lacks one (with --sae: only
    sae and sequential are trained) has no such reading."""
    reads: tuple
    figure: object


def claim_table():
    """The §8 / §7 claims, each as (claim, paper figure, threshold, above, {name: Reading}), a
    seed's samples s being s["models"][variant][metric], s["norms"][stat] and s["contrib"][model];
    the rule is figure >= threshold (above) or <= threshold. For the paper's numbers the threshold
    is half the paper's figure, in its direction. Readings: the paper's way (the joint model against
    its own SAE path, as the paper's 41.3 % is measured), fair (against an SAE trained alone with
    the same F, k, data and steps, §9.1), and matched (against an SAE widened to the joint model's
    parameter count, §9.5)."""
    def red(base, new, metric):
        return Reading((("models", base), ("models", new)),
                       lambda s: reduction(s["models"][base][metric], s["models"][new][metric]))

    # the share of the joint model's KL gain over base that part (nonlinear only) achieves
    def share(base, part):
        def gain(model):
            return lambda s: s["models"][base]["kl"] - s["models"][model]["kl"]
        return Reading((("models", base), ("models", part), ("models", "joint")),
                       (gain(part), gain("joint")))

    def stat(key):
        return Reading((("norms", key),), lambda s: s["norms"][key])

    def paper_rule(paper):
        return paper / 2, paper > 0

    rows = [("sequential vs SAE, reconstruction error reduction", 0.23,
             {"paper_way": red("sae", "sequential", "mse"),
              "matched": red("sae_matched", "sequential", "mse")}),
            ("joint vs SAE, reconstruction error reduction", 0.413,
             {"paper_way": red("joint_sae_path", "joint", "mse"),
              "fair": red("sae", "joint", "mse"), "matched": red("sae_matched", "joint", "mse")}),
            ("joint vs SAE, KL reduction", 0.516,
             {"paper_way": red("joint_sae_path", "joint", "kl"), "fair": red("sae", "joint", "kl"),
              "matched": red("sae_matched", "joint", "kl")}),
            ("sequential vs SAE, KL reduction", 0.30,
             {"paper_way": red("sae", "sequential", "kl"),
              "matched": red("sae_matched", "sequential", "kl")}),
            ("nonlinear part alone, share of the joint model's KL gain", 0.165,
             {"paper_way": share("joint_sae_path", "joint_interaction_only"),
              "fair": share("sae", "joint_no_linear"),
              "matched": share("sae_matched", "joint_no_linear")}),
            ("nonlinear part alone, its own KL reduction", 0.165,
             {"paper_way": red("joint_sae_path", "joint_interaction_only", "kl"),
              "fair": red("sae", "joint_no_linear", "kl"),
              "matched": red("sae_matched", "joint_no_linear", "kl")}),
            ("interaction share of NFM output magnitude", 0.06,
             {"paper_way": Reading((("contrib", "joint"),), lambda s: s["contrib"]["joint"])}),
            ("r(decoder squared norm, NFM share)", -0.987,
             {"paper_way": stat("r_sq_norm_vs_nfm_share")})]
    table = [(claim, paper, *paper_rule(paper), readings) for claim, paper, readings in rows]
    # bimodality (§7): the paper's view is the joint W_dec; "fair" is the merged, identifiable
    # W_dec + W_lin
    table += [("joint decoder sq. norms bimodal: bimodality coef.", None, 5 / 9, True,
               {"paper_way": stat("bc_joint_W_dec"), "fair": stat("bc_joint_merged")}),
              ("joint decoder sq. norms bimodal: delta BIC, 1 vs 2 Gaussians", None, 10.0, True,
               {"paper_way": stat("delta_bic_joint_W_dec"),
                "fair": stat("delta_bic_joint_merged")}),
              ("SAE alone: decoder sq. norms unimodal: bimodality coef.", None, 5 / 9, False,
               {"paper_way": stat("bc_sae")}),
              ("SAE alone: decoder sq. norms unimodal: delta BIC", None, 10.0, False,
               {"paper_way": stat("delta_bic_sae")})]
    return table


def ratio_summary(per_seed, num, den):
    """summarise(num / den), or undefined (value and interval None, with the reason) when an
    interval of the denominator contains 0: the resampled ratios are then unbounded and their
    percentiles mean nothing."""
    # the mean over seeds, and each seed's own: a ratio is taken per seed
    d = st.across(per_seed, den)
    for ci in ([d["ci"]] + ([d["seed_ci"]] if "seed_ci" in d else [])
               + [st.interval(den(s)[1:]) for s in per_seed]):
        if ci[0] <= 0 <= ci[1]:
            return {"value": None, "ci": None,
                    "undefined": f"its denominator's 95% interval [{ci[0]:.3g}, {ci[1]:.3g}] "
                                 f"contains 0"}
    return st.across(per_seed, lambda s: num(s) / den(s))


def claims(per_seed):
    """Every claim of claim_table() measured on each seed's samples: each reading's figure, its
    intervals (summarise) and its verdict (holds / no / unclear). Readings that need a model the
    run did not train are left out, and claims with no reading left."""
    out = []
    for claim, paper, threshold, above, readings in claim_table():
        row = {"claim": claim, "paper": paper, "rule": f"{'>=' if above else '<='} {threshold:.4g}",
               "readings": {}}
        for name, reading in readings.items():
            if not all(key in per_seed[0].get(part, {}) for part, key in reading.reads):
                continue
            if isinstance(reading.figure, tuple):
                s = ratio_summary(per_seed, *reading.figure)
            else:
                s = st.across(per_seed, reading.figure)
            row["readings"][name] = {**s, "verdict": st.verdict(s, threshold, above)}
        if row["readings"]:
            out.append(row)
    return out


NFM_MODELS = ("sequential", "joint")  # whose NFM output splits into linear and interaction shares


def gather_evidence(lm, models, data, eps_generator):
    """All that the statistics read of a seed's trained models, without their weights: every
    variant's sums per window and the shared ones (evaluate_variants), the NFM models' output
    magnitudes per held-out window (contributions), the per-feature norms of
    decoder_norm_analysis, and parameter counts. Runs that each trained some of the models on the
    same data combine by merging it."""
    evaluated = variants(models)
    sums, shared = evaluate_variants(lm, evaluated, data, eps_generator)
    contrib = {}
    for name in (n for n in NFM_MODELS if n in models):
        lin_N, inter_N = contributions(models[name], data.x_eval)
        contrib[name] = {"linear": window_sums(lin_N, data),
                         "interaction": window_sums(inter_N, data)}
    return {"sums": sums, "shared": shared, "contrib": contrib,
            "d_model": torch.tensor(data.x_eval.shape[1]),
            "norms": {n: decoder_sq_norms(models[n], data.x_eval)
                      for n in ("sae", "joint") if n in models},
            "params": {n: torch.tensor(params_used(m, paths))
                       for n, (m, paths) in evaluated.items()},
            "param_counts": {n: {g: torch.tensor(c) for g, c in param_counts(m).items()}
                             for n, m in models.items() if m.nfm is not None}}


def analyse(evidence, weights, generator):
    """One seed's samples for the report and the claims, from its evidence (gather_evidence): every
    variant's figures and the §7 statistics, each as a [1 + R] tensor (row 0 the estimate), and the
    decoder-norm histograms (with both the SAE and the joint model)."""
    stats, ce = model_stats(evidence["sums"], evidence["shared"], weights["eval"],
                            weights["splice"], int(evidence["d_model"]))
    contrib = {name: (weights["eval"] @ c["interaction"])
               / (weights["eval"] @ (c["linear"] + c["interaction"]))
               for name, c in evidence["contrib"].items()}
    norms, norm_info = {}, None
    if {"sae", "joint"} <= evidence["norms"].keys():
        norms, norm_info = decoder_norm_analysis(evidence["norms"], weights["eval"].shape[0] - 1,
                                                 generator)
    return {"models": stats, "ce": ce, "contrib": contrib, "norms": norms, "norm_info": norm_info,
            "params": {n: int(v) for n, v in evidence["params"].items()},
            "param_counts": {n: {g: int(v) for g, v in c.items()}
                             for n, c in evidence["param_counts"].items()}}


def report_analysis(per_seed):
    """The report's models table and analysis from every seed's samples (analyse)."""
    results = {}
    for name, params in per_seed[0]["params"].items():
        metrics = {m: st.across(per_seed, lambda s: s["models"][name][m])
                   for m in per_seed[0]["models"][name]}
        results[name] = {"params": params, **{m: v["value"] for m, v in metrics.items()},
                         "ci": {m: v["ci"] for m, v in metrics.items()}}
        if len(per_seed) > 1:
            results[name].update(seed_ci={m: v["seed_ci"] for m, v in metrics.items()},
                                 per_seed={m: v["per_seed"] for m, v in metrics.items()})
    ce = {k: st.across(per_seed, lambda s: s["ce"][k]) for k in ("clean_ce", "zero_ce")}
    counts = per_seed[0]["param_counts"]
    analysis = {
        "interaction_share_of_nfm_output": {n: st.across(per_seed, lambda s: s["contrib"][n])
                                            for n in per_seed[0]["contrib"]},
        "params": counts,
        # a design figure, fixed by F, M and D before any training: shown, not judged
        "interaction_param_share": {n: (c["nfm_embed"] + c["nfm_mlp"]) / sum(c.values())
                                    for n, c in counts.items()},
        "claims": claims(per_seed)}
    if per_seed[0]["norm_info"] is not None:
        analysis["decoder_norms"] = {**per_seed[0]["norm_info"],
                                     **{k: st.across(per_seed, lambda s: s["norms"][k])
                                        for k in per_seed[0]["norms"]}}
    return results, ce, analysis


# ----------------------------------------------------------------------------- training length

def total_steps(cfg, n_train):
    """The steps every model trains for (dualenc.fit's count)."""
    return cfg.epochs * (n_train // cfg.batch_size)


def checkpoint_steps(cfg, n_train):
    """The steps at which every model is evaluated (cfg.checkpoints of them, none without):
    log-spaced from the step nearest 0.2 M token presentations (the default run's length) or a
    tenth of the run, whichever is earlier, to the last, on the evaluation cadence. With --schedule
    paper the rate decays over the whole run, so an early checkpoint is a model part-way through
    its schedule; with --schedule wsd each is a finished model of that length (a decay branch)."""
    steps = total_steps(cfg, n_train)
    if not cfg.checkpoints:
        return []
    first = max(1, min(round(200_000 / cfg.batch_size), steps // 10))
    spaced = torch.logspace(math.log10(first), math.log10(steps), cfg.checkpoints,
                            dtype=torch.float64).tolist()
    inner = {max(cfg.eval_every, round(s / cfg.eval_every) * cfg.eval_every) for s in spaced[:-1]}
    # none a cadence from the end
    return sorted({s for s in inner if s <= steps - cfg.eval_every} | {steps})


def saving_checkpoints(recipes, steps, folder_of, metadata, cfg, data):
    """The recipes, their training also saving a model at each of `steps` but the last (the
    finished model is the run's own) into folder_of(name) / step<N>; a resumed run keeps those
    already saved. With --schedule paper the model as it was at step N; with wsd a branch that
    decays on its own to step N (training.decay_branch), a finished model of that length.
    Sequential's checkpoint at step N is an NFM trained for N steps (on the whole run's schedule,
    or with wsd on its own of N steps) on the SAE of step N, not on the finished one: each
    checkpoint compares models of one length."""
    def saving(train, folder):
        def save(step, model):
            if step in steps[:-1]:
                checkpoint.save_model(model, folder / f"step{step}", metadata)
        if cfg.schedule == "paper":
            return functools.partial(train, on_eval=save)
        todo = [s for s in steps[:-1] if not (folder / f"step{s}" / "cfg.json").exists()]
        return functools.partial(train, branches=todo, on_branch=save)

    def sequential(train):
        def train_all(model, *args, **kw):
            history = train(model, *args, **kw)
            for step in steps[:-1]:
                folder = folder_of("sequential") / f"step{step}"
                if not (folder / "cfg.json").exists():
                    sae = checkpoint.load_model(folder_of("sae") / f"step{step}").sae
                    early = de.build(cfg, data, sae=sae, nfm="linear")
                    de.train_sequential(early, data.x_train, data.x_curve, cfg,
                                        name=f"sequential to {step}", loop=training.fit,
                                        until=step,
                                        length=step if cfg.schedule == "wsd" else None,
                                        parallel=kw["parallel"])
                    if kw["parallel"].main:
                        checkpoint.save_model(early, folder, metadata)
            return history
        return train_all
    return {name: (make, sequential(train) if name == "sequential"
                   else saving(train, folder_of(name)))
            for name, (make, train) in recipes.items()}


def path_noise(curve, start, stop):
    """How far a model's held-out FVU moves between neighbouring evaluations of its curve (the
    curve's windows) with start <= step <= stop: the largest |change|. The training path's own
    noise, which a window interval (the weights held fixed) does not see, with whatever trend is
    left at a constant rate: an upper bound on the noise. None with fewer than two evaluations."""
    fvu = [h["fvu"] for h in curve if start <= h["step"] <= stop]
    if len(fvu) < 2:
        return None
    return max(abs(b - a) for a, b in zip(fvu, fvu[1:]))


def stable_path_noise(curves, cfg, step):
    """Each trained model's path_noise over the last half of its constant-rate phase before the
    model of `step` steps decays (wsd: from the warm-up to branch_start(step)): {name: figure}. {}
    with the paper's schedule, which decays from the first step and has no such phase."""
    if cfg.schedule != "wsd":
        return {}
    stop = training.branch_start(step, cfg)
    start = (cfg.warmup_steps + stop) / 2
    return {name: path_noise(curve, start, stop) for name, curve in curves.items()
            if "/" not in name}  # the first seed's: "seedS/..." are the others'


# the baselines the joint model is read against by the second long run's rule, with the claims'
# readings that hold its paired reductions
GAP_BASELINES = {"sae": "fair", "sae_matched": "matched"}
GAP_CLAIMS = {"fvu": "joint vs SAE, reconstruction error reduction",
              "kl": "joint vs SAE, KL reduction"}


def gap_readings(point):
    """A checkpoint's (checkpoint_point) joint model against each baseline trained beside it, in
    FVU and in KL, by stats.gap_reading: the claims' paired reductions against the pair's path
    noise. A model's path noise in FVU, as a share of its FVU, times its KL is its path noise in KL
    (the curve has no KL); a pair's is the larger of its two models'. {} without path noise."""
    noise, models = point["path_noise_fvu"], point["models"]
    claims = {c["claim"]: c["readings"] for c in point["claims"]}
    readings = {}
    for base, reading in GAP_BASELINES.items():
        if not {"joint", base} <= noise.keys() or None in (noise["joint"], noise[base]):
            continue
        for metric, claim in GAP_CLAIMS.items():
            share = {m: noise[m] / models[m]["fvu"] for m in ("joint", base)}
            pair = max(share[m] * models[m][metric] for m in share) / models[base][metric]
            readings[f"joint vs {base}, {metric}"] = st.gap_reading(claims[claim][reading], pair)
    return readings


def checkpoint_point(step, cfg, results, analysis, curves):
    """What a checkpoint keeps: each model's FVU and KL with their window intervals, each trained
    model's path noise in FVU (stable_path_noise), the claims, and the gap readings."""
    point = {"step": step, "presentations": step * cfg.batch_size,
             "models": {name: {"fvu": m["fvu"], "kl": m["kl"],
                               "ci": {"fvu": m["ci"]["fvu"], "kl": m["ci"]["kl"]}}
                        for name, m in results.items()},
             "path_noise_fvu": stable_path_noise(curves, cfg, step),
             "claims": analysis["claims"]}
    point["gaps"] = gap_readings(point)
    return point


def along_training(lm, steps, folder_of, final, data, cfg):
    """The evidence (gather_evidence) of every model at each checkpoint step but the last: {step:
    evidence}, the first seed's models with its epsilon-random draws; an imported SAE (--sae) is
    the same at every step."""
    device = data.x_eval.device
    evidence = {}
    for step in tqdm(steps[:-1], desc="checkpoints", leave=False):
        models = {name: (model if cfg.sae and name == "sae"
                         else checkpoint.load_model(folder_of(name) / f"step{step}").to(device))
                  for name, model in final.items()}
        evidence[step] = gather_evidence(lm, models, data,
                                         torch.Generator(device=device).manual_seed(cfg.seed))
    return evidence


def training_points(evidence, cfg, weights, curves):
    """Each checkpoint's figures and claims (checkpoint_point) from its evidence {step: evidence},
    with the run's window resamples, as the end of the run is judged."""
    points = []
    for step, ev in sorted(evidence.items()):
        samples = analyse(ev, weights, torch.Generator().manual_seed(cfg.seed))
        results, _, analysis = report_analysis([samples])
        points.append(checkpoint_point(step, cfg, results, analysis, curves))
    return points


# ----------------------------------------------------------------------------- bring your own SAE

SAELENS_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")


def read_saelens(folder):
    """An SAE someone else trained, in SAELens' on-disk format (§10): cfg.json (v6, or
    v5's flat layout) and sae_weights.safetensors. Checked here, before any slow work; what dualenc
    cannot run exactly is a one-line DualencError:
        architecture      "topk" only: the NFM reads the k active codes, which other architectures
                          (a ReLU SAE's code has no fixed k) do not have
        normalize_activations  "none" only (dualenc's own z-score is folded in by import_sae)
        apply_b_dec_to_input   either: subtracting b_dec before encoding is folded into b_enc
    Returns {"cfg", "layer" (from hook_name), "tensors"}."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "cfg.json").read_text())
        tensors = load_file(folder / "sae_weights.safetensors")
    except (OSError, ValueError, SafetensorError) as e:
        raise de.DualencError(f"cannot read the SAE in {folder}: "
                              f"{checkpoint.one_line(e)}") from None
    if not isinstance(cfg, dict):
        raise de.DualencError(f"{folder / 'cfg.json'} is not a JSON object")
    meta = {**cfg, **cfg.get("metadata", {})}  # v6 keeps the hook in metadata, v5 at the top level
    if cfg.get("architecture") != "topk":
        raise de.DualencError(f"{folder}: architecture {cfg.get('architecture')!r} is not "
                              f"supported; dualenc reads SAELens 'topk' SAEs (the NFM needs "
                              f"exactly k active codes)")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise de.DualencError(f"{folder}: normalize_activations {cfg['normalize_activations']!r} "
                              f"is not supported; dualenc reads SAEs on raw activations ('none')")
    hook = str(meta.get("hook_name"))
    parts = hook.split(".")
    if (len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit()
            or parts[2] != "hook_resid_post"):
        raise de.DualencError(f"{folder}: hook_name {hook!r} is not a block output "
                              f"'blocks.L.hook_resid_post', which is what dualenc reads "
                              f"and splices")
    try:
        d_in, d_sae, k = int(cfg["d_in"]), int(cfg["d_sae"]), int(cfg["k"])
    except (KeyError, TypeError, ValueError) as e:
        raise de.DualencError(f"{folder / 'cfg.json'} lacks a valid d_in, d_sae or k: "
                              f"{checkpoint.one_line(e)}") from None
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for name, shape in shapes.items():
        if name not in tensors or tuple(tensors[name].shape) != shape:
            found = tuple(tensors[name].shape) if name in tensors else "missing"
            raise de.DualencError(f"{folder}: tensor {name} should be {shape} for d_in {d_in}, "
                                  f"d_sae {d_sae}; got {found}")
        if not tensors[name].isfinite().all():
            raise de.DualencError(f"{folder}: tensor {name} has NaN or inf entries")
    if not 0 < k <= d_sae:
        raise de.DualencError(f"{folder}: k {k} is not in 1..d_sae={d_sae}")
    return {"cfg": cfg, "layer": int(parts[1]),
            "tensors": {n: tensors[n].float() for n in SAELENS_TENSORS}}


def import_sae(saelens, mean_D, std_D):
    """A DualEncoder running `saelens` (from read_saelens) in dualenc's z-scored space, the inverse
    of save_model's folding. From x = x_z * std + mean, and SAELens' optional pre-encoder b_dec:
        W_enc_z = std[:, None] W_enc    b_enc_z = b_enc + (mean - b_dec [if applied]) W_enc
        W_dec_z = W_dec / std[None, :]  b_dec_z = (b_dec - mean) / std
    so every code and (de-normalised) reconstruction is the one SAELens computes on raw
    activations."""
    cfg, t = saelens["cfg"], saelens["tensors"]
    mean_D, std_D = mean_D.cpu(), std_D.cpu()
    shift_D = mean_D - (t["b_dec"] if cfg.get("apply_b_dec_to_input") else 0)
    sae = de.TopKSAE(cfg["d_in"], cfg["d_sae"], cfg["k"])
    sae.load_state_dict({"W_enc": std_D[:, None] * t["W_enc"],
                         "b_enc": t["b_enc"] + shift_D @ t["W_enc"],
                         "W_dec": t["W_dec"] / std_D, "b_dec": (t["b_dec"] - mean_D) / std_D})
    return de.DualEncoder(sae, None, mean_D, std_D).eval()


def sae_layer(cfg, saelens, n_blocks, d_model):
    """The block an imported SAE reads (its hook), checked against --layer and the model's config
    before the corpus or the weights are read."""
    hook = f"blocks.{saelens['layer']}.hook_resid_post"
    if cfg.layer is not None and cfg.layer != saelens["layer"]:
        raise de.DualencError(f"--layer {cfg.layer}, but the SAE reads {hook}")
    if not saelens["layer"] < n_blocks:
        raise de.DualencError(f"the SAE reads {hook}, outside the model's blocks 0..{n_blocks - 1}")
    if saelens["cfg"]["d_in"] != d_model:
        raise de.DualencError(f"the SAE has d_in {saelens['cfg']['d_in']}, the model "
                              f"{cfg.model!r} d_model {d_model}")
    return saelens["layer"]


# ----------------------------------------------------------------------------- run

def run_key(cfg, seed, name):
    """A model's folder in the run (model_key); with --sae the imported SAE serves every seed."""
    return "sae" if cfg.sae and name == "sae" else model_key(name, seed, cfg.seed)


def add_stage34(report, lm, tokenizer, models, data, cfg, out):
    """Stages 3-4 on every seed's joint model (its seed's SAEs the identity baseline) into
    report["stage34"], with the commit they ran at, and the run folder's stage34.txt."""
    seeds = range(cfg.seed, cfg.seed + cfg.seeds)
    baselines = {seed: {name: models[run_key(cfg, seed, name)] for name in ("sae", "sae_matched")
                        if run_key(cfg, seed, name) in models} for seed in seeds}
    joints = {seed: models[run_key(cfg, seed, "joint")] for seed in seeds}
    report["stage34"] = {**s34.stage34(lm, tokenizer, joints, baselines, data, cfg, out),
                         "commit": source_commit()}
    checkpoint.atomic_write(out / "stage34.txt",
                            lambda p: p.write_text(s34.format_stage34(report["stage34"]) + "\n"))


def add_browser(report, lm, tokenizer, joint, data, cfg, out):
    """A run's browser.html (--eval-only RUN_DIR --browser), its size into report["browser"]: the
    run's joint model and its secondary SAE (run_secondary), with each integration feature's cell
    means on the selection prompts and on the test items."""
    pipeline = run_secondary(lm, joint, data, cfg, out)
    design = s34.load_stimuli(s34.read_stimuli(cfg.stimuli), tokenizer)
    A_PG = s34.stimulus_codes(lm, data.layer, pipeline, design,
                              s34.kept_positions(data.max_norm))
    written = browser.write_page(out, tokenizer, joint, pipeline.secondary, data,
                                 (A_PG, design["cell_P"], design["selection_P"]), design["cells"],
                                 browser_summary(cfg, data, joint, pipeline.secondary))
    report["browser"] = written


def run_secondary(lm, joint, data, cfg, out):
    """The joint model with the run's secondary SAE in place (stages34.IntegrationPipeline): the
    one in out/secondary/, or, for a run without one, stage 3's, trained now and saved there."""
    if (out / "secondary" / "cfg.json").exists():
        secondary = checkpoint.load_model(out / "secondary").to(data.x_eval.device)
        return s34.IntegrationPipeline(joint, secondary).eval()
    generator = torch.Generator().manual_seed(cfg.seed)
    return s34.stage3(lm, joint, data, cfg, out / "secondary", generator)[0]


def browser_summary(cfg, data, joint, secondary):
    """The page's first line: what its features are of."""
    return (f"{cfg.model}, block {data.layer}: the joint model's {joint.sae.k}-sparse code "
            f"of {joint.sae.W_dec.shape[0]:,} identity features and stage 3's "
            f"{secondary.sae.W_dec.shape[0]:,} integration features, on "
            f"{len(data.x_eval):,} held-out tokens")


def window_resamples(cfg, n_eval_windows, n_splice_windows):
    """One resample of the windows for every seed and model, so that the bootstrap is paired
    (§9.6)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    return {"eval": st.bootstrap_weights(n_eval_windows, cfg.n_boot, gen),
            "splice": st.bootstrap_weights(n_splice_windows, cfg.n_boot, gen)}


def finish_report(report, per_seed, cfg):
    """The end of a run's report: the models table, the analysis and claims, from every seed's
    samples."""
    results, ce, analysis = report_analysis(per_seed)
    last = max(h["step"] for curve in report["curves"].values() for h in curve)
    report.update(status="complete", models=results, clean_ce=ce["clean_ce"]["value"],
                  path_noise_fvu=stable_path_noise(report["curves"], cfg, last),
                  zero_ce=ce["zero_ce"]["value"], analysis=analysis,
                  seeds=list(range(cfg.seed, cfg.seed + cfg.seeds)),
                  bootstrap={"resamples": cfg.n_boot,
                             "eval_windows": report["data"]["eval_windows"],
                             "splice_windows": report["data"]["splice_windows"],
                             "delta_bic_resamples": BIC_RESAMPLES})


# per model or variant: merged
EVIDENCE_PARTS = ("sums", "contrib", "norms", "params", "param_counts")


class Point(NamedTuple):
    """Where evidence was read: the models of one seed, trained to one step (a checkpoint, or the
    end)."""
    seed: int
    step: int

    def __str__(self):  # its key in evidence.safetensors
        return f"seed{self.seed}/step{self.step}"


def save_evidence(path, evidence):
    """{Point: evidence} as one safetensors file, its nested keys joined by "/": the tensor
    evidence[Point(0, 200)]["sums"]["joint"]["sse"] is "seed0/step200/sums/joint/sse"."""
    flat = {}

    def walk(tree, prefix):
        for k, v in tree.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}/")
            else:
                flat[prefix + k] = v.detach().cpu().contiguous()
    walk(evidence, "")
    checkpoint.atomic_write(path, lambda p: save_file(flat, p))


def load_evidence(path):
    """save_evidence's file as the nested {Point: evidence} it was written from."""
    try:
        flat = load_file(path)
    except (OSError, SafetensorError) as e:
        raise de.DualencError(f"cannot read {path}: {checkpoint.one_line(e)}") from None
    evidence = {}
    for key, value in flat.items():
        seed, step, *parts = key.split("/")
        node = evidence.setdefault(Point(int(seed.removeprefix("seed")),
                                         int(step.removeprefix("step"))), {})
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    # a part with nothing in it (no NFM model, say) leaves no key in the file
    for ev in evidence.values():
        for part in EVIDENCE_PARTS:
            ev.setdefault(part, {})
    return evidence


PIECE_FLAGS = ("models", "out", "resume", "eval_only", "stage34", "stimuli", "device", "store",
               "combine", "compare")


def read_piece(folder):
    """A finished run's report and evidence, for combine_runs."""
    try:
        report = json.loads((folder / "results.json").read_text())
        complete = report["status"] == "complete"
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise de.DualencError(f"{folder} is not a replicate run folder: "
                              f"{checkpoint.one_line(e)}") from None
    if not complete:
        raise de.DualencError(f"the run in {folder} is unfinished; "
                              f"finish it with --resume {folder}")
    return report, load_evidence(folder / "evidence.safetensors")


def evaluated_alike(shared_a, shared_b):
    """Whether two runs' shared sums (evaluate_variants) agree: the same held-out and spliced
    tokens, and so the same activations."""
    return shared_a.keys() == shared_b.keys() and all(
        v.shape == shared_a[k].shape and torch.allclose(shared_a[k], v, rtol=1e-5)
        for k, v in shared_b.items())


def merge_evidence(pieces):
    """The evidence of runs that each trained some models on the same data, as one run's: {Point:
    evidence}. Every run must hold the same seeds and steps and have been evaluated on the same
    tokens (the shared sums agree), and no model may be in two of them."""
    (first, _, evidence0), merged = pieces[0], {}
    for folder, _, evidence in pieces:
        if evidence.keys() != evidence0.keys():
            raise de.DualencError(f"{folder} holds other seeds or checkpoint steps than {first}")
        for key, ev in evidence.items():
            m = merged.setdefault(key, {"shared": ev["shared"], "d_model": ev["d_model"],
                                        **{part: {} for part in EVIDENCE_PARTS}})
            if not evaluated_alike(m["shared"], ev["shared"]):
                raise de.DualencError(f"{folder} was evaluated on other tokens than {first}")
            for part in EVIDENCE_PARTS:
                if m[part].keys() & ev[part].keys():
                    raise de.DualencError(
                        f"{', '.join(sorted(m[part].keys() & ev[part].keys()))} is in {folder} "
                        f"and in another of the runs")
                m[part].update(ev[part])
    for m in merged.values():  # the report's order, whatever the runs' order
        m["sums"], m["params"] = ({n: d[n] for n in VARIANTS if n in d}
                                  for d in (m["sums"], m["params"]))
    return merged


def combine_runs(cfg):
    """python -m referee --combine A,B,...: runs that trained different --models with otherwise
    the same settings (so the same store key, split, batches and resamples) but for --lr, each
    model's own, joined into one report as if one run had trained them all: paired intervals,
    claims at every checkpoint, figures, each model's rate ("lr", shown beside its figures; the
    report's config.lr is the first piece's), and the runs' own timings and commits."""
    folders = [Path(p) for p in cfg.combine.split(",")]
    pieces = [(folder, *read_piece(folder)) for folder in folders]
    _, base, _ = pieces[0]
    for folder, report, _ in pieces[1:]:
        for field, value in base["config"].items():
            # .get: older runs lack new flags
            if (field not in (*PIECE_FLAGS, "lr")
                    and report["config"].get(field, value) != value):
                raise de.DualencError(f"{folder} was run with {field} "
                                      f"{report['config'].get(field)!r}, {folders[0]} with "
                                      f"{value!r}")
    merged = merge_evidence(pieces)
    stages = [Config(**runner.known_settings(Config, r["config"])).stages() for _, r, _ in pieces]
    names = {n for s in stages for n in s}
    with_stage34 = [report for _, report, _ in pieces if "stage34" in report]
    settings = {**runner.known_settings(Config, base["config"]), "out": cfg.out,
                "combine": cfg.combine, "models": ",".join(m for m in Config.STAGES if m in names),
                "stage34": bool(with_stage34)}
    cfg = Config(**settings)
    out = runner.prepare_out(cfg.out)
    data = base["data"]
    weights = window_resamples(cfg, data["eval_windows"], data["splice_windows"])
    seeds, steps = sorted({p.seed for p in merged}), sorted({p.step for p in merged})
    per_seed = [analyse(merged[Point(s, steps[-1])], weights,
                        torch.Generator().manual_seed(s)) for s in seeds]
    report = {"config": settings, "status": "incomplete", "data": data, "commit": source_commit(),
              "lr": {variant: r["config"]["lr"] for (_, r, _), s in zip(pieces, stages)
                     for variant, (model, _) in VARIANTS.items() if model in s},
              "pieces": [{"run": str(folder), "models": list(s), "commit": r.get("commit"),
                          "timings_s": r["timings_s"], "peak_rss_gib": r.get("peak_rss_gib")}
                         for (folder, r, _), s in zip(pieces, stages)],
              "curves": {k: v for _, r, _ in pieces for k, v in r["curves"].items()},
              "timings_s": {f"{folder.name}/{k}": v for folder, r, _ in pieces
                            for k, v in r["timings_s"].items() if k != "total"}}
    finish_report(report, per_seed, cfg)
    if len(steps) > 1:
        along = {n: merged[Point(cfg.seed, n)] for n in steps}
        report["along_training"] = training_points(along, cfg, weights, report["curves"])
    if with_stage34:
        report["stage34"] = with_stage34[0]["stage34"]
    save_evidence(out / "evidence.safetensors", merged)
    rep.plot_figures(report, out)
    runner.write_results(report, cfg, out, list(cfg.model_keys()), rep.format_report)
    return report


COMPARED = ("fvu", "kl", "ce")  # the figures --compare puts side by side


def compare_runs(cfg):
    """python -m referee --compare A,B: two finished runs of the same models on the same
    activations (their shared sums agree) that differ in some settings: each model's figures in
    both and the difference B - A, with its interval over the same window resamples for both runs
    (paired; with several seeds, the interval of the seeds' mean); and every claim's verdict in
    each. Into --out: compare.json and compare.txt. Where runs differ in how they trained
    (--precision), B - A includes the training path's own noise, which the window interval does
    not see."""
    folders = [Path(p) for p in cfg.compare.split(",")]
    if len(folders) != 2:
        raise de.DualencError(f"--compare takes two run folders, A,B; got {cfg.compare!r}")
    (report_a, ev_a), (report_b, ev_b) = (read_piece(folder) for folder in folders)
    if ev_a.keys() != ev_b.keys():
        raise de.DualencError(f"{folders[1]} holds other seeds or checkpoint steps than "
                              f"{folders[0]}")
    last = max(p.step for p in ev_a)
    keys = sorted(p for p in ev_a if p.step == last)
    for key in keys:
        if not evaluated_alike(ev_a[key]["shared"], ev_b[key]["shared"]):
            raise de.DualencError(f"{folders[1]} was evaluated on other tokens than {folders[0]}: "
                                  "compare runs that read the same activations")
    config_a, config_b = report_a["config"], report_b["config"]
    differ = {k: [config_a.get(k), config_b.get(k)] for k in sorted(config_a.keys() | config_b)
              if k not in PIECE_FLAGS and config_a.get(k) != config_b.get(k)}
    base = Config(**runner.known_settings(Config, config_a))
    data = report_a["data"]
    weights = window_resamples(base, data["eval_windows"], data["splice_windows"])
    per_seed = [[model_stats(ev[key]["sums"], ev[key]["shared"], weights["eval"],
                             weights["splice"], int(ev[key]["d_model"]))[0] for ev in (ev_a, ev_b)]
                for key in keys]
    names = [n for n in VARIANTS if n in per_seed[0][0] and n in per_seed[0][1]]
    models = {name: {m: {"a": st.across([a for a, _ in per_seed], lambda s: s[name][m]),
                         "b": st.across([b for _, b in per_seed], lambda s: s[name][m]),
                         "b_minus_a": st.summarise(torch.stack([b[name][m] - a[name][m]
                                                                for a, b in per_seed]))}
                     for m in COMPARED}
              for name in names}
    verdicts_b = {(c["claim"], r): v["verdict"] for c in report_b["analysis"]["claims"]
                  for r, v in c["readings"].items()}
    claims_ab = [{"claim": c["claim"], "reading": r, "a": v["verdict"],
                  "b": verdicts_b.get((c["claim"], r))}
                 for c in report_a["analysis"]["claims"] for r, v in c["readings"].items()]
    result = {"runs": [str(f) for f in folders], "differ": differ, "seeds": len(keys),
              "step": last, "resamples": base.n_boot, "models": models,
              "claims": claims_ab,
              "verdicts_changed": sum(c["a"] != c["b"] for c in claims_ab)}
    out = runner.prepare_out(cfg.out)
    checkpoint.write_json(out / "compare.json", result)
    text = rep.format_compare(result)
    checkpoint.atomic_write(out / "compare.txt", lambda p: p.write_text(text + "\n"))
    print(text)
    print(f"wrote {out / 'compare.json'} and {out / 'compare.txt'}", file=sys.stderr)
    return result


def measured(stage, peaks):
    """stage(name) (runner.stopwatch) that also keeps the process's peak resident memory so far, in
    GiB, in peaks[name]: where a run's memory peaks, stage by stage."""
    def timed(name):
        stage(name)
        # ru_maxrss is in KiB on Linux
        peaks[name] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return timed


def source_commit():
    """The git commit this file runs from ("+dirty" with uncommitted changes to tracked files); None
    outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", "-C", str(Path(__file__).parent), *args],
                              capture_output=True, text=True, check=True).stdout.strip()
    try:
        return (git("rev-parse", "HEAD")
                + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else ""))
    except (OSError, subprocess.CalledProcessError):
        return None


def checked_inputs(cfg):
    """Every input error a run can have, before its output folder is made and the slow corpus and
    model loads: (cfg as the run folder and --sae fix it, the finished models, the previous
    report, the layer, the SAELens SAE to import or None)."""
    cfg, models, previous = runner.settings(cfg)
    # a run resumed or re-evaluated without --store reads the store it was trained from
    cfg = replace(cfg, store=cfg.store or previous.get("config", {}).get("store") or STORE)
    layer, n_blocks, d_model = runner.check_inputs(cfg, models)
    saelens = read_saelens(cfg.sae) if cfg.sae and "sae" not in models else None
    if saelens is not None:  # the SAE fixes the layer, F and k; the NFM reads the top k/2 as usual
        layer = sae_layer(cfg, saelens, n_blocks, d_model)
        cfg = replace(cfg, layer=layer, features=saelens["cfg"]["d_sae"], k=saelens["cfg"]["k"],
                      nfm_k=None)
    if cfg.stage34 and cfg.sae:
        raise de.DualencError("--stage34 studies the joint model's integration features; a --sae "
                              "run has no joint model")
    if cfg.browser and "joint" not in cfg.stages():
        raise de.DualencError(f"--browser shows the joint model's features; the run in "
                              f"{cfg.eval_only} has no joint model")
    if cfg.stage34:
        s34.read_stimuli(cfg.stimuli)
    return cfg, models, previous, layer, saelens


def add_to_finished_run(previous, timings, peaks, stage, lm, tokenizer, models, data, cfg, out):
    """--eval-only RUN_DIR with --stage34 or --browser: the finished run's evaluation and times
    stand; stages 3-4, the page or both are added to its report (and their times, from the
    timings `stage` keeps)."""
    report = {**previous, "peak_rss_gib": peaks}
    if cfg.stage34:
        report["config"] = {**previous["config"], "stage34": True, "stimuli": cfg.stimuli}
        add_stage34(report, lm, tokenizer, models, data, cfg, out)
        s34.plot_stage34(report["stage34"], out)
        stage("stage34")
        print(s34.format_stage34(report["stage34"]))
        print(f"added stages 3-4 to {out / 'results.json'}; wrote stage34.txt, stage34.png, "
              f"each seed's stage34_plan*.json and secondary*/", file=sys.stderr)
    if cfg.browser:
        add_browser(report, lm, tokenizer, models["joint"], data, cfg, out)
        stage("browser")
        print(f"wrote {out / 'browser.html'} ({report['browser']['files']} files, "
              f"{report['browser']['bytes'] / 1e6:.1f} MB): open it in a browser, offline",
              file=sys.stderr)
    added = {k: timings[k] for k in ("stage34", "browser") if k in timings}
    report["timings_s"] = {**previous["timings_s"], **added}  # the run's own times stand
    checkpoint.write_json(out / "results.json", report)
    return report


def train_and_evaluate(lm, models, data, cfg, out, report, stage, parallel):
    """For each seed, train dualenc's models and the baselines (or load the finished ones) and
    gather every variant's evidence; with --checkpoints, the first seed's models also along the
    training length, into report["along_training"]. Returns (each seed's analysis, evidence); under
    torchrun (distributed.DataParallel) the ranks train together and the main one alone evaluates:
    the others return (None, None)."""
    weights = window_resamples(cfg, data.n_eval_windows, len(data.splice_ids))
    per_seed, steps, evidence = [], checkpoint_steps(cfg, len(data.x_train)), {}
    metadata = runner.sae_metadata(cfg, data.layer)
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        seed_cfg, key = replace(cfg, seed=seed), functools.partial(run_key, cfg, seed)
        seed_recipes = recipes(seed_cfg, data)
        if steps and seed == cfg.seed:  # along the training length: the first seed's models
            seed_recipes = saving_checkpoints(seed_recipes, steps, lambda name: out / key(name),
                                              metadata, seed_cfg, data)
        trained = runner.train_models(seed_cfg, data, seed_recipes, models,
                                      runner.RunFolder(out, report, stage), parallel, key=key)
        if not parallel.main:
            continue
        generator = torch.Generator(device=data.x_train.device).manual_seed(seed)
        ev = gather_evidence(lm, trained, data, generator)
        evidence[Point(seed, total_steps(cfg, len(data.x_train)))] = ev
        per_seed.append(analyse(ev, weights, torch.Generator().manual_seed(seed)))
        stage(f"evaluate_seed{seed}")
    if not parallel.main:
        return None, None
    if steps:
        first_seed = {name: models[name] for name in cfg.model_names()}
        along = along_training(lm, steps, lambda name: out / run_key(cfg, cfg.seed, name),
                               first_seed, data, cfg)
        evidence.update({Point(cfg.seed, step): ev for step, ev in along.items()})
        report["along_training"] = training_points(
            {**along, steps[-1]: evidence[Point(cfg.seed, steps[-1])]}, cfg, weights,
            report["curves"])
        stage("along_training")
    return per_seed, evidence


def run(cfg, parallel=None):
    """python -m referee: check the inputs; extract; for each seed, train dualenc's models and the
    baselines and evaluate every variant; summarise with intervals; judge the claims; report. With
    cfg.resume, finished models are loaded and an interrupted one continues from its last
    evaluation; with cfg.eval_only, nothing is trained (with cfg.stage34 or cfg.browser, those are
    added to the finished run); with cfg.sae, an existing SAE is studied instead of training one.
    `parallel` (distributed.start's, under torchrun): its ranks extract the store and train
    together, and the main one alone evaluates and writes (the others return None once trained)."""
    parallel = parallel or distributed.DataParallel(device=de.resolve_device(cfg.device))
    if cfg.combine or cfg.compare or cfg.eval_only:
        parallel = parallel.alone()
        if parallel is None:
            return None
    if cfg.combine:
        return combine_runs(cfg)
    if cfg.compare:
        return compare_runs(cfg)
    device = parallel.device
    cfg, models, previous, layer, saelens = checked_inputs(cfg)
    out = parallel.shared(lambda: runner.prepare_out(cfg.out), "run folder")
    timings = {k: v for k, v in previous.get("timings_s", {}).items() if k != "total"}
    peaks = dict(previous.get("peak_rss_gib", {}))
    stage = measured(runner.stopwatch(timings), peaks)
    lm, tokenizer, data = load_data(cfg, layer, device, parallel)
    if cfg.resume:
        runner.check_corpus(cfg.resume, previous, data)
    stage("load_extract")
    models = {key: model.to(device) for key, model in models.items()}
    if saelens is not None:
        models["sae"] = import_sae(saelens, data.mean, data.std).to(device)
        if parallel.main:
            checkpoint.save_model(models["sae"], out / "sae", runner.sae_metadata(cfg, layer))
    if cfg.eval_only and (cfg.stage34 or cfg.browser):
        return add_to_finished_run(previous, timings, peaks, stage, lm, tokenizer, models, data,
                                   cfg, out)
    report = {**runner.new_report(cfg, data, models, previous, timings), "commit": source_commit(),
              "peak_rss_gib": peaks}
    if not cfg.eval_only and parallel.main:
        checkpoint.write_json(out / "results.json", report)
    parallel.run_dir = out  # resumable from here: a failure's line says how
    per_seed, evidence = train_and_evaluate(lm, models, data, cfg, out, report, stage, parallel)
    if not parallel.main:
        return None
    save_evidence(out / "evidence.safetensors", evidence)
    finish_report(report, per_seed, cfg)
    report["data"]["steps_per_model"] = report["curves"][cfg.stages()[0]][-1]["step"]
    if cfg.stage34:
        add_stage34(report, lm, tokenizer, models, data, cfg, out)
        stage("stage34")
    rep.plot_figures(report, out)
    stage("report")
    runner.write_results(report, cfg, out, [*models, "evaluate", "analyse"], rep.format_report)
    return report


def parse_args(argv=None):
    return runner.parse_args(argv, Config)


def main(argv=None):
    runner.main(argv, Config, run)


if __name__ == "__main__":
    main()
