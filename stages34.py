"""stages34: the paper's stages 3-4 (METHOD.md §13) on a trained joint model, with a referee's
controls. `python replicate.py --stage34` runs them after the run's evaluation (or, with --eval-only
RUN_DIR, on a finished run). It imports dualenc and stats; replicate.py imports it, never the
other way. Sections, in the order data flows:
  secondary SAE     stage 3: a TopK SAE on the joint NFM's interaction hidden layer (integration
                    features), pair_reading (what one reads), IntegrationPipeline (the joint model
                    with the secondary SAE in place, a feature scaled), stage3 (what it costs);
                    firing_counts, which replicate.py's decoder-norm analysis uses too
  stimuli           the 2 x 2 stimulus design (stimuli.json), read and checked before slow work
  intervention      stage 4: per-prompt codes, held-out selection (stats.select_and_test), the
                    intervention on the word lists' log-probabilities and its controls; stage34
  figure and table  plot_stage34 (stage34.png), format_stage34 (stage34.txt and the report)

Dimension letters as in dualenc.py, and M the NFM's hidden width, F2 the secondary SAE's features,
P prompts, C controls, R bootstrap resamples.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F

import dualenc as de
import runner
import stats as st


# ----------------------------------------------------------------------------- secondary SAE

SECONDARY_EXPANSION = 25  # dictionary = 25 x M, the paper's 300 -> 7,500 (§13)
SECONDARY_K_PER_M = 250 / 300  # the paper's k = 250 at M = 300; the same ratio here (53 at M = 64)
# with --paper-density: 2 % of the features active, as the paper's code ran it (§14)
SECONDARY_ACTIVE = 0.02


@torch.no_grad()
def firing_counts(sae, x_ND, batch_size=4096):
    """How many held-out tokens each feature is active on: [F]."""
    counts_F = torch.zeros(sae.W_dec.shape[0], dtype=torch.long, device=x_ND.device)
    for x_BD in x_ND.split(batch_size):
        vals_BK, idx_BK = sae.encode(x_BD)
        counts_F += torch.bincount(idx_BK[vals_BK > 0], minlength=len(counts_F))
    return counts_F


@torch.no_grad()
def interaction_hidden(joint, x_ND, batch_size=4096):
    """The joint NFM's interaction hidden layer W_1 pair(f) + c_1, before its ReLU (§13, the paper's
    choice): [N, M], the layer integration features are read from."""
    return torch.cat([joint.nfm.hidden(*joint.nfm.read(*joint.sae.encode(x_BD)))
                      for x_BD in x_ND.split(batch_size)])


def train_secondary(joint, x_train_ND, x_eval_ND, cfg, paper_density=False):
    """Stage 3 (§13): a TopK SAE on the frozen joint model's interaction hidden layer, 25 x M
    features, k = M * 250 / 300 as the paper's text (2 % of the features as its code, with
    paper_density), trained as the primary SAE is (train_sae: the same loop, schedule, batches and
    steps) on the training tokens' hidden vectors, z-scored with their own statistics."""
    h_train_NM, h_eval_NM = (interaction_hidden(joint, x_train_ND),
                             interaction_hidden(joint, x_eval_ND))
    mean_M, std_M = de.fit_normalisation(h_train_NM)
    m = h_train_NM.shape[1]
    torch.manual_seed(cfg.seed)
    k = SECONDARY_ACTIVE * SECONDARY_EXPANSION * m if paper_density else SECONDARY_K_PER_M * m
    sae = de.TopKSAE(m, SECONDARY_EXPANSION * m, max(1, round(k)), cfg.sae_init)
    secondary = de.DualEncoder(sae, None, mean_M, std_M).to(x_train_ND.device)
    curve = de.train_sae(secondary, secondary.normalize(h_train_NM), secondary.normalize(h_eval_NM),
                         cfg, name="secondary")
    return secondary, curve, secondary.normalize(h_eval_NM)


