"""
Video question answering on top of the stage-2 model: multiple choice (MSRVTT-MC) and open-ended QA
(MSRVTT-QA, MSVD-QA, ActivityNet-QA), the paper's multi-modal downstream tasks (section 4), with the
protocols of the official multi_modality/tasks/retrieval_mc.py, multi_modality/tasks/vqa.py and
multi_modality/models/umt_qa.py.

Multiple choice needs no new weights (`mc_scores`). Open-ended QA: the stage-2 text encoder reads
the question and all video tokens, a causal copy of its fusion blocks generates the answer, and at
test time `rank_answer` picks it from a closed answer list: UMTQA with the CLIP text side,
BertUMTQA with BERT (the official model; official QA checkpoints load into it). Both are trained
by tasks/finetune_qa.py; either text side comes in through the stage-2 model's interface.

    python -m tasks.video_qa mc --ckpt out/stage2/last.pt --ann msrvtt_mc_test.json --root videos/
    python -m tasks.video_qa qa --ckpt msrvtt_qa.pth --ann msrvtt_qa_test.json \\
        --answer_list msrvtt_qa_answer_list.json --root videos/     # a QA model, ours or official
    torchrun --standalone --nproc_per_node=8 -m tasks.video_qa mc ...  # each GPU takes a share
    python -m tasks.video_qa demo demo_data   # demo QA and MC files from its captions_*.json
An official checkpoint carries no vocabulary: --vocab (default bert-base-uncased's vocab.txt,
fetched once; pass a local copy offline).

Shapes: as video_language.py (B, N, D, L, Dt), plus Lq question length, La answer length, A answers
(per question, or in the answer list), O options, k candidates re-scored, V vocabulary.
"""

import argparse
import dataclasses
import json
import os
import re
from collections import Counter, defaultdict, namedtuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import training
from model import VideoViT, VideoViTConfig, load_strict
from util import checkpoints
from util.bert import (VOCAB, BertConfig, BertLM, BertModel, BertTextEncoder, bert_config,
                       decoder_config, stage2_to_finetune, sub_state_dict)
from util.configurator import fail, reported, short_errors, user_input
from util.evaluation import (BATCH, K_TEST, MAX_TEXT_LEN, WORKERS, finish, gather_rows, new_output,
                             run_videos)
from util.wordpiece import Tokenizer
from video_language import TextBlock, TextEncoder, text_mask

MC_ITM_WEIGHT = 0.7  # score = 0.7 VTM probability + 0.3 VTC softmax (official retrieval_mc.py)
MC_FRAMES = 12       # frames per video, middle of 12 segments (official MSRVTT-MC: 12)
QA_FRAMES = 12       # the same for open-ended QA (official num_frames_test: 12)
DEMO_MARKER = '.umt_demo'  # the demo set's marker (demo.py): its QA files go beside its captions
read_text = reported(data.read_text)  # a file it cannot read: one message
load_json = reported(data.load_json)

# ----------------------------------------------------------------------------------------------
# Multiple choice: zero-shot scoring with the stage-2 heads

def mc_combine(itm_logits, sim, temp, itm_weight=MC_ITM_WEIGHT):
    """itm_logits [B, O, 2] (no-match, match), sim [B, O] mean over frames of the per-frame cosine
    -> scores [B, O] = w softmax(itm)[match] + (1 - w) softmax over the O options of sim / temp
    (temp: the model's, not clamped)."""
    vtm = itm_logits.float().softmax(-1)[..., 1]
    return itm_weight * vtm + (1 - itm_weight) * (sim.float() / temp).softmax(-1)

def mc_scores(net, video, ids, mask):
    """A stage-2 UMT, video [B, 3, T, H, W], options ids / mask [B, O, L] -> scores [B, O]. No mask:
    all T*h*w video tokens go to the fusion blocks (the official eval_frame_ensemble='concat')."""
    B, O, L = ids.shape
    x_vis, _, v = net.encode_video(video, per_frame=True)                  # [B, N, D], [B, t, E]
    hidden, t = net.encode_text(ids.flatten(0, 1), mask.flatten(0, 1))      # [B*O, L, Dt], [B*O, E]
    t = F.normalize(t.float(), dim=-1).view(B, O, -1)                       # [B, O, E]
    sim = torch.einsum('bfe,boe->bof', F.normalize(v.float(), dim=-1), t).mean(-1)  # [B, O]
    # [B*O, 2]: each option with its question's video
    itm = net.itm_logits(hidden, mask.flatten(0, 1), x_vis.repeat_interleave(O, 0))
    return mc_combine(itm.view(B, O, 2), sim, net.temp)

