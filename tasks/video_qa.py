"""
Video question answering on top of the stage-2 model: multiple choice (MSRVTT-MC) and open-ended QA (MSRVTT-QA,
MSVD-QA, ActivityNet-QA), the paper's multi-modal downstream tasks (section 4), with the protocols of the official
multi_modality/tasks/retrieval_mc.py, multi_modality/tasks/vqa.py and multi_modality/models/umt_qa.py.

Multiple choice needs no new weights (`mc_scores`; `python evaluate.py mc`). Open-ended QA (`UMTQA`,
tasks/finetune_qa.py): the stage-2 text encoder reads the question and all video tokens, a causal copy of its fusion
blocks generates the answer (BERT officially, the CLIP text tower here); at test time `rank_answer` picks it from a
closed answer list.

    python -m tasks.video_qa demo_data   # demo QA and MC files from demo_data/captions_{train,val}.json

Shapes: as video_language.py (B, N, D, L, Dt), plus Lq question length, La answer length, A answers (per question,
or in the answer list), O options, k candidates re-scored, V vocabulary.
"""

import argparse
import dataclasses
import json
import os
import re
from collections import Counter, namedtuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import training
from demo import MARKER
from model import VideoViT, VideoViTConfig, load_strict
from training import fail
from util.checkpoints import group
from video_language import TextBlock, TextEncoder, text_mask, tokenize

MC_ITM_WEIGHT = 0.7  # score = 0.7 VTM probability + 0.3 VTC softmax over the options (official retrieval_mc.py)

# ----------------------------------------------------------------------------------------------
# Multiple choice: zero-shot scoring with the stage-2 heads

def mc_combine(itm_logits, sim, temp, itm_weight=MC_ITM_WEIGHT):
    """itm_logits [B, O, 2] (no-match, match), sim [B, O] mean over frames of the per-frame cosine -> scores [B, O]
    = w softmax(itm)[match] + (1 - w) softmax over the O options of sim / temp (temp: the model's, not clamped)."""
    return itm_weight * itm_logits.float().softmax(-1)[..., 1] + (1 - itm_weight) * (sim.float() / temp).softmax(-1)

def mc_scores(net, video, ids, mask):
    """A stage-2 UMT, video [B, 3, T, H, W], options ids / mask [B, O, L] -> scores [B, O]. No mask: all T*h*w
    video tokens go to the fusion blocks (the official eval_frame_ensemble='concat')."""
    B, O, L = ids.shape
    x_vis, _, v = net.encode_video(video, per_frame=True)                   # [B, N, D], [B, t, E]
    hidden, t = net.encode_text(ids.flatten(0, 1), mask.flatten(0, 1))       # [B*O, L, Dt], [B*O, E]
    t = F.normalize(t.float(), dim=-1).view(B, O, -1)                        # [B, O, E]
    sim = torch.einsum('bfe,boe->bof', F.normalize(v.float(), dim=-1), t).mean(-1)  # [B, O]
    itm = net.itm_logits(hidden, mask.flatten(0, 1), x_vis.repeat_interleave(O, 0))  # [B*O, 2], each option's video
    return mc_combine(itm.view(B, O, 2), sim, net.temp)

# ----------------------------------------------------------------------------------------------
# Open-ended QA: question encoder, answer decoder, loss and answer ranking

class AnswerDecoder(nn.Module):
    """BERT's answer decoder of the official QA model on our text blocks: a causal copy of the stage-2 fusion blocks
    whose cross-attention reads the question states [B, Lq, Dt] (not video tokens), then an LM head shaped as the
    MLM head (dense, GELU, LN) with its output matrix tied to this decoder's own token embedding."""

    def __init__(self, vocab_size, context_length, width, heads, layers, mlp_ratio, quick_gelu):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.blocks = nn.ModuleList([TextBlock(width, heads, mlp_ratio, quick_gelu, vision_dim=width)
                                     for _ in range(layers)])
        self.ln_final = nn.LayerNorm(width)
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        for m in self.modules():  # as TextEncoder; from_stage2 then copies whatever fits
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, ids, mask, question, question_mask):
        """ids, mask [B, La] ([sot] a1 .. [eot] pad), question [B, Lq, Dt], question_mask [B, Lq] -> logits [B, La, V];
        position i predicts token i + 1 and sees tokens 0..i only."""
        x = self.token_embedding(ids) + self.positional_embedding[:ids.shape[1]]  # [B, La, Dt]
        causal, cross = text_mask(mask, causal=True), text_mask(question_mask)    # [B, 1, La, La], [B, 1, 1, Lq]
        for blk in self.blocks:
            x = blk(x, causal, question, cross)
        return self.head(self.ln_final(x)) @ self.token_embedding.weight.t() + self.bias

