"""
The UMT student: a plain video ViT that only ever sees the tokens the teacher lets through, its UTA
loss, the decoder of the paper's Table 1 ablations, and the classifier that fine-tuning puts on top.

Paper: "Unmasked Teacher: Towards Training-Efficient Video Foundation Models", Li et al., ICCV 2023,
section 3.1 (the student and the alignment, Eq. 1), Table 1 (its targets) and section 4
(fine-tuning). The student follows single_modality/models/modeling_pretrain_umt.py, so official
checkpoints load key for key: no CLS token, tubelet 1, a fixed 1-D sin-cos position table, q/v
biases only, LayerNorm eps 1e-6, exact GELU, and K alignment heads fed by the last K blocks through
the shared final norm. Stage 2 builds on it in video_language.py.

Shape legend (used in every comment below):
    B batch, T frames, H, W pixels, t, h, w token grid (t = T / tubelet, h = H / patch,
    w = W / patch), N = t*h*w tokens, N_vis kept (visible) tokens, N_mask = N - N_vis hidden tokens,
    D student width, K aligned layers, C teacher output width.

Mask convention: a mask is `keep`, a LongTensor [B, N_vis] of the kept token indices in (t, h, w)
raster order, sorted ascending; `None` keeps every token (masking.py says why).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------------------------
# Position table

def sincos_table(n, dim):
    """The fixed 1-D sin-cos table over the flattened (t, h, w) token index: [n, dim].

    angle(p, j) = p / 10000^(2*floor(j/2)/dim); even channels take sin, odd channels cos: the
    transformer-paper table (not MAE's factorized 2-D/3-D one), as the official UMT student. Never
    learned or saved, it is regenerated exactly; row p does not depend on n, so the table for 4
    frames is the first rows of the table for 8 frames.
    """
    pos = torch.arange(n, dtype=torch.float64)[:, None]                     # [n, 1]
    j = torch.arange(dim, dtype=torch.float64)[None, :]                     # [1, dim]
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode='floor') / dim)  # [n, dim]
    return torch.where(j % 2 == 0, torch.sin(angle), torch.cos(angle)).float()

def gather_tokens(x, keep):
    """x [B, N, D], keep [B, N_vis] -> [B, N_vis, D]: a gather, no boolean mask, no host sync."""
    return x.gather(1, keep[:, :, None].expand(-1, -1, x.shape[-1]))

# ----------------------------------------------------------------------------------------------
# Building blocks

class Attention(nn.Module):
    """Multi-head self-attention with BEiT-style biases: q and v have a learnable bias, k has none.

    The official checkpoint stores one `qkv.weight` [3D, D] with no `qkv.bias`, plus `q_bias` and
    `v_bias`; at run time the bias is cat(q_bias, 0, v_bias). We keep those names so official
    weights load, and call scaled_dot_product_attention so PyTorch picks a flash / memory-efficient
    kernel instead of materializing the [N, N] attention matrix.
    """

    def __init__(self, dim, num_heads):
        super().__init__()
        assert dim % num_heads == 0, f'width {dim} is not divisible by {num_heads} heads'
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        # [3D]: the k bias is fixed at 0
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias)                            # [B, N, 3D]
        qkv = qkv.view(B, N, 3, self.num_heads, D // self.num_heads)  # [B, N, 3, heads, D/heads]
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                          # 3 x [B, heads, N, D/heads]
        x = F.scaled_dot_product_attention(q, k, v)                         # [B, heads, N, D/heads]
        return self.proj(x.transpose(1, 2).reshape(B, N, D))                # [B, N, D]

class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as the official student

def drop_path(x, p, training):
    """Stochastic depth: drop a sample's residual branch with probability p (rescale the rest)."""
    if p == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= p   # [B, 1, 1], one draw per sample
    return x * (keep.to(x.dtype) / (1 - p))  # scale the tiny mask, not x: one pass over x

class Block(nn.Module):
    """Pre-norm transformer block, LayerNorm eps 1e-6, no layer scale (official init_values = 0)."""

    def __init__(self, dim, num_heads, mlp_ratio, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)
        return x

class AlignHead(nn.Module):
    """One alignment head of the official `clip_decoder`: Linear(D -> C), LayerNorm, L2 norm."""

    def __init__(self, dim, teacher_dim):
        super().__init__()
        self.head = nn.Linear(dim, teacher_dim)
        self.norm = nn.LayerNorm(teacher_dim, eps=1e-6)

    def forward(self, x):
        return F.normalize(self.norm(self.head(x)), dim=-1)

# ----------------------------------------------------------------------------------------------
# The student

@dataclass
class VideoViTConfig:
    img_size: int = 224          # input resolution H = W (paper: 224)
    patch_size: int = 16         # spatial patch size (paper: 16)
    num_frames: int = 8          # T of the position table (paper: 8 in stage 1, 4 in stage 2)
    tubelet_size: int = 1        # temporal patch size (paper: 1, every frame its own token slice)
    embed_dim: int = 768         # D
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path: float = 0.1       # stochastic depth of the last block (paper: 0.1 B, 0.2 L)
    align_layers: int = 6        # K, last blocks aligned with the teacher (paper: 6); 0 = no heads
    teacher_dim: int = 512       # C, teacher output width (CLIP-B/16: 512, CLIP-L/14: 768)
    checkpoint_blocks: int = 0   # recompute the first N blocks in backward: less memory, more time

    def __post_init__(self):  # a bad value fails here, before any weight exists
        if not 0 <= self.align_layers <= self.depth:
            raise ValueError(f'align_layers={self.align_layers} must be between 0 and the depth '
                             f'{self.depth}')
        if self.img_size % self.patch_size or self.num_frames % self.tubelet_size or \
                min(self.img_size, self.num_frames) < 1:
            raise ValueError(f'img_size={self.img_size} must be a positive multiple of the patch '
                             f'size {self.patch_size}, num_frames={self.num_frames} of the tubelet '
                             f'size {self.tubelet_size}')

class VideoViT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.patch_embed = nn.Module()  # keeps the official key name patch_embed.proj.*
        kernel = (c.tubelet_size, c.patch_size, c.patch_size)
        self.patch_embed.proj = nn.Conv3d(3, c.embed_dim, kernel_size=kernel, stride=kernel)
        n = (c.num_frames // c.tubelet_size) * (c.img_size // c.patch_size) ** 2
        # Not a parameter, not saved (persistent=False): official checkpoints do not carry it.
        self.register_buffer('pos_embed', sincos_table(n, c.embed_dim), persistent=False)  # [N, D]
        rates = [c.drop_path * i / max(c.depth - 1, 1) for i in range(c.depth)]  # 0 -> drop_path
        self.blocks = nn.ModuleList([Block(c.embed_dim, c.num_heads, c.mlp_ratio, r)
                                     for r in rates])
        self.norm = nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.clip_decoder = nn.ModuleList([AlignHead(c.embed_dim, c.teacher_dim)
                                           for _ in range(c.align_layers)])
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        # Official init: Xavier-uniform Linear weights, zero biases, LayerNorm (1, 0); Conv3d as is.
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def grid(self, video):
        """(t, h, w) token grid of a video [B, 3, T, H, W]; raises a clear error on a bad shape."""
        c = self.config
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f'video must be [B, 3, T, H, W], got {tuple(video.shape)}')
        T, H, W = video.shape[2:]
        if T % c.tubelet_size or H % c.patch_size or W % c.patch_size:
            raise ValueError(f'T={T} must be divisible by the tubelet {c.tubelet_size} and H={H}, '
                             f'W={W} by the patch {c.patch_size}')
        return T // c.tubelet_size, H // c.patch_size, W // c.patch_size

    def pos_table(self, n):
        """[n, D] position rows. Fewer tokens than the config (images, 4 frames): the first rows."""
        if n <= self.pos_embed.shape[0]:
            return self.pos_embed[:n]
        return sincos_table(n, self.config.embed_dim).to(self.pos_embed.device)

    def forward(self, video, keep=None):
        """video [B, 3, T, H, W] -> (x [B, N_vis, D] final-normed, aligned [K, B, N_vis, C] unit
        vectors, or None without heads)."""
        t, h, w = self.grid(video)
        B, N, K = video.shape[0], t * h * w, self.config.align_layers
        if keep is not None and (keep.dtype != torch.long or keep.ndim != 2 or keep.shape[0] != B
                                 or not 0 < keep.shape[1] <= N):
            raise ValueError(f'keep must be a LongTensor [B={B}, N_vis<={N}], got {keep.dtype} '
                             f'{tuple(keep.shape)}')

        # Tubelet embedding. The official Conv3d (kernel = stride = tubelet x patch x patch) is a
        # Linear on flattened patches; written that way, hidden patches go before being embedded.
        c, proj = self.config, self.patch_embed.proj
        x = video.unflatten(2, (t, c.tubelet_size)).unflatten(4, (h, c.patch_size))
        x = x.unflatten(6, (w, c.patch_size))                 # [B, 3, t, tubelet, h, p, w, p]
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4).flatten(1, 3)  # [B, N, 3*tubelet*p*p]
        pos = self.pos_table(N).expand(B, N, -1)              # [B, N, D]
        if keep is not None:
            # The student encodes only the visible tokens: no mask tokens, no decoder. This is where
            # the 80% saving of UMT comes from.
            x, pos = gather_tokens(x, keep), gather_tokens(pos, keep)  # [B, N_vis, 3*tubelet*p*p]
        x = F.linear(x, proj.weight.flatten(1), proj.bias)    # [B, N_vis, D], = Conv3d on these
        pos = pos.to(x.dtype)
        x = x + pos

        hidden = []                                           # outputs of the last K blocks
        for i, blk in enumerate(self.blocks):
            if i < self.config.checkpoint_blocks and self.training:
                x = checkpoint(blk, x, use_reentrant=False)   # recomputed in backward, same RNG
            else:
                x = blk(x)
            if i >= self.config.depth - K:
                hidden.append(x)
        x = self.norm(x)                                      # [B, N_vis, D]
        if K == 0:
            return x, None

        # Every returned layer goes through the same final norm (official quirk; the last one is x
        # itself), then the position table is added once more, then layer k's own head maps it into
        # the teacher's space.
        normed = [self.norm(hk) for hk in hidden[:-1]] + [x]
        aligned = [head(hk + pos) for head, hk in zip(self.clip_decoder, normed)]
        return x, torch.stack(aligned)  # [K, B, N_vis, C], slot k <-> block depth-K+k

