"""
BERT, the text side of the paper's stage-2 and video QA models (BERT-base for UMT-B, BERT-large for
UMT-L), in plain torch: official UMT checkpoints load with strict=True and give the same outputs.

It follows the official multi_modality/models/backbones/bert/xbert.py (BertModel, BertForMaskedLM,
BertLMHeadModel) with builder.py, models/umt.py (BertTextEncoder: the stage-2 text side) and
tasks/shared_utils.py:setup_model (stage-2 -> fine-tuning keys); the QA model built from these
parts is tasks/video_qa.BertUMTQA. Module names spell the official
keys: embeddings.*, encoder.layer.{i}.attention.self.query.*, crossattention.* (layers >=
fusion_layer only), cls.predictions.*; no pooler. A layer is post-LN: a = LN(x + SelfAttn(x)), in
fusion layers a = LN(a + CrossAttn(a, vision)), y = LN(a + FFN(a)), with the exact erf GELU and
LayerNorm eps 1e-12.

Shapes: B batch, L text length, D text width, H heads, N cross-attended tokens (vision, or the
question in the QA decoder), Dv their width (encoder_width), V vocabulary.
"""

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

@dataclass
class BertConfig:
    vocab_size: int = 30522           # bert-base-uncased WordPiece vocabulary
    hidden_size: int = 768            # D
    num_hidden_layers: int = 12
    num_attention_heads: int = 12     # head width 64
    intermediate_size: int = 3072     # FFN width, 4 D
    max_position_embeddings: int = 512
    type_vocab_size: int = 2          # segment embeddings; UMT always uses segment 0
    fusion_layer: int = 9             # layers >= this one also cross-attend to the vision tokens
    encoder_width: int = 768          # Dv, the vision tokens' width (the vision d_model)
    dropout: float = 0.1              # on attention probabilities and hidden states (official: 0.1)

CONFIGS = {
    'base': BertConfig(),                                                   # UMT-B: fusion 9-11
    'large': BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,  # 19-23
                        intermediate_size=4096, fusion_layer=19, encoder_width=1024),
    'tiny': BertConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,  # tests, demo
                       intermediate_size=128, max_position_embeddings=64, fusion_layer=2,
                       encoder_width=48),
}

EMBED_DIMS = {'base': 512, 'large': 768, 'tiny': 64}  # E, the VTC space (official configs/model.py)
# The WordPiece vocabulary of the released BERTs and of every official UMT checkpoint
# (bert-large-uncased has the same vocab.txt), fetched once into the Hugging Face cache
VOCAB = 'hf://google-bert/bert-base-uncased/vocab.txt'

def decoder_config(cfg):
    """The QA answer decoder of a text encoder (builder.py:build_bert_decoder): as many layers as
    the encoder's fusion part (3 for BERT-base, 5 for BERT-large), each cross-attending. It reads
    question states of width D; the official builder passes the vision width, D in every release."""
    return replace(cfg, num_hidden_layers=cfg.num_hidden_layers - cfg.fusion_layer, fusion_layer=0,
                   encoder_width=cfg.hidden_size)

class AddNorm(nn.Module):
    """BertSelfOutput / BertOutput: LN(dropout(dense(h)) + residual), post-LN."""

    def __init__(self, cfg, d_in):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, h, residual):
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)

class Attention(nn.Module):
    """BertAttention: x [B, L, D] attends to kv [B, N, kv_width] (None: to itself), then AddNorm."""

    def __init__(self, cfg, kv_width):
        super().__init__()
        D, self.heads, self.p = cfg.hidden_size, cfg.num_attention_heads, cfg.dropout
        # `self` is the official module name (attention.self.query.weight), kept for the keys
        self.self = nn.ModuleDict(dict(query=nn.Linear(D, D), key=nn.Linear(kv_width, D),
                                       value=nn.Linear(kv_width, D)))
        self.output = AddNorm(cfg, D)

    def forward(self, x, mask, kv=None):
        B, L, D = x.shape
        kv = x if kv is None else kv
        q, k, v = self.self.query(x), self.self.key(kv), self.self.value(kv)  # [B, L or N, D]
        q, k, v = (y.unflatten(-1, (self.heads, -1)).transpose(1, 2) for y in (q, k, v))
        # q [B, H, L, D/H], k and v [B, H, N, D/H]
        # softmax(q k^T / sqrt(D/H) + mask) v, mask additive [B, 1, 1 or L, N]. Under fp16 autocast
        # finfo(float32).min becomes -inf: harmless unless a row has no key at all
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype),
                                             dropout_p=self.p if self.training else 0.0)
        return self.output(ctx.transpose(1, 2).reshape(B, L, D), x)          # [B, L, D]

