"""
Evaluation that the training scripts and the evaluation commands share: each rank takes a share of
a dataset and the results are summed into place (so one process and W processes give the same
numbers), the metrics, the official zero-shot retrieval protocol (train_stage2.py checks VTC
retrieval after every epoch), a classifier's multi-view accuracy (tasks.finetune validates every
epoch), and how a command writes its results (evaluate.py, tasks.video_qa, tasks.ava).
"""

import json
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import training
from data import normalize
from util.configurator import fail

K_TEST = 128          # candidates re-ranked by VTM per query, in each direction (official k_test)
MAX_TEXT_LEN = 32     # caption tokens (official max_txt_l: MSRVTT 32; MSVD, DiDeMo, LSMDC 64)
BATCH = 16            # videos (or captions) per forward pass
ITM_BATCH = 128       # (caption, video) pairs per fusion forward pass in VTM re-ranking
WORKERS = min(4, training.CORES)  # DataLoader processes decoding videos: at most the cores
NO_MATCH = -100.0     # re-ranked score of every pair outside the top K_TEST (official)

# ----------------------------------------------------------------------------------------------
# Metrics: plain functions on tensors

def best_positive_rank(scores, positive):
    """scores [Q, G], positive [Q, G] bool -> [Q] 0-based rank of the best-ranked positive of each
    query. Ties are counted against the model: every wrong item that scores >= the best positive
    comes before it, so a constant scorer gets no credit. Other positives never push a positive
    down."""
    best = scores.masked_fill(~positive, float('-inf')).amax(1, keepdim=True)  # [Q, 1]
    return ((scores >= best) & ~positive).sum(1)

def retrieval_metrics(sim, txt2vid, sim_v2t=None):
    """sim [num_texts, num_videos] scores, txt2vid LongTensor [num_texts] (each caption's video) ->
    recalls in %. t2v: a text is correct when its video is retrieved. v2t: a video may have several
    captions, and the best-ranked one counts (as the official code); videos without a caption are
    left out of v2t. sim_v2t: scores for the v2t direction when they differ from sim (after
    re-ranking each direction has its own top-k). Keys: t2v_R@1/5/10, t2v_mean, v2t_R@1/5/10,
    v2t_mean, mean (of the two means, the official r_mean)."""
    sim = sim.detach().float().cpu()
    nt, nv = sim.shape
    positive = torch.zeros(nt, nv, dtype=torch.bool)
    positive[torch.arange(nt), txt2vid.cpu()] = True                         # [Nt, Nv]
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
    """logits [B, V, C] of V views (clips x crops) -> probabilities [B, C]: softmax per view, then
    the mean (the official multi-view test, single_modality/engines/engine_for_finetuning.py)."""
    return logits.float().softmax(dim=-1).mean(dim=1)

