"""report: the referee's figures and tables, drawn from the report a replicate.py run builds (the
dict in its results.json). It imports runner, stats and stages34; replicate.py imports it (as rep:
its runs call that dict `report`), never the other way. Sections, in the order data flows:
  figures  plot_figures (a run folder's PNGs: runner's curves.png, decoder_norms.png, models.png,
           stages34's stage34.png, along_training.png), plot_interval (estimates with their
           intervals), plot_along_training, plot_decoder_norms, plot_models
  tables   format_report (the models table with intervals, the seed intervals, the claims table,
           as a run prints it at the end), format_along_training (the claims at each checkpoint),
           format_compare (two runs side by side, --compare)
"""

import math

import torch

from referee import runner
from referee import stages34 as s34
from referee import stats as st


# ----------------------------------------------------------------------------- figures

def plot_figures(report, out):
    """The PNGs in `out`: dualenc's training curves, and decoder squared-norm histograms (with a
    joint model), FVU / KL per model, and stages 3-4 (when run)."""
    runner.plot_curves(report["curves"], out)
    if "decoder_norms" in report["analysis"]:  # runs with a joint model
        plot_decoder_norms(report["analysis"]["decoder_norms"], out)
    plot_models(report["models"], out)
    if "stage34" in report:
        s34.plot_stage34(report["stage34"], out)
    if "along_training" in report:
        plot_along_training(report["along_training"], out)


def plot_interval(ax, x, y, ci, label):
    """A line through the estimates and a vertical bar for each interval (a percentile interval of a
    skewed figure need not contain its estimate, so no error-bar offsets)."""
    line, = ax.plot(x, y, "o-", label=label)
    bars = [(xi, c) for xi, c in zip(x, ci) if c is not None]
    if bars:
        ax.vlines([b[0] for b in bars], [b[1][0] for b in bars], [b[1][1] for b in bars],
                  color=line.get_color())


def plot_along_training(points, out):
    """along_training.png: each model's held-out FVU and spliced KL, and each claim's readings, with
    their 95 % window intervals, against token presentations (log axis); dashed: a claim's
    threshold."""
    from matplotlib.figure import Figure

    x = [p["presentations"] for p in points]
    claims = points[-1]["claims"]
    cols = 3
    fig = Figure(figsize=(5 * cols, 3.4 * (1 + math.ceil(len(claims) / cols))),
                 layout="constrained")
    axes = fig.subplots(1 + math.ceil(len(claims) / cols), cols, squeeze=False)
    for ax, metric in zip(axes[0], ("fvu", "kl")):
        for name in points[-1]["models"]:
            if name in ("sae", "sae_matched", "sequential", "joint", "joint_no_linear",
                        "joint_sae_path"):
                plot_interval(ax, x, [p["models"][name][metric] for p in points],
                              [p["models"][name]["ci"][metric] for p in points], name)
        ax.set(xscale="log", yscale="log", title=f"held-out {metric.upper()}",
               xlabel="token presentations")
        ax.legend(fontsize=7)
    axes[0][2].axis("off")
    for ax, claim in zip(axes[1:].flat, claims):
        for reading in claim["readings"]:
            rows = [(p["presentations"], r["value"], r["ci"]) for p in points
                    if (r := next(c for c in p["claims"]
                                  if c["claim"] == claim["claim"])["readings"].get(reading))
                    and r["value"] is not None]
            if rows:
                plot_interval(ax, *zip(*rows), reading)
        ax.axhline(float(claim["rule"].split()[1]), color="grey", ls="--", lw=1)
        ax.axhline(0, color="black", lw=0.5)
        ax.set(xscale="log", title=claim["claim"], xlabel="token presentations")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=7)
    for ax in list(axes[1:].flat)[len(claims):]:
        ax.axis("off")
    fig.suptitle("Along the training length: the first seed's models at log-spaced steps "
                 "(95 % window intervals)")
    fig.savefig(out / "along_training.png", dpi=100)


