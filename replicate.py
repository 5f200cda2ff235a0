"""replicate: the referee beside dualenc.py. Does the paper hold, and against which baseline?

dualenc.py is the method (SAE, NFM, the sequential and joint loops, their evaluation). This file
imports it and adds what a careful reviewer asks for (METHOD.md §9, §13): baselines with the method's
care, intervals over windows and seeds, the paper's claims each read three ways with a verdict,
the decoder-norm analysis, figures, and the paper's stages 3-4. `python replicate.py` runs all of it;
it takes every flag of dualenc.py and the referee's own. Sections, in the order data flows:
  config        Config: dualenc's settings and the referee's (--seeds, --n-boot, --stage34, --stimuli, --sae, --store)
  store         ActivationStore: block outputs on disk, extracted once per key, resumable; Tokens, load_data
  baselines     the models a reviewer adds (sae_matched, joint_no_linear), the variants evaluated (the
                joint model's own SAE path, the pathway ablations), evaluate_variants (sums per window)
  statistics    paired bootstrap over windows (or features), seed intervals, the holds / no / unclear rule
  analyses      parameter counts, contributions, decoder norms, the claims table
  stages 3-4    the secondary SAE on the NFM's hidden layer (integration features), the 2 x 2 stimulus
                design, held-out contrasts with permutation tests, the intervention and its controls
  your own SAE  read_saelens, import_sae: study a SAELens TopK SAE instead of training one
  report        run (the whole replication), figures, tables, main

Dimension letters as in dualenc.py, and P prompts, R bootstrap resamples, S seeds.
"""

import fcntl
import functools
import hashlib
import json
import math
import os
import resource
import subprocess
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import dualenc as de


# ----------------------------------------------------------------------------- config

@dataclass
class Config(de.Config):
    """dualenc's settings and the referee's."""

    STAGES = ("sae", "sae_matched", "sequential", "joint", "joint_no_linear")  # the models trained, in order
    RUN_FLAGS = (*de.Config.RUN_FLAGS, "stage34", "stimuli", "store")
    POSITIVE = (*de.Config.POSITIVE, "seeds", "n_boot")
    PROG = "replicate.py"

    seeds: int = de.opt(1, "train every model this many times, with seeds seed, seed+1, ... (the data split stays)")
    n_boot: int = de.opt(1000, "bootstrap resamples behind every 95%% interval")
    stage34: bool = de.opt(False, "also run the paper's stages 3-4 on the joint model: integration features "
                           "(secondary SAE) and the 2 x 2 intervention with controls (§13); with --eval-only "
                           "RUN_DIR, added to a finished run, its evaluation as it stands")
    stimuli: str | None = de.opt(None, "2 x 2 stimulus design for --stage34, JSON like stimuli.json (the default)",
                                 "PATH")
    sae: str | None = de.opt(None, "study an existing SAELens TopK SAE (folder with cfg.json and "
                             "sae_weights.safetensors): no SAE training, the NFM learns its residual", "SAE_DIR")
    store: str = de.opt("runs/activations", "folder of activation stores, one per model, layer, text, tokens and "
                        "ctx: extracted once, reused by every run with the same key", "DIR")
    store_dtype: str = de.opt("float32", "activations on disk: float32, or float16 (half the disk)", "{float32,float16}")
    models: str | None = de.opt(None, "the models to train, comma-separated (default: all five; sequential brings "
                                "sae, whose SAE it builds on); --combine joins runs that each trained some", "NAMES")
    checkpoints: int = de.opt(0, "also evaluate every model at this many log-spaced steps, the first near 0.2 M "
                              "token presentations (or a tenth of the run), the last the end: intervals and claims "
                              "at each (0: the end only)")
    combine: str | None = de.opt(None, "run folders, comma-separated, that trained different --models with "
                                 "otherwise the same settings: one report of all their models, paired, with "
                                 "intervals and claims at every checkpoint, into --out", "DIRS")

    def __post_init__(self):
        super().__post_init__()
        if self.store_dtype not in ("float32", "float16"):
            raise de.DualencError(f"--store-dtype must be float32 or float16, got {self.store_dtype!r}")
        if self.models is not None and not set(self.models.split(",")) <= set(self.STAGES):
            raise de.DualencError(f"--models takes some of {', '.join(self.STAGES)}, got {self.models!r}")
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
            raise de.DualencError(f"--sae brings its own dictionary size and k (the NFM reads its top k/2); "
                                  f"{', '.join(sorted('--' + k.replace('_', '-') for k in from_sae))} do not apply")
        if given.get("combine") and given.keys() - {"combine", "out"}:
            raise de.DualencError("--combine takes the runs' own settings; only --out may be given with it")


# ----------------------------------------------------------------------------- activation store

class ActivationStore:
    """Block-L outputs of a corpus's windows on disk, for runs larger than RAM (§15), in a folder named
    by its key (model, layer, dtype and a hash of the token windows, so text, token count and ctx):
        acts.bin   [N, T, D] in `dtype` (float32, or float16 at half the disk), window after window
        norms.bin  [N, T] float32 norms of the float32 outputs (the outlier threshold, §2)
        meta.json  the key, the shape, and how many windows are written (written after their bytes)
    Extraction resumes at the last recorded window and gives the same bytes as an uninterrupted one.
    A folder whose meta or file sizes do not match is refused in one line, never read."""

    def __init__(self, root, key, shape_NTD):
        self.key, self.shape = key, tuple(shape_NTD)
        self.folder = Path(root) / hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.dtype = getattr(torch, key["dtype"])
        self.row_bytes = shape_NTD[2] * self.dtype.itemsize
        self.done = self.recorded()

    def recorded(self):
        """The windows meta.json records as written, once the meta and the files' sizes are checked: a
        finished store must have exactly its size, an unfinished one at least what it records."""
        meta = self.folder / "meta.json"
        if not meta.exists():
            return 0
        try:
            saved = json.loads(meta.read_text())
            ok = saved["key"] == self.key and saved["shape"] == list(self.shape)
            done = saved["windows_done"]
            actual = {name: (self.folder / name).stat().st_size for name in self.sizes(0)}
        except (OSError, ValueError, KeyError) as e:
            raise de.DualencError(f"activation store {self.folder} is unreadable ({de.one_line(e)}); delete it") from None
        if not ok:
            raise de.DualencError(f"activation store {self.folder} holds another key than this run's; delete it")
        for name, size in self.sizes(done).items():
            if actual[name] < size or (done == self.shape[0] and actual[name] != size):
                raise de.DualencError(f"activation store {self.folder} has {actual[name]:,} bytes in {name} where "
                                      f"{size:,} are recorded; delete it to rebuild")
        return done

    def sizes(self, n_windows):
        T = self.shape[1]
        return {"acts.bin": n_windows * T * self.row_bytes, "norms.bin": n_windows * T * 4}

    @property
    def complete(self):
        return self.done == self.shape[0]

    def extract(self, lm, windows_NT, layer):
        """Fill the store, holding its lock: a second process extracting the same key waits, then
        finds it done (or resumes where the first stopped)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"another process is extracting {self.folder}; waiting for it", file=sys.stderr)
                fcntl.flock(lock, fcntl.LOCK_EX)
            self.done = self.recorded()
            self.write_windows(lm, windows_NT, layer)

    @torch.no_grad()
    def write_windows(self, lm, windows_NT, layer, batch_size=16):
        """Windows self.done on, batch_size at a time (the batches of an uninterrupted extraction, so the
        same bytes), each written at its own offset and flushed before meta.json counts it. A full disk
        stops with one line; the store then reads as unfinished."""
        T, files = self.shape[1], {}
        try:
            for name, size in self.sizes(self.done).items():
                files[name] = os.open(self.folder / name, os.O_RDWR | os.O_CREAT)
                os.truncate(files[name], size)  # bytes written after the last record are dropped
            for i in tqdm(range(self.done, len(windows_NT), batch_size), desc="extract to store", leave=False):
                acts_BTD = de.extract_activations(lm, windows_NT[i:i + batch_size], layer, batch_size)
                os.pwrite(files["acts.bin"], acts_BTD.to(self.dtype).cpu().numpy().tobytes(), i * T * self.row_bytes)
                os.pwrite(files["norms.bin"], acts_BTD.norm(dim=-1).cpu().numpy().tobytes(), i * T * 4)
                for fd in files.values():
                    os.fsync(fd)
                self.done = min(i + batch_size, len(windows_NT))
                de.write_json(self.folder / "meta.json", {"key": self.key, "shape": list(self.shape),
                                                          "windows_done": self.done})
        except OSError as e:
            raise de.DualencError(f"writing the activation store {self.folder} failed at window {self.done}: "
                                  f"{e.strerror or e} (free space and run again: it resumes there)") from None
        finally:
            for fd in files.values():
                os.close(fd)

    def norms(self):
        """[N, T] float32."""
        return torch.from_file(str(self.folder / "norms.bin"), size=self.shape[0] * self.shape[1]).view(self.shape[:2])

    def read(self, starts, n_rows):
        """n_rows consecutive tokens (rows of D) from each flat token index in `starts` (window * T +
        position): [len(starts), n_rows, D] float32. Read with preadv into one buffer, not mapped: the
        page cache holds the file, not this process."""
        nbytes = n_rows * self.row_bytes
        buf = bytearray(len(starts) * nbytes)
        view = memoryview(buf)
        with open(self.folder / "acts.bin", "rb") as f:
            for i, start in enumerate(starts):
                if os.preadv(f.fileno(), [view[i * nbytes:(i + 1) * nbytes]], int(start) * self.row_bytes) != nbytes:
                    raise de.DualencError(f"activation store {self.folder} is truncated; delete it to rebuild")
        return torch.frombuffer(buf, dtype=self.dtype).view(len(starts), n_rows, self.shape[2]).float()

    def windows(self, w_N):
        """The given windows' activations, [len(w_N), T, D] float32."""
        T = self.shape[1]
        return self.read([int(w) * T for w in w_N], T)

    def rows(self, rows_B):
        """Tokens (flat indices window * T + position) as [B, D] float32."""
        return self.read(rows_B, 1)[:, 0]


class Tokens:
    """Some tokens of a store, z-scored on read: the training set that fit() samples its batches from
    and the held-out set evaluated in batches, with the tensor methods they use (len, [idx], shape,
    device, split)."""

    def __init__(self, store, rows_N, mean_D, std_D):
        self.store, self.rows_N, self.mean_D, self.std_D = store, rows_N, mean_D, std_D
        self.shape, self.device = (len(rows_N), store.shape[2]), mean_D.device

    def __len__(self):
        return len(self.rows_N)

    def __getitem__(self, idx_B):
        x_BD = self.store.rows(self.rows_N[idx_B.cpu()].tolist()).to(self.device)
        return (x_BD - self.mean_D) / self.std_D

    def split(self, n):
        return (self[torch.arange(i, min(i + n, len(self)))] for i in range(0, len(self), n))


def token_rows(windows_W, keep_NT):
    """Flat indices (window * T + position) of the kept tokens of the given windows, in their order."""
    T = keep_NT.shape[1]
    return (windows_W[:, None] * T + torch.arange(T))[keep_NT[windows_W]]


def streamed_moments(store, windows_W, keep_NT, chunk=64):
    """Per-dimension mean and std (unbiased, as dualenc.fit_normalisation) of the kept tokens of the
    given windows, in one streaming pass over them in float64."""
    n, s_D, ss_D = 0, 0.0, 0.0
    for i in range(0, len(windows_W), chunk):
        w = windows_W[i:i + chunk].sort().values
        x_ND = store.windows(w.tolist())[keep_NT[w]].double()
        n, s_D, ss_D = n + len(x_ND), s_D + x_ND.sum(0), ss_D + x_ND.square().sum(0)
    mean_D = s_D / n
    return mean_D.float(), ((ss_D - n * mean_D.square()) / (n - 1)).clamp_min(0).sqrt().float().clamp_min(1e-6)


LOADING_ONLY = ("_name_or_path", "quantization_config", "transformers_version", "torch_dtype", "dtype", "_commit_hash")


def store_key(cfg, lm, layer, windows_NT):
    """What the activations depend on: the model (its config, without what only says how it was loaded:
    a GGUF file and its cached de-quantised copy are one model, and its weights' fingerprint), the
    layer, the dtype on disk and the token windows."""
    config = {k: v for k, v in lm.config.to_dict().items() if k not in LOADING_ONLY}
    return {"model": cfg.model, "config": hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
            "weights": weights_fingerprint(lm), "layer": layer, "dtype": cfg.store_dtype,
            "windows": hashlib.sha1(windows_NT.numpy().tobytes()).hexdigest(), "shape_NT": list(windows_NT.shape)}