def uta_loss(aligned, targets, per_layer=False):
    """Unmasked-teacher alignment (UTA) loss, shared by both stages.

    L_uta = mean over layers and visible tokens of 2 - 2 cos(s, t). Both inputs are unit vectors,
    so this equals |s - t|^2, the "MSE" of the paper. aligned, targets: [K, B, N_vis, C].
    """
    assert aligned.shape == targets.shape, f'{tuple(aligned.shape)} vs {tuple(targets.shape)}'
    loss = 2 - 2 * (aligned.float() * targets.float()).sum(-1)  # [K, B, N_vis]
    loss = loss.mean(dim=(1, 2))                                 # [K]
    return loss if per_layer else loss.mean()

# ----------------------------------------------------------------------------------------------
# The decoder of the paper's Table 1 (UMT itself has none)
#
# Table 1 sets UMT's target (align the visible tokens with CLIP) against VideoMAE's: a shallow
# decoder sees the visible tokens plus one shared mask token per hidden position and regresses the
# normalized pixels of the hidden tokens ('pixels', 'clip+pixels'), or, with output width C, the
# teacher's last-layer features there ('clip+masked'). The student never sees a mask token. As
# single_modality/models/modeling_pretrain.py and engines/engine_for_pretraining.py (VideoMAE).

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the input normalization, which pixel_targets undoes
IMAGENET_STD = (0.229, 0.224, 0.225)
DECODERS = {'vit_b16': (384, 6, 4), 'vit_l16': (512, 8, 4),  # width, heads, depth: VideoMAE-B / -L
            'tiny': (64, 2, 2)}                               # ours, for the CPU demo

