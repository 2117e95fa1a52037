"""
Spatiotemporal action localization on AVA v2.2 with the UMT student: the annotation files, the clip
around a keyframe, person boxes, the RoI head and frame-mAP, for tasks/finetune_ava.py and
`python -m tasks.ava map`. Paper: AVA v2.2 (UMT-B 33.5, UMT-L 39.8 mAP); official code:
single_modality/action_detection/ (modeling_finetune.py, data/).

Files, as released by AVA (a box is x1, y1, x2, y2 normalized to [0, 1] by the keyframe's width and
height):
    ava_{train,val}_v2.2.csv   video_id, timestamp, x1, y1, x2, y2, action_id, person_id: one row
                               per action
    detections                 the same with a score for person_id: a person detector's boxes
                               (action_id ignored, may be empty) or, written by us, a score per box
                               and action
    *.pbtxt label map          blocks of `name: "..."` and `id: N` (or `label_id: N`): the classes
                               that are scored
    excluded timestamps        video_id, timestamp: keyframes left out of the metric
Movies: MOVIE_ROOT/<video_id>.<any extension>, each file starting at second `movie_start` of the
movie (900 for the 15-minute cuts, 0 for whole movies); timestamp t (AVA: 902 .. 1798) is frame
round((t - movie_start) x file fps).

    python -m tasks.ava demo demo_ava   # the synthetic demo set (finetune_ava's demo writes it too)
    python -m tasks.ava map --labelmap LABELMAP.pbtxt --groundtruth GT.csv --detections DET.csv
        [--exclusions EXCLUDED.csv] [--out results.json]   # frame-mAP@0.5 IoU of a detections CSV

Shapes: B clips, T frames, H, W pixels (of the resized, padded clip), h, w token grid, D width, R
boxes in the batch (RoIs), M = max boxes per keyframe, C classes.
"""

import argparse
import json
import os
import re
import shutil
from collections import namedtuple
from functools import partial

import av
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import roi_align  # torchvision comes with open_clip
from torchvision.transforms.v2 import InterpolationMode, functional as TF

import data
import training
from util.configurator import fail, reported, short_errors
from util.evaluation import new_output

# training boxes: each side moves by U(-out, in) x the box size; (x out, x in, y out, y in) as the
# official random_aug, so boxes mostly grow
JITTER = (0.2, 0.1, 0.1, 0.05)
EXTEND = (0.1, 0.05)  # test boxes pool from 10% more width and 5% more height (official extend)
ROI_SIZE = 7                    # RoIAlign bins per side, then the max over them (official 7 x 7)
BOX_TOLERANCE = 0.01  # normalized coordinates this far outside [0, 1] are rounding and get clipped
IOU_THRESHOLD = 0.5  # frame-mAP: a detection hits a ground-truth box at IoU >= 0.5 (PASCAL VOC)

# ----------------------------------------------------------------------------------------------
# Files

# box: normalized (x1, y1, x2, y2); action: None if empty
Row = namedtuple('Row', 'video ts box action score')

read_text = reported(data.read_text)  # a file it cannot read: one message

def read_csv(path, with_score=False, what='CSV'):
    """An AVA CSV -> (rows, skipped): a box outside the frame (or empty) is skipped and counted; a
    line that does not parse is bad input that names the file and the line. Columns: video_id,
    timestamp, x1, y1, x2, y2, action_id (may be empty in detections), then the score (with_score;
    a finite number) or an optional person id."""
    rows, skipped = [], 0
    last = 'score' if with_score else 'person_id'
    fields = f'video_id, timestamp, x1, y1, x2, y2, action_id, {last}'
    for n, line in enumerate(read_text(path, what).splitlines(), 1):
        r = [x.strip() for x in line.split(',')]
        if not line.strip() or line.startswith('#'):
            continue
        try:
            if len(r) < (8 if with_score else 7):
                raise ValueError(f'{len(r)} columns')
            video, ts, (x1, y1, x2, y2) = r[0], int(r[1]), map(float, r[2:6])
            action = int(r[6]) if r[6] else None
            score = float(r[7]) if with_score else 1.0
            if not np.isfinite([x1, y1, x2, y2, score]).all():
                raise ValueError('a number that is not finite')
        except ValueError as e:
            fail(f'{path} line {n}: {line.strip()[:80]!r} is not {fields} ({e})')
        lo, hi = -BOX_TOLERANCE, 1 + BOX_TOLERANCE
        if not (lo <= x1 < x2 <= hi and lo <= y1 < y2 <= hi):
            skipped += 1
            continue
        box = tuple(min(max(v, 0.0), 1.0) for v in (x1, y1, x2, y2))
        rows.append(Row(video, ts, box, action, score))
    return rows, skipped

