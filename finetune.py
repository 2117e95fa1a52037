"""
Action-recognition fine-tuning of the UMT student, with the paper's protocol (paper section 4.1).

The stage-1 model (or a stage-2 one, or an official UMT checkpoint) gets a classifier over all its
tokens (mean pool -> fc_norm -> dropout -> head, REFERENCE 3.2) and is trained end to end with the
official recipe: AdamW with layer-wise learning-rate decay, warmup + cosine per iteration, stochastic
depth, label smoothing, mixup / cutmix, repeated augmentation, RandAugment, random-resized crops, flips
and random erasing. Every epoch is validated on 1 clip x 1 crop; the final test averages the softmax over
clips x crops (4 x 3 on Kinetics, 2 x 3 on Something-Something v2).

    # 1. K710 fine-tuning of the stage-1 model (UMT-B/16) on 8 GPUs: 16 videos x 8 GPUs x 2 accumulation
    #    steps = the paper's 256 videos per step on 16 GPUs
    torchrun --standalone --nproc_per_node=8 finetune.py --init=out/stage1/last.pt --data_root=/data/k710
    # 2. K400 from the K710 model: the paper's route to 87.4% top-1
    torchrun --standalone --nproc_per_node=8 finetune.py --preset=k400_b16 --data_root=/data/k400
    python finetune.py --preset=ssv2_b16 --init=umt_b16_stage1.pth     # one GPU, from an official checkpoint
    python train_stage1.py --preset=demo && python finetune.py --preset=demo     # CPU, a few minutes

Launch the same command again after a crash: the run resumes from OUT_DIR/last.pt.
"""

import dataclasses
import math
import os
import pickle
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common
import data
from evaluate import multiview_average
from model import VideoClassifier, VideoViT, VideoViTConfig, load_official, load_strict, unwrap_state_dict

# ----------------------------------------------------------------------------------------------
# Configuration: the paper's K710 fine-tuning of UMT-B/16 (REFERENCE 3.2); --preset=NAME, --name=value

# starting point and data
INIT = 'out/stage1/last.pt'        # ours (stage 1, stage 2, fine-tuned) or an official UMT .pth (any of those three)
TRAIN_LIST = 'data/k710_train.csv'  # `path,label` per line (comma, space or tab), labels 0 .. NUM_CLASSES-1
VAL_LIST = 'data/k710_val.csv'     # validated every epoch (1 clip x 1 crop) and tested at the end (multi-view)
DATA_ROOT = ''                     # folder the lists' relative paths start from
MAKE_DEMO = False                  # write the synthetic demo set into DATA_ROOT if the lists are missing (demo)
NUM_CLASSES = 710                  # K710: 710, K400: 400, SSv2: 174
NUM_FRAMES = 8                     # T (paper: 8; 16 for the 16-frame L/16); the sin-cos table follows T and S
IMG_SIZE = 224                     # S (paper: 224)
NUM_WORKERS = 10                   # decoding processes per GPU
DECODE_THREADS = 1                 # PyAV threads per worker
MAX_BAD_FRACTION = 0.05            # stop when more than this fraction of the videos cannot be decoded
# augmentation and targets
NUM_SAMPLE = 2                     # repeated augmentation: clips cut from each decoded video (paper: 2)
RRC_SCALE = (0.08, 1.0)            # random-resized-crop area fraction, aspect 3/4 - 4/3 (paper: 0.08 - 1)
FLIP = True                        # random horizontal flip (paper: yes; no for SSv2, where left/right is the label)
RAND_AUGMENT = (4, 7, 0.5)         # RandAugment (ops, magnitude, std), 'inc1' ops; None = off (paper: m7-n4-mstd0.5)
RANDOM_ERASE = 0.25                # chance that a frame gets one box of noise, 0 = off (paper: 0.25, pixel mode)
LABEL_SMOOTHING = 0.1              # paper: 0.1
MIXUP = 0.8                        # mixup Beta(alpha, alpha), 0 = off (paper: 0.8)
CUTMIX = 1.0                       # cutmix Beta(alpha, alpha), 0 = off (paper: 1.0)
MIX_SWITCH_PROB = 0.5              # chance a batch gets cutmix rather than mixup when both are on (paper: 0.5)
# model
DROP_PATH = 0.1                    # stochastic depth of the last block, linear from 0 (paper: 0.1 B, 0.2 L)
HEAD_DROPOUT = 0.0                 # dropout before the head (paper: 0)
INIT_SCALE = 0.001                 # a new head starts at trunc-normal(0.02) x this: tiny logits at step 0 (paper)
CHECKPOINT_BLOCKS = 0              # activation checkpointing of the first N blocks: less memory, more compute
# optimization
TOTAL_BATCH = 256                  # videos per optimizer step over all GPUs (paper: 16 GPUs x 16); clips = x NUM_SAMPLE
MICRO_BATCH = 16                   # videos per GPU per forward; accumulation makes up the rest (paper: 16)
BASE_LR = 2e-4                     # peak lr = BASE_LR x TOTAL_BATCH x NUM_SAMPLE / 256 (paper: K710 B 2e-4 -> 4e-4)
WARMUP_LR = 1e-6                   # warmup starts here, scaled like BASE_LR (paper: 1e-6)
MIN_LR = 1e-6                      # cosine floor, scaled like BASE_LR (paper: 1e-6)
WARMUP_EPOCHS = 2                  # linear warmup, per iteration (paper: K710 2, K400 1, SSv2 B 5)
EPOCHS = 35                        # paper: K710 B 35, K400 5, SSv2 B 30
LAYER_DECAY = 0.75                 # lr x decay^(depth + 1 - layer), patch embedding = layer 0 (paper: 0.75 B, 0.85 L)
WEIGHT_DECAY = 0.05                # AdamW, none on biases and norms (paper: 0.05)
BETAS = (0.9, 0.999)               # AdamW betas (paper: 0.9, 0.999)
GRAD_CLIP = None                   # max gradient norm; None = no clipping, the norm is only logged (paper: None)
MAX_BAD_STEPS = 5                  # a non-finite loss skips the step; this many in a row stop the run
# evaluation
TEST_CLIPS = 4                     # final test: clips per video (paper: 4 Kinetics, 2 SSv2)
TEST_CROPS = 3                     # final test: crops per clip, 3 = left/center/right or 1 = center (paper: 3)
# system
DEVICE = 'auto'                    # 'auto' = the GPU when there is one; 'cpu' forces the CPU
DTYPE = 'auto'                     # 'auto' = bf16 on recent GPUs, fp16 + loss scaling on older ones, fp32 on CPU
COMPILE = True                     # torch.compile the classifier (every clip has all its tokens: static shapes)
SEED = 0                           # new head, data order, augmentation, mixup, stochastic depth
LOG_INTERVAL = 20                  # steps between log lines (each costs a host sync)
CKPT_INTERVAL = 500                # steps between checkpoints; one is also written after every epoch's validation
OUT_DIR = 'out/k710_b16'           # last.pt and log.jsonl
# test knobs
MAX_STEPS = None                   # stop after this step without a final checkpoint, as if killed (resume test)
NAN_STEPS = ()                     # steps whose loss is made NaN (the skip test)

