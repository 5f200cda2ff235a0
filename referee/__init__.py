"""referee: does the paper hold, and against which baseline? The judge beside dualenc.py.

    python -m referee --quick          a one-minute smoke run of the whole referee
    python -m referee                  the default run: baselines, claims, verdicts (docs/)
    python -m referee.runner           the method of dualenc.py with run folders and --resume
    python -m referee.bench            each fast path timed against the slower way

dualenc.py, the method, imports nothing of this package; the package builds on it. The modules,
in the order a run meets them: runner (settings, run folders, the command line), corpus and
language_model (the named texts, the cached LM), store (activations on disk), training (the loop
with resume, checkpoints and ranks), distributed (torchrun), checkpoint (SAELens' layout),
replicate (baselines, claims, verdicts, --combine, --compare), stats (the pure statistics),
stages34 (the paper's stages 3-4), report (figures and tables), browser (the feature browser's
page), bench (the benchmark).
"""
