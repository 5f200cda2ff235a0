"""browser: a run's features on one page that works offline, browser.html.

`python -m referee --eval-only RUN_DIR --browser` writes it beside the run's results; it opens
with a double click and asks nothing of the network. Each integration feature (a feature of stage
3's secondary SAE, stages34.py) shows the pairs of identity features it reads through the NFM's
pair term (stages34.pair_reading, docs/method.md §16), its top contexts and a few weaker ones, its
activation histogram and its 2 x 2 cell means on the stimulus prompts; each identity feature (the
joint model's SAE) its top contexts, decoder norm, firing rate and the integration features that
read it. The front page has the joint model's decoder-norm histogram: a bar lists its features.
Sections, in the order data flows:
  codes      the held-out tokens' sparse codes, grouped by feature
  features   what a page shows of an identity or an integration feature
  page       the HTML: browser_page/'s page.html, page.css and page.js made one file, the data
             embedded as escaped JSON, no network (a Content-Security-Policy), drawn by the
             script one feature at a time
  a run's page  write_page: the page of models and codes in memory (replicate.add_browser loads
             or trains them, and codes the stimuli)
Dimension letters as in dualenc.py; E code entries, G integration features, P prompts.
"""

import json
import math
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

import dualenc as de
from referee import stages34 as s34
from referee import stats as st

N_TOP, N_WEAKER, N_PAIRS, N_BINS = 8, 4, 8, 24  # contexts, weaker contexts, pairs, histogram bins
BUDGET = 5_000_000  # bytes of one page at most: a run with more has its feature pages in files
CHUNK = 200  # feature pages a data file holds
WIDTH = 8  # tokens shown either side of a context's token
LEVELS = 255  # activations are kept as integers 0..LEVELS, a fraction of the feature's largest


# ----------------------------------------------------------------------------- codes

class Codes(NamedTuple):
    """The held-out tokens' codes as entries grouped by feature, largest first within a feature:
    feature f's entries are start[f]:start[f + 1] of token (the held-out token's index) and
    value."""
    token: torch.Tensor  # [E]
    value: torch.Tensor  # [E]
    start: torch.Tensor  # [F + 1]
    n_tokens: int  # the tokens coded, those with no active feature too

    def of(self, f):
        return slice(int(self.start[f]), int(self.start[f + 1]))

    def count(self, f):
        return int(self.start[f + 1] - self.start[f])


@torch.no_grad()
def sparse_codes(encode, x_ND, n_features, batch_size=de.EVAL_BATCH):
    """Codes of every token of x_ND under encode(x_BD) -> (values [B, K], indices [B, K]); zeros
    (a TopK code's inactive slots) are left out. Read in batches: x_ND may be on disk."""
    tokens, features, values, start = [], [], [], 0
    for x_BD in tqdm(x_ND.split(batch_size), desc="codes", leave=False):
        vals_BK, idx_BK = (t.cpu() for t in encode(x_BD))
        active_BK = vals_BK > 0
        token_BK = torch.arange(start, start + len(vals_BK))[:, None].expand_as(idx_BK)
        tokens.append(token_BK[active_BK])
        features.append(idx_BK[active_BK])
        values.append(vals_BK[active_BK].float())
        start += len(vals_BK)
    token_E, feature_E, value_E = torch.cat(tokens), torch.cat(features), torch.cat(values)
    by_value = value_E.argsort(descending=True, stable=True)
    order = by_value[feature_E[by_value].argsort(stable=True)]
    counts_F = torch.bincount(feature_E, minlength=n_features)
    return Codes(token_E[order], value_E[order],
                 torch.cat([counts_F.new_zeros(1), counts_F.cumsum(0)]), start)


# ----------------------------------------------------------------------------- features

