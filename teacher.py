"""The frozen CLIP teacher of Unmasked Teacher (UMT, ICCV 2023, arXiv 2303.16058, section 3.1),
used in both stages.

UMT distills a video student from an image CLIP that never sees a mask. Every frame of the *full*
clip goes through CLIP's visual transformer on its own, and the teacher gives back two things:
  1. targets: the patch tokens of its last K blocks through CLIP's ln_post and proj, L2-normalized,
     which the student's alignment heads regress on its visible tokens (UTA, 2 - 2 cos);
  2. attn: the last block's CLS-query attention over the patches, from which semantic masking keeps
     the patches that CLIP looks at (masking.py).

Weights come from open_clip: 'ViT-B-16-quickgelu' + 'openai' for UMT-B, 'ViT-L-14-quickgelu' with
image_size=196 for UMT-L (196/14 = 14x14 patches, the same grid as the student's 224/16); the CPU
demo's is demo.tiny_clip(), trained by demo.py. The forward is written out over open_clip's own
modules, as open_clip has no API for attention weights (see CLIPTeacher.block). Unlike the official
code, CLIP gets frames in its own normalization, not the student's ImageNet one (see encode).

Usage:
    teacher = CLIPTeacher(build_clip('ViT-B-16-quickgelu', 'openai'), align_layers=6).to(device)
    # UMT-L: CLIPTeacher(build_clip('ViT-L-14-quickgelu'), 6, image_size=196); the demo's:
    # CLIPTeacher(demo.tiny_clip(weights), align_layers)
    hidden, attn = teacher.encode(video)       # attn -> semantic mask -> keep
    targets = teacher.targets(hidden, keep)    # [K, B, N_vis, C], only the tokens the student sees

Shapes: B batch, T frames, H,W pixels, S teacher resolution, h,w patch grid per frame, N = T*h*w,
N_vis kept tokens, K aligned layers, E teacher width (768 for B/16), C output width (512 for B/16).
"""
import logging
import os

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, ResidualAttentionBlock

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # data.py normalizes clips with these (as the official code)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # ... but OpenAI CLIP was trained with these
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

WEIGHTS_HINT = ("download the 'openai' weights once with network, or pass a local "
                "open_clip_pytorch_model.bin (Hugging Face repo "
                "timm/vit_base_patch16_clip_224.openai) with a '-quickgelu' model name")

def imagenet_to_clip():
    """(scale, shift) [3, 1, 1] that turn an ImageNet-normalized x into a CLIP-normalized x_clip:
    x_clip = (x * std_in + mean_in - mean_clip) / std_clip = x * scale + shift."""
    mean_in, std_in, mean_clip, std_clip = (torch.tensor(c).view(3, 1, 1) for c in
                                            (IMAGENET_MEAN, IMAGENET_STD, CLIP_MEAN, CLIP_STD))
    return std_in / std_clip, (mean_in - mean_clip) / std_clip

def check_quickgelu(model):
    """OpenAI CLIP was trained with QuickGELU, x * sigmoid(1.702 x). With exact GELU the features
    are quietly wrong, and open_clip silently picks nn.GELU for e.g. 'ViT-B-16' + a file path."""
    act = model.visual.transformer.resblocks[0].mlp.gelu
    if not isinstance(act, QuickGELU):
        raise ValueError(f"OpenAI CLIP weights need QuickGELU but this model uses "
                         f"{type(act).__name__}: use a '-quickgelu' model name such as "
                         "'ViT-B-16-quickgelu'")

def build_clip(name='ViT-B-16-quickgelu', pretrained='openai'):
    """Frozen open_clip CLIP model (both towers; video_language.py builds the text side from it).
    `pretrained`: an open_clip tag, a local weights file, or None for random weights. (The demo's
    tiny CLIP is demo.tiny_clip.)"""
    try:
        if pretrained is None:  # random on purpose: open_clip's warning would only be noise
            logging.disable(logging.WARNING)
        model = open_clip.create_model(name, pretrained=pretrained)
    except RuntimeError as e:  # unknown model name; offline and not cached; a missing file
        raise ValueError(f"could not build the CLIP teacher {name!r} with weights {pretrained!r}: "
                         f"{str(e).splitlines()[0]}\n{WEIGHTS_HINT}") from None
    finally:
        logging.disable(logging.NOTSET)
    if pretrained == 'openai' or (pretrained is not None and os.path.isfile(pretrained)):
        check_quickgelu(model)
    return model.eval().requires_grad_(False)

