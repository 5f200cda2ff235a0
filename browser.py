"""browser: a run's features on one page that works offline, browser.html.

`python replicate.py --eval-only RUN_DIR --browser` writes it beside the run's results; it opens
with a double click and asks nothing of the network. Each integration feature (a feature of stage
3's secondary SAE, stages34.py) shows the pairs of identity features it reads through the NFM's
pair term (stages34.pair_reading, METHOD.md §16), its top contexts and a few weaker ones, its
activation histogram and its 2 x 2 cell means on the stimulus prompts; each identity feature (the
joint model's SAE) its top contexts, decoder norm, firing rate and the integration features that
read it. The front page has the joint model's decoder-norm histogram: a bar lists its features.
Sections, in the order data flows:
  codes      the held-out tokens' sparse codes, grouped by feature
  features   what a page shows of an identity or an integration feature
  page       the HTML: the data embedded as escaped JSON, no network (a Content-Security-Policy),
             drawn by a small script, one feature at a time
  a run's page  add_to_report: a finished run's joint model, its secondary SAE and the stimuli
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
import runner
import stages34 as s34
import stats as st

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
    prompts' codes (A_PG, cell_P, half_P), its 2 x 2 cell means on each half."""
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
            A_PG, cell_P, half_P = stimulus
            page["cells"] = {"selection": cell_summary(A_PG[half_P, g], cell_P[half_P]),
                             "test": cell_summary(A_PG[~half_P, g], cell_P[~half_P])}
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
    stimulus prompts' codes (A_PG, cell_P, half_P) and the cells' names when given."""
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
    """The whole page: PAGE with the content embedded; with chunked (a folder name beside the
    page), the feature pages are left out, read from that folder's files when shown."""
    page = {**content, **search_tokens(content)}
    script_src = "'unsafe-inline'"
    if chunked is not None:
        page.update(identity=None, integration=None, chunked=chunked, chunk=CHUNK,
                    n={"id": len(content["identity"]), "int": len(content["integration"])})
        script_src += " 'self' file:"  # the data files beside the page; still no network
    return PAGE.replace("/*SCRIPT_SRC*/", script_src, 1).replace("/*DATA*/", embedded_json(page), 1)


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


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; script-src /*SCRIPT_SRC*/; style-src 'unsafe-inline'">
<title>dualenc features</title>
<style>
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#222}
header{position:sticky;top:0;background:#f4f4f4;padding:8px 16px;border-bottom:1px solid #ddd}
header a{font-weight:600;color:#222;text-decoration:none;margin-right:16px}
input{width:28em;padding:4px}
main{padding:8px 16px;max-width:1100px}
a{color:#1358a8}
.ctx{font-family:ui-monospace,monospace;white-space:pre-wrap;margin:2px 0}
.tok{border-radius:2px}
.bar{fill:#7a9cc6;cursor:pointer}.bar:hover{fill:#1358a8}
table{border-collapse:collapse}td,th{padding:2px 8px;text-align:right}
.dead{color:#a33}.small{color:#666;font-size:12px}
</style></head>
<body><header><a href="#">dualenc features</a>
<input id="q" placeholder="feature number, or a token in its contexts" aria-label="search"></header>
<main id="main"></main>
<script id="data" type="application/json">/*DATA*/</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const main = document.getElementById("main"), q = document.getElementById("q");
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const k of kids) e.append(k instanceof Node ? k : String(k));
  return e;
}
function show(s) { return s.replace(/\\n/g, "\\u21b5"); }
function context(c, largest) {
  const [w, p, level] = c, row = D.texts[w], div = el("div", {class: "ctx"});
  for (let i = Math.max(0, p - D.width); i <= Math.min(row.length - 1, p + D.width); i++) {
    const span = el("span", {class: "tok"}, show(D.vocab[row[i]]));
    if (i === p) {
      span.style.background = "rgba(220,80,40," + (0.15 + 0.85 * level / D.levels) + ")";
      span.title = (largest * level / D.levels).toPrecision(3);
    }
    div.append(span);
  }
  return div;
}
function link(kind, f) { return el("a", {href: "#" + kind + "-" + f}, kind + " " + f); }
function histogram(counts, width, height, onbar) {
  // parsed as HTML, the svg element gets its namespace without the page naming any URL
  const box = el("div", {}), top = Math.max(1, ...counts), w = width / Math.max(1, counts.length);
  box.innerHTML = '<svg width="' + width + '" height="' + height + '"></svg>';
  const svg = box.firstChild;
  counts.forEach((n, b) => {
    const h = n ? Math.max(1, (height - 2) * n / top) : 0;
    svg.insertAdjacentHTML("beforeend", '<rect class="bar" x="' + b * w + '" y="' + (height - h) +
      '" width="' + Math.max(1, w - 1) + '" height="' + h + '" data-bin="' + b +
      '" data-count="' + n + '"></rect>');
    if (onbar) svg.lastChild.addEventListener("click", () => onbar(b));
  });
  return svg;
}
function matches(kind, f, text) {  // a number is a feature's; other text, a token of its contexts
  if (/^\\d+$/.test(text)) return String(f) === text;
  return D.find[kind][f].some(i => D.vocab[i].toLowerCase().includes(text));
}
if (D.chunked) {  // the feature pages live in data files beside the page, read when shown
  D.identity = new Array(D.n.id);
  D.integration = new Array(D.n.int);
}
window.dualencChunk = (kind, start, pages) => {
  const into = kind === "int" ? D.integration : D.identity;
  pages.forEach((page, i) => { into[start + i] = page; });
};
function need(kind, f, draw) {
  const pages = kind === "int" ? D.integration : D.identity;
  if (!D.chunked || pages[f] !== undefined || !(f >= 0 && f < pages.length)) { draw(); return; }
  const s = document.createElement("script"), start = Math.floor(f / D.chunk) * D.chunk;
  s.src = D.chunked + "/" + kind + "-" + start + ".js";
  s.onload = draw;
  s.onerror = () => main.replaceChildren(el("p", {class: "dead"}, "cannot read " + s.src));
  document.body.append(s);
}
function front() {
  const h = D.norms, binList = el("div", {id: "bin"}), list = el("div", {id: "list"});
  main.replaceChildren(el("p", {class: "small"}, D.summary),
    el("h2", {}, "Identity features: the joint model's decoder norms"),
    el("p", {class: "small"}, "features per bin of decoder norm, from " + h.edges[0].toFixed(3) +
      " to " + h.edges[h.edges.length - 1].toFixed(3) + "; a bar lists its features"),
    histogram(h.counts, 800, 120, b => {
      const feats = h.members[b];
      binList.replaceChildren(el("p", {}, feats.length + " features with norm in [" +
        h.edges[b].toFixed(3) + ", " + h.edges[b + 1].toFixed(3) + ")"));
      const ul = el("div", {id: "members"});
      for (const f of feats) ul.append(el("span", {class: "member"}, link("id", f), " "));
      binList.append(ul);
    }), binList, el("h2", {}, "Integration features, most active first"), list);
  const text = q.value.trim().toLowerCase();
  const order = D.rates.map((r, g) => [r === null ? -1 : r, g]).sort((a, b) => b[0] - a[0]);
  let shown = 0;
  for (const [rate, g] of order) {
    if (rate < 0) continue;
    if (text && !matches("int", g, text)) continue;
    if (++shown > 200) { list.append(el("p", {}, "... more: search to narrow")); break; }
    list.append(el("div", {class: "entry"}, link("int", g),
      "  fires on " + (100 * rate).toFixed(3) + " %"));
  }
  if (!shown) list.append(el("p", {}, "no integration feature matches"));
  if (text) {
    const found = D.find.id.map((_, f) => f).filter(f => matches("id", f, text)).slice(0, 200);
    list.append(el("h2", {}, "Identity features matching"), found.length ?
      el("div", {id: "identity-found"}, ...found.flatMap(f => [link("id", f), " "])) :
      el("p", {}, "no identity feature matches"));
  }
  const dead = D.rates.filter(r => r === null).length;
  if (dead) list.append(el("p", {class: "dead"}, dead + " integration features never fire " +
    "on the held-out tokens (dead)"));
}
function cells(c) {
  const t = el("table", {}, el("tr", {}, el("th", {}, "half"),
    ...D.cells.map(n => el("th", {}, n))));
  for (const half of ["selection", "test"]) {
    t.append(el("tr", {}, el("td", {}, half), ...c[half].map(([m, lo, hi]) =>
      el("td", {}, m.toPrecision(3) + " [" + lo.toPrecision(3) + ", " + hi.toPrecision(3) + "]"))));
  }
  return t;
}
function integration(g) {
  const p = D.integration[g];
  main.replaceChildren(el("h2", {}, "Integration feature " + g));
  if (p === undefined) { main.append(el("p", {}, "no such feature")); return; }
  if (!p) {
    main.append(el("p", {class: "dead"}, "dead: never fires on the held-out tokens"));
    return;
  }
  main.append(el("p", {}, "fires on " + (100 * p.rate).toFixed(3) + " % of held-out tokens; " +
    "largest activation " + p.max), histogram(p.hist, 480, 80),
    el("p", {class: "small"}, "activations from 0 to " + p.max + " in " + p.hist.length + " bins"),
    el("h3", {}, "Identity pairs it reads (mean term over its top contexts)"));
  const t = el("table", {id: "pairs"},
    el("tr", {}, el("th", {}, "pair"), el("th", {}, "mean term")));
  for (const [i, j, m] of p.pairs) t.append(el("tr", {}, el("td", {}, link("id", i), " x ",
    link("id", j)), el("td", {}, m.toPrecision(3))));
  main.append(t, el("p", {class: "small"}, "constant " + p.const + "; pre-activation, mean over " +
    "those contexts " + p.pre));
  if (p.cells) {
    main.append(el("h3", {}, "2 x 2 cell means on the stimulus prompts"), cells(p.cells));
  }
  main.append(el("h3", {}, "Top contexts"), ...p.top.map(c => context(c, p.max)));
  if (p.weaker.length) main.append(el("h3", {}, "Weaker contexts"),
    ...p.weaker.map(c => context(c, p.max)));
}
function identity(f) {
  const p = D.identity[f];
  main.replaceChildren(el("h2", {}, "Identity feature " + f));
  if (p === undefined) { main.append(el("p", {}, "no such feature")); return; }
  main.append(el("p", {}, "decoder norm " + p.norm + "; fires on " + (100 * p.rate).toFixed(3) +
    " % of held-out tokens"));
  if (!p.top.length) {
    main.append(el("p", {class: "dead"}, "dead: never fires on the held-out tokens"));
  }
  else main.append(el("h3", {}, "Top contexts"), ...p.top.map(c => context(c, p.max)));
  main.append(el("h3", {}, "Integration features that read it"),
    p.used_by.length ? el("div", {}, ...p.used_by.flatMap(g => [link("int", g), " "])) :
    el("p", {}, "none"));
}
function route() {
  const m = location.hash.match(/^#(int|id)-(\\d+)$/);
  if (!m) front();
  else if (m[1] === "int") need("int", +m[2], () => integration(+m[2]));
  else need("id", +m[2], () => identity(+m[2]));
}
q.addEventListener("input", () => { if (location.hash) location.hash = ""; else front(); });
window.addEventListener("hashchange", route);
route();
</script></body></html>
"""


# ----------------------------------------------------------------------------- a run's page

def add_to_report(report, lm, tokenizer, joint, data, cfg, out):
    """A run's browser.html (replicate.py --eval-only RUN_DIR --browser), its size into
    report["browser"]: the run's joint model and its secondary SAE (stage 3's, trained first if the
    run has none), with each integration feature's cell means on the stimulus prompts, split into
    the halves stage 4 chose on (or, for a run without stage 4, halves drawn from cfg.seed)."""
    if (out / "secondary" / "cfg.json").exists():
        secondary = runner.load_model(out / "secondary").to(data.x_eval.device)
        pipeline = s34.IntegrationPipeline(joint, secondary).eval()
    else:
        generator = torch.Generator().manual_seed(cfg.seed)
        pipeline, _, _ = s34.stage3(lm, joint, data, cfg, out / "secondary", generator)
    design = s34.load_stimuli(s34.read_stimuli(cfg.stimuli), tokenizer)
    cell_P = design["cell_P"]
    A_PG = s34.stimulus_codes(lm, data.layer, pipeline, design,
                              s34.kept_positions(data.max_norm))
    first_seed = report.get("stage34", {}).get("per_seed", [{}])[0]  # the seed of secondary/
    chosen = first_seed.get("design", {}).get("selection_prompts")
    if chosen is None:
        half_P = st.split_halves(cell_P, torch.Generator().manual_seed(cfg.seed))
    else:
        half_P = torch.zeros(len(cell_P), dtype=torch.bool)
        half_P[chosen] = True
    summary = (f"{cfg.model}, block {data.layer}: the joint model's {joint.sae.k}-sparse code "
               f"of {joint.sae.W_dec.shape[0]:,} identity features and stage 3's "
               f"{pipeline.secondary.sae.W_dec.shape[0]:,} integration features, on "
               f"{len(data.x_eval):,} held-out tokens")
    page = content(tokenizer, joint, pipeline.secondary, data, (A_PG, cell_P, half_P),
                   design["cells"], summary)
    files = write_browser(out / "browser.html", page)
    report["browser"] = {"bytes": sum(f.stat().st_size for f in files), "files": len(files),
                         "selection_prompts": half_P.nonzero()[:, 0].tolist()}