def evaluate_mc(net, dataset, device, batch=BATCH, workers=WORKERS):
    """Multiple-choice accuracy (%) of a stage-2 model on a VideoQuestions set of MCItems: the
    best-scored option against the answer; a question whose video cannot be read counts as wrong.
    Every rank must call it; each scores its share of the questions."""
    net.eval()

    def score(video, b):
        scores = mc_scores(net, video, b['ids'].to(device), b['mask'].to(device))
        return scores.float(), b['bad'].long().to(device)
    (scores, bad), index = run_videos(dataset, score, device, batch, workers, 'questions',
                                      training.autocast(device))
    scores, bad = (gather_rows(x, index, len(dataset)) for x in (scores, bad))   # [Q, O], [Q]
    answers = torch.tensor([it.answer for it in dataset.items])
    correct = (scores.argmax(1).cpu() == answers) & (bad.cpu() == 0)
    return {'accuracy': 100.0 * correct.double().mean().item(), 'num_questions': len(dataset),
            'chance': 100.0 / scores.shape[1], 'unreadable_videos': int(bad.sum())}

# ----------------------------------------------------------------------------------------------
# Open-ended QA: loss and answer ranking, the two models

def answer_nll(logits, ids, mask):
    """logits [N, La, V], ids / mask [N, La] -> [N]: the answer's summed token NLL,
    -sum_{i>=1} log p(a_i | a_<i, q) over its real tokens after the first ([sot] / [CLS]), the eos
    included (the official loss sums, it does not average, over tokens)."""
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)                                # [N, La-1]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction='none')
    return nll.view(len(ids), -1).sum(1)

@torch.no_grad()
def rank_answer(decode, question, question_mask, answer_ids, answer_mask, k, double_first=False,
                chunk=256):
    """The official rank_answer: question states [B, Lq, Dt] + mask, the tokenized answer list
    [A, La] -> [B] indices into the list. 1. p(first token | question) for every entry; keep the
    k best. 2. Re-score those k by their whole log-likelihood, log p(a | q) = -answer_nll. The
    official score adds the first token's log-probability once more (ALBEF's formula counts it
    twice); double_first=True reproduces that, the default scores the likelihood itself.
    decode(ids, mask, question, question_mask) -> logits [n, La, V]: the answer decoder."""
    B, k = len(question), min(k, len(answer_ids))
    start = answer_ids[:1, :1].expand(B, 1)                              # [B, 1]: [sot] / [CLS]
    first = decode(start, torch.ones_like(start, dtype=torch.bool), question, question_mask)[:, 0]
    first = first.float().log_softmax(-1)[:, answer_ids[:, 1]]           # [B, A] log p(a_1 | q)
    top_lp, top = first.topk(k, dim=1)                                   # [B, k]
    # [B*k]: which answer, for which question
    rows, owner = top.flatten(), torch.arange(B, device=top.device).repeat_interleave(k)
    nll = torch.cat([answer_nll(decode(answer_ids[r], answer_mask[r], question[q],
                                       question_mask[q]), answer_ids[r], answer_mask[r])
                     for r, q in zip(rows.split(chunk), owner.split(chunk))]).view(B, k)  # [B, k]
    score = -nll + top_lp if double_first else -nll
    return top.gather(1, score.argmax(1, keepdim=True))[:, 0]

class QAModel(nn.Module):
    """What both QA models share: the official loss and answer ranking, given encode_question(video,
    ids, mask) -> question states [B, Lq, Dt] and decode(...) -> the answer decoder's logits."""

    def forward(self, video, ids, mask, answer_ids, answer_mask, weights):
        """answer ids / mask [B, A, La], weights [B, A] (0 = no answer) -> the official loss,
        sum(weight x NLL) / B."""
        B, A, La = answer_ids.shape
        q = self.encode_question(video, ids, mask).repeat_interleave(A, 0)     # [B*A, Lq, Dt]
        a_ids, a_mask = answer_ids.flatten(0, 1), answer_mask.flatten(0, 1)      # [B*A, La]
        logits = self.decode(a_ids, a_mask, q, mask.repeat_interleave(A, 0))  # [B*A, La, V]
        return (weights.flatten() * answer_nll(logits, a_ids, a_mask)).sum() / B

    def answer(self, video, ids, mask, answer_ids, answer_mask, k, double_first=False):
        """-> [B] indices into the answer list (rank_answer)."""
        return rank_answer(self.decode, self.encode_question(video, ids, mask), mask, answer_ids,
                           answer_mask, k, double_first)