def read_labelmap(path):
    """A .pbtxt label map -> {action id: name}, in file order."""
    names = {}
    for block in read_text(path, 'label map').split('}'):
        name = re.search(r'name:\s*"([^"]*)"', block)
        num = re.search(r'(?:label_id|\bid):\s*(\d+)', block)
        if name and num:
            names[int(num.group(1))] = name.group(1)
    if not names:
        fail(f'{path} has no `name: "..."` + `id: N` (or `label_id: N`) blocks: pass the .pbtxt '
             'label map of AVA')
    return names

def read_exclusions(path):
    """video_id, timestamp per line -> a set of (video_id, timestamp) keys."""
    keys = set()
    for n, line in enumerate(read_text(path, 'exclusions file').splitlines(), 1):
        r = [x.strip() for x in line.split(',')]
        if line.strip():
            if len(r) < 2 or not r[1].isdigit():
                fail(f'{path} line {n}: {line.strip()[:80]!r} is not video_id, timestamp')
            keys.add((r[0], int(r[1])))
    return keys

# ----------------------------------------------------------------------------------------------
# Frame-mAP (the official AVA evaluation: PASCAL VOC per class over all keyframes)

def box_iou(a, b):
    """a [n, 4], b [m, 4] (x1, y1, x2, y2) -> IoU [n, m]."""
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)                                  # [n, m]
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)

