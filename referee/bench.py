"""Benchmark for dualenc: every figure is a ratio of two implementations measured side by side in
one run (this machine is shared and noisy, so absolute times are only indicative), each as
min / median of several repeats. Not a test: nothing here asserts a time.

    python -m referee.bench                                # CPU or the GPU torch sees
    python -m referee.bench --results runs/X/results.json  # also split the run's wall time by stage

    python -m referee.bench --neighbour                    # only the thread/wait-policy comparison

    python -m referee.bench --precision                    # only fp32 against bf16

    python -m referee.bench --ranks                        # only 2 ranks against 1 process

Sections: NFM (sparse vs the dense [B, F, M] reference, with peak memory), SAE decode
(embedding_bag vs dense matmul), the SAE step (sparse vs dense encoder backward, and where its
time goes), precision (the paper-density steps and extraction in bf16 against fp32, and the share
of a long run that its curve's evaluations take), extraction (early exit vs full forward),
splicing (cached prefix vs full forward), training throughput, on CPU the SAE step beside a
low-priority neighbour (threads and OpenMP wait policy) and by 2 data-parallel ranks against 1
process, and the end-to-end stage split.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types

import torch
import torch.nn.functional as F

import dualenc as de
from referee import corpus, distributed, language_model, runner
from referee import replicate as rp

# dualenc's (n_read = k/2) and the paper's (docs/method.md §4, §8)
CONFIGS = {"default": dict(d=576, f=4608, k=64, m=64, n_read=32, batch=512),
           "paper": dict(d=3200, f=50_000, k=1024, m=300, n_read=512, batch=64)}
DEFAULT = CONFIGS["default"]
SELF = [sys.executable, "-m", "referee.bench"]  # a measurement in a process of its own
MEMORY_CAP_GB = 12  # address-space cap for the "does it fit" check on CPU


def dense_nfm(nfm, vals_BK, idx_BK):
    """The NFM as the paper's evaluation scripts computed it: every one of the F features'
    embeddings scaled by its (mostly zero) code, a [B, F, M] tensor, and a dense [B, F] @ [F, D]
    linear term."""
    vals_BK, idx_BK = nfm.read(vals_BK, idx_BK)
    codes_BF = de.to_dense(vals_BK, idx_BK, nfm.embed.shape[0])
    fv_BFM = codes_BF[:, :, None] * nfm.embed
    pair_BM = 0.5 * (fv_BFM.sum(1).square() - fv_BFM.square().sum(1))
    return codes_BF @ nfm.W_lin, nfm.interaction(nfm.W_1(pair_BM))


def random_code(cfg, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    vals = torch.rand(cfg["batch"], cfg["k"], generator=g)
    idx = torch.stack([torch.randperm(cfg["f"], generator=g)[:cfg["k"]]
                       for _ in range(cfg["batch"])])
    return vals.to(device), idx.to(device)


def nfm_step(cfg, impl, device):
    """A closure doing one forward + backward of the NFM (ours or dense) on a fixed random code."""
    torch.manual_seed(0)
    nfm = de.NFM(cfg["f"], cfg["d"], cfg["m"], cfg["n_read"]).to(device)
    vals, idx = random_code(cfg, device)
    vals.requires_grad_(True)
    forward = nfm if impl == "sparse" else lambda v, i: dense_nfm(nfm, v, i)

    def step():
        linear, interaction = forward(vals, idx)
        (linear.square().mean() + interaction.square().mean()).backward()
        nfm.zero_grad(set_to_none=True)
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats=5, warmup=1):
    """Seconds per call: (min, median) over `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def peak_memory_mb(cfg_name, impl, device, cap_gb=None):
    """Peak memory of one NFM step above what its inputs and parameters already hold. On CUDA the
    allocator's peak; on CPU the growth of peak RSS, in a fresh process (peak RSS never goes down),
    optionally under an address-space cap. None when the step does not fit."""
    if device.type == "cuda":
        step = nfm_step(CONFIGS[cfg_name], impl, device)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        try:
            step()
        except torch.OutOfMemoryError:
            return None
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    cmd = [*SELF, "--peak", cfg_name, impl]
    limit = ((lambda: resource.setrlimit(resource.RLIMIT_AS, (cap_gb * 2**30,) * 2))
             if cap_gb else None)
    r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit)
    return float(r.stdout) if r.returncode == 0 else None


def peak_rss_mb():
    # VmHWM, not getrusage's ru_maxrss: the latter keeps the parent's high-water mark across
    # fork + exec
    line = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def peak_child(cfg_name, impl):
    step = nfm_step(CONFIGS[cfg_name], impl, torch.device("cpu"))
    base = peak_rss_mb()
    step()
    print(peak_rss_mb() - base)


def fmt(t):
    return f"{t[0] * 1e3:9.1f} / {t[1] * 1e3:9.1f} ms"


def bench_nfm(device, repeats):
    print("\n## NFM forward + backward: ours (k active features, embedding_bag) vs dense [B, F, M]")
    for name in CONFIGS:
        cfg = dict(CONFIGS[name])
        if name == "paper" and device.type == "cpu":
            cfg["batch"] = 8  # the dense reference needs B * F * M * 4 bytes per [B, F, M] tensor
        print(f"{name} config {cfg}")
        t_sparse = timed(nfm_step(cfg, "sparse", device), device, repeats)
        t_dense = timed(nfm_step(cfg, "dense", device), device, repeats if name == "default" else 2)
        print(f"  time  ours {fmt(t_sparse)}   dense {fmt(t_dense)}   speed-up (median) "
              f"{t_dense[1] / t_sparse[1]:6.1f} x")
        if device.type == "cpu" and name == "paper":
            continue  # measured below under the cap, at the paper's batch
        m_sparse, m_dense = (peak_memory_mb(name, "sparse", device),
                             peak_memory_mb(name, "dense", device))
        print(f"  peak  ours {m_sparse:9.1f} MB   dense {m_dense:9.1f} MB   "
              f"ratio {m_dense / max(m_sparse, 1e-3):6.1f} x")
    if device.type == "cpu":
        fits = {impl: peak_memory_mb("paper", impl, device, MEMORY_CAP_GB)
                for impl in ("sparse", "dense")}
        print(f"paper config at batch {CONFIGS['paper']['batch']} under a {MEMORY_CAP_GB} GB "
              f"address-space cap: " + ", ".join(
                  f"{'ours' if impl == 'sparse' else 'dense'} "
                  + ("does not fit" if mb is None else f"fits ({mb:.0f} MB peak)")
                  for impl, mb in fits.items()))


def bench_sae_decode(device, repeats):
    print("\n## SAE decode forward + backward, default config: embedding_bag vs dense codes "
          "@ W_dec")
    cfg = DEFAULT
    sae = de.TopKSAE(cfg["d"], cfg["f"], cfg["k"]).to(device)
    vals, idx = random_code(cfg, device)
    vals.requires_grad_(True)

    def sparse():
        sae.decode(vals, idx).square().mean().backward()

    def dense():
        (de.to_dense(vals, idx, cfg["f"]) @ sae.W_dec + sae.b_dec).square().mean().backward()
    t_sparse, t_dense = timed(sparse, device, repeats), timed(dense, device, repeats)
    print(f"  embedding_bag {fmt(t_sparse)}   dense {fmt(t_dense)}   speed-up (median) "
          f"{t_dense[1] / t_sparse[1]:5.1f} x")


class DenseBackwardSAE(de.TopKSAE):
    # as autograd differentiates it: a dense GEMM back through all F pre-activations
    def encode(self, x_BD):
        return F.relu(x_BD @ self.W_enc + self.b_enc).topk(self.k, dim=-1, sorted=False)


def bench_sae_step(device, repeats):
    print("\n## SAE training step (encode, decode, MSE, backward, fused Adam): sparse vs dense "
          "encoder backward")
    d = DEFAULT["d"]
    for name, cfg in (("default", de.Config()),
                      ("paper density", de.Config(**runner.paper_density(d)))):
        x = torch.randn(cfg.batch_size, d, device=device)
        fns, opts = {}, {}
        for impl, cls in (("sparse", de.TopKSAE), ("dense", DenseBackwardSAE)):
            torch.manual_seed(0)
            model = de.DualEncoder(cls(d, cfg.features, cfg.k)).to(device)
            opts[impl] = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
            fns[impl] = lambda model=model, opt=opts[impl]: de.train_step(model, opt, x)
        fns["sparse"]()  # gradients for a bare Adam step
        W_enc, b_enc, W_dec = (p.detach()
                               for p in (model.sae.W_enc, model.sae.b_enc, model.sae.W_dec))
        pre_BF = F.relu(x @ W_enc + b_enc)
        vals, idx = pre_BF.topk(cfg.k, dim=-1, sorted=False)
        fns.update({"encoder GEMM": lambda: F.relu(x @ W_enc + b_enc),
                    "top-k": lambda: pre_BF.topk(cfg.k, dim=-1, sorted=False),
                    "decoder": lambda: F.embedding_bag(idx, W_dec, per_sample_weights=vals,
                                                       mode="sum"),
                    "Adam": opts["sparse"].step})
        t = {}
        # interleaved, so a busy moment of the machine does not fall on one of them only
        for _ in range(2):
            for part, fn in fns.items():
                t[part] = min(t.get(part, (1e9, 1e9)), timed(fn, device, repeats * 2))
        parts = {part: t[part][1] / t["sparse"][1]
                 for part in ("encoder GEMM", "top-k", "decoder", "Adam")}
        print(f"{name}: d {d}, F {cfg.features}, k {cfg.k}, batch {cfg.batch_size}\n"
              f"  sparse {fmt(t['sparse'])}   dense {fmt(t['dense'])}   speed-up (median) "
              f"{t['dense'][1] / t['sparse'][1]:5.2f} x\n"
              f"  a step is {t['sparse'][1] / t['encoder GEMM'][1]:4.1f} encoder GEMMs sparse, "
              f"{t['dense'][1] / t['encoder GEMM'][1]:4.1f} dense\n  sparse step: "
              + ", ".join(f"{part} {share:.0%}" for part, share in parts.items())
              + f", the backward and the rest {1 - sum(parts.values()):.0%}")


def paper_density_models(d, device):
    """The long run's three models at the paper's density (d_model d): name -> (model, Config)."""
    cfg = runner.RunConfig(**runner.paper_density(d))
    # build reads the data's width, device and z-score; a benchmark's models need no real data
    data = types.SimpleNamespace(x_train=torch.zeros(1, d, device=device), mean=None, std=None)
    joint = de.build(cfg, data, nfm="linear")
    matched = rp.matched_features(d, de.n_params(joint))
    return cfg, {"sae": de.build(cfg, data), "sae_matched": de.build(cfg, data, n_features=matched),
                 "joint": joint}


# The long run's shape (results/long): 119,084 held-out tokens in 938 windows, evaluated every 200
# steps; its curve now reads the first curve_windows of them.
LONG_RUN = dict(eval_tokens=119_084, eval_windows=938, eval_every=200)


def bench_precision(device, repeats):
    print("\n## Precision: bf16 autocast against fp32, the paper-density training steps (d 576)")
    d = DEFAULT["d"]
    cfg, models = paper_density_models(d, device)
    x = torch.randn(cfg.batch_size, d, device=device)
    fns = {}
    for name, model in models.items():
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
        for precision in de.Config.PRECISIONS:
            fns[name, precision] = (lambda model=model, opt=opt, p=precision:
                                    de.train_step(model, opt, x, p))
    t = {}
    for _ in range(2):  # interleaved, as in the SAE step's section
        for key, fn in fns.items():
            t[key] = min(t.get(key, (1e9, 1e9)), timed(fn, device, repeats * 2))
    for name, model in models.items():
        fp32, bf16 = t[name, "fp32"], t[name, "bf16"]
        print(f"  {name:<12} F {model.sae.W_dec.shape[0]:>6,}   fp32 {fmt(fp32)}   bf16 {fmt(bf16)}"
              f"   bf16 / fp32 (median) {bf16[1] / fp32[1]:5.2f}")
    print("\n## A long run's evaluation share: the curve's held-out pass every "
          f"{LONG_RUN['eval_every']} steps, all {LONG_RUN['eval_tokens']:,} held-out tokens "
          "against the first curve_windows windows' (joint model)")
    joint = models["joint"]
    per_window = LONG_RUN["eval_tokens"] / LONG_RUN["eval_windows"]
    x_eval = torch.randn(LONG_RUN["eval_tokens"], d, device=device)
    x_curve = x_eval[:round(cfg.curve_windows * per_window)]
    t_eval = {"all held-out tokens": timed(lambda: de.evaluate(joint, x_eval), device, 3),
              f"first {cfg.curve_windows} windows": timed(lambda: de.evaluate(joint, x_curve),
                                                          device, 3)}
    for precision in de.Config.PRECISIONS:
        train_s = LONG_RUN["eval_every"] * t["joint", precision][1]
        for label, (_, median) in t_eval.items():
            print(f"  {precision} training, {label:<20} {median:6.2f} s a pass against "
                  f"{train_s:6.1f} s of steps: {median / (median + train_s):6.1%} of the run")


NEIGHBOUR_SETTINGS = (("2 threads, OMP_WAIT_POLICY unset", 2, None),  # OpenMP's own default
                      ("2 threads, OMP_WAIT_POLICY=PASSIVE", 2, "PASSIVE"),
                      ("2 threads, OMP_WAIT_POLICY=ACTIVE", 2, "ACTIVE"),
                      ("1 thread", 1, None))


def sae_step_child(threads, repeats):
    """One paper-density SAE training step, timed in this (fresh) process with `threads` threads:
    the median, printed in seconds."""
    torch.set_num_threads(threads)
    cfg, d = de.Config(**runner.paper_density(DEFAULT["d"])), DEFAULT["d"]
    torch.manual_seed(0)
    model = de.DualEncoder(de.TopKSAE(d, cfg.features, cfg.k))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
    x = torch.randn(cfg.batch_size, d)
    print(timed(lambda: de.train_step(model, opt, x), torch.device("cpu"), repeats)[1])


def busy_child():
    """A stand-in for a test suite at low priority: one thread of matrix products, until killed."""
    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    while True:
        a = torch.tanh(a @ a)


def bench_neighbour(repeats):
    """A long run keeps the cores while tests run beside it: the paper-density SAE step in a fresh
    process per setting (OpenMP reads its wait policy at start), alone and beside a busy one-thread
    neighbour at nice 19, and the share of its quiet speed it keeps."""
    print("\n## SAE step at paper density beside a low-priority neighbour (a test suite's "
          "stand-in), CPU")
    for label, threads, policy in NEIGHBOUR_SETTINGS:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if policy is not None:
            env["OMP_WAIT_POLICY"] = policy
        cmd = [*SELF, "--sae-step", str(threads), "--repeats", str(repeats * 2)]
        quiet = float(subprocess.run(cmd, capture_output=True, text=True, env=env,
                                     check=True).stdout)
        busy = subprocess.Popen(["nice", "-n", "19", *SELF, "--busy"],
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            loaded = float(subprocess.run(cmd, capture_output=True, text=True, env=env,
                                          check=True).stdout)
        finally:
            busy.kill()
            busy.wait()
        print(f"  {label:<36} alone {quiet * 1e3:7.1f} ms   beside it {loaded * 1e3:7.1f} ms   "
              f"keeps {quiet / loaded:5.0%} of its speed")


def ranks_step_child(repeats):
    """Under torchrun: the paper-density SAE step data-parallel (distributed.DataParallel), each
    rank on its share of the global batch; rank 0 prints the median step and the median
    all-reduce of the gradients alone (2 F d + F + d floats), in seconds."""
    parallel = distributed.start(torch.device("cpu"))
    cfg, d = de.Config(**runner.paper_density(DEFAULT["d"])), DEFAULT["d"]
    torch.manual_seed(0)
    model = de.DualEncoder(de.TopKSAE(d, cfg.features, cfg.k))
    trainer = parallel.wrap(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
    x = torch.randn(cfg.batch_size, d)[parallel.share(torch.arange(cfg.batch_size))]
    parallel.barrier()
    step = timed(lambda: de.train_step(trainer, opt, x), torch.device("cpu"), repeats)[1]
    grads = torch.zeros(de.n_params(model))
    reduce = timed(lambda: torch.distributed.all_reduce(grads), torch.device("cpu"), repeats)[1]
    if parallel.main:
        print(step, reduce)
    distributed.stop(parallel)


def bench_ranks(repeats):
    """Data parallelism on this machine's cores: the paper-density SAE step (one global batch of
    1,024 tokens) by 2 ranks of 1 thread (torchrun, gloo) against 1 process of 2 threads."""
    print("\n## SAE step at paper density: 2 ranks x 1 thread (torchrun, gloo) against 1 process x "
          "2 threads, CPU")
    one = float(subprocess.run([*SELF, "--sae-step", "2", "--repeats",
                                str(repeats * 2)], capture_output=True, text=True,
                               check=True).stdout)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    out = subprocess.run([*launch, *SELF[1:], "--ranks-step", "--repeats", str(repeats * 2)],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    two, reduce = map(float, out.split())
    print(f"  1 process x 2 threads {one * 1e3:7.1f} ms a step   2 ranks x 1 thread "
          f"{two * 1e3:7.1f} ms a step (of which the gradients' all-reduce alone "
          f"{reduce * 1e3:.1f} ms)   one / two ranks {one / two:5.2f}")


def bench_training(device, repeats):
    print("\n## Training throughput, default config, synthetic activations "
          "(tokens/s, min / median step)")
    cfg = de.Config()
    x = torch.randn(cfg.batch_size, DEFAULT["d"], device=device)
    for name, nfm in (("sae", None),
                      ("joint", de.NFM(cfg.features, DEFAULT["d"], cfg.embed_dim, cfg.nfm_k))):
        model = de.DualEncoder(de.TopKSAE(DEFAULT["d"], cfg.features, cfg.k), nfm).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
        t = timed(lambda: de.train_step(model, opt, x), device, repeats * 4)
        print(f"  {name:6s} {cfg.batch_size / t[1]:9,.0f} tokens/s   "
              f"({fmt(t)} per step of {cfg.batch_size})")


def bench_lm(device, repeats):
    print("\n## SmolLM2 at the middle block: extraction and splicing, 16 windows of 128 tokens")
    lm, tokenizer = language_model.load_lm(de.SMOLLM2, device)
    layer = len(de.decoder_blocks(lm)) // 2
    ids = de.make_windows(tokenizer, de.default_text, 16 * 128, 128)
    n = ids.numel()

    def early():
        de.extract_activations(lm, ids, layer)

    def full():
        with torch.no_grad(), de.block_hook(lm, layer, lambda h: None):
            for i in range(0, len(ids), 16):
                lm(ids[i:i + 16].to(device), use_cache=False)
    def early_bf16():
        de.extract_activations(lm, ids, layer, precision="bf16")
    t_early, t_full = timed(early, device, repeats), timed(full, device, repeats)
    t_bf16 = timed(early_bf16, device, repeats)
    print(f"  extraction  early exit {n / t_early[1]:8,.0f} tokens/s   "
          f"full forward {n / t_full[1]:8,.0f} tokens/s   ratio {t_full[1] / t_early[1]:4.2f} x")
    acts = de.extract_activations(lm, ids, layer)
    acts_bf16 = de.extract_activations(lm, ids, layer, precision="bf16")
    keep = de.keep_mask(acts.norm(dim=-1), 1e9)  # the rows a run keeps (position 0 aside)
    error = (acts_bf16 - acts)[keep].norm() / acts[keep].norm()
    print(f"  extraction  fp32 {n / t_early[1]:8,.0f} tokens/s   "
          f"bf16 {n / t_bf16[1]:8,.0f} tokens/s   bf16 / fp32 time {t_bf16[1] / t_early[1]:4.2f}"
          f"   bf16's activations differ from fp32's by {error:.2%} (relative norm, positions > 0)")
    reps = {"zero": torch.zeros_like}
    t_cached = timed(lambda: de.splice_metrics(lm, ids, layer, reps, acts_NTD=acts), device,
                     repeats)
    t_nocache = timed(lambda: de.splice_metrics(lm, ids, layer, reps), device, repeats)
    print(f"  splice (clean + 1 spliced pass)  cached prefix {n / t_cached[1]:8,.0f} tokens/s   "
          f"full {n / t_nocache[1]:8,.0f} tokens/s   ratio {t_nocache[1] / t_cached[1]:4.2f} x")


def stage_split(path):
    timings = json.loads(open(path).read())["timings_s"]
    total = timings.pop("total")
    print(f"\n## End-to-end stages of {path} ({total:.0f} s)")
    for stage, s in timings.items():
        print(f"  {stage:24s} {s:7.1f} s  {s / total:6.1%}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--results",
                   help="results.json of a default run, to split its wall time by stage")
    p.add_argument("--neighbour", action="store_true",
                   help="only the SAE step beside a busy neighbour (CPU)")
    p.add_argument("--precision", action="store_true",
                   help="only fp32 against bf16 (the paper-density steps, evaluation, extraction)")
    # internal, the child processes: one CPU peak-memory measurement (--peak), one timed step with
    # N threads (--sae-step), the neighbour (--busy)
    p.add_argument("--ranks", action="store_true",
                   help="only 2 ranks of 1 thread against 1 process of 2 threads (CPU, torchrun)")
    p.add_argument("--peak", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--sae-step", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ranks-step", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--busy", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.peak:
        return peak_child(*args.peak)
    if args.sae_step:
        return sae_step_child(args.sae_step, args.repeats)
    if args.ranks_step:
        return ranks_step_child(args.repeats)
    if args.ranks:
        return bench_ranks(args.repeats)
    if args.busy:
        return busy_child()
    if args.neighbour:
        return bench_neighbour(args.repeats)
    device = de.resolve_device(args.device)
    name = (torch.cuda.get_device_name() if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads")
    print(f"# dualenc benchmark on {name}, torch {torch.__version__}")
    if args.precision:
        bench_precision(device, args.repeats)
        return bench_lm(device, max(2, args.repeats // 2))
    bench_nfm(device, args.repeats)
    bench_sae_decode(device, args.repeats)
    bench_sae_step(device, args.repeats)
    bench_precision(device, args.repeats)
    bench_training(device, args.repeats)
    bench_lm(device, max(2, args.repeats // 2))
    if device.type == "cpu":
        bench_neighbour(args.repeats)
        bench_ranks(args.repeats)
    if args.results:
        stage_split(args.results)


if __name__ == "__main__":
    main()