class AnswerDecoder(nn.Module):
    """BERT's answer decoder of the official QA model on our CLIP text blocks: a causal copy of the
    stage-2 fusion blocks whose cross-attention reads the question states [B, Lq, Dt] (not video
    tokens), then an LM head shaped as the MLM head (dense, GELU, LN) with its output matrix tied to
    this decoder's own token embedding."""

    def __init__(self, vocab_size, context_length, width, heads, layers, mlp_ratio, quick_gelu):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.blocks = nn.ModuleList([TextBlock(width, heads, mlp_ratio, quick_gelu,
                                               vision_dim=width) for _ in range(layers)])
        self.ln_final = nn.LayerNorm(width)
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        for m in self.modules():  # as TextEncoder; from_stage2 then copies whatever fits
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, ids, mask, question, question_mask):
        """ids, mask [B, La] ([sot] a1 .. [eot] pad), question [B, Lq, Dt], question_mask [B, Lq] ->
        logits [B, La, V]; position i predicts token i + 1 and sees tokens 0..i only."""
        x = self.token_embedding(ids) + self.positional_embedding[:ids.shape[1]]  # [B, La, Dt]
        # [B, 1, La, La], [B, 1, 1, Lq]
        causal, cross = text_mask(mask, causal=True), text_mask(question_mask)
        for blk in self.blocks:
            x = blk(x, causal, question, cross)
        return self.head(self.ln_final(x)) @ self.token_embedding.weight.t() + self.bias

class UMTQA(QAModel):
    """Open-ended QA with the CLIP text side: the stage-2 video encoder and text encoder (question
    encoder: text-only blocks, then fusion blocks over all video tokens, no mask, no teacher) and
    the AnswerDecoder. Build with from_stage2."""

    def __init__(self, vision_config, text_config):
        super().__init__()
        self.vision_config = dict(vision_config, align_layers=0)  # no UTA in fine-tuning: no heads
        self.text_config = dict(text_config)
        tower = {k: v for k, v in text_config.items() if k != 'embed_dim'}
        self.vision_encoder = VideoViT(VideoViTConfig(**self.vision_config))
        self.text_encoder = TextEncoder(**tower, vision_dim=self.vision_encoder.config.embed_dim)
        del self.text_encoder.ln_text  # VTC's norm, unused here (DDP wants all parameters used)
        layers = tower['layers'] - tower['fusion_layer']  # official: 3 for BERT-base, 5 for -large
        if layers < 1:
            raise ValueError(f"fusion_layer={tower['fusion_layer']} leaves no fusion block to copy "
                             'into the decoder')
        self.decoder = AnswerDecoder(tower['vocab_size'], tower['context_length'],
                                     tower['width'], tower['heads'], layers, tower['mlp_ratio'],
                                     tower['quick_gelu'])

    @property
    def tokenizer(self):
        return self.text_encoder.tokenizer

    def encode_question(self, video, ids, mask):
        """video [B, 3, T, H, W], question ids / mask [B, Lq] -> question states [B, Lq, Dt]."""
        x_vis, _ = self.vision_encoder(video)                                   # [B, N, D]: all
        text = self.text_encoder
        return text.forward_fusion(text.forward_text(ids, mask), mask, x_vis)

    def decode(self, ids, mask, question, question_mask):
        return self.decoder(ids, mask, question, question_mask)

class BertUMTQA(QAModel):
    """Open-ended QA with BERT, the official UMT_QA (umt_qa.py): the question encoder text_encoder
    (a BertModel, all layers; the fusion ones read every video token) and the answer decoder
    text_decoder (a causal BertLMHeadModel of the fusion layers' depth, reading the question) under
    the official key names, which official QA checkpoints load into (load_qa)."""

    def __init__(self, vision_config, text_config):
        super().__init__()
        self.vision_config = dict(vision_config, align_layers=0)
        self.text_config = dict(text_config)
        self.vision_encoder = VideoViT(VideoViTConfig(**self.vision_config))
        D = self.vision_encoder.config.embed_dim
        cfg = BertConfig(**{**text_config['bert'], 'encoder_width': D})
        self.text_encoder, self.text_decoder = BertModel(cfg), BertLM(decoder_config(cfg))
        vocab = text_config.get('vocab')
        self.tokenizer = Tokenizer(vocab) if vocab else None

    def encode_question(self, video, ids, mask):
        x_vis, _ = self.vision_encoder(video)                                   # [B, N, D]: all
        return self.text_encoder(ids, mask, x_vis)                              # [B, Lq, Dt]

    def decode(self, ids, mask, question, question_mask):
        return self.text_decoder(ids, mask, question, question_mask, causal=True)

