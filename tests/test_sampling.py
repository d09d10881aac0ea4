"""Sampling: the distribution after temperature / top-k / top-p, and draws from it."""
import torch
from scipy.stats import chisquare

from specoff.sampling import logits_to_probs, sample_from


def test_top_k_and_top_p_cut_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    torch.testing.assert_close(logits_to_probs(logits, 1.0), torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    torch.testing.assert_close(logits_to_probs(logits, 1.0, top_k=2), torch.tensor([[5 / 7, 2 / 7, 0, 0, 0]]))
    # top_p=0.8: 0.5 + 0.2 = 0.7 < 0.8 so 0.15 is kept too; 0.85 >= 0.8 drops the rest
    torch.testing.assert_close(logits_to_probs(logits, 1.0, top_p=0.8),
                               torch.tensor([[0.5, 0.2, 0.15, 0, 0]]) / 0.85)
    hot = logits_to_probs(logits, 2.0)
    torch.testing.assert_close(hot, torch.softmax(logits / 2, -1))


def test_draws_follow_the_distribution():
    p = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0])
    g = torch.Generator().manual_seed(0)
    draws = sample_from(p.expand(20000, -1).contiguous(), g)
    counts = torch.bincount(draws, minlength=5)
    assert counts[4] == 0
    assert chisquare(counts[:4].numpy(), (p[:4] * 20000).numpy()).pvalue > 0.01
