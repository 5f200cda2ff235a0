"""distributed: data-parallel training and sharded extraction under torchrun (torch.distributed).

    torchrun --standalone --nproc-per-node N -m referee ...   (or -m referee.runner)

(docs/distributed.md).

Each of the N processes (ranks) holds the whole model; every global batch (--batch-size, as in one
process: the same batches, the same steps) is cut into N equal shares, each rank steps on its
own, and DistributedDataParallel averages the gradients before the one optimiser step that every
rank takes alike. Rank 0 evaluates and writes the run folder; the others wait for it at the next
collective. training.fit knows ranks only through DataParallel's four members
(training.OneProcess), the NFM's dropout through training.SharedDropout. Sections, in the order a
run meets them:
  process group  DataParallel, silence_others, start (from torchrun's environment: gloo on CPU,
                 NCCL on CUDA), stop, leave
  faults         what a rank does when the job fails: one line for the whole job, naming the rank
"""

import os
import signal
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import dualenc as de
from referee import checkpoint, training

FAILED = "failed"  # the job's count of ranks that have failed: the first one speaks for it


# ----------------------------------------------------------------------------- process group

class DataParallel(training.OneProcess):
    """fit's `parallel` over the ranks of a process group (one rank, alone: no group, and every
    member is training.OneProcess's). Also what the runner needs of ranks: barrier, broadcast, and
    extraction's share of the store's batches."""

    def __init__(self, rank=0, ranks=1, store=None, device=None):
        self.rank, self.ranks, self.store, self.device = rank, ranks, store, device
        self.main = rank == 0
        self.dropped = 0  # tokens of each global batch no rank trains on (the batch over ranks)
        self.run_dir = None  # the run folder, once known: a failure's line says how to resume

    def wrap(self, model):
        training.share_dropout(model, (self.rank, self.ranks))
        if self.ranks == 1:
            return model
        # buffers (the z-score statistics) are constant: synced once, not at every forward
        ids = [self.device] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)

    def share(self, rows_B):
        """Equal shares, rank after rank; the last len % ranks rows of a batch are dropped."""
        b = len(rows_B) // self.ranks
        if b == 0:
            raise de.DualencError(f"a batch of {len(rows_B)} tokens cannot be shared by "
                                  f"{self.ranks} ranks; raise --batch-size")
        if len(rows_B) % self.ranks and self.main and self.dropped != len(rows_B) % self.ranks:
            self.dropped = len(rows_B) % self.ranks
            print(f"--batch-size {len(rows_B)} over {self.ranks} ranks: each trains on {b} tokens "
                  f"a step and the batch's last {self.dropped} are dropped (a batch a multiple of "
                  f"{self.ranks} drops none)", file=sys.stderr)
        return rows_B[self.rank * b:(self.rank + 1) * b]

    def gather(self, value):
        if self.ranks == 1:
            return value.reshape(1)
        values = [torch.empty(1, device=self.device) for _ in range(self.ranks)]
        dist.all_gather(values, value.reshape(1).float().to(self.device))
        return torch.cat(values).cpu()

    def barrier(self):
        if self.ranks > 1:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (a path or a decision all ranks must share)."""
        if self.ranks == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shared(self, make, what):
        """The folder make() gives on rank 0 (which makes it), on every rank; refused in one line
        where some rank cannot see it: every rank reads the run folder (resuming, checkpoints)
        and writes the store, so on several nodes they must be on a filesystem that every node
        mounts."""
        folder = self.broadcast(make() if self.main else None)
        if self.ranks == 1:
            return folder
        mark = Path(folder) / self.broadcast(f".rank0-{os.getpid()}-{time.time_ns()}")
        if self.main:
            mark.touch()
        self.barrier()
        seen = self.gather(torch.tensor(float(mark.exists())))  # a collective: all have looked
        if self.main:
            mark.unlink()
        blind = [rank for rank, saw in enumerate(seen.tolist()) if not saw]
        if blind:
            raise de.DualencError(f"rank {', '.join(map(str, blind))} cannot see the {what} "
                                  f"{folder} that rank 0 writes: on several nodes it must be on a "
                                  "filesystem that every node mounts")
        return folder

    def alone(self):
        """For a run with nothing to train (--eval-only, --combine, --compare): rank 0 works as a
        job of one rank, the others get None and return at once."""
        return DataParallel(device=self.device) if self.main else None

    def batches(self, pending):
        """This rank's share of an extraction's pending batches: every ranks-th, from its own rank
        on (the shares differ by one batch at most)."""
        return pending[self.rank::self.ranks]


def silence_others():
    """Under torchrun, ranks above 0 print nothing from here on: rank 0 speaks for the job (its
    flags' errors and --help included). A rank's own failure still reaches torchrun's stderr."""
    if int(os.environ.get("RANK", "0")) > 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")


class JoinError(de.DualencError):
    """This rank could not join the job: said by the rank itself, since the others may be fine."""


def start(device, timeout_minutes=60):
    """DataParallel for this process: under torchrun (WORLD_SIZE > 1), joined to the others' process
    group over torchrun's store (gloo on CPU, NCCL on CUDA, each rank its LOCAL_RANK's GPU), every
    collective given up after `timeout_minutes`; otherwise alone, on `device`."""
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks == 1:
        return DataParallel(device=device)
    timeout = timedelta(minutes=timeout_minutes)
    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        # torchrun's agent hosts the store (TORCHELASTIC_USE_AGENT_STORE); launched by hand, rank 0
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        tcp = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                            world_size=ranks, is_master=rank == 0 and not agent, timeout=timeout,
                            wait_for_workers=False)
        # keys of this attempt only: a job torchrun restarts must not read the last one's
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"dualenc/attempt_{attempt}", tcp)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store,
                                rank=rank, world_size=ranks, timeout=timeout)
        store.set(f"pid/{rank}", f"{socket.gethostname()} {os.getpid()}")
    except (KeyError, ValueError, RuntimeError) as e:
        raise JoinError(f"rank {os.environ.get('RANK', '?')} cannot join the torchrun job: "
                        f"{checkpoint.one_line(e)}") from None
    signal.signal(signal.SIGTERM, stopped)  # torchrun ending the job: a rank elsewhere failed
    return DataParallel(rank, ranks, store, device)