def topk_accuracy(scores, labels, ks=(1, 5)):
    """scores [B, C], labels [B] -> {'top1': %, 'top5': %}; k is capped at C (top-5 of 3 classes is
    top-3)."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices.cpu()   # [B, k]
    hit = top == labels.cpu()[:, None]                                       # [B, k]
    return {f'top{k}': 100.0 * hit[:, :k].any(1).double().mean().item() for k in ks}

def rerank(sim, k, pair_scores, videos=None, batch=ITM_BATCH):
    """VTM re-ranking (the official k_test protocol): sim [Nt, Nv] VTC scores -> (t2v [Nt, Nv],
    v2t [Nt, Nv]) scores. Each text's top-k videos and each video's top-k texts (k capped at the
    count) are scored again by pair_scores(text_idx [P], video_idx [P]) -> ITM positive logits
    [P]; everything else gets NO_MATCH, as the official code (the VTC score is not added back). A
    pair in both top-k sets is scored once. `videos`: the video indices this rank scores (its own
    share); the rest comes from the other ranks by an all-reduce."""
    nt, nv = sim.shape
    top = lambda dim, n: torch.zeros_like(sim, dtype=torch.bool).scatter_(
        dim, sim.topk(min(k, n), dim=dim).indices, True)
    t2v_top, v2t_top = top(1, nv), top(0, nt)                               # [Nt, Nv] each
    todo = t2v_top | v2t_top                                                # pairs to score
    if videos is not None:  # this rank's columns only
        mine = torch.zeros(nv, dtype=torch.bool, device=sim.device)
        todo &= mine.index_fill_(0, videos.to(sim.device), True)
    text_idx, video_idx = todo.nonzero(as_tuple=True)                       # [P], [P]
    itm = torch.zeros_like(sim)
    for s in tqdm(range(0, len(text_idx), batch), desc='VTM re-ranking', disable=not is_master()):
        t, v = text_idx[s:s + batch], video_idx[s:s + batch]
        itm[t, v] = pair_scores(t, v).float()
    if dist.is_initialized():
        dist.all_reduce(itm)  # each pair was scored on exactly one rank, zeros elsewhere: exact sum
    return itm.where(t2v_top, NO_MATCH), itm.where(v2t_top, NO_MATCH)

# ----------------------------------------------------------------------------------------------
# Data-parallel evaluation: each rank takes items rank, rank + W, ...; results summed into place

def is_master():
    return not dist.is_initialized() or dist.get_rank() == 0

def gather_rows(local, index, total):
    """local [n, ...] rows of global positions index [n] -> [total, ...] on every rank. Zeros
    elsewhere, then an all-reduce sum: exact (x + 0 == x), so one process and W processes give the
    same tensors."""
    out = local.new_zeros(total, *local.shape[1:])
    out[index.to(local.device)] = local
    if dist.is_initialized():
        dist.all_reduce(out)
    return out

def run_videos(dataset, fn, device, batch, workers, desc, ctx=None):
    """fn(videos on device, batch dict) -> tuple of [b, ...] tensors, over this rank's share of the
    dataset -> (tuple of [n, ...] tensors, global indices [n]). fn runs without gradients, under ctx
    (the precision)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if len(dataset) < world:
        fail(f'{len(dataset)} videos cannot be split over {world} processes: use fewer processes')
    index = torch.arange(rank, len(dataset), world)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, index.tolist()),
                                         batch_size=batch, num_workers=workers)
    outs, replaced = [], 0
    for b in tqdm(loader, desc=desc, disable=not is_master()):
        replaced += int((b['skipped'] > 0).sum())
        video = normalize(b['video'].to(device, non_blocking=True))
        with torch.no_grad(), ctx or nullcontext():
            outs.append([o.detach() for o in fn(video, b)])
    if replaced:  # data.py replaces an unreadable file by another: fine for training, not here
        print(f'WARNING: {replaced} unreadable videos were replaced by others; run `python -m '
              'tools.check_data` and evaluate on the clean list for exact numbers')
    return [torch.cat(o) for o in zip(*outs)], index

# ----------------------------------------------------------------------------------------------
# Protocols used during training: retrieval (stage 2) and a classifier's accuracy (fine-tuning)