def qa_source(key, fusion_layer):
    """A UMTQA weight name -> the stage-2 UMT weight it starts from. Decoder block j <- fusion
    block fusion_layer + j; the decoder's embeddings and ln_final <- the text encoder's; its LM head
    <- the MLM head."""
    if key.startswith(('vision_encoder.', 'text_encoder.')):
        return key
    if key.startswith('decoder.blocks.'):
        j, rest = key.removeprefix('decoder.blocks.').split('.', 1)
        return f'text_encoder.blocks.{fusion_layer + int(j)}.{rest}'
    if key.startswith('decoder.head.'):
        return 'mlm_head.' + key.removeprefix('decoder.head.')
    return 'mlm_bias' if key == 'decoder.bias' else 'text_encoder.' + key.removeprefix('decoder.')

def from_stage2(umt, name='the stage-2 model'):
    """A stage-2 UMT (checkpoints.load_stage2) -> (its QA model, report lines); everything that
    fits is copied. CLIP: UMTQA by qa_source; new: the decoder's cross-attention key/value
    projection, which reads the question (width Dt) where the fusion block's read the video (width
    D). BERT: BertUMTQA by the official mapping (bert.stage2_to_finetune: the decoder's layers are
    the fusion layers, its LM head the MLM head); its key/value are copied too when the two widths
    are equal, as in every official model."""
    bert = isinstance(umt.text_encoder, BertTextEncoder)
    qa = (BertUMTQA if bert else UMTQA)(dataclasses.asdict(umt.vision_encoder.config),
                                         umt.text_config)
    sd, own, fusion = umt.state_dict(), qa.state_dict(), umt.text_encoder.fusion_layer
    if bert:
        mapped = stage2_to_finetune(sd, decoder=True)
        source = {k: (k, mapped[k]) for k in own if k in mapped}
    else:
        source = {k: (qa_source(k, fusion), sd.get(qa_source(k, fusion))) for k in own}
    feed = {k: v for k, (_, v) in source.items() if v is not None and v.shape == own[k].shape}
    lone_bias = lambda k: k.endswith('.bias') and k[:-4] + 'weight' in own and \
        k[:-4] + 'weight' not in feed
    feed = {k: v for k, v in feed.items() if not lone_bias(k)}  # kv_proj.bias fits, its weight not
    used = {source[k][0] for k in feed}
    load_strict(qa, {**own, **feed})
    unused = [k for k in (mapped if bert else sd) if k not in used]
    encoders = [k for k in unused if k.startswith(('vision_encoder.', 'text_encoder.'))]
    depth = len(qa.text_decoder.bert.encoder.layer) if bert else len(qa.decoder.blocks)
    group = checkpoints.group
    return qa, [f'QA model from {name}: {len(feed)} of {len(own)} tensors; the answer decoder is a '
                f'causal copy of text blocks {list(range(fusion, fusion + depth))} (the fusion '
                'blocks), its LM head the MLM head',
                f'new: {group([k for k in own if k not in feed], parts=6 if bert else 5)}',
                f'unused: {group(encoders, parts=2)}, '
                f'{group([k for k in unused if k not in encoders], parts=1)}']