class Layer(nn.Module):
    """BertLayer: self-attention, cross-attention (fusion layers only), FFN."""

    def __init__(self, cfg, cross):
        super().__init__()
        self.cross = cross
        self.attention = Attention(cfg, cfg.hidden_size)
        if cross:
            self.crossattention = Attention(cfg, cfg.encoder_width)
        self.intermediate = nn.ModuleDict(dict(dense=nn.Linear(cfg.hidden_size,
                                                               cfg.intermediate_size)))
        self.output = AddNorm(cfg, cfg.intermediate_size)

    def forward(self, x, mask, context=None, context_mask=None):
        a = self.attention(x, mask)                                           # [B, L, D]
        if self.cross:  # after self-attention, before the FFN
            a = self.crossattention(a, context_mask, context)
        return self.output(F.gelu(self.intermediate.dense(a)), a)             # exact erf GELU

class Embeddings(nn.Module):
    """LN(word[ids] + token_type[0] + position[:L]); checkpoints carry the position_ids buffer."""

    def __init__(self, cfg):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(cfg.dropout)
        P = cfg.max_position_embeddings
        self.register_buffer('position_ids', torch.arange(P)[None])          # [1, P], int64

    def forward(self, input_ids):
        x = self.word_embeddings(input_ids) + self.token_type_embeddings.weight[0]  # [B, L, D]
        x = x + self.position_embeddings(self.position_ids[:, :input_ids.shape[1]])
        return self.dropout(self.LayerNorm(x))

def init_weights(m):
    """BERT's init: weights normal(0.02), biases and the padding embedding 0, LayerNorm (1, 0)."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)
    if isinstance(m, nn.Embedding) and m.padding_idx is not None:
        nn.init.zeros_(m.weight[m.padding_idx])

class BertModel(nn.Module):
    """The official BertModel, without pooler. mode 'text': layers [0, fusion_layer) from input_ids
    (the VTC feature); 'fusion': layers [fusion_layer, N) from text_embeds, the text output (VTM,
    MLM); 'multi_modal': all layers from input_ids (QA). causal=True: the answer decoder."""

    def __init__(self, cfg):
        super().__init__()
        self.fusion_layer = cfg.fusion_layer
        self.embeddings = Embeddings(cfg)
        self.encoder = nn.ModuleDict(dict(layer=nn.ModuleList(
            [Layer(cfg, i >= cfg.fusion_layer) for i in range(cfg.num_hidden_layers)])))
        self.apply(init_weights)

    def forward(self, input_ids=None, attention_mask=None, context=None, context_mask=None,
                mode='multi_modal', text_embeds=None, causal=False):
        """-> last hidden state [B, L, D]. attention_mask [B, L]: 1 = token (None: all); context
        [B, N, Dv]: the vision tokens, or the question states in the decoder; context_mask [B, N]
        (None: all). Official names: encoder_hidden_states, encoder_attention_mask, encoder_embeds
        for context, context_mask, text_embeds."""
        if mode == 'fusion':
            x, layers = text_embeds, self.encoder.layer[self.fusion_layer:]   # no embeddings
        elif mode in ('text', 'multi_modal'):
            x = self.embeddings(input_ids)                                    # [B, L, D]
            layers = self.encoder.layer[:self.fusion_layer if mode == 'text' else None]
        else:
            raise ValueError(f"mode must be 'text', 'fusion' or 'multi_modal', not {mode!r}")
        B, L, D = x.shape
        if context is None and any(layer.cross for layer in layers):
            raise ValueError(f'mode {mode!r} runs cross-attention layers: pass context')
        m = torch.ones(B, L, device=x.device) if attention_mask is None else attention_mask.float()
        m = m[:, None, None, :]                                               # [B, 1, 1, L]
        if causal:  # query i sees the keys j <= i that are not padding
            m = m * torch.ones(L, L, device=x.device).tril()                 # [B, 1, L, L]
        mask = (1.0 - m) * -10000.0  # xbert's own value for self-attention
        cross_mask = None            # transformers' invert_attention_mask for cross-attention
        if context is not None:
            cm = torch.ones(context.shape[:2]) if context_mask is None else context_mask.float()
            cm = cm[:, None, None, :].to(x.device)                            # [B, 1, 1, N]
            cross_mask = (1.0 - cm) * torch.finfo(torch.float32).min
        for layer in layers:
            x = layer(x, mask, context, cross_mask)
        return x

class LMHead(nn.Module):
    """cls.predictions: LN(gelu(dense(h))) @ word_embeddings^T + bias -> [B, L, V]. The decoder
    weight is tied to the word embeddings and its bias is `bias`: checkpoints hold both names."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.hidden_size
        self.transform = nn.ModuleDict(dict(dense=nn.Linear(D, D),
                                            LayerNorm=nn.LayerNorm(D, eps=1e-12)))
        self.decoder = nn.Linear(D, cfg.vocab_size)
        self.bias = self.decoder.bias

    def forward(self, h):
        return self.decoder(self.transform.LayerNorm(F.gelu(self.transform.dense(h))))

