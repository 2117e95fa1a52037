"""
The UMT student: a plain video ViT that only ever sees the tokens the teacher lets through.

Paper: "Unmasked Teacher: Towards Training-Efficient Video Foundation Models", Li et al., ICCV 2023.
This file holds the stage-1 student (section 3.1 of the paper) and the classifier used for
fine-tuning. The student is faithful to the official implementation so its checkpoints load key
for key: no CLS token, tubelet size 1, a fixed 1-D sin-cos position table, BEiT-style q/v biases
(no key bias), LayerNorm eps 1e-6, exact GELU, and K alignment heads fed by the last K blocks
through the shared final norm.

Shape legend (used in every comment below):
    B batch, T frames, H, W pixels, t, h, w token grid (t = T / tubelet, h = H / patch, w = W / patch),
    N = t*h*w tokens, N_vis kept (visible) tokens, D student width, K aligned layers,
    C teacher output width, L text length.

Mask convention (REFERENCE D1): a mask is `keep`, a LongTensor [B, N_vis] of the kept token
indices in (t, h, w) raster order, sorted ascending; `None` keeps every token.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ----------------------------------------------------------------------------------------------
# Position table


def sincos_table(n, dim):
    """The fixed 1-D sin-cos table over the flattened (t, h, w) token index: [n, dim].

    angle(p, j) = p / 10000^(2*floor(j/2)/dim); even channels take sin, odd channels cos. This is
    the transformer-paper table, not MAE's factorized 2-D/3-D one, and it is what the official UMT
    student uses. It is never learned and never saved, so it must be regenerated exactly: row p
    does not depend on n, so the table for 4 frames is the first rows of the table for 8 frames.
    """
    pos = torch.arange(n, dtype=torch.float64)[:, None]                        # [n, 1]
    j = torch.arange(dim, dtype=torch.float64)[None, :]                        # [1, dim]
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode='floor') / dim)  # [n, dim]
    table = torch.where(j % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()


def gather_tokens(x, keep):
    """x [B, N, D], keep [B, N_vis] -> [B, N_vis, D]. Index + gather: no boolean mask, no host sync."""
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
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])  # [3D], k bias fixed at 0
        qkv = F.linear(x, self.qkv.weight, bias)                                     # [B, N, 3D]
        qkv = qkv.view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # [3, B, heads, N, D/heads]
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])                   # [B, heads, N, D/heads], scale head_dim^-0.5
        x = x.transpose(1, 2).reshape(B, N, D)                                       # [B, N, D]
        return self.proj(x)


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as the official student


def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch of a sample with probability p (rescale the rest)."""
    if p == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= p      # [B, 1, 1], one draw per sample
    return x * (keep.to(x.dtype) / (1 - p))                         # scale the tiny mask, not x: one pass over x


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
    """One alignment head of the official `clip_decoder`: Linear(D -> C) -> LayerNorm -> L2 normalize."""

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
    num_frames: int = 8          # T the position table is built for (paper: 8 in stage 1, 4 in stage 2)
    tubelet_size: int = 1        # temporal patch size (paper: 1, every frame is its own token slice)
    embed_dim: int = 768         # D
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path: float = 0.1       # stochastic depth at the last block, linear from 0 (paper: 0.1 B, 0.2 L)
    align_layers: int = 6        # K, last blocks aligned with the teacher (paper: 6); 0 = no heads
    teacher_dim: int = 512       # C, teacher output width (CLIP-B/16: 512, CLIP-L/14: 768)
    checkpoint_blocks: int = 0   # activation checkpointing of the first N blocks (saves memory, costs compute)