def average_precision(hits, num_gt):
    """hits: one bool per detection, best score first -> VOC AP: the area under the precision
    envelope (at each recall, the best precision at that recall or beyond), summed over the recall
    steps."""
    tp = np.cumsum(hits)
    fp = np.cumsum(~np.asarray(hits, dtype=bool))
    recall = np.concatenate([[0.0], tp / num_gt, [1.0]])
    precision = np.concatenate([[0.0], tp / np.maximum(tp + fp, 1), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # monotone envelope
    step = np.nonzero(recall[1:] != recall[:-1])[0] + 1
    return float(np.sum((recall[step] - recall[step - 1]) * precision[step]))

def frame_map(gt, detections, labelmap, excluded=frozenset(), iou_threshold=IOU_THRESHOLD):
    """Rows of the ground truth and of scored detections -> (mean AP, {class id: AP}), in [0, 1].

    Only classes of the label map count, and excluded keyframes count for neither side. Per class
    and keyframe, detections (best first) take the ground-truth box they overlap most; a hit needs
    IoU >= iou_threshold and a box not taken yet, so a duplicate is a false positive, and so is a
    detection on a keyframe without that class. A class without ground truth gets nan and stays out
    of the mean."""
    groups = ({}, {})  # class -> keyframe -> boxes / (score, box)
    for rows, out in zip((gt, detections), groups):
        for r in rows:
            if r.action in labelmap and (r.video, r.ts) not in excluded:
                out.setdefault(r.action, {}).setdefault((r.video, r.ts), []).append(r)
    aps = {}
    for c in labelmap:
        truth, found = groups[0].get(c, {}), groups[1].get(c, {})
        num_gt = sum(map(len, truth.values()))
        if num_gt == 0:
            aps[c] = float('nan')
            continue
        scores, hits = [], []
        for key, dets in found.items():
            dets = sorted(dets, key=lambda r: -r.score)
            boxes = np.array([r.box for r in truth.get(key, [])]).reshape(-1, 4)
            overlap = box_iou(np.array([r.box for r in dets]), boxes)  # [n_det, n_gt]
            taken = np.zeros(len(boxes), dtype=bool)
            for r, o in zip(dets, overlap):
                j = int(o.argmax()) if len(boxes) else -1
                hit = j >= 0 and o[j] >= iou_threshold and not taken[j]
                if hit:
                    taken[j] = True
                scores.append(r.score)
                hits.append(hit)
        order = np.argsort(-np.array(scores), kind='stable')
        aps[c] = average_precision(np.array(hits, dtype=bool)[order], num_gt)
    scored = [v for v in aps.values() if not np.isnan(v)]
    return (float(np.mean(scored)) if scored else float('nan')), aps

def evaluate_files(labelmap, groundtruth, detections, exclusions=None, iou_threshold=IOU_THRESHOLD):
    """`python -m tasks.ava map`: frame-mAP of a detections CSV; prints the per-class AP, the
    mean, and what matched nothing (rows of classes outside the label map, detections on keyframes
    without ground truth, exclusions of unknown videos) -> {'mAP': %, 'AP': {name: %}, ...}."""
    names = read_labelmap(labelmap)
    (gt, bad_gt), (dets, bad_dets) = read_csv(groundtruth, what='ground truth'), \
        read_csv(detections, with_score=True, what='detections')
    excluded = read_exclusions(exclusions) if exclusions else set()
    mean, aps = frame_map(gt, dets, names, excluded, iou_threshold)
    for c, ap in aps.items():
        print(f'{c:3d} {names[c]:50s} {"no ground truth" if np.isnan(ap) else f"{100 * ap:6.2f}"}')
    scored = sum(not np.isnan(ap) for ap in aps.values())
    keyframes = {(r.video, r.ts) for r in gt}
    videos = {r.video for r in gt}
    unmatched = {
        'ground-truth rows of a class outside the label map': sum(r.action not in names
                                                                  for r in gt),
        'detection rows of a class outside the label map': sum(r.action not in names for r in dets),
        'detection rows on keyframes without ground truth': sum((r.video, r.ts) not in keyframes
                                                                for r in dets),
        'excluded keyframes of videos not in the ground truth': sum(v not in videos
                                                                    for v, _ in excluded),
        'boxes outside the frame, skipped': bad_gt + bad_dets}
    for what, count in unmatched.items():
        if count:
            print(f'{count} {what}')
    print(f'frame-mAP@{iou_threshold}IoU {100 * mean:.2f} over {scored} classes with ground truth '
          f'(label map: {len(names)}); {len(dets)} detections, {len(excluded)} excluded keyframes')
    if scored == 0:
        fail(f'no class of {labelmap} has a ground-truth row in {groundtruth}: the action ids do '
             'not match')
    return {'mAP': round(100 * mean, 2),
            'AP': {names[c]: round(100 * ap, 2) for c, ap in aps.items()},
            'classes_scored': scored, 'unmatched': unmatched}

# ----------------------------------------------------------------------------------------------
# Boxes, in pixels of the clip (continuous coordinates: x2 is the right edge)

def clip_boxes(boxes, width, height):
    """[R, 4] -> inside the image and at least 1 pixel wide and tall."""
    x1, y1 = boxes[:, 0].clip(0, width - 1), boxes[:, 1].clip(0, height - 1)
    x2 = np.maximum(boxes[:, 2].clip(max=width), x1 + 1)
    y2 = np.maximum(boxes[:, 3].clip(max=height), y1 + 1)
    return np.stack([x1, y1, x2, y2], 1)

def jitter_boxes(boxes, width, height, rng, amounts=JITTER):
    """The official training-box jitter (random_aug): each side moves independently (JITTER), then
    clip_boxes."""
    x_out, x_in, y_out, y_in = amounts
    w, h, R = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1], len(boxes)
    move = np.stack([w * rng.uniform(-x_out, x_in, R), h * rng.uniform(-y_out, y_in, R),
                     w * rng.uniform(-x_in, x_out, R), h * rng.uniform(-y_in, y_out, R)], 1)
    return clip_boxes(boxes + move, width, height)

def extend_boxes(boxes, width, height, amounts=EXTEND):
    """Test boxes pool a little context (official extend((0.1, 0.05))): width + 10%, height + 5%,
    same centre."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    pad = np.stack([w * amounts[0] / 2, h * amounts[1] / 2], 1)                          # [R, 2]
    return clip_boxes(boxes + np.concatenate([-pad, pad], 1), width, height)

# ----------------------------------------------------------------------------------------------
# Keyframes: a clip of T frames around each, and its person boxes

# the official clips: AlphAction's 25 fps, a 300-frame span around the keyframe
OFFICIAL_FPS, OFFICIAL_SPAN = 25, 300

def clip_times(num_frames, stride):
    """Seconds from the keyframe to each of the T frames, as the official code takes them: in its
    25 fps clips, a span of 300 frames with the keyframe at 150, TemporalCrop(T, s, sparse) from
    (300 - T s) // 2 + (s - 1) // 2 on, every s = stride x 25 frames (T = 8, s = 8: -29, -21, ...,
    +27 frames: 1 frame early of centred, an official quirk)."""
    s = round(stride * OFFICIAL_FPS)
    first = (OFFICIAL_SPAN - num_frames * s) // 2 + (s - 1) // 2 - OFFICIAL_SPAN // 2
    return (first + s * np.arange(num_frames)) / OFFICIAL_FPS

class Keyframes(data.RobustDataset):
    """One item per keyframe (video_id, timestamp): T frames `stride` seconds apart, centred on it,
    and its boxes.

    train: ground-truth boxes with multi-hot labels; short side -> short_side, a random crop x crop
    (boxes left with no part inside are dropped), flip, box jitter. test: detected person boxes
    with their scores, the whole resized frame, boxes extended. Keyframes of missing movies are
    left out and listed in .missing; an action id outside 1 .. num_classes in training is an error;
    a timestamp beyond its movie or more than max_boxes boxes make the item bad (replaced in
    training, counted). -> {'video' [3, T, H, W], 'boxes' [M, 4] pixels of the video, 'source' [M,
    4] the normalized boxes, 'labels' [M, C], 'scores' [M], 'num_boxes'}, rows past num_boxes zero.
    """

    def __init__(self, rows, movie_root, mode, num_classes, num_frames=8, stride=0.32,
                 short_side=256, crop=224, flip=True, movie_start=900, max_boxes=100,
                 max_bad_fraction=0.05, threads=1):
        assert mode in ('train', 'test')
        if not os.path.isdir(movie_root):
            fail(f'movie folder {movie_root!r} not found: MOVIE_ROOT holds <video_id>.<ext> files')
        files = {os.path.splitext(f)[0]: os.path.join(movie_root, f)
                 for f in sorted(os.listdir(movie_root))}
        groups = {}  # keyframe -> box -> [actions, score]
        for r in rows:
            if mode == 'train' and not (r.action and 1 <= r.action <= num_classes):
                fail(f'action id {r.action} (video {r.video}, timestamp {r.ts}) is outside 1 .. '
                     f'{num_classes}: check the file, or NUM_CLASSES')
            person = groups.setdefault((r.video, r.ts), {}).setdefault(r.box, [set(), 0.0])
            person[0].add(r.action)
            person[1] = max(person[1], r.score)
        self.missing = sorted({v for v, _ in groups} - set(files))
        self.keys = [k for k in sorted(groups) if k[0] in files]
        self.people = [groups[k] for k in self.keys]
        self.mode, self.num_classes = mode, num_classes
        self.num_frames, self.stride = num_frames, stride
        self.short_side, self.crop, self.flip = short_side, crop, flip
        self.movie_start = movie_start
        self.max_boxes, self.threads, self.fps = max_boxes, threads, {}
        super().__init__([files[v] for v, _ in self.keys], max_bad_fraction)

    def frames(self, i):
        """uint8 [T, H0, W0, 3]: frame round((t - movie_start) x fps) at the times t of clip_times
        (the official)."""
        (_, ts), path = self.keys[i], self.paths[i]
        if path not in self.fps:  # one look per movie and worker
            with av.open(path) as c:
                rate = c.streams.video[0].average_rate if c.streams.video else None
            if not rate:
                raise ValueError(f'{path}: no video stream with a frame rate')
            self.fps[path] = float(rate)
        fps = self.fps[path]
        key = round((ts - self.movie_start) * fps)
        times = ts - self.movie_start + clip_times(self.num_frames, self.stride)

        def indices(n):  # near either end of the file the edge frame repeats
            if not 0 <= key < n:
                raise ValueError(f'timestamp {ts} is frame {key}, outside the {n} frames of {path} '
                                 f'({fps:g} fps, starting at second {self.movie_start} of the '
                                 'movie)')
            return np.clip(np.round(times * fps).astype(int), 0, n - 1)
        return data.read_frames(path, indices, self.threads)

    def load(self, i, rng):
        people = self.people[i]
        if len(people) > self.max_boxes:
            raise ValueError(f'{len(people)} boxes at {self.keys[i]}, more than '
                             f'max_boxes={self.max_boxes}')
        clip = torch.from_numpy(self.frames(i)).permute(0, 3, 1, 2)  # [T, 3, H0, W0] uint8
        H0, W0 = clip.shape[-2:]
        H, W = round(H0 * self.short_side / min(H0, W0)), round(W0 * self.short_side / min(H0, W0))
        # uint8 (official: cv2 on uint8)
        clip = TF.resize(clip, [H, W], InterpolationMode.BILINEAR, antialias=True)
        source = np.array(list(people), dtype=np.float32).reshape(-1, 4)         # [R, 4] normalized
        # [R, C] multi-hot, ids 1.. -> 0..
        labels = np.zeros((len(people), self.num_classes), dtype=np.float32)
        for r, (actions, _) in enumerate(people.values()):
            labels[r, [a - 1 for a in actions if a and a <= self.num_classes]] = 1
        scores = np.array([s for _, s in people.values()], dtype=np.float32)   # [R]
        boxes = source * np.array([W, H, W, H], dtype=np.float32)               # [R, 4] pixels
        if self.mode == 'train':
            S = self.crop
            y0, x0 = int(rng.integers(H - S + 1)), int(rng.integers(W - S + 1))
            clip = clip[..., y0:y0 + S, x0:x0 + S]
            boxes = boxes - np.array([x0, y0, x0, y0], dtype=np.float32)
            inside = (boxes[:, 0] < S) & (boxes[:, 2] > 0) & (boxes[:, 1] < S) & (boxes[:, 3] > 0)
            boxes, source, labels, scores = (a[inside] for a in (boxes, source, labels, scores))
            boxes = clip_boxes(boxes, S, S)
            if self.flip and rng.random() < 0.5:
                clip = clip.flip(-1)
                boxes = np.stack([S - boxes[:, 2], boxes[:, 1], S - boxes[:, 0], boxes[:, 3]], 1)
            # the labels stay those of the un-jittered box (official)
            boxes = jitter_boxes(boxes, S, S, rng)
        else:
            boxes = extend_boxes(boxes, W, H)
        video = clip.permute(1, 0, 2, 3)  # [3, T, H, W] uint8, as every dataset

        # [R, ...] -> [M, ...]: a fixed size, so the default collate can stack keyframes
        def pad(a):
            out = torch.zeros(self.max_boxes, *a.shape[1:])
            out[:len(a)] = torch.from_numpy(np.asarray(a, dtype=np.float32))
            return out
        return {'video': video.contiguous(), 'boxes': pad(boxes), 'source': pad(source),
                'labels': pad(labels), 'scores': pad(scores), 'num_boxes': len(boxes)}

def collate(items, multiple):
    """Test batches: clips of different sizes padded at the bottom and right to the largest,
    rounded up to a multiple of the patch size (official), so pixel boxes keep their meaning;
    'sizes' [B, 2] says what is real (normalize_padded sets the rest to 0 = the mean colour after
    normalization, as the official)."""
    H, W = (-(-max(it['video'].shape[d] for it in items) // multiple) * multiple for d in (2, 3))
    # [B, 3, T, H, W]
    video = items[0]['video'].new_zeros(len(items), 3, items[0]['video'].shape[1], H, W)
    for b, it in enumerate(items):
        video[b, :, :, :it['video'].shape[2], :it['video'].shape[3]] = it['video']
    rest = [{k: v for k, v in it.items() if k != 'video'} for it in items]
    batch = torch.utils.data.default_collate(rest)
    return dict(batch, video=video, sizes=torch.tensor([it['video'].shape[2:] for it in items]))

def normalize_padded(video, sizes):
    """uint8 [B, 3, T, H, W] (on the device), sizes [B, 2] -> data.normalize(video) with the
    padding at 0."""
    H, W = video.shape[-2:]
    sizes = sizes.to(video.device)
    rows = torch.arange(H, device=video.device)[None, :, None] < sizes[:, :1, None]   # [B, H, 1]
    columns = torch.arange(W, device=video.device)[None, None, :] < sizes[:, 1:, None]  # [B, 1, W]
    real = rows & columns                                                              # [B, H, W]
    return data.normalize(video) * real[:, None, None]

def rois(batch):
    """A batch -> (rois [R, 5] = (clip in the batch, x1, y1, x2, y2), labels [R, C], valid [B, M]):
    its real boxes."""
    valid = torch.arange(batch['boxes'].shape[1]) < batch['num_boxes'][:, None]         # [B, M]
    clip = torch.arange(len(valid))[:, None].expand_as(valid)                            # [B, M]
    boxes = torch.cat([clip[valid][:, None].float(), batch['boxes'][valid]], 1)     # [R, 5]
    return boxes, batch['labels'][valid], valid

# ----------------------------------------------------------------------------------------------
# The model

class ActionDetector(nn.Module):
    """The official AVA model: all tokens -> final norm -> mean over time -> RoIAlign 7 x 7 on each
    person box -> max over the bins -> Linear over the classes (no fc_norm, no dropout).

    Training clips are CROP x CROP, test clips whole frames of any size: the position table, built
    for the training grid, is resized bicubically per frame to the clip's grid (official).
    VideoViT.forward cannot do that (it would read a longer 1-D table, another layout), so
    features() runs the backbone's modules itself. The final norm and the head are new (the
    official run starts from a classifier, whose fc_norm does not fit)."""

    def __init__(self, backbone, num_classes, init_scale=0.001, aligned=True):
        super().__init__()
        if len(backbone.clip_decoder):
            raise ValueError('the backbone has alignment heads; build it with align_layers=0')
        D = backbone.config.embed_dim
        self.backbone, self.aligned = backbone, aligned
        # replaced by self.norm (an unused parameter would upset DDP)
        self.backbone.norm = nn.Identity()
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.head = nn.Linear(D, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        with torch.no_grad():  # small logits at the start (official init_scale 0.001)
            self.head.weight.mul_(init_scale)
            self.head.bias.zero_()

    def features(self, video):
        """video [B, 3, T, H, W] -> feature map [B, D, h, w]: normed tokens averaged over time."""
        bb, c = self.backbone, self.backbone.config
        t, h, w = bb.grid(video)
        t0, s0 = c.num_frames // c.tubelet_size, c.img_size // c.patch_size
        if t != t0:
            raise ValueError(f'{video.shape[2]} frames, but the position table is built for '
                             f'{c.num_frames}')
        B, D = video.shape[0], c.embed_dim
        pos = bb.pos_embed  # [t0 * s0 * s0, D]
        if (h, w) != (s0, s0):
            pos = pos.view(t0, s0, s0, D).permute(0, 3, 1, 2)  # [t, D, s0, s0]
            # [t, D, h, w]
            pos = F.interpolate(pos, size=(h, w), mode='bicubic', align_corners=False)
            pos = pos.permute(0, 2, 3, 1).reshape(t * h * w, D)  # [N, D], (t, h, w) order
        x = bb.patch_embed.proj(video).flatten(2).transpose(1, 2)  # [B, N, D]
        x = x + pos.to(x.dtype)
        for blk in bb.blocks:
            x = blk(x)
        x = self.norm(x)  # [B, N, D]
        return x.view(B, t, h, w, D).mean(1).permute(0, 3, 1, 2)  # [B, D, h, w]

    def pool(self, feat, rois):
        """feat [B, D, h, w], rois [R, 5] in pixels -> [R, D]. spatial_scale = 1 / patch maps
        pixels to tokens. aligned=True (torchvision's pixel model) samples a box's own area; the
        official aligned=False samples the area half a patch to the right and below it."""
        p = self.backbone.config.patch_size
        out = roi_align(feat, rois.to(feat.dtype), ROI_SIZE, spatial_scale=1 / p, sampling_ratio=0,
                        aligned=self.aligned)  # [R, D, 7, 7]
        return out.amax(dim=(2, 3))                                                       # [R, D]

    def forward(self, video, rois):
        """video [B, 3, T, H, W], rois [R, 5] = (clip index, x1, y1, x2, y2) in pixels of `video`
        -> logits [R, C]."""
        return self.head(self.pool(self.features(video), rois))

# ----------------------------------------------------------------------------------------------
# Testing: detections in the AVA format

@torch.no_grad()
def write_detections(model, dataset, path, device, batch, workers, ctx):
    """Every class of every test box, score = sigmoid(logit) x detector score (official), as AVA
    CSV rows of the un-extended box -> path. Each rank does its share of the keyframes, rank 0
    joins the parts. Returns this rank's keyframes that could not be read (they get no rows)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    share = list(range(rank, len(dataset), world))
    collate_fn = partial(collate, multiple=model.backbone.config.patch_size)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, share), batch,
                                         num_workers=workers, collate_fn=collate_fn)
    was_training, unread = model.training, []
    model.eval()
    with open(f'{path}.part{rank}', 'w') as f:
        for start, b in zip(range(0, len(share), batch), loader):
            # a bad keyframe comes back as another one
            replaced = (b['skipped'] > 0).nonzero().flatten().tolist()
            unread += [dataset.keys[share[start + j]] for j in replaced]
            b['num_boxes'][replaced] = 0
            boxes, _, valid = rois(b)
            if len(boxes) == 0:
                continue
            with ctx:
                # [B, 3, T, H, W]
                video = normalize_padded(b['video'].to(device, non_blocking=True), b['sizes'])
                logits = model(video, boxes.to(device))  # [R, C]
            scores = logits.float().sigmoid().cpu() * b['scores'][valid][:, None]  # [R, C]
            clips = boxes[:, 0].long().tolist()
            for clip, box, s in zip(clips, b['source'][valid].tolist(), scores.tolist()):
                video_id, ts = dataset.keys[int(b['index'][clip])]
                where = f'{video_id},{ts:04d},' + ','.join(f'{v:.4f}' for v in box)
                f.writelines(f'{where},{c + 1},{v:.6f}\n' for c, v in enumerate(s))
    model.train(was_training)
    if world > 1:
        dist.barrier()
    if rank == 0:
        with open(path, 'w') as out:
            for r in range(world):
                with open(f'{path}.part{r}') as part:
                    shutil.copyfileobj(part, out)       # in pieces: AVA val gives millions of rows
                os.remove(f'{path}.part{r}')
    return unread