class BertLM(nn.Module):
    """BertModel + LM head: the stage-2 text encoder (BertForMaskedLM, keys text_encoder.bert.*,
    text_encoder.cls.*) and the QA answer decoder (BertLMHeadModel, text_decoder.*). Same module
    tree; they differ in the call: bidirectional for MLM, causal=True for answers."""

    def __init__(self, cfg):
        super().__init__()
        self.bert = BertModel(cfg)
        self.cls = nn.ModuleDict(dict(predictions=LMHead(cfg)))
        self.cls.apply(init_weights)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight  # tied

    def forward(self, *args, **kwargs):                                       # -> logits [B, L, V]
        return self.cls.predictions(self.bert(*args, **kwargs))

class BertTextEncoder(BertLM):
    """The paper's text side of the stage-2 UMT (BertForMaskedLM: keys bert.*, cls.*, as in the
    official checkpoints), behind the interface of video_language.TextEncoder, the CLIP one: [CLS]
    gives both the VTC feature (after the text-only layers, umt.py:encode_text) and the VTM token
    (after the fusion layers, criterions.py:vtm_loss); MLM uses BERT's own head. tokenizer:
    util/wordpiece.Tokenizer, or None for a model never given text (an official checkpoint read
    for its video features only)."""

    def __init__(self, cfg, tokenizer=None):
        if not 0 <= cfg.fusion_layer < cfg.num_hidden_layers:
            raise ValueError(f'fusion_layer={cfg.fusion_layer} must be below the '
                             f'{cfg.num_hidden_layers} layers')
        super().__init__(cfg)
        if tokenizer is not None and len(tokenizer.tokens) != cfg.vocab_size:
            raise ValueError(f'a vocabulary of {len(tokenizer.tokens)} tokens for a BERT of '
                             f'{cfg.vocab_size}')
        self.config, self.tokenizer, self.fusion_layer = cfg, tokenizer, cfg.fusion_layer
        self.width, self.max_len = cfg.hidden_size, cfg.max_position_embeddings

    def forward_text(self, ids, mask):                       # [B, L] -> [B, L, D], layers < fusion
        return self.bert(ids, mask, mode='text')

    def forward_fusion(self, x, mask, vision):               # [B, L, D], vision [B, N, Dv]
        return self.bert(None, mask, vision, mode='fusion', text_embeds=x)

    def text_feature(self, x, mask):                         # [B, L, D] -> [B, D]: [CLS]
        return x[:, 0]

    def match_token(self, fused, mask):
        return fused[:, 0]

    def new_mlm_head(self):                                  # BERT has its own: cls.predictions
        return None, None

    def mlm_logits(self, fused, head=None, bias=None):       # [..., D] -> [..., V]
        return self.cls.predictions(fused)