def load_qa(source, name=None, vocab=None, **overrides):
    """A QA checkpoint -> (QA model, report lines): ours (tasks.finetune_qa, CLIP or BERT), or an
    official QA .pth (umt_qa.py: vision_encoder.encoder.*, text_encoder.*, text_decoder.*) as a
    BertUMTQA. vocab: an official file's vocabulary, as checkpoints.load_stage2's. overrides:
    VideoViTConfig fields (num_frames, img_size, ...)."""
    w = checkpoints.read(source, name)
    if w.kind != 'qa':
        fail(f'{w.name} holds a {w.kind}, not a video QA model (tasks.finetune_qa, or an official '
             'UMT QA .pth)')
    if w.ours is not None:
        text_config = w.ours['text_config']
        model = BertUMTQA if text_config.get('text_encoder') == 'bert' else UMTQA
        with user_input(f'{w.name}: '):
            qa = model(dict(w.ours['model_config'], **overrides), text_config)
            load_strict(qa, w.sd)
        return qa, [f'loaded {w.name}: all {len(w.sd)} tensors of a QA model']
    vision, rest = checkpoints.official_vision(w.sd)
    config = checkpoints.official_config(vision, overrides)
    bert = bert_config(sub_state_dict(w.sd, 'text_encoder.'))  # heads: width / 64, as B and L
    with user_input(f'--vocab {vocab}: '):
        tokenizer = Tokenizer(training.resolve(vocab, '--vocab')) if vocab else None
    text_config = dict(text_encoder='bert', bert=dataclasses.asdict(bert),
                       vocab=tokenizer.tokens if tokenizer else None)
    sd = {**{'vision_encoder.' + k: v for k, v in vision.items()},
          **{k: w.sd[k] for k in rest if k.startswith(('text_encoder.', 'text_decoder.'))}}
    with user_input(f'{w.name}: '):
        qa = BertUMTQA(dataclasses.asdict(config), text_config)
        load_strict(qa, sd)
    return qa, [f'loaded {w.name}: {len(sd)} tensors (official QA model: video encoder depth '
                f'{config.depth}, width {config.embed_dim}; BERT, {bert.num_hidden_layers} layers, '
                f'fusion from layer {bert.fusion_layer})',
                f'unused: {checkpoints.group([k for k in rest if k not in sd])}']

# ----------------------------------------------------------------------------------------------
# Data: the official annotation files (dataset/qa_dataset.py, dataset/caption_dataset.py)

QAItem = namedtuple('QAItem', 'path question answers weights qid')
MCItem = namedtuple('MCItem', 'path options answer')

def read_qa(ann_file, root=None):
    """Official QA JSON list of {"video", "question", "answer": str or [str], "question_id" (val /
    test)} -> ([QAItem], positions skipped). Questions are cleaned by data.pre_text, answers never.
    A list's unique answers weigh count / len (official). An entry without a video, a question or a
    non-empty answer is skipped and counted."""
    items, skipped = [], []
    for i, o in enumerate(load_json(ann_file, 'QA file')):
        answers = o.get('answer') if isinstance(o.get('answer'), list) else [o.get('answer')]
        answers = [a for a in answers if isinstance(a, str) and a.strip()]
        if not (isinstance(o.get('video'), str) and isinstance(o.get('question'), str) and answers):
            skipped.append(i)
            continue
        counts = Counter(answers)
        items.append(QAItem(os.path.join(root or '', o['video']), data.pre_text(o['question']),
                            list(counts), [c / len(answers) for c in counts.values()],
                            o.get('question_id', i)))
    if not items:
        fail(f'{ann_file}: none of its {len(skipped)} entries has a video, a question and an '
             'answer')
    return items, skipped

def read_answer_list(path):
    """JSON list of answer strings -> the list, as it is (answers are never cleaned)."""
    try:
        answers = json.loads(read_text(path, 'answer list'))
    except json.JSONDecodeError as e:
        fail(f'answer list {path} is not JSON ({e})')
    if not isinstance(answers, list) or not answers:
        fail(f'answer list {path} must be a non-empty JSON list of answer strings')
    return answers

def tokenize_answers(answers, tokenizer, max_len, path='the answer list'):
    """Answers -> (ids [A, La], mask [A, La], entries cut to max_len tokens), each with the text
    side's eos (BERT: ' [SEP]'). An entry that gives no token (not a string, empty, blank) could
    never be generated: the error names it."""
    texts = [(a if isinstance(a, str) else '') + tokenizer.answer_eos for a in answers]
    ids, mask = tokenizer(texts, max_len)                                       # [A, La]
    bad = [(i, answers[i]) for i in (mask.sum(1) < 3).nonzero()[:, 0].tolist()]  # start, eos only
    if bad:
        fail(f'{path}: {len(bad)} answer-list entries give no token, e.g. ' +
             ', '.join(f'#{i} {a!r}' for i, a in bad[:5]))
    cut = int((tokenizer(texts, max_len + 1)[1].sum(1) > max_len).sum())
    return ids, mask, cut