# ----------------------------------------------------------------------------------------------
# The synthetic demo: squares that move up, move down or stand still, several per clip

DEMO_ACTIONS = {1: 'move up', 2: 'move down', 3: 'stand still'}
# each movie: 3 s from second 900, keyframes 901, 902
DEMO_FPS, DEMO_SECONDS, DEMO_H, DEMO_W = 10, 3, 96, 160
DEMO_SPEED = 24  # pixels per second: 29 px over a 1.2 s demo clip
DEMO_MARKER = '.umt_demo_ava'  # in the demo folder: make_demo may write there again
DEMO_PALETTE = [(225, 45, 40), (40, 185, 60), (45, 95, 235), (235, 205, 40), (150, 60, 200),
                (240, 140, 30)]  # the squares' colours

def _demo_movie(rng):
    """Frames [30, 96, 160, 3] uint8 and, per square, (action id, boxes [30, 4] normalized). 2 or 3
    squares, each in its own third of the width, so boxes never overlap."""
    n, (yy, xx) = DEMO_FPS * DEMO_SECONDS, np.mgrid[:DEMO_H, :DEMO_W]
    bg = rng.integers(80, 160) + rng.normal(0, 10, (DEMO_H, DEMO_W, 1))
    bg = np.clip(bg, 0, 255).repeat(3, 2)
    frames, tracks = np.repeat(bg[None], n, 0).astype(np.uint8), []
    for lane in rng.permutation(3)[:rng.integers(2, 4)]:
        r, action = int(rng.integers(8, 13)), int(rng.integers(1, 4))
        x = rng.uniform(lane * DEMO_W / 3 + r, (lane + 1) * DEMO_W / 3 - r)
        v = {1: -DEMO_SPEED, 2: DEMO_SPEED, 3: 0}[action]
        # stays in the frame
        y0 = rng.uniform(r + max(-v, 0) * DEMO_SECONDS, DEMO_H - r - max(v, 0) * DEMO_SECONDS)
        ys = y0 + v * np.arange(n) / DEMO_FPS
        color = DEMO_PALETTE[rng.integers(len(DEMO_PALETTE))]
        for f, y in enumerate(ys):
            frames[f][(np.abs(yy - y) <= r) & (np.abs(xx - x) <= r)] = color
        boxes = np.stack([np.full(n, x - r) / DEMO_W, (ys - r) / DEMO_H, np.full(n, x + r) / DEMO_W,
                          (ys + r) / DEMO_H], 1)
        tracks.append((action, boxes.clip(0, 1)))
    return frames, tracks

