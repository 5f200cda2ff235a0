"""training: the referee's training loop, dualenc.fit with what long runs need besides.

dualenc.fit is the method's loop: one process, one run from step 0 to the end. This one runs the
same steps, on the same batches, to the same bits in one process on the CPU (tested), and adds: resuming from
a saved state, stopping early (`until`) or ending the schedule elsewhere (`length`), a callback
at each evaluation, wsd decay branches (a checkpoint as a finished model of its length), and data
parallelism over torchrun's ranks through `parallel` (distributed.DataParallel; OneProcess here).
dualenc's regimes take it as their loop: dualenc.train_joint(model, ..., loop=training.fit).
Sections:
  ranks      SharedDropout (the ranks drop what one process would), OneProcess
  batches    batches (a rank's share of each step's batch)
  branches   branch_start, decay_branch
  the loop   fit
"""

import copy
import math

import torch
import torch.nn as nn
from tqdm.auto import tqdm

import dualenc as de


# ----------------------------------------------------------------------------- ranks

class SharedDropout(nn.Module):
    """Dropout that draws the mask of the whole global batch and keeps this rank's rows (share =
    (rank, ranks)), so that ranks holding the same random state together drop what one process
    would. On the CPU in one process it is nn.Dropout to the bit (its CPU kernel draws the same
    bernoulli mask); on CUDA nn.Dropout's fused kernel draws another, so the referee installs this
    in one process too."""

    def __init__(self, p, share=(0, 1)):
        super().__init__()
        self.p, self.share = p, share

    def forward(self, a_BM):
        if not self.training or self.p == 0:
            return a_BM
        (rank, ranks), B = self.share, len(a_BM)
        scale_BM = a_BM.new_empty((B * ranks, a_BM.shape[1])).bernoulli_(1 - self.p)
        scale_BM.div_(1 - self.p)
        return a_BM * scale_BM[rank * B:(rank + 1) * B]


def share_dropout(model, share):
    """Every NFM of `model` drops with SharedDropout of this share of the global batch."""
    for module in model.modules():
        if isinstance(module, de.NFM):
            module.dropout = SharedDropout(module.config["dropout"], share).train(module.training)


class OneProcess:
    """How fit trains across processes: here, in one. distributed.DataParallel is the same four
    members over torch.distributed's ranks, each training on its share of every global batch."""
    main = True  # this process evaluates, logs and saves

    def wrap(self, model):
        """The module the steps run through (DistributedDataParallel: it averages gradients)."""
        share_dropout(model, (0, 1))
        return model

    def share(self, rows_B):
        """This process's rows of a global batch."""
        return rows_B

    def gather(self, value):
        """A scalar of every process, [ranks]."""
        return value.reshape(1)


# ----------------------------------------------------------------------------- batches

def batches(x_train_ND, cfg, start, stop, parallel=OneProcess()):
    """(step, batch [B, D]) for steps start..stop-1, dualenc.batch_rows' batches; under data
    parallelism this rank's share of each (its rows only are read)."""
    for step, rows_B in de.batch_rows(len(x_train_ND), cfg, start, stop, x_train_ND.device):
        yield step, x_train_ND[parallel.share(rows_B)]


# ----------------------------------------------------------------------------- branches

def branch_start(stop, cfg):
    """The step at which a wsd branch to `stop` leaves the main run: its decay's first step."""
    return math.floor((1 - cfg.wsd_decay) * stop)