def read_mc(ann_file, root=None):
    """Official MSRVTT-MC list of {"video", "caption": [options], "answer": index} -> [MCItem],
    options cleaned by data.pre_text. Every question needs the same number of options (5 in
    MSRVTT-MC) and an answer among them."""
    items = []
    for i, o in enumerate(load_json(ann_file, 'MC file')):
        options, answer = o.get('caption'), o.get('answer')
        if not (isinstance(options, list) and len(options) >= 2 and type(answer) is int
                and 0 <= answer < len(options) and isinstance(o.get('video'), str)
                and all(isinstance(c, str) and data.pre_text(c) for c in options)):
            fail(f'{ann_file}: entry #{i} is not {{"video": path, "caption": [2 or more non-empty '
                 f'options], "answer": index of the right one}}: {json.dumps(o)[:80]}')
        items.append(MCItem(os.path.join(root or '', o['video']),
                            [data.pre_text(c) for c in options], answer))
    if len({len(it.options) for it in items}) > 1:
        fail(f'{ann_file}: the questions have different numbers of options')
    return items

class VideoQuestions(data.RobustDataset):
    """QAItems or MCItems with their uint8 clips (data.normalize makes them model inputs). 'train':
    the official 'rand' frames, random-resized crop + flip, an unreadable video replaced by another
    and counted (data.py); 'eval': middle frames, the whole frame resized (the official test
    transform), an unreadable one flagged 'bad' (wrong). Text comes tokenized by the model's
    tokenizer: question (or options) ids / mask [Lq] (or [O, L]); for training also the answers with
    their eos, padded to the most any question has: answer_ids / answer_mask [A, La] and weights
    [A] (0 = padding)."""

    def __init__(self, items, num_frames, size, mode, tokenizer, text_len, answer_len=5,
                 max_bad_fraction=0.05, threads=1):
        assert mode in ('train', 'eval')
        self.items, self.num_frames, self.size, self.mode = items, num_frames, size, mode
        self.tokenizer, self.text_len, self.answer_len, self.threads = tokenizer, text_len, \
            answer_len, threads
        self.max_answers = max((len(it.answers) for it in items if isinstance(it, QAItem)),
                               default=0)
        super().__init__([it.path for it in items], max_bad_fraction)

    def load(self, i, rng):
        item, T, S, train = self.items[i], self.num_frames, self.size, self.mode == 'train'
        sampling, crop = ('rand', 'rrc') if train else ('middle', 'squash')
        try:
            frames = data.read_frames(item.path, lambda n: data.sample_indices(n, T, sampling, rng),
                                      self.threads)
            video, bad = data.augment(frames, S, crop, rng, flip=train)[0], False
        except data.BAD_ERRORS:
            if train:
                raise
            video, bad = torch.zeros(3, T, S, S, dtype=torch.uint8), True
        if isinstance(item, MCItem):
            ids, mask = self.tokenizer(item.options, self.text_len)                    # [O, L]
            return {'video': video, 'bad': bad, 'ids': ids, 'mask': mask, 'answer': item.answer}
        ids, mask = (x[0] for x in self.tokenizer([item.question], self.text_len))     # [Lq]
        out = {'video': video, 'bad': bad, 'ids': ids, 'mask': mask}
        if train:
            eos, pad = self.tokenizer.answer_eos, self.max_answers - len(item.answers)
            answers = [a + eos for a in item.answers] + [''] * pad
            # [A, La] each
            out['answer_ids'], out['answer_mask'] = self.tokenizer(answers, self.answer_len)
            out['weights'] = torch.tensor(item.weights + [0.0] * pad)                    # [A]
        return out

def evaluate_qa(model, dataset, answers, answer_ids, answer_mask, device, ctx, k=K_TEST,
                double_first=False, batch=BATCH, workers=WORKERS, skipped=0, desc='questions'):
    """Exact-match accuracy (%) of a QA model on an 'eval' VideoQuestions set, every rank scoring
    its share, in all and per question type (its first word: what, who, how, ...). A question whose
    video cannot be read counts as wrong (the official metric counts a missing prediction as
    wrong); skipped: entries without a video, question or answer, only counted. -> (results,
    predictions)."""
    was_training = model.training
    model.eval()

    def answer(video, b):
        pred = model.answer(video, b['ids'].to(device), b['mask'].to(device), answer_ids,
                            answer_mask, k, double_first)
        return pred, b['bad'].long().to(device)
    (pred, bad), index = run_videos(dataset, answer, device, batch, workers, desc, ctx)
    pred, bad = (gather_rows(x, index.to(device), len(dataset)).tolist() for x in (pred, bad))
    model.train(was_training)
    correct = [not b and answers[p] in it.answers for p, b, it in zip(pred, bad, dataset.items)]
    by_type = defaultdict(list)
    for c, it in zip(correct, dataset.items):
        by_type[it.question.split()[0] if it.question.split() else '?'].append(c)
    percent = lambda cs: round(100 * sum(cs) / len(cs), 2)
    result = {'accuracy': percent(correct), 'questions': len(dataset),
              'by_type': {t: percent(cs) for t, cs in sorted(by_type.items())},
              'skipped_entries': skipped, 'unreadable_videos': sum(bad),
              'answer_in_list': sum(any(a in answers for a in it.answers) for it in dataset.items)}
    return result, [{'question_id': it.qid, 'pred': answers[p], 'answer': it.answers[0]}
                    for p, it in zip(pred, dataset.items)]

