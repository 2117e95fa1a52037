"""
The stage-2 video-language model of UMT: the student video ViT (model.py) next to a text encoder
whose last blocks cross-attend to the video, and the three objectives that train them with the
stage-1 alignment (UTA): video-text contrastive (VTC), video-text matching (VTM) and masked language
modelling (MLM).

Paper section 3.2 and Eq. 2-4; the official model is multi_modality/models/umt.py with BERT
(multi_modality/models/backbones/bert/xbert.py) and the losses in
multi_modality/models/criterions.py.

The text side is one interface with two implementations. The default, TextEncoder below, is the
text tower of the teacher's own open_clip checkpoint (no `transformers` dependency, one checkpoint
serves teacher and text), made bidirectional, with BERT's split kept: blocks [0, fusion_layer) see
text only; blocks [fusion_layer, depth) also cross-attend to the vision tokens (VTM, MLM). The
paper's BERT (util/bert.BertTextEncoder, which loads the official stage-2 checkpoints) has the same
interface, so that nothing outside the text side knows which one it talks to:

    tokenizer(texts, L) -> ids [B, L], mask [B, L] bool   (+ .answer_eos, .mlm_ids: for QA, MLM)
    width, max_len, fusion_layer                           Dt, positions (CLIP 77, BERT 512), split
    forward_text(ids, mask) -> [B, L, Dt]                  the text-only blocks
    forward_fusion(x, mask, vision) -> [B, L, Dt]          the blocks that also read the video
    text_feature(x, mask), match_token(fused, mask)        [B, Dt]: VTC's and VTM's token
    new_mlm_head(), mlm_logits(fused, head, bias)          MLM

Shapes: as model.py (B, T, N_vis, D, K, C), plus L text length, Dt text width, E shared embedding
width, G global batch.
"""

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import VideoViT, VideoViTConfig, load_strict, uta_loss
from util.bert import BertConfig, BertTextEncoder, load_hf_bert
from util.wordpiece import Tokenizer

SOT_ID, EOT_ID, VOCAB = 49406, 49407, 49408  # open_clip BPE: start / end of text, vocabulary; pad 0
MASK_ID = VOCAB  # [MASK] lies one past the vocabulary: its own embedding vector, never an MLM class
_BPE = []        # the tokenizer, built on first use (open_clip is imported only when needed)

def tokenize(captions, context_length=32):
    """list[str] -> (input_ids [B, L] long, attention_mask [B, L] bool, True = real token). Rows are
    [sot] tokens [eot] 0 0 ...; a long caption is cut and still ends with [eot] (paper: L = 32). The
    mask comes from the eot position, not from `id != 0`: 0 is also a BPE token ('!')."""
    if not _BPE:
        from open_clip.tokenizer import SimpleTokenizer  # ships its BPE vocabulary: works offline
        _BPE.append(SimpleTokenizer())
    ids = _BPE[0](list(captions), context_length=context_length)       # [B, L]
    eot = (ids == EOT_ID).int().argmax(dim=1)                           # [B], one eot per row
    return ids, torch.arange(ids.shape[1])[None, :] <= eot[:, None]

class BPETokenizer:
    """The CLIP text side's tokenizer: tok(texts, L) = tokenize(texts, L). Plain data, so a
    DataLoader worker can hold it."""
    answer_eos = ''  # every text already ends with [eot]
    # MLM (mask_text): [sot] is never picked, a replaced token becomes an ordinary BPE token
    mlm_ids = dict(mask_id=MASK_ID, never=(SOT_ID,), random_ids=(0, SOT_ID))

    def __call__(self, texts, max_len=32):
        return tokenize(texts, max_len)

def text_mask(attention_mask, causal=False):
    """[B, L] bool (True = real token) -> SDPA mask [B, 1, 1 or L, L]: every query sees the real
    tokens; causal also hides the later ones (CLIP's original text mask, and the answer decoder of
    video QA)."""
    mask = attention_mask[:, None, None, :]                                      # [B, 1, 1, L]
    if causal:
        L = attention_mask.shape[1]
        mask = mask & torch.ones(L, L, dtype=torch.bool, device=mask.device).tril()  # [B, 1, L, L]
    return mask

def eot_index(attention_mask):
    """[B, L] bool -> [B]: the last real token, [eot] (or the [MASK] that MLM put there)."""
    return attention_mask.sum(dim=1) - 1