def stop(parallel):
    """The end of a rank whose work went well: marked finished (a rank that has ended is not
    then taken for one that was killed), and its process group taken down."""
    if parallel is not None and parallel.ranks > 1 and dist.is_initialized():
        parallel.store.set(f"finished/{parallel.rank}", "1")
        dist.destroy_process_group()


def leave(parallel, status):
    """The end of a rank whose job failed, with `status`: at once under torchrun (taking the group
    down would wait on ranks that may be gone, and torchrun's stop is ignored by now)."""
    if parallel is None or parallel.ranks == 1:
        sys.exit(status)
    sys.stdout.flush()
    sys.__stderr__.flush()
    os._exit(status)


# ----------------------------------------------------------------------------- faults

class Stopped(Exception):
    """torchrun stopped this rank (SIGTERM): another rank failed."""


def stopped(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the rank is now failing
    raise Stopped


def failing(parallel):
    """This rank is failing: torchrun's SIGTERM is ignored from now on (the report is said in a
    moment, and torchrun kills what is left after its grace period), and the failure is counted in
    the job's store. True for the first rank to fail, the one that speaks for the job."""
    if parallel is None or parallel.ranks == 1:
        return True
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        return parallel.store.add(FAILED, 1) == 1
    except RuntimeError:  # the store went with the agent that hosted it: speak anyway
        return True


def ended(pid):
    """Whether the process pid has ended: gone, or a zombie its launcher has not reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except OSError:  # no /proc: ask the process itself
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


def gone(parallel):
    """The ranks on this host whose process has ended without finishing its work (a rank killed
    says nothing itself)."""
    host, lost = socket.gethostname(), []
    for rank in range(parallel.ranks):
        try:
            if (not parallel.store.check([f"pid/{rank}"])
                    or parallel.store.check([f"finished/{rank}"])):
                continue
            where, pid = parallel.store.get(f"pid/{rank}").decode().split()
        except (RuntimeError, ValueError):
            continue
        if where == host and ended(int(pid)):
            lost.append(rank)
    return lost


def collective_error(error):
    """An error of the collectives' backends (a peer gone, a timeout): gloo and NCCL raise plain
    RuntimeErrors that name themselves."""
    return isinstance(error, dist.DistError) or any(
        name in str(error) for name in ("gloo", "NCCL", "c10d"))


def caused_elsewhere(parallel, error, first):
    """Whether `error` came from the job's end elsewhere: another rank failed first, torchrun
    stopped this one, or a collective failed (a peer gone). A rank that fails first of its own
    (a bug) is not excused by peers that have ended since: they left because it failed."""
    if parallel is None or parallel.ranks == 1:
        return False
    return not first or isinstance(error, Stopped) or collective_error(error)


def crashed(parallel):
    """A bug on the first rank to fail: its traceback shown, even on a silenced rank."""
    if parallel is not None and parallel.ranks > 1:
        sys.stderr = sys.__stderr__


def report(parallel, prog, error, first):
    """The job's one line, said by the first rank to fail (`first`; the others leave quietly) on
    the stderr torchrun shows. `error`: this rank's DualencError, or the collective error or
    Stopped that a rank's end elsewhere caused here. Returns the exit status: 2 for the user's
    error, 1 for a job ended from elsewhere."""
    if isinstance(error, JoinError):  # before the group: this rank's own
        print(f"{prog}: error: {error}", file=sys.__stderr__, flush=True)
        return 2
    if parallel is None or parallel.ranks == 1:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    status = 2 if isinstance(error, de.DualencError) else 1
    if not first:
        return status
    if isinstance(error, de.DualencError):
        line = f"rank {parallel.rank}: {error}"
    else:
        lost = gone(parallel)
        if lost:
            who = f"rank {', '.join(map(str, lost))} ended without a word (killed?)"
        else:
            why = checkpoint.one_line(error, limit=120) if str(error) else "stopped by torchrun"
            who = f"rank {parallel.rank} lost the others ({why})"
        line = f"{who}; every rank stops"
        if parallel.run_dir is not None:
            line += f"; finish the run with --resume {parallel.run_dir}"
    print(f"{prog}: error: {line}", file=sys.__stderr__, flush=True)
    return status