def prior_baselines(train_items, test_items):
    """Test accuracy (%) without looking at the video: the most frequent training answer for every
    question, and the most frequent training answer of the same question text (else that overall
    answer)."""
    overall, per_question = Counter(), {}
    for it in train_items:
        for a, w in zip(it.answers, it.weights):
            overall[a] += w
            per_question.setdefault(it.question, Counter())[a] += w
    top = overall.most_common(1)[0][0]
    guess = [per_question[it.question].most_common(1)[0][0] if it.question in per_question else top
             for it in test_items]
    share = lambda hits: round(100 * float(np.mean(hits)), 2)  # a percentage with two decimals
    return {'majority_answer': top, 'majority': share([top in it.answers for it in test_items]),
            'question_prior': share([g in it.answers for g, it in zip(guess, test_items)])}

# ----------------------------------------------------------------------------------------------
# The CPU demo: questions about the synthetic clips, and multiple choice among their captions

DEMO_QUESTIONS = {'color': 'What color is the object?', 'shape': 'What shape is the object?',
                  'direction': 'Which way does the object move?'}
DEMO_MC_DRAWS = 5  # MC questions per test video, each with its own 4 distractors and answer spot

def demo_attributes(record):
    """A demo caption record -> {'color', 'shape', 'direction'}: its own fields, else parsed from
    the caption template 'a {color} {shape} moving {direction}'; None if neither fits."""
    caption = record['caption'] if isinstance(record['caption'], str) else record['caption'][0]
    m = re.fullmatch(r'an? (.+) (\S+) moving (\S+)', caption.strip().lower())
    parsed = dict(zip(DEMO_QUESTIONS, m.groups())) if m else {}
    attrs = {k: record.get(k, parsed.get(k)) for k in DEMO_QUESTIONS}
    return attrs if all(attrs.values()) else None

def make_demo_qa(root, out_dir=None, seed=0):
    """root/captions_{train,val}.json -> qa_train.json, qa_test.json, qa_answer_list.json (the
    training answers) and mc_test.json (each val video DEMO_MC_DRAWS times: its caption and 4
    others, shuffled) in out_dir (root). An attribute with a single value in the training
    captions (the demo's shape) is not asked about. out_dir must be the demo set, or a new or empty
    folder."""
    out_dir, rng = out_dir or root, np.random.default_rng(seed)
    # (record, attributes) of the captions that fit the template
    splits = {s: [(r, a) for r in load_json(f'{root}/captions_{s}.json', 'demo captions')
                  if (a := demo_attributes(r))] for s in ('train', 'val')}
    training.claim_folder(out_dir, DEMO_MARKER, 'the demo')
    asked = {k: q for k, q in DEMO_QUESTIONS.items()              # not an attribute of one value
             if len({a[k] for _, a in splits['train']}) > 1}
    for name, split in (('train', 'train'), ('test', 'val')):
        qa = [{'video': r['video'], 'question': q, 'answer': a[key]} for r, a in splits[split]
              for key, q in asked.items()]
        if name == 'test':
            qa = [dict(x, question_id=i) for i, x in enumerate(qa)]
        json.dump(qa, open(f'{out_dir}/qa_{name}.json', 'w'), indent=1)
    answer_list = sorted({a[k] for _, a in splits['train'] for k in asked})
    json.dump(answer_list, open(f'{out_dir}/qa_answer_list.json', 'w'))
    caption = lambda a: f"a {a['color']} {a['shape']} moving {a['direction']}"
    captions = sorted({caption(a) for rs in splits.values() for _, a in rs})
    mc = []
    for r, a in splits['val']:
        others = [c for c in captions if c != caption(a)]
        for _ in range(DEMO_MC_DRAWS):
            options = [caption(a)] + list(rng.choice(others, 4, replace=False))
            order = rng.permutation(5)
            mc.append({'video': r['video'], 'caption': [options[j] for j in order],
                       'answer': int(np.argmin(order))})
    json.dump(mc, open(f'{out_dir}/mc_test.json', 'w'), indent=1)
    print(f'wrote {out_dir}/: qa_train.json ({len(splits["train"]) * len(asked)} questions), '
          f'qa_test.json ({len(splits["val"]) * len(asked)}), qa_answer_list.json, mc_test.json '
          f'({len(mc)} questions, 5 options)')