def answer_nll(logits, ids, mask):
    """logits [N, La, V], ids / mask [N, La] -> [N]: the answer's summed token NLL, -sum_{i>=1} log p(a_i | a_<i, q)
    over its real tokens after [sot], [eot] included (the official loss sums, it does not average, over tokens)."""
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)                                    # [N, La-1]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction='none')
    return nll.view(len(ids), -1).sum(1)

@torch.no_grad()
def rank_answer(decoder, question, question_mask, answer_ids, answer_mask, k, double_first=False, chunk=256):
    """The official rank_answer: question states [B, Lq, Dt] + mask, the tokenized answer list [A, La] -> [B] indices
    into the list. 1. p(first token | question) for every entry; keep the k best. 2. Re-score those k by their whole
    log-likelihood, log p(a | q) = -answer_nll. The official score adds the first token's log-probability once more
    (ALBEF's formula counts it twice); double_first=True reproduces that, the default scores the likelihood itself."""
    B, k = len(question), min(k, len(answer_ids))
    start = answer_ids[:1, :1].expand(B, 1)                                              # [B, 1] [sot]
    first = decoder(start, torch.ones_like(start, dtype=torch.bool), question, question_mask)[:, 0]  # [B, V]
    first = first.float().log_softmax(-1)[:, answer_ids[:, 1]]                            # [B, A] log p(a_1 | q)
    top_lp, top = first.topk(k, dim=1)                                                    # [B, k]
    rows, owner = top.flatten(), torch.arange(B, device=top.device).repeat_interleave(k)  # [B*k]: answer, question
    nll = torch.cat([answer_nll(decoder(answer_ids[r], answer_mask[r], question[q], question_mask[q]),
                                answer_ids[r], answer_mask[r])
                     for r, q in zip(rows.split(chunk), owner.split(chunk))]).view(B, k)  # [B, k]
    score = -nll + top_lp if double_first else -nll
    return top.gather(1, score.argmax(1, keepdim=True))[:, 0]

class UMTQA(nn.Module):
    """The open-ended QA model: the stage-2 video encoder and text encoder (question encoder: text-only blocks, then
    fusion blocks over all video tokens, no mask, no teacher) and the AnswerDecoder. Build with from_stage2."""

    def __init__(self, vision_config, text_config):
        super().__init__()
        self.vision_config = dict(vision_config, align_layers=0)  # no UTA in fine-tuning: no alignment heads
        self.text_config = dict(text_config)
        tower = {k: v for k, v in text_config.items() if k != 'embed_dim'}
        self.vision_encoder = VideoViT(VideoViTConfig(**self.vision_config))
        self.text_encoder = TextEncoder(**tower, vision_dim=self.vision_encoder.config.embed_dim)
        del self.text_encoder.ln_text  # the VTC feature's norm: unused here (DDP wants every parameter used)
        layers = tower['layers'] - tower['fusion_layer']  # official: 3 for BERT-base (12 - 9), 5 for BERT-large
        if layers < 1:
            raise ValueError(f"fusion_layer={tower['fusion_layer']} leaves no fusion block to copy into the decoder")
        self.decoder = AnswerDecoder(tower['vocab_size'], tower['context_length'], tower['width'], tower['heads'],
                                     layers, tower['mlp_ratio'], tower['quick_gelu'])

    def encode_question(self, video, ids, mask):
        """video [B, 3, T, H, W], question ids / mask [B, Lq] -> question states [B, Lq, Dt]."""
        x_vis, _ = self.vision_encoder(video)                                   # [B, N, D], every token
        return self.text_encoder.forward_fusion(self.text_encoder.forward_text(ids, mask), mask, x_vis)

    def forward(self, video, ids, mask, answer_ids, answer_mask, weights):
        """answer ids / mask [B, A, La], weights [B, A] (0 = no answer) -> the official loss sum(weight x NLL) / B."""
        B, A, La = answer_ids.shape
        q = self.encode_question(video, ids, mask).repeat_interleave(A, 0)     # [B*A, Lq, Dt]
        a_ids, a_mask = answer_ids.flatten(0, 1), answer_mask.flatten(0, 1)      # [B*A, La]
        nll = answer_nll(self.decoder(a_ids, a_mask, q, mask.repeat_interleave(A, 0)), a_ids, a_mask)  # [B*A]
        return (weights.flatten() * nll).sum() / B

    def answer(self, video, ids, mask, answer_ids, answer_mask, k, double_first=False):
        """-> [B] indices into the answer list (rank_answer)."""
        return rank_answer(self.decoder, self.encode_question(video, ids, mask), mask, answer_ids, answer_mask, k,
                           double_first)