def contexts(codes, f, n_top=N_TOP, n_weaker=0):
    """Feature f's n_top strongest entries and n_weaker from below half its largest value, spread
    over them: [(token, value)]."""
    part = codes.of(f)
    token_E, value_E = codes.token[part], codes.value[part]
    chosen = list(range(min(n_top, len(token_E))))
    weaker = (value_E < 0.5 * value_E[0]).nonzero()[:, 0] if len(value_E) else value_E.long()
    if n_weaker and len(weaker):
        spread = torch.linspace(0, len(weaker) - 1, min(n_weaker, len(weaker))).round().long()
        chosen += [int(weaker[i]) for i in spread if int(weaker[i]) not in chosen]
    return [(int(token_E[i]), float(value_E[i])) for i in chosen]


def quantised(value, largest):
    return round(LEVELS * value / largest) if largest > 0 else 0


def histogram(values, bins=N_BINS):
    """Counts of the values in `bins` equal bins from 0 to the largest."""
    if not len(values):
        return []
    return torch.histc(values, bins, 0, float(values.max())).int().tolist()


def pair_table(joint, secondary, x_BD, g, n=N_PAIRS):
    """Integration feature g's pre-activation on the tokens x_BD, split by pair_reading into a
    constant and one term per pair of identity features; the n pairs with the largest mean term
    over the tokens (a pair that does not fire on a token counts 0 there): ([[i, j, mean]], const,
    mean pre-activation)."""
    const, idx_BR, terms_BRR = s34.pair_reading(joint, secondary, x_BD, g)
    B, R = idx_BR.shape
    upper = torch.ones(R, R, dtype=torch.bool, device=idx_BR.device).triu(1).expand(B, R, R)
    i_E = idx_BR[:, :, None].expand(B, R, R)[upper]
    j_E = idx_BR[:, None, :].expand(B, R, R)[upper]
    # a pair is the same on every token whichever of its features the code read first
    width = int(idx_BR.max()) + 1
    pair_E = torch.minimum(i_E, j_E) * width + torch.maximum(i_E, j_E)
    pairs_Q, which_E = pair_E.unique(return_inverse=True)
    mean_Q = terms_BRR[upper].new_zeros(len(pairs_Q)).index_add_(0, which_E, terms_BRR[upper]) / B
    top = mean_Q.abs().argsort(descending=True)[:n]
    table = [[int(pairs_Q[q]) // width, int(pairs_Q[q]) % width, float(mean_Q[q])] for q in top]
    return table, const.item(), const.item() + terms_BRR.sum((1, 2)).mean().item()


def cell_summary(a_P, cell_P):
    """Per cell of the 2 x 2, the mean of a_P and its 95 % Student-t interval: [[mean, lo, hi]]."""
    rows = []
    for c in range(4):
        x = a_P[cell_P == c].double()
        mean = x.mean().item()
        half = st.t_quantile(0.975, len(x) - 1) * x.std().item() / math.sqrt(len(x)) \
            if len(x) > 1 else float("nan")
        rows.append([round(mean, 5), round(mean - half, 5), round(mean + half, 5)])
    return rows


def identity_features(codes, norms_F, used_by):
    """What each identity feature's page shows: rate (per held-out token), decoder norm, largest
    activation, top contexts, and the integration features that read it."""
    pages = []
    for f in range(len(norms_F)):
        top = contexts(codes, f)
        largest = top[0][1] if top else 0.0
        pages.append({"rate": round(codes.count(f) / codes.n_tokens, 6),
                      "norm": round(norms_F[f], 4),
                      "max": round(largest, 4), "top": [[t, quantised(v, largest)] for t, v in top],
                      "used_by": sorted(used_by.get(f, []))})
    return pages


def integration_features(codes, joint, secondary, x_eval, stimulus=None):
    """What each integration feature's page shows (None for one that never fires): rate, largest
    activation, histogram, top and weaker contexts, its pair table, and, given the stimulus
    prompts' codes (A_PG, cell_P, selection_P), its 2 x 2 cell means on the selection prompts and
    on the test items."""
    pages = []
    for g in tqdm(range(len(codes.start) - 1), desc="integration features", leave=False):
        if codes.count(g) == 0:
            pages.append(None)
            continue
        top = contexts(codes, g, N_TOP, N_WEAKER)
        largest = top[0][1]
        x_BD = x_eval[torch.tensor([t for t, _ in top[:N_TOP]])]
        pairs, const, pre = pair_table(joint, secondary, x_BD, g)
        page = {"rate": round(codes.count(g) / codes.n_tokens, 6), "max": round(largest, 4),
                "hist": histogram(codes.value[codes.of(g)]),
                "top": [[t, quantised(v, largest)] for t, v in top[:N_TOP]],
                "weaker": [[t, quantised(v, largest)] for t, v in top[N_TOP:]],
                "pairs": [[i, j, round(m, 5)] for i, j, m in pairs], "const": round(const, 5),
                "pre": round(pre, 5)}
        if stimulus is not None:
            A_PG, cell_P, sel_P = stimulus
            page["cells"] = {"selection": cell_summary(A_PG[sel_P, g], cell_P[sel_P]),
                             "test": cell_summary(A_PG[~sel_P, g], cell_P[~sel_P])}
        pages.append(page)
    return pages


def readers(integration):
    """{identity feature: [integration features whose pair table names it]}: the reverse table."""
    used_by = {}
    for g, page in enumerate(integration):
        for f in {f for i, j, _ in (page["pairs"] if page else []) for f in (i, j)}:
            used_by.setdefault(f, []).append(g)
    return used_by


def texts(tokenizer, data, pages):
    """The held-out windows the pages' contexts come from, as indices into a table of readable
    token strings (each token once), and the contexts rewritten to [window, position, level]."""
    pos_N = data.eval_keep.nonzero()
    windows, vocab, strings = {}, {}, []
    for page in pages:
        for key in ("top", "weaker"):
            for ctx in page.get(key, []) if page else []:
                w, p = (int(v) for v in pos_N[ctx[0]])
                windows.setdefault(w, None)
                ctx[:1] = [w, p]
    rows = {}
    for w in sorted(windows):
        ids = data.eval_ids[w].tolist()
        for i in ids:
            if i not in vocab:
                vocab[i] = len(strings)
                strings.append(tokenizer.decode([i]))
        rows[w] = [vocab[i] for i in ids]
    return {str(w): row for w, row in rows.items()}, strings


def norm_bins(norms_F, bins=N_BINS):
    """The decoder-norm histogram of the front page: counts, bin edges and each bin's features."""
    lo, hi = float(norms_F.min()), float(norms_F.max())
    width = (hi - lo) / bins or 1.0
    bin_F = ((norms_F - lo) / width).floor().long().clamp(0, bins - 1)
    members = [(bin_F == b).nonzero()[:, 0].tolist() for b in range(bins)]
    return {"counts": [len(m) for m in members], "members": members,
            "edges": [lo + b * width for b in range(bins + 1)]}


@torch.no_grad()
def content(tokenizer, joint, secondary, data, stimulus=None, cells=(), summary=""):
    """Everything the page shows, as lists and numbers: the joint model's identity features and
    the secondary SAE's integration features on the held-out tokens (data.x_eval), with the
    stimulus prompts' codes (A_PG, cell_P, selection_P) and the cells' names when given."""
    pipeline = s34.IntegrationPipeline(joint, secondary).eval()
    n_identity, n_integration = joint.sae.W_dec.shape[0], secondary.sae.W_dec.shape[0]
    identity_codes = sparse_codes(joint.sae.encode, data.x_eval, n_identity)
    integration_codes = sparse_codes(pipeline.secondary_code, data.x_eval, n_integration)
    integration = integration_features(integration_codes, joint, secondary, data.x_eval,
                                       stimulus)
    norms_F = joint.sae.W_dec.norm(dim=-1).cpu()
    identity = identity_features(identity_codes, norms_F.tolist(), readers(integration))
    windows, vocab = texts(tokenizer, data, integration + identity)
    return {"summary": summary, "width": WIDTH, "levels": LEVELS, "cells": list(cells),
            "norms": norm_bins(norms_F), "texts": windows, "vocab": vocab,
            "identity": identity, "integration": integration}


# ----------------------------------------------------------------------------- page

PAGE_FILES = Path(__file__).parent / "browser_page"  # wherever the process runs from


def page_template():
    """browser_page/page.html with page.css and page.js in place of its /*CSS*/ and /*JS*/ lines:
    one file, which opens offline; /*SCRIPT_SRC*/ and /*DATA*/ are left for page_html."""
    def read(name):
        return (PAGE_FILES / name).read_text(encoding="utf-8")
    return read("page.html").replace("/*CSS*/\n", read("page.css"), 1).replace(
        "/*JS*/\n", read("page.js"), 1)


def embedded_json(obj):
    """JSON safe inside a <script> element: <, > and & escaped (corpus text can hold </script>),
    and every non-ASCII character as \\uXXXX, U+2028 and U+2029 among them."""
    text = json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def search_tokens(content):
    """What the front page needs of every feature whether or not its page is in memory: the
    integration features' rates (None: dead) and each feature's context tokens, for the search."""
    def tokens(page):
        contexts = page["top"] + page.get("weaker", []) if page else []
        return sorted({content["texts"][str(w)][pos] for w, pos, _ in contexts})
    return {"rates": [page["rate"] if page else None for page in content["integration"]],
            "find": {"int": [tokens(page) for page in content["integration"]],
                     "id": [tokens(page) for page in content["identity"]]}}


def page_html(content, chunked=None):
    """The whole page: page_template() with the content embedded; with chunked (a folder name
    beside the page), the feature pages are left out, read from that folder's files when shown."""
    page = {**content, **search_tokens(content)}
    script_src = "'unsafe-inline'"
    if chunked is not None:
        page.update(identity=None, integration=None, chunked=chunked, chunk=CHUNK,
                    n={"id": len(content["identity"]), "int": len(content["integration"])})
        script_src += " 'self' file:"  # the data files beside the page; still no network
    return page_template().replace("/*SCRIPT_SRC*/", script_src, 1).replace(
        "/*DATA*/", embedded_json(page), 1)


def write_browser(path, content, budget=BUDGET):
    """browser.html, written whole or not at all; past `budget` bytes, its feature pages go into
    files of CHUNK pages in browser_data/ beside it (read with <script> elements, which work on
    file://, where fetch() does not). Returns the files written."""
    path = Path(path)
    folder = path.with_name(path.stem + "_data")
    html = page_html(content)
    files = [path]
    if len(html.encode()) > budget:
        fresh = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir()
        for kind, pages in (("id", content["identity"]), ("int", content["integration"])):
            for start in range(0, len(pages), CHUNK):
                text = f"dualencChunk({json.dumps(kind)}, {start}, " \
                       f"{embedded_json(pages[start:start + CHUNK])});\n"
                (fresh / f"{kind}-{start}.js").write_text(text, encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        fresh.rename(folder)
        files += sorted(folder.iterdir())
        html = page_html(content, chunked=folder.name)
    else:
        shutil.rmtree(folder, ignore_errors=True)  # a larger page's files, now stale
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)
    return files


# ----------------------------------------------------------------------------- a run's page

def write_page(folder, tokenizer, joint, secondary, data, stimulus=None, cells=(), summary=""):
    """folder/browser.html (with its data files past BUDGET) from models and data in memory: the
    joint model, its secondary SAE, the held-out tokens (data.x_eval, data.eval_keep,
    data.eval_ids), and the stimulus prompts' codes (A_PG, cell_P, selection_P) with the cells'
    names when given. Returns what was written: {"bytes", "files"}."""
    files = write_browser(Path(folder) / "browser.html",
                          content(tokenizer, joint, secondary, data, stimulus, cells, summary))
    return {"bytes": sum(f.stat().st_size for f in files), "files": len(files)}