@torch.no_grad()
def pair_reading(joint, secondary, x_BD, feature):
    """What integration feature g reads (METHOD.md §16). The secondary SAE reads the z-scored hidden
    layer z = (h - mu) / sigma, h = W_1 pair(f) + c_1, so g's pre-activation splits exactly into
    pairs of the identity features the NFM reads (its n_read largest codes, R of them):
        a_g = w_g . z + b_g = const_g + sum_{i<j} f_i f_j v_i^T diag(c_g) v_j,
        c_g = W_1^T (w_g / sigma)
        const_g = w_g . ((c_1 - mu) / sigma) + b_g
    Returns const_g (a scalar tensor), the read features [B, R] and each pair's term [B, R, R]
    (i < j above the diagonal, zeros elsewhere): O(B R^2 M), fine for the tokens a feature page
    shows."""
    vals_BR, idx_BR = joint.nfm.read(*joint.sae.encode(x_BD))
    first = joint.nfm.mlp[0]  # h = pair @ W_1^T + c_1
    w_M = secondary.sae.W_enc[:, feature] / secondary.std_D
    c_M = first.weight.T @ w_M
    const = w_M @ (first.bias - secondary.mean_D) + secondary.sae.b_enc[feature]
    fv_BRM = vals_BR[..., None] * joint.nfm.embed[idx_BR]
    return const, idx_BR, torch.einsum("bim,m,bjm->bij", fv_BRM, c_M, fv_BRM).triu(1)


class IntegrationPipeline(de.DualEncoder):
    """The joint model with its interaction hidden layer passed through the secondary SAE (§13):
        x -> f (primary SAE) -> f_read (the NFM's n_read codes) -> h = W_1 pair(f_read) + c_1
          -> g (secondary code) -> h_hat;     x_hat = x_s + linear(f_read) + W_2 ReLU(h_hat)
    `scale` = (code, feature indices, factor) multiplies those features' values in one code:
        "secondary"  g: the intervention on an integration feature
        "pair"       f as the interaction pathway reads it (its n_read largest then taken from the
                     scaled code), x_s and linear(f) unscaled: control (b), on the selected
                     feature's pathway
        "primary"    f itself, so x_s, linear and pair at once: control (b) on the whole code, a
                     reference
    None, or a factor of 1, is the unscaled pipeline."""

    def __init__(self, joint, secondary):
        super().__init__(joint.sae, joint.nfm, joint.mean_D, joint.std_D)
        self.secondary, self.scale = secondary, None

    def scaled(self, code, vals_BK, idx_BK):
        if self.scale is None or self.scale[0] != code:
            return vals_BK
        _, features, factor = self.scale
        return torch.where(torch.isin(idx_BK, features), vals_BK * factor, vals_BK)

    def through_secondary(self, h_BM):
        sec = self.secondary
        g_vals, g_idx = sec.sae.encode(sec.normalize(h_BM))
        return sec.sae.decode(self.scaled("secondary", g_vals, g_idx), g_idx) * sec.std_D \
            + sec.mean_D

    def forward(self, x_BD):
        vals_BK, idx_BK = self.sae.encode(x_BD)
        vals_BK = self.scaled("primary", vals_BK, idx_BK)
        read_code = self.nfm.read(vals_BK, idx_BK)
        # the same tensor unless "pair" is scaled
        pair_vals_BK = self.scaled("pair", vals_BK, idx_BK)
        pair_code = read_code if pair_vals_BK is vals_BK else self.nfm.read(pair_vals_BK, idx_BK)
        hidden_BM = self.nfm.hidden(*pair_code)
        linear_BD = self.nfm.linear(*read_code)
        return self.sae.decode(vals_BK, idx_BK) + linear_BD \
            + self.nfm.mlp[1:](self.through_secondary(hidden_BM))

    @torch.no_grad()
    def secondary_code(self, x_BD):
        """The integration features' activations as the secondary SAE's (values, indices):
        [B, K2] each."""
        return self.secondary.sae.encode(self.secondary.normalize(interaction_hidden(self, x_BD)))

    def secondary_codes(self, x_BD):
        """The integration features' activations, dense: [B, F2]."""
        return de.to_dense(*self.secondary_code(x_BD), self.secondary.sae.W_dec.shape[0])