class TextAttention(nn.Module):
    """SDPA multi-head attention. Self-attention keeps nn.MultiheadAttention's packed in_proj
    [3Dt, Dt] (open_clip's layout); cross-attention (kv_dim = D) takes queries from text,
    keys/values from vision."""

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
        else:  # q [B, L, Dt], k and v [B, N_vis, Dt]
            q, (k, v) = self.q_proj(x), self.kv_proj(context).chunk(2, dim=-1)
        # [B, heads, L or N_vis, Dt / heads]
        q, k, v = (y.unflatten(-1, (self.heads, -1)).transpose(1, 2) for y in (q, k, v))
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)   # mask: True = may attend
        return self.out_proj(x.transpose(1, 2).reshape(B, L, Dt))

class TextBlock(nn.Module):
    """open_clip's pre-norm ResidualAttentionBlock (LN eps 1e-5); a fusion block adds a
    cross-attention sub-block between self-attention and the MLP, where BERT's fusion layers have
    theirs."""

    def __init__(self, dim, heads, mlp_ratio, quick_gelu, vision_dim=None):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.ln_1, self.attn = nn.LayerNorm(dim), TextAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(dim, hidden), c_proj=nn.Linear(hidden, dim)))
        self.quick_gelu = quick_gelu  # as the tower: OpenAI CLIP has x * sigmoid(1.702 x)
        if vision_dim is not None:    # new: CLIP's text tower never saw vision tokens
            self.ln_cross = nn.LayerNorm(dim)
            self.cross_attn = TextAttention(dim, heads, kv_dim=vision_dim)

    def forward(self, x, mask, vision=None, vision_mask=None):
        x = x + self.attn(self.ln_1(x), mask)
        if vision is not None:  # vision_mask None: all tokens valid (video); QA masks the question
            x = x + self.cross_attn(self.ln_cross(x), vision_mask, context=vision)
        h = self.mlp.c_fc(self.ln_2(x))
        return x + self.mlp.c_proj(h * torch.sigmoid(1.702 * h) if self.quick_gelu else F.gelu(h))

class TextEncoder(nn.Module):
    """The CLIP text side: CLIP's text transformer without its causal mask, plus [MASK] and the
    fusion blocks. [MASK] is a separate learned vector rather than a 49409th embedding row:
    token_embedding keeps CLIP's shape (loads as is), and the tied MLM decoder's classes are exactly
    the 49408 real tokens."""

    def __init__(self, vocab_size, context_length, width, heads, layers, mlp_ratio, quick_gelu,
                 fusion_layer, vision_dim):
        super().__init__()
        if not 0 <= fusion_layer <= layers:
            raise ValueError(f'fusion_layer={fusion_layer} must be between 0 and layers={layers}')
        self.fusion_layer, self.tokenizer = fusion_layer, BPETokenizer()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.mask_embedding = nn.Parameter(torch.randn(width) * 0.02)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.blocks = nn.ModuleList([TextBlock(width, heads, mlp_ratio, quick_gelu,
                                               vision_dim if i >= fusion_layer else None)
                                     for i in range(layers)])
        self.ln_text = nn.LayerNorm(width)   # new: normalizes the text-only output for VTC
        self.ln_final = nn.LayerNorm(width)  # CLIP's, after the last block
        for m in self.modules():  # CLIP / BERT init (std 0.02); build_umt then copies CLIP's tower
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @property
    def width(self):                                                  # Dt
        return self.ln_final.normalized_shape[0]

    @property
    def max_len(self):                                                # positions: CLIP's 77
        return self.positional_embedding.shape[0]

    def forward_text(self, input_ids, attention_mask):
        """The text-only blocks: ids [B, L] -> residual stream [B, L, Dt]."""
        x = self.token_embedding(input_ids.clamp_max(self.token_embedding.num_embeddings - 1))
        x = torch.where((input_ids == MASK_ID)[..., None], self.mask_embedding.to(x.dtype), x)
        x = x + self.positional_embedding[:input_ids.shape[1]]                   # [B, L, Dt]
        mask = text_mask(attention_mask)
        for blk in self.blocks[:self.fusion_layer]:
            x = blk(x, mask)
        return x

    def forward_fusion(self, x, attention_mask, vision=None):
        """The fusion blocks: x [B, L, Dt] from forward_text, vision [B, N_vis, D] -> [B, L, Dt]
        after ln_final."""
        mask = text_mask(attention_mask)
        for blk in self.blocks[self.fusion_layer:]:
            x = blk(x, mask, vision)
        return self.ln_final(x)

    def text_feature(self, x, attention_mask):
        """VTC's token, [B, L, Dt] -> [B, Dt]: [eot] after ln_text. CLIP summarizes a caption at
        its end-of-text token; its first token, under a causal mask, never saw the caption."""
        return self.ln_text(x[torch.arange(x.shape[0], device=x.device), eot_index(attention_mask)])

    def match_token(self, fused, attention_mask):
        """VTM's token, [B, L, Dt] -> [B, Dt]: the fused [eot] (BERT reads its [CLS])."""
        return fused[torch.arange(fused.shape[0], device=fused.device), eot_index(attention_mask)]

    def new_mlm_head(self):
        """BERT's MLM head for a tower that has none: transform (dense, GELU, LN), then a decoder
        tied to the token embedding, + a bias -> (transform, bias), which UMT keeps."""
        Dt = self.width
        return nn.Sequential(nn.Linear(Dt, Dt), nn.GELU(), nn.LayerNorm(Dt)), \
            nn.Parameter(torch.zeros(self.token_embedding.num_embeddings))

    def mlm_logits(self, fused, head, bias):
        """[..., Dt] -> [..., 49408]; the decoder weight is the token embedding (tied, as BERT)."""
        return head(fused) @ self.token_embedding.weight.t() + bias