class VideoViT(nn.Module):

    def __init__(self, config):
        super().__init__()
        c = config
        if not 0 <= c.align_layers <= c.depth:
            raise ValueError(f'align_layers={c.align_layers} must be between 0 and depth={c.depth}')
        if c.img_size % c.patch_size or c.num_frames % c.tubelet_size:
            raise ValueError(f'img_size {c.img_size} / num_frames {c.num_frames} not divisible by '
                             f'patch {c.patch_size} / tubelet {c.tubelet_size}')
        self.config = c
        self.patch_embed = nn.Module()  # keeps the official key name patch_embed.proj.*
        self.patch_embed.proj = nn.Conv3d(3, c.embed_dim, kernel_size=(c.tubelet_size, c.patch_size, c.patch_size),
                                          stride=(c.tubelet_size, c.patch_size, c.patch_size))
        n = (c.num_frames // c.tubelet_size) * (c.img_size // c.patch_size) ** 2
        # Not a parameter and not saved (persistent=False): the official checkpoints do not carry it either.
        self.register_buffer('pos_embed', sincos_table(n, c.embed_dim), persistent=False)  # [N, D]
        rates = [c.drop_path * i / max(c.depth - 1, 1) for i in range(c.depth)]  # linear 0 -> drop_path, block 0 never dropped
        self.blocks = nn.ModuleList([Block(c.embed_dim, c.num_heads, c.mlp_ratio, r) for r in rates])
        self.norm = nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.clip_decoder = nn.ModuleList([AlignHead(c.embed_dim, c.teacher_dim) for _ in range(c.align_layers)])
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        # Official init: Xavier-uniform Linear weights, zero biases, LayerNorm (1, 0); Conv3d keeps PyTorch's default.
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
            raise ValueError(f'T={T} must be divisible by the tubelet {c.tubelet_size} and H={H}, W={W} '
                             f'by the patch {c.patch_size}')
        return T // c.tubelet_size, H // c.patch_size, W // c.patch_size

    def pos_table(self, n):
        """[n, D] position rows. Fewer tokens than the config (images, 4 frames) use the first rows."""
        if n <= self.pos_embed.shape[0]:
            return self.pos_embed[:n]
        return sincos_table(n, self.config.embed_dim).to(self.pos_embed.device)

    def forward(self, video, keep=None):
        """video [B, 3, T, H, W] -> (x [B, N_vis, D] final-normed, aligned [K, B, N_vis, C] unit vectors or None)."""
        t, h, w = self.grid(video)
        B, N, K = video.shape[0], t * h * w, self.config.align_layers
        if keep is not None and (keep.dtype != torch.long or keep.ndim != 2 or keep.shape[0] != B
                                 or not 0 < keep.shape[1] <= N):
            raise ValueError(f'keep must be a LongTensor [B={B}, N_vis<={N}], got {keep.dtype} {tuple(keep.shape)}')

        # Tubelet embedding. The official Conv3d (kernel = stride = tubelet x patch x patch) is a Linear
        # on flattened patches; written that way we can drop the hidden patches *before* embedding them.
        c, proj = self.config, self.patch_embed.proj
        x = video.unflatten(2, (t, c.tubelet_size)).unflatten(4, (h, c.patch_size)).unflatten(6, (w, c.patch_size))
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4).flatten(1, 3)   # [B, N, 3*tubelet*patch^2], (t, h, w) order
        pos = self.pos_table(N).expand(B, N, -1)             # [B, N, D]
        if keep is not None:
            # The student encodes only the visible tokens: no mask tokens, no decoder. This is where
            # the 80% saving of UMT comes from.
            x, pos = gather_tokens(x, keep), gather_tokens(pos, keep)  # [B, N_vis, 3*tubelet*patch^2], [B, N_vis, D]
        x = F.linear(x, proj.weight.flatten(1), proj.bias)   # [B, N_vis, D], = Conv3d on the kept tubelets
        pos = pos.to(x.dtype)
        x = x + pos

        hidden = []                                          # outputs of the last K blocks
        for i, blk in enumerate(self.blocks):
            if i < self.config.checkpoint_blocks and self.training:
                x = checkpoint(blk, x, use_reentrant=False)  # recomputed in backward; same RNG replayed
            else:
                x = blk(x)
            if i >= self.config.depth - K:
                hidden.append(x)
        x = self.norm(x)                                     # [B, N_vis, D]
        if K == 0:
            return x, None

        # Every returned layer goes through the same final norm (official quirk; the last one is x itself),
        # then the position table is added once more, then layer k's own head maps it into the teacher's space.
        normed = [self.norm(hk) for hk in hidden[:-1]] + [x]
        aligned = [head(hk + pos) for head, hk in zip(self.clip_decoder, normed)]
        return x, torch.stack(aligned)                       # [K, B, N_vis, C], slot k <-> block depth-K+k


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
        x, _ = self.backbone(video)                        # [B, N, D], no final norm
        return self.head(self.dropout(self.fc_norm(x.mean(1))))  # [B, num_classes]


