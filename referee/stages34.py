"""stages34: the paper's stages 3-4 (docs/method.md §13) on a trained joint model, with a referee's
controls. `python -m referee --stage34` runs them after the run's evaluation (or, with --eval-only
RUN_DIR, on a finished run). It imports dualenc, stats, checkpoint (the secondary SAE's folder)
and runner (its metadata); replicate.py imports it, never the other way. Sections, in the order
data flows:
  secondary SAE     stage 3: a TopK SAE on the joint NFM's interaction hidden layer (integration
                    features), pair_reading (what one reads), IntegrationPipeline (the joint model
                    with the secondary SAE in place, a feature scaled), stage3 (what it costs);
                    firing_counts, which replicate.py's decoder-norm analysis uses too
  stimuli           the 2 x 2 stimulus design (stimuli.json), read and checked before slow work
  intervention      stage 4: per-prompt codes (integration and identity features), the plan fixed
                    on the selection prompts and sealed in a file (stage4_plan: carried features,
                    directions, minimum effects, routes, their own nulls and minimal detectable
                    effects, each integration feature's intervention and controls), the matched
                    test items read once (the carried features on the items' own contrasts,
                    stats.judge_items; the interventions on the word lists' log-probabilities
                    beside their controls), stage4 per seed, stage34 over seeds
  figure and table  plot_stage34 (stage34.png), format_seed / format_stage34 (stage34.txt)

Dimension letters as in dualenc.py, and M the NFM's hidden width, F2 the secondary SAE's features,
P prompts, I items, C controls, R bootstrap resamples.
"""

import json
import math
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import dualenc as de
from referee import checkpoint, runner
from referee import stats as st


# ----------------------------------------------------------------------------- secondary SAE

SECONDARY_EXPANSION = 25  # dictionary = 25 x M, the paper's 300 -> 7,500 (§13)
SECONDARY_K_PER_M = 250 / 300  # the paper's k = 250 at M = 300; the same ratio here (53 at M = 64)
# with --paper-density: 2 % of the features active, as the paper's code ran it (§14)
SECONDARY_ACTIVE = 0.02


@torch.no_grad()
def firing_counts(sae, x_ND, batch_size=de.EVAL_BATCH):
    """How many held-out tokens each feature is active on: [F]."""
    counts_F = torch.zeros(sae.W_dec.shape[0], dtype=torch.long, device=x_ND.device)
    for x_BD in x_ND.split(batch_size):
        vals_BK, idx_BK = sae.encode(x_BD)
        counts_F += torch.bincount(idx_BK[vals_BK > 0], minlength=len(counts_F))
    return counts_F


@torch.no_grad()
def interaction_hidden(joint, x_ND, batch_size=de.EVAL_BATCH):
    """The joint NFM's interaction hidden layer W_1 pair(f) + c_1, before its ReLU (§13, the
    paper's choice): [N, M], the layer integration features are read from. Filled batch by batch,
    never held twice: at a million tokens it is 1.2 GiB."""
    h_NM = torch.empty(len(x_ND), joint.nfm.embed.shape[1], device=x_ND.device)
    for i, x_BD in enumerate(x_ND.split(batch_size)):
        vals_BK, idx_BK = joint.nfm.read(*joint.sae.encode(x_BD))
        h_NM[i * batch_size:][:len(x_BD)] = joint.nfm.hidden(vals_BK, idx_BK)
    return h_NM


def train_secondary(joint, x_train_ND, x_eval_ND, cfg, paper_density=False, eval_window_N=None):
    """Stage 3 (§13): a TopK SAE on the frozen joint model's interaction hidden layer, 25 x M
    features, k = M * 250 / 300 as the paper's text (2 % of the features as its code, with
    paper_density), trained as the primary SAE is (train_sae: the same loop, schedule, batches and
    steps) on the training tokens' hidden vectors, z-scored with their own statistics; its curve
    reads the held-out tokens of the first cfg.curve_windows windows (eval_window_N gives each
    token's window; None: all of them)."""
    h_train_NM = interaction_hidden(joint, x_train_ND)
    mean_M, std_M = de.fit_normalisation(h_train_NM)
    m = h_train_NM.shape[1]
    torch.manual_seed(cfg.seed)
    k = SECONDARY_ACTIVE * SECONDARY_EXPANSION * m if paper_density else SECONDARY_K_PER_M * m
    sae = de.TopKSAE(m, SECONDARY_EXPANSION * m, max(1, round(k)), cfg.sae_init)
    secondary = de.DualEncoder(sae, None, mean_M, std_M).to(x_train_ND.device)
    z_train_NM = h_train_NM.sub_(mean_M).div_(std_M)  # secondary.normalize, in place: one copy
    z_eval_NM = secondary.normalize(interaction_hidden(joint, x_eval_ND))
    z_curve_NM = z_eval_NM if eval_window_N is None else runner.curve_subset(
        z_eval_NM, eval_window_N, cfg.curve_windows)
    curve = de.train_sae(secondary, z_train_NM, z_curve_NM, cfg, name="secondary")
    return secondary, curve, z_eval_NM