def weights_fingerprint(lm):
    """sha1 of the LM's parameters and buffers in name order (about a second for SmolLM2): a model
    folder overwritten by another checkpoint of the same architecture never reads the first's store."""
    h = hashlib.sha1()
    for name, t in sorted(lm.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def load_data(cfg, layer, device):
    """dualenc.load_data with the activations in a store (ActivationStore): extracted once per key and
    reused, the training and held-out tokens read from disk batch by batch (Tokens), so that memory
    does not grow with the number of tokens.
    The same split as dualenc's: windows shuffled by cfg.seed, the first 90 % train; massive norms over
    cfg.outlier_factor x the training median and position 0 dropped; z-scored with training statistics."""
    text = de.read_text(cfg.text)
    lm, tokenizer = de.load_lm(cfg.model, device)
    windows_NT = de.make_windows(tokenizer, text, cfg.tokens, cfg.ctx)
    N, T = windows_NT.shape
    store = ActivationStore(cfg.store, store_key(cfg, lm, layer, windows_NT), (N, T, lm.config.hidden_size))
    if not store.complete:
        store.extract(lm, windows_NT, layer)
    else:
        print(f"activations from the store {store.folder}", file=sys.stderr)
    perm_N = torch.randperm(N, generator=torch.Generator().manual_seed(cfg.seed))
    n_train = int(0.9 * N)
    train_W, eval_W = perm_N[:n_train], perm_N[n_train:]
    norms_NT = store.norms()
    max_norm = cfg.outlier_factor * norms_NT[train_W][:, 1:].median().item()
    keep_NT = de.keep_mask(norms_NT, max_norm)
    mean_D, std_D = (t.to(device) for t in streamed_moments(store, train_W, keep_NT))
    n_splice = max(1, min(len(eval_W), cfg.splice_tokens // cfg.ctx))
    data = {"x_train": Tokens(store, token_rows(train_W, keep_NT), mean_D, std_D),
            "x_eval": Tokens(store, token_rows(eval_W, keep_NT), mean_D, std_D),
            "mean": mean_D, "std": std_D, "keep": keep_NT, "max_norm": max_norm,
            "eval_window": keep_NT[eval_W].nonzero()[:, 0], "n_eval_windows": len(eval_W),
            "n_massive": int((norms_NT[:, 1:] > max_norm).sum()), "layer": layer,
            "n_blocks": len(de.decoder_blocks(lm)), "n_windows": N, "splice_ids": windows_NT[eval_W[:n_splice]],
            "splice_keep": keep_NT[eval_W[:n_splice]], "splice_acts": store.windows(eval_W[:n_splice].tolist()).to(device)}
    de.describe_data(data, cfg)
    return lm, tokenizer, data


# ----------------------------------------------------------------------------- baselines

VARIANTS = {"sae": ("sae", ()), "sae_matched": ("sae_matched", ()), "sequential": ("sequential", de.PATHWAYS),
            "joint": ("joint", de.PATHWAYS), "joint_sae_path": ("joint", ()), "joint_linear_only": ("joint", ("linear",)),
            "joint_interaction_only": ("joint", ("interaction",)),
            "joint_no_linear": ("joint_no_linear", ("interaction",))}  # name -> (model, NFM pathways on)


def variants(models):
    """Every reconstruction that is evaluated: name -> (model, NFM pathways switched on), for the
    models that were trained (with --sae, only sae and sequential).
    joint_sae_path is the paper's "SAE" baseline (§9.1), sae_matched the parameter-matched one (§9.5);
    the rest are the §9.3 ablations."""
    return {name: (models[model], paths) for name, (model, paths) in VARIANTS.items() if model in models}


ABLATIONS = ("joint_linear_only", "joint_interaction_only")  # the joint model with one pathway zeroed (§9.3)


def evaluate_variants(lm, evaluated, data, generator):
    """Every variant {name: (model, pathways)} evaluated the same way (§6), kept as sums per window so
    that each figure can be recomputed on bootstrap resamples of the windows (statistics section):
      over the held-out windows: sum ||x - x_hat||^2 per variant ("sse"); shared: token counts and
        sum ||x - mean(x)||^2 (MSE and centred FVU)
      over the spliced windows: sums of KL and next-token NLL with the variant's reconstruction spliced,
        and of KL with its epsilon-random twin; shared: clean and zero-ablation NLL, token counts.
    One splice_metrics call, so the clean pass (and the zero-ablation) serves all of them. The pathway
    ablations get no epsilon-random twin: their pathology ratio enters no claim, and each splice pass
    costs as much as the rest of a variant's evaluation."""
    x_ND = data["x_eval"]
    mean_D = sum(x_BD.sum(0) for x_BD in x_ND.split(4096)) / len(x_ND)  # batched: x_ND may live on disk
    replacements = {"zero": torch.zeros_like}
    for name, (model, paths) in evaluated.items():
        replacements[name] = de.spliced(model, paths)
        if name not in ABLATIONS:
            replacements[name + "/eps"] = de.spliced(model, paths, eps_generator=generator)
    m = de.splice_metrics(lm, data["splice_ids"], data["layer"], replacements, data["splice_keep"], data["splice_acts"])
    kl, nll = {k: v.double().sum(-1) for k, v in m["kl"].items()}, {k: v.double().sum(-1) for k, v in m["nll"].items()}
    shared = {"tokens": window_sums(torch.ones(len(x_ND)), data),
              "sst": window_sums(torch.cat([(x_BD - mean_D).square().sum(-1) for x_BD in x_ND.split(4096)]), data),
              "kl_tokens": m["kl_mask"].sum(-1).double(), "nll_tokens": m["nll_mask"].sum(-1).double(),
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
    """Where a seed's model lives in the run folder: the first seed's at <name>/, others at seedS/<name>/."""
    return name if seed == first_seed else f"seed{seed}/{name}"


def matched_features(d_model, n_params):
    """The dictionary size at which a TopK SAE (2 F D + F + D parameters) has n_params parameters (§9.5)."""
    return round((n_params - d_model) / (2 * d_model + 1))


def recipes(cfg, data):
    """dualenc's models and the reviewer's, in training order (name -> (make, train), as dualenc.recipes):
    sae_matched, a TopK SAE with the same k widened to the joint model's parameter count (§9.5), and
    joint_no_linear, the joint model without the NFM's linear term (§9.3). The same seed, data, batches
    and steps as the method's models. With --sae, the imported SAE stands in for "sae"."""
    def matched(done):
        joint_params = de.n_params(de.build(cfg, data, nfm="linear"))
        return de.build(cfg, data, n_features=matched_features(data["x_train"].shape[1], joint_params))

    every = {**de.recipes(cfg, data), "sae_matched": (matched, de.train_sae),
             "joint_no_linear": (lambda done: de.build(cfg, data, nfm="interaction"), de.train_joint)}
    return {name: every[name] for name in cfg.model_names()}


# ----------------------------------------------------------------------------- statistics

def bootstrap_weights(n, n_boot, generator):
    """[1 + R, n] float64: row 0 all ones (the estimate itself), row r how often each of the n units
    (windows, or features) is drawn in resample r. A sum over units becomes a matrix product, and one
    matrix serves every model, so the resamples are paired across models (§9.6)."""
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
    """mean +- t sd / sqrt(S) over S seeds: the spread that training (initialisation, batch order) adds."""
    v = torch.as_tensor(values, dtype=torch.float64)
    half = t_quantile((1 + level) / 2, len(v) - 1) * v.std() / len(v) ** 0.5
    return [(v.mean() - half).item(), (v.mean() + half).item()]


def summarise(samples_SR):
    """A figure measured on S seeds, each on 1 + R bootstrap resamples (row 0 the estimate):
    its mean over seeds, the bootstrap interval of that mean (resamples paired across seeds), and with
    S > 1 the seed interval and each seed's value. The two intervals are shown side by side, never merged."""
    samples_SR = torch.as_tensor(samples_SR, dtype=torch.float64).reshape(-1, samples_SR.shape[-1])
    mean_R = samples_SR.mean(0)
    out = {"value": mean_R[0].item(), "ci": interval(mean_R[1:])}
    if len(samples_SR) > 1:
        out.update(seed_ci=seed_interval(samples_SR[:, 0]), per_seed=samples_SR[:, 0].tolist())
    return out


def across(per_seed, figure):
    """summarise figure(seed's samples) over every seed."""
    return summarise(torch.stack([figure(s) for s in per_seed]))


def verdict(summary, threshold, above):
    """holds when every interval of `summary` lies on the rule's side of the threshold (>= when above,
    <= otherwise), no when every interval lies wholly on the other side, unclear otherwise."""
    if summary["ci"] is None:  # an undefined figure (a ratio over a denominator that may be 0)
        return "unclear"
    cis = [summary["ci"]] + ([summary["seed_ci"]] if "seed_ci" in summary else [])
    meets = [lo >= threshold if above else hi <= threshold for lo, hi in cis]
    misses = [hi < threshold if above else lo > threshold for lo, hi in cis]
    return "holds" if all(meets) else "no" if all(misses) else "unclear"


def window_sums(values_N, data):
    """A per-token figure of the held-out tokens, summed per held-out window: [n_eval_windows]."""
    sums = torch.zeros(data["n_eval_windows"], dtype=torch.float64, device=values_N.device)
    return sums.index_add_(0, data["eval_window"].to(values_N.device), values_N.double()).cpu()


def model_stats(sums, shared, w_eval, w_splice, d_model):
    """Every variant's figures (§6) on every window resample: {name: {metric: [1 + R]}}, row 0 the
    figure on the windows as they are. w_eval resamples the held-out windows, w_splice the spliced ones;
    a resampled total is a weighted sum, w @ per-window sums."""
    n_nll, n_kl = w_splice @ shared["nll_tokens"], w_splice @ shared["kl_tokens"]
    n_tokens, sst = w_eval @ shared["tokens"], w_eval @ shared["sst"]
    clean_ce, zero_ce = (w_splice @ shared["clean_nll"]) / n_nll, (w_splice @ shared["zero_nll"]) / n_nll
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
              "nfm_linear": ("nfm.W_lin",), "nfm_embed": ("nfm.embed",), "nfm_mlp": ("nfm.mlp.",)}
    named = dict(model.named_parameters())
    return {g: sum(p.numel() for n, p in named.items() if n.startswith(prefixes)) for g, prefixes in groups.items()}


def params_used(model, paths):
    """Parameters a variant actually uses: the SAE, plus the NFM parts of its switched-on pathways."""
    counts = param_counts(model)
    parts = ["sae_encoder", "sae_decoder"] + (["nfm_linear"] if "linear" in paths else []) \
        + (["nfm_embed", "nfm_mlp"] if "interaction" in paths else [])
    return sum(counts[p] for p in parts)


@torch.no_grad()
def contributions(model, x_ND, batch_size=4096):
    """Per token, sum over dimensions of |linear(f)| and of |interaction(f)|: ([N], [N]). Their totals
    give each pathway's share of the NFM's output magnitude (§7; paper: 94 % / 6 %)."""
    lin, inter = [], []
    for x_BD in x_ND.split(batch_size):
        linear_BD, interaction_BD = model.nfm(*model.sae.encode(x_BD))
        lin.append(linear_BD.abs().sum(-1))
        inter.append(interaction_BD.abs().sum(-1))
    return torch.cat(lin), torch.cat(inter)


@torch.no_grad()
def firing_counts(sae, x_ND, batch_size=4096):
    """How many held-out tokens each feature is active on: [F]."""
    counts_F = torch.zeros(sae.W_dec.shape[0], dtype=torch.long, device=x_ND.device)
    for x_BD in x_ND.split(batch_size):
        vals_BK, idx_BK = sae.encode(x_BD)
        counts_F += torch.bincount(idx_BK[vals_BK > 0], minlength=len(counts_F))
    return counts_F


def weighted_moments(x, w):
    """Mean and central moments 2..4 of x [n] under weights w [..., n] that sum to n (bootstrap counts)."""
    n = x.shape[-1]
    mean = (w * x).sum(-1, keepdim=True) / n
    c = [(w * (x - mean) ** p).sum(-1) / n for p in (2, 3, 4)]
    return mean.squeeze(-1), *c


def bimodality_coefficient(x, w=None):
    """Sarle's bimodality coefficient with the sample-size correction:
        BC = (g^2 + 1) / (kappa + 3 (n-1)^2 / ((n-2)(n-3)))     g skewness, kappa excess kurtosis
    BC > 5/9 (its value for a uniform distribution) suggests two modes; a normal sample gives ~1/3. It
    cannot tell skew from two modes (an exponential sample scores 5/9 too), hence gmm_bic beside it.
    w [..., n]: bootstrap counts, one BC per row."""
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
    n points cannot resolve structure narrower than h. Taken from the sample, not a resample's weights,
    so every resample shares it. As each point's mixture density is at most 1 / (h sqrt(2 pi)), two
    Gaussians beat one (of sd s_w, the resample's) by at most n (ln(s_w / h) + 1/2) nats, whatever the
    ties a bootstrap resample piles up (about 1.7 n at n = 200, where a floor of 1e-6 sd allowed 14 n). A
    bound, not a guarantee: a resample with a big enough tie can still pass delta BIC's threshold of 10."""
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
    floor = gmm_floor(x)  # a component collapsing onto tied points gains no more than the resolution allows

    def log_joint():  # log pi_c + log N(x | mu_c, sd_c): [..., n, 2]
        return (torch.log(pi) - torch.log(sd) - 0.5 * math.log(2 * math.pi))[..., None, :] \
            - 0.5 * ((x[:, None] - mu[..., None, :]) / sd[..., None, :]) ** 2

    for _ in range(iters):
        r = torch.softmax(log_joint(), dim=-1) * w[..., None]  # responsibilities, weighted
        n_c = r.sum(-2)
        pi, mu = n_c / n, (r * x[:, None]).sum(-2) / n_c.clamp_min(1e-300)
        sd = ((r * (x[:, None] - mu[..., None, :]) ** 2).sum(-2) / n_c.clamp_min(1e-300)).sqrt().clamp_min(floor)
    loglik = (torch.logsumexp(log_joint(), dim=-1) * w).sum(-1)
    order = mu.argsort(-1)
    return {"means": mu.gather(-1, order), "stds": sd.gather(-1, order), "weights": pi.gather(-1, order),
            "loglik": loglik}


def gmm_bic(x, w=None):
    """Delta BIC = BIC(one Gaussian) - BIC(two-Gaussian mixture), BIC = p ln n - 2 ln L with p = 2 and 5
    parameters. Above 10 is strong evidence for two components (Kass & Raftery 1995). Like BC, it also
    rises for a skewed single mode, so the plain SAE's value is its control. w as in gmm2."""
    x = x.double()
    w = torch.ones_like(x) if w is None else w
    n = x.shape[-1]
    _, var, _, _ = weighted_moments(x, w)
    loglik1 = -0.5 * n * (torch.log(2 * math.pi * var) + 1)
    loglik2 = gmm2(x, w)["loglik"]
    return (2 * math.log(n) - 2 * loglik1) - (5 * math.log(n) - 2 * loglik2)


def pearson(a, b, w=None):
    """Correlation of a and b [n], under weights w [..., n] (bootstrap counts; one r per row)."""
    a, b = a.double(), b.double()
    w = torch.ones_like(a) if w is None else w
    a = a - (w * a).sum(-1, keepdim=True) / a.shape[-1]
    b = b - (w * b).sum(-1, keepdim=True) / b.shape[-1]
    return (w * a * b).sum(-1) / ((w * a * a).sum(-1) * (w * b * b).sum(-1)).sqrt()


def two_modes(fit, grid=2000):
    """Whether a fitted two-Gaussian mixture's density has two local maxima (two overlapping Gaussians
    can fit one skewed mode better than one Gaussian does, with a single peak)."""
    lo = (fit["means"] - 4 * fit["stds"]).min()
    hi = (fit["means"] + 4 * fit["stds"]).max()
    t = torch.linspace(lo.item(), hi.item(), grid, dtype=torch.float64)
    dens = (fit["weights"] / fit["stds"] * torch.exp(-0.5 * ((t[:, None] - fit["means"]) / fit["stds"]) ** 2)).sum(-1)
    peaks = (dens[1:-1] > dens[:-2]) & (dens[1:-1] > dens[2:])
    return int(peaks.sum()) >= 2


BIC_RESAMPLES = 200  # each resample is a full EM fit on every feature; 200 keep the analysis to seconds


@torch.no_grad()
def decoder_sq_norms(model, x_eval_ND):
    """The per-feature figures behind decoder_norm_analysis, for the features that fire on held-out
    tokens: ||W_dec[i]||^2, and with an NFM ||W_dec[i] + W_lin[i]||^2, ||W_lin[i]||^2, ||v_i||^2."""
    alive = firing_counts(model.sae, x_eval_ND) > 0
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
    standalone SAE, the joint model's W_dec, and the joint model's merged linear decoder W_dec + W_lin.
    The merge is exact only where the NFM reads: the linear term sees the n_read largest of the k codes
    (as the paper's code does), so x_s + linear(f) = W_dec f + W_lin f_read + b_dec, which equals
    (W_dec + W_lin) f + b_dec on those codes and W_dec f + b_dec on the others.
    Also the correlation of a feature's squared norm with its NFM share
        share_i = ||W_lin[i]||^2 / (||W_dec[i]||^2 + ||W_lin[i]||^2)
    which has ||W_dec[i]||^2 in its denominator, so a negative r is partly built in; the direct
    correlations with ||W_lin[i]||^2 and with the interaction embedding ||v_i||^2 are the controls.
    Statistics come with n_boot bootstrap resamples over features ("samples", row 0 the estimate);
    Delta BIC with BIC_RESAMPLES of them."""
    joint = norms["joint"]
    sq = {"sae": norms["sae"]["W_dec"], "joint_W_dec": joint["W_dec"], "joint_merged": joint["merged"]}
    share = joint["W_lin"] / (joint["W_dec"] + joint["W_lin"])
    w = {k: bootstrap_weights(len(v), n_boot, generator) for k, v in sq.items()}
    w["joint_merged"] = w["joint_W_dec"]  # the same features
    samples = {f"bc_{k}": bimodality_coefficient(v, w[k]) for k, v in sq.items()}
    samples.update({f"delta_bic_{k}": gmm_bic(v, w[k][:1 + BIC_RESAMPLES]) for k, v in sq.items()})
    samples.update(r_sq_norm_vs_nfm_share=pearson(sq["joint_W_dec"], share, w["joint_W_dec"]),
                   r_sq_norm_vs_W_lin_sq_norm=pearson(sq["joint_W_dec"], joint["W_lin"], w["joint_W_dec"]),
                   r_sq_norm_vs_embed_sq_norm=pearson(sq["joint_W_dec"], joint["embed"], w["joint_W_dec"]))
    hi = max(v.max().item() for v in sq.values())
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    fits = {k: gmm2(v) for k, v in sq.items()}
    return samples, {
        "alive_features": {"sae": len(sq["sae"]), "joint": len(sq["joint_W_dec"])},
        "histogram_edges": torch.linspace(0, hi, bins + 1).tolist(),
        "histograms": {k: torch.histc(v, bins, 0, hi).long().tolist() for k, v in sq.items()},
        "summary": {k: {"mean": v.mean().item(), "quantiles_5_25_50_75_95": torch.quantile(v.double(), q).tolist(),
                        "gmm2": {p: fits[k][p].tolist() for p in ("means", "stds", "weights")},
                        "gmm2_has_two_modes": two_modes(fits[k])} for k, v in sq.items()},
    }


def reduction(base, new):
    """Error reduction of `new` over `base` (§6): (err_base - err_new) / err_base."""
    return (base - new) / base


def claim_table():
    """The §8 / §7 claims, each as (claim, paper figure, threshold, above, readings). A reading maps
    one seed's samples s (s["models"][variant][metric], s["norms"][stat], s["contrib"]) to its figure, or
    is a pair (numerator, denominator) of such maps for a ratio (ratio_summary);
    the rule is figure >= threshold (above) or <= threshold. For the paper's numbers the threshold is half
    the paper's figure, in its direction. Readings: the paper's way (the joint model against its own SAE
    path, as the paper's 41.3 % is measured), fair (against an SAE trained alone with the same F, k, data
    and steps, §9.1), and matched (against an SAE widened to the joint model's parameter count, §9.5)."""
    def red(base, new, metric):
        return lambda s: reduction(s["models"][base][metric], s["models"][new][metric])

    def share(base, part):  # the share of the joint model's KL gain over base that part (nonlinear only) achieves
        def gain(model):
            return lambda s: s["models"][base]["kl"] - s["models"][model]["kl"]
        return gain(part), gain("joint")

    def stat(key):
        return lambda s: s["norms"][key]

    def paper_rule(paper):
        return paper / 2, paper > 0

    rows = [("sequential vs SAE, reconstruction error reduction", 0.23,
             {"paper_way": red("sae", "sequential", "mse"), "matched": red("sae_matched", "sequential", "mse")}),
            ("joint vs SAE, reconstruction error reduction", 0.413,
             {"paper_way": red("joint_sae_path", "joint", "mse"), "fair": red("sae", "joint", "mse"),
              "matched": red("sae_matched", "joint", "mse")}),
            ("joint vs SAE, KL reduction", 0.516,
             {"paper_way": red("joint_sae_path", "joint", "kl"), "fair": red("sae", "joint", "kl"),
              "matched": red("sae_matched", "joint", "kl")}),
            ("sequential vs SAE, KL reduction", 0.30,
             {"paper_way": red("sae", "sequential", "kl"), "matched": red("sae_matched", "sequential", "kl")}),
            ("nonlinear part alone, share of the joint model's KL gain", 0.165,
             {"paper_way": share("joint_sae_path", "joint_interaction_only"),
              "fair": share("sae", "joint_no_linear"), "matched": share("sae_matched", "joint_no_linear")}),
            ("nonlinear part alone, its own KL reduction", 0.165,
             {"paper_way": red("joint_sae_path", "joint_interaction_only", "kl"),
              "fair": red("sae", "joint_no_linear", "kl"), "matched": red("sae_matched", "joint_no_linear", "kl")}),
            ("interaction share of NFM output magnitude", 0.06, {"paper_way": lambda s: s["contrib"]["joint"]}),
            ("r(decoder squared norm, NFM share)", -0.987, {"paper_way": stat("r_sq_norm_vs_nfm_share")})]
    table = [(claim, paper, *paper_rule(paper), readings) for claim, paper, readings in rows]
    # bimodality (§7): the paper's view is the joint W_dec; "fair" is the merged, identifiable W_dec + W_lin
    table += [("joint decoder sq. norms bimodal: bimodality coef.", None, 5 / 9, True,
               {"paper_way": stat("bc_joint_W_dec"), "fair": stat("bc_joint_merged")}),
              ("joint decoder sq. norms bimodal: delta BIC, 1 vs 2 Gaussians", None, 10.0, True,
               {"paper_way": stat("delta_bic_joint_W_dec"), "fair": stat("delta_bic_joint_merged")}),
              ("SAE alone: decoder sq. norms unimodal: bimodality coef.", None, 5 / 9, False,
               {"paper_way": stat("bc_sae")}),
              ("SAE alone: decoder sq. norms unimodal: delta BIC", None, 10.0, False,
               {"paper_way": stat("delta_bic_sae")})]
    return table


def ratio_summary(per_seed, num, den):
    """summarise(num / den), or undefined (value and interval None, with the reason) when an interval of
    the denominator contains 0: the resampled ratios are then unbounded and their percentiles mean nothing."""
    d = across(per_seed, den)  # the mean over seeds, and each seed's own: a ratio is taken per seed
    for ci in [d["ci"]] + ([d["seed_ci"]] if "seed_ci" in d else []) + [interval(den(s)[1:]) for s in per_seed]:
        if ci[0] <= 0 <= ci[1]:
            return {"value": None, "ci": None,
                    "undefined": f"its denominator's 95% interval [{ci[0]:.3g}, {ci[1]:.3g}] contains 0"}
    return across(per_seed, lambda s: num(s) / den(s))


def claims(per_seed):
    """Every claim of claim_table() measured on each seed's samples: each reading's figure, its intervals
    (summarise) and its verdict (holds / no / unclear). Readings that need a model the run did not
    train are left out, and claims with no reading left."""
    out = []
    for claim, paper, threshold, above, readings in claim_table():
        row = {"claim": claim, "paper": paper, "rule": f"{'>=' if above else '<='} {threshold:.4g}", "readings": {}}
        for reading, figure in readings.items():
            try:
                s = ratio_summary(per_seed, *figure) if isinstance(figure, tuple) else across(per_seed, figure)
            except KeyError:  # a model this run did not train (with --sae: only sae and sequential)
                continue
            row["readings"][reading] = {**s, "verdict": verdict(s, threshold, above)}
        if row["readings"]:
            out.append(row)
    return out


NFM_MODELS = ("sequential", "joint")  # whose NFM output is split into linear and interaction shares


def gather_evidence(lm, models, data, eps_generator):
    """All that the statistics read of a seed's trained models, without their weights: every variant's
    sums per window and the shared ones (evaluate_variants), the NFM models' output magnitudes per
    held-out window (contributions), the per-feature norms of decoder_norm_analysis, and parameter
    counts. Runs that each trained some of the models on the same data combine by merging it."""
    evaluated = variants(models)
    sums, shared = evaluate_variants(lm, evaluated, data, eps_generator)
    contrib = {}
    for name in (n for n in NFM_MODELS if n in models):
        lin_N, inter_N = contributions(models[name], data["x_eval"])
        contrib[name] = {"linear": window_sums(lin_N, data), "interaction": window_sums(inter_N, data)}
    return {"sums": sums, "shared": shared, "contrib": contrib, "d_model": torch.tensor(data["x_eval"].shape[1]),
            "norms": {n: decoder_sq_norms(models[n], data["x_eval"]) for n in ("sae", "joint") if n in models},
            "params": {n: torch.tensor(params_used(m, paths)) for n, (m, paths) in evaluated.items()},
            "param_counts": {n: {g: torch.tensor(c) for g, c in param_counts(m).items()}
                             for n, m in models.items() if m.nfm is not None}}


def analyse(evidence, weights, generator):
    """One seed's samples for the report and the claims, from its evidence (gather_evidence): every
    variant's figures and the §7 statistics, each as a [1 + R] tensor (row 0 the estimate), and the
    decoder-norm histograms (with both the SAE and the joint model)."""
    stats, ce = model_stats(evidence["sums"], evidence["shared"], weights["eval"], weights["splice"],
                            int(evidence["d_model"]))
    contrib = {name: (weights["eval"] @ c["interaction"]) / (weights["eval"] @ (c["linear"] + c["interaction"]))
               for name, c in evidence["contrib"].items()}
    norms, norm_info = {}, None
    if {"sae", "joint"} <= evidence["norms"].keys():
        norms, norm_info = decoder_norm_analysis(evidence["norms"], weights["eval"].shape[0] - 1, generator)
    return {"models": stats, "ce": ce, "contrib": contrib, "norms": norms, "norm_info": norm_info,
            "params": {n: int(v) for n, v in evidence["params"].items()},
            "param_counts": {n: {g: int(v) for g, v in c.items()} for n, c in evidence["param_counts"].items()}}


def report_analysis(per_seed):
    """The report's models table and analysis from every seed's samples (analyse)."""
    results = {}
    for name, params in per_seed[0]["params"].items():
        metrics = {m: across(per_seed, lambda s: s["models"][name][m]) for m in per_seed[0]["models"][name]}
        results[name] = {"params": params, **{m: v["value"] for m, v in metrics.items()},
                         "ci": {m: v["ci"] for m, v in metrics.items()}}
        if len(per_seed) > 1:
            results[name].update(seed_ci={m: v["seed_ci"] for m, v in metrics.items()},
                                 per_seed={m: v["per_seed"] for m, v in metrics.items()})
    ce = {k: across(per_seed, lambda s: s["ce"][k]) for k in ("clean_ce", "zero_ce")}
    counts = per_seed[0]["param_counts"]
    analysis = {
        "interaction_share_of_nfm_output": {n: across(per_seed, lambda s: s["contrib"][n])
                                            for n in per_seed[0]["contrib"]},
        "params": counts,
        # a design figure, fixed by F, M and D before any training: shown, not judged
        "interaction_param_share": {n: (c["nfm_embed"] + c["nfm_mlp"]) / sum(c.values()) for n, c in counts.items()},
        "claims": claims(per_seed),
    }
    if per_seed[0]["norm_info"] is not None:
        analysis["decoder_norms"] = {**per_seed[0]["norm_info"],
                                     **{k: across(per_seed, lambda s: s["norms"][k]) for k in per_seed[0]["norms"]}}
    return results, ce, analysis


# ----------------------------------------------------------------------------- training length

def total_steps(cfg, n_train):
    """The steps every model trains for (dualenc.fit's count)."""
    return cfg.epochs * (n_train // cfg.batch_size)


def checkpoint_steps(cfg, n_train):
    """The steps at which every model is evaluated (cfg.checkpoints of them, none without): log-spaced
    from the step nearest 0.2 M token presentations (the default run's length) or a tenth of the run,
    whichever is earlier, to the last, on the evaluation cadence. The learning rate decays over the whole
    run, so an early checkpoint is a model part-way through its schedule, not one trained to that length."""
    steps = total_steps(cfg, n_train)
    if not cfg.checkpoints:
        return []
    first = max(1, min(round(200_000 / cfg.batch_size), steps // 10))
    spaced = torch.logspace(math.log10(first), math.log10(steps), cfg.checkpoints, dtype=torch.float64).tolist()
    inner = {max(cfg.eval_every, round(s / cfg.eval_every) * cfg.eval_every) for s in spaced[:-1]}
    return sorted({s for s in inner if s <= steps - cfg.eval_every} | {steps})  # none a cadence from the end


def saving_checkpoints(recipes, steps, folder_of, metadata, cfg, data):
    """The recipes, their training also saving the model at each of `steps` but the last (the finished
    model is the run's own) into folder_of(name) / step<N>; a resumed run keeps those already saved.
    Sequential's checkpoint at step N is an NFM trained for N steps (on the whole run's schedule) on
    the SAE of step N, not on the finished one: each checkpoint compares models of one length."""
    def saving(train, folder):
        def save(step, model):
            if step in steps[:-1]:
                de.save_model(model, folder / f"step{step}", metadata)
        return functools.partial(train, on_eval=save)

    def sequential(train):
        def train_all(model, *args, **kw):
            history = train(model, *args, **kw)
            for step in steps[:-1]:
                folder = folder_of("sequential") / f"step{step}"
                if not (folder / "cfg.json").exists():
                    early = de.build(cfg, data, sae=de.load_model(folder_of("sae") / f"step{step}").sae, nfm="linear")
                    de.train_sequential(early, data["x_train"], data["x_eval"], cfg, name=f"sequential to {step}",
                                        until=step)
                    de.save_model(early, folder, metadata)
            return history
        return train_all
    return {name: (make, sequential(train) if name == "sequential" else saving(train, folder_of(name)))
            for name, (make, train) in recipes.items()}


def checkpoint_point(step, cfg, results, analysis):
    """What a checkpoint keeps: each model's FVU and KL with their window intervals, and the claims."""
    return {"step": step, "presentations": step * cfg.batch_size,
            "models": {name: {"fvu": m["fvu"], "kl": m["kl"], "ci": {"fvu": m["ci"]["fvu"], "kl": m["ci"]["kl"]}}
                       for name, m in results.items()},
            "claims": analysis["claims"]}


def along_training(lm, steps, folder_of, final, data, cfg):
    """The evidence (gather_evidence) of every model at each checkpoint step but the last: {step:
    evidence}, the first seed's models with its epsilon-random draws; an imported SAE (--sae) is the same
    at every step."""
    device = data["x_eval"].device
    evidence = {}
    for step in tqdm(steps[:-1], desc="checkpoints", leave=False):
        models = {name: model if cfg.sae and name == "sae" else de.load_model(folder_of(name) / f"step{step}").to(device)
                  for name, model in final.items()}
        evidence[step] = gather_evidence(lm, models, data, torch.Generator(device=device).manual_seed(cfg.seed))
    return evidence


def training_points(evidence, cfg, weights):
    """Each checkpoint's figures and claims (checkpoint_point) from its evidence {step: evidence}, with
    the run's window resamples, as the end of the run is judged."""
    points = []
    for step, ev in sorted(evidence.items()):
        results, _, analysis = report_analysis([analyse(ev, weights, torch.Generator().manual_seed(cfg.seed))])
        points.append(checkpoint_point(step, cfg, results, analysis))
    return points


# ----------------------------------------------------------------------------- stages 3-4: integration features

SECONDARY_EXPANSION = 25  # dictionary = 25 x M, the paper's 300 -> 7,500 (§13)
SECONDARY_K_PER_M = 250 / 300  # the paper's k = 250 at M = 300; the same ratio here (53 at M = 64)
SECONDARY_ACTIVE = 0.02  # with --paper-density: 2 % of the features active, as the paper's code ran it (§14)
N_RANDOM_CONTROLS, N_SHUFFLED_CONTROLS, N_PRIMARY_READ = 12, 4, 2  # control (a), (c) and (b) sizes
SCALES = (0.0, 2.0, 4.0)  # factors applied to a feature; x1 is the unscaled pipeline every change is against
CONTRASTS = {"interaction": (1.0, -1.0, -1.0, 1.0), "main_a": (0.5, 0.5, -0.5, -0.5), "main_b": (0.5, -0.5, 0.5, -0.5)}
TIE_TOLERANCE = 1e-9  # permutation t values equal up to rounding count as ties (>=): p stays conservative


@torch.no_grad()
def interaction_hidden(joint, x_ND, batch_size=4096):
    """The joint NFM's interaction hidden layer W_1 pair(f) + c_1, before its ReLU (§13, the paper's
    choice): [N, M], the layer integration features are read from."""
    return torch.cat([joint.nfm.hidden(*joint.nfm.read(*joint.sae.encode(x_BD))) for x_BD in x_ND.split(batch_size)])


def train_secondary(joint, x_train_ND, x_eval_ND, cfg):
    """Stage 3 (§13): a TopK SAE on the frozen joint model's interaction hidden layer, 25 x M features,
    k = M * 250 / 300 as the paper's text (2 % of the features as its code, with --paper-density), trained
    as the primary SAE is (train_sae: the same loop, schedule, batches and
    steps) on the training tokens' hidden vectors, z-scored with their own statistics."""
    h_train_NM, h_eval_NM = interaction_hidden(joint, x_train_ND), interaction_hidden(joint, x_eval_ND)
    mean_M, std_M = de.fit_normalisation(h_train_NM)
    m = h_train_NM.shape[1]
    torch.manual_seed(cfg.seed)
    k = SECONDARY_ACTIVE * SECONDARY_EXPANSION * m if cfg.paper_density else SECONDARY_K_PER_M * m
    sae = de.TopKSAE(m, SECONDARY_EXPANSION * m, max(1, round(k)), cfg.sae_init)
    secondary = de.DualEncoder(sae, None, mean_M, std_M).to(x_train_ND.device)
    curve = de.train_sae(secondary, secondary.normalize(h_train_NM), secondary.normalize(h_eval_NM), cfg,
                         name="secondary")
    return secondary, curve, secondary.normalize(h_eval_NM)


@torch.no_grad()
def pair_reading(joint, secondary, x_BD, feature):
    """What integration feature g reads (METHOD.md §16). The secondary SAE reads the z-scored hidden
    layer z = (h - mu) / sigma, h = W_1 pair(f) + c_1, so g's pre-activation splits exactly into pairs
    of the identity features the NFM reads (its n_read largest codes, R of them):
        a_g = w_g . z + b_g = const_g + sum_{i<j} f_i f_j v_i^T diag(c_g) v_j,   c_g = W_1^T (w_g / sigma)
        const_g = w_g . ((c_1 - mu) / sigma) + b_g
    Returns const_g (a scalar tensor), the read features [B, R] and each pair's term [B, R, R] (i < j
    above the diagonal, zeros elsewhere): O(B R^2 M), fine for the tokens a feature page shows."""
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
        "pair"       f as the interaction pathway reads it (its n_read largest then taken from the scaled
                     code), x_s and linear(f) unscaled: control (b), on the selected feature's pathway
        "primary"    f itself, so x_s, linear and pair at once: control (b) on the whole code, a reference
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
        return sec.sae.decode(self.scaled("secondary", g_vals, g_idx), g_idx) * sec.std_D + sec.mean_D

    def forward(self, x_BD):
        vals_BK, idx_BK = self.sae.encode(x_BD)
        vals_BK = self.scaled("primary", vals_BK, idx_BK)
        read_code = self.nfm.read(vals_BK, idx_BK)
        pair_vals_BK = self.scaled("pair", vals_BK, idx_BK)  # the same tensor unless "pair" is scaled
        pair_code = read_code if pair_vals_BK is vals_BK else self.nfm.read(pair_vals_BK, idx_BK)
        hidden_BM = self.nfm.hidden(*pair_code)
        linear_BD = self.nfm.linear(*read_code)
        return self.sae.decode(vals_BK, idx_BK) + linear_BD + self.nfm.mlp[1:](self.through_secondary(hidden_BM))

    @torch.no_grad()
    def secondary_code(self, x_BD):
        """The integration features' activations as the secondary SAE's (values, indices): [B, K2] each."""
        return self.secondary.sae.encode(self.secondary.normalize(interaction_hidden(self, x_BD)))

    def secondary_codes(self, x_BD):
        """The integration features' activations, dense: [B, F2]."""
        return de.to_dense(*self.secondary_code(x_BD), self.secondary.sae.W_dec.shape[0])


DEFAULT_STIMULI = "stimuli.json"  # beside dualenc.py: dualenc's own 2 x 2 design


def read_stimuli(path):
    """A 2 x 2 design as JSON (stimuli.json is dualenc's): {"factors": {A: [a1, a2], B: [b1, b2]},
    "prompts": {"a b": [...]} and "words": {"a b": [...]} for the four cells "a1 b1", "a1 b2", "a2 b1",
    "a2 b2"}, at least 4 prompts (2 to select, 2 to test) and one word per cell. Read and checked
    before any slow work; anything else is one line."""
    path = Path(path or Path(__file__).with_name(DEFAULT_STIMULI))
    try:
        spec = json.loads(path.read_text())
        (fa, (a1, a2)), (fb, (b1, b2)) = spec["factors"].items()
        cells = [f"{a} {b}" for a in (a1, a2) for b in (b1, b2)]
        prompts = {c: [str(p) for p in spec["prompts"][c]] for c in cells}
        words = {c: [str(w) for w in spec["words"][c]] for c in cells}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise de.DualencError(f"stimuli {path}: not a 2 x 2 design like {DEFAULT_STIMULI} "
                              f"({type(e).__name__}: {de.one_line(e, 120)})") from None
    for c in cells:
        if len(prompts[c]) < 4 or not words[c]:
            raise de.DualencError(f"stimuli {path}: cell {c!r} needs at least 4 prompts and one word")
    return {"path": str(path), "factors": {fa: [a1, a2], fb: [b1, b2]}, "cells": cells, "prompts": prompts,
            "words": words}


def load_stimuli(spec, tokenizer):
    """The design's prompts as (token ids, cell index) and each cell's words as token ids; a word that
    is not a single token after a space is a one-line error."""
    word_ids = {}
    for c in spec["cells"]:
        ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in spec["words"][c]]
        bad = [w for w, i in zip(spec["words"][c], ids) if len(i) != 1]
        if bad:
            raise de.DualencError(f"stimuli {spec['path']}: words {bad} of cell {c!r} are not single tokens "
                                  f"after a space")
        word_ids[c] = torch.tensor([i[0] for i in ids])
    prompts = [(torch.tensor(tokenizer(p)["input_ids"]), i)
               for i, c in enumerate(spec["cells"]) for p in spec["prompts"][c]]
    return {**spec, "prompt_ids": prompts, "word_ids": word_ids}


def contrasts(A_PF, cell_P, weights_RP=None):
    """Per feature, the 2 x 2 contrasts of per-prompt activations A [P, F] with cell indices 0..3 in the
    order (a1 b1, a1 b2, a2 b1, a2 b2), from the cell means m:
        interaction = m11 - m12 - m21 + m22    main_a = (m11 + m12 - m21 - m22) / 2    main_b likewise
    and t = contrast / se, se^2 = sum_c k_c^2 s_c^2 / n_c from the within-cell variances s_c^2 (Welch's
    form; 0 for a feature silent within its cells). {name: (value [F], t [F])}; with weights_RP [R, P]
    (bootstrap counts), [R, F] each, a row per resample."""
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
    """[R, n]: R independent uniform permutations of range(n), in one call (the argsort of uniforms)."""
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
    """[R, P, F]: Freedman-Lane samples for the interaction's null, the additive fit plus its residuals
    permuted across all prompts,   A*_r = fit + e[pi_r],  fit = additive_fit(A),  e = A - fit:
    both main effects stay, the interaction is what the shuffle removes."""
    fit_PF = additive_fit(A_PF, cell_P)
    return fit_PF + (A_PF.double() - fit_PF)[random_permutations(n_perm, len(cell_P), generator)]


def null_t(A_PF, cell_P, contrast, n_perm, generator):
    """[R, F]: the contrast's t on n_perm samples of its own null, in one batch:
        main_a: A permuted within each level of b (b's effect kept);  main_b: within each level of a;
        interaction: Freedman-Lane (both main effects kept).
    Shuffling all four labels would test "nothing differs" instead: with a real main effect and no
    interaction, that test almost never rejects. Memory goes as n_perm P F: for the features carried over."""
    if contrast == "interaction":
        null_RPF = freedman_lane(A_PF, cell_P, n_perm, generator)
    else:
        null_RPF = shuffle_within(A_PF, cell_P % 2 if contrast == "main_a" else cell_P // 2, n_perm, generator)
    n_R, n_P, n_F = null_RPF.shape
    t = contrasts(null_RPF.permute(1, 0, 2).reshape(n_P, n_R * n_F), cell_P)[contrast][1]  # a sample per column
    return t.reshape(n_R, n_F)


def permutation_p(A_PF, cell_P, contrast, n_perm, generator, sign=None):
    """[F]: permutation p-value of each feature's studentised contrast t against null_t,
        one-sided (sign +1 or -1, a number or [F]):  p = (1 + #{s t* >= s t}) / (1 + n_perm)
        two-sided (sign None):                       p = (1 + #{|t*| >= |t|}) / (1 + n_perm)
    The +1 counts the observed design among the permutations, so p is never 0. The restricted
    permutations are exact under "the factor has no effect at either level of the other" (so no
    interaction either), and studentising keeps them close otherwise; Freedman-Lane is approximate. The
    tests check both rates."""
    t_F = contrasts(A_PF, cell_P)[contrast][1]
    t_RF = null_t(A_PF, cell_P, contrast, n_perm, generator)
    if sign is None:
        exceed_RF = t_RF.abs() >= t_F.abs() - TIE_TOLERANCE
    else:
        s_F = torch.as_tensor(sign, dtype=torch.float64)
        exceed_RF = s_F * t_RF >= s_F * t_F - TIE_TOLERANCE
    return (1 + exceed_RF.sum(0)) / (1 + n_perm)


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
    """(feature, sign, t): the feature with the largest |t| of a contrast (none of `exclude`), and the
    sign of its t (+1 for t = 0: a silent selection, whose test then gives p = 1)."""
    t_F = contrasts(A_PF, cell_P)[contrast][1]
    j = int(t_F.abs().index_fill(0, torch.tensor(list(exclude), dtype=torch.long), -1.0).argmax())
    return j, 1 if t_F[j] >= 0 else -1, t_F[j].item()


def held_out_verdict(p_corrected, p_opposite_corrected, value, ci, sign, alpha=0.05):
    """holds: the one-sided test in the selected direction rejects (p_corrected < alpha), with the
    estimate and its whole interval on the selected sign's side of 0; no: the same in the opposite
    direction (a sign flip that is itself significant); unclear otherwise: a test that does not reject
    is absence of evidence, not evidence of absence, and a sign flip is never "holds"."""
    if p_corrected < alpha and value * sign > 0 and on_side(ci, sign):
        return "holds"
    return "no" if p_opposite_corrected < alpha and value * sign < 0 and on_side(ci, -sign) else "unclear"


def select_and_test(A_PF, cell_P, n_boot, generator, n_perm=2000, half_P=None, alpha=0.05):
    """Choose on one half, test on the other (§13). On the selection half (half_P True; split_halves if
    None) each contrast's top_feature and its sign; on the test half its contrast, a within-cell
    stratified bootstrap interval, the one-sided permutation p in the selected direction (each contrast
    against its own null), p_bonferroni = min(1, 3 p) for the len(CONTRASTS) features carried over, the
    opposite direction's p (p_opposite, for a sign flip), and held_out_verdict. Beside each, the paper's
    way: the top feature picked and tested on all prompts, two-sided and uncorrected. Returns
    (per-contrast dicts, selection indices, test indices)."""
    half_P = split_halves(cell_P, generator) if half_P is None else half_P
    sel, test = half_P.nonzero()[:, 0], (~half_P).nonzero()[:, 0]
    w_RP = stratified_weights(cell_P[test], n_boot, generator)
    out = {}
    for name in CONTRASTS:
        j, sign, t_sel = top_feature(A_PF[sel], cell_P[sel], name)
        a_P1 = A_PF[test][:, [j]]
        value_R1, t_R1 = contrasts(a_P1, cell_P[test], w_RP)[name]  # row 0: the test half itself
        p, p_opposite = (permutation_p(a_P1, cell_P[test], name, n_perm, generator, s).item() for s in (sign, -sign))
        p_bonferroni, value, ci = min(1.0, p * len(CONTRASTS)), value_R1[0, 0].item(), interval(value_R1[1:, 0])
        all_j = top_feature(A_PF, cell_P, name)[0]
        out[name] = {"feature": j, "sign": sign, "selection_t": t_sel, "test_half": value, "test_half_ci": ci,
                     "test_t": t_R1[0, 0].item(), "p": p, "p_bonferroni": p_bonferroni,
                     "p_opposite": p_opposite,
                     "verdict": held_out_verdict(p_bonferroni, min(1.0, p_opposite * len(CONTRASTS)), value, ci,
                                                 sign, alpha),
                     "paper_way": {"feature": all_j, "contrast": contrasts(A_PF[:, [all_j]], cell_P)[name][0].item(),
                                   "p_same_prompts_uncorrected": permutation_p(A_PF[:, [all_j]], cell_P, name,
                                                                               n_perm, generator).item()}}
    return out, sel, test


@torch.no_grad()
def word_logprobs(lm, layer, prompts, word_ids, pipeline, keep_fn):
    """Per prompt, the mean next-token log-probability of each word list at the prompt's last position,
    with block `layer`'s output replaced by pipeline.reconstruct at the positions keep_fn(h) keeps:
    [P, 4]. The prompts run as one batch, padded at the end: a causal LM's positions never see what
    follows them, so each prompt's last position is exact. Log-probabilities, not raw logits: a logit
    vector has a free additive constant, which would move every list alike (the 2 x 2 interaction of
    the changes is the same either way)."""
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
        logits_PV = lm(ids_PT.to(device), use_cache=False).logits[torch.arange(len(prompts)), lengths - 1]
    logp_PV = F.log_softmax(logits_PV.float(), dim=-1)
    return torch.stack([logp_PV[:, ids.to(device)].mean(-1) for ids in word_ids.values()], dim=-1).double().cpu()


def intervention_effect(lm, layer, prompts, word_ids, pipeline, keep_fn, scale, base_P4):
    """The changes in each word list's log-probability when `scale` is applied, for every factor in
    SCALES, against the unscaled pipeline base_P4: {factor: [P, 4]}; and per prompt the 2 x 2
    interaction of those changes (the word lists in cell order), {factor: [P]}."""
    changes, inter = {}, {}
    c = torch.tensor(CONTRASTS["interaction"], dtype=torch.float64)
    for factor in SCALES:
        pipeline.scale = (*scale, factor)
        changes[factor] = word_logprobs(lm, layer, prompts, word_ids, pipeline, keep_fn) - base_P4
        inter[factor] = changes[factor] @ c
    pipeline.scale = None
    return changes, inter


@torch.no_grad()
@torch.no_grad()
def primary_read(pipeline, x_ND, feature, n=N_PRIMARY_READ, batch_size=4096):
    """The n primary features an integration feature reads most: those whose mean activation rises most
    on the held-out tokens where the integration feature is active (control b). Summed batch by batch
    from the sparse codes: no [tokens, F] tensor."""
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


def on_side(ci, sign, at=0.0):
    """Whether the interval [lo, hi] lies wholly beyond `at` in the direction sign (+1: lo > at; -1: hi < at)."""
    return ci[0] > at if sign > 0 else ci[1] < at


def resampled_means(X_CP, w_RP):
    """[R, C]: each row of X [C, P] averaged over the prompts of each resample, (w X^T) / P."""
    return (w_RP @ X_CP.double().T) / X_CP.shape[-1]


def paired_difference(sel_P, ctrl_CP, w_RP, sign):
    """[R]: per prompt resample (the same prompts for both, so the prompt-to-prompt spread cancels), how
    much further the selected feature moves the lists than the control's features do, each by its size:
        d_r = s (w_r . sel) / P - (1/C) sum_c |(w_r . ctrl_c) / P|      s = the selected effect's sign
    Sizes, because a control's direction means nothing: signed, controls pushing both ways would cancel,
    and one pushing the other way would count for the selected feature."""
    return sign * resampled_means(sel_P[None], w_RP)[:, 0] - resampled_means(ctrl_CP, w_RP).abs().mean(-1)


def beyond_controls(sel_P, controls, w_RP, reference=()):
    """The selected feature's per-prompt effect sel_P [P] against each control {name: [C, P]} (C features
    scaled one at a time, or one set scaled together), paired over prompts by w_RP [1 + R, P]. Per
    control: its mean effect, the paired difference in size (paired_difference: estimate, interval), and
    the selected feature's rank, the fraction of the control's features with |effect| >= the selected
    one's. holds when the selected effect's own interval excludes 0 and every deciding control's
    difference lies wholly above 0; no when some deciding control's lies wholly below 0 (it moves the
    lists further); unclear otherwise. Controls in `reference` are shown but never decide."""
    effect_R = resampled_means(sel_P[None], w_RP)[:, 0]
    sign, rows = int(torch.sign(effect_R[0])), {}
    for name, ctrl_CP in controls.items():
        d_R, effect_C = paired_difference(sel_P, ctrl_CP, w_RP, sign), ctrl_CP.double().mean(-1)
        rows[name] = {"effect": effect_C.mean().item(), "difference": d_R[0].item(), "ci": interval(d_R[1:]),
                      "rank": (effect_C.abs() >= effect_R[0].abs()).double().mean().item(),
                      "reference_only": name in reference}
    selected = {"effect": effect_R[0].item(), "ci": interval(effect_R[1:])}
    deciding = [r["ci"] for r in rows.values() if not r["reference_only"]]
    holds = sign and on_side(selected["ci"], sign) and deciding and all(on_side(ci, 1) for ci in deciding)
    decision = "holds" if holds else "no" if any(on_side(ci, -1) for ci in deciding) else "unclear"
    return {"selected": selected, "controls": rows, "verdict": decision}


def stage3(lm, joint, data, cfg, out, generator):
    """The secondary SAE (train_secondary), saved in out/secondary, and what it costs: held-out FVU of the
    hidden layer, dead features, and the spliced KL with the hidden layer replaced by its reconstruction,
    against the joint model's own (paired bootstrap over windows)."""
    layer = data["layer"]
    secondary, curve, h_eval_NM = train_secondary(joint, data["x_train"], data["x_eval"], cfg)
    hook = f"blocks.{layer}.hook_resid_post.nfm.hook_interaction_pre_relu"
    de.save_model(secondary, out / "secondary", {**de.sae_metadata(cfg, layer), "hook_name": hook})
    pipeline = IntegrationPipeline(joint, secondary).eval()
    firing_F2 = firing_counts(secondary.sae, h_eval_NM)
    m = de.splice_metrics(lm, data["splice_ids"], layer, {"joint": joint.reconstruct, "secondary": pipeline.reconstruct},
                          data["splice_keep"], data["splice_acts"])
    w_splice = bootstrap_weights(len(data["splice_ids"]), cfg.n_boot, generator)
    n_kl = w_splice @ m["kl_mask"].sum(-1).double()
    kl = {name: (w_splice @ v.double().sum(-1)) / n_kl for name, v in m["kl"].items()}
    return pipeline, firing_F2, {
        "features": secondary.sae.W_dec.shape[0], "k": secondary.sae.k, "curve": curve,
        **de.evaluate(secondary, h_eval_NM), "dead_features": int((firing_F2 == 0).sum()),
        "kl_joint": summarise(kl["joint"]), "kl_with_secondary": summarise(kl["secondary"]),
        "kl_increase": summarise(kl["secondary"] - kl["joint"])}


def stage34(lm, tokenizer, joint, data, cfg, out, generator):
    """Stages 3 and 4 of the paper (§13), with a referee's controls. Returns the report's "stage34"."""
    layer, device = data["layer"], data["x_train"].device
    pipeline, firing_F2, secondary_report = stage3(lm, joint, data, cfg, out, generator)

    # stage 4: which integration features track the 2 x 2 design, chosen on one half, tested on the other
    design = load_stimuli(read_stimuli(cfg.stimuli), tokenizer)
    cell_P = torch.tensor([c for _, c in design["prompt_ids"]])

    def keep_fn(h_BTD):
        return de.keep_mask(h_BTD.norm(dim=-1), data["max_norm"])

    acts = []
    for ids, _ in design["prompt_ids"]:
        h_1TD = de.extract_activations(lm, ids[None], layer)
        acts.append(pipeline.secondary_codes(joint.normalize(h_1TD[keep_fn(h_1TD)])).mean(0))
    A_PF = torch.stack(acts).cpu()
    selected, sel, test = select_and_test(A_PF, cell_P, cfg.n_boot, generator)

    # the intervention on the selected interaction feature, on the test prompts, beside its controls
    prompts, words = [design["prompt_ids"][i] for i in test], design["word_ids"]
    base_P4 = word_logprobs(lm, layer, prompts, words, pipeline, keep_fn)
    j = selected["interaction"]["feature"]
    pipeline.scale = ("secondary", torch.tensor([j], device=device), 1.0)
    x1_change = (word_logprobs(lm, layer, prompts, words, pipeline, keep_fn) - base_P4).abs().max().item()
    w_RP = bootstrap_weights(len(prompts), cfg.n_boot, generator)  # one prompt resample for every comparison

    def effects(code, feature_sets):
        """Per scale, the per-prompt interaction effect of each feature set [C, P] and the word-list changes."""
        runs = [intervention_effect(lm, layer, prompts, words, pipeline, keep_fn,
                                    (code, torch.tensor(fs, device=device)), base_P4) for fs in feature_sets]
        return {f: (torch.stack([inter[f] for _, inter in runs]),
                    torch.stack([changes[f].mean(0) for changes, _ in runs]).mean(0).tolist()) for f in SCALES}

    rank = firing_F2.argsort().argsort()
    near = [f for f in (rank - rank[j]).abs().argsort().tolist() if f != j and firing_F2[f] > 0][: 2 * N_RANDOM_CONTROLS]
    random_features = [near[i] for i in torch.randperm(len(near), generator=generator)[:N_RANDOM_CONTROLS]]
    primary = primary_read(pipeline, data["x_eval"], j)
    shuffled = [top_feature(A_PF[sel], cell_P[sel][torch.randperm(len(sel), generator=generator)], exclude=[j])[0]
                for _ in range(N_SHUFFLED_CONTROLS)]
    runs = {"selected": effects("secondary", [[j]]),
            "random_matched": effects("secondary", [[f] for f in random_features]),
            "primary_read": effects("pair", [primary]),
            "shuffled_selection": effects("secondary", [[f] for f in shuffled]),
            "primary_read_whole_code": effects("primary", [primary])}
    intervention = {}
    for f in SCALES:
        row = beyond_controls(runs["selected"][f][0][0], {name: r[f][0] for name, r in runs.items() if name != "selected"},
                              w_RP, reference=("primary_read_whole_code",))
        for name, r in runs.items():
            (row["selected"] if name == "selected" else row["controls"][name])["word_list_changes"] = r[f][1]
        intervention[f"{f:g}"] = row

    verdicts = {f"intervention_x{f}_beyond_controls": row["verdict"] for f, row in intervention.items()}
    selectivity = selected["interaction"]["verdict"]
    overall = "holds" if selectivity == "holds" and set(verdicts.values()) == {"holds"} else \
        "no" if selectivity == "no" or set(verdicts.values()) == {"no"} else "unclear"
    return {"secondary": secondary_report,
            "design": {"factors": design["factors"], "cells": design["cells"],
                       "prompts_per_half": [int((cell_P[sel] == c).sum()) for c in range(4)]},
            "selected": selected, "x1_max_change": x1_change,
            "controls": {"random_matched": random_features, "primary_read": primary, "shuffled_selection": shuffled},
            "intervention": intervention,
            "verdicts": {"selectivity_on_held_out_prompts": selectivity, **verdicts, "overall": overall}}


# ----------------------------------------------------------------------------- bring your own SAE

SAELENS_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")


def read_saelens(folder):
    """An SAE someone else trained, in SAELens' on-disk format (METHOD.md §10): cfg.json (v6, or v5's
    flat layout) and sae_weights.safetensors. Checked here, before any slow work; what dualenc cannot
    run exactly is a one-line DualencError:
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
        raise de.DualencError(f"cannot read the SAE in {folder}: {de.one_line(e)}") from None
    if not isinstance(cfg, dict):
        raise de.DualencError(f"{folder / 'cfg.json'} is not a JSON object")
    meta = {**cfg, **cfg.get("metadata", {})}  # v6 keeps the hook in metadata, v5 at the top level
    if cfg.get("architecture") != "topk":
        raise de.DualencError(f"{folder}: architecture {cfg.get('architecture')!r} is not supported; dualenc reads "
                           f"SAELens 'topk' SAEs (the NFM needs exactly k active codes)")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise de.DualencError(f"{folder}: normalize_activations {cfg['normalize_activations']!r} is not supported; "
                           f"dualenc reads SAEs on raw activations ('none')")
    hook = str(meta.get("hook_name"))
    parts = hook.split(".")
    if len(parts) != 3 or parts[0] != "blocks" or not parts[1].isdigit() or parts[2] != "hook_resid_post":
        raise de.DualencError(f"{folder}: hook_name {hook!r} is not a block output 'blocks.L.hook_resid_post', "
                           f"which is what dualenc reads and splices")
    try:
        d_in, d_sae, k = int(cfg["d_in"]), int(cfg["d_sae"]), int(cfg["k"])
    except (KeyError, TypeError, ValueError) as e:
        raise de.DualencError(f"{folder / 'cfg.json'} lacks a valid d_in, d_sae or k: {de.one_line(e)}") from None
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for name, shape in shapes.items():
        if name not in tensors or tuple(tensors[name].shape) != shape:
            found = tuple(tensors[name].shape) if name in tensors else "missing"
            raise de.DualencError(f"{folder}: tensor {name} should be {shape} for d_in {d_in}, d_sae {d_sae}; got {found}")
        if not tensors[name].isfinite().all():
            raise de.DualencError(f"{folder}: tensor {name} has NaN or inf entries")
    if not 0 < k <= d_sae:
        raise de.DualencError(f"{folder}: k {k} is not in 1..d_sae={d_sae}")
    return {"cfg": cfg, "layer": int(parts[1]), "tensors": {n: tensors[n].float() for n in SAELENS_TENSORS}}


def import_sae(saelens, mean_D, std_D):
    """A DualEncoder running `saelens` (from read_saelens) in dualenc's z-scored space, the inverse of
    save_model's folding. From x = x_z * std + mean, and SAELens' optional pre-encoder b_dec:
        W_enc_z = std[:, None] W_enc    b_enc_z = b_enc + (mean - b_dec [if applied]) W_enc
        W_dec_z = W_dec / std[None, :]  b_dec_z = (b_dec - mean) / std
    so every code and (de-normalised) reconstruction is the one SAELens computes on raw activations."""
    cfg, t = saelens["cfg"], saelens["tensors"]
    mean_D, std_D = mean_D.cpu(), std_D.cpu()
    shift_D = mean_D - (t["b_dec"] if cfg.get("apply_b_dec_to_input") else 0)
    sae = de.TopKSAE(cfg["d_in"], cfg["d_sae"], cfg["k"])
    sae.load_state_dict({"W_enc": std_D[:, None] * t["W_enc"], "b_enc": t["b_enc"] + shift_D @ t["W_enc"],
                         "W_dec": t["W_dec"] / std_D, "b_dec": (t["b_dec"] - mean_D) / std_D})
    return de.DualEncoder(sae, None, mean_D, std_D).eval()


def sae_layer(cfg, saelens, n_blocks, d_model):
    """The block an imported SAE reads (its hook), checked against --layer and the model's config before
    the corpus or the weights are read."""
    hook = f"blocks.{saelens['layer']}.hook_resid_post"
    if cfg.layer is not None and cfg.layer != saelens["layer"]:
        raise de.DualencError(f"--layer {cfg.layer}, but the SAE reads {hook}")
    if not saelens["layer"] < n_blocks:
        raise de.DualencError(f"the SAE reads {hook}, outside the model's blocks 0..{n_blocks - 1}")
    if saelens["cfg"]["d_in"] != d_model:
        raise de.DualencError(f"the SAE has d_in {saelens['cfg']['d_in']}, the model {cfg.model!r} d_model {d_model}")
    return saelens["layer"]


# ----------------------------------------------------------------------------- report

def plot_figures(report, out):
    """The PNGs in `out`: dualenc's training curves, and decoder squared-norm histograms (with a joint
    model), FVU / KL per model, and stages 3-4 (when run)."""
    de.plot_curves(report["curves"], out)
    if "decoder_norms" in report["analysis"]:  # runs with a joint model
        plot_decoder_norms(report["analysis"]["decoder_norms"], out)
    plot_models(report["models"], out)
    if "stage34" in report:
        plot_stage34(report["stage34"], out)
    if "along_training" in report:
        plot_along_training(report["along_training"], out)


def plot_interval(ax, x, y, ci, label):
    """A line through the estimates and a vertical bar for each interval (a percentile interval of a
    skewed figure need not contain its estimate, so no error-bar offsets)."""
    line, = ax.plot(x, y, "o-", label=label)
    bars = [(xi, c) for xi, c in zip(x, ci) if c is not None]
    if bars:
        ax.vlines([b[0] for b in bars], [b[1][0] for b in bars], [b[1][1] for b in bars], color=line.get_color())


def plot_along_training(points, out):
    """along_training.png: each model's held-out FVU and spliced KL, and each claim's readings, with
    their 95 % window intervals, against token presentations (log axis); dashed: a claim's threshold."""
    from matplotlib.figure import Figure

    x = [p["presentations"] for p in points]
    claims = points[-1]["claims"]
    cols = 3
    fig = Figure(figsize=(5 * cols, 3.4 * (1 + math.ceil(len(claims) / cols))), layout="constrained")
    axes = fig.subplots(1 + math.ceil(len(claims) / cols), cols, squeeze=False)
    for ax, metric in zip(axes[0], ("fvu", "kl")):
        for name in points[-1]["models"]:
            if name in ("sae", "sae_matched", "sequential", "joint", "joint_no_linear", "joint_sae_path"):
                plot_interval(ax, x, [p["models"][name][metric] for p in points],
                              [p["models"][name]["ci"][metric] for p in points], name)
        ax.set(xscale="log", yscale="log", title=f"held-out {metric.upper()}", xlabel="token presentations")
        ax.legend(fontsize=7)
    axes[0][2].axis("off")
    for ax, claim in zip(axes[1:].flat, claims):
        for reading in claim["readings"]:
            rows = [(p["presentations"], r["value"], r["ci"]) for p in points
                    if (r := next(c for c in p["claims"] if c["claim"] == claim["claim"])["readings"].get(reading))
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
    fig.suptitle("Along the training length: the first seed's models at log-spaced steps (95 % window intervals)")
    fig.savefig(out / "along_training.png", dpi=100)


def plot_decoder_norms(dn, out):
    from matplotlib.figure import Figure

    edges = torch.tensor(dn["histogram_edges"])
    centres, width = ((edges[1:] + edges[:-1]) / 2).tolist(), (edges[1] - edges[0]).item()
    labels = {"sae": "SAE trained alone: W_dec", "joint_W_dec": "joint: W_dec (paper's view)",
              "joint_merged": "joint: W_dec + W_lin (merged; exact on the n_read codes the NFM reads)"}
    fig = Figure(figsize=(7, 8), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    for ax, (key, label) in zip(axes, labels.items()):
        s = dn["summary"][key]
        ax.bar(centres, dn["histograms"][key], width=width, color="tab:blue", alpha=0.8)
        bc, dbic = dn[f"bc_{key}"], dn[f"delta_bic_{key}"]
        ax.set(ylabel="features", title=f"{label}\nBC {bc['value']:.2f} {fmt_ci(bc['ci'])}, "
                                        f"delta BIC {dbic['value']:.0f} {fmt_ci(dbic['ci'])}, mean {s['mean']:.2f}")
    axes[-1].set_xlabel("squared decoder norm ||W_dec[i]||^2 of features that fire on held-out tokens")
    fig.savefig(out / "decoder_norms.png", dpi=110)


def plot_stage34(st, out):
    """stage34.png: per scale, the 2 x 2 interaction plot of the word lists' log-probability changes
    (x: the first factor's lists, lines: the second factor's), for the selected feature and controls."""
    from matplotlib.figure import Figure

    (fa, (a1, a2)), (fb, (b1, b2)) = st["design"]["factors"].items()
    styles = {"selected": ("tab:blue", 2.5), "random_matched": ("0.6", 1.2), "primary_read": ("tab:orange", 1.2),
              "primary_read_whole_code": ("tab:red", 0.8), "shuffled_selection": ("tab:green", 1.2)}
    fig = Figure(figsize=(4.2 * len(st["intervention"]), 4), layout="constrained")
    for ax, (f, row) in zip(fig.subplots(1, len(st["intervention"]), sharey=True), st["intervention"].items()):
        for name, (color, width) in styles.items():
            ch = (row["selected"] if name == "selected" else row["controls"][name])["word_list_changes"]
            ax.plot([a1, a2], [ch[0], ch[2]], "-o", color=color, lw=width, label=f"{name}: {b1} words")
            ax.plot([a1, a2], [ch[1], ch[3]], "--s", color=color, lw=width, label=f"{name}: {b2} words")
        ax.axhline(0, color="k", lw=0.5)
        ax.set(title=f"feature x{f}", xlabel=f"{fa} of the word list")
    fig.axes[0].set_ylabel("change in mean log P(word list) at the next token")
    fig.axes[-1].legend(fontsize=6)
    fig.suptitle("Scaling the selected integration feature, and the controls: word-list changes on the test prompts")
    fig.savefig(out / "stage34.png", dpi=110)


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
    ax_kl.bar([i - 0.2 for i in x], [models[n]["kl"] for n in names], width=0.4, yerr=kl_err, capsize=3,
              label="reconstruction spliced (95% bootstrap over windows)")
    ax_kl.bar([i + 0.2 for i in x], [models[n].get("kl_eps_random", 0) for n in names], width=0.4,
              label="epsilon-random error, same norm")
    ax_kl.set(title="KL(clean || spliced) at the next token", ylabel="KL (nats per token)")
    ax_kl.set_ylim(top=1.3 * max(models[n]["ci"]["kl"][1] for n in names))  # room for the legend above the bars
    ax_kl.legend(loc="upper right")
    for ax in (ax_fvu, ax_kl):
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.grid(axis="y", alpha=0.3)
    fig.savefig(out / "models.png", dpi=110)


def run_key(cfg, seed, name):
    """A model's folder in the run (model_key); with --sae the imported SAE serves every seed."""
    return "sae" if cfg.sae and name == "sae" else model_key(name, seed, cfg.seed)


def add_stage34(report, lm, tokenizer, joint, data, cfg, out):
    """Stages 3-4 on the run's joint model, into report["stage34"] and the run folder's stage34.txt."""
    report["stage34"] = stage34(lm, tokenizer, joint, data, cfg, out, torch.Generator().manual_seed(cfg.seed))
    de.atomic_write(out / "stage34.txt", lambda p: p.write_text(format_stage34(report["stage34"]) + "\n"))


def window_resamples(cfg, n_eval_windows, n_splice_windows):
    """One resample of the windows for every seed and model, so that the bootstrap is paired (§9.6)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    return {"eval": bootstrap_weights(n_eval_windows, cfg.n_boot, gen),
            "splice": bootstrap_weights(n_splice_windows, cfg.n_boot, gen)}


def finish_report(report, per_seed, cfg):
    """The end of a run's report: the models table, the analysis and claims, from every seed's samples."""
    results, ce, analysis = report_analysis(per_seed)
    report.update(status="complete", models=results, clean_ce=ce["clean_ce"]["value"], zero_ce=ce["zero_ce"]["value"],
                  analysis=analysis, seeds=list(range(cfg.seed, cfg.seed + cfg.seeds)),
                  bootstrap={"resamples": cfg.n_boot, "eval_windows": report["data"]["eval_windows"],
                             "splice_windows": report["data"]["splice_windows"],
                             "delta_bic_resamples": BIC_RESAMPLES})


EVIDENCE_PARTS = ("sums", "contrib", "norms", "params", "param_counts")  # per model or variant: merged


def save_evidence(path, evidence):
    """{"seed<S>/step<N>": evidence} as one safetensors file, its nested keys joined by "/"."""
    flat = {}

    def walk(tree, prefix):
        for k, v in tree.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}/")
            else:
                flat[prefix + k] = v.detach().cpu().contiguous()
    walk(evidence, "")
    de.atomic_write(path, lambda p: save_file(flat, p))


def load_evidence(path):
    """save_evidence's file as the nested {"seed<S>/step<N>": evidence} it was written from."""
    try:
        flat = load_file(path)
    except (OSError, SafetensorError) as e:
        raise de.DualencError(f"cannot read {path}: {de.one_line(e)}") from None
    evidence = {}
    for key, value in flat.items():
        seed, step, *parts = key.split("/")
        node = evidence.setdefault(f"{seed}/{step}", {})
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    for ev in evidence.values():  # a part with nothing in it (no NFM model, say) leaves no key in the file
        for part in EVIDENCE_PARTS:
            ev.setdefault(part, {})
    return evidence


PIECE_FLAGS = ("models", "out", "resume", "eval_only", "stage34", "stimuli", "device", "store", "combine")


def read_piece(folder):
    """A finished run's report and evidence, for combine_runs."""
    try:
        report = json.loads((folder / "results.json").read_text())
        complete = report["status"] == "complete"
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise de.DualencError(f"{folder} is not a replicate run folder: {de.one_line(e)}") from None
    if not complete:
        raise de.DualencError(f"the run in {folder} is unfinished; finish it with --resume {folder}")
    return report, load_evidence(folder / "evidence.safetensors")


def merge_evidence(pieces):
    """The evidence of runs that each trained some models on the same data, as one run's: {key: evidence}.
    Every run must hold the same seeds and steps and have been evaluated on the same tokens (the shared
    sums agree), and no model may be in two of them."""
    (first, _, evidence0), merged = pieces[0], {}
    for folder, _, evidence in pieces:
        if evidence.keys() != evidence0.keys():
            raise de.DualencError(f"{folder} holds other seeds or checkpoint steps than {first}")
        for key, ev in evidence.items():
            m = merged.setdefault(key, {"shared": ev["shared"], "d_model": ev["d_model"],
                                        **{part: {} for part in EVIDENCE_PARTS}})
            if not all(torch.allclose(m["shared"][k], v, rtol=1e-5) for k, v in ev["shared"].items()):
                raise de.DualencError(f"{folder} was evaluated on other tokens than {first}")
            for part in EVIDENCE_PARTS:
                if m[part].keys() & ev[part].keys():
                    raise de.DualencError(f"{', '.join(sorted(m[part].keys() & ev[part].keys()))} is in {folder} "
                                          f"and in another of the runs")
                m[part].update(ev[part])
    for m in merged.values():  # the report's order, whatever the runs' order
        m["sums"], m["params"] = ({n: d[n] for n in VARIANTS if n in d} for d in (m["sums"], m["params"]))
    return merged


def combine_runs(cfg):
    """python replicate.py --combine A,B,...: runs that trained different --models with otherwise the
    same settings (so the same store key, split, batches and resamples), joined into one report as if
    one run had trained them all: paired intervals, claims at every checkpoint, figures, and the
    runs' own timings and commits."""
    folders = [Path(p) for p in cfg.combine.split(",")]
    pieces = [(folder, *read_piece(folder)) for folder in folders]
    _, base, _ = pieces[0]
    for folder, report, _ in pieces[1:]:
        for field, value in base["config"].items():
            if field not in PIECE_FLAGS and report["config"].get(field, value) != value:  # older runs lack new flags
                raise de.DualencError(f"{folder} was run with {field} {report['config'].get(field)!r}, "
                                      f"{folders[0]} with {value!r}")
    merged = merge_evidence(pieces)
    known = {f.name for f in fields(Config)}
    stages = [Config(**{k: v for k, v in r["config"].items() if k in known}).stages() for _, r, _ in pieces]
    names = {n for s in stages for n in s}
    with_stage34 = [report for _, report, _ in pieces if "stage34" in report]
    settings = {**{k: v for k, v in base["config"].items() if k in known}, "out": cfg.out, "combine": cfg.combine,
                "models": ",".join(m for m in Config.STAGES if m in names), "stage34": bool(with_stage34)}
    cfg = Config(**settings)
    out = de.prepare_out(cfg.out)
    data = base["data"]
    weights = window_resamples(cfg, data["eval_windows"], data["splice_windows"])
    seeds, steps = (sorted({int(k.split("/")[i][len(tag):]) for k in merged}) for i, tag in ((0, "seed"), (1, "step")))
    per_seed = [analyse(merged[f"seed{s}/step{steps[-1]}"], weights, torch.Generator().manual_seed(s)) for s in seeds]
    report = {"config": settings, "status": "incomplete", "data": data, "commit": source_commit(),
              "pieces": [{"run": str(folder), "models": list(s), "commit": r.get("commit"), "timings_s": r["timings_s"],
                          "peak_rss_gib": r.get("peak_rss_gib")} for (folder, r, _), s in zip(pieces, stages)],
              "curves": {k: v for _, r, _ in pieces for k, v in r["curves"].items()},
              "timings_s": {f"{folder.name}/{k}": v for folder, r, _ in pieces for k, v in r["timings_s"].items()
                            if k != "total"}}
    finish_report(report, per_seed, cfg)
    if len(steps) > 1:
        report["along_training"] = training_points({n: merged[f"seed{cfg.seed}/step{n}"] for n in steps}, cfg, weights)
    if with_stage34:
        report["stage34"] = with_stage34[0]["stage34"]
    save_evidence(out / "evidence.safetensors", merged)
    plot_figures(report, out)
    de.write_results(report, cfg, out, list(cfg.model_keys()), format_report)
    return report


def measured(stage, peaks):
    """stage(name) (dualenc.stopwatch) that also keeps the process's peak resident memory so far, in GiB,
    in peaks[name]: where a run's memory peaks, stage by stage."""
    def timed(name):
        stage(name)
        peaks[name] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # Linux: KiB
    return timed


def source_commit():
    """The git commit this file runs from ("+dirty" with uncommitted changes to tracked files); None
    outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", "-C", str(Path(__file__).parent), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        return git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def run(cfg):
    """python replicate.py: check the inputs; extract; for each seed, train dualenc's models and the
    baselines and evaluate every variant; summarise with intervals; judge the claims; report. With
    cfg.resume, finished models are loaded and an interrupted one continues from its last evaluation;
    with cfg.eval_only, nothing is trained (with cfg.stage34 too, stages 3-4 are added to the finished
    run); with cfg.sae, an existing SAE is studied instead of training one."""
    if cfg.combine:
        return combine_runs(cfg)
    device = de.resolve_device(cfg.device)
    cfg, models, previous = de.settings(cfg)
    # every input error surfaces here, before the output folder is made and the slow corpus and model loads
    layer, n_blocks, d_model = de.check_inputs(cfg, models)
    saelens = read_saelens(cfg.sae) if cfg.sae and "sae" not in models else None
    if saelens is not None:  # the SAE fixes the layer, F and k; the NFM reads the top k/2 as usual
        layer = sae_layer(cfg, saelens, n_blocks, d_model)
        cfg = replace(cfg, layer=layer, features=saelens["cfg"]["d_sae"], k=saelens["cfg"]["k"], nfm_k=None)
    if cfg.stage34 and cfg.sae:
        raise de.DualencError("--stage34 studies the joint model's integration features; a --sae run has no joint model")
    if cfg.stage34:
        read_stimuli(cfg.stimuli)
    out = de.prepare_out(cfg.out)
    timings = {k: v for k, v in previous.get("timings_s", {}).items() if k != "total"}
    peaks = dict(previous.get("peak_rss_gib", {}))
    stage = measured(de.stopwatch(timings), peaks)
    lm, tokenizer, data = load_data(cfg, layer, device)
    stage("load_extract")
    models = {key: model.to(device) for key, model in models.items()}
    if saelens is not None:
        models["sae"] = import_sae(saelens, data["mean"], data["std"]).to(device)
        de.save_model(models["sae"], out / "sae", de.sae_metadata(cfg, layer))
    if cfg.eval_only and cfg.stage34:  # a finished run's evaluation stands; stages 3-4 are added to it
        report = {**previous, "config": {**previous["config"], "stage34": True, "stimuli": cfg.stimuli},
                  "peak_rss_gib": peaks}
        add_stage34(report, lm, tokenizer, models["joint"], data, cfg, out)
        plot_stage34(report["stage34"], out)
        stage("stage34")
        de.write_json(out / "results.json", report)
        print(format_stage34(report["stage34"]))
        print(f"added stages 3-4 to {out / 'results.json'}; wrote stage34.txt, stage34.png, secondary/", file=sys.stderr)
        return report
    report = {**de.new_report(cfg, data, models, previous, timings), "commit": source_commit(), "peak_rss_gib": peaks}
    if not cfg.eval_only:
        de.write_json(out / "results.json", report)

    weights = window_resamples(cfg, data["n_eval_windows"], len(data["splice_ids"]))
    per_seed, steps, evidence = [], checkpoint_steps(cfg, len(data["x_train"])), {}
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        seed_cfg, key = replace(cfg, seed=seed), functools.partial(run_key, cfg, seed)
        seed_recipes = recipes(seed_cfg, data)
        if steps and seed == cfg.seed:  # along the training length: the first seed's models
            seed_recipes = saving_checkpoints(seed_recipes, steps, lambda name: out / key(name),
                                              de.sae_metadata(cfg, layer), seed_cfg, data)
        trained = de.train_models(seed_cfg, data, seed_recipes, models, out, report, stage, key=key)
        ev = gather_evidence(lm, trained, data, torch.Generator(device=device).manual_seed(seed))
        evidence[f"seed{seed}/step{total_steps(cfg, len(data['x_train']))}"] = ev
        per_seed.append(analyse(ev, weights, torch.Generator().manual_seed(seed)))
        stage(f"evaluate_seed{seed}")

    if steps:
        first_seed = {name: models[name] for name in cfg.model_names()}
        along = along_training(lm, steps, lambda name: out / run_key(cfg, cfg.seed, name), first_seed, data, cfg)
        evidence.update({f"seed{cfg.seed}/step{step}": ev for step, ev in along.items()})
        report["along_training"] = training_points({**along, steps[-1]: evidence[f"seed{cfg.seed}/step{steps[-1]}"]},
                                                   cfg, weights)
        stage("along_training")
    save_evidence(out / "evidence.safetensors", evidence)
    finish_report(report, per_seed, cfg)
    report["data"]["steps_per_model"] = report["curves"][cfg.stages()[0]][-1]["step"]
    if cfg.stage34:
        add_stage34(report, lm, tokenizer, models["joint"], data, cfg, out)
        stage("stage34")
    plot_figures(report, out)
    stage("report")
    de.write_results(report, cfg, out, [*models, "evaluate", "analyse"], format_report)
    return report


def fmt_num(x):
    return "undefined" if x is None else f"{x:.3f}" if abs(x) < 100 else f"{x:.0f}"


def fmt_ci(ci):
    return "-" if ci is None else f"[{fmt_num(ci[0])}, {fmt_num(ci[1])}]"


def format_report(report):
    """dualenc's models table (with intervals), the seed intervals, the claims table, as printed at the end."""
    seeds = len(report["seeds"])
    rows = de.format_models(report)
    if seeds > 1:
        rows.append(f"mean of {seeds} seeds; seed intervals (95%, t over seeds):")
        rows += [f"  {name:<22} fvu {fmt_ci(m['seed_ci']['fvu'])}  kl {fmt_ci(m['seed_ci']['kl'])}  "
                 f"ce {fmt_ci(m['seed_ci']['ce'])}" for name, m in report["models"].items()]
    labels = {"paper_way": "paper's way", "fair": "fair", "matched": "param-matched"}
    rows += ["", "{:<76}{:>7}  {:<14}{:>8}{:>18}{:>18}  {}".format(
        "claim (rule)", "paper", "reading", "ours", "bootstrap 95%", "seeds 95%" if seeds > 1 else "", "verdict")]
    for c in report["analysis"]["claims"]:
        head = f"{c['claim']} ({c['rule']})"
        paper = "-" if c["paper"] is None else f"{c['paper']:.3f}"
        for i, (reading, r) in enumerate(c["readings"].items()):
            seed_ci = fmt_ci(r["seed_ci"]) if "seed_ci" in r else ""
            rows.append(f"{head if i == 0 else '':<76}{paper if i == 0 else '':>7}  {labels[reading]:<14}"
                        f"{fmt_num(r['value']):>8}{fmt_ci(r['ci']):>18}{seed_ci:>18}  {r['verdict']}"
                        + (f" ({r['undefined']})" if "undefined" in r else ""))
    shares = report["analysis"]["interaction_param_share"]
    name = next((n for n in ("joint", "sequential") if n in shares), None)  # none with --models sae
    if name is not None:
        rows += ["", f"design figure, not a finding: the interaction pathway is {shares[name]:.1%} of the {name} "
                 f"model's parameters (paper ~3 %), fixed by F, M and D"]
    rows.append(f"seeds: {', '.join(map(str, report['seeds']))}")
    if "along_training" in report:
        rows += ["", format_along_training(report["along_training"])]
    if "stage34" in report:
        rows += ["", format_stage34(report["stage34"])]
    return "\n".join(rows)


def format_along_training(points):
    """Each claim's readings at each checkpoint: the figure and its verdict (+ holds, - no, ? unclear)."""
    mark = {"holds": "+", "no": "-", "unclear": "?"}
    rows = ["along the training length (first seed; + holds, - no, ? unclear; intervals in results.json):",
            f"{'claim, reading':<70}" + "".join(f"{p['presentations'] / 1e6:>10.2f}M" for p in points)]
    for claim in points[-1]["claims"]:
        for reading in claim["readings"]:
            cells = []
            for p in points:
                r = next(c for c in p["claims"] if c["claim"] == claim["claim"])["readings"].get(reading)
                cells.append("-" if r is None else f"{fmt_num(r['value'])} {mark[r['verdict']]}")
            rows.append(f"{(claim['claim'] + ', ' + reading)[:69]:<70}" + "".join(f"{c:>11}" for c in cells))
    return "\n".join(rows)


def format_stage34(st):
    """The stages 3-4 tables (§13): the secondary SAE, the selected features on both halves, the
    intervention beside its controls as paired differences, and the verdicts."""
    sec = st["secondary"]
    rows = [f"stage 3: secondary SAE on the joint NFM's interaction hidden layer: {sec['features']} features, "
            f"k {sec['k']}; held-out fvu {sec['fvu']:.4f}, dead {sec['dead_features']}; spliced KL "
            f"{sec['kl_with_secondary']['value']:.4f} against the joint model's {sec['kl_joint']['value']:.4f} "
            f"(increase {sec['kl_increase']['value']:.4f} {fmt_ci(sec['kl_increase']['ci'])})",
            f"stage 4: {' x '.join(f'{k} ({a} / {b})' for k, (a, b) in st['design']['factors'].items())}, "
            f"{st['design']['prompts_per_half']} selection prompts per cell, the rest tested",
            "{:<13}{:>8}{:>9}{:>11}{:>18}{:>8}{:>9}{:>8}  {:<9}{}".format(
                "contrast", "feature", "sel. t", "test half", "test 95%", "test t", "p (1-s)", "p x3", "verdict",
                "paper's way: same prompts")]
    for name, c in st["selected"].items():
        pw = c["paper_way"]
        rows.append(f"{name:<13}{c['feature']:>8}{c['selection_t']:>9.2f}{c['test_half']:>11.4f}"
                    f"{fmt_ci(c['test_half_ci']):>18}{c['test_t']:>8.2f}{c['p']:>9.4f}{c['p_bonferroni']:>8.4f}  "
                    f"{c['verdict']:<9}feature {pw['feature']}, contrast {pw['contrast']:.4f}, "
                    f"p {pw['p_same_prompts_uncorrected']:.4f} (two-sided, uncorrected)")
    rows.append(f"intervention on feature {st['selected']['interaction']['feature']}: 2 x 2 interaction of the word "
                f"lists' log-prob changes, mean over test prompts (x1 changes nothing: max {st['x1_max_change']:.1e}); "
                f"controls as paired differences in size, s x selected - mean |control| (s the selected sign), rank = "
                f"share of the control's features moving the lists at least as much")
    for f, row in st["intervention"].items():
        sel = row["selected"]
        rows.append(f"  x{f}: selected {sel['effect']:.2e} [{sel['ci'][0]:.2e}, {sel['ci'][1]:.2e}]; "
                    f"verdict {row['verdict']}")
        rows += [f"    {name:<26} effect {c['effect']:>10.2e}  difference {c['difference']:>10.2e} "
                 f"[{c['ci'][0]:.2e}, {c['ci'][1]:.2e}]  rank {c['rank']:.2f}"
                 + ("  (reference, does not decide)" if c["reference_only"] else "") for name, c in row["controls"].items()]
    rows.append("verdicts: " + ", ".join(f"{k} {v}" for k, v in st["verdicts"].items()))
    return "\n".join(rows)


def parse_args(argv=None):
    return de.parse_args(argv, Config)


def main(argv=None):
    de.main(argv, Config, run)


if __name__ == "__main__":
    main()