def qa_source(key, fusion_layer):
    """A UMTQA weight name -> the stage-2 UMT weight it starts from. Decoder block j <- fusion block
    fusion_layer + j; the decoder's embeddings and ln_final <- the text encoder's; its LM head <- the MLM head."""
    if key.startswith(('vision_encoder.', 'text_encoder.')):
        return key
    if key.startswith('decoder.blocks.'):
        j, rest = key.removeprefix('decoder.blocks.').split('.', 1)
        return f'text_encoder.blocks.{fusion_layer + int(j)}.{rest}'
    if key.startswith('decoder.head.'):
        return 'mlm_head.' + key.removeprefix('decoder.head.')
    return 'mlm_bias' if key == 'decoder.bias' else 'text_encoder.' + key.removeprefix('decoder.')

def from_stage2(umt, name='the stage-2 model'):
    """A stage-2 UMT (checkpoints.load(path, 'umt')) -> (UMTQA, report lines). Everything that fits is copied. New:
    the decoder's cross-attention key/value projection, which reads the question (width Dt) where the fusion block's
    read the video (width D; the official BERT-base decoder copies it because there both widths are 768)."""
    qa = UMTQA(dataclasses.asdict(umt.vision_encoder.config), umt.text_config)
    sd, own, fusion = umt.state_dict(), qa.state_dict(), umt.text_encoder.fusion_layer
    source = {k: qa_source(k, fusion) for k in own}
    feed = {k: sd[s] for k, s in source.items() if s in sd and sd[s].shape == own[k].shape}
    feed = {k: v for k, v in feed.items()  # a bias is copied only with its weight (kv_proj.bias fits, its weight not)
            if not (k.endswith('.bias') and k[:-4] + 'weight' in own and k[:-4] + 'weight' not in feed)}
    used = {source[k] for k in feed}
    load_strict(qa, {**own, **feed})
    unused = [k for k in sd if k not in used]
    encoders = [k for k in unused if k.startswith(('vision_encoder.', 'text_encoder.'))]
    return qa, [f'QA model from {name}: {len(feed)} of {len(own)} tensors; the answer decoder is a causal copy of '
                f'text blocks {list(range(fusion, len(umt.text_encoder.blocks)))} (the fusion blocks), its LM head the '
                f'MLM head', f'new: {group([k for k in own if k not in feed], parts=5)}',
                f'unused: {group(encoders, parts=2)}, '
                f'{group([k for k in unused if k not in encoders], parts=1)}']

def load_qa(ckpt, name='the checkpoint'):
    """A tasks/finetune_qa.py checkpoint dict -> UMTQA (strict)."""
    try:
        qa = UMTQA(ckpt['model_config'], ckpt['text_config'])
        load_strict(qa, ckpt['model'])
    except (KeyError, TypeError, ValueError) as e:
        fail(f'{name} is not a checkpoint of tasks.finetune_qa ({type(e).__name__}: {e}): pass another --out_dir')
    return qa

# ----------------------------------------------------------------------------------------------
# Data: the official annotation files (dataset/qa_dataset.py, dataset/caption_dataset.py of the official repo)

QAItem = namedtuple('QAItem', 'path question answers weights qid')
MCItem = namedtuple('MCItem', 'path options answer')