def masked_tokens(keep, n):
    """keep [B, N_vis] sorted kept indices -> [B, N_mask], the hidden indices, ascending."""
    hidden = torch.ones(keep.shape[0], n, dtype=torch.bool, device=keep.device)
    hidden = hidden.scatter(1, keep, False)                           # [B, N], True = hidden
    # A stable sort of the flags lists the kept tokens first, then the hidden ones, each ascending:
    # static shapes, and no boolean indexing (which would wait on the host to learn the count).
    return hidden.sort(dim=1, stable=True).indices[:, keep.shape[1]:]  # [B, N_mask]

class Decoder(nn.Module):
    """VideoMAE's decoder: visible tokens + mask tokens -> one prediction per hidden token. Keys as
    the official model's mask_token, encoder_to_decoder and decoder.{blocks, norm, head}; its
    blocks are the student's Block (q/v biases, LayerNorm eps 1e-6, exact GELU), no drop path."""

    def __init__(self, dim, out_dim, n, width=384, heads=6, depth=4):
        super().__init__()
        self.encoder_to_decoder = nn.Linear(dim, width, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        # The official class asks for a 1568-row table whatever N is, and for any other N gets it
        # back as a learnable parameter that does not fit the tokens. Ours is the fixed N-row table,
        # never saved: at N = 1568 that is what the official checkpoints hold (nothing).
        self.register_buffer('pos_embed', sincos_table(n, width), persistent=False)  # [N, width]
        self.blocks = nn.ModuleList([Block(width, heads, 4.0, 0.0) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, out_dim)
        # Official init: the student's on blocks, norm and head; encoder_to_decoder keeps PyTorch's
        # (the official outer class never applies its own); mask_token normal(0, 0.02) cut at 0.02.
        for m in (self.blocks, self.norm, self.head):
            m.apply(VideoViT._init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)

    def forward(self, x_vis, keep):
        """x_vis [B, N_vis, D] the student's final-normed visible tokens, keep [B, N_vis] ->
        [B, N_mask, out], the predictions for masked_tokens(keep, N), in that ascending order."""
        B, N_vis, _ = x_vis.shape
        pos = self.pos_embed.expand(B, -1, -1)                           # [B, N, width]
        masked = masked_tokens(keep, pos.shape[1])                       # [B, N_mask]
        x = self.encoder_to_decoder(x_vis)                               # [B, N_vis, width]
        x = x + gather_tokens(pos, keep).to(x_vis.dtype)
        m = self.mask_token + gather_tokens(pos, masked).to(x_vis.dtype)  # [B, N_mask, width]
        # Visible rows first, then one mask token per hidden position (the official order). With no
        # positional bias in the blocks, any order gives the same predictions up to rounding.
        x = torch.cat([x, m.to(x.dtype)], dim=1)                         # [B, N, width]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, N_vis:]))  # only the hidden rows: [B, N_mask, out]

def pixel_targets(video, masked, tubelet, patch, normalize=True):
    """VideoMAE's target: video [B, 3, T, H, W] (the ImageNet-normalized model input), masked
    [B, N_mask] -> [B, N_mask, 3*tubelet*patch^2], the pixels of each masked token in (tubelet,
    patch row, patch column, channel) order, channel fastest: the layout the head learns."""
    B, _, T, H, W = video.shape
    t, h, w = T // tubelet, H // patch, W // patch
    mean = torch.tensor(IMAGENET_MEAN, device=video.device).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=video.device).view(1, 3, 1, 1, 1)
    u = video.float() * std + mean                                  # [B, 3, T, H, W], in [0, 1]
    u = u.view(B, 3, t, tubelet, h, patch, w, patch)                # [B, 3, t, tubelet, h, p, w, p]
    u = u.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(B, t * h * w, -1, 3)  # [B, N, tubelet*p*p, 3]
    index = masked[:, :, None, None].expand(-1, -1, *u.shape[2:])   # [B, N_mask, tubelet*p*p, 3]
    u = u.gather(1, index)  # exact before normalizing: each token is normalized on its own
    if normalize:  # per token and channel, unbiased variance, eps on the std (official; always on)
        u = (u - u.mean(dim=2, keepdim=True)) / (u.var(dim=2, keepdim=True).sqrt() + 1e-6)
    return u.flatten(2)                                             # [B, N_mask, tubelet*p*p*3]

# ----------------------------------------------------------------------------------------------
# Fine-tuning classifier

class VideoClassifier(nn.Module):
    """The official fine-tuning model: all tokens -> mean pool -> fc_norm -> dropout -> head.

    As in the official code the backbone's final norm is replaced by fc_norm after pooling, so a
    stage-1 checkpoint's `norm.*` and `clip_decoder.*` are not used here.
    """

    def __init__(self, backbone, num_classes, head_dropout=0.0, init_scale=0.001):
        super().__init__()
        D = backbone.config.embed_dim
        self.backbone = backbone
        self.backbone.norm = nn.Identity()
        self.fc_norm = nn.LayerNorm(D, eps=1e-6)
        self.dropout = nn.Dropout(head_dropout)
        self.head = nn.Linear(D, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        with torch.no_grad():  # a small head keeps the pre-trained features intact at the start
            self.head.weight.mul_(init_scale)
            self.head.bias.zero_()

    def forward(self, video):
        x, _ = self.backbone(video)                              # [B, N, D], no final norm
        return self.head(self.dropout(self.fc_norm(x.mean(1))))  # [B, num_classes]

# ----------------------------------------------------------------------------------------------
# Presets and strict loading

CONFIGS = {
    'vit_b16': VideoViTConfig(),                                       # UMT-B/16, 85.6M parameters
    'vit_l16': VideoViTConfig(embed_dim=1024, depth=24, num_heads=16,  # UMT-L/16, 303M parameters
                              drop_path=0.2, teacher_dim=768),
    'tiny': VideoViTConfig(img_size=64, patch_size=8, embed_dim=96, depth=4,  # tests, CPU demo
                           num_heads=3, drop_path=0.0, align_layers=2, teacher_dim=64),
}

def get_config(name, **overrides):
    if name not in CONFIGS:
        raise ValueError(f'unknown model preset {name!r}; valid: {sorted(CONFIGS)}')
    return VideoViTConfig(**{**CONFIGS[name].__dict__, **overrides})

def load_strict(model, sd):
    """load_state_dict(strict=True), with errors that name the offending keys and shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f'{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}'
             for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError('checkpoint does not fit the model:\n' + '\n'.join(
            [f'  missing: {k}' for k in missing] + [f'  unexpected: {k}' for k in unexpected]
            + [f'  wrong shape: {s}' for s in wrong]))
    model.load_state_dict(sd, strict=True)

if __name__ == '__main__':  # a module, not a script: say what it holds
    print(__doc__.strip())
