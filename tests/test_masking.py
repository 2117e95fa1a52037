"""Guards masking.py: per-frame counts, no duplicates, sorted, in range, seeded, and the attention bias."""
import pytest
import torch

from masking import make_mask, num_keep, random_mask, semantic_mask, tube_mask


def check_keep(keep, B, T, n, ratio):
    k = num_keep(n, ratio)
    assert keep.shape == (B, T * k) and keep.dtype == torch.long
    assert (keep[:, 1:] > keep[:, :-1]).all()                          # sorted, hence no duplicates
    frame = keep.view(B, T, k) // n
    assert torch.equal(frame, torch.arange(T)[None, :, None].expand(B, T, k))   # exactly k in every frame


@pytest.mark.parametrize('kind', ['random', 'tube', 'semantic'])
@pytest.mark.parametrize('ratio', [0.0, 0.5, 0.8, 0.99])
def test_invariants(kind, ratio):
    B, T, n = 3, 4, 196
    attn = torch.rand(B, T, n).softmax(-1)
    keep = make_mask(kind, attn, ratio, torch.Generator().manual_seed(0))
    check_keep(keep, B, T, n, ratio)
    assert num_keep(196, 0.8) == 40
    again = make_mask(kind, attn, ratio, torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)                                      # seeded determinism


def test_tube_repeats_one_pattern():
    keep = tube_mask(2, 3, 16, 0.75, generator=torch.Generator().manual_seed(1)).view(2, 3, 4)
    local = keep % 16
    assert torch.equal(local[:, 0], local[:, 1]) and torch.equal(local[:, 0], local[:, 2])
    r = random_mask(8, 3, 16, 0.75, generator=torch.Generator().manual_seed(1)).view(8, 3, 4) % 16
    assert not torch.equal(r[:, 0], r[:, 1])                              # random masks differ per frame


def test_semantic_follows_attention():
    n, k = 6, 2
    w = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.1, 0.0])
    g = torch.Generator().manual_seed(0)
    draws = 20000
    keep = semantic_mask(w.expand(draws, 1, n), 1 - k / n, g) % n        # [draws, 2]
    ours = torch.bincount(keep.flatten(), minlength=n).float() / draws
    # reference: the official torch.multinomial without replacement, first k of a full permutation
    ref_idx = torch.multinomial(w.expand(draws, n), k, replacement=False, generator=g)
    ref = torch.bincount(ref_idx.flatten(), minlength=n).float() / draws
    assert (ours - ref).abs().max() < 0.02, (ours, ref)
    assert ours[5] == 0                                                  # zero attention is never picked
    assert ours[0] > ours[2] > ours[4]


def test_bad_arguments():
    with pytest.raises(ValueError, match='mask ratio'):
        num_keep(196, 1.0)
    with pytest.raises(ValueError, match='unknown mask type'):
        make_mask('block', torch.rand(1, 1, 4), 0.5)
    with pytest.raises(ValueError, match='attn'):
        semantic_mask(torch.rand(4, 4), 0.5)