class UMT(nn.Module):
    """The stage-2 model: student, pool_norm, a text side, projections and heads. The frozen teacher
    is not part of it (never saved). Build with build_umt (CLIP text) or build_umt_bert, or
    UMT.from_configs to load a checkpoint."""

    def __init__(self, vision_encoder, text_encoder, embed_dim):
        super().__init__()
        D, Dt = vision_encoder.config.embed_dim, text_encoder.width
        self.vision_encoder, self.text_encoder = vision_encoder, text_encoder
        self.pool_norm = nn.LayerNorm(D, eps=1e-6)
        self.vision_proj, self.text_proj = nn.Linear(D, embed_dim), nn.Linear(Dt, embed_dim)
        self.itm_head = nn.Linear(Dt, 2)
        # The MLM head: BERT brings its own (text_encoder.cls, None here); the CLIP tower's is made
        # here, where the CLIP checkpoints of this project keep it (mlm_head.*, mlm_bias)
        self.mlm_head, self.mlm_bias = text_encoder.new_mlm_head()
        self.temp = nn.Parameter(torch.tensor(0.07))  # sim / temp, clamped to [0.001, 0.5] (train)
        self.text_config = None                       # set by from_configs; checkpoints save it

    @classmethod
    def from_configs(cls, vision_config, text_config, vision_encoder=None):
        """Random weights from a checkpoint's 'model_config' and 'text_config' dicts (then
        load_strict). A BERT text_config is {'text_encoder': 'bert', 'bert': BertConfig fields,
        'vocab': [tokens] or None, 'embed_dim': E}; any other is the CLIP tower's (text_config)."""
        vision = vision_encoder or VideoViT(VideoViTConfig(**vision_config))
        D = vision.config.embed_dim
        if text_config.get('text_encoder') == 'bert':
            cfg = BertConfig(**{**text_config['bert'], 'encoder_width': D})
            vocab = text_config.get('vocab')
            text = BertTextEncoder(cfg, Tokenizer(vocab) if vocab else None)
        else:
            tower = {k: v for k, v in text_config.items() if k != 'embed_dim'}
            text = TextEncoder(**tower, vision_dim=D)
        model = cls(vision, text, text_config['embed_dim'])
        model.text_config = dict(text_config)
        return model

    @property
    def tokenizer(self):
        return self.text_encoder.tokenizer

    def encode_video(self, video, keep=None, per_frame=False):
        """video [B, 3, T, H, W] -> (x_vis [B, N_vis, D], aligned [K, B, N_vis, C] or None, feat).
        feat (not normalized): [B, E] from all visible tokens (training), or [B, t, E] per frame
        (evaluation, whose per-frame similarities are averaged: the official keep_temporal)."""
        x_vis, aligned = self.vision_encoder(video, keep)
        if per_frame:  # frames keep the same token count, in (t, h, w) order: a reshape splits
            t = self.vision_encoder.grid(video)[0]
            pooled = x_vis.unflatten(1, (t, -1)).mean(2)                    # [B, t, D]
        else:
            pooled = x_vis.mean(1)                                          # [B, D]
        return x_vis, aligned, self.vision_proj(self.pool_norm(pooled))

    def encode_text(self, input_ids, attention_mask):
        """-> (text_hidden [B, L, Dt] after the text-only blocks, feat [B, E] of the text side's VTC
        token)."""
        h = self.text_encoder.forward_text(input_ids, attention_mask)
        return h, self.text_proj(self.text_encoder.text_feature(h, attention_mask))

    def fuse(self, text_hidden, attention_mask, vision_tokens):
        return self.text_encoder.forward_fusion(text_hidden, attention_mask, vision_tokens)

    def itm_logits(self, text_hidden, attention_mask, vision_tokens):
        """[B, 2] no-match / match logits from the fused text side's VTM token."""
        fused = self.fuse(text_hidden, attention_mask, vision_tokens)            # [B, L, Dt]
        return self.itm_head(self.text_encoder.match_token(fused, attention_mask))

    def mlm_logits(self, fused):
        """[..., Dt] -> [..., vocab]."""
        return self.text_encoder.mlm_logits(fused, self.mlm_head, self.mlm_bias)

    def forward(self, video, keep, targets, input_ids, attention_mask, ids, mlm_prob=0.5):
        """All four stage-2 losses from one vision forward -> [4]: VTC, VTM, MLM, UTA (the script
        weighs them).

        video [B, 3, T, H, W], keep [B, N_vis] (None: every token, per-frame features as in the
        official retrieval fine-tuning), targets [K, B, N_vis, C] (teacher; None: no UTA),
        input_ids and attention_mask [B, L], ids [B] or [B, K] pair keys (pairs sharing a key are
        positives, see same_pair); mlm_prob 0: no MLM."""
        # x_vis [B, N_vis, D], aligned [K, B, N_vis, C], v [B, E] or per frame [B, t, E]
        x_vis, aligned, v = self.encode_video(video, keep, per_frame=keep is None)
        text_hidden, t = self.encode_text(input_ids, attention_mask)    # [B, L, Dt], [B, E]
        # UTA: L_uta = mean over layers and visible tokens of 2 - 2 cos(student, teacher)
        loss_uta = uta_loss(aligned, targets) if targets is not None else v.new_zeros(())
        # VTC: this rank's pairs against the whole global batch
        loss_vtc = vtc_loss(v, t, ids, self.temp)
        # VTM: the positive pairs and the hard negatives of vtm_pairs through the fusion blocks;
        # 2-way cross-entropy
        vtm_sim = similarity(F.normalize(v.detach().float(), dim=-1),
                             F.normalize(t.detach().float(), dim=-1))
        vi, ti, labels = vtm_pairs(vtm_sim / self.temp.detach(), ids)  # [3B] each
        logits = self.itm_logits(text_hidden[ti], attention_mask[ti], x_vis[vi])  # [3B, 2]
        loss_vtm = F.cross_entropy(logits.float(), labels)
        # MLM: the corrupted caption through the text-only and fusion blocks (attending to the
        # visible video tokens); cross-entropy on the masked positions only, scored for those rows
        # only ([n_masked, vocab], not [B, L, vocab])
        loss_mlm = v.new_zeros(())
        if mlm_prob > 0:
            masked_ids, mlm_labels = mask_text(input_ids, attention_mask, mlm_prob,
                                               **self.tokenizer.mlm_ids)
            hidden = self.text_encoder.forward_text(masked_ids, attention_mask)
            fused = self.fuse(hidden, attention_mask, x_vis)
            pick = mlm_labels != -100                                   # [B, L]
            loss_mlm = F.cross_entropy(self.mlm_logits(fused[pick]).float(), mlm_labels[pick],
                                       reduction='sum') / pick.sum().clamp(min=1)
        return torch.stack([loss_vtc, loss_vtm, loss_mlm, loss_uta])