PRESETS = {
    'k710_b16': {},
    'k400_b16': {'INIT': 'out/k710_b16/last.pt', 'TRAIN_LIST': 'data/k400_train.csv', 'VAL_LIST': 'data/k400_val.csv',
                 'NUM_CLASSES': 400, 'BASE_LR': 2e-5, 'EPOCHS': 5, 'WARMUP_EPOCHS': 1, 'OUT_DIR': 'out/k400_b16'},
    'ssv2_b16': {'TRAIN_LIST': 'data/ssv2_train.csv', 'VAL_LIST': 'data/ssv2_val.csv', 'NUM_CLASSES': 174,
                 'FLIP': False, 'EPOCHS': 30, 'WARMUP_EPOCHS': 5, 'TEST_CLIPS': 2, 'OUT_DIR': 'out/ssv2_b16'},
    'k710_l16': {'INIT': 'out/stage1_l16/last.pt', 'BASE_LR': 1e-4, 'LAYER_DECAY': 0.85, 'DROP_PATH': 0.2,
                 'EPOCHS': 20, 'OUT_DIR': 'out/k710_l16'},
    'k400_l16': {'INIT': 'out/k710_l16/last.pt', 'TRAIN_LIST': 'data/k400_train.csv', 'VAL_LIST': 'data/k400_val.csv',
                 'NUM_CLASSES': 400, 'BASE_LR': 1e-5, 'LAYER_DECAY': 0.85, 'DROP_PATH': 0.2, 'EPOCHS': 5,
                 'WARMUP_EPOCHS': 1, 'OUT_DIR': 'out/k400_l16'},
    'ssv2_l16': {'INIT': 'out/stage1_l16/last.pt', 'TRAIN_LIST': 'data/ssv2_train.csv', 'VAL_LIST': 'data/ssv2_val.csv',
                 'NUM_CLASSES': 174, 'FLIP': False, 'BASE_LR': 4e-4, 'LAYER_DECAY': 0.85, 'DROP_PATH': 0.2,
                 'EPOCHS': 14, 'WARMUP_EPOCHS': 4, 'TEST_CLIPS': 2, 'OUT_DIR': 'out/ssv2_l16'},
    # CPU demo: the tiny stage-1 demo model on the synthetic classes (color x up / down motion; the
    # horizontal flip keeps those labels true). With 96 training videos, mixup / cutmix, RandAugment, erasing and
    # small crops only slow learning down within the few hundred steps a demo can afford, so they are off; a 4-block
    # model has no deep stack of general features to protect, so no layer decay either.
    'demo': {'INIT': 'out/demo_stage1/last.pt', 'TRAIN_LIST': 'demo_data/train.csv', 'VAL_LIST': 'demo_data/val.csv',
             'DATA_ROOT': 'demo_data', 'MAKE_DEMO': True, 'NUM_CLASSES': 8, 'NUM_FRAMES': 4, 'IMG_SIZE': 64,
             'RRC_SCALE': (0.4, 1.0), 'MIXUP': 0.0, 'CUTMIX': 0.0, 'RAND_AUGMENT': None, 'RANDOM_ERASE': 0.0,
             'DROP_PATH': 0.0, 'LAYER_DECAY': 1.0,
             'TOTAL_BATCH': 16, 'MICRO_BATCH': 16, 'BASE_LR': 2.4e-3, 'EPOCHS': 60, 'WARMUP_EPOCHS': 5,
             'TEST_CLIPS': 2, 'COMPILE': False, 'NUM_WORKERS': 1, 'LOG_INTERVAL': 30, 'CKPT_INTERVAL': 100,
             'OUT_DIR': 'out/demo_finetune'},
}