# ----------------------------------------------------------------------------------------------
# Presets and official checkpoints

CONFIGS = {
    'vit_b16': VideoViTConfig(),                                          # UMT-B/16, 85.6M encoder parameters
    'vit_l16': VideoViTConfig(embed_dim=1024, depth=24, num_heads=16,     # UMT-L/16, 303M encoder parameters
                              drop_path=0.2, teacher_dim=768),
    'tiny': VideoViTConfig(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3,  # tests and the CPU demo
                           drop_path=0.0, align_layers=2, teacher_dim=64),
}


def get_config(name, **overrides):
    if name not in CONFIGS:
        raise ValueError(f'unknown model preset {name!r}; valid: {sorted(CONFIGS)}')
    return VideoViTConfig(**{**CONFIGS[name].__dict__, **overrides})


def unwrap_state_dict(sd):
    """Official and our checkpoints store the weights raw, or under 'model' / 'module'."""
    for key in ('model', 'module'):
        if key in sd and isinstance(sd[key], dict):
            return sd[key]
    return sd


def load_official(state_dict, num_frames=None, img_size=None, num_heads=None):
    """Build and load a model from an official UMT checkpoint; returns (model, unused_keys).

    - stage 1 (`encoder.*`, `clip_decoder.*`, REFERENCE 5.1)       -> VideoViT
    - stage 2 (`vision_encoder.encoder.*`, ...; REFERENCE 5.4)      -> VideoViT (text side, teacher: unused)
    - fine-tuned (`patch_embed.*`, `blocks.*`, `fc_norm.*`, `head.*`; 5.2) -> VideoClassifier
    The config is inferred from the shapes; heads = width / 64 (true for B and L) unless given.
    A stored `pos_embed` (frames or resolution other than 8 x 224) is used as is; its token count
    gives the frame count at img_size (default 224) or the resolution at num_frames.
    """
    sd = unwrap_state_dict(state_dict)
    unused = []
    if any(k.startswith('vision_encoder.') for k in sd):  # stage-2 model: keep its vision encoder
        unused = [k for k in sd if not k.startswith('vision_encoder.')]
        sd = {k[len('vision_encoder.'):]: v for k, v in sd.items() if k.startswith('vision_encoder.')}
        unused += ['vision_encoder.' + k for k in sd if k.startswith('pool_norm.')]
        sd = {k: v for k, v in sd.items() if not k.startswith('pool_norm.')}
    finetuned = 'head.weight' in sd
    sd = {k.removeprefix('encoder.'): v for k, v in sd.items()}

    w = sd['patch_embed.proj.weight']                                # [D, 3, tubelet, patch, patch]
    D, tubelet, patch = w.shape[0], w.shape[2], w.shape[-1]
    depth = 1 + max(int(k.split('.')[1]) for k in sd if k.startswith('blocks.'))
    K = sum(1 for k in sd if k.startswith('clip_decoder.') and k.endswith('.head.weight'))
    pos = sd.pop('pos_embed', None)                                  # [1, N, D] or absent
    if img_size is None and num_frames is None and pos is not None:
        img_size = 224
    img_size = img_size or 224
    if pos is not None and num_frames is None:
        num_frames = pos.shape[1] // (img_size // patch) ** 2 * tubelet
    elif pos is not None:
        img_size = int(math.isqrt(pos.shape[1] // (num_frames // tubelet))) * patch
    config = VideoViTConfig(
        img_size=img_size, patch_size=patch, num_frames=num_frames or 8, tubelet_size=tubelet, embed_dim=D,
        depth=depth, num_heads=num_heads or max(D // 64, 1), mlp_ratio=sd['blocks.0.mlp.fc1.weight'].shape[0] / D,
        drop_path=0.0, align_layers=K, teacher_dim=sd['clip_decoder.0.head.weight'].shape[0] if K else 512)
    backbone = VideoViT(config)
    if pos is not None:
        if pos.shape[1:] != backbone.pos_embed.shape:
            raise ValueError(f'pos_embed: checkpoint shape {tuple(pos.shape)} does not fit {config}')
        backbone.pos_embed.copy_(pos[0])
    model = backbone
    if finetuned:
        model = VideoClassifier(backbone, num_classes=sd['head.weight'].shape[0])
        sd = {('backbone.' + k if not k.startswith(('fc_norm.', 'head.')) else k): v for k, v in sd.items()}
    load_strict(model, sd)
    return model, unused


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


# ----------------------------------------------------------------------------------------------
# Stage 2: text encoder, fusion and the video-language model
#
# Paper section 3.2. The paper's text side is BERT-base; we use the text tower of the teacher's own
# open_clip checkpoint (REFERENCE D4: no `transformers`, one checkpoint serves teacher and text), made
# bidirectional, with BERT's split kept: blocks [0, fusion_layer) see text only (their end-of-text
# token gives the VTC feature); blocks [fusion_layer, depth) also cross-attend to the vision tokens
# (VTM, MLM). Extra letters: Dt text width, E shared embedding width, G global (all-rank) batch.

SOT_ID, EOT_ID, VOCAB = 49406, 49407, 49408  # open_clip BPE: start / end of text, vocabulary; padding is 0
MASK_ID = VOCAB  # [MASK] lies one past the vocabulary: its own embedding vector, never an MLM class
_BPE = []        # the tokenizer, built on first use (open_clip is imported only when stage 2 needs it)


def tokenize(captions, context_length=32):
    """list[str] -> (input_ids [B, L] long, attention_mask [B, L] bool, True = real token). Rows are
    [sot] tokens [eot] 0 0 ...; a long caption is cut and still ends with [eot] (paper: L = 32). The mask
    comes from the eot position, not from `id != 0`: 0 is also a BPE token ('!')."""
    if not _BPE:
        from open_clip.tokenizer import SimpleTokenizer  # ships its BPE vocabulary: works offline
        _BPE.append(SimpleTokenizer())
    ids = _BPE[0](list(captions), context_length=context_length)       # [B, L]
    eot = (ids == EOT_ID).int().argmax(dim=1)                           # [B], one eot per row
    return ids, torch.arange(ids.shape[1])[None, :] <= eot[:, None]


def eot_index(attention_mask):
    """[B, L] bool -> [B]: the last real token, [eot] (or the [MASK] that MLM put there)."""
    return attention_mask.sum(dim=1) - 1


class TextAttention(nn.Module):
    """SDPA multi-head attention. Self-attention keeps nn.MultiheadAttention's packed in_proj [3Dt, Dt]
    (open_clip's layout); cross-attention (kv_dim = D) takes queries from text, keys/values from vision."""

    def __init__(self, dim, heads, kv_dim=None):
        super().__init__()
        self.heads = heads
        if kv_dim is None:
            self.in_proj = nn.Linear(dim, 3 * dim)
        else:
            self.q_proj, self.kv_proj = nn.Linear(dim, dim), nn.Linear(kv_dim, 2 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None, context=None):
        B, L, Dt = x.shape
        if context is None:
            q, k, v = self.in_proj(x).chunk(3, dim=-1)                            # 3 x [B, L, Dt]
        else:
            q, (k, v) = self.q_proj(x), self.kv_proj(context).chunk(2, dim=-1)    # [B, L, Dt], 2 x [B, N_vis, Dt]
        q, k, v = (y.unflatten(-1, (self.heads, -1)).transpose(1, 2) for y in (q, k, v))  # [B, heads, *, Dt/heads]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)               # mask: True = may attend
        return self.out_proj(x.transpose(1, 2).reshape(B, L, Dt))


class TextBlock(nn.Module):
    """open_clip's pre-norm ResidualAttentionBlock (LN eps 1e-5); a fusion block adds a cross-attention
    sub-block between self-attention and the MLP, where BERT's fusion layers have theirs."""

    def __init__(self, dim, heads, mlp_ratio, quick_gelu, vision_dim=None):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(dim), TextAttention(dim, heads), nn.LayerNorm(dim)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(dim, hidden), c_proj=nn.Linear(hidden, dim)))
        self.quick_gelu = quick_gelu  # follow the tower: OpenAI CLIP was trained with x * sigmoid(1.702 x)
        if vision_dim is not None:    # new: CLIP's text tower never saw vision tokens
            self.ln_cross, self.cross_attn = nn.LayerNorm(dim), TextAttention(dim, heads, kv_dim=vision_dim)

    def forward(self, x, mask, vision=None):
        x = x + self.attn(self.ln_1(x), mask)
        if vision is not None:  # every vision token is valid: no mask
            x = x + self.cross_attn(self.ln_cross(x), context=vision)
        h = self.mlp.c_fc(self.ln_2(x))
        return x + self.mlp.c_proj(h * torch.sigmoid(1.702 * h) if self.quick_gelu else F.gelu(h))


class TextEncoder(nn.Module):
    """CLIP's text transformer without its causal mask, plus [MASK] and the fusion blocks.

    [MASK] is a separate learned vector rather than a 49409th embedding row: token_embedding keeps
    CLIP's shape (loads as is), and the tied MLM decoder's classes are exactly the 49408 real tokens."""

    def __init__(self, vocab_size, context_length, width, heads, layers, mlp_ratio, quick_gelu, fusion_layer,
                 vision_dim):
        super().__init__()
        if not 0 <= fusion_layer <= layers:
            raise ValueError(f'fusion_layer={fusion_layer} must be between 0 and layers={layers}')
        self.fusion_layer = fusion_layer
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.mask_embedding = nn.Parameter(torch.randn(width) * 0.02)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.blocks = nn.ModuleList([TextBlock(width, heads, mlp_ratio, quick_gelu, vision_dim if i >= fusion_layer
                                               else None) for i in range(layers)])
        self.ln_text = nn.LayerNorm(width)   # new: normalizes the text-only output for the VTC feature
        self.ln_final = nn.LayerNorm(width)  # CLIP's, after the last block
        for m in self.modules():             # CLIP / BERT-style init (std 0.02); build_umt then copies CLIP's tower
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def attn_mask(self, attention_mask, causal=False):
        """[B, L] bool -> SDPA mask: every query sees the real tokens; causal = CLIP's original mask, only
        used to check the weight mapping against open_clip's own forward."""
        mask = attention_mask[:, None, None, :]                                  # [B, 1, 1, L]
        if causal:
            L = attention_mask.shape[1]
            mask = mask & torch.ones(L, L, dtype=torch.bool, device=mask.device).tril()  # [B, 1, L, L]
        return mask

    def forward_text(self, input_ids, attention_mask, causal=False):
        """The text-only blocks: ids [B, L] -> residual stream [B, L, Dt]."""
        x = self.token_embedding(input_ids.clamp_max(self.token_embedding.num_embeddings - 1))  # [B, L, Dt]
        x = torch.where((input_ids == MASK_ID)[..., None], self.mask_embedding.to(x.dtype), x)
        x = x + self.positional_embedding[:input_ids.shape[1]]
        mask = self.attn_mask(attention_mask, causal)
        for blk in self.blocks[:self.fusion_layer]:
            x = blk(x, mask)
        return x

    def forward_fusion(self, x, attention_mask, vision=None, causal=False):
        """The fusion blocks: x [B, L, Dt] from forward_text, vision [B, N_vis, D] -> ln_final(.) [B, L, Dt]."""
        mask = self.attn_mask(attention_mask, causal)
        for blk in self.blocks[self.fusion_layer:]:
            x = blk(x, mask, vision)
        return self.ln_final(x)


class UMT(nn.Module):
    """The stage-2 model: student, pool_norm, text encoder, projections and heads. The frozen teacher
    is not part of it (never saved). Build with build_umt, or UMT.from_configs to load a checkpoint."""

    def __init__(self, vision_encoder, text_encoder, embed_dim):
        super().__init__()
        D, Dt = vision_encoder.config.embed_dim, text_encoder.ln_final.normalized_shape[0]
        self.vision_encoder, self.text_encoder = vision_encoder, text_encoder
        self.pool_norm = nn.LayerNorm(D, eps=1e-6)
        self.vision_proj, self.text_proj = nn.Linear(D, embed_dim), nn.Linear(Dt, embed_dim)
        self.itm_head = nn.Linear(Dt, 2)
        # BERT's MLM head: transform (dense, GELU, LN), then a decoder tied to the token embedding, + a bias.
        self.mlm_head = nn.Sequential(nn.Linear(Dt, Dt), nn.GELU(), nn.LayerNorm(Dt))
        self.mlm_bias = nn.Parameter(torch.zeros(text_encoder.token_embedding.num_embeddings))
        self.temp = nn.Parameter(torch.tensor(0.07))  # sim / temp; the trainer clamps it to [0.001, 0.5] every step
        self.text_config = None                       # set by from_configs; checkpoints save it

    @classmethod
    def from_configs(cls, vision_config, text_config, vision_encoder=None):
        """Random weights from a checkpoint's 'model_config' and 'text_config' dicts (then load_strict)."""
        vision = vision_encoder or VideoViT(VideoViTConfig(**vision_config))
        tower = {k: v for k, v in text_config.items() if k != 'embed_dim'}
        model = cls(vision, TextEncoder(**tower, vision_dim=vision.config.embed_dim), text_config['embed_dim'])
        model.text_config = dict(text_config)
        return model

    def encode_video(self, video, keep=None, per_frame=False):
        """video [B, 3, T, H, W] -> (x_vis [B, N_vis, D], aligned [K, B, N_vis, C] or None, feat).
        feat (not normalized): [B, E] from all visible tokens (training), or [B, t, E] per frame
        (evaluation, whose per-frame similarities are averaged; REFERENCE 2.2, quirk 12)."""
        x_vis, aligned = self.vision_encoder(video, keep)
        if per_frame:  # every frame keeps the same token count, in (t, h, w) order: a reshape splits frames
            pooled = x_vis.unflatten(1, (self.vision_encoder.grid(video)[0], -1)).mean(2)  # [B, t, D]
        else:
            pooled = x_vis.mean(1)                                                          # [B, D]
        return x_vis, aligned, self.vision_proj(self.pool_norm(pooled))

    def encode_text(self, input_ids, attention_mask):
        """-> (text_hidden [B, L, Dt] after the text-only blocks, feat [B, E] at the end-of-text token)."""
        h = self.text_encoder.forward_text(input_ids, attention_mask)
        eot = h[torch.arange(h.shape[0], device=h.device), eot_index(attention_mask)]  # [B, Dt]
        return h, self.text_proj(self.text_encoder.ln_text(eot))

    def fuse(self, text_hidden, attention_mask, vision_tokens):
        return self.text_encoder.forward_fusion(text_hidden, attention_mask, vision_tokens)  # [B, L, Dt]

    def itm_logits(self, text_hidden, attention_mask, vision_tokens):
        """[B, 2] no-match / match logits. BERT reads its first token ([CLS]); CLIP's first token was
        trained under a causal mask and never saw the caption, while CLIP summarizes the caption at the
        end-of-text token (also our VTC feature): so the ITM head reads the fused eot token."""
        fused = self.fuse(text_hidden, attention_mask, vision_tokens)
        return self.itm_head(fused[torch.arange(fused.shape[0], device=fused.device), eot_index(attention_mask)])

    def mlm_logits(self, fused):
        """[B, L, Dt] -> [B, L, vocab]; the decoder weight is the token embedding (tied, as BERT)."""
        return self.mlm_head(fused) @ self.text_encoder.token_embedding.weight.t() + self.mlm_bias

    def forward(self, video, keep, targets, input_ids, attention_mask, ids, mlm_prob=0.5):
        """All four stage-2 losses from one vision forward -> [4]: VTC, VTM, MLM, UTA (the script weighs them).

        video [B, 3, T, H, W], keep [B, N_vis], targets [K, B, N_vis, C] (teacher), input_ids and
        attention_mask [B, L], ids [B] or [B, K] pair keys (pairs sharing a key are positives, see same_pair)."""
        x_vis, aligned, v = self.encode_video(video, keep)              # [B, N_vis, D], [K, B, N_vis, C], [B, E]
        text_hidden, t = self.encode_text(input_ids, attention_mask)    # [B, L, Dt], [B, E]
        # UTA: L_uta = mean over layers and visible tokens of 2 - 2 cos(student, teacher)
        loss_uta = uta_loss(aligned, targets)
        # VTC: this rank's pairs against the whole global batch
        loss_vtc = vtc_loss(v, t, ids, self.temp)
        # VTM: positives, then each text with a hard negative video, each video with a hard negative text
        # (drawn from this rank's similarities), all through the fusion blocks; 2-way cross-entropy
        sim = F.normalize(v.detach().float(), dim=-1) @ F.normalize(t.detach().float(), dim=-1).t()  # [B, B]
        vi, ti, labels = vtm_pairs(sim, ids)                            # [3B] each
        logits = self.itm_logits(text_hidden[ti], attention_mask[ti], x_vis[vi])  # [3B, 2]
        loss_vtm = F.cross_entropy(logits.float(), labels)
        # MLM: the corrupted caption through the text-only blocks, then the fusion blocks attending to the
        # visible video tokens; cross-entropy on the masked positions only (scores for those rows only:
        # [n_masked, 49408] instead of [B, L, 49408])
        masked_ids, mlm_labels = mask_text(input_ids, attention_mask, mlm_prob)
        fused = self.fuse(self.text_encoder.forward_text(masked_ids, attention_mask), attention_mask, x_vis)
        pick = mlm_labels != -100                                       # [B, L]
        loss_mlm = F.cross_entropy(self.mlm_logits(fused[pick]).float(), mlm_labels[pick], reduction='sum') \
            / pick.sum().clamp(min=1)
        return torch.stack([loss_vtc, loss_vtm, loss_mlm, loss_uta])


def text_config(clip_model, embed_dim=None, fusion_layer=None):
    """Text-side config of an open_clip CLIP (teacher.build_clip). Defaults are the paper's: E = CLIP's
    embedding width (512 for B/16, 768 for L/14, 64 tiny), fusion_layer = 3/4 of the depth (9 of 12)."""
    blocks, width = clip_model.transformer.resblocks, clip_model.transformer.width
    if getattr(clip_model, 'text_pool_type', 'argmax') != 'argmax' or not isinstance(blocks[0].ls_1, nn.Identity):
        raise ValueError('only plain CLIP text towers (eot pooling, no layer scale) are supported')
    return dict(vocab_size=clip_model.vocab_size, context_length=clip_model.context_length, width=width,
                heads=blocks[0].attn.num_heads, layers=len(blocks),
                mlp_ratio=blocks[0].mlp.c_fc.out_features / width,
                quick_gelu=type(blocks[0].mlp.gelu).__name__ == 'QuickGELU',
                fusion_layer=len(blocks) * 3 // 4 if fusion_layer is None else fusion_layer,
                embed_dim=embed_dim or clip_model.text_projection.shape[1])


def clip_text_state_dict(clip_model):
    """open_clip's text-tower weights under TextEncoder's names (text_projection, logit_scale unused)."""
    return {k.replace('transformer.resblocks.', 'blocks.').replace('attn.in_proj_', 'attn.in_proj.'): v
            for k, v in clip_model.state_dict().items()
            if k.startswith(('token_embedding.', 'positional_embedding', 'transformer.', 'ln_final.'))}


def build_umt(vision_encoder, clip_model, embed_dim=None, fusion_layer=None):
    """UMT around vision_encoder, with the text tower copied from clip_model; the rest is new."""
    model = UMT.from_configs(None, text_config(clip_model, embed_dim, fusion_layer), vision_encoder=vision_encoder)
    sd, own = clip_text_state_dict(clip_model), model.text_encoder.state_dict()
    new = [k for k in own if k not in sd]  # by design: mask_embedding, ln_text, the cross-attention sub-blocks
    assert all(k.startswith(('mask_embedding', 'ln_text.')) or '_cross' in k or 'cross_' in k for k in new), new
    load_strict(model.text_encoder, {**sd, **{k: own[k] for k in new}})  # every CLIP tower tensor must fit
    return model


# ----------------------------------------------------------------------------------------------
# Stage 2 objectives (the training loop is in train_stage2.py)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward SUMS the gradient over ranks, then returns this rank's slice.

    Rank r's loss uses every rank's features, so d(sum of losses)/d(x_r) needs every rank's share;
    DDP then averages parameter gradients, which makes the result equal the one-process gradient of
    the mean loss over the global batch. The official backward returns the local slice without the
    sum (REFERENCE 6.13): with its full-matrix loss on every rank that scales the VTC gradient by 1/W."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts)                                                  # [G, ...], rank order

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # a copy: autograd may still own `grad`
        torch.distributed.all_reduce(grad)
        return grad.chunk(torch.distributed.get_world_size())[torch.distributed.get_rank()]


def gather_with_grad(x):
    dist = torch.distributed
    return _GatherWithGrad.apply(x) if dist.is_available() and dist.is_initialized() else x


def same_pair(a, b):
    """Pair keys a [B, K], b [G, K] (or [B], [G]) -> [B, G] bool: True where two pairs share any key.
    train_stage2 gives each pair two keys, its sample (video or image) and its caption text, so a
    repeated video and a repeated caption both count as positives rather than as negatives."""
    a, b = (a[:, None], b[:, None]) if a.dim() == 1 else (a, b)
    return (a[:, None, :] == b[None, :, :]).any(dim=-1)


def vtc_loss(v, t, ids, temp):
    """Video-text contrastive loss of this rank's rows against the global batch.

    v, t [B, E] (unnormalized), ids [B] or [B, K] pair keys. sim = <v, t> / temp over unit vectors; targets
    are the rows of the same_pair matrix, normalized (a repeated video is a positive). Each rank owns
    its B rows of the [G, G] matrix (and of its transpose), so the mean over ranks is the global loss.
    L_vtc = 1/2 (CE(v -> all t) + CE(t -> all v))."""
    v, t = F.normalize(v.float(), dim=-1), F.normalize(t.float(), dim=-1)
    v_all, t_all, ids_all = gather_with_grad(v), gather_with_grad(t), gather_with_grad(ids)  # [G, E], [G, K]
    targets = same_pair(ids, ids_all).float()                          # [B, G]
    targets = targets / targets.sum(dim=1, keepdim=True)
    loss_v2t = -(targets * (v @ t_all.t() / temp).log_softmax(dim=1)).sum(1).mean()
    loss_t2v = -(targets * (t @ v_all.t() / temp).log_softmax(dim=1)).sum(1).mean()
    return (loss_v2t + loss_t2v) / 2


@torch.no_grad()
def vtm_pairs(sim, ids):
    """Hard negatives for video-text matching, within this rank's batch.

    sim [B, B] video-to-text similarities, ids [B] or [B, K] pair keys -> (video_idx [3B], text_idx [3B],
    labels [3B]): the B positive pairs (label 1), each text with a drawn video, each video with a drawn
    text (label 0).
    Draws follow softmax(sim) over the non-positives only (positives get probability exactly 0)."""
    B, pos = sim.shape[0], same_pair(ids, ids)                                   # [B, B]
    neg_text = sim.float().masked_fill(pos, float('-inf')).softmax(1).multinomial(1)[:, 0]      # [B], per video
    neg_video = sim.float().t().masked_fill(pos, float('-inf')).softmax(1).multinomial(1)[:, 0]  # [B], per text
    ar = torch.arange(B, device=sim.device)
    labels = (torch.arange(3 * B, device=sim.device) < B).long()               # 1 = matching pair
    return torch.cat([ar, neg_video, ar]), torch.cat([ar, ar, neg_text]), labels


def mask_text(input_ids, attention_mask, prob=0.5, generator=None):
    """BERT's MLM corruption -> (masked_ids [B, L], labels [B, L] with -100 where not masked).

    Each real token except [sot] is picked with probability prob (paper: 0.5; [eot] can be picked,
    like BERT's [SEP] in the paper); picked tokens become [MASK] 80%, a random token 10%, stay 10%."""
    dev = input_ids.device
    pick = torch.rand(input_ids.shape, generator=generator, device=dev) < prob
    pick = pick & attention_mask & (input_ids != SOT_ID)                         # never padding, never [sot]
    u = torch.rand(input_ids.shape, generator=generator, device=dev)            # which of the three actions
    rand_ids = torch.randint(0, SOT_ID, input_ids.shape, generator=generator, device=dev)  # ordinary BPE tokens
    masked = torch.where(pick & (u < 0.8), MASK_ID, torch.where(pick & (u >= 0.9), rand_ids, input_ids))
    return masked, input_ids.masked_fill(~pick, -100)