# ----------------------------------------------------------------------------------------------
# Command line: the demo files, and the two evaluations

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    d = sub.add_parser('demo', help='the demo QA and MC files, written into a demo set')
    d.add_argument('folder', help='the demo set (python demo.py set FOLDER)')
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--ckpt', required=True, help='our checkpoint or an official one')
    common.add_argument('--ann', required=True, help='the official JSON annotation file')
    common.add_argument('--root', default=None, help='folder the video paths start from')
    common.add_argument('--frames', type=int, default=None, help='frames per video (default 12)')
    common.add_argument('--size', type=int, default=None, help='resolution (default: the model)')
    common.add_argument('--batch', type=int, default=BATCH)
    common.add_argument('--workers', type=int, default=WORKERS)
    common.add_argument('--device', default='auto', help="'auto' (a GPU if there is one) or 'cpu'")
    common.add_argument('--vocab', default=None, help="an official checkpoint's WordPiece "
                        f'vocab.txt (default: {VOCAB})')
    common.add_argument('--out', default=None, help='write the results here (JSON, a new file)')
    m = sub.add_parser('mc', parents=[common], help='multiple-choice video QA of a stage-2 model')
    m.add_argument('--max_len', type=int, default=MAX_TEXT_LEN, help='option tokens')
    q = sub.add_parser('qa', parents=[common], help='open-ended video QA of a QA model')
    q.add_argument('--answer_list', required=True, help='JSON list of the candidate answers')
    q.add_argument('--k_test', type=int, default=K_TEST, help='answers re-scored per question')
    q.add_argument('--question_len', type=int, default=25, help='question tokens (official: 25)')
    q.add_argument('--answer_len', type=int, default=5, help='answer tokens, eos included (5)')
    q.add_argument('--double_first_token', action='store_true',
                   help="the official score, which counts the first token's log-probability twice")
    return p.parse_args(argv)

def main(argv=None):
    short_errors()
    args = parse_args(argv)
    if args.command == 'demo':
        return make_demo_qa(args.folder)
    numbers = {k: getattr(args, k, 1) for k in ('frames', 'size', 'batch', 'max_len', 'k_test',
                                                 'question_len', 'answer_len')}
    for name, value in numbers.items():
        if value is not None and value < 1:
            fail(f'--{name} {value}: pass a positive number')
    if args.workers < 0:
        fail('--workers must be 0 or more')
    if args.out:
        new_output(args.out)
    # The files first, before any model: a typo costs seconds
    if args.command == 'mc':
        items = read_mc(args.ann, args.root)
    else:
        (items, skipped), answers = read_qa(args.ann, args.root), read_answer_list(args.answer_list)
    _, _, device = training.init_distributed(args.device)
    ctx = training.autocast(device)
    overrides = {k: v for k, v in (('num_frames', args.frames), ('img_size', args.size)) if v}
    vocab = args.vocab or VOCAB  # read only for an official checkpoint
    ckpt = checkpoints.read(training.resolve(args.ckpt, '--ckpt'), args.ckpt)  # hf://: fetched
    if args.command == 'mc':
        net, report = checkpoints.load_stage2(ckpt, vocab=vocab, **overrides)
        print('\n'.join(report))
        dataset = VideoQuestions(items, args.frames or MC_FRAMES,
                                 args.size or net.vision_encoder.config.img_size, 'eval',
                                 net.tokenizer, args.max_len)
        return finish(evaluate_mc(net.to(device), dataset, device, args.batch, args.workers),
                      args.out)
    model, report = load_qa(ckpt, vocab=vocab, **overrides)
    print('\n'.join(report))
    ids, mask, cut = tokenize_answers(answers, model.tokenizer, args.answer_len, args.answer_list)
    dataset = VideoQuestions(items, args.frames or QA_FRAMES,
                             args.size or model.vision_encoder.config.img_size, 'eval',
                             model.tokenizer, args.question_len, args.answer_len)
    results, _ = evaluate_qa(model.to(device), dataset, answers, ids.to(device), mask.to(device),
                             device, ctx, args.k_test, args.double_first_token, args.batch,
                             args.workers, len(skipped))
    return finish(dict(results, answers_cut=cut), args.out)

if __name__ == '__main__':
    main()