def read_qa(ann_file, root=None):
    """Official QA JSON list of {"video", "question", "answer": str or [str], "question_id" (val / test)} ->
    ([QAItem], positions skipped). Questions are cleaned by data.pre_text, answers never. A list's unique answers weigh
    count / len (official). An entry without a video, a question or a non-empty answer is skipped and counted."""
    items, skipped = [], []
    for i, o in enumerate(data.load_json(ann_file, 'QA file')):
        answers = o.get('answer') if isinstance(o.get('answer'), list) else [o.get('answer')]
        answers = [a for a in answers if isinstance(a, str) and a.strip()]
        if not (isinstance(o.get('video'), str) and isinstance(o.get('question'), str) and answers):
            skipped.append(i)
            continue
        counts = Counter(answers)
        items.append(QAItem(os.path.join(root or '', o['video']), data.pre_text(o['question']), list(counts),
                            [c / len(answers) for c in counts.values()], o.get('question_id', i)))
    if not items:
        fail(f'{ann_file}: none of its {len(skipped)} entries has a video, a question and an answer')
    return items, skipped

def read_answer_list(path, max_len):
    """JSON list of answer strings -> (answers, ids [A, La], mask [A, La], entries cut to max_len tokens). An entry
    that gives no token (not a string, empty, blank) could never be generated: a ValueError names it."""
    try:
        answers = json.loads(data.read_text(path, 'answer list'))
    except json.JSONDecodeError as e:
        fail(f'answer list {path} is not JSON ({e})')
    if not isinstance(answers, list) or not answers:
        fail(f'answer list {path} must be a non-empty JSON list of answer strings')
    ids, mask = tokenize([a if isinstance(a, str) else '' for a in answers], max_len)      # [A, La]
    bad = [(i, answers[i]) for i in (mask.sum(1) < 3).nonzero()[:, 0].tolist()]           # only [sot] [eot]
    if bad:
        fail(f'{path}: {len(bad)} answer-list entries give no token, e.g. ' +
             ', '.join(f'#{i} {a!r}' for i, a in bad[:5]))
    cut = int((tokenize(answers, 77)[1].sum(1) > max_len).sum())  # 77: CLIP's longest text
    return answers, ids, mask, cut

def read_mc(ann_file, root=None):
    """Official MSRVTT-MC list of {"video", "caption": [options], "answer": index} -> [MCItem], options cleaned by
    data.pre_text. Every question needs the same number of options (5 in MSRVTT-MC) and an answer among them."""
    items = []
    for i, o in enumerate(data.load_json(ann_file, 'MC file')):
        options, answer = o.get('caption'), o.get('answer')
        if not (isinstance(options, list) and len(options) >= 2 and type(answer) is int and 0 <= answer < len(options)
                and isinstance(o.get('video'), str)
                and all(isinstance(c, str) and data.pre_text(c) for c in options)):
            fail(f'{ann_file}: entry #{i} is not {{"video": path, "caption": [2 or more non-empty options], '
                 f'"answer": index of the right one}}: {json.dumps(o)[:80]}')
        items.append(MCItem(os.path.join(root or '', o['video']), [data.pre_text(c) for c in options], answer))
    if len({len(it.options) for it in items}) > 1:
        fail(f'{ann_file}: the questions have different numbers of options')
    return items

class VideoQuestions(data._RobustDataset):
    """QAItems or MCItems with their uint8 clips (data.normalize makes them model inputs). 'train': the official
    'rand' frames, random-resized crop + flip, an unreadable video replaced by another and counted (data.py); 'eval':
    middle frames, the whole frame resized (the official test transform), an unreadable one flagged 'bad' (wrong).
    Text comes tokenized: question (or options) ids / mask [Lq] (or [O, L]); for training also the answers, padded
    to the most any question has: answer_ids / answer_mask [A, La] and weights [A] (0 = padding)."""

    def __init__(self, items, num_frames, size, mode, text_len, answer_len=5, max_bad_fraction=0.05, threads=1):
        assert mode in ('train', 'eval')
        self.items, self.num_frames, self.size, self.mode, self.threads = items, num_frames, size, mode, threads
        self.text_len, self.answer_len = text_len, answer_len
        self.max_answers = max((len(it.answers) for it in items if isinstance(it, QAItem)), default=0)
        super().__init__([it.path for it in items], max_bad_fraction)

    def load(self, i, rng):
        item, T, S, train = self.items[i], self.num_frames, self.size, self.mode == 'train'
        sampling, crop = ('rand', 'rrc') if train else ('middle', 'squash')
        try:
            frames = data.read_frames(item.path, lambda n: data.sample_indices(n, T, sampling, rng), self.threads)
            video, bad = data.augment(frames, S, crop, rng, flip=train)[0], False
        except data.BAD_ERRORS:
            if train:
                raise
            video, bad = torch.zeros(3, T, S, S, dtype=torch.uint8), True
        if isinstance(item, MCItem):
            ids, mask = tokenize(item.options, self.text_len)                          # [O, L]
            return {'video': video, 'bad': bad, 'ids': ids, 'mask': mask, 'answer': item.answer}
        ids, mask = (x[0] for x in tokenize([item.question], self.text_len))           # [Lq]
        out = {'video': video, 'bad': bad, 'ids': ids, 'mask': mask}
        if train:
            pad = self.max_answers - len(item.answers)
            out['answer_ids'], out['answer_mask'] = tokenize(item.answers + [''] * pad, self.answer_len)  # [A, La]
            out['weights'] = torch.tensor(item.weights + [0.0] * pad)                                      # [A]
        return out

