"""checkpoint: a trained model on disk (SAELens format) and where a model's training resumes.

It imports dualenc only. Sections:
  files        one_line (an error's message), atomic_write, write_json
  models       save_model / load_model: one folder per model, the SAE in SAELens v6 format
  run state    TrainState: weights, optimiser, step, history and RNG, saved at each evaluation
"""

import json
import os
import pickle
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import dualenc as de
from dualenc import DualencError


# ----------------------------------------------------------------------------- files

def one_line(e, limit=300):
    """An exception's message on one line (state_dict and safetensors errors span several)."""
    return " ".join(str(e).split())[:limit]


def atomic_write(path, write):
    """write(tmp_path), then rename: a crash never leaves a truncated file under `path`."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path, obj):
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2)))


# ----------------------------------------------------------------------------- models

SAELENS_VERSION = "6.0.0"  # the cfg.json layout written below is SAELens v6's (docs/method.md §10)


def save_model(model, folder, metadata):
    """One folder per model:
        cfg.json, sae_weights.safetensors   the SAE in SAELens v6 format with the z-score folded in,
                                            so it runs on raw block outputs
                                            (normalize_activations "none")
        sae_zscored.safetensors             the SAE exactly as trained, in the z-scored space
        zscore.safetensors                  mean and std of the z-score (§2)
        nfm_cfg.json, nfm.safetensors       the NFM, if any (NFM.config and its weights): reads the
                                            SAE code, writes the z-scored space
    Folding, from x_z = (x - mean) / std and x = x_z * std + mean:
        W_enc' = W_enc / std[:, None]   b_enc' = b_enc - (mean / std) W_enc
        W_dec' = W_dec * std[None, :]   b_dec' = b_dec * std + mean
    cfg.json is written last, so a folder without it is incomplete."""
    folder.mkdir(parents=True, exist_ok=True)
    sae, mean, std = model.sae, model.mean_D, model.std_D

    def save(name, tensors):
        cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        atomic_write(folder / name, lambda p: save_file(cpu, p))

    save("sae_weights.safetensors", {"W_enc": sae.W_enc / std[:, None],
                                     "b_enc": sae.b_enc - (mean / std) @ sae.W_enc,
                                     "W_dec": sae.W_dec * std, "b_dec": sae.b_dec * std + mean})
    save("sae_zscored.safetensors", sae.state_dict())
    save("zscore.safetensors", {"mean": mean, "std": std})
    if model.nfm is not None:
        save("nfm.safetensors", model.nfm.state_dict())
        write_json(folder / "nfm_cfg.json", model.nfm.config)
    d_model, n_features = sae.W_dec.shape[1], sae.W_dec.shape[0]
    write_json(folder / "cfg.json", {
        "d_in": d_model, "d_sae": n_features, "dtype": "float32", "device": "cpu",
        "architecture": "topk",
        "k": sae.k, "apply_b_dec_to_input": False, "normalize_activations": "none",
        "metadata": {**metadata, "prepend_bos": False, "exclude_special_tokens": False,
                     "sae_lens_version": SAELENS_VERSION}})


def load_model(folder):
    """The DualEncoder saved in `folder` by save_model, bit for bit. A missing, truncated or
    mismatched file is a one-line DualencError."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "cfg.json").read_text())
        sae = de.TopKSAE(cfg["d_in"], cfg["d_sae"], cfg["k"])
        sae.load_state_dict(load_file(folder / "sae_zscored.safetensors"))
        norm = load_file(folder / "zscore.safetensors")
        if norm["mean"].shape != (cfg["d_in"],) or norm["std"].shape != (cfg["d_in"],):
            raise ValueError(f"normalisation statistics do not have d_in = {cfg['d_in']} entries")
        nfm = None
        if (folder / "nfm_cfg.json").exists():
            nfm = de.NFM(**json.loads((folder / "nfm_cfg.json").read_text()))
            nfm.load_state_dict(load_file(folder / "nfm.safetensors"))
    except (OSError, KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as e:
        raise DualencError(f"cannot load the model in {folder}: {one_line(e)}") from None
    return de.DualEncoder(sae, nfm, norm["mean"], norm["std"]).eval()


# ----------------------------------------------------------------------------- run state

class TrainState:
    """Where dualenc.fit resumes a model: its weights, the optimiser's state, the step, the history
    and the RNG (dropout draws from the global generators), saved at each evaluation in one file."""

    def __init__(self, path):
        self.path = path

    def save(self, step, model, optimiser, history):
        rng = {"rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda_rng"] = torch.cuda.get_rng_state()
        state = {"step": step, "model": model.state_dict(), "opt": optimiser.state_dict(),
                 "history": history, **rng}
        atomic_write(self.path, lambda p: torch.save(state, p))

    def load(self, model, optimiser):
        """(step, history) where training stopped, with model and optimiser restored; (0, []) when
        nothing is saved."""
        if not self.path.exists():
            return 0, []
        try:
            # on the CPU first: every rank of a torchrun job loads it onto its own device
            state = torch.load(self.path, weights_only=True, map_location="cpu")
            model.load_state_dict(state["model"])
            optimiser.load_state_dict(state["opt"])
            torch.set_rng_state(state["rng"])
            if "cuda_rng" in state:
                torch.cuda.set_rng_state(state["cuda_rng"])
        except (OSError, KeyError, ValueError, RuntimeError, EOFError,
                pickle.UnpicklingError) as e:
            raise DualencError(f"cannot resume from {self.path}: {one_line(e)}") from None
        print(f"resuming {self.path.parent.name} at step {state['step']}", file=sys.stderr)
        return state["step"], state["history"]
