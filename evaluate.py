"""
Evaluation: the paper's downstream protocols, features for your own videos, and a picture of the semantic mask.

    retrieval   zero-shot video-text retrieval, official protocol (multi_modality/tasks/retrieval_utils.py): stage-2
                model, 4 middle frames, VTC scores (mean over frames of the per-frame cosine), then VTM re-ranking of
                the top K_TEST in both directions: t2v and v2t (the official logs' img_r* and txt_r*).
    classify    action recognition: k-NN and a linear probe on frozen features (stage 1 / 2, or a CLIP --teacher), or
                a fine-tuned classifier's own head. Multi-view test: clips x crops, softmax averaged, top-1 / top-5
                (single_modality/engines/engine_for_finetuning.py).
    mc          multiple-choice video QA (MSRVTT-MC), official scoring (multi_modality/tasks/retrieval_mc.py): stage-2
                model, 12 middle frames, each option 0.7 x VTM match probability + 0.3 x VTC softmax over the options.
    features    pooled and per-frame features of your own videos -> one .pt file.
    show-mask   one PNG: the frames, the teacher's CLS attention, and the tokens the semantic mask keeps.
    ava-map     frame-mAP@0.5 IoU of an AVA detections CSV over the label map's classes (the metric is in ava.py).

Commands (any checkpoint of this repo, or an official UMT .pth):
    python evaluate.py retrieval --ckpt out/stage2/last.pt --ann msrvtt_test1k.json --root videos/
    torchrun --standalone --nproc_per_node=8 evaluate.py retrieval ...   # also classify, mc: each GPU takes a share
    python evaluate.py classify --ckpt out/stage1/last.pt --train k400_train.csv --val k400_val.csv --root k400/
    python evaluate.py mc --ckpt out/stage2/last.pt --ann msrvtt_mc_test.json --root videos/
    python evaluate.py features --ckpt out/stage1/last.pt a.mp4 b.mp4 --out feats.pt
    python evaluate.py show-mask video.mp4 --out mask.png      # CLIP ViT-B/16 'openai' teacher
    python evaluate.py ava-map --labelmap LABELMAP.pbtxt --groundtruth GT.csv --detections DET.csv
Tiny CPU demo (after train_stage1.py's demo run):
    python evaluate.py classify --ckpt out/demo_stage1/last.pt --train demo_data/train_color.csv \
        --val demo_data/val_color.csv --root demo_data --clips 1 --crops 1       # the squares' colour, k-NN + probe
"""
import argparse
import json
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import ava
import checkpoints
import training
from data import BAD_ERRORS, VideoClassification, VideoText, augment, normalize, read_frames, sample_indices
from teacher import build_teacher
from video_language import tokenize
from video_qa import VideoQuestions, mc_scores, read_mc

K_TEST = 128          # candidates re-ranked by VTM per query, in each direction (official k_test)
RET_FRAMES = 4        # frames per video for retrieval, middle of 4 equal segments (official zero-shot configs)
MC_FRAMES = 12        # frames per video for multiple choice (official MSRVTT-MC: 12)
MAX_TEXT_LEN = 32     # caption tokens (official max_txt_l: MSRVTT 32; MSVD, DiDeMo, LSMDC 64)
PROTOCOLS = {         # the official zero-shot retrieval configs (exp/zero_shot/ret_*/b16.py): caption tokens, the
    'msrvtt': dict(max_len=32, paragraph=False, seconds=None),   # captions of a video joined into one paragraph,
    'msvd': dict(max_len=64, paragraph=False, seconds=None),     # seconds of video read (DiDeMo: the first 30)
    'lsmdc': dict(max_len=64, paragraph=False, seconds=None),
    'didemo': dict(max_len=64, paragraph=True, seconds=30),
    'anet': dict(max_len=150, paragraph=True, seconds=None),     # 150 > CLIP's 77 positions: cut at 77 (README)
}
KNN_K = 20            # neighbours that vote in k-NN classification (DINO's protocol, Caron et al. 2021)
KNN_TEMP = 0.07       # a neighbour's vote weighs exp(cos / KNN_TEMP) (DINO)
PROBE_EPOCHS = 30     # linear probe: passes over the (pre-computed) training features
PROBE_LR = 1e-2       # AdamW peak learning rate of the probe, cosine-decayed to 0 (features are standardized)
PROBE_WD = 1e-4       # AdamW weight decay of the probe
TEST_CLIPS = 4        # temporal clips per test video (official Kinetics: 4)
TEST_CROPS = 3        # spatial crops per clip: 3 = left/center/right, 1 = center (official Kinetics: 3)
BATCH = 16            # videos (or captions) per forward pass
ITM_BATCH = 128       # (caption, video) pairs per fusion forward pass in VTM re-ranking
WORKERS = 4           # DataLoader processes decoding videos
NO_MATCH = -100.0     # re-ranked score of every pair outside the top K_TEST (official)