def stage3(lm, joint, data, cfg, out, generator):
    """The secondary SAE (train_secondary), saved in out/secondary, and what it costs: held-out FVU
    of the hidden layer, dead features, and the spliced KL with the hidden layer replaced by its
    reconstruction, against the joint model's own (paired bootstrap over windows)."""
    layer = data["layer"]
    secondary, curve, h_eval_NM = train_secondary(joint, data["x_train"], data["x_eval"], cfg,
                                                  cfg.paper_density)
    hook = f"blocks.{layer}.hook_resid_post.nfm.hook_interaction_pre_relu"
    metadata = {**runner.sae_metadata(cfg, layer), "hook_name": hook}
    runner.save_model(secondary, out / "secondary", metadata)
    pipeline = IntegrationPipeline(joint, secondary).eval()
    firing_F2 = firing_counts(secondary.sae, h_eval_NM)
    m = de.splice_metrics(lm, data["splice_ids"], layer,
                          {"joint": joint.reconstruct, "secondary": pipeline.reconstruct},
                          data["splice_keep"], data["splice_acts"])
    w_splice = st.bootstrap_weights(len(data["splice_ids"]), cfg.n_boot, generator)
    n_kl = w_splice @ m["kl_mask"].sum(-1).double()
    kl = {name: (w_splice @ v.double().sum(-1)) / n_kl for name, v in m["kl"].items()}
    return pipeline, firing_F2, {
        "features": secondary.sae.W_dec.shape[0], "k": secondary.sae.k, "curve": curve,
        **de.evaluate(secondary, h_eval_NM), "dead_features": int((firing_F2 == 0).sum()),
        "kl_joint": st.summarise(kl["joint"]), "kl_with_secondary": st.summarise(kl["secondary"]),
        "kl_increase": st.summarise(kl["secondary"] - kl["joint"])}


# ----------------------------------------------------------------------------- stimuli

DEFAULT_STIMULI = "stimuli.json"  # beside dualenc.py: dualenc's own 2 x 2 design


def read_stimuli(path):
    """A 2 x 2 design as JSON (stimuli.json is dualenc's): {"factors": {A: [a1, a2], B: [b1, b2]},
    "prompts": {"a b": [...]} and "words": {"a b": [...]} for the four cells "a1 b1", "a1 b2",
    "a2 b1", "a2 b2"}, at least 4 prompts (2 to select, 2 to test) and one word per cell. Read and
    checked before any slow work; anything else is one line."""
    path = Path(path or Path(__file__).with_name(DEFAULT_STIMULI))
    try:
        spec = json.loads(path.read_text())
        (fa, (a1, a2)), (fb, (b1, b2)) = spec["factors"].items()
        cells = [f"{a} {b}" for a in (a1, a2) for b in (b1, b2)]
        prompts = {c: [str(p) for p in spec["prompts"][c]] for c in cells}
        words = {c: [str(w) for w in spec["words"][c]] for c in cells}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise de.DualencError(f"stimuli {path}: not a 2 x 2 design like {DEFAULT_STIMULI} "
                              f"({type(e).__name__}: {runner.one_line(e, 120)})") from None
    for c in cells:
        if len(prompts[c]) < 4 or not words[c]:
            raise de.DualencError(f"stimuli {path}: cell {c!r} needs at least 4 prompts and one "
                                  f"word")
    return {"path": str(path), "factors": {fa: [a1, a2], fb: [b1, b2]}, "cells": cells,
            "prompts": prompts, "words": words}


def load_stimuli(spec, tokenizer):
    """The design's prompts as (token ids, cell index), their cells (cell_P), and each cell's words
    as token ids; a word that is not a single token after a space is a one-line error."""
    word_ids = {}
    for c in spec["cells"]:
        ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in spec["words"][c]]
        bad = [w for w, i in zip(spec["words"][c], ids) if len(i) != 1]
        if bad:
            raise de.DualencError(f"stimuli {spec['path']}: words {bad} of cell {c!r} are not "
                                  f"single tokens after a space")
        word_ids[c] = torch.tensor([i[0] for i in ids])
    prompts = [(torch.tensor(tokenizer(p)["input_ids"]), i)
               for i, c in enumerate(spec["cells"]) for p in spec["prompts"][c]]
    return {**spec, "prompt_ids": prompts, "word_ids": word_ids,
            "cell_P": torch.tensor([c for _, c in prompts])}


# ----------------------------------------------------------------------------- intervention

N_RANDOM_CONTROLS, N_SHUFFLED_CONTROLS, N_PRIMARY_READ = 12, 4, 2  # control (a), (c) and (b) sizes
# factors applied to a feature; x1 is the unscaled pipeline every change is against
SCALES = (0.0, 2.0, 4.0)


