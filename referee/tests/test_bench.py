"""Tests of referee/bench.py: the slower ways it times against the method's compute the same."""

import pytest
import torch

import dualenc as de
from referee.bench import dense_nfm
from test_dualenc import D, FEATS, K, M


@pytest.mark.parametrize("n_read", [K, K // 2])
def test_the_papers_dense_nfm_equals_the_sparse_one(n_read):
    torch.manual_seed(0)
    nfm = de.NFM(FEATS, D, M, n_read=n_read).eval()
    vals, idx = de.TopKSAE(D, FEATS, K).encode(torch.randn(6, D))
    vals = vals.detach().requires_grad_(True)
    outputs, grads = [], []
    for forward in (nfm, lambda v, i: dense_nfm(nfm, v, i)):
        linear, interaction = forward(vals, idx)
        (linear.sin().sum() + interaction.cos().sum()).backward()
        outputs.append((linear, interaction))
        grads.append([vals.grad.clone()] + [p.grad.clone() for p in nfm.parameters()])
        vals.grad = None
        nfm.zero_grad()
    for a, b in zip(outputs[0], outputs[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