# --- checkpoints: configs from shapes, the official key mapping, Hugging Face BERT weights

def sub_state_dict(sd, prefix):
    """The entries under prefix, without it: (stage2_sd, 'text_encoder.') -> a BertLM's."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

def bert_config(sd, heads=None):
    """A BertModel state dict (embeddings.*, encoder.layer.*) -> its BertConfig, from the shapes.
    heads: D // 64 unless given (right for BERT-base and -large; the shapes cannot tell)."""
    V, D = sd['embeddings.word_embeddings.weight'].shape
    n = 1 + max(int(k.split('.')[2]) for k in sd if k.startswith('encoder.layer.'))
    fusion = min([int(k.split('.')[2]) for k in sd if '.crossattention.' in k], default=n)
    kv = sd.get(f'encoder.layer.{fusion}.crossattention.self.key.weight', torch.empty(D, D))
    return BertConfig(V, D, n, heads or max(D // 64, 1),
                      sd['encoder.layer.0.intermediate.dense.weight'].shape[0],
                      sd['embeddings.position_embeddings.weight'].shape[0],
                      sd['embeddings.token_type_embeddings.weight'].shape[0], fusion, kv.shape[1])

def stage2_to_finetune(sd, decoder):
    """An official stage-2 state dict -> the one a fine-tuning model loads (setup_model).
    Retrieval (decoder=False): text_encoder.bert.X -> text_encoder.X; text_encoder.cls.* stays,
    unused. QA (decoder=True): the same, and the answer decoder starts as the fusion part:
    embeddings -> text_decoder.bert.embeddings, layer i >= fusion_layer ->
    text_decoder.bert.encoder.layer.{i - fusion_layer}, text_encoder.cls -> text_decoder.cls.
    Every other key (vision, temp, projections) passes as it is."""
    fusion = bert_config(sub_state_dict(sd, 'text_encoder.bert.')).fusion_layer
    out = {}
    for key, v in sd.items():
        in_bert = key.startswith('text_encoder.bert.')
        if in_bert:
            out['text_encoder.' + key[len('text_encoder.bert.'):]] = v
        if decoder and key.startswith('text_encoder.'):
            parts = ('text_decoder.' + key[len('text_encoder.'):]).split('.')
            if parts[2:4] == ['encoder', 'layer']:          # text_decoder.bert.encoder.layer.i.*
                if int(parts[4]) < fusion:  # the text-only layers are not in the decoder
                    continue
                parts[4] = str(int(parts[4]) - fusion)
            out['.'.join(parts)] = v
        elif not in_bert:
            out[key] = v
    return out

def load_hf_bert(model, hf_sd):
    """Released Hugging Face bert-base-uncased / bert-large-uncased weights (keys bert.*, cls.*)
    -> model, a BertLM, in place, as the official builder's from_pretrained. Returns the new keys,
    left at their init: the fusion layers' cross-attention, which BERT never had. The pooler and the
    next-sentence head are unused; older files name the LayerNorm parameters gamma / beta."""
    own = model.state_dict()
    sd = {}
    for k, v in hf_sd.items():
        if not k.startswith(('bert.pooler.', 'cls.seq_relationship.')):  # BERT's, unused by UMT
            sd[k.replace('LayerNorm.gamma', 'LayerNorm.weight').replace('.beta', '.bias')] = v
    # the tied pair and the position buffer: some files leave them out
    sd.setdefault('cls.predictions.decoder.weight', sd['bert.embeddings.word_embeddings.weight'])
    sd.setdefault('cls.predictions.decoder.bias', sd['cls.predictions.bias'])
    sd.setdefault('bert.embeddings.position_ids', own['bert.embeddings.position_ids'])
    new = [k for k in own if k not in sd]
    wrong = [k for k in new if '.crossattention.' not in k] + [k for k in sd if k not in own]
    if wrong:
        raise ValueError(f'not the weights of a BERT of this shape: {wrong[:4]} ...')
    model.load_state_dict({**sd, **{k: own[k] for k in new}}, strict=True)
    return new


if __name__ == '__main__':  # a module, not a script: say what it holds
    print(__doc__.strip())
