"""The direct relaxed-Bernoulli sampler of `PolySelector` against torch.distributions.RelaxedBernoulli:
same random draws, same samples and gradients (it replaces the distribution object for speed)."""

from __future__ import annotations

import torch
from torch.distributions import RelaxedBernoulli

from mttl.adapters.routing import relaxed_bernoulli_sample


def test_samples_and_gradients_match_torch_relaxed_bernoulli():
    logits = (torch.randn(32, 4, 8, dtype=torch.float64) * 3).requires_grad_()
    torch.manual_seed(11)
    expected = RelaxedBernoulli(torch.tensor(1.0, dtype=torch.float64), logits=logits).rsample()
    expected_grad, = torch.autograd.grad((expected * torch.arange(8.0, dtype=torch.float64)).sum(), logits)
    torch.manual_seed(11)
    got = relaxed_bernoulli_sample(logits)
    got_grad, = torch.autograd.grad((got * torch.arange(8.0, dtype=torch.float64)).sum(), logits)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-7, atol=1e-10)


def test_float32_samples_stay_inside_the_open_interval():
    torch.manual_seed(0)
    samples = relaxed_bernoulli_sample(torch.tensor([[-40.0, 40.0]]).repeat(1000, 1))
    eps = torch.finfo(torch.float32).eps
    assert samples.min().item() >= eps and samples.max().item() <= 1 - eps