def plot_decoder_norms(dn, out):
    from matplotlib.figure import Figure

    edges = torch.tensor(dn["histogram_edges"])
    centres, width = ((edges[1:] + edges[:-1]) / 2).tolist(), (edges[1] - edges[0]).item()
    labels = {"sae": "SAE trained alone: W_dec", "joint_W_dec": "joint: W_dec (paper's view)",
              "joint_merged": "joint: W_dec + W_lin (merged; exact on the n_read codes the "
                              "NFM reads)"}
    fig = Figure(figsize=(7, 8), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    for ax, (key, label) in zip(axes, labels.items()):
        s = dn["summary"][key]
        ax.bar(centres, dn["histograms"][key], width=width, color="tab:blue", alpha=0.8)
        bc, dbic = dn[f"bc_{key}"], dn[f"delta_bic_{key}"]
        ax.set(ylabel="features",
               title=f"{label}\nBC {bc['value']:.2f} {st.fmt_ci(bc['ci'])}, "
                     f"delta BIC {dbic['value']:.0f} {st.fmt_ci(dbic['ci'])}, mean {s['mean']:.2f}")
    axes[-1].set_xlabel("squared decoder norm ||W_dec[i]||^2 of features that fire on held-out "
                        "tokens")
    fig.savefig(out / "decoder_norms.png", dpi=110)


def plot_models(models, out):
    from matplotlib.figure import Figure

    names = list(models)
    x = torch.arange(len(names)).tolist()
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_fvu, ax_kl = fig.subplots(1, 2)
    ax_fvu.bar(x, [models[n]["fvu"] for n in names], color="tab:blue")
    ax_fvu.set(title="Fraction of variance unexplained (held out)", ylabel="FVU")
    kl_err = [[models[n]["kl"] - models[n]["ci"]["kl"][0] for n in names],
              [models[n]["ci"]["kl"][1] - models[n]["kl"] for n in names]]
    ax_kl.bar([i - 0.2 for i in x], [models[n]["kl"] for n in names], width=0.4, yerr=kl_err,
              capsize=3, label="reconstruction spliced (95% bootstrap over windows)")
    ax_kl.bar([i + 0.2 for i in x], [models[n].get("kl_eps_random", 0) for n in names], width=0.4,
              label="epsilon-random error, same norm")
    ax_kl.set(title="KL(clean || spliced) at the next token", ylabel="KL (nats per token)")
    # room for the legend above the bars
    ax_kl.set_ylim(top=1.3 * max(models[n]["ci"]["kl"][1] for n in names))
    ax_kl.legend(loc="upper right")
    for ax in (ax_fvu, ax_kl):
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.grid(axis="y", alpha=0.3)
    fig.savefig(out / "models.png", dpi=110)


# ----------------------------------------------------------------------------- tables

def format_report(report):
    """dualenc's models table (with intervals), the seed intervals, the claims table, as printed at
    the end."""
    seeds = len(report["seeds"])
    rows = runner.format_models(report)
    if seeds > 1:
        rows.append(f"mean of {seeds} seeds; seed intervals (95%, t over seeds):")
        rows += [f"  {name:<22} fvu {st.fmt_ci(m['seed_ci']['fvu'])}  "
                 f"kl {st.fmt_ci(m['seed_ci']['kl'])}  ce {st.fmt_ci(m['seed_ci']['ce'])}"
                 for name, m in report["models"].items()]
    labels = {"paper_way": "paper's way", "fair": "fair", "matched": "param-matched"}
    rows += ["", "{:<76}{:>7}  {:<14}{:>8}{:>18}{:>18}  {}".format(
        "claim (rule)", "paper", "reading", "ours", "bootstrap 95%",
        "seeds 95%" if seeds > 1 else "", "verdict")]
    for c in report["analysis"]["claims"]:
        head = f"{c['claim']} ({c['rule']})"
        paper = "-" if c["paper"] is None else f"{c['paper']:.3f}"
        for i, (reading, r) in enumerate(c["readings"].items()):
            seed_ci = st.fmt_ci(r["seed_ci"]) if "seed_ci" in r else ""
            rows.append(f"{head if i == 0 else '':<76}{paper if i == 0 else '':>7}  "
                        f"{labels[reading]:<14}{st.fmt_num(r['value']):>8}"
                        f"{st.fmt_ci(r['ci']):>18}{seed_ci:>18}  {r['verdict']}"
                        + (f" ({r['undefined']})" if "undefined" in r else ""))
    shares = report["analysis"]["interaction_param_share"]
    name = next((n for n in ("joint", "sequential") if n in shares), None)  # none with --models sae
    if name is not None:
        rows += ["", f"design figure, not a finding: the interaction pathway is "
                 f"{shares[name]:.1%} of the {name} model's parameters (paper ~3 %), "
                 f"fixed by F, M and D"]
    rows.append(f"seeds: {', '.join(map(str, report['seeds']))}")
    if "along_training" in report:
        rows += ["", format_along_training(report["along_training"])]
    if "stage34" in report:
        rows += ["", s34.format_stage34(report["stage34"])]
    return "\n".join(rows)


def format_along_training(points):
    """Each claim's readings at each checkpoint: the figure and its verdict (+ holds, - no,
    ? unclear)."""
    mark = {"holds": "+", "no": "-", "unclear": "?"}
    rows = ["along the training length (first seed; + holds, - no, ? unclear; intervals in "
            "results.json):",
            f"{'claim, reading':<70}"
            + "".join(f"{p['presentations'] / 1e6:>10.2f}M" for p in points)]
    for claim in points[-1]["claims"]:
        for reading in claim["readings"]:
            cells = []
            for p in points:
                r = next(c for c in p["claims"]
                         if c["claim"] == claim["claim"])["readings"].get(reading)
                cells.append("-" if r is None else f"{st.fmt_num(r['value'])} {mark[r['verdict']]}")
            rows.append(f"{(claim['claim'] + ', ' + reading)[:69]:<70}"
                        + "".join(f"{c:>11}" for c in cells))
    return "\n".join(rows)


def format_compare(result):
    """--compare's table: each model's figure in run A and in run B and B - A with its paired 95 %
    interval over windows (of the seeds' mean, with several), whether 0 lies inside it; then the
    claims whose verdict differs between the runs."""
    differ = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in result["differ"].items()) or "nothing"
    rows = [f"A = {result['runs'][0]}", f"B = {result['runs'][1]}",
            f"settings that differ: {differ}",
            f"B - A at step {result['step']}, paired 95% intervals over the same window resamples "
            f"({result['resamples']}){'' if result['seeds'] == 1 else ', mean of the seeds'}:",
            f"{'model':<24}{'figure':<6}{'A':>9}{'B':>9}{'B - A':>11}{'95% (windows)':>24}"
            "  0 inside"]
    for name, figures in result["models"].items():
        for i, (figure, f) in enumerate(figures.items()):
            d = f["b_minus_a"]
            inside = d["ci"][0] <= 0 <= d["ci"][1]
            rows.append(f"{name if i == 0 else '':<24}{figure:<6}{f['a']['value']:>9.4f}"
                        f"{f['b']['value']:>9.4f}{d['value']:>11.2e}"
                        f"{'[{:.2e}, {:.2e}]'.format(*d['ci']):>24}  {'yes' if inside else 'no'}")
    changed = [c for c in result["claims"] if c["a"] != c["b"]]
    rows.append(f"claims' verdicts: {len(result['claims']) - len(changed)} of "
                f"{len(result['claims'])} the same" + ("; changed:" if changed else ""))
    rows += [f"  {c['claim']}, {c['reading']}: {c['a']} -> {c['b']}" for c in changed]
    return "\n".join(rows)