def make_demo(out_dir, train_movies=96, val_movies=24, seed=0):
    """DIR/movies/*.mp4, train.csv and val.csv (ground truth), val_detections.csv (noisy person
    boxes with scores: some missed, some false, some below the 0.8 threshold), labelmap.pbtxt,
    val_excluded.csv (one keyframe). out_dir must be new, empty or an earlier AVA demo set (its
    DEMO_MARKER file)."""
    training.claim_folder(out_dir, DEMO_MARKER, 'the AVA demo')
    rng = np.random.default_rng(seed)
    os.makedirs(f'{out_dir}/movies', exist_ok=True)
    csv = {'train': [], 'val': [], 'val_detections': [], 'val_excluded': ['demo_val_00,0902']}
    row = lambda name, ts, box, rest: f'{name},{ts:04d},' + ','.join(f'{v:.3f}' for v in box) + rest
    for split, count in (('train', train_movies), ('val', val_movies)):
        for m in range(count):
            name, (frames, tracks) = f'demo_{split}_{m:02d}', _demo_movie(rng)
            data.write_video(f'{out_dir}/movies/{name}.mp4', frames, fps=DEMO_FPS,
                             options={'preset': 'veryfast', 'crf': '20'}, exact=True)
            for ts in range(901, 900 + DEMO_SECONDS):
                for person, (action, boxes) in enumerate(tracks):
                    box = boxes[(ts - 900) * DEMO_FPS]
                    csv[split].append(row(name, ts, box, f',{action},{person}'))
                    if split == 'val' and rng.random() > 0.1:  # the detector misses 10%
                        w, h = box[2] - box[0], box[3] - box[1]
                        noisy = (box + rng.normal(0, 0.04, 4) * [w, h, w, h]).clip(0, 1)
                        score = f',,{rng.uniform(0.85, 1.0):.3f}'
                        csv['val_detections'].append(row(name, ts, noisy, score))
                if split == 'val':  # a false box, often above 0.8
                    x, y = rng.uniform(0, 0.85), rng.uniform(0, 0.75)
                    csv['val_detections'].append(row(name, ts, (x, y, x + 0.15, y + 0.25),
                                                     f',,{rng.uniform(0.5, 0.95):.3f}'))
    for part, lines in csv.items():
        open(f'{out_dir}/{part}.csv', 'w').write('\n'.join(lines) + '\n')
    open(f'{out_dir}/labelmap.pbtxt', 'w').writelines(
        f'label {{\n  name: "{name}"\n  label_id: {i}\n  label_type: PERSON_MOVEMENT\n}}\n'
        for i, name in DEMO_ACTIONS.items())