@torch.no_grad()
def pair_reading(joint, secondary, x_BD, feature):
    """What integration feature g reads (§16). The secondary SAE reads the z-scored hidden
    layer z = (h - mu) / sigma, h = W_1 pair(f) + c_1, so g's pre-activation splits exactly into
    pairs of the identity features the NFM reads (its n_read largest codes, R of them):
        a_g = w_g . z + b_g = const_g + sum_{i<j} f_i f_j v_i^T diag(c_g) v_j,
        c_g = W_1^T (w_g / sigma)
        const_g = w_g . ((c_1 - mu) / sigma) + b_g
    Returns const_g (a scalar tensor), the read features [B, R] and each pair's term [B, R, R]
    (i < j above the diagonal, zeros elsewhere): O(B R^2 M), fine for the tokens a feature page
    shows."""
    vals_BR, idx_BR = joint.nfm.read(*joint.sae.encode(x_BD))
    first = joint.nfm.W_1  # h = pair @ W_1^T + c_1
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
            + self.nfm.interaction(self.through_secondary(hidden_BM))

    @torch.no_grad()
    def secondary_code(self, x_BD):
        """The integration features' activations as the secondary SAE's (values, indices):
        [B, K2] each."""
        return self.secondary.sae.encode(self.secondary.normalize(interaction_hidden(self, x_BD)))

    def secondary_codes(self, x_BD):
        """The integration features' activations, dense: [B, F2]."""
        return de.to_dense(*self.secondary_code(x_BD), self.secondary.sae.W_dec.shape[0])


@contextmanager
def scaling(pipeline, scale):
    """While active, `pipeline` applies `scale` (IntegrationPipeline's); afterwards, an error
    included, it is as it was."""
    saved, pipeline.scale = pipeline.scale, scale
    try:
        yield pipeline
    finally:
        pipeline.scale = saved


def stage3(lm, joint, data, cfg, folder, generator):
    """The secondary SAE (train_secondary), saved in `folder`, and what it costs: held-out FVU
    of the hidden layer, dead features, and the spliced KL with the hidden layer replaced by its
    reconstruction, against the joint model's own (paired bootstrap over windows)."""
    layer = data.layer
    secondary, curve, h_eval_NM = train_secondary(joint, data.x_train, data.x_eval, cfg,
                                                  cfg.paper_density, data.eval_window)
    hook = f"blocks.{layer}.hook_resid_post.nfm.hook_interaction_pre_relu"
    metadata = {**runner.sae_metadata(cfg, layer), "hook_name": hook}
    checkpoint.save_model(secondary, folder, metadata)
    pipeline = IntegrationPipeline(joint, secondary).eval()
    firing_F2 = firing_counts(secondary.sae, h_eval_NM)
    m = de.splice_metrics(lm, data.splice_ids, layer,
                          {"joint": joint.reconstruct, "secondary": pipeline.reconstruct},
                          data.splice_keep, data.splice_acts)
    w_splice = st.bootstrap_weights(len(data.splice_ids), cfg.n_boot, generator)
    n_kl = w_splice @ m["kl_mask"].sum(-1).double()
    kl = {name: (w_splice @ v.double().sum(-1)) / n_kl for name, v in m["kl"].items()}
    return pipeline, firing_F2, {
        "features": secondary.sae.W_dec.shape[0], "k": secondary.sae.k, "curve": curve,
        **de.evaluate(secondary, h_eval_NM), "dead_features": int((firing_F2 == 0).sum()),
        "kl_joint": st.summarise(kl["joint"]), "kl_with_secondary": st.summarise(kl["secondary"]),
        "kl_increase": st.summarise(kl["secondary"] - kl["joint"])}


# ----------------------------------------------------------------------------- stimuli

DEFAULT_STIMULI = "stimuli.json"  # beside this file: the referee's own 2 x 2 design


MIN_ITEMS = 8  # matched items a design needs: the items' t has at least 7 degrees of freedom


