"""Tests of training.py, the referee's loop: in one process it trains dualenc's models to the bits
dualenc.fit gives, and what it adds (stopping early, wsd branches) holds its promises."""

import functools

import pytest
import torch
import torch.nn as nn

import dualenc as de
from referee import training
from test_dualenc import D, FEATS, K, M, small_cfg, synthetic_acts


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values()))


def test_the_referees_loop_trains_the_methods_three_models_to_the_same_bits():
    x, cfg = synthetic_acts(), small_cfg(epochs=2)
    data = de.Activations(x_train=x, x_eval=x[:256], mean=torch.zeros(D), std=torch.ones(D),
                          splice_ids=None, splice_keep=None, splice_acts=None, layer=0)
    trained = {}
    for fit in (de.fit, training.fit):
        done, curves = {}, {}
        for name, (make, train) in de.recipes(cfg, data).items():
            done[name] = make(done)
            curves[name] = train(done[name], x, data.x_eval, cfg, loop=fit)
        trained[fit] = done, curves
    (method, method_curves), (referee, referee_curves) = trained.values()
    assert method_curves == referee_curves
    assert all(same_weights(method[name], referee[name]) for name in method)
    assert isinstance(referee["joint"].nfm.dropout, training.SharedDropout)


def test_shared_dropout_is_nn_dropout_in_one_process_and_the_global_mask_over_ranks():
    a = torch.randn(8, 5)
    torch.manual_seed(1)
    one = nn.Dropout(0.3)(a)
    torch.manual_seed(1)
    assert torch.equal(training.SharedDropout(0.3)(a), one)
    halves = []
    for rank in (0, 1):  # two ranks, each half of the batch, the same random state
        torch.manual_seed(1)
        halves.append(training.SharedDropout(0.3, (rank, 2))(a[4 * rank:4 * rank + 4]))
    assert torch.equal(torch.cat(halves), one)


def test_training_until_a_step_is_the_whole_run_as_it_was_at_that_step():
    x, cfg = synthetic_acts(), small_cfg()
    snapshots = {}
    torch.manual_seed(0)
    whole = de.DualEncoder(de.TopKSAE(D, FEATS, K))
    de.train_sae(whole, x, x, cfg, loop=training.fit,
                 on_eval=lambda step, m: snapshots.setdefault(step, m.sae.W_dec.clone()))
    torch.manual_seed(0)
    part = de.DualEncoder(de.TopKSAE(D, FEATS, K))
    history = de.train_sae(part, x, x, cfg, loop=training.fit, until=30)
    assert history[-1]["step"] == 30 and torch.equal(part.sae.W_dec, snapshots[30])


def test_a_wsd_branch_is_the_shorter_run_and_leaves_the_main_run_as_it_was():
    # wsd: the rate is constant until a run's last quarter, so a branch that leaves a 64-step run
    # at step 24 and decays over 24..31 is the 32-step run, and the 64-step run goes on unchanged.
    x, cfg = synthetic_acts(), small_cfg(schedule="wsd", wsd_decay=0.25, warmup_steps=5)
    train = functools.partial(de.train_joint, loop=training.fit)  # the referee's loop

    def joint():
        torch.manual_seed(0)  # dropout draws from the global generator: branches must not move it
        return de.DualEncoder(de.TopKSAE(D, FEATS, K), de.NFM(FEATS, D, M, n_read=K))
    branched, branches = joint(), {}
    history = train(branched, x, x, cfg, branches=[32, 48],
                    on_branch=lambda step, model: branches.setdefault(step, model))
    plain = joint()
    assert train(plain, x, x, cfg) == history and same_weights(plain, branched)
    short = joint()
    train(short, x, x, cfg, length=32)
    assert sorted(branches) == [32, 48] and not branches[32].training
    assert same_weights(short, branches[32])
    assert de.lr_at(24, 32, cfg) == de.lr_at(24, 64, cfg) == cfg.lr > de.lr_at(25, 32, cfg)
    assert de.lr_at(31, 32, cfg) == pytest.approx(cfg.lr * (1 - 7 / 8 * (1 - cfg.lr_end)))
    with pytest.raises(de.DualencError, match="--schedule wsd"):
        train(joint(), x, x, small_cfg(), branches=[32], on_branch=print)
    with pytest.raises(de.DualencError, match="same step; lower --wsd-decay"):  # both start at 0
        train(joint(), x, x, small_cfg(schedule="wsd", wsd_decay=1.0), branches=[16, 32],
              on_branch=print)