# ----------------------------------------------------------------------------------------------------------------
# Metrics: plain functions on tensors (the tests call them directly)

def best_positive_rank(scores, positive):
    """scores [Q, G], positive [Q, G] bool -> [Q] 0-based rank of the best-ranked positive of each query.
    Ties are counted against the model: every wrong item that scores >= the best positive comes before it,
    so a constant scorer gets no credit. Other positives never push a positive down."""
    best = scores.masked_fill(~positive, float('-inf')).amax(1, keepdim=True)  # [Q, 1]
    return ((scores >= best) & ~positive).sum(1)

def retrieval_metrics(sim, txt2vid, sim_v2t=None):
    """sim [num_texts, num_videos] scores, txt2vid LongTensor [num_texts] (each caption's video) -> recalls in %.
    t2v: a text is correct when its video is retrieved. v2t: a video may have several captions, and the
    best-ranked one counts (as the official code); videos without a caption are left out of v2t. sim_v2t: scores for
    the v2t direction when they differ from sim (after re-ranking each direction has its own top-k).
    Keys: t2v_R@1/5/10, t2v_mean, v2t_R@1/5/10, v2t_mean, mean (of the two means, the official r_mean)."""
    sim = sim.detach().float().cpu()
    nt, nv = sim.shape
    positive = torch.zeros(nt, nv, dtype=torch.bool)
    positive[torch.arange(nt), txt2vid.cpu()] = True                       # [Nt, Nv]
    v2t = (sim if sim_v2t is None else sim_v2t.detach().float().cpu()).t()  # [Nv, Nt]
    has_caption = positive.any(0)                                           # [Nv]
    ranks = {'t2v': best_positive_rank(sim, positive),
             'v2t': best_positive_rank(v2t[has_caption], positive.t()[has_caption])}
    out = {}
    for direction, rank in ranks.items():
        for k in (1, 5, 10):
            out[f'{direction}_R@{k}'] = 100.0 * (rank < k).double().mean().item()
        out[f'{direction}_mean'] = sum(out[f'{direction}_R@{k}'] for k in (1, 5, 10)) / 3
    out['mean'] = (out['t2v_mean'] + out['v2t_mean']) / 2
    return out

def multiview_average(logits):
    """logits [B, V, C] of V views (clips x crops) -> probabilities [B, C]: softmax per view, then the mean
    (the official multi-view test, single_modality/engines/engine_for_finetuning.py)."""
    return logits.float().softmax(dim=-1).mean(dim=1)