# ----------------------------------------------------------------------------------------------
# The pieces of the recipe (the tests call these directly)


def lr_scale_fn(depth, decay):
    """name -> lr multiplier decay^(depth + 1 - layer), with the patch embedding at layer 0, block i at layer
    i + 1, fc_norm and head at depth + 1 (full lr): the early layers, which hold the most general
    pre-trained features, move least (UMT-B: 0.75^13 = 0.024 for the patch embedding)."""
    def layer(name):
        if name.startswith('backbone.patch_embed.'):
            return 0
        return int(name.split('.')[2]) + 1 if name.startswith('backbone.blocks.') else depth + 1
    return lambda name: decay ** (depth + 1 - layer(name))


def mixup_cutmix(video, target, rng, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5):
    """Batch-mode mixup / cutmix: video [B, 3, T, H, W], target [B, num_classes] soft -> (video, target) mixed.

    One coin flip picks cutmix (probability switch_prob) or mixup for the whole batch, one
    lam ~ Beta(alpha, alpha) for the whole batch, and sample b is mixed with sample B-1-b (the batch
    reversed, as timm). Cutmix pastes one box, the same on every frame, and lam becomes the exact
    kept area. Targets mix with the same lam, so rows still sum to 1. rng: np.random.Generator.
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return video, target
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if use_cutmix else rng.beta(mixup_alpha, mixup_alpha))
    partner = video.flip(0)                                        # [B, 3, T, H, W], sample B-1-b
    if use_cutmix:
        H, W = video.shape[-2:]
        cut_h, cut_w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))  # box of area (1 - lam) H W
        cy, cx = rng.integers(H), rng.integers(W)                  # box center, anywhere; the box is clipped
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
        video = video.clone()
        video[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)                  # the real share left after clipping
    else:
        video = video * lam + partner * (1 - lam)
    return video, target * lam + target.flip(0) * (1 - lam)


def smooth_one_hot(label, num_classes, smoothing):
    """[B] class ids -> [B, C] targets: 1 - smoothing + smoothing / C on the label, smoothing / C elsewhere."""
    off = smoothing / num_classes
    target = torch.full((len(label), num_classes), off, device=label.device)
    return target.scatter_(1, label[:, None], 1 - smoothing + off)


class RepeatedAugClassification(data.VideoClassification):
    """Training set with repeated augmentation: each video is decoded once (one set of TSN frames) and gives
    num_sample clips, each with its own RandAugment, random-resized crop, flip and random erasing (in this order,
    as the official pipeline) -> video [num_sample, 3, T, S, S]. Decoding is the expensive part, so this doubles
    the clips per second of I/O (the official num_sample)."""

    def __init__(self, *args, num_sample=2, rrc_scale=(0.08, 1.0), rand_augment=None, erase_prob=0.0, **kw):
        super().__init__(*args, mode='train', **kw)
        self.num_sample, self.rrc_scale = num_sample, rrc_scale
        self.rand_augment, self.erase_prob = rand_augment, erase_prob  # (ops, magnitude, std) or None; float

    def crop_box(self, h, w, rng):
        """RandomResizedCrop box (top, left, height, width): area fraction in rrc_scale, log-uniform aspect in
        [3/4, 4/3], 10 tries, else the central square."""
        for _ in range(10):
            area = h * w * rng.uniform(*self.rrc_scale)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                return int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1)), ch, cw
        s = min(h, w)
        return (h - s) // 2, (w - s) // 2, s, s

    def load(self, i, rng):
        path, label = self.samples[i]
        frames = data.read_frames(path, lambda n: data.sample_indices(n, self.num_frames, 'train', rng), self.threads)
        clips = []
        for _ in range(self.num_sample):
            clip = data.rand_augment(frames, rng, *self.rand_augment) if self.rand_augment else frames
            y, x, h, w = self.crop_box(*frames.shape[1:3], rng)
            # 'squash' resizes the whole (already cropped) frames to S x S; the flip is decided per clip
            clip = data.augment(clip[:, y:y + h, x:x + w], self.size, 'squash', rng, self.flip)[0]
            clips.append(data.random_erase(clip, rng, self.erase_prob) if self.erase_prob else clip)
        return {'video': torch.stack(clips), 'label': label}              # [num_sample, 3, T, S, S]


def summarize(keys):
    """['clip_decoder.0.head.weight', ...] -> 'clip_decoder.* (8)': keys grouped by their first name part."""
    groups = {}
    for k in keys:
        groups.setdefault(k.split('.')[0], []).append(k)
    return ', '.join(ks[0] if ks == [g] else f'{g}.* ({len(ks)})' for g, ks in groups.items()) or 'none'


def load_pretrained(ckpt, num_classes, head_dropout=0.0, init_scale=0.001, **config_overrides):
    """Build a VideoClassifier from a checkpoint dict; returns (model, report lines).

    Accepted: ours ('model' + 'model_config'): stage 1 (VideoViT keys), stage 2 (its `vision_encoder.*`),
    fine-tuned (`backbone.*`, `fc_norm.*`, `head.*`); official ones through model.load_official
    (REFERENCE 5.1, 5.2, 5.4), which infers the architecture from the shapes. The backbone must load
    completely; fc_norm and the head are new unless the checkpoint has them with the right shape (a
    head for another class count is replaced). config_overrides: num_frames, img_size, drop_path, ...
    """
    unused = []
    if 'model_config' in ckpt:
        sd, config = ckpt['model'], ckpt['model_config']
    else:
        # An official checkpoint fine-tuned at other frames or resolution stores its interpolated table as
        # `pos_embed`; we regenerate the table instead (below), so it is dropped before inferring the model.
        sd = dict(unwrap_state_dict(ckpt))
        if sd.pop('pos_embed', None) is not None:
            unused.append('pos_embed')
        net, unused_official = load_official(sd)
        unused += unused_official
        config = dataclasses.asdict(net.config if isinstance(net, VideoViT) else net.backbone.config)
        sd = net.state_dict()
    if any(k.startswith('vision_encoder.') for k in sd):    # a stage-2 model: keep its video encoder only
        unused += [k for k in sd if not k.startswith('vision_encoder.')]
        sd = {k.removeprefix('vision_encoder.'): v for k, v in sd.items() if k.startswith('vision_encoder.')}

    # The position table is a fixed sin-cos over the flattened (t, h, w) token index (REFERENCE 3.2, quirk
    # 14). For another frame count or resolution we simply regenerate the 1-D table for the new token count:
    # row p keeps its code, so the (t, h, w) -> code mapping changes with the grid. The official code
    # instead reshapes the 8 x 14 x 14 pre-training table, interpolates it (bicubic in space, linear in time)
    # and keeps it detached: every spacetime location keeps roughly its old code. Both tables are frozen and
    # fine-tuning adapts the weights to either; ours stays a formula, so no checkpoint has to carry it.
    old = VideoViTConfig(**config)
    new = dataclasses.replace(old, align_layers=0, **config_overrides)
    model = VideoClassifier(VideoViT(new), num_classes, head_dropout, init_scale)
    own = model.state_dict()
    feed = {}
    for k, v in sd.items():
        name = k if k.startswith(('backbone.', 'fc_norm.', 'head.')) else 'backbone.' + k
        if name in own and v.shape == own[name].shape:
            feed[name] = v
        else:                                 # final norm, alignment heads, a head for another class count
            unused.append(k)
    new_keys = [k for k in own if k not in feed]
    missing = [k for k in new_keys if not k.startswith(('fc_norm.', 'head.'))]
    if missing:
        raise ValueError(f'the checkpoint does not hold the whole backbone; missing: {", ".join(missing)}')
    load_strict(model, {**own, **feed})
    report = [f'loaded: {len(feed)} tensors (depth {old.depth}, width {old.embed_dim})',
              f'new: {summarize(new_keys)}', f'unused: {summarize(unused)}']
    if (old.num_frames, old.img_size) != (new.num_frames, new.img_size):
        report.append(f'position table regenerated: {old.num_frames} frames x {old.img_size} px -> '
                      f'{new.num_frames} x {new.img_size}')
    return model, report


@torch.no_grad()
def accuracy(model, dataset, batch_size, rank, world_size, device, autocast, num_workers, desc):
    """Top-1 / top-5 (%) over the whole dataset, each video counted once (padding repeats are merged)."""
    loader, _ = data.make_loader(dataset, batch_size, False, 0, rank, world_size, num_workers, drop_last=False)
    hits = torch.zeros(len(dataset), 3, device=device)       # per video: [top-1 hit, top-5 hit, seen]
    was_training = model.training
    model.eval()
    for batch in tqdm(loader, desc=desc, disable=rank != 0, leave=False):
        video = batch['video'].to(device)
        video = video[:, None] if video.ndim == 5 else video  # [B, V, 3, T, S, S], V = clips x crops
        B, V = video.shape[:2]
        with autocast:
            logits = model(video.flatten(0, 1)).view(B, V, -1)  # [B, V, num_classes]
        top5 = multiview_average(logits).topk(min(5, logits.shape[-1]), dim=-1).indices  # [B, 5]
        correct = top5 == batch['label'].to(device)[:, None]                                   # [B, 5]
        hits[batch['index'].to(device)] = torch.stack([correct[:, 0], correct.any(1), torch.ones_like(correct[:, 0])],
                                                      dim=1).float()
    if dist.is_initialized():
        dist.all_reduce(hits, op=dist.ReduceOp.MAX)          # max, not sum: a video two ranks saw counts once
    model.train(was_training)
    seen = hits[:, 2].sum().clamp(min=1)
    return (100 * hits[:, 0].sum() / seen).item(), (100 * hits[:, 1].sum() / seen).item()


# ----------------------------------------------------------------------------------------------
# The script: config -> distributed -> data -> model -> optimizer -> loop -> test


def fail(message):
    raise SystemExit(f'finetune.py: {message}')


def main():
    defaults = {k: v for k, v in globals().items() if k.isupper()}
    config = common.configure(globals(), PRESETS, sys.argv[1:])

    # Check the constants before anything heavy happens, so a typo costs seconds, not a queue slot.
    world_size = int(os.environ.get('WORLD_SIZE', 1))  # torchrun sets it; init_process_group comes later
    if TOTAL_BATCH % (MICRO_BATCH * world_size):
        fail(f'TOTAL_BATCH={TOTAL_BATCH} is not divisible by MICRO_BATCH={MICRO_BATCH} x {world_size} processes: '
             f'choose TOTAL_BATCH as a multiple of {MICRO_BATCH * world_size}, or change MICRO_BATCH')
    if TEST_CROPS not in (1, 3) or TEST_CLIPS < 1 or NUM_SAMPLE < 1:
        fail(f'TEST_CROPS={TEST_CROPS} must be 1 or 3, TEST_CLIPS={TEST_CLIPS} and NUM_SAMPLE={NUM_SAMPLE} >= 1')
    if not (0 <= LABEL_SMOOTHING < 1 and MIXUP >= 0 and CUTMIX >= 0 and 0 <= MIX_SWITCH_PROB <= 1):
        fail('LABEL_SMOOTHING must lie in [0, 1), MIXUP and CUTMIX >= 0 (0 = off), MIX_SWITCH_PROB in [0, 1]')
    if not (0 < LAYER_DECAY <= 1 and 0 < RRC_SCALE[0] <= RRC_SCALE[1] <= 1):
        fail(f'LAYER_DECAY={LAYER_DECAY} must lie in (0, 1] (1 = no decay) and RRC_SCALE={RRC_SCALE} in (0, 1]')
    if not (0 <= RANDOM_ERASE <= 1 and (RAND_AUGMENT is None or (len(RAND_AUGMENT) == 3 and RAND_AUGMENT[0] >= 1
                                                                 and 0 <= RAND_AUGMENT[1] <= 10))):
        fail(f'RANDOM_ERASE={RANDOM_ERASE} must lie in [0, 1] and RAND_AUGMENT={RAND_AUGMENT} be None or '
             f'(ops >= 1, magnitude in [0, 10], magnitude std), e.g. (4, 7, 0.5) for rand-m7-n4-mstd0.5')
    ckpt_path, log_path = os.path.join(OUT_DIR, 'last.pt'), os.path.join(OUT_DIR, 'log.jsonl')
    resume = os.path.exists(ckpt_path)
    if not resume and not os.path.isfile(INIT):
        hint = ' Run `python train_stage1.py --preset=demo` first.' if 'demo' in INIT else ''
        fail(f'INIT {INIT!r} not found: pass --init=CHECKPOINT, ours (train_stage1.py, train_stage2.py, '
             f'finetune.py) or an official UMT .pth.{hint}')
    for name, path in (('TRAIN_LIST', TRAIN_LIST), ('VAL_LIST', VAL_LIST)):
        if not os.path.exists(path) and not MAKE_DEMO:
            fail(f'{name} {path!r} not found. It lists one video per line as `path,label` (or `path label`), '
                 f'paths relative to DATA_ROOT, labels 0 .. NUM_CLASSES-1. To try the script: --preset=demo.')

    # ------------------------------------------------------------------------------------------
    # Distributed set-up: torchrun's environment -> one process per GPU (gloo on CPU)

    rank, world_size, device = common.setup_distributed(DEVICE)
    master = rank == 0
    grad_accum = TOTAL_BATCH // (MICRO_BATCH * world_size)          # micro-steps per optimizer step
    # The official rule scales the lr with the clips per step, which repeated augmentation multiplies.
    lr_factor = TOTAL_BATCH * NUM_SAMPLE / 256
    peak_lr, warmup_lr, min_lr = BASE_LR * lr_factor, WARMUP_LR * lr_factor, MIN_LR * lr_factor
    autocast, scaler, dtype_name = common.precision(device, DTYPE)
    if master:
        os.makedirs(OUT_DIR, exist_ok=True)
        changed = {k: v for k, v in config.items() if v != defaults[k]}
        print('settings changed from the paper defaults: '
              + (', '.join(f'{k}={v!r}' for k, v in changed.items()) or 'none'))

    # ------------------------------------------------------------------------------------------
    # Data: repeated augmentation for training; 1 clip x 1 crop to validate; clips x crops to test

    if not os.path.exists(TRAIN_LIST):  # MAKE_DEMO is on (checked above): one process writes the demo set
        if master:
            print(f'writing the synthetic demo set to {DATA_ROOT}/ (a few seconds)')
            data.make_demo(DATA_ROOT, seed=0)
        if world_size > 1:
            dist.barrier()
    kw = dict(max_bad_fraction=MAX_BAD_FRACTION, threads=DECODE_THREADS)
    train_set = RepeatedAugClassification(TRAIN_LIST, DATA_ROOT, NUM_FRAMES, IMG_SIZE, flip=FLIP,
                                          num_sample=NUM_SAMPLE, rrc_scale=RRC_SCALE, rand_augment=RAND_AUGMENT,
                                          erase_prob=RANDOM_ERASE, **kw)
    val_set = data.VideoClassification(VAL_LIST, DATA_ROOT, NUM_FRAMES, IMG_SIZE, mode='val', **kw)
    test_set = data.VideoClassification(VAL_LIST, DATA_ROOT, NUM_FRAMES, IMG_SIZE, mode='test',
                                        num_clips=TEST_CLIPS, num_crops=TEST_CROPS, **kw)
    for name, ds in (('TRAIN_LIST', train_set), ('VAL_LIST', val_set)):
        if ds.num_classes > NUM_CLASSES:
            fail(f'{name} has label {ds.num_classes - 1}, but NUM_CLASSES={NUM_CLASSES}')
    steps_per_epoch = len(train_set) // TOTAL_BATCH  # the incomplete last global batch of an epoch is dropped
    if steps_per_epoch == 0:
        fail(f'{TRAIN_LIST} has {len(train_set)} videos, fewer than one global batch of TOTAL_BATCH={TOTAL_BATCH}')
    total_steps, warmup_steps = EPOCHS * steps_per_epoch, WARMUP_EPOCHS * steps_per_epoch

    # ------------------------------------------------------------------------------------------
    # Model: resume from OUT_DIR/last.pt, or build the classifier on the INIT checkpoint

    torch.manual_seed(SEED)  # the same new head on every rank (DDP broadcasts rank 0's anyway)
    overrides = dict(num_frames=NUM_FRAMES, img_size=IMG_SIZE, drop_path=DROP_PATH,
                     checkpoint_blocks=CHECKPOINT_BLOCKS)
    try:
        ckpt = common.load_checkpoint(ckpt_path if resume else INIT)  # weights_only=True: never code
    except pickle.UnpicklingError as e:  # official training checkpoints also pickle their argparse namespace
        fail(f'{INIT}: {e}\nIf you trust the file, keep only its weights: torch.save(torch.load(path, '
             "weights_only=False)['model'], 'weights.pth')")
    try:
        if resume:
            if ckpt['num_classes'] != NUM_CLASSES:
                fail(f'{ckpt_path} has {ckpt["num_classes"]} classes but NUM_CLASSES={NUM_CLASSES}: another OUT_DIR?')
            raw_model = VideoClassifier(VideoViT(VideoViTConfig(**{**ckpt['model_config'], **overrides})),
                                        NUM_CLASSES, HEAD_DROPOUT, INIT_SCALE)
            load_strict(raw_model, ckpt['model'])
        else:
            raw_model, report = load_pretrained(ckpt, NUM_CLASSES, HEAD_DROPOUT, INIT_SCALE, **overrides)
    except ValueError as e:  # a checkpoint that does not fit, or frames / size that do not divide into patches
        fail(str(e))
    raw_model.to(device)  # unwrapped and uncompiled: what is saved and evaluated
    model_config = raw_model.backbone.config

    # ------------------------------------------------------------------------------------------
    # Optimizer and schedule: AdamW with layer-wise lr decay; warmup from WARMUP_LR, then cosine

    groups = common.param_groups(raw_model, WEIGHT_DECAY, lr_scale_fn(model_config.depth, LAYER_DECAY))
    optimizer = torch.optim.AdamW(groups, lr=peak_lr, betas=BETAS, eps=1e-8, fused=device.type == 'cuda')
    step = 0
    if resume:
        optimizer.load_state_dict(ckpt['optimizer'])
        scaler.load_state_dict(ckpt['scaler'])
        common.set_rng_state(ckpt['rng'])
        step = ckpt['step']
        report = [f'resumed from {ckpt_path} at step {step} (epoch {ckpt["epoch"]}, video {ckpt["position"]} of it)']
    del ckpt
    last_ckpt_step = step if resume else None

    model = torch.compile(raw_model) if COMPILE else raw_model
    if world_size > 1:
        model = DDP(model, device_ids=[device.index] if device.type == 'cuda' else None, broadcast_buffers=False)

    if master:
        print(f'{INIT if not resume else ckpt_path} -> {model_config.depth} blocks of width {model_config.embed_dim}, '
              f'{NUM_CLASSES} classes\n  ' + '\n  '.join(report))
        print(f'world size {world_size} | {MICRO_BATCH} videos x {NUM_SAMPLE} clips x {world_size} processes x '
              f'{grad_accum} accumulation steps = {TOTAL_BATCH} videos per step | {dtype_name}, compile {COMPILE}, '
              f'{device}\npeak lr {peak_lr:.3g} (BASE_LR {BASE_LR:g} x {TOTAL_BATCH} x {NUM_SAMPLE} / 256), layer '
              f'decay {LAYER_DECAY}, warmup {warmup_steps} of {total_steps} steps ({steps_per_epoch} per epoch of '
              f'{len(train_set)} videos) | {sum(p.numel() for p in raw_model.parameters()) / 1e6:.2f}M parameters')
        common.append_jsonl(log_path, {'config': config, 'world_size': world_size, 'start_step': step})

    def save():
        common.save_checkpoint({'model': raw_model.state_dict(), 'model_config': dataclasses.asdict(model_config),
                                'num_classes': NUM_CLASSES, 'optimizer': optimizer.state_dict(),
                                'scaler': scaler.state_dict(), 'step': step, 'epoch': step // steps_per_epoch,
                                'position': step % steps_per_epoch * TOTAL_BATCH, 'rng': common.rng_state(),
                                'config': config}, ckpt_path)

    # ------------------------------------------------------------------------------------------
    # Training loop

    epoch = step // steps_per_epoch
    loader, sampler = data.make_loader(train_set, MICRO_BATCH, shuffle=True, seed=SEED, rank=rank,
                                       world_size=world_size, num_workers=NUM_WORKERS,
                                       start=(step % steps_per_epoch) * TOTAL_BATCH // world_size)
    sampler.set_epoch(epoch)
    batches = iter(loader)
    loss_sum, good_steps, skipped_steps, bad_in_a_row, skipped_samples, grad_norm = 0.0, 0, 0, 0, 0, None
    t_log, step_log = time.time(), step
    pbar = tqdm(total=total_steps, initial=step, disable=not master, desc='fine-tune', dynamic_ncols=True)
    model.train()
    while step < total_steps:
        if step // steps_per_epoch != epoch:  # a new epoch: a new permutation of the videos
            epoch = step // steps_per_epoch
            sampler.set_epoch(epoch)
            batches = iter(loader)
        lr = common.lr_at(step, total_steps, warmup_steps, peak_lr, min_lr, start=warmup_lr)
        for g in optimizer.param_groups:
            g['lr'] = lr * g['lr_scale']  # layer-wise decay: lr_scale = LAYER_DECAY^(depth + 1 - layer)
        log_now = (step + 1) % LOG_INTERVAL == 0 or step + 1 == total_steps

        # ---- forward and backward over grad_accum micro-batches
        step_loss = torch.zeros((), device=device)
        for micro in range(grad_accum):
            batch = next(batches)
            video = batch['video'].to(device, non_blocking=True).flatten(0, 1)  # [b x NUM_SAMPLE, 3, T, S, S]
            label = batch['label'].to(device).repeat_interleave(NUM_SAMPLE)     # both clips of a video: its label
            skipped_samples += int(batch['skipped'].sum())
            # Randomness is a function of (SEED, step, micro-step, rank): mixup / cutmix here and stochastic
            # depth in the model, so a resumed run replays it exactly, with any number of processes.
            torch.manual_seed(common.seed_for(SEED, step, micro, rank))
            rng = np.random.default_rng(common.seed_for(SEED, step, micro, rank, 'mix'))
            target = smooth_one_hot(label, NUM_CLASSES, LABEL_SMOOTHING)          # [b x NUM_SAMPLE, C], rows sum to 1
            video, target = mixup_cutmix(video, target, rng, MIXUP, CUTMIX, MIX_SWITCH_PROB)
            # Gradients of the micro-steps add up; DDP averages them over ranks only on the last one.
            with model.no_sync() if world_size > 1 and micro < grad_accum - 1 else nullcontext():
                with autocast:
                    logits = model(video)                                          # [b x NUM_SAMPLE, C]
                # soft-target cross-entropy, in fp32: -sum_c target_c log softmax(logits)_c, mean over clips
                loss = -(target * logits.float().log_softmax(-1)).sum(-1).mean()
                if step + 1 in NAN_STEPS:  # steps are numbered from 1, as in the log
                    loss = loss * float('nan')
                # Divide by grad_accum: the summed gradients are then those of the mean over the whole step.
                scaler.scale(loss / grad_accum).backward()
            step_loss += loss.detach() / grad_accum

        # ---- the update, or a skip if the loss is not finite (decided identically on every rank)
        step_loss = common.all_reduce_mean(step_loss)
        if not torch.isfinite(step_loss):
            optimizer.zero_grad(set_to_none=True)  # drop the poisoned gradients; weights and Adam state untouched
            skipped_steps, bad_in_a_row, grad_norm = skipped_steps + 1, bad_in_a_row + 1, None
            if master:
                tqdm.write(f'step {step + 1}: non-finite loss, update skipped ({skipped_steps} so far)')
        else:
            bad_in_a_row = 0
            if GRAD_CLIP is not None or log_now:
                scaler.unscale_(optimizer)  # the real gradient scale (fp16), before measuring or clipping
                grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), GRAD_CLIP or math.inf)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            loss_sum, good_steps = loss_sum + step_loss.item(), good_steps + 1
        step += 1
        pbar.update(1)

        # ---- logging, validation at the end of every epoch, checkpoints
        if log_now or bad_in_a_row >= MAX_BAD_STEPS:
            dt = time.time() - t_log
            skipped_all = common.all_reduce_mean(torch.tensor(float(skipped_samples), device=device)).item()
            record = {'step': step, 'epoch': epoch, 'loss': loss_sum / good_steps if good_steps else None, 'lr': lr,
                      'grad_norm': None if grad_norm is None else float(grad_norm),
                      'clips_per_s': (step - step_log) * TOTAL_BATCH * NUM_SAMPLE / dt,
                      'ms_per_step': 1000 * dt / (step - step_log), 'skipped_samples': round(skipped_all * world_size),
                      'skipped_steps': skipped_steps}
            if master:
                common.append_jsonl(log_path, record)
                loss_text = 'n/a' if record['loss'] is None else f'{record["loss"]:.4f}'
                tqdm.write(f'step {step} | loss {loss_text} | lr {lr:.3g} | grad norm {record["grad_norm"] or 0:.3f} | '
                           f'{record["ms_per_step"]:.0f} ms/step | {record["clips_per_s"]:.1f} clips/s')
                pbar.set_postfix(loss=loss_text, lr=f'{lr:.2e}', clips_s=f'{record["clips_per_s"]:.1f}')
            loss_sum, good_steps, t_log, step_log = 0.0, 0, time.time(), step
        if step % steps_per_epoch == 0:
            top1, top5 = accuracy(raw_model, val_set, MICRO_BATCH * NUM_SAMPLE, rank, world_size, device, autocast,
                                  NUM_WORKERS, 'val')
            if master:
                tqdm.write(f'epoch {step // steps_per_epoch}/{EPOCHS} | val top-1 {top1:.2f} | top-5 {top5:.2f} '
                           f'(1 clip x 1 crop, {len(val_set)} videos)')
                common.append_jsonl(log_path, {'step': step, 'epoch': step // steps_per_epoch, 'val_top1': top1,
                                               'val_top5': top5})
        if (step % CKPT_INTERVAL == 0 or step % steps_per_epoch == 0) and bad_in_a_row == 0:
            if master:
                save()
            last_ckpt_step = step
        if bad_in_a_row >= MAX_BAD_STEPS:
            fail(f'{bad_in_a_row} non-finite losses in a row (steps {step + 1 - bad_in_a_row}-{step}): stopping. '
                 f'The last good checkpoint is {ckpt_path} (step {last_ckpt_step}). Lower BASE_LR, use bf16 or '
                 f'fp32, check the data with `python data.py --check`, then launch again to resume.')
        if MAX_STEPS is not None and step >= MAX_STEPS:
            break  # a simulated kill: no final checkpoint, no test
    pbar.close()

    # ------------------------------------------------------------------------------------------
    # Final test: TEST_CLIPS x TEST_CROPS views per video, softmax averaged (REFERENCE 3.2)

    if step == total_steps:
        views = TEST_CLIPS * TEST_CROPS
        top1, top5 = accuracy(raw_model, test_set, max(1, MICRO_BATCH * NUM_SAMPLE // views), rank, world_size,
                              device, autocast, NUM_WORKERS, 'test')
        if master:
            print(f'test: top-1 {top1:.2f} | top-5 {top5:.2f} ({TEST_CLIPS} clips x {TEST_CROPS} crops, '
                  f'{len(test_set)} videos; chance {100 / NUM_CLASSES:.1f}) | weights in {ckpt_path}')
            common.append_jsonl(log_path, {'step': step, 'test_top1': top1, 'test_top5': top5, 'views': views})
    if world_size > 1:
        dist.barrier()  # tear the group down together: a rank that leaves first makes gloo abort the others
        dist.destroy_process_group()


if __name__ == '__main__':
    main()