def resize_pos_embed(pos, grid):
    """[1 + g*g, E] -> [1 + grid*grid, E]: bicubic on the 2-D patch grid, the CLS row kept as is."""
    g = int(round((pos.shape[0] - 1) ** 0.5))
    patches = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)  # [1, E, g, g]
    patches = F.interpolate(patches.float(), size=(grid, grid), mode='bicubic', align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(grid * grid, -1)  # [grid*grid, E], raster order
    return torch.cat([pos[:1], patches.to(pos.dtype)]).detach()

class CLIPTeacher(nn.Module):
    """CLIP's visual tower, frame by frame; always frozen (eval, no grad, never saved or in DDP)."""

    def __init__(self, clip_model, align_layers=6, image_size=None):
        super().__init__()
        self.visual = v = clip_model.visual  # the text tower is not needed to make targets
        blocks = v.transformer.resblocks
        if not all(type(b) is ResidualAttentionBlock for b in blocks):
            raise ValueError('CLIPTeacher needs a plain CLIP ViT (open_clip '
                             'ResidualAttentionBlock blocks)')
        depth = len(blocks)
        if not (isinstance(align_layers, int) and 1 <= align_layers <= depth):
            raise ValueError(f'align_layers must be an int in 1..{depth} (the teacher has {depth} '
                             f'blocks), got {align_layers!r}')
        self.align_layers, self.heads = align_layers, blocks[0].attn.num_heads
        self.patch, native = v.patch_size[0], v.image_size[0]
        self.image_size = image_size or native  # S: frames are resized to S x S before the teacher
        if self.image_size % self.patch:
            raise ValueError(f'the teacher size {self.image_size} is not a multiple of the patch '
                             f'size {self.patch}')
        # Learned positions exist for the native grid only: resize once (UMT-L: 16x16 -> 14x14).
        grid = self.image_size // self.patch
        pos = (None if self.image_size == native
               else resize_pos_embed(v.positional_embedding, grid))  # [1 + grid^2, E]
        self.register_buffer('pos_resized', pos, persistent=False)
        in_scale, in_shift = imagenet_to_clip()
        self.register_buffer('in_scale', in_scale, persistent=False)
        self.register_buffer('in_shift', in_shift, persistent=False)
        # Speed: QuickGELU(y) = y * sigmoid(1.702 y) costs three passes over the widest
        # activation [B*T, M, 4E]. With c_fc scaled by 1.702 and c_proj by 1 / 1.702 it becomes
        # SiLU(y) = y * sigmoid(y), one fused pass, and the block computes the same function.
        # This edits clip_model's visual tower (frozen, never saved); its text tower is untouched.
        if isinstance(blocks[0].mlp.gelu, QuickGELU):
            with torch.no_grad():
                for blk in blocks:
                    blk.mlp.c_fc.weight.mul_(1.702), blk.mlp.c_fc.bias.mul_(1.702)
                    blk.mlp.c_proj.weight.div_(1.702)
                    blk.mlp.gelu = nn.SiLU()
        self.eval().requires_grad_(False)

    def train(self, mode=True):
        return super().train(False)  # a frozen teacher stays in eval mode, even in model.train()

    def block(self, blk, x, cls_attn=False):
        """One open_clip ResidualAttentionBlock on x [BT, M, E] (M = 1 + h*w), written out so
        attention goes through SDPA and the last block can also return its CLS-query attention row
        [BT, h*w]."""
        BT, M, E = x.shape
        nh, hd = self.heads, E // self.heads
        qkv = F.linear(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias)  # [BT, M, 3E]
        q, k, v = qkv.view(BT, M, 3, nh, hd).permute(2, 0, 3, 1, 4)  # 3 x [BT, nh, M, hd]
        a = F.scaled_dot_product_attention(q, k, v)  # [BT, nh, M, hd], softmax(q k^T / sqrt(hd)) v
        a = a.transpose(1, 2).reshape(BT, M, E)  # [BT, M, E], heads side by side again
        x = x + blk.ls_1(blk.attn.out_proj(a))  # ls_* are Identity for OpenAI CLIP
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        if not cls_attn:
            return x, None
        # CLS query only: softmax(q_cls k^T / sqrt(hd)) is one row per head, O(M) instead of M x M.
        # fp32 even under autocast: the semantic sampler draws from these probabilities.
        with torch.autocast(x.device.type, enabled=False):
            logits = (q[:, :, :1].float() @ k.float().transpose(-2, -1)
                      * hd ** -0.5)  # [BT, nh, 1, M]
            attn = logits.softmax(dim=-1).mean(dim=1)[:, 0, 1:]  # [BT, h*w]: head mean, no CLS key
        return x, attn  # rows sum to slightly < 1 (the CLS -> CLS mass is gone); fine for sampling

    @torch.no_grad()
    def encode(self, video):
        """video [B, 3, T, H, W] ImageNet-normalized -> (hidden [K, B, N, E] patch tokens of the
        last K blocks before ln_post, in (t, h, w) raster order; attn [B, T, h*w] fp32)."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f'expected an ImageNet-normalized video [B, 3, T, H, W], got '
                             f'{tuple(video.shape)}')
        B, _, T, H, W = video.shape
        S, v = self.image_size, self.visual
        x = video.transpose(1, 2).reshape(B * T, 3, H, W)  # [B*T, 3, H, W], one image per frame
        if (H, W) != (S, S):  # e.g. 224 -> 196 for the L/14 teacher
            x = F.interpolate(x, size=(S, S), mode='bicubic', align_corners=False)  # [B*T, 3, S, S]
        # ImageNet -> CLIP normalization. The official code feeds CLIP the ImageNet-normalized
        # frames (about 1.2x the contrast CLIP was trained on); we give CLIP what it expects.
        x = x * self.in_scale + self.in_shift
        x = v.conv1(x.to(v.conv1.weight.dtype))  # [B*T, E, h, w], one token per patch
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # [B*T, h*w, E]
        cls = v.class_embedding.to(x.dtype).expand(B * T, 1, -1)  # [B*T, 1, E]
        pos = (v.positional_embedding if self.pos_resized is None
               else self.pos_resized)  # [1 + h*w, E]
        x = v.ln_pre(torch.cat([cls, x], dim=1) + pos.to(x.dtype))  # [B*T, 1 + h*w, E]
        blocks, hidden, attn = v.transformer.resblocks, [], None
        for i, blk in enumerate(blocks):
            x, attn = self.block(blk, x, cls_attn=i == len(blocks) - 1)
            if i >= len(blocks) - self.align_layers:  # one of the last K: keep its patch tokens
                hidden.append(x[:, 1:].reshape(B, T * h * w, -1))  # [B, N, E], (t, h, w) order
        return torch.stack(hidden), attn.view(B, T, h * w)  # [K, B, N, E], [B, T, h*w]

    @torch.no_grad()
    def targets(self, hidden, keep=None):
        """hidden [K, B, N, E], keep LongTensor [B, N_vis] or None (all) -> unit vectors
        [K, B, N_vis, C]. Gathering first: ln_post and proj run on the visible tokens only."""
        K, B, N, E = hidden.shape
        if keep is not None:  # index + gather: no boolean mask, no host sync
            hidden = hidden.gather(
                2, keep[None, :, :, None].expand(K, B, keep.shape[1], E))  # [K, B, N_vis, E]
        x = self.visual.ln_post(hidden) @ self.visual.proj  # [K, B, N_vis, C]: CLIP's output space
        return F.normalize(x.float(), dim=-1)  # fp32 unit vectors: the UTA loss is 2 - 2 cos

    @torch.no_grad()
    def forward(self, video):
        """video [B, 3, T, H, W] -> (targets [K, B, N, C] for every token, attn [B, T, h*w])."""
        hidden, attn = self.encode(video)
        return self.targets(hidden), attn

if __name__ == '__main__':  # a module, not a script: say what it holds
    print(__doc__.strip())
