"""store: block-L activations on disk, for runs larger than memory (docs/method.md §15).

runner.load_data holds a run's activations in memory; load_data here reads the same split of the
same tokens from an ActivationStore, extracted once per key and reused by every later run. It
imports dualenc and runner, and corpus, language_model and checkpoint for the text, the LM and
meta.json. Sections, in the order data flows:
  activation store  ActivationStore: one folder per key, locked, resumable extraction, sharded over
                    torchrun's ranks
  tokens            Tokens (a store's tokens, z-scored on read), token_rows, streamed_moments
  data              store_key, weights_fingerprint, made, load_data
Dimension letters as in dualenc.py; W windows.
"""

import fcntl
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

import dualenc as de
from dualenc import DualencError
from referee import checkpoint, corpus, distributed, language_model, runner


# ----------------------------------------------------------------------------- activation store

class ActivationStore:
    """Block-L outputs of a corpus's windows on disk, for runs larger than RAM (§15), in a folder
    named by its key (model, layer, dtype, the LM's precision and a hash of the token windows, so
    text, token count and ctx):
        acts.bin   [N, T, D] in `dtype` (float32, or float16 at half the disk), window after window
        norms.bin  [N, T] float32 norms of the float32 outputs (the outlier threshold, §2)
        done.bin   a byte per batch of BATCH windows: 1 once its bytes are written and flushed
        meta.json  the key, the shape and the batch
    Extraction runs batch by batch, each written at its own offset (under torchrun, each rank
    takes every ranks-th batch), and fills in the batches not yet done: an interrupted or partly
    sharded store is completed by the next extraction, with the same bytes as an uninterrupted
    one. A folder whose meta or file sizes do not match is refused in one line, never read."""

    BATCH = 16  # windows an extraction step runs through the LM; a batch's bytes depend on it

    def __init__(self, root, key, shape_NTD):
        self.key, self.shape = key, tuple(shape_NTD)
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()
        self.folder = Path(root) / digest[:16]
        self.dtype = getattr(torch, key["dtype"])
        self.row_bytes = shape_NTD[2] * self.dtype.itemsize
        self.n_batches = -(-self.shape[0] // self.BATCH)
        self.done = self.recorded()

    def recorded(self):
        """Which batches are written, [n_batches] bool, once the meta and the files' sizes are
        checked: a finished store must have exactly its size, an unfinished one room for what it
        records. (A store of an earlier version counted a prefix of windows: read as such.)"""
        meta = self.folder / "meta.json"
        if not meta.exists():
            return torch.zeros(self.n_batches, dtype=torch.bool)
        try:
            saved = json.loads(meta.read_text())
            ok = (saved["key"] == self.key and saved["shape"] == list(self.shape)
                  and saved.get("batch", self.BATCH) == self.BATCH)
            if "windows_done" in saved:
                ends = (torch.arange(self.n_batches) + 1) * self.BATCH
                done = (ends <= saved["windows_done"]) | (saved["windows_done"] == self.shape[0])
            else:
                marks = (self.folder / "done.bin").read_bytes()
                if len(marks) > self.n_batches:
                    raise DualencError(f"activation store {self.folder} has {len(marks):,} bytes "
                                       f"in done.bin for {self.n_batches:,} batches; delete it to "
                                       "rebuild")
                done = torch.tensor(list(marks.ljust(self.n_batches, b"\0")), dtype=torch.bool)
            actual = {name: (self.folder / name).stat().st_size for name in self.sizes(0)}
        except (OSError, ValueError, KeyError) as e:
            raise DualencError(f"activation store {self.folder} is unreadable "
                               f"({checkpoint.one_line(e)}); delete it") from None
        if not ok:
            raise DualencError(f"activation store {self.folder} holds another key than this run's; "
                               "delete it")
        written = int(done.nonzero().max()) + 1 if done.any() else 0
        for name, size in self.sizes(min(written * self.BATCH, self.shape[0])).items():
            full = self.sizes(self.shape[0])[name]
            if actual[name] < size or (done.all() and actual[name] != full):
                raise DualencError(f"activation store {self.folder} has {actual[name]:,} bytes in "
                                   f"{name} where {full if done.all() else size:,} are recorded; "
                                   "delete it to rebuild")
        return done

    def sizes(self, n_windows):
        T = self.shape[1]
        return {"acts.bin": n_windows * T * self.row_bytes, "norms.bin": n_windows * T * 4}

    @property
    def complete(self):
        return bool(self.done.all())

    def extract(self, lm, windows_NT, layer, precision="fp32", parallel=None):
        """Fill the store: the main rank holds its lock (a second job extracting the same key waits,
        then finds it done or completes it) and lays the files out; every rank then writes its
        share of the batches not yet done (distributed.DataParallel.batches)."""
        parallel = parallel or distributed.DataParallel()
        if parallel.main:
            self.folder.mkdir(parents=True, exist_ok=True)
        parallel.barrier()
        with open(self.folder / "lock", "w") as lock:
            if parallel.main:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    print(f"another process is extracting {self.folder}; waiting for it",
                          file=sys.stderr)
                    fcntl.flock(lock, fcntl.LOCK_EX)
                self.done = self.recorded()
                if not self.complete:
                    self.lay_out()
            parallel.barrier()  # the files are laid out: every rank writes its batches
            self.done = self.recorded()
            todo = parallel.batches((~self.done).nonzero().flatten().tolist())
            self.write_batches(lm, windows_NT, layer, precision, todo)
            parallel.barrier()  # every rank's batches are written
            self.done = self.recorded()

    def lay_out(self):
        """The data files at exactly their full size (bytes written past it by an interrupted
        process are dropped; batches not done are rewritten), done.bin as recorded, meta.json."""
        try:
            for name, size in self.sizes(self.shape[0]).items():
                with open(self.folder / name, "ab") as f:
                    f.truncate(size)
            (self.folder / "done.bin").write_bytes(bytes(self.done.tolist()))
            checkpoint.write_json(self.folder / "meta.json", {
                "key": self.key, "shape": list(self.shape), "batch": self.BATCH})
        except OSError as e:
            raise DualencError(f"cannot lay out the activation store {self.folder}: "
                               f"{e.strerror or e}") from None

    @torch.no_grad()
    def write_batches(self, lm, windows_NT, layer, precision, todo):
        """The batches `todo` (indices of BATCH windows), each written at its own offset and
        flushed before done.bin counts it. A full disk stops with one line; the store then reads
        as unfinished."""
        T, files, batch = self.shape[1], {}, self.BATCH
        i = todo[0] * batch if todo else 0
        try:
            for name in ("acts.bin", "norms.bin", "done.bin"):
                files[name] = os.open(self.folder / name, os.O_RDWR)
            for b in tqdm(todo, desc="extract to store", leave=False):
                i = b * batch
                acts_BTD = de.extract_activations(lm, windows_NT[i:i + batch], layer, batch,
                                                  precision)
                acts_bytes = acts_BTD.to(self.dtype).cpu().numpy().tobytes()
                os.pwrite(files["acts.bin"], acts_bytes, i * T * self.row_bytes)
                norms_bytes = acts_BTD.norm(dim=-1).cpu().numpy().tobytes()
                os.pwrite(files["norms.bin"], norms_bytes, i * T * 4)
                for fd in (files["acts.bin"], files["norms.bin"]):
                    os.fsync(fd)
                os.pwrite(files["done.bin"], b"\1", b)
                os.fsync(files["done.bin"])
        except OSError as e:
            raise DualencError(f"writing the activation store {self.folder} failed at window "
                               f"{i}: {e.strerror or e} (free space and run again: it "
                               "resumes there)") from None
        finally:
            for fd in files.values():
                os.close(fd)

    def norms(self):
        """[N, T] float32."""
        norms = torch.from_file(str(self.folder / "norms.bin"), size=self.shape[0] * self.shape[1])
        return norms.view(self.shape[:2])

    def read(self, starts, n_rows):
        """n_rows consecutive tokens (rows of D) from each flat token index in `starts` (window * T
        + position): [len(starts), n_rows, D] float32. Read with preadv into one buffer, not mapped:
        the page cache holds the file, not this process."""
        nbytes = n_rows * self.row_bytes
        buf = bytearray(len(starts) * nbytes)
        view = memoryview(buf)
        with open(self.folder / "acts.bin", "rb") as f:
            for i, start in enumerate(starts):
                part = view[i * nbytes:(i + 1) * nbytes]
                if os.preadv(f.fileno(), [part], int(start) * self.row_bytes) != nbytes:
                    raise DualencError(f"activation store {self.folder} is truncated; delete it to "
                                       "rebuild")
        acts = torch.frombuffer(buf, dtype=self.dtype).view(len(starts), n_rows, self.shape[2])
        return acts.float()

    def windows(self, w_N):
        """The given windows' activations, [len(w_N), T, D] float32."""
        T = self.shape[1]
        return self.read([int(w) * T for w in w_N], T)

    def rows(self, rows_B):
        """Tokens (flat indices window * T + position) as [B, D] float32."""
        return self.read(rows_B, 1)[:, 0]


# ----------------------------------------------------------------------------- tokens

class Tokens:
    """Some tokens of a store, z-scored on read: the training set that fit() samples its batches
    from and the held-out set evaluated in batches, with the tensor methods they use (len, [idx],
    shape, device, split)."""

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
    """Flat indices (window * T + position) of the given windows' kept tokens, in their order."""
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
    var_D = ((ss_D - n * mean_D.square()) / (n - 1)).clamp_min(0)
    return mean_D.float(), var_D.sqrt().float().clamp_min(1e-6)


# ----------------------------------------------------------------------------- data

LOADING_ONLY = ("_name_or_path", "quantization_config", "transformers_version", "torch_dtype",
                "dtype", "_commit_hash")


def store_key(cfg, lm, layer, windows_NT):
    """What the activations depend on: the model (its config, without what only says how it was
    loaded: a GGUF file and its cached de-quantised copy are one model, and its weights'
    fingerprint), the layer, the dtype on disk, the precision the LM ran in and the token
    windows."""
    config = {k: v for k, v in lm.config.to_dict().items() if k not in LOADING_ONLY}
    config_json = json.dumps(config, sort_keys=True, default=str)
    return {"model": cfg.model, "config": hashlib.sha1(config_json.encode()).hexdigest(),
            "weights": weights_fingerprint(lm), "layer": layer, "dtype": cfg.store_dtype,
            "lm_precision": cfg.extract_precision,
            "windows": corpus.windows_sha1(windows_NT),
            "shape_NT": list(windows_NT.shape)}


def weights_fingerprint(lm):
    """sha1 of the LM's parameters and buffers in name order (about a second for SmolLM2): a model
    folder overwritten by another checkpoint of the same architecture never reads the first's
    store."""
    h = hashlib.sha1()
    for name, t in sorted(lm.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def made(folder):
    """`folder`, made if it is not there yet."""
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def load_data(cfg, layer, device, parallel=None):
    """runner.load_data with the activations in a store (ActivationStore): extracted once per key
    and reused, the training and held-out tokens read from disk batch by batch (Tokens), so that
    memory does not grow with the number of tokens. The same split as runner's
    (dualenc.split_windows of de.window_order), z-scored with the training tokens' moments
    streamed from disk. Under torchrun (`parallel`), the ranks extract the store together."""
    text = corpus.read_text(cfg.text, cfg.corpus)
    lm, tokenizer = language_model.load_lm(cfg.model, device)
    windows_NT = de.make_windows(tokenizer, text, cfg.tokens, cfg.ctx)
    N, T = windows_NT.shape
    parallel = parallel or distributed.DataParallel()
    parallel.shared(lambda: made(Path(cfg.store)), "activation store")
    store = ActivationStore(cfg.store, store_key(cfg, lm, layer, windows_NT),
                            (N, T, lm.config.hidden_size))
    if not parallel.broadcast(store.complete):  # one decision: a job elsewhere may be writing
        store.extract(lm, windows_NT, layer, cfg.extract_precision, parallel)
    else:
        print(f"activations from the store {store.folder}", file=sys.stderr)
    split = de.split_windows(store.norms(), de.window_order(N, cfg.seed), cfg.outlier_factor,
                             cfg.splice_tokens // cfg.ctx)
    mean_D, std_D = (t.to(device) for t in streamed_moments(store, split.train_W, split.keep_NT))
    data = runner.prepare(split, windows_NT,
                      lambda w: Tokens(store, token_rows(w, split.keep_NT), mean_D, std_D),
                      mean_D, std_D, store.windows(split.splice_W.tolist()).to(device), layer,
                      len(de.decoder_blocks(lm)), cfg.curve_windows,
                      corpus.windows_sha1(windows_NT))
    runner.describe_data(data, cfg)
    return lm, tokenizer, data