def text_config(clip_model, embed_dim=None, fusion_layer=None):
    """Text-side config of an open_clip CLIP (teacher.build_clip). Defaults are the paper's: E =
    CLIP's embedding width (512 for B/16, 768 for L/14, 64 tiny), fusion_layer = 3/4 of the depth
    (9 of 12)."""
    blocks, width = clip_model.transformer.resblocks, clip_model.transformer.width
    if getattr(clip_model, 'text_pool_type', 'argmax') != 'argmax' or \
            not isinstance(blocks[0].ls_1, nn.Identity):
        raise ValueError('only plain CLIP text towers (eot pooling, no layer scale) are supported')
    return dict(vocab_size=clip_model.vocab_size, context_length=clip_model.context_length,
                width=width, heads=blocks[0].attn.num_heads, layers=len(blocks),
                mlp_ratio=blocks[0].mlp.c_fc.out_features / width,
                quick_gelu=type(blocks[0].mlp.gelu).__name__ == 'QuickGELU',
                fusion_layer=len(blocks) * 3 // 4 if fusion_layer is None else fusion_layer,
                embed_dim=embed_dim or clip_model.text_projection.shape[1])

def clip_text_state_dict(clip_model):
    """open_clip's text-tower weights under TextEncoder's names (text_projection, logit_scale
    unused)."""
    names = ('token_embedding.', 'positional_embedding', 'transformer.', 'ln_final.')
    rename = lambda k: k.replace('transformer.resblocks.', 'blocks.').replace('attn.in_proj_',
                                                                              'attn.in_proj.')
    return {rename(k): v for k, v in clip_model.state_dict().items() if k.startswith(names)}

