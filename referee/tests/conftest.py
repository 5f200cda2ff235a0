"""What the referee's test modules share, so that none imports another: the method's sizes and
helpers on synthetic activations and a tiny random Llama (test_dualenc.py's); the command line;
interrupting a run; and the tiny LM folder and the tiny runs of the method and of the referee,
each made once a session.

Fixtures need no import; the helpers are imported as `from conftest import ...`. Tests marked
`slow` (the real SmolLM2, Chromium; see pytest.ini) are left out of the fast tier:
`python -m pytest -q -m "not slow"`. Run as a script, this file is what torchrun launches in a
test of faults: it plants the fault in one rank, then runs the program under test."""

import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dualenc as de
from referee import language_model, runner
from referee import replicate as rp
# test_dualenc.py stands alone beside dualenc.py; the referee's tests share its sizes and data
from test_dualenc import D, FEATS, K, M, small_cfg, synthetic_acts, tiny_llama  # noqa: F401

# ----------------------------------------------------------------------------- runs

ROOT = Path(__file__).resolve().parents[2]  # the repository: dualenc.py, results/, referee/


def program(name):
    """How python runs a program: "dualenc.py" as a script, "referee" or "referee.runner" as a
    module."""
    return [name] if name.endswith(".py") else ["-m", name]


def run_cli(name, *args):
    return subprocess.run([sys.executable, *program(name), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)


def torchrun(name, *args, ranks=2, fault=None):
    """`torchrun --standalone --nproc-per-node ranks -m name args` (standalone: a free port each
    time), with fault=(rank, kind, n) planted in that rank (plant_fault). Returns (the completed
    process, its seconds)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
              f"--nproc-per-node={ranks}"]
    env = dict(os.environ, DUALENC_FAULT=json.dumps(fault), PYTHONPATH=str(ROOT))
    launched = program(name) if fault is None else [__file__, name]
    t0 = time.perf_counter()
    done = subprocess.run([*launch, *launched, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    return done, time.perf_counter() - t0


def our_lines(stderr, prog="referee"):
    """The lines a run's ranks print as the program, not torchrun's own report (another rank's
    progress bar may stand before one on the terminal's line)."""
    return [line[line.index(f"{prog}: "):] for line in stderr.splitlines() if f"{prog}: " in line]


FAULTS = {"kill": "train_step", "nan": "train_step", "bug": "train_step",
          "kill-extract": "extract_activations", "bug-splice": "splice_metrics"}


def plant_fault(rank, kind, n):
    """In rank `rank` only (None: every rank), at the n-th call of what FAULTS names: "kill"
    (SIGKILL, as the OOM killer or a lost node would), "nan" (that step's batch is NaN), or "bug"
    (a RuntimeError, as a bug in the code would raise)."""
    if rank is not None and int(os.environ["RANK"]) != rank:
        return
    real, calls = getattr(de, FAULTS[kind]), [0]

    def faulty(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n and kind == "nan":
            args = (*args[:2], args[2] * float("nan"), *args[3:])
        elif calls[0] == n and kind.startswith("bug"):
            raise RuntimeError("a planted bug")
        elif calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    setattr(de, FAULTS[kind], faulty)


def interrupt_training_at(monkeypatch, n):
    """Make a run's n-th optimiser step raise KeyboardInterrupt, as Ctrl-C would; returns the
    real step."""
    calls, real_step = [0], de.train_step

    def flaky_step(*args):
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(de, "train_step", flaky_step)
    return real_step


@pytest.fixture(scope="session")
def tiny_lm_folder(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer, saved as a local model folder: the whole
    pipeline runs on it in seconds."""
    folder = tmp_path_factory.mktemp("tiny_lm")
    _, tokenizer = language_model.load_lm(de.SMOLLM2, "cpu")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_method_cfg(model, out, cls=runner.RunConfig, **kw):
    """A tiny run of the method with run folders (referee.runner) on the tiny LM."""
    return cls(**{"model": model, "tokens": 4096, "ctx": 32, "features": 64, "k": 8, "embed_dim": 8,
                  "epochs": 2, "batch_size": 128, "eval_every": 5, "splice_tokens": 256,
                  "out": str(out), "device": "cpu", **kw})


def tiny_run_cfg(model, out, **kw):
    """A tiny replicate run; its activation store beside `out` (a run given the same `out` reuses
    it)."""
    return tiny_method_cfg(model, out, cls=rp.Config, **{"store": f"{out}_store", **kw})


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """`python -m referee --quick` on the real SmolLM2 (its store beside it, as `run_store`):
    the run folder."""
    out = tmp_path_factory.mktemp("quick") / "run"
    done = run_cli("referee", "--quick", "--out", str(out), "--store", f"{out}_store")
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def tiny_method_run(tiny_lm_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_method_run")
    return out, runner.run(tiny_method_cfg(tiny_lm_folder, out))


@pytest.fixture(scope="session")
def tiny_run(tiny_lm_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_run")
    return out, rp.run(tiny_run_cfg(tiny_lm_folder, out))


if __name__ == "__main__":  # launched by torchrun(..., fault=...): conftest.py MODULE ARGS
    plant_fault(*json.loads(os.environ["DUALENC_FAULT"]))
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