def decay_branch(model, optimiser, x_train_ND, cfg, stop, parallel=OneProcess()):
    """A finished model of `stop` steps (wsd), branched off a longer run at branch_start(stop):
    a copy of the run's model and Adam state trained on the run's own batches up to `stop` with
    its own decay, lr_at(step, stop), data-parallel as the run. Until its decay a wsd rate does not
    depend on the run's length, so the run's state there is the shorter run's. The run's model,
    optimiser and random state are untouched: its own steps go on bit for bit."""
    branch = copy.deepcopy(model)
    position = {id(p): i for i, p in enumerate(model.parameters())}
    copies = list(branch.parameters())
    params = [copies[position[id(p)]] for p in optimiser.param_groups[0]["params"]]
    branch_optimiser = torch.optim.Adam(params, fused=True)  # its settings come with the state
    # a deep copy: load_state_dict may keep the run's own moment tensors, which the branch updates
    branch_optimiser.load_state_dict(copy.deepcopy(optimiser.state_dict()))
    devices = [x_train_ND.device] if x_train_ND.device.type == "cuda" else []
    trainer = parallel.wrap(branch)
    with torch.random.fork_rng(devices):  # dropout's draws in the branch leave the run's alone
        for step, batch_BD in batches(x_train_ND, cfg, branch_start(stop, cfg), stop, parallel):
            de.set_lr(branch_optimiser, de.lr_at(step, stop, cfg))
            de.train_step(trainer, branch_optimiser, batch_BD, cfg.precision, cfg.clip_norm)
    return branch.eval()


# ----------------------------------------------------------------------------- the loop

def fit(model, params, x_train_ND, x_curve_ND, cfg, name, state=None, on_eval=None, until=None,
        length=None, branches=(), on_branch=None, parallel=OneProcess()):
    """dualenc.fit's steps, and: `state` (checkpoint.TrainState, or None): training resumes from
    what it holds, and it is saved anew at each evaluation; on_eval(step, model) after each
    evaluation; `until` stops after that step; `length` (default: cfg.epochs epochs) is where the
    schedule ends. With cfg.schedule "wsd", each step of `branches` gets a finished model of its
    own (decay_branch), given to on_branch(step, model). `parallel`: each rank steps on its share
    of the batch; the main one alone evaluates, calls back and saves. Returns the curve."""
    optimiser = de.adam(params, cfg)
    steps = length or cfg.epochs * de.per_epoch_steps(len(x_train_ND), cfg)
    last = steps if until is None else min(until, steps)
    if branches and cfg.schedule != "wsd":
        raise de.DualencError("checkpoint branches need --schedule wsd")
    before_end = [b for b in branches if b < steps]
    branch_at = {branch_start(b, cfg): b for b in before_end}
    if len(branch_at) < len(before_end):
        raise de.DualencError(f"checkpoints {sorted(branches)} would branch off at the same "
                              "step; lower --wsd-decay")
    start, history = (0, []) if state is None else state.load(model, optimiser)
    trainer = parallel.wrap(model)
    loss_sum, n_sum = 0.0, 0
    model.train()
    bar = tqdm(batches(x_train_ND, cfg, start, last, parallel), desc=name, leave=False,
               initial=start, total=last, disable=not parallel.main)
    for step, batch_BD in bar:
        if step in branch_at:  # before this step: the branch starts from the same state
            branch = decay_branch(model, optimiser, x_train_ND, cfg, branch_at[step], parallel)
            if parallel.main:
                on_branch(branch_at[step], branch)
        de.set_lr(optimiser, de.lr_at(step, steps, cfg))
        loss = de.train_step(trainer, optimiser, batch_BD, cfg.precision, cfg.clip_norm)
        loss_sum, n_sum = loss_sum + loss, n_sum + 1
        if (step + 1) % cfg.eval_every == 0 or step + 1 == last:
            # one host sync per cadence, not per step; every rank stops if any rank's loss is bad
            losses = parallel.gather(loss_sum / n_sum).tolist()
            bad = [rank for rank, value in enumerate(losses) if not math.isfinite(value)]
            if bad:  # averaged gradients carry one rank's NaN to every rank in a step
                where = f" on rank {', '.join(map(str, bad))}" if len(losses) > 1 else ""
                raise de.DualencError(f"{name}: training loss became {losses[bad[0]]}{where} "
                                      f"at step {step + 1}")
            loss_sum, n_sum = 0.0, 0
            if not parallel.main:
                continue
            train_loss = sum(losses) / len(losses)
            ev = de.evaluate(model, x_curve_ND)
            history.append({"step": step + 1, "train_mse": train_loss, **ev})
            bar.write(de.log_line(name, step + 1, steps, train_loss, ev))
            if on_eval is not None:
                on_eval(step + 1, model)
            if state is not None:
                state.save(step + 1, model, optimiser, history)
    model.eval()
    return history
