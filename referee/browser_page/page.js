"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const main = document.getElementById("main"), q = document.getElementById("q");
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const k of kids) e.append(k instanceof Node ? k : String(k));
  return e;
}
function show(s) { return s.replace(/\n/g, "\u21b5"); }
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
  if (/^\d+$/.test(text)) return String(f) === text;
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
  const t = el("table", {}, el("tr", {}, el("th", {}, "prompts"),
    ...D.cells.map(n => el("th", {}, n))));
  for (const set of ["selection", "test"]) {
    t.append(el("tr", {}, el("td", {}, set), ...c[set].map(([m, lo, hi]) =>
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
  const m = location.hash.match(/^#(int|id)-(\d+)$/);
  if (!m) front();
  else if (m[1] === "int") need("int", +m[2], () => integration(+m[2]));
  else need("id", +m[2], () => identity(+m[2]));
}
q.addEventListener("input", () => { if (location.hash) location.hash = ""; else front(); });
window.addEventListener("hashchange", route);
route();