def evaluate_retrieval(net, dataset, device, k_test=K_TEST, batch=BATCH, workers=WORKERS,
                       max_len=MAX_TEXT_LEN):
    """Zero-shot retrieval of a stage-2 UMT (either text side) on a data.VideoText(mode='eval') set
    -> {'vtc': metrics, 'reranked': metrics, ...}; k_test=0: the VTC scores only (train_stage2.py's
    check after every epoch). Captions get max_len tokens, at most the text side's positions (CLIP
    77, BERT 512). Every rank must call it."""
    ctx = training.autocast(device)
    net.eval()
    captions = [c for item in dataset.items for c in item.captions]   # every caption of every video
    txt2vid = torch.tensor([i for i, item in enumerate(dataset.items) for _ in item.captions])
    nt, nv = len(captions), len(dataset)

    def encode(video, _):  # per-frame pooled features (the official keep_temporal=True), no mask
        x_vis, _, feat = net.encode_video(video, per_frame=True)
        feat = feat if feat.ndim == 3 else feat[:, None]                    # [b, T, E]
        return x_vis, F.normalize(feat.float(), dim=-1)  # x_vis stays in the autocast dtype: big

    (x_vis, video_feat), video_index = run_videos(dataset, encode, device, batch, workers, 'videos',
                                                  ctx)
    video_feat = gather_rows(video_feat, video_index, nv)  # [Nv, T, E]; tokens stay on this rank
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    text_index = torch.arange(rank, nt, world)
    max_len = min(max_len, net.text_encoder.max_len)
    ids, mask = net.tokenizer([captions[j] for j in text_index.tolist()], max_len)  # [n, L] each
    with torch.no_grad(), ctx:  # ([b, L, Dt], [b, E]) per batch
        texts = [net.encode_text(ids[s:s + batch].to(device), mask[s:s + batch].to(device))
                 for s in tqdm(range(0, len(ids), batch), desc='texts', disable=not is_master())]
    hidden = gather_rows(torch.cat([h for h, _ in texts]).float(), text_index, nt)    # [Nt, L, Dt]
    text_feat = torch.cat([F.normalize(f.float(), dim=-1) for _, f in texts])
    text_feat = gather_rows(text_feat, text_index, nt)                                # [Nt, E]
    # [Nt, L]; gloo sums no bools
    mask = gather_rows(mask.long().to(device), text_index, nt).to(mask.dtype)

    # VTC with temperature 1: s(text, video) = mean over frames f of cos(text, video_f), as the
    # official get_sim
    sim = torch.einsum('te,vfe->tvf', text_feat, video_feat).mean(-1)      # [Nt, Nv]

    def itm(t, v):  # the fusion layers: caption tokens attend to all T*h*w tokens of the video
        with torch.no_grad(), ctx:  # this rank's videos v = rank + j * world are rows j of x_vis
            return net.itm_logits(hidden[t], mask[t], x_vis[v // world])[:, 1]

    out = {'vtc': retrieval_metrics(sim, txt2vid), 'num_videos': nv, 'num_texts': nt,
           'chance_R@1': 100.0 / nv}
    if k_test > 0:
        t2v, v2t = rerank(sim, k_test, itm, videos=video_index)
        out['reranked'] = retrieval_metrics(t2v, txt2vid, v2t)
    return out

def per_view(dataset, fn, device, batch=BATCH, workers=WORKERS, desc='views', ctx=None):
    """fn on every view (clips x crops) of every video -> ([N, V, ...], labels [N]) on every
    rank."""
    def views(video, b):  # video [b, V, 3, T, S, S], or [b, 3, T, S, S] when V = 1
        video = video if video.ndim == 6 else video[:, None]
        out = fn(video.flatten(0, 1)).float().unflatten(0, video.shape[:2])  # [b, V, ...]
        return out, b['label'].to(device)
    ctx = ctx or training.autocast(device)
    (out, labels), index = run_videos(dataset, views, device, batch, workers, desc, ctx)
    return gather_rows(out, index, len(dataset)), gather_rows(labels, index, len(dataset))

def head_accuracy(classifier, dataset, device, batch=BATCH, workers=WORKERS, ctx=None):
    """A classifier's top-1 / top-5 (%) on a dataset, softmax averaged over each video's views; each
    video is counted once, on any number of processes (tasks/finetune.py's validation and test)."""
    was_training = classifier.training
    # [N, V, C], [N]
    logits, labels = per_view(dataset, classifier.eval(), device, batch, workers, 'views', ctx)
    classifier.train(was_training)
    return topk_accuracy(multiview_average(logits), labels)

# ----------------------------------------------------------------------------------------------
# Results of a command: checked output path, two decimals, JSON

def new_output(path):
    """An output path must be new: a command never overwrites a file it did not create."""
    if os.path.exists(path):
        fail(f'--out {path} exists: pass a new file name (nothing is ever written over an existing '
             'file)')
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        fail(f'--out {path}: its folder {os.path.dirname(path)!r} does not exist')

def rounded(x):
    """Results with two decimals: percentages read as 43.33, not 43.333333333333336."""
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    return round(x, 2) if isinstance(x, float) else x

def finish(results, out=None, show=True):
    """The end of an evaluation command: the results with two decimals, printed as JSON (show) and
    written to `out` (checked by new_output before the work) by rank 0, then the process group torn
    down together -> the rounded results."""
    results = rounded(results)
    if is_master():
        if show:
            print(json.dumps(results, indent=1))
        if out:
            json.dump(results, open(out, 'w'), indent=1)
            print(f'wrote {out}')
    if dist.is_initialized():
        dist.barrier()  # leave together: a rank that leaves first makes gloo abort the others
        dist.destroy_process_group()
    return results


if __name__ == '__main__':  # a module, not a script: say what it holds
    print(__doc__.strip())