@torch.no_grad()
def word_logprobs(lm, layer, prompts, word_ids, pipeline, keep_fn):
    """Per prompt, the mean next-token log-probability of each word list at the prompt's last
    position, with block `layer`'s output replaced by pipeline.reconstruct at the positions
    keep_fn(h) keeps: [P, 4]. The prompts run as one batch, padded at the end: a causal LM's
    positions never see what follows them, so each prompt's last position is exact.
    Log-probabilities, not raw logits: a logit vector has a free additive constant, which would move
    every list alike (the 2 x 2 interaction of the changes is the same either way)."""
    device = next(lm.parameters()).device
    lengths = torch.tensor([len(ids) for ids, _ in prompts])
    ids_PT = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
    for i, (ids, _) in enumerate(prompts):
        ids_PT[i, :len(ids)] = ids
    real_PT = torch.arange(ids_PT.shape[1]) < lengths[:, None]

    def splice(h):
        keep = keep_fn(h) & real_PT.to(h.device)
        return torch.where(keep[..., None], pipeline.reconstruct(h), h)

    with de.block_hook(lm, layer, splice):
        logits_PV = lm(ids_PT.to(device), use_cache=False).logits[
            torch.arange(len(prompts)), lengths - 1]
    logp_PV = F.log_softmax(logits_PV.float(), dim=-1)
    return torch.stack([logp_PV[:, ids.to(device)].mean(-1) for ids in word_ids.values()],
                       dim=-1).double().cpu()


def intervention_effect(lm, layer, prompts, word_ids, pipeline, keep_fn, scale, base_P4):
    """The changes in each word list's log-probability when `scale` is applied, for every factor in
    SCALES, against the unscaled pipeline base_P4: {factor: [P, 4]}; and per prompt the 2 x 2
    interaction of those changes (the word lists in cell order), {factor: [P]}."""
    changes, inter = {}, {}
    c = torch.tensor(st.CONTRASTS["interaction"], dtype=torch.float64)
    for factor in SCALES:
        pipeline.scale = (*scale, factor)
        changes[factor] = word_logprobs(lm, layer, prompts, word_ids, pipeline, keep_fn) - base_P4
        inter[factor] = changes[factor] @ c
    pipeline.scale = None
    return changes, inter


def kept_positions(max_norm):
    """keep_fn for a stimulus prompt's block output h: the positions the models were trained and
    evaluated on (not position 0, no massive norm, §2)."""
    def keep_fn(h_BTD):
        return de.keep_mask(h_BTD.norm(dim=-1), max_norm)
    return keep_fn


@torch.no_grad()
def stimulus_codes(lm, layer, pipeline, design, keep_fn):
    """Each stimulus prompt's integration features, the secondary code averaged over the prompt's
    kept positions (keep_fn(h)): [P, F2]."""
    acts = []
    for ids, _ in design["prompt_ids"]:
        h_1TD = de.extract_activations(lm, ids[None], layer)
        acts.append(pipeline.secondary_codes(pipeline.normalize(h_1TD[keep_fn(h_1TD)])).mean(0))
    return torch.stack(acts).cpu()


@torch.no_grad()
def primary_read(pipeline, x_ND, feature, n=N_PRIMARY_READ, batch_size=4096):
    """The n primary features an integration feature reads most: those whose mean activation rises
    most on the held-out tokens where the integration feature is active (control b). Summed batch by
    batch from the sparse codes: no [tokens, F] tensor."""
    n_features = pipeline.sae.W_dec.shape[0]
    sum_F = torch.zeros(n_features, dtype=torch.float64, device=x_ND.device)
    sum_active_F, n_active = torch.zeros_like(sum_F), 0
    for x_BD in x_ND.split(batch_size):
        g_vals, g_idx = pipeline.secondary_code(x_BD)
        active_B = ((g_idx == feature) & (g_vals > 0)).any(-1)
        vals_BK, idx_BK = pipeline.sae.encode(x_BD)
        sum_F.index_add_(0, idx_BK.flatten(), vals_BK.flatten().double())
        sum_active_F.index_add_(0, idx_BK[active_B].flatten(), vals_BK[active_B].flatten().double())
        n_active += int(active_B.sum())
    mean_F = sum_F / len(x_ND)
    lift_F = sum_active_F / n_active - mean_F if n_active else mean_F
    return lift_F.topk(n).indices.tolist()


