"""
Which tokens the student sees: random, tube and semantic (teacher-attention) masking.

Paper section 3.1: UMT hides most video tokens (80%) from the student and keeps the ones the
frozen CLIP teacher attends to, so the few visible tokens carry the clip's meaning.

Polarity convention: every function returns `keep`, a LongTensor [B, T*n_keep] of the KEPT token
indices in (t, h, w) raster order, sorted ascending. No boolean mask anywhere, so no confusion about
what True means (MAE, VideoMAE and UMT disagree), and selecting tokens is a gather, no host sync.

Every frame keeps exactly n_keep = n - int(n * ratio) of its n tokens (196 - 156 = 40 for ViT-B/16
at 224 px and ratio 0.8): the batch stays rectangular and shapes are static for torch.compile. The
official semantic mask has this property; its random mask draws int(ratio*T*n) over the whole
clip, which we replace by an independent uniform draw per frame with the same per-frame count (same
total). All draws are batched (no loop over samples), on the inputs' device, with an optional
generator.
"""

import torch

def num_keep(n, ratio):
    """Tokens kept per frame of n tokens at mask ratio `ratio` (the official rounding)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f'mask ratio must be in [0, 1), got {ratio}')
    return n - int(n * ratio)

def _topk_per_frame(scores, n_keep):
    """scores [B, T, n] -> keep [B, T*n_keep]: each frame's n_keep best tokens, as clip indices."""
    B, T, n = scores.shape
    idx = scores.topk(n_keep, dim=-1).indices.sort(dim=-1).values  # [B, T, n_keep], in-frame
    offset = torch.arange(T, device=scores.device)[None, :, None] * n  # [1, T, 1], frame starts
    return (idx + offset).flatten(1)                                # [B, T*n_keep], sorted

def random_mask(batch, frames, n, ratio, device=None, generator=None):
    """Uniformly random tokens, drawn independently in every frame: keep [B, T*n_keep]."""
    scores = torch.rand(batch, frames, n, device=device, generator=generator)  # [B, T, n]
    return _topk_per_frame(scores, num_keep(n, ratio))

def tube_mask(batch, frames, n, ratio, device=None, generator=None):
    """One random spatial pattern per sample in every frame (VideoMAE's tube): [B, T*n_keep]."""
    scores = torch.rand(batch, 1, n, device=device, generator=generator)  # [B, 1, n]
    scores = scores.expand(batch, frames, n)                               # [B, T, n]
    return _topk_per_frame(scores, num_keep(n, ratio))

def semantic_mask(attn, ratio, generator=None):
    """Keep tokens with probability guided by the teacher's CLS attention: keep [B, T*n_keep].

    attn [B, T, n] is the teacher's last-block CLS-query attention over each frame's patches. The
    official code keeps the first n_keep of a permutation drawn by torch.multinomial(attn, n) (no
    replacement). We draw the same distribution for every frame at once with the Gumbel-top-k trick:
    top-k of log(w) + Gumbel noise is weighted sampling without replacement.
    """
    if attn.ndim != 3:
        raise ValueError(f'attn must be [B, T, n], got {tuple(attn.shape)}')
    B, T, n = attn.shape
    u = torch.rand(B, T, n, device=attn.device, generator=generator).clamp_(1e-20, 1.0)  # U(0, 1]
    gumbel = -torch.log((-torch.log(u)).clamp_min(1e-20))                  # Gumbel(0, 1) noise
    scores = torch.log(attn.float().clamp_min(1e-30)) + gumbel             # [B, T, n]
    return _topk_per_frame(scores, num_keep(n, ratio))

def make_mask(kind, attn, ratio, generator=None):
    """The mask used in training, by kind ('semantic' needs the teacher attention [B, T, n])."""
    B, T, n = attn.shape
    if kind == 'semantic':
        return semantic_mask(attn, ratio, generator)
    if kind == 'tube':
        return tube_mask(B, T, n, ratio, attn.device, generator)
    if kind == 'random':
        return random_mask(B, T, n, ratio, attn.device, generator)
    raise ValueError(f"unknown mask type {kind!r}; valid: 'semantic', 'tube', 'random'")

if __name__ == '__main__':  # a module, not a script: say what it holds
    print(__doc__.strip())