def prior_baselines(train_items, test_items):
    """Test accuracy (%) without looking at the video: the most frequent training answer for every question, and the
    most frequent training answer of the same question text (else that overall answer)."""
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
DEMO_MC_DRAWS = 5  # multiple-choice questions per test video, each with its own 4 distractors and answer position

def demo_attributes(record):
    """A demo caption record -> {'color', 'shape', 'direction'}: its own fields, else parsed from the caption
    template 'a {color} {shape} moving {direction}'; None if neither fits."""
    caption = record['caption'] if isinstance(record['caption'], str) else record['caption'][0]
    m = re.fullmatch(r'an? (.+) (\S+) moving (\S+)', caption.strip().lower())
    parsed = dict(zip(DEMO_QUESTIONS, m.groups())) if m else {}
    attrs = {k: record.get(k, parsed.get(k)) for k in DEMO_QUESTIONS}
    return attrs if all(attrs.values()) else None

def make_demo_qa(root, out_dir=None, seed=0):
    """root/captions_{train,val}.json -> qa_train.json, qa_test.json, qa_answer_list.json (the training answers) and
    mc_test.json (each val video DEMO_MC_DRAWS times: its caption and 4 others, shuffled) in out_dir (root).
    An attribute with a single value in the training captions (the demo's shape) is not asked about. out_dir must be
    the demo set, or a new or empty folder."""
    out_dir, rng = out_dir or root, np.random.default_rng(seed)
    splits = {s: [(r, a) for r in data.load_json(f'{root}/captions_{s}.json', 'demo captions')
                  if (a := demo_attributes(r))] for s in ('train', 'val')}  # (record, attributes) that fit the template
    training.claim_folder(out_dir, MARKER, 'the demo')
    asked = {k: q for k, q in DEMO_QUESTIONS.items() if len({a[k] for _, a in splits['train']}) > 1}  # not 1 answer
    for name, split in (('train', 'train'), ('test', 'val')):
        qa = [{'video': r['video'], 'question': q, 'answer': a[key]} for r, a in splits[split]
              for key, q in asked.items()]
        if name == 'test':
            qa = [dict(x, question_id=i) for i, x in enumerate(qa)]
        json.dump(qa, open(f'{out_dir}/qa_{name}.json', 'w'), indent=1)
    json.dump(sorted({a[k] for _, a in splits['train'] for k in asked}), open(f'{out_dir}/qa_answer_list.json', 'w'))
    caption = lambda a: f"a {a['color']} {a['shape']} moving {a['direction']}"
    captions = sorted({caption(a) for rs in splits.values() for _, a in rs})
    mc = []
    for r, a in splits['val']:
        others = [c for c in captions if c != caption(a)]
        for _ in range(DEMO_MC_DRAWS):
            options = [caption(a)] + list(rng.choice(others, 4, replace=False))
            order = rng.permutation(5)
            mc.append({'video': r['video'], 'caption': [options[j] for j in order], 'answer': int(np.argmin(order))})
    json.dump(mc, open(f'{out_dir}/mc_test.json', 'w'), indent=1)
    print(f'wrote {out_dir}/: qa_train.json ({len(splits["train"]) * len(asked)} questions), qa_test.json '
          f'({len(splits["val"]) * len(asked)}), qa_answer_list.json, mc_test.json ({len(mc)} questions, 5 options)')

def main(argv=None):
    training.short_errors()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('folder', help="the demo set (python demo.py set FOLDER): its QA and MC files are written there")
    make_demo_qa(ap.parse_args(argv).folder)

if __name__ == '__main__':
    main()