def build_umt(vision_encoder, clip_model, embed_dim=None, fusion_layer=None):
    """UMT around vision_encoder, with the text tower copied from clip_model; the rest is new."""
    model = UMT.from_configs(None, text_config(clip_model, embed_dim, fusion_layer),
                             vision_encoder=vision_encoder)
    sd, own = clip_text_state_dict(clip_model), model.text_encoder.state_dict()
    new = [k for k in own if k not in sd]  # by design: mask_embedding, ln_text, the cross-attention
    assert all(k.startswith(('mask_embedding', 'ln_text.')) or '_cross' in k or 'cross_' in k
               for k in new), new
    load_strict(model.text_encoder, {**sd, **{k: own[k] for k in new}})  # all of CLIP's must fit
    return model

def build_umt_bert(vision_encoder, bert_config, tokenizer, embed_dim, released=None):
    """UMT around vision_encoder with the paper's BERT text side (util/bert.py), encoder_width set
    to the video width. released: a Hugging Face BERT state dict (bert-base-uncased, ...) copied in,
    as the official builder's from_pretrained -> (model, the text side's keys that are new: the
    fusion layers' cross-attention, which BERT never had; all of them without `released`)."""
    config = dict(dataclasses.asdict(bert_config), encoder_width=vision_encoder.config.embed_dim)
    model = UMT.from_configs(None, dict(text_encoder='bert', bert=config, vocab=tokenizer.tokens,
                                        embed_dim=embed_dim), vision_encoder=vision_encoder)
    if released is None:
        return model, list(model.text_encoder.state_dict())
    return model, load_hf_bert(model.text_encoder, released)

# ----------------------------------------------------------------------------------------------
# Stage 2 objectives (the training loop is in train_stage2.py)

class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward SUMS the gradient over ranks, then returns this rank's slice.

    Rank r's loss uses every rank's features, so d(sum of losses)/d(x_r) needs every rank's share;
    DDP then averages parameter gradients, which makes the result equal the one-process gradient of
    the mean loss over the global batch. The official backward (multi_modality/models/criterions.py)
    returns the local slice without the sum: with its full-matrix loss on every rank that scales the
    VTC gradient by 1/W."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts)                                           # [G, ...], rank order

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)  # a copy: autograd may own `grad`
        torch.distributed.all_reduce(grad)
        return grad.chunk(torch.distributed.get_world_size())[torch.distributed.get_rank()]

def gather_with_grad(x):
    dist = torch.distributed
    return _GatherWithGrad.apply(x) if dist.is_available() and dist.is_initialized() else x

def same_pair(a, b):
    """Pair keys a [B, K], b [G, K] (or [B], [G]) -> [B, G] bool: True where two pairs share any
    key. train_stage2 gives each pair two keys, its sample (video or image) and its caption text, so
    a repeated video and a repeated caption both count as positives rather than as negatives."""
    a, b = (a[:, None], b[:, None]) if a.dim() == 1 else (a, b)
    return (a[:, None, :] == b[None, :, :]).any(dim=-1)