def stage34(lm, tokenizer, joint, data, cfg, out, generator):
    """Stages 3 and 4 of the paper (§13), with a referee's controls. Returns the report's
    "stage34"."""
    layer, device = data["layer"], data["x_train"].device
    pipeline, firing_F2, secondary_report = stage3(lm, joint, data, cfg, out, generator)

    # stage 4: which integration features track the 2 x 2 design, chosen on one half, tested on the
    # other
    design = load_stimuli(read_stimuli(cfg.stimuli), tokenizer)
    keep_fn, cell_P = kept_positions(data["max_norm"]), design["cell_P"]
    A_PF = stimulus_codes(lm, layer, pipeline, design, keep_fn)
    selected, sel, test = st.select_and_test(A_PF, cell_P, cfg.n_boot, generator)

    # the intervention on the selected interaction feature, on the test prompts, beside its controls
    prompts, words = [design["prompt_ids"][i] for i in test], design["word_ids"]
    base_P4 = word_logprobs(lm, layer, prompts, words, pipeline, keep_fn)
    j = selected["interaction"]["feature"]
    pipeline.scale = ("secondary", torch.tensor([j], device=device), 1.0)
    x1_change = (word_logprobs(lm, layer, prompts, words, pipeline, keep_fn)
                 - base_P4).abs().max().item()
    # one prompt resample for every comparison
    w_RP = st.bootstrap_weights(len(prompts), cfg.n_boot, generator)

    def effects(code, feature_sets):
        """Per scale, the per-prompt interaction effect of each feature set [C, P] and the word-list
        changes."""
        runs = [intervention_effect(lm, layer, prompts, words, pipeline, keep_fn,
                                    (code, torch.tensor(fs, device=device)), base_P4)
                for fs in feature_sets]
        return {f: (torch.stack([inter[f] for _, inter in runs]),
                    torch.stack([changes[f].mean(0) for changes, _ in runs]).mean(0).tolist())
                for f in SCALES}

    rank = firing_F2.argsort().argsort()
    near = [f for f in (rank - rank[j]).abs().argsort().tolist()
            if f != j and firing_F2[f] > 0][: 2 * N_RANDOM_CONTROLS]
    random_features = [near[i] for i in
                       torch.randperm(len(near), generator=generator)[:N_RANDOM_CONTROLS]]
    primary = primary_read(pipeline, data["x_eval"], j)
    shuffled = [st.top_feature(A_PF[sel],
                               cell_P[sel][torch.randperm(len(sel), generator=generator)],
                               exclude=[j])[0]
                for _ in range(N_SHUFFLED_CONTROLS)]
    runs = {"selected": effects("secondary", [[j]]),
            "random_matched": effects("secondary", [[f] for f in random_features]),
            "primary_read": effects("pair", [primary]),
            "shuffled_selection": effects("secondary", [[f] for f in shuffled]),
            "primary_read_whole_code": effects("primary", [primary])}
    intervention = {}
    for f in SCALES:
        row = st.beyond_controls(runs["selected"][f][0][0],
                                 {name: r[f][0] for name, r in runs.items() if name != "selected"},
                                 w_RP, reference=("primary_read_whole_code",))
        for name, r in runs.items():
            (row["selected"] if name == "selected"
             else row["controls"][name])["word_list_changes"] = r[f][1]
        intervention[f"{f:g}"] = row

    verdicts = {f"intervention_x{f}_beyond_controls": row["verdict"]
                for f, row in intervention.items()}
    selectivity = selected["interaction"]["verdict"]
    overall = "holds" if selectivity == "holds" and set(verdicts.values()) == {"holds"} else \
        "no" if selectivity == "no" or set(verdicts.values()) == {"no"} else "unclear"
    return {"secondary": secondary_report,
            "design": {"factors": design["factors"], "cells": design["cells"],
                       "prompts_per_half": [int((cell_P[sel] == c).sum()) for c in range(4)],
                       "selection_prompts": sel.tolist()},
            "selected": selected, "x1_max_change": x1_change,
            "controls": {"random_matched": random_features, "primary_read": primary,
                         "shuffled_selection": shuffled},
            "intervention": intervention,
            "verdicts": {"selectivity_on_held_out_prompts": selectivity, **verdicts,
                         "overall": overall}}


# ----------------------------------------------------------------------------- figure and table