def main(argv=None):
    short_errors()
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest='command', required=True)
    d = sub.add_parser('demo', help='write the synthetic AVA-style demo set')
    d.add_argument('folder', help='a new folder for the demo set')
    m = sub.add_parser('map', help='frame-mAP of AVA detections (spatiotemporal localization)')
    m.add_argument('--labelmap', required=True, help='.pbtxt label map: the classes scored')
    m.add_argument('--groundtruth', required=True, help='CSV of video_id, timestamp, x1, y1, x2, '
                   'y2, action_id, ...')
    m.add_argument('--detections', required=True, help='CSV of video_id, timestamp, x1, y1, x2, '
                   'y2, action_id, score')
    m.add_argument('--exclusions', default=None, help='CSV of video_id, timestamp: keyframes left '
                   'out')
    m.add_argument('--out', default=None, help='write the results here (JSON, a new file)')
    args = ap.parse_args(argv)
    if args.command == 'demo':
        make_demo(args.folder)
        print(f'wrote the AVA demo set to {args.folder}/')
        return None
    if args.out:
        new_output(args.out)
    results = evaluate_files(args.labelmap, args.groundtruth, args.detections, args.exclusions)
    if args.out:
        json.dump(results, open(args.out, 'w'), indent=1)
        print(f'wrote {args.out}')
    return results

if __name__ == '__main__':
    main()