def similarity(v, t):
    """Unit vectors video [Bv, E] or per-frame [Bv, t, E], text [Bt, E] -> [Bv, Bt] cosines, the
    mean over frames (the official get_sim)."""
    return (v if v.dim() == 3 else v[:, None]).matmul(t.t()).mean(1)

def vtc_loss(v, t, ids, temp):
    """Video-text contrastive loss of this rank's rows against the global batch:
    L_vtc = 1/2 (CE(v -> t) + CE(t -> v)).

    v [B, E] or per-frame [B, t, E], t [B, E] (unnormalized), ids [B] or [B, K] pair keys. The
    targets are the rows of same_pair, normalized (a repeated video is a positive). Each rank owns
    its B rows of the [G, G] matrix (and of its transpose), so the mean over ranks is the global
    loss."""
    v, t = F.normalize(v.float(), dim=-1), F.normalize(t.float(), dim=-1)
    # v_all [G, (t,) E], t_all [G, E], ids_all [G, K]
    v_all, t_all, ids_all = gather_with_grad(v), gather_with_grad(t), gather_with_grad(ids)
    targets = same_pair(ids, ids_all).float()                          # [B, G]
    targets = targets / targets.sum(dim=1, keepdim=True)
    loss_v2t = -(targets * (similarity(v, t_all) / temp).log_softmax(dim=1)).sum(1).mean()
    loss_t2v = -(targets * (similarity(v_all, t).t() / temp).log_softmax(dim=1)).sum(1).mean()
    return (loss_v2t + loss_t2v) / 2

@torch.no_grad()
def vtm_pairs(sim, ids):
    """Hard negatives for video-text matching, within this rank's batch: sim [B, B] video-to-text
    similarities divided by the temperature (0.07 at the start: that is what makes the negatives
    hard), ids [B] or [B, K] pair keys -> (video_idx [3B], text_idx [3B], labels [3B]): the B
    positive pairs (label 1), each text with a drawn video, each video with a drawn text (label 0).
    Draws follow softmax(sim) over the non-positives only, as the official vtm_loss; a row without
    any (every pair of the batch has its caption) draws any other item instead, where the official
    code stops with an error."""
    B, pos = sim.shape[0], same_pair(ids, ids)                                   # [B, B]
    others = ~torch.eye(B, dtype=torch.bool, device=sim.device)

    def draw(s):  # [B, B] -> [B]: one index per row; an all-positive row gets all 0 first
        p = s.float().masked_fill(pos, float('-inf')).softmax(1).nan_to_num(0.0)
        return torch.where(p.sum(1, keepdim=True) > 0, p, others.float()).multinomial(1)[:, 0]

    neg_text, neg_video = draw(sim), draw(sim.t())                   # [B] per video, [B] per text
    ar = torch.arange(B, device=sim.device)
    labels = (torch.arange(3 * B, device=sim.device) < B).long()     # 1 = matching pair
    return torch.cat([ar, neg_video, ar]), torch.cat([ar, ar, neg_text]), labels

def mask_text(input_ids, attention_mask, prob=0.5, generator=None, mask_id=MASK_ID, never=(SOT_ID,),
              random_ids=(0, SOT_ID)):
    """BERT's MLM corruption -> (masked_ids [B, L], labels [B, L] with -100 where not masked). Each
    real token except those of `never` is picked with probability prob (paper: 0.5); picked tokens
    become mask_id 80%, a random id in [random_ids) 10%, stay 10%. The ids are the text side's
    (tokenizer.mlm_ids): CLIP never picks [sot] ([eot] can be picked, like BERT's [SEP] in the
    paper) and draws ordinary BPE tokens; BERT never picks [PAD] and [CLS], and draws any id."""
    dev = input_ids.device
    pick = torch.rand(input_ids.shape, generator=generator, device=dev) < prob
    pick = pick & attention_mask & ~torch.isin(input_ids, torch.tensor(never, device=dev))
    u = torch.rand(input_ids.shape, generator=generator, device=dev)  # which of the three actions
    rand_ids = torch.randint(*random_ids, input_ids.shape, generator=generator, device=dev)
    masked = torch.where(pick & (u < 0.8), mask_id,
                         torch.where(pick & (u >= 0.9), rand_ids, input_ids))
    return masked, input_ids.masked_fill(~pick, -100)


if __name__ == '__main__':  # a module, not a script: say what it holds
    print(__doc__.strip())