def topk_accuracy(scores, labels, ks=(1, 5)):
    """scores [B, C], labels [B] -> {'top1': %, 'top5': %}; k is capped at C (top-5 of 3 classes is top-3)."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices.cpu()   # [B, k]
    hit = top == labels.cpu()[:, None]                                       # [B, k]
    return {f'top{k}': 100.0 * hit[:, :k].any(1).double().mean().item() for k in ks}

def knn_predict(train_feats, train_labels, feats, num_classes, k=KNN_K, temp=KNN_TEMP, chunk=1024):
    """Weighted k-NN as in DINO: cosine similarity to every training feature, the k most similar vote for
    their class with weight exp(cos / temp). feats [Q, D] -> vote shares [Q, C] (rows sum to 1)."""
    train = F.normalize(train_feats.float(), dim=-1)                         # [Ntrain, D]
    out = []
    for q in F.normalize(feats.float(), dim=-1).split(chunk):                # chunks of [<=chunk, D]
        sim, idx = (q @ train.t()).topk(min(k, len(train)), dim=1)           # [Q, k]
        votes = torch.zeros(len(q), num_classes, device=q.device)
        votes.scatter_add_(1, train_labels.to(q.device)[idx], (sim / temp).exp())
        out.append(votes / votes.sum(1, keepdim=True))
    return torch.cat(out)

def train_linear_probe(feats, labels, num_classes, epochs=PROBE_EPOCHS, lr=PROBE_LR, weight_decay=PROBE_WD,
                       batch=256, seed=0):
    """A linear classifier on frozen features [N, D] -> nn.Linear(D, C) that takes the raw features.
    Features are standardized first (MAE's linear probe puts a BatchNorm without affine before the layer);
    the standardization is folded into the returned layer: W' = W / std, b' = b - W' @ mean."""
    feats, labels = feats.float(), labels.to(feats.device)
    mean, std = feats.mean(0), feats.std(0) + 1e-6
    x = (feats - mean) / std                                                 # [N, D]
    with torch.random.fork_rng(devices=[]):  # seeded: the same probe on every rank and in every run
        torch.manual_seed(seed)
        probe, g = nn.Linear(x.shape[1], num_classes).to(x.device), torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = -(-len(x) // batch)
    for epoch in range(epochs):
        for i, idx in enumerate(torch.randperm(len(x), generator=g).split(batch)):
            step = epoch * steps_per_epoch + i
            opt.param_groups[0]['lr'] = training.lr_at(step, epochs * steps_per_epoch, 0, lr, 0.0)
            loss = F.cross_entropy(probe(x[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        probe.weight.div_(std)
        probe.bias.sub_(probe.weight @ mean)
    return probe.requires_grad_(False)

def rerank(sim, k, pair_scores, videos=None, batch=ITM_BATCH):
    """VTM re-ranking (the official k_test protocol): sim [Nt, Nv] VTC scores -> (t2v [Nt, Nv], v2t [Nt, Nv]) scores.
    Each text's top-k videos and each video's top-k texts (k capped at the count) are scored again by
    pair_scores(text_idx [P], video_idx [P]) -> ITM positive logits [P]; everything else gets NO_MATCH, as the
    official code (the VTC score is not added back). A pair in both top-k sets is scored once. `videos`: the
    video indices this rank scores (its own share); the rest comes from the other ranks by an all-reduce."""
    nt, nv = sim.shape
    t2v_top = torch.zeros_like(sim, dtype=torch.bool).scatter_(1, sim.topk(min(k, nv), dim=1).indices, True)
    v2t_top = torch.zeros_like(sim, dtype=torch.bool).scatter_(0, sim.topk(min(k, nt), dim=0).indices, True)
    todo = t2v_top | v2t_top                                                 # [Nt, Nv] pairs to score
    if videos is not None:  # this rank's columns only
        todo &= torch.zeros(nv, dtype=torch.bool, device=sim.device).index_fill_(0, videos.to(sim.device), True)
    text_idx, video_idx = todo.nonzero(as_tuple=True)                        # [P], [P]
    itm = torch.zeros_like(sim)
    for s in tqdm(range(0, len(text_idx), batch), desc='VTM re-ranking', disable=not is_master()):
        t, v = text_idx[s:s + batch], video_idx[s:s + batch]
        itm[t, v] = pair_scores(t, v).float()
    if dist.is_initialized():
        dist.all_reduce(itm)  # each pair was scored on exactly one rank, zeros elsewhere: the sum is exact
    return itm.where(t2v_top, NO_MATCH), itm.where(v2t_top, NO_MATCH)

# ----------------------------------------------------------------------------------------------------------------
# Loading any checkpoint, and features from any model

def load_model(path, num_frames=None, img_size=None):
    """Any checkpoint -> (model in eval mode, kind, VideoViTConfig of the vision encoder), through checkpoints.load:
    kind 'vit' (a stage-1 student: ours, or the vision encoder of an official stage-1 / stage-2 file), 'umt' (our
    stage-2 model, with its text side) or 'classifier' (ours or an official fine-tuned file, with its own head and,
    for an official one, its own stored position table)."""
    overrides = {k: v for k, v in (('num_frames', num_frames), ('img_size', img_size)) if v is not None}
    try:
        net, report = checkpoints.load(path, 'auto', stored_table=True, **overrides)
    except ValueError as e:
        raise SystemExit(f'evaluate.py: {e}') from e
    kind = 'umt' if hasattr(net, 'text_encoder') else 'classifier' if hasattr(net, 'head') else 'vit'
    print('\n'.join(report))
    encoder = net.vision_encoder if kind == 'umt' else net.backbone if kind == 'classifier' else net
    return net.eval(), kind, encoder.config

def pooled_features(net, kind, config, video):
    """video [B, 3, T, H, W] -> (pooled [B, D], per_frame [B, t, D]): means of the encoder's output tokens over
    the whole clip and over each time step (t = T / tubelet). The student has no CLS token, so pooling is a mean
    (the official models pool by a mean too). A fine-tuned classifier applies its fc_norm, i.e. these are the inputs
    of its head."""
    if kind == 'umt':
        x = net.encode_video(video)[0]                                          # [B, N, D], final-normed, no mask
    elif kind == 'teacher':
        x = net(video)[0][-1]                                                # [B, N, C], the last block's targets
    elif kind == 'classifier':
        x = net.backbone(video)[0]                                           # [B, N, D], its norm is Identity
    else:
        x = net(video)[0]                                                    # [B, N, D], final-normed
    B, N, D = x.shape
    t = video.shape[2] // config.tubelet_size
    per_frame = x.view(B, t, N // t, D).mean(2)                              # [B, t, D], tokens in (t, h, w) order
    pooled = x.mean(1)                                                       # [B, D]
    if kind == 'classifier':
        pooled, per_frame = net.fc_norm(pooled), net.fc_norm(per_frame)
    return pooled.float(), per_frame.float()

# ----------------------------------------------------------------------------------------------------------------
# Data-parallel helpers: each rank takes items rank, rank + W, ... and the results are summed into place

def is_master():
    return not dist.is_initialized() or dist.get_rank() == 0

def gather_rows(local, index, total):
    """local [n, ...] rows of global positions index [n] -> [total, ...] on every rank. Zeros elsewhere, then an
    all-reduce sum: exact (x + 0 == x), so one process and W processes give the same tensors."""
    out = local.new_zeros(total, *local.shape[1:])
    out[index.to(local.device)] = local
    if dist.is_initialized():
        dist.all_reduce(out)
    return out

def run_videos(dataset, fn, device, batch, workers, desc, ctx=nullcontext()):
    """fn(videos on device, batch dict) -> tuple of [b, ...] tensors, over this rank's share of the dataset ->
    (tuple of [n, ...] tensors, global indices [n]). fn runs without gradients, under ctx (the precision)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if len(dataset) < world:
        raise ValueError(f'{len(dataset)} videos cannot be split over {world} processes')
    index = torch.arange(rank, len(dataset), world)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, index.tolist()), batch_size=batch,
                                         num_workers=workers)
    outs, replaced = [], 0
    for b in tqdm(loader, desc=desc, disable=not is_master()):
        replaced += int((b['skipped'] > 0).sum())
        with torch.no_grad(), ctx:
            outs.append([o.detach() for o in fn(normalize(b['video'].to(device, non_blocking=True)), b)])
    if replaced:  # data.py replaces an unreadable file by another one: fine for training, wrong for evaluation
        print(f'WARNING: {replaced} unreadable videos were replaced by others; run `python data.py --check` '
              'and evaluate on the clean list for exact numbers')
    return [torch.cat(o) for o in zip(*outs)], index

# ----------------------------------------------------------------------------------------------------------------
# Subcommands

def evaluate_retrieval(net, dataset, device, k_test=K_TEST, batch=BATCH, workers=WORKERS, max_len=MAX_TEXT_LEN):
    """Zero-shot retrieval on a data.VideoText(mode='eval') set -> {'vtc': metrics, 'reranked': metrics, ...};
    k_test=0: the VTC scores only (train_stage2.py's check after every epoch). Every rank must call it."""
    ctx = training.precision(device)[0]
    net.eval()
    captions = [c for item in dataset.items for c in item.captions]          # every caption of every video
    txt2vid = torch.tensor([i for i, item in enumerate(dataset.items) for _ in item.captions])
    nt, nv = len(captions), len(dataset)

    def encode(video, _):  # per-frame pooled features (keep_temporal=True in the official eval), no mask
        x_vis, _, feat = net.encode_video(video, per_frame=True)
        feat = feat if feat.ndim == 3 else feat[:, None]                      # [b, T, E]
        return x_vis, F.normalize(feat.float(), dim=-1)  # x_vis stays in the autocast dtype: the big tensor

    (x_vis, video_feat), video_index = run_videos(dataset, encode, device, batch, workers, 'videos', ctx)
    video_feat = gather_rows(video_feat, video_index, nv)                   # [Nv, T, E]; tokens stay on this rank
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    text_index = torch.arange(rank, nt, world)
    max_len = min(max_len, net.text_encoder.positional_embedding.shape[0])  # the text tower's positions (CLIP: 77)
    ids, mask = tokenize([captions[j] for j in text_index.tolist()], context_length=max_len)  # [n, L] each
    with torch.no_grad(), ctx:
        texts = [net.encode_text(ids[s:s + batch].to(device), mask[s:s + batch].to(device))  # ([b, L, W], [b, E])
                 for s in tqdm(range(0, len(ids), batch), desc='texts', disable=not is_master())]
    hidden = gather_rows(torch.cat([h for h, _ in texts]).float(), text_index, nt)                     # [Nt, L, W]
    text_feat = gather_rows(torch.cat([F.normalize(f.float(), dim=-1) for _, f in texts]), text_index, nt)  # [Nt, E]
    mask = gather_rows(mask.long().to(device), text_index, nt).to(mask.dtype)  # [Nt, L] (gloo sums no bools)

    # VTC with temperature 1: s(text, video) = mean over frames f of cos(text, video_f), as the official get_sim
    sim = torch.einsum('te,vfe->tvf', text_feat, video_feat).mean(-1)       # [Nt, Nv]

    def itm(t, v):  # the fusion layers: caption tokens attend to all T*h*w tokens of the video
        with torch.no_grad(), ctx:  # this rank's videos v = rank + j * world are the rows j = v // world of x_vis
            return net.itm_logits(hidden[t], mask[t], x_vis[v // world])[:, 1]

    out = {'vtc': retrieval_metrics(sim, txt2vid), 'num_videos': nv, 'num_texts': nt, 'chance_R@1': 100.0 / nv}
    if k_test > 0:
        t2v, v2t = rerank(sim, k_test, itm, videos=video_index)
        out['reranked'] = retrieval_metrics(t2v, txt2vid, v2t)
    return out

def evaluate_mc(net, dataset, device, batch=BATCH, workers=WORKERS):
    """Multiple-choice accuracy (%) of a stage-2 model on a video_qa.VideoQuestions set of MCItems: the best-scored
    option (video_qa.mc_scores) against the answer; a question whose video cannot be read counts as wrong. Every
    rank must call it; each scores its share of the questions."""
    ctx = training.precision(device)[0]
    net.eval()

    def score(video, b):
        return mc_scores(net, video, b['ids'].to(device), b['mask'].to(device)).float(), b['bad'].long().to(device)
    (scores, bad), index = run_videos(dataset, score, device, batch, workers, 'questions', ctx)
    scores, bad = (gather_rows(x, index, len(dataset)) for x in (scores, bad))  # [Q, O], [Q]
    correct = (scores.argmax(1).cpu() == torch.tensor([it.answer for it in dataset.items])) & (bad.cpu() == 0)
    return {'accuracy': 100.0 * correct.double().mean().item(), 'num_questions': len(dataset),
            'chance': 100.0 / scores.shape[1], 'unreadable_videos': int(bad.sum())}

def per_view(dataset, fn, device, batch=BATCH, workers=WORKERS, desc='views', ctx=None):
    """fn on every view (clips x crops) of every video -> ([N, V, ...], labels [N]) on every rank."""
    def views(video, b):  # video [b, V, 3, T, S, S], or [b, 3, T, S, S] when V = 1
        video = video if video.ndim == 6 else video[:, None]
        return fn(video.flatten(0, 1)).float().unflatten(0, video.shape[:2]), b['label'].to(device)  # [b, V, ...]
    ctx = ctx or training.precision(device)[0]
    (out, labels), index = run_videos(dataset, views, device, batch, workers, desc, ctx)
    return gather_rows(out, index, len(dataset)), gather_rows(labels, index, len(dataset))

def head_accuracy(classifier, dataset, device, batch=BATCH, workers=WORKERS, ctx=None):
    """A classifier's top-1 / top-5 (%) on a dataset, softmax averaged over each video's views; each video is
    counted once, on any number of processes (finetune.py's validation and test)."""
    was_training = classifier.training
    logits, labels = per_view(dataset, classifier.eval(), device, batch, workers, 'views', ctx)  # [N, V, C], [N]
    classifier.train(was_training)
    return topk_accuracy(multiview_average(logits), labels)

def evaluate_classification(net, kind, config, args, device):
    """k-NN + linear probe on frozen pooled features, or a classifier's own head, on the multi-view test set."""
    T, S = args.frames or config.num_frames, args.size or config.img_size
    test = VideoClassification(args.val, args.root, T, S, mode='test', num_clips=args.clips, num_crops=args.crops)
    if kind == 'classifier':  # fine-tuned: its own head, softmax averaged over the views
        return {'head': head_accuracy(net, test, device, args.batch, args.workers)}
    train = VideoClassification(args.train, args.root, T, S, mode='val')     # 1 clip, center crop, no augmentation
    num_classes = max(train.num_classes, test.num_classes)
    feats = lambda video: pooled_features(net, kind, config, video)[0]
    train_x, train_y = per_view(train, feats, device, args.batch, args.workers, 'train features')  # [Ntrain, 1, D]
    test_x, test_y = per_view(test, feats, device, args.batch, args.workers, 'test features')     # [N, V, D]
    votes = knn_predict(train_x[:, 0], train_y, test_x.flatten(0, 1), num_classes)  # [N*V, C]
    probe = train_linear_probe(train_x[:, 0], train_y, num_classes)
    return {'knn': topk_accuracy(votes.unflatten(0, test_x.shape[:2]).mean(1), test_y),  # vote shares averaged
            'linear': topk_accuracy(multiview_average(probe(test_x)), test_y), 'chance_top1': 100.0 / num_classes}

def extract_features(net, kind, config, paths, device, frames=None, size=None):
    """Your own videos -> {'paths', 'pooled' [N, D], 'per_frame' [N, t, D]} (+ 'embed' [N, t, E] for stage 2:
    per-frame unit vectors in the VTC space, comparable with encode_text's features) and 'skipped' {path: reason}.
    'paths' lists the videos the rows belong to: an unreadable one is skipped, not fatal. Stage 2 reads its frames
    as its retrieval eval (middle frames, whole frame resized); the others as the classification test (center)."""
    T, S = frames or config.num_frames, size or config.img_size
    out, kept, skipped = {'pooled': [], 'per_frame': [], 'embed': []}, [], {}
    for path in tqdm(paths, desc='features'):
        try:
            clip = read_frames(path, lambda n: sample_indices(n, T, 'middle'))  # uint8 [T, H, W, 3]
        except BAD_ERRORS as e:  # missing, empty, truncated, not a video
            skipped[path] = f'{type(e).__name__}: {e}'
            continue
        crop = 'squash' if kind == 'umt' else 'center'
        video = normalize(augment(clip, S, crop)[0][None].to(device))  # [1, 3, T, S, S]
        with torch.no_grad():
            for key, value in zip(out, pooled_features(net, kind, config, video)):
                out[key].append(value.cpu())
            if kind == 'umt':
                out['embed'].append(F.normalize(net.encode_video(video, per_frame=True)[2].float(), dim=-1).cpu())
        kept.append(path)
    for path, reason in skipped.items():
        print(f'skipped {path}: {reason}')
    if not kept:
        raise SystemExit(f'evaluate.py: none of the {len(paths)} videos could be read')
    return {'paths': kept, 'skipped': skipped, **{k: torch.cat(v) for k, v in out.items() if v}}

def mask_picture(video, attn, keep):
    """video [3, T, S, S] uint8, attn [T, n] teacher CLS attention, keep [T*n_keep] -> uint8 [3*S, T*S, 3]:
    row 1 the frames, row 2 the attention (per-frame max = red) over them, row 3 hidden tokens darkened."""
    _, T, S, _ = video.shape
    g = int(round(attn.shape[1] ** 0.5))                                     # h = w token grid of the teacher
    up = lambda m: m.view(T, g, g).repeat_interleave(S // g, 1).repeat_interleave(S // g, 2)  # [T, S, S]
    rgb = video.float().permute(1, 2, 3, 0) / 255                            # [T, S, S, 3]
    heat = up(attn / attn.amax(1, keepdim=True))                             # [T, S, S], 1 = most attended
    heat = torch.stack([(1.5 - (4 * heat - c).abs()).clamp(0, 1) for c in (3, 2, 1)], -1)  # blue-red, [T, S, S, 3]
    kept = torch.zeros(T * g * g)
    kept[keep] = 1.0
    rows = [rgb, 0.4 * rgb + 0.6 * heat, rgb * (0.15 + 0.85 * up(kept))[..., None]]  # 3 x [T, S, S, 3]
    grid = torch.stack(rows).permute(0, 2, 1, 3, 4).reshape(3 * S, T * S, 3)  # [3, T, S, S, 3] -> [3S, T*S, 3]
    return (grid * 255).round().byte().numpy()

def show_mask(video_path, out, teacher_name, pretrained, frames, mask_ratio, seed=0):
    """Teacher attention and the semantic mask (masking.semantic_mask, as in training) for one video -> PNG."""
    from PIL import Image
    from masking import semantic_mask
    teacher = build_teacher(teacher_name, pretrained, align_layers=1)
    S = teacher.image_size
    clip = read_frames(video_path, lambda n: sample_indices(n, frames, 'middle'))
    video = augment(clip, S, 'center')[0][None]                              # [1, 3, T, S, S] uint8
    _, attn = teacher.encode(normalize(video))                               # [1, T, h*w]
    keep = semantic_mask(attn, mask_ratio, generator=torch.Generator().manual_seed(seed))  # [1, T*n_keep]
    Image.fromarray(mask_picture(video[0], attn[0], keep[0])).save(out)
    print(f'wrote {out}: {frames} frames; rows = frames, teacher CLS attention, kept tokens '
          f'({keep.shape[1] // frames} of {attn.shape[2]} per frame)')

# ----------------------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    common_args = argparse.ArgumentParser(add_help=False)
    common_args.add_argument('--ckpt', default=None, help='checkpoint of this repo or an official UMT .pth')
    common_args.add_argument('--root', default=None, help='folder the paths in the list / annotation file start from')
    common_args.add_argument('--frames', type=int, default=None, help='frames per clip (default: the model config)')
    common_args.add_argument('--size', type=int, default=None, help='resolution (default: the model config)')
    common_args.add_argument('--batch', type=int, default=BATCH)
    common_args.add_argument('--workers', type=int, default=WORKERS)
    common_args.add_argument('--device', default='auto', help="'auto' (a GPU if there is one) or 'cpu'")
    common_args.add_argument('--out', default=None, help='write the results here (JSON)')
    r = sub.add_parser('retrieval', parents=[common_args], help='zero-shot video-text retrieval (stage 2)')
    r.add_argument('--ann', required=True, help='JSON (or JSONL) list of {"video": path, "caption": str or [str]}')
    r.add_argument('--k_test', type=int, default=K_TEST)
    r.add_argument('--protocol', choices=sorted(PROTOCOLS), default='msrvtt', help='text length, paragraphs, seconds')
    r.add_argument('--max_len', type=int, default=None, help="caption tokens (default: the protocol's)")
    q = sub.add_parser('mc', parents=[common_args], help='multiple-choice video QA, zero-shot (stage 2)')
    q.add_argument('--ann', required=True, help='JSON list of {"video": path, "caption": [options], "answer": index}')
    q.add_argument('--max_len', type=int, default=MAX_TEXT_LEN)
    c = sub.add_parser('classify', parents=[common_args], help='k-NN / linear probe / fine-tuned head')
    c.add_argument('--train', default=None, help='training list (path,label): k-NN memory and probe data')
    c.add_argument('--val', required=True, help='test list (path,label)')
    c.add_argument('--clips', type=int, default=TEST_CLIPS)
    c.add_argument('--crops', type=int, default=TEST_CROPS, choices=(1, 3))
    c.add_argument('--teacher', default=None, help="instead of --ckpt: a CLIP teacher's pooled tokens (the ceiling)")
    c.add_argument('--pretrained', default='openai', help="the teacher's weights: open_clip tag or a local file")
    f = sub.add_parser('features', parents=[common_args], help='features of your own videos')
    f.add_argument('videos', nargs='+')
    m = sub.add_parser('show-mask', help='PNG of the teacher attention and the semantic mask of one video')
    m.add_argument('video')
    m.add_argument('--out', default='mask.png')
    m.add_argument('--teacher', default='ViT-B-16-quickgelu', help="open_clip model name, or 'tiny' (the demo CLIP)")
    m.add_argument('--pretrained', default='openai', help='open_clip tag or a local weights file')
    m.add_argument('--frames', type=int, default=8)
    m.add_argument('--mask_ratio', type=float, default=0.8, help='fraction of each frame hidden (paper: 0.8)')
    m.add_argument('--seed', type=int, default=0)
    a = sub.add_parser('ava-map', help='frame-mAP of AVA detections (spatiotemporal action localization)')
    a.add_argument('--labelmap', required=True, help='.pbtxt label map: the classes scored')
    a.add_argument('--groundtruth', required=True, help='CSV of video_id, timestamp, x1, y1, x2, y2, action_id, ...')
    a.add_argument('--detections', required=True, help='CSV of video_id, timestamp, x1, y1, x2, y2, action_id, score')
    a.add_argument('--exclusions', default=None, help='CSV of video_id, timestamp: keyframes left out')
    return p.parse_args(argv)

def main(argv=None):
    args = parse_args(argv)
    if args.command == 'ava-map':
        return ava.evaluate_files(args.labelmap, args.groundtruth, args.detections, args.exclusions)
    if args.command == 'show-mask':
        return show_mask(args.video, args.out, args.teacher, args.pretrained, args.frames, args.mask_ratio, args.seed)
    _, _, device = training.setup_distributed(args.device)
    if getattr(args, 'teacher', None):  # classify the teacher's own features: what the student is taught
        net = build_teacher(args.teacher, args.pretrained, align_layers=1)
        kind, config = 'teacher', SimpleNamespace(num_frames=args.frames or 8, img_size=net.image_size, tubelet_size=1)
    elif args.ckpt:
        net, kind, config = load_model(args.ckpt, args.frames, args.size)
    else:
        raise SystemExit(f'evaluate.py {args.command}: --ckpt is required')
    net.to(device)
    if args.command == 'features':  # one process: a few videos of your own
        feats = extract_features(net, kind, config, args.videos, device, args.frames, args.size)
        torch.save(feats, args.out or 'features.pt')
        print(f'wrote {args.out or "features.pt"}: {len(feats["paths"])} videos ({len(feats["skipped"])} skipped), '
              + ', '.join(f'{k} {tuple(v.shape)}' for k, v in feats.items() if torch.is_tensor(v)))
        return feats
    if args.command in ('retrieval', 'mc') and kind != 'umt':
        raise SystemExit(f'{args.command} needs a stage-2 checkpoint of this repo (with a text side), got a {kind}')
    if args.command == 'retrieval':
        protocol = PROTOCOLS[args.protocol]
        data = VideoText(args.ann, args.root, num_frames=args.frames or RET_FRAMES, size=args.size or config.img_size,
                         mode='eval', paragraph=protocol['paragraph'], max_seconds=protocol['seconds'])
        results = evaluate_retrieval(net, data, device, args.k_test, args.batch, args.workers,
                                     args.max_len or protocol['max_len'])
    elif args.command == 'mc':
        try:
            items = read_mc(args.ann, args.root)
        except ValueError as e:  # not the MC format: the message names the entry
            raise SystemExit(f'evaluate.py: {e}') from e
        data = VideoQuestions(items, args.frames or MC_FRAMES, args.size or config.img_size, 'eval', args.max_len)
        results = evaluate_mc(net, data, device, args.batch, args.workers)
    else:
        if kind != 'classifier' and not args.train:
            raise SystemExit('k-NN and the linear probe need --train (the labelled features they learn from)')
        results = evaluate_classification(net, kind, config, args, device)
    if is_master():
        print(json.dumps(results, indent=1))
        if args.out:
            json.dump(results, open(args.out, 'w'), indent=1)
    if dist.is_initialized():
        dist.barrier()  # tear the group down together: a rank that leaves first makes gloo abort the others
        dist.destroy_process_group()
    return results

if __name__ == '__main__':
    main()