def plot_stage34(result, out):
    """stage34.png: per scale, the 2 x 2 interaction plot of the word lists' log-probability changes
    (x: the first factor's lists, lines: the second factor's), for the selected feature and
    controls."""
    from matplotlib.figure import Figure

    (fa, (a1, a2)), (fb, (b1, b2)) = result["design"]["factors"].items()
    styles = {"selected": ("tab:blue", 2.5), "random_matched": ("0.6", 1.2),
              "primary_read": ("tab:orange", 1.2), "primary_read_whole_code": ("tab:red", 0.8),
              "shuffled_selection": ("tab:green", 1.2)}
    fig = Figure(figsize=(4.2 * len(result["intervention"]), 4), layout="constrained")
    for ax, (f, row) in zip(fig.subplots(1, len(result["intervention"]), sharey=True),
                            result["intervention"].items()):
        for name, (color, width) in styles.items():
            ch = (row["selected"] if name == "selected"
                  else row["controls"][name])["word_list_changes"]
            ax.plot([a1, a2], [ch[0], ch[2]], "-o", color=color, lw=width,
                    label=f"{name}: {b1} words")
            ax.plot([a1, a2], [ch[1], ch[3]], "--s", color=color, lw=width,
                    label=f"{name}: {b2} words")
        ax.axhline(0, color="k", lw=0.5)
        ax.set(title=f"feature x{f}", xlabel=f"{fa} of the word list")
    fig.axes[0].set_ylabel("change in mean log P(word list) at the next token")
    fig.axes[-1].legend(fontsize=6)
    fig.suptitle("Scaling the selected integration feature, and the controls: word-list changes on "
                 "the test prompts")
    fig.savefig(out / "stage34.png", dpi=110)


def format_stage34(result):
    """The stages 3-4 tables (§13): the secondary SAE, the selected features on both halves, the
    intervention beside its controls as paired differences, and the verdicts."""
    sec = result["secondary"]
    factors = result["design"]["factors"]
    rows = [f"stage 3: secondary SAE on the joint NFM's interaction hidden layer: "
            f"{sec['features']} features, k {sec['k']}; held-out fvu {sec['fvu']:.4f}, "
            f"dead {sec['dead_features']}; spliced KL {sec['kl_with_secondary']['value']:.4f} "
            f"against the joint model's {sec['kl_joint']['value']:.4f} "
            f"(increase {sec['kl_increase']['value']:.4f} {st.fmt_ci(sec['kl_increase']['ci'])})",
            f"stage 4: {' x '.join(f'{k} ({a} / {b})' for k, (a, b) in factors.items())}, "
            f"{result['design']['prompts_per_half']} selection prompts per cell, the rest tested",
            "{:<13}{:>8}{:>9}{:>11}{:>18}{:>8}{:>9}{:>8}  {:<9}{}".format(
                "contrast", "feature", "sel. t", "test half", "test 95%", "test t", "p (1-s)",
                "p x3", "verdict", "paper's way: same prompts")]
    for name, c in result["selected"].items():
        pw = c["paper_way"]
        rows.append(f"{name:<13}{c['feature']:>8}{c['selection_t']:>9.2f}{c['test_half']:>11.4f}"
                    f"{st.fmt_ci(c['test_half_ci']):>18}{c['test_t']:>8.2f}{c['p']:>9.4f}"
                    f"{c['p_bonferroni']:>8.4f}  "
                    f"{c['verdict']:<9}feature {pw['feature']}, contrast {pw['contrast']:.4f}, "
                    f"p {pw['p_same_prompts_uncorrected']:.4f} (two-sided, uncorrected)")
    rows.append(f"intervention on feature {result['selected']['interaction']['feature']}: "
                f"2 x 2 interaction of the word lists' log-prob changes, mean over test prompts "
                f"(x1 changes nothing: max {result['x1_max_change']:.1e}); controls as paired "
                f"differences in size, s x selected - mean |control| (s the selected sign), rank = "
                f"share of the control's features moving the lists at least as much")
    for f, row in result["intervention"].items():
        sel = row["selected"]
        rows.append(f"  x{f}: selected {sel['effect']:.2e} [{sel['ci'][0]:.2e}, "
                    f"{sel['ci'][1]:.2e}]; verdict {row['verdict']}")
        rows += [f"    {name:<26} effect {c['effect']:>10.2e}  difference {c['difference']:>10.2e} "
                 f"[{c['ci'][0]:.2e}, {c['ci'][1]:.2e}]  rank {c['rank']:.2f}"
                 + ("  (reference, does not decide)" if c["reference_only"] else "")
                 for name, c in row["controls"].items()]
    rows.append("verdicts: " + ", ".join(f"{k} {v}" for k, v in result["verdicts"].items()))
    return "\n".join(rows)