def read_stimuli(path):
    """A 2 x 2 design as JSON (stimuli.json is dualenc's): {"factors": {A: [a1, a2], B: [b1, b2]},
    "prompts": {"a b": [...]} (the selection prompts) and "words": {"a b": [...]} for the four
    cells "a1 b1", "a1 b2", "a2 b1", "a2 b2", and "items": [{"id": ..., "a1 b1": prompt, ...}]
    (the test: one situation in all four cells); at least 4 selection prompts and one word per
    cell, and MIN_ITEMS items. Read and checked before any slow work; anything else is one line."""
    path = Path(path or Path(__file__).with_name(DEFAULT_STIMULI))
    try:
        spec = json.loads(path.read_text())
        (fa, (a1, a2)), (fb, (b1, b2)) = spec["factors"].items()
        cells = [f"{a} {b}" for a in (a1, a2) for b in (b1, b2)]
        prompts = {c: [str(p) for p in spec["prompts"][c]] for c in cells}
        words = {c: [str(w) for w in spec["words"][c]] for c in cells}
        items = [{"id": str(item["id"]), **{c: str(item[c]) for c in cells}}
                 for item in spec["items"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise de.DualencError(f"stimuli {path}: not a 2 x 2 design like {DEFAULT_STIMULI} "
                              f"({type(e).__name__}: {checkpoint.one_line(e, 120)})") from None
    for c in cells:
        if len(prompts[c]) < 4 or not words[c]:
            raise de.DualencError(f"stimuli {path}: cell {c!r} needs at least 4 prompts and one "
                                  f"word")
    if len(items) < MIN_ITEMS or len({item["id"] for item in items}) < len(items):
        raise de.DualencError(f"stimuli {path}: needs at least {MIN_ITEMS} items with distinct "
                              f"ids, has {len(items)}")
    return {"path": str(path), "factors": {fa: [a1, a2], fb: [b1, b2]}, "cells": cells,
            "prompts": prompts, "items": items, "words": words}


def load_stimuli(spec, tokenizer):
    """The design's prompts as (token ids, cell index): the selection prompts, then the items'
    (item by item, each in cell order); their cells (cell_P), which are selection prompts
    (selection_P), and each cell's words as token ids. A word that is not a single token after a
    space is a one-line error."""
    word_ids = {}
    for c in spec["cells"]:
        ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in spec["words"][c]]
        bad = [w for w, i in zip(spec["words"][c], ids) if len(i) != 1]
        if bad:
            raise de.DualencError(f"stimuli {spec['path']}: words {bad} of cell {c!r} are not "
                                  f"single tokens after a space")
        word_ids[c] = torch.tensor([i[0] for i in ids])
    texts = [(p, i) for i, c in enumerate(spec["cells"]) for p in spec["prompts"][c]]
    n_selection = len(texts)
    texts += [(item[c], i) for item in spec["items"] for i, c in enumerate(spec["cells"])]
    prompts = [(torch.tensor(tokenizer(p)["input_ids"]), i) for p, i in texts]
    return {**spec, "prompt_ids": prompts, "word_ids": word_ids,
            "cell_P": torch.tensor([c for _, c in prompts]),
            "selection_P": torch.arange(len(prompts)) < n_selection}


# ----------------------------------------------------------------------------- intervention

N_PERM = 1999  # permutations a test: p's floor, 1 / 2000, stays far below alpha / 30
N_CONTROLS = 39  # features in each random control, (a) and (c): their rank p can reach 1 / 40
N_PRIMARY_READ = 2  # primary features in control (b)
# the smallest intervention effect that counts: this fraction of the clean word-list interaction's
# size, the mean |2 x 2 interaction of the lists' log-probabilities| over the selection prompts
MIN_EFFECT_FRACTION = 0.1
# factors applied to a feature; x1 is the unscaled pipeline every change is against
SCALES = (0.0, 2.0, 4.0)
# each carried feature's own null: plasmode sets at each assumed correlation of an item's prompts
# (the larger p of the two is used: the selection prompts cannot tell which holds), and the sets
# that check its calibration
ITEM_CORRELATIONS = (0.0, st.ITEM_CORRELATION)
N_NULL = 5_000
N_CALIBRATION = 5_000
N_POWER = 400  # plasmode sets at each size the minimal detectable effect's bisection tries
# A random control can only keep "holds" from standing (stats.with_controls): its 78 scaled sets,
# most of stage 4's time, run where the feature's effect says this at some scale.
RANDOM_CONTROLS_FOR = ("holds",)
COMBINATION = "majority: holds (no) where more than half of the seeds hold (say no), else unclear"


class PromptBatch(NamedTuple):
    """Prompts padded at the end into one batch [P, T], their lengths [P], which positions are real
    [P, T], and their clean block-L outputs [P, T, D], computed once: every scaled pass then runs
    only the blocks after L (dualenc.cached_prefix)."""
    ids_PT: torch.Tensor
    lengths_P: torch.Tensor
    real_PT: torch.Tensor
    h_PTD: torch.Tensor


PROMPT_CHUNK = 32  # prompts a pass


@torch.no_grad()
def prompt_batch(lm, layer, prompts):
    """A PromptBatch of prompts [(token ids, cell)]."""
    lengths_P = torch.tensor([len(ids) for ids, _ in prompts])
    ids_PT = torch.zeros(len(prompts), int(lengths_P.max()), dtype=torch.long)
    for i, (ids, _) in enumerate(prompts):
        ids_PT[i, :len(ids)] = ids
    return PromptBatch(ids_PT, lengths_P, torch.arange(ids_PT.shape[1]) < lengths_P[:, None],
                       de.extract_activations(lm, ids_PT, layer))


@torch.no_grad()
def word_logprobs(lm, layer, batch, word_ids, pipeline, keep_fn):
    """Per prompt of a PromptBatch, the mean next-token log-probability of each word list at the
    prompt's last position, with block `layer`'s output replaced by pipeline.reconstruct at the
    positions keep_fn(h) keeps: [P, 4]. Padded at the end: a causal LM's positions never see what
    follows them, so each prompt's last position is exact; the head reads the last positions only.
    Log-probabilities, not raw logits: a logit vector has a free additive constant, which would move
    every list alike (the 2 x 2 contrasts of the changes are the same either way)."""
    device = next(lm.parameters()).device
    head, rows = lm.get_output_embeddings(), []
    for i in range(0, len(batch.ids_PT), PROMPT_CHUNK):
        part = slice(i, i + PROMPT_CHUNK)
        real_PT = batch.real_PT[part].to(device)

        def splice(h):
            keep = keep_fn(h) & real_PT
            return torch.where(keep[..., None], pipeline.reconstruct(h), h)

        with de.cached_prefix(lm, layer, batch.h_PTD[part].to(device)), \
                de.block_hook(lm, layer, splice):
            hidden_PTD = lm.base_model(batch.ids_PT[part].to(device),
                                       use_cache=False).last_hidden_state
        last_PD = hidden_PTD[torch.arange(len(real_PT)), batch.lengths_P[part] - 1]
        logp_PV = F.log_softmax(head(last_PD).float(), dim=-1)
        rows.append(torch.stack([logp_PV[:, ids.to(device)].mean(-1)
                                 for ids in word_ids.values()], dim=-1))
    return torch.cat(rows).double().cpu()


def list_contrast(logp_P4, contrast="interaction"):
    """Per prompt, a 2 x 2 contrast of the four word lists' figures (in cell order): [P]."""
    return logp_P4 @ torch.tensor(st.CONTRASTS[contrast], dtype=torch.float64)


class Effects(NamedTuple):
    """Scaling each of S feature sets in turn by one factor: per set, each prompt's 2 x 2 contrast
    of the word lists' changes (the effect stage 4 tests), and the four word lists' mean changes
    over prompts and sets."""
    per_set_SP: torch.Tensor
    word_list_changes: list


def intervention_effect(lm, layer, prompts, word_ids, pipeline, keep_fn, scale, base_P4,
                        contrast="interaction"):
    """The changes in each word list's log-probability when `scale` is applied, for every factor in
    SCALES, against the unscaled pipeline base_P4: {factor: [P, 4]}; and per prompt the 2 x 2
    contrast of those changes, {factor: [P]}."""
    changes, effect = {}, {}
    for factor in SCALES:
        with scaling(pipeline, (*scale, factor)):
            changes[factor] = (word_logprobs(lm, layer, prompts, word_ids, pipeline, keep_fn)
                               - base_P4)
        effect[factor] = list_contrast(changes[factor], contrast)
    return changes, effect


def kept_positions(max_norm):
    """keep_fn for a stimulus prompt's block output h: the positions the models were trained and
    evaluated on (not position 0, no massive norm, §2)."""
    def keep_fn(h_BTD):
        return de.keep_mask(h_BTD.norm(dim=-1), max_norm)
    return keep_fn


@torch.no_grad()
def stimulus_states(lm, layer, design, keep_fn):
    """Each stimulus prompt's block-`layer` outputs at its kept positions (keep_fn(h)), raw: a list
    of [T_p, D], one LM pass a prompt that every code below shares."""
    states = []
    for ids, _ in design["prompt_ids"]:
        h_1TD = de.extract_activations(lm, ids[None], layer)
        states.append(h_1TD[keep_fn(h_1TD)])
    return states


@torch.no_grad()
def prompt_codes(states, code):
    """code(raw h [T_p, D]) -> dense [T_p, F], averaged over each prompt's kept positions:
    [P, F]."""
    return torch.stack([code(h_TD).mean(0) for h_TD in states]).cpu()


def integration_code(pipeline):
    """Raw h -> the integration features' activations [T, F2]."""
    return lambda h: pipeline.secondary_codes(pipeline.normalize(h))


def identity_code(model):
    """Raw h -> a model's primary SAE code, dense [T, F]."""
    return lambda h: de.to_dense(*model.sae.encode(model.normalize(h)), model.sae.W_dec.shape[0])


def stimulus_codes(lm, layer, pipeline, design, keep_fn):
    """Each stimulus prompt's integration features, averaged over its kept positions: [P, F2]."""
    return prompt_codes(stimulus_states(lm, layer, design, keep_fn), integration_code(pipeline))


@torch.no_grad()
def pair_inputs(joint, secondary, states, feature, n=N_PRIMARY_READ):
    """Control (b): the n primary features that raise integration feature `feature` most through
    pair (pair_reading: each feature's share of every pair term it is in, summed over the prompts'
    kept positions), among those active there. The prompts are the selection half's."""
    n_features = joint.sae.W_dec.shape[0]
    share_F = torch.zeros(n_features, dtype=torch.float64)
    for h_TD in states:
        _, idx_TR, terms_TRR = pair_reading(joint, secondary, joint.normalize(h_TD), feature)
        per_read_TR = (terms_TRR.sum(-1) + terms_TRR.sum(-2)).double().cpu() / 2
        share_F.index_add_(0, idx_TR.flatten().cpu(), per_read_TR.flatten())
    top = share_F.topk(n)
    return [f for f, v in zip(top.indices.tolist(), top.values.tolist()) if v > 0]


def matched_random(A_sel_PF, firing_F2, feature, generator, n=N_CONTROLS):
    """Control (a): n integration features drawn from the 2n nearest the selected one in mean
    activation over the selection prompts, among those active there and on held-out tokens."""
    mean_F = A_sel_PF.double().mean(0)
    candidates = ((A_sel_PF > 0).any(0) & (firing_F2.cpu() > 0)).nonzero()[:, 0]
    candidates = candidates[candidates != feature]
    near = candidates[(mean_F[candidates] - mean_F[feature]).abs().argsort()[: 2 * n]]
    return near[torch.randperm(len(near), generator=generator)[:n]].tolist()


def shuffled_selections(A_sel_PF, cell_sel, feature, generator, contrast, n=N_CONTROLS):
    """Control (c): the feature each of n shufflings of the selection prompts' cells would have
    chosen (the largest |t| of the contrast, none chosen twice and not the selected one)."""
    chosen = []
    for _ in range(n):
        shuffled = cell_sel[torch.randperm(len(cell_sel), generator=generator)]
        chosen.append(st.top_features(A_sel_PF, shuffled, contrast,
                                      exclude=[feature, *chosen])[0][0])
    return chosen


def sealed_nulls(carried, cell_sel, n_items, generator):
    """Each carried feature's own null (stats.plasmode_null, at every ITEM_CORRELATIONS), the
    route's calibration at the level it is used (the share of an independent plasmode null
    rejected, at the assumed correlation) and its minimal detectable effect in its own sd, written
    into its plan row: {kind: {contrast: [len(ITEM_CORRELATIONS), F, S]}}."""
    nulls = {}
    level = st.ALPHA / sum(len(rows) for rows in next(iter(carried.values())).values())
    for kind, plan in carried.items():
        nulls[kind] = {}
        for name, rows in tqdm(plan.items(), desc=f"stage 4: {kind}'s nulls", leave=False):
            per_rho = torch.stack([torch.stack([
                st.plasmode_null(r, cell_sel, name, n_items, N_NULL, generator, rho)
                for r in rows]) for rho in ITEM_CORRELATIONS])
            nulls[kind][name] = per_rho
            for r, null_RS in zip(rows, per_rho.transpose(0, 1)):
                r["level"] = level
                r["null_rejection_rate"] = st.plasmode_rates(
                    r, null_RS, cell_sel, name, n_items, level, N_CALIBRATION, generator)[0]
                r["mde_sd"] = st.minimal_detectable(r, null_RS, cell_sel, name, n_items, level,
                                                    generator, N_POWER)
    return nulls


def stage4_plan(lm, layer, pipeline, design, sel_states, A_sel, cell_sel, firing_F2, generator):
    """Everything stage 4 decides before a test item is read, from the selection prompts alone:
    the features each code carries to the test items with their directions, minimum effects,
    routes, own nulls and minimal detectable effects (stats.preregister, sealed_nulls), and for
    every carried integration feature the intervention it would get: its word-list contrast (its
    own contrast's), the expected direction at each scale (the selection sign times the sign of
    scale - 1), its minimum effect (MIN_EFFECT_FRACTION of that clean word-list contrast on the
    selection prompts), its minimal detectable effect (from its effects on the selection
    prompts), and its controls' features. Returns (plan, nulls)."""
    carried = {kind: st.preregister(A_PF, cell_sel) for kind, A_PF in A_sel.items()}
    n_items = len(design["items"])
    nulls = sealed_nulls(carried, cell_sel, n_items, generator)
    clean_P4 = word_logprobs(lm, layer, design["selection"], design["word_ids"], pipeline,
                             design["keep_fn"])
    interventions = {}
    for name, rows in carried["integration"].items():
        size = list_contrast(clean_P4, name).abs().mean().item()
        for r in rows:
            interventions[f"{r['feature']} {name}"] = {
                "feature": r["feature"], "contrast": name, "selection_sign": r["direction"],
                "directions": {f"{f:g}": r["direction"] * (1 if f > 1 else -1) for f in SCALES},
                "clean_size": size, "min_effect_fraction": MIN_EFFECT_FRACTION,
                "min_effect": MIN_EFFECT_FRACTION * size,
                "mde": intervention_mde(lm, layer, pipeline, design, clean_P4, r["feature"], name,
                                        MIN_EFFECT_FRACTION * size, n_items, size),
                "controls": {
                    "random_matched": matched_random(A_sel["integration"], firing_F2,
                                                     r["feature"], generator),
                    "primary_read": pair_inputs(pipeline, pipeline.secondary, sel_states,
                                                r["feature"]),
                    "shuffled_selection": shuffled_selections(A_sel["integration"], cell_sel,
                                                              r["feature"], generator, name)}}
    top = carried["integration"]["interaction"][0]
    plan = {"alpha": st.ALPHA, "min_selectivity_sd": st.MIN_SELECTIVITY,
            "silent_share": st.SILENT_SHARE, "item_correlations": list(ITEM_CORRELATIONS),
            "null_samples": N_NULL, "power": st.POWER, "carried": carried,
            "selected": f"{top['feature']} interaction", "interventions": interventions,
            "min_controls": st.MIN_CONTROLS, "combination_over_seeds": COMBINATION}
    return plan, nulls


@torch.no_grad()
def intervention_mde(lm, layer, pipeline, design, clean_P4, feature, contrast, min_effect,
                     n_items, size):
    """The smallest intervention effect on the word lists' contrast that the test items would find
    ("holds") with probability stats.POWER, per scale: min_effect + (t_0.975 + t_POWER) se, se from
    the per-prompt effects' sd on the selection prompts over the test's n_items items (each the
    mean of its four prompts, taken as independent: optimistic where an item's prompts are
    alike); in nats and as a fraction of the clean word-list contrast `size`."""
    device = next(pipeline.parameters()).device
    _, effect = intervention_effect(lm, layer, design["selection"], design["word_ids"], pipeline,
                                    design["keep_fn"], ("secondary", torch.tensor(
                                        [feature], device=device)), clean_P4, contrast)
    factor = st.t_quantile(0.975, n_items - 1) + st.t_quantile(st.POWER, n_items - 1)
    out = {}
    for f, effect_P in effect.items():
        nats = min_effect + factor * effect_P.std().item() / math.sqrt(4 * n_items)
        out[f"{f:g}"] = {"nats": nats, "fraction_of_clean": nats / size if size > 0 else None}
    return out


def intervention(lm, layer, pipeline, design, plan_i, active):
    """One planned intervention (plan_i, a row of the plan's "interventions") on the test items: at
    each scale, the feature's effect on the word lists' contrast, per item the mean over its four
    prompts, its t interval over items and rule's verdict against the plan's direction and minimum
    effect, beside its three controls (stats.against_random, against_paired; the random ones "not
    run" where the effect holds at no scale, since they can change only a "holds");
    stats.with_controls gives the verdict. active(code, features) [len(features)] tells which
    control features fire on the test prompts. Returns (rows, the largest change at x1)."""
    prompts, words, keep_fn = design["test"], design["word_ids"], design["keep_fn"]
    device = next(pipeline.parameters()).device
    base_P4 = word_logprobs(lm, layer, prompts, words, pipeline, keep_fn)
    contrast, ctrl, j = plan_i["contrast"], plan_i["controls"], plan_i["feature"]

    def per_item(x_SP):  # an item's prompts are consecutive, in cell order
        return x_SP.reshape(*x_SP.shape[:-1], -1, 4).mean(-1)

    def effects(code, feature_sets, what):
        """{factor: Effects} of scaling each feature set in turn, per item."""
        runs = [intervention_effect(lm, layer, prompts, words, pipeline, keep_fn,
                                    (code, torch.tensor(fs, device=device, dtype=torch.long)),
                                    base_P4, contrast)
                for fs in tqdm(feature_sets, desc=f"stage 4: {what}", leave=False)]
        return {f: Effects(per_item(torch.stack([e[f] for _, e in runs])),
                           torch.stack([ch[f].mean(0) for ch, _ in runs]).mean(0).tolist())
                for f in SCALES}

    with scaling(pipeline, ("secondary", torch.tensor([j], device=device), 1.0)):
        x1_change = (word_logprobs(lm, layer, prompts, words, pipeline, keep_fn)
                     - base_P4).abs().max().item()
    selected = effects("secondary", [[j]], f"feature {j}")
    primary = effects("pair", [ctrl["primary_read"]], "primary read")  # none read: scales nothing
    directions = {f: plan_i["directions"][f"{f:g}"] for f in SCALES}
    summaries = {f: st.mean_interval(selected[f].per_set_SP[0]) for f in SCALES}  # (effect, ci)
    verdicts = {f: st.rule([ci], directions[f], directions[f] * plan_i["min_effect"])
                for f, (_, ci) in summaries.items()}
    random_runs = {}
    if set(verdicts.values()) & set(RANDOM_CONTROLS_FOR):
        random_runs = {name: effects("secondary", [[f] for f in ctrl[name]],
                                     name.replace("_", " "))
                       for name in ("random_matched", "shuffled_selection")}
    out = {}
    for f in SCALES:
        direction, (effect, ci) = directions[f], summaries[f]
        controls = {name: {"status": "not run", "active": None, "p": None, "effect": None}
                    for name in ("random_matched", "shuffled_selection")}
        controls.update({name: {**st.against_random(effect, r[f].per_set_SP.mean(-1),
                                                    active("secondary", ctrl[name])),
                                "word_list_changes": r[f].word_list_changes}
                         for name, r in random_runs.items()})
        controls["primary_read"] = {
            **st.against_paired(selected[f].per_set_SP[0], primary[f].per_set_SP[0], direction,
                                bool(active("pair", ctrl["primary_read"]).any())),
            "word_list_changes": primary[f].word_list_changes}
        out[f"{f:g}"] = {"selected": {"effect": effect, "ci": ci, "direction": direction,
                                      "min_effect": plan_i["min_effect"],
                                      "verdict": verdicts[f],
                                      "word_list_changes": selected[f].word_list_changes},
                         "controls": controls,
                         "verdict": st.with_controls(verdicts[f], controls)}
    return out, x1_change


def stage4(lm, pipeline, models, data, cfg, design, firing_F2, plan_path, generator):
    """Stage 4 (§13) on one seed: stage4_plan from the selection prompts, written to plan_path,
    then the test items read once: every code's carried features (integration features, and as the
    baseline the identity features of the joint model's SAE and of the run's other SAEs,
    `models`), each on the items' own contrasts (stats.judge_items); the paper's way on the
    selection prompts; the intervention on the selected integration feature (the interaction's
    top) and on every other carried integration feature that holds, each beside its controls."""
    layer, cell_P, sel_P = data.layer, design["cell_P"], design["selection_P"]
    keep_fn = kept_positions(data.max_norm)
    sel, test = sel_P.nonzero()[:, 0], (~sel_P).nonzero()[:, 0]
    states = stimulus_states(lm, layer, design, keep_fn)
    codes = {"integration": integration_code(pipeline), "identity_joint": identity_code(pipeline),
             **{f"identity_{name}": identity_code(m) for name, m in models.items()}}
    A = {kind: prompt_codes(states, code) for kind, code in codes.items()}
    design = {**design, "keep_fn": keep_fn,
              "selection": prompt_batch(lm, layer, [design["prompt_ids"][i] for i in sel]),
              "test": prompt_batch(lm, layer, [design["prompt_ids"][i] for i in test])}
    plan, nulls = stage4_plan(lm, layer, pipeline, design, [states[i] for i in sel],
                              {kind: A_PF[sel] for kind, A_PF in A.items()}, cell_P[sel],
                              firing_F2, generator)
    checkpoint.write_json(plan_path, plan)  # sealed before the test items are read

    # the test items
    n_items = len(design["items"])
    selectivity = {kind: st.judge_items(A_PF[test].reshape(n_items, 4, -1), plan["carried"][kind],
                                        nulls[kind]) for kind, A_PF in A.items()}

    def active(code, features):  # which features fire on the test prompts' kept positions
        A_PF = A["integration"] if code == "secondary" else A["identity_joint"]
        return (A_PF[test][:, features] > 0).any(0)

    held = [f"{r['feature']} {name}" for name, c in selectivity["integration"].items()
            for r in c["features"] if r["verdict"] == "holds"]
    interventions, x1_change = {}, 0.0
    for key in dict.fromkeys([plan["selected"], *held]):
        interventions[key], x1 = intervention(lm, layer, pipeline, design,
                                              plan["interventions"][key], active)
        x1_change = max(x1_change, x1)
    verdicts = {f"intervention_x{f}": row["verdict"]
                for f, row in interventions[plan["selected"]].items()}
    top = selectivity["integration"]["interaction"]["features"][0]["verdict"]
    overall = "holds" if top == "holds" and set(verdicts.values()) == {"holds"} else \
        "no" if top == "no" or set(verdicts.values()) == {"no"} else "unclear"
    return {"design": {"factors": design["factors"], "cells": design["cells"],
                       "selection_prompts_per_cell": [int((cell_P[sel] == c).sum())
                                                      for c in range(4)],
                       "test_items": n_items},
            "plan": plan, "selectivity": selectivity,
            "paper_way": st.paper_way(A["integration"][sel], cell_P[sel], N_PERM, generator),
            "x1_max_change": x1_change, "interventions": interventions,
            "verdicts": {"selectivity_on_test_items": top, **verdicts, "overall": overall}}


def stage34(lm, tokenizer, joints, baselines, data, cfg, out):
    """Stages 3 and 4 of the paper (§13) on each seed's joint model (joints {seed: model}), with a
    referee's controls and baselines (baselines {seed: {name: model}}, the run's SAEs), combined
    over the seeds by COMBINATION, fixed before they run. Returns the report's "stage34"."""
    design = load_stimuli(read_stimuli(cfg.stimuli), tokenizer)
    first, per_seed = min(joints), []
    for seed, joint in joints.items():
        generator = torch.Generator().manual_seed(seed)
        tag = "" if seed == first else f"_seed{seed}"
        pipeline, firing_F2, secondary = stage3(lm, joint, data, replace(cfg, seed=seed),
                                                out / f"secondary{tag}", generator)
        result = stage4(lm, pipeline, baselines.get(seed, {}), data, cfg, design, firing_F2,
                        out / f"stage34_plan{tag}.json", generator)
        per_seed.append({"seed": seed, "secondary": secondary, **result})
    keys = per_seed[0]["verdicts"]
    return {"combination": COMBINATION, "per_seed": per_seed,
            "combined": {k: st.majority(r["verdicts"][k] for r in per_seed) for k in keys}}


# ----------------------------------------------------------------------------- figure and table

def plot_stage34(result, out):
    """stage34.png: per scale, the 2 x 2 interaction plot of the word lists' log-probability changes
    (x: the first factor's lists, lines: the second factor's), for the first seed's selected
    feature and controls (a random control: its features' mean)."""
    from matplotlib.figure import Figure

    first = result["per_seed"][0]
    rows = first["interventions"][first["plan"]["selected"]]
    (fa, (a1, a2)), (fb, (b1, b2)) = first["design"]["factors"].items()
    styles = {"selected": ("tab:blue", 2.5), "random_matched": ("0.6", 1.2),
              "primary_read": ("tab:orange", 1.2), "shuffled_selection": ("tab:green", 1.2)}
    fig = Figure(figsize=(4.2 * len(rows), 4), layout="constrained")
    for ax, (f, row) in zip(fig.subplots(1, len(rows), sharey=True), rows.items()):
        for name, (color, width) in styles.items():
            ch = (row["selected"] if name == "selected"
                  else row["controls"][name]).get("word_list_changes")
            if ch is None:  # a random control not run
                continue
            ax.plot([a1, a2], [ch[0], ch[2]], "-o", color=color, lw=width,
                    label=f"{name}: {b1} words")
            ax.plot([a1, a2], [ch[1], ch[3]], "--s", color=color, lw=width,
                    label=f"{name}: {b2} words")
        ax.axhline(0, color="k", lw=0.5)
        ax.set(title=f"feature x{f}", xlabel=f"{fa} of the word list")
    fig.axes[0].set_ylabel("change in mean log P(word list) at the next token")
    fig.axes[-1].legend(fontsize=6)
    fig.suptitle(f"Seed {first['seed']}: scaling the selected integration feature, and the "
                 f"controls: word-list changes on the test items")
    fig.savefig(out / "stage34.png", dpi=110)


def format_seed(r):
    """One seed's stages 3-4: the secondary SAE, the carried features of every code, each
    intervention beside its controls, and the verdicts."""
    sec, design = r["secondary"], r["design"]
    level = next(iter(next(iter(r["plan"]["carried"].values())).values()))[0]["level"]
    rows = [f"seed {r['seed']}, stage 3: secondary SAE on the joint NFM's interaction hidden "
            f"layer: {sec['features']} features, k {sec['k']}; held-out fvu {sec['fvu']:.4f}, "
            f"dead {sec['dead_features']}; spliced KL {sec['kl_with_secondary']['value']:.4f} "
            f"against the joint model's {sec['kl_joint']['value']:.4f} "
            f"(increase {sec['kl_increase']['value']:.4f} {st.fmt_ci(sec['kl_increase']['ci'])})",
            f"stage 4: {design['selection_prompts_per_cell']} selection prompts per cell choose, "
            f"{design['test_items']} matched items test (the item the unit); {st.N_CARRIED} "
            f"features carried per contrast and code, each one-sided in its selection direction "
            f"against its own plasmode null, Bonferroni over the code's carried (level "
            f"{level:.4f}), holds at >= {st.MIN_SELECTIVITY:g} selection sd",
            "{:<21}{:<13}{:>6}{:>7}{:>8}{:>10}{:>20}{:>8}{:>8}{:>8}{:>7}  {:<8}{:>6}".format(
                "code", "contrast", "top", "route", "sel. t", "test", "test 95% (items)", "min",
                "mde sd", "p x n", "null", "verdict", "holds")]
    for kind, contrasts in r["selectivity"].items():
        for name, c in contrasts.items():
            t = c["features"][0]
            mde = "-" if t["mde_sd"] is None else f"{t['mde_sd']:.2f}"
            rows.append(f"{kind:<21}{name:<13}{t['feature']:>6}{t['route']:>7}"
                        f"{t['selection_t']:>8.2f}{t['test']:>10.4f}{st.fmt_ci(t['test_ci']):>20}"
                        f"{t['min_effect']:>8.4f}{mde:>8}{t['p_bonferroni']:>8.4f}"
                        f"{t['null_rejection_rate']:>7.4f}  {t['verdict']:<8}"
                        f"{c['holds']:>3}/{c['carried']}")
    pw = r["paper_way"]["interaction"]
    rows.append(f"the paper's way (integration, interaction): feature {pw['feature']}, contrast "
                f"{pw['contrast']:.4f}, p {pw['p_same_prompts_uncorrected']:.4f} on the same "
                f"selection prompts, two-sided, uncorrected")
    for key, interv in r["interventions"].items():
        plan_i = r["plan"]["interventions"][key]
        mde = ", ".join(f"x{f} {m['nats']:.2e}" for f, m in plan_i["mde"].items())
        rows.append(f"intervention on feature {plan_i['feature']} ({plan_i['contrast']}, "
                    f"selection sign {plan_i['selection_sign']:+d}): per test item the word lists' "
                    f"{plan_i['contrast']} of log-prob changes; minimum effect "
                    f"{plan_i['min_effect']:.2e} = {plan_i['min_effect_fraction']:g} x the clean "
                    f"{plan_i['clean_size']:.3f}; detectable at 80 % power: {mde} nats")
        for f, row in interv.items():
            s = row["selected"]
            rows.append(f"  x{f}: expected {s['direction']:+d}; effect {s['effect']:.2e} "
                        f"{st.fmt_ci(s['ci'])} -> {s['verdict']}; beside the controls: "
                        f"{row['verdict']}")
            for name, c in row["controls"].items():
                if c["status"] == "not run":
                    detail = "(can change only a holds)"
                elif "active" in c:  # a random control
                    detail = f"{c['active']} features active on the test prompts" + (
                        f", rank p {c['p']:.3f}" if c["p"] is not None else "")
                elif c["ci"] is not None:
                    detail = f"paired difference {c['difference']:.2e} {st.fmt_ci(c['ci'])}"
                else:
                    detail = "silent on the test prompts"
                rows.append(f"    {name:<20} {c['status']:<11} {detail}")
    rows.append(f"(x1 changes nothing: max {r['x1_max_change']:.1e})")
    rows.append("verdicts: " + ", ".join(f"{k} {v}" for k, v in r["verdicts"].items()))
    return rows


def format_stage34(result):
    """The stages 3-4 tables (§13): each seed's (format_seed), then the verdicts combined over the
    seeds by the rule fixed before they ran."""
    rows = []
    for r in result["per_seed"]:
        rows += format_seed(r) + [""]
    rows.append(f"combined over {len(result['per_seed'])} seed(s) ({result['combination']}): "
                + ", ".join(f"{k} {v}" for k, v in result["combined"].items()))
    return "\n".join(rows)
