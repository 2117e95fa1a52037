"""
Stage 2 of Unmasked Teacher (UMT): video-language pre-training on video-text and image-text pairs.

Paper section 3.2 (Li et al., ICCV 2023; REFERENCE 2). The stage-1 student becomes the vision encoder
of a video-language model, next to a text encoder whose last blocks cross-attend to the video (fusion).
Each step takes one batch of videos (4 frames) or one batch of images (1-frame videos), the two
alternating on a shuffled schedule, and:
  1. the frozen CLIP teacher encodes the full clip; semantic masking keeps, per frame, 20% of the
     tokens (50% for images), drawn with the teacher's CLS attention as weights;
  2. ONE student forward on the visible tokens feeds four losses, all with weight 1:
     UTA  the stage-1 alignment with the teacher, continued on the visible tokens;
     VTC  video <-> text contrastive loss over the global batch (every GPU's pairs);
     VTM  video-text matching through the fusion blocks, one hard negative per video and per text;
     MLM  masked language modelling (50% of the tokens), the fusion blocks attending to the visible video.
The defaults are the paper's UMT-B/16 on the 5M corpus (WebVid-2M + CC3M), 16 GPUs x 128 pairs.

Departure (REFERENCE D4): the paper's text side is BERT-base; ours is the text tower of the same
open_clip checkpoint as the teacher, made bidirectional, with a [MASK] embedding and cross-attention in
its last quarter of blocks (model.py). So the official stage-2 text encoder and teacher weights are
never loaded here; an official stage-1 (or stage-2) file gives the vision encoder only.

    torchrun --standalone --nproc_per_node=8 train_stage2.py --init=out/stage1/last.pt   # 8 GPUs x 256 pairs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=umt2 --rdzv_backend=c10d \
        --rdzv_endpoint=HOST:29500 train_stage2.py                  # on each of 2 nodes: the paper's 16 GPUs
    python train_stage2.py --init=b16_ptk710_f8_res224.pth --video_batch=128 --image_batch=128  # one GPU
    python train_stage2.py --preset=paper_l16                       # UMT-L/16, CLIP-L/14 teacher and text
    python train_stage1.py --preset=demo && python train_stage2.py --preset=demo   # CPU, a few minutes

Launch the same command again after a crash: the run resumes from OUT_DIR/last.pt.
"""

import dataclasses
import math
import os
import re
import sys
import time
import zlib

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.functional import normalize
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common
import data
import masking
from model import (UMT, VideoClassifier, VideoViT, VideoViTConfig, build_umt, clip_text_state_dict, load_official,
                   load_strict, tokenize)
from teacher import CLIPTeacher, build_clip, train_demo_clip

# ----------------------------------------------------------------------------------------------
# Configuration: the paper's values (REFERENCE 2.1, 2.7), changed by --preset=NAME and --name=value

# data: annotation files are the official JSON list (or JSONL) of {"video" | "image": path, "caption": str | [str]}
VIDEO_ANN = 'data/webvid2m_train.json'  # video-text pairs (paper 5M: WebVid-2M)
VIDEO_ROOT = ''                    # folder the video paths start from
IMAGE_ANN = 'data/cc3m_train.json'  # image-text pairs (paper 5M: CC3M); '' = videos only
IMAGE_ROOT = ''
VAL_ANN = ''                       # small video-text set: text->video R@1 after every epoch ('' = none; evaluate.py is the full protocol)
VAL_ROOT = ''
MAKE_DEMO = False                  # write the synthetic demo set into VIDEO_ROOT if VIDEO_ANN is missing (demo)
NUM_FRAMES = 4                     # T per video, TSN-sparse (paper: 4 in stage 2)
IMG_SIZE = 224                     # RandomResizedCrop(scale 0.5-1) + flip to this size (paper: 224)
MAX_TEXT_LEN = 32                  # L, BPE tokens with [sot] and [eot] (paper: 32)
NUM_WORKERS = 6                    # decoding processes per GPU, per media
DECODE_THREADS = 1                 # PyAV threads per worker
MAX_BAD_FRACTION = 0.05            # stop when more than this fraction of the files cannot be decoded
# model
INIT = 'out/stage1/last.pt'        # stage-1 weights: a train_stage1.py checkpoint, or an official UMT .pth
DROP_PATH = 0.1                    # stochastic depth of the last student block (paper: 0.1 B, 0.2 L)
EMBED_DIM = None                   # E of the VTC space; None = CLIP's width: 512 for B/16, 768 for L/14 (= paper)
FUSION_LAYER = None                # first text block with cross-attention; None = 3/4 of the depth (9 of 12 = paper)
CHECKPOINT_BLOCKS = 0              # activation checkpointing of the first N student blocks: less memory, more compute
# teacher (its checkpoint's text tower also initializes the text encoder)
TEACHER = 'ViT-B-16-quickgelu'     # open_clip name (paper: CLIP ViT-B/16 for B, ViT-L/14 for L); 'tiny': 64-px demo CLIP
TEACHER_PRETRAINED = 'openai'      # open_clip tag or a local weights file; None = random; 'demo': see the demo preset
TEACHER_SIZE = None                # teacher input size; None = CLIP's own; 196 for L/14 (14x14 patches, like the student)
# masking
MASK_TYPE = 'semantic'             # 'semantic' (teacher attention, paper), 'tube' or 'random'
VIDEO_MASK_RATIO = 0.8             # fraction of each frame's tokens hidden from the student (paper: 0.8)
IMAGE_MASK_RATIO = 0.5             # the same for images (paper: 0.5)
# losses
MLM_PROB = 0.5                     # fraction of the text tokens masked for MLM (paper: 0.5; BERT: 0.15)
VTC_WEIGHT = 1.0                   # paper: all four losses weigh 1
VTM_WEIGHT = 1.0
MLM_WEIGHT = 1.0
UTA_WEIGHT = 1.0
# optimization. No gradient accumulation: the VTC loss over a global batch does not split into micro-batches.
VIDEO_BATCH = 2048                 # video-text pairs per video step over all GPUs (paper: 16 GPUs x 128)
IMAGE_BATCH = 2048                 # image-text pairs per image step over all GPUs (paper: 16 GPUs x 128)
LR = 1e-4                          # peak lr, not scaled with the batch (paper: 1e-4)
MIN_LR_RATIO = 0.01                # warmup starts at, and the cosine ends at, LR x this (paper: 0.01)
WARMUP_EPOCHS = 1                  # linear warmup, per iteration (paper: 1)
EPOCHS = 10                        # paper: 10
WEIGHT_DECAY = 0.02                # AdamW, none on biases, norms and the temperature (paper: 0.02)
BETAS = (0.9, 0.999)               # AdamW betas (paper: 0.9, 0.999)
GRAD_CLIP = None                   # max gradient norm; None = no clipping, the norm is only logged (paper: None)
MAX_BAD_STEPS = 5                  # a non-finite loss skips the step; this many in a row stop the run
# system
DEVICE = 'auto'                    # 'auto' = the GPU when there is one; 'cpu' forces the CPU
DTYPE = 'auto'                     # 'auto' = bf16 on recent GPUs, fp16 + loss scaling on older ones, fp32 on CPU
COMPILE = True                     # torch.compile the student (one graph per media); False to debug
SEED = 0                           # new weights, data order, schedule, masks, negatives
LOG_INTERVAL = 20                  # steps between log lines (each costs a host sync)
CKPT_INTERVAL = 500                # steps between checkpoints (OUT_DIR/last.pt, also written at the end)
OUT_DIR = 'out/stage2'             # checkpoints and log.jsonl
# test knobs
MAX_STEPS = None                   # stop after this step without a final checkpoint, as if killed (resume test)
NAN_STEPS = ()                     # steps whose loss is made NaN (the skip test)

PRESETS = {
    'paper_b16': {},
    'paper_l16': {'INIT': 'out/stage1_l16/last.pt', 'TEACHER': 'ViT-L-14-quickgelu', 'TEACHER_SIZE': 196,
                  'DROP_PATH': 0.2, 'VIDEO_BATCH': 4096, 'IMAGE_BATCH': 4096,  # paper: 32 GPUs x 128
                  'OUT_DIR': 'out/stage2_l16'},
    # After `python train_stage1.py --preset=demo`. The demo has 96 training videos and 4 images.
    'demo': {'VIDEO_ANN': 'demo_data/captions_train.json', 'VIDEO_ROOT': 'demo_data', 'MAKE_DEMO': True,
             'IMAGE_ANN': 'demo_data/captions_images.json', 'IMAGE_ROOT': 'demo_data',
             'VAL_ANN': 'demo_data/captions_val.json', 'VAL_ROOT': 'demo_data', 'INIT': 'out/demo_stage1/last.pt',
             'TEACHER': 'tiny', 'TEACHER_PRETRAINED': 'demo', 'IMG_SIZE': 64, 'DROP_PATH': 0.0, 'VIDEO_BATCH': 16,
             'IMAGE_BATCH': 4, 'LR': 1e-3, 'EPOCHS': 80, 'COMPILE': False, 'NUM_WORKERS': 1, 'LOG_INTERVAL': 10,
             'CKPT_INTERVAL': 100, 'OUT_DIR': 'out/demo_stage2'},
}

defaults = {k: v for k, v in globals().items() if k.isupper()}
config = common.configure(globals(), PRESETS, sys.argv[1:])


def fail(message):
    raise SystemExit(f'train_stage2.py: {message}')


# Check the constants before anything heavy happens, so a typo costs seconds, not a queue slot.
world_size = int(os.environ.get('WORLD_SIZE', 1))  # torchrun sets it; init_process_group comes later
ckpt_path, log_path = os.path.join(OUT_DIR, 'last.pt'), os.path.join(OUT_DIR, 'log.jsonl')
for name, batch in (('VIDEO_BATCH', VIDEO_BATCH), ('IMAGE_BATCH', IMAGE_BATCH)):
    if batch % world_size or batch // world_size < 2:
        fail(f'{name}={batch} must be divisible by {world_size} processes, with at least 2 pairs per process '
             f'(VTM draws its negatives from the same GPU)')
for name, ratio in (('VIDEO_MASK_RATIO', VIDEO_MASK_RATIO), ('IMAGE_MASK_RATIO', IMAGE_MASK_RATIO),
                    ('MLM_PROB', MLM_PROB)):
    if not 0 < ratio < 1:
        fail(f'{name}={ratio} must lie strictly between 0 and 1')
if MASK_TYPE not in ('semantic', 'tube', 'random'):
    fail(f"MASK_TYPE={MASK_TYPE!r}; valid: 'semantic', 'tube', 'random'")
if not os.path.exists(ckpt_path) and not os.path.isfile(INIT):
    hint = ' Run `python train_stage1.py --preset=demo` first.' if INIT == PRESETS['demo']['INIT'] else \
        ' Pass --init=PATH: a train_stage1.py checkpoint (out/stage1/last.pt) or an official UMT stage-1 .pth.'
    fail(f'stage-1 checkpoint INIT={INIT!r} not found.{hint}')
for name, path in (('VIDEO_ANN', VIDEO_ANN), ('IMAGE_ANN', IMAGE_ANN), ('VAL_ANN', VAL_ANN)):
    if path and not os.path.exists(path) and not MAKE_DEMO:
        fail(f'{name} {path!r} not found: a JSON list (or JSONL) of {{"video" or "image": path, "caption": text '
             f'or [texts]}}, paths relative to the matching *_ROOT. Try `--preset=demo` first.')

# ----------------------------------------------------------------------------------------------
# Distributed set-up: torchrun's environment -> one process per GPU (or one CPU process per rank)

rank, world_size, device = common.setup_distributed(DEVICE)  # NCCL on GPUs, gloo on CPUs
master = rank == 0
min_lr = LR * MIN_LR_RATIO
autocast, scaler, dtype_name = common.precision(device, DTYPE)
if master:
    os.makedirs(OUT_DIR, exist_ok=True)
    changed = {k: v for k, v in config.items() if v != defaults[k]}
    print('settings changed from the paper defaults: ' + (', '.join(f'{k}={v!r}' for k, v in changed.items()) or 'none'))

# ----------------------------------------------------------------------------------------------
# Data: one loader per media, each batch all-video or all-image; the schedule interleaves them

if not os.path.exists(VIDEO_ANN):  # MAKE_DEMO is on (checked above): one process writes the demo set
    if master:
        print(f'writing the synthetic demo set to {VIDEO_ROOT}/ (a few seconds)')
        data.make_demo(VIDEO_ROOT, seed=0)
    if world_size > 1:
        dist.barrier()
sets = {'video': data.VideoText(VIDEO_ANN, VIDEO_ROOT, NUM_FRAMES, IMG_SIZE, 'train', media='video',
                                max_bad_fraction=MAX_BAD_FRACTION, threads=DECODE_THREADS)}
if IMAGE_ANN:
    sets['image'] = data.VideoText(IMAGE_ANN, IMAGE_ROOT, NUM_FRAMES, IMG_SIZE, 'train', media='image',
                                   max_bad_fraction=MAX_BAD_FRACTION, threads=DECODE_THREADS)
global_batch = {'video': VIDEO_BATCH, 'image': IMAGE_BATCH}
steps_of = {m: len(ds) // global_batch[m] for m, ds in sets.items()}  # incomplete last batches are dropped
if min(steps_of.values()) == 0:
    fail(f'fewer pairs than one batch: {({m: len(ds) for m, ds in sets.items()})} vs {global_batch}')
steps_per_epoch = sum(steps_of.values())
total_steps, warmup_steps = EPOCHS * steps_per_epoch, WARMUP_EPOCHS * steps_per_epoch


def schedule(epoch):
    """Which media each step of an epoch uses: every loader's batches, shuffled (the official MetaLoader).
    A function of (SEED, epoch) only, so it is the same on every rank and after a resume."""
    order = [m for m in sets for _ in range(steps_of[m])]
    np.random.default_rng([SEED, epoch]).shuffle(order)
    return order


# ----------------------------------------------------------------------------------------------
# Models: the frozen teacher, and the video-language model (student + text side)

if TEACHER_PRETRAINED == 'demo':  # the demo's stand-in for OpenAI CLIP: tiny_clip() trained on the demo frames
    TEACHER_PRETRAINED = f'{VIDEO_ROOT}/tiny_clip.pt'
    if master and not os.path.exists(TEACHER_PRETRAINED):
        print(f'training the demo teacher {TEACHER_PRETRAINED} on single frames and captions (about 30 s)')
        train_demo_clip(VIDEO_ANN, VIDEO_ROOT, TEACHER_PRETRAINED)
    if world_size > 1:
        dist.barrier()
torch.manual_seed(SEED)  # the same new weights on every rank (DDP broadcasts rank 0's anyway)
try:
    clip_model = build_clip(TEACHER, TEACHER_PRETRAINED)  # its visual tower teaches, its text tower initializes
except RuntimeError as e:  # weights not downloadable / not found: teacher.py's message carries the hint
    fail(str(e))
resume = os.path.exists(ckpt_path)
if resume:
    ckpt = common.load_checkpoint(ckpt_path)  # weights_only=True: tensors and plain data, never code
    raw_model = UMT.from_configs(ckpt['model_config'], ckpt['text_config'])
    load_strict(raw_model, ckpt['model'])
    report = [f'resumed from {ckpt_path} at step {ckpt["step"]} (epoch {ckpt["epoch"]})']
else:
    init = common.load_checkpoint(INIT)
    if 'model_config' in init:  # ours, from train_stage1.py
        vision_config, vision_sd, unused = init['model_config'], init['model'], []
    else:  # official: stage 1 (encoder.*), or stage 2 (vision_encoder.*; its BERT and teacher stay unused)
        net, unused = load_official(init)
        if isinstance(net, VideoClassifier):
            fail(f'{INIT} is a fine-tuned classifier without alignment heads: stage 2 starts from a stage-1 model')
        vision_config, vision_sd = dataclasses.asdict(net.config), net.state_dict()
    if 'text_config' in init or vision_config['align_layers'] == 0:
        fail(f'INIT={INIT} is not a stage-1 model with alignment heads (to continue a stage-2 run, use its OUT_DIR)')
    # The architecture comes from the checkpoint; frames, size and regularization from the constants. The
    # position table is fixed sin-cos, so 4 frames simply use the first rows of the 8-frame table.
    vision_config = VideoViTConfig(**{**vision_config, 'num_frames': NUM_FRAMES, 'img_size': IMG_SIZE,
                                      'drop_path': DROP_PATH, 'checkpoint_blocks': CHECKPOINT_BLOCKS})
    vision = VideoViT(vision_config)
    load_strict(vision, vision_sd)
    raw_model = build_umt(vision, clip_model, EMBED_DIM, FUSION_LAYER)

    def summary(keys):  # ['text_encoder.blocks.9.cross_attn.q_proj.weight', ...] -> 'text_encoder.blocks.*.cross_attn'
        groups = {re.sub(r'\.(weight|bias)$', '', re.sub(r'\.\d+\.', '.*.', k)) for k in keys}
        return ', '.join(sorted({'.'.join(g.split('.')[:4]) for g in groups})) or 'none'
    from_clip = ['text_encoder.' + k for k in clip_text_state_dict(clip_model)]
    new = [k for k in raw_model.state_dict() if not k.startswith('vision_encoder.') and k not in from_clip]
    report = [f'vision encoder: {len(vision_sd)} tensors from {INIT}; unused there: {summary(unused)}',
              f'text encoder: {len(from_clip)} tensors from the text tower of {TEACHER} ({TEACHER_PRETRAINED})',
              f'new: {summary(new)}']
vision_config = raw_model.vision_encoder.config
K = vision_config.align_layers
teacher = CLIPTeacher(clip_model, K, TEACHER_SIZE).to(device)
# Frozen: eval mode, no gradients, never in DDP, the optimizer or a checkpoint (rebuilt on resume).
teacher.eval().requires_grad_(False)
del clip_model  # the text tower was copied into raw_model; the teacher keeps the visual tower
raw_model.to(device)
p, grid = vision_config.patch_size, teacher.image_size // teacher.patch
if IMG_SIZE // p != grid or vision_config.teacher_dim != teacher.visual.proj.shape[1]:
    fail(f'student ({IMG_SIZE // p}x{IMG_SIZE // p} patches, heads to width {vision_config.teacher_dim}) and teacher '
         f'({grid}x{grid}, width {teacher.visual.proj.shape[1]}) do not fit; set TEACHER_SIZE = {IMG_SIZE // p * teacher.patch}'
         ' or use the teacher of stage 1')


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule: AdamW, no decay on 1-D / 0-D parameters; lr = warmup, then cosine (common.lr_at)

optimizer = torch.optim.AdamW(common.param_groups(raw_model, WEIGHT_DECAY), lr=LR, betas=BETAS, eps=1e-8,
                              fused=device.type == 'cuda')
step = 0
if resume:
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
    common.set_rng_state(ckpt['rng'])
    step = ckpt['step']
    diff = ', '.join(f'{k}: {ckpt["config"].get(k)!r} -> {v!r}' for k, v in config.items() if ckpt['config'].get(k) != v)
    report[0] += f'; settings changed since: {diff}' if diff else ''
    del ckpt
last_ckpt_step = step if resume else None

# ----------------------------------------------------------------------------------------------
# Compile and DDP

if COMPILE:  # in place: the state_dict keys stay the same. Videos and images give two static graphs.
    raw_model.vision_encoder.compile(dynamic=False)
model = raw_model  # UMT.forward computes the four losses: DDP wraps one forward per step
if world_size > 1:
    model = DDP(model, device_ids=[device.index] if device.type == 'cuda' else None, broadcast_buffers=False)

if master:
    n_params = sum(p.numel() for p in raw_model.parameters())
    print('\n'.join(report))
    print(f'world size {world_size} | {VIDEO_BATCH} video / {IMAGE_BATCH if IMAGE_ANN else 0} image pairs per step, '
          f'{", ".join(f"{n} {m}" for m, n in steps_of.items())} steps per epoch | {dtype_name}, compile {COMPILE}, '
          f'{device}\nlr {LR:g} after {warmup_steps} warmup steps, floor {min_lr:g}, {total_steps} steps | '
          f'{n_params / 1e6:.1f}M parameters | text fusion from block {raw_model.text_encoder.fusion_layer} | '
          f'teacher {TEACHER} ({TEACHER_PRETRAINED}), frozen')
    common.append_jsonl(log_path, {'config': config, 'world_size': world_size, 'start_step': step})


def save():
    common.save_checkpoint({'model': raw_model.state_dict(), 'model_config': dataclasses.asdict(vision_config),
                            'text_config': raw_model.text_config, 'optimizer': optimizer.state_dict(),
                            'scaler': scaler.state_dict(), 'step': step, 'epoch': step // steps_per_epoch,
                            'position': step % steps_per_epoch, 'rng': common.rng_state(), 'config': config},
                           ckpt_path)


@torch.no_grad()
def retrieval_check(ann, root):
    """Text->video R@1 (%) on a small set with the VTC features only (no ITM re-ranking; evaluate.py has
    the full protocol): per-frame video features, similarity = mean over frames. Each distinct caption
    is a query, and every video that carries it is a hit (the demo repeats captions). -> (R@1, chance)."""
    ds = data.VideoText(ann, root, NUM_FRAMES, IMG_SIZE, 'eval', media='video')
    loader, _ = data.make_loader(ds, 16, False, 0, 0, 1, 0, drop_last=False)
    raw_model.eval()
    feats = torch.zeros(len(ds), NUM_FRAMES, raw_model.vision_proj.out_features, device=device)
    for batch in loader:
        with autocast:
            feats[batch['index'].to(device)] = raw_model.encode_video(batch['video'].to(device), per_frame=True)[2].float()
    captions = sorted({c for item in ds.items for c in item.captions})
    input_ids, attention_mask = tokenize(captions, MAX_TEXT_LEN)
    with autocast:
        t = raw_model.encode_text(input_ids.to(device), attention_mask.to(device))[1].float()      # [Q, E]
    sim = torch.einsum('qe,vte->qvt', normalize(t, dim=-1), normalize(feats, dim=-1)).mean(-1)  # [Q, V]
    positive = torch.tensor([[c in item.captions for item in ds.items] for c in captions], device=device)  # [Q, V]
    raw_model.train()
    r1 = positive.gather(1, sim.argmax(1, keepdim=True)).float().mean().item()
    return 100 * r1, 100 * positive.float().mean().item()


# ----------------------------------------------------------------------------------------------
# Training loop

epoch = step // steps_per_epoch
order = schedule(epoch)
done = {m: order[:step % steps_per_epoch].count(m) for m in sets}  # batches of each media already used this epoch
loaders = {m: data.make_loader(ds, global_batch[m] // world_size, shuffle=True, seed=common.seed_for(SEED, m),
                               rank=rank, world_size=world_size, num_workers=NUM_WORKERS,
                               start=done[m] * global_batch[m] // world_size) for m, ds in sets.items()}
for loader, sampler in loaders.values():
    sampler.set_epoch(epoch)
batches = {m: iter(loader) for m, (loader, _) in loaders.items()}
loss_weights = torch.tensor([VTC_WEIGHT, VTM_WEIGHT, MLM_WEIGHT, UTA_WEIGHT], device=device)
sums = torch.zeros(5, device=device)  # losses summed over the good steps since the last log
good_steps, skipped_steps, bad_in_a_row, skipped_samples, grad_norm = 0, 0, 0, 0, None
t_log, step_log, pairs = time.time(), step, 0
pbar = tqdm(total=total_steps, initial=step, disable=not master, desc='stage 2', dynamic_ncols=True)
model.train()
while step < total_steps:
    if step // steps_per_epoch != epoch:  # a new epoch: new permutations and a new schedule
        epoch = step // steps_per_epoch
        order = schedule(epoch)
        for loader, sampler in loaders.values():
            sampler.set_epoch(epoch)
            sampler.set_start(0)  # a resume's start offset is for its first epoch only, even if a loader was never drawn
        batches = {m: iter(loader) for m, (loader, _) in loaders.items()}
    media = order[step % steps_per_epoch]
    # Randomness is a function of the step number, so a resumed run replays it exactly: masks, MLM
    # corruption, VTM negatives and stochastic depth all draw from this seed (different on every rank).
    torch.manual_seed(common.seed_for(SEED, step, rank))
    lr = common.lr_at(step, total_steps, warmup_steps, LR, min_lr, start=min_lr)
    for g in optimizer.param_groups:
        g['lr'] = lr * g['lr_scale']
    log_now = (step + 1) % LOG_INTERVAL == 0 or step + 1 == total_steps

    # ---- forward and backward
    batch = next(batches[media])
    video = batch['video'].to(device, non_blocking=True)                # [B, 3, T, H, W]; T = 1 for images
    # Pair keys [B, 2]: the sample and the caption text (crc32 is the same on every rank); VTC and VTM treat
    # pairs that share either as positives, so a caption repeated across videos is not a false negative.
    ids = torch.tensor([[i, zlib.crc32(c.encode())] for i, c in zip(batch['index'].tolist(), batch['caption'])],
                       device=device)
    input_ids, attention_mask = (x.to(device) for x in tokenize(batch['caption'], MAX_TEXT_LEN))  # [B, L] each
    skipped_samples += int(batch['skipped'].sum())
    pairs += video.shape[0] * world_size
    with torch.no_grad(), autocast:
        # The teacher sees the full clip; its attention picks the visible tokens (more of them for images).
        hidden, attn = teacher.encode(video)                            # [K, B, N, E], [B, T, n]
        keep = masking.make_mask(MASK_TYPE, attn, VIDEO_MASK_RATIO if video.shape[2] > 1 else IMAGE_MASK_RATIO)
        targets = teacher.targets(hidden, keep)                         # [K, B, N_vis, C] unit vectors
    with autocast:
        parts = model(video, keep, targets, input_ids, attention_mask, ids, MLM_PROB)  # [4]: vtc, vtm, mlm, uta
    loss = (parts * loss_weights).sum()                                 # L = L_vtc + L_vtm + L_mlm + L_uta (paper)
    losses = torch.cat([loss[None], parts])                             # [5] for the log: total first
    if step + 1 in NAN_STEPS:  # steps are numbered from 1, as in the log
        loss = loss * float('nan')
    scaler.scale(loss).backward()

    # ---- the update, or a skip if the loss is not finite (decided identically on every rank)
    bad = common.all_reduce_mean((~torch.isfinite(loss.detach())).float())
    if bad.item() > 0:
        optimizer.zero_grad(set_to_none=True)  # drop the poisoned gradients; weights and Adam state untouched
        skipped_steps, bad_in_a_row = skipped_steps + 1, bad_in_a_row + 1
        if master:
            tqdm.write(f'step {step + 1}: non-finite loss, update skipped ({skipped_steps} so far)')
        if bad_in_a_row >= MAX_BAD_STEPS:
            fail(f'{bad_in_a_row} non-finite losses in a row (steps {step + 2 - bad_in_a_row}-{step + 1}): stopping. '
                 f'The last good checkpoint is {ckpt_path} (step {last_ckpt_step}). Lower LR, use bf16 or fp32, '
                 f'check the data with `python data.py --check`, then launch again to resume.')
    else:
        bad_in_a_row = 0
        if GRAD_CLIP is not None or log_now:
            scaler.unscale_(optimizer)  # real gradient scale (fp16), before measuring or clipping
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), GRAD_CLIP or math.inf)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            raw_model.temp.clamp_(0.001, 0.5)  # the official bounds on the temperature
        sums += losses.detach()
        good_steps += 1
    step += 1
    pbar.update(1)

    # ---- logging (all-reduced over ranks), the end-of-epoch check and checkpoints
    if log_now:
        stats = common.all_reduce_mean(torch.cat([sums, torch.tensor([skipped_samples], device=device)])).tolist()
        dt = time.time() - t_log
        mean = [s / good_steps if good_steps else None for s in stats[:5]]
        record = {'step': step, 'epoch': epoch, 'loss': mean[0], 'vtc': mean[1], 'vtm': mean[2], 'mlm': mean[3],
                  'uta': mean[4], 'temp': raw_model.temp.item(), 'lr': lr,
                  'grad_norm': None if grad_norm is None else float(grad_norm), 'pairs_per_s': pairs / dt,
                  'ms_per_step': 1000 * dt / (step - step_log), 'skipped_samples': round(stats[5] * world_size),
                  'skipped_steps': skipped_steps}
        if device.type == 'cuda':
            record['max_mem_gib'] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        if master:
            common.append_jsonl(log_path, record)
            text = ' | '.join(f'{k} {record[k]:.4f}' if record[k] is not None else f'{k} n/a'
                              for k in ('loss', 'vtc', 'vtm', 'mlm', 'uta'))
            tqdm.write(f'step {step} | {text} | temp {record["temp"]:.4f} | lr {lr:.3g} | grad norm '
                       f'{record["grad_norm"] or 0:.3f} | {record["ms_per_step"]:.0f} ms/step | '
                       f'{record["pairs_per_s"]:.1f} pairs/s' + (f' | {record["max_mem_gib"]:.1f} GiB' if 'max_mem_gib' in record else ''))
            pbar.set_postfix(loss='n/a' if mean[0] is None else f'{mean[0]:.4f}', lr=f'{lr:.2e}')
        sums.zero_()
        good_steps, t_log, step_log, pairs = 0, time.time(), step, 0
    if VAL_ANN and master and (step % steps_per_epoch == 0 or step == total_steps):
        r1, chance = retrieval_check(VAL_ANN, VAL_ROOT)  # master only: the other ranks wait at the next all-reduce
        tqdm.write(f'epoch {step // steps_per_epoch}: text->video R@1 {r1:.1f}% on {VAL_ANN} (chance {chance:.1f}%)')
        common.append_jsonl(log_path, {'step': step, 'epoch': step / steps_per_epoch, 'val_t2v_r1': r1,
                                       'chance': chance})
    if (step % CKPT_INTERVAL == 0 or step == total_steps) and bad_in_a_row == 0:
        if master:
            save()
        last_ckpt_step = step
    if MAX_STEPS is not None and step >= MAX_STEPS:
        break  # a simulated kill: no final checkpoint

# ----------------------------------------------------------------------------------------------
# Clean up

pbar.close()
if master and step == total_steps:
    print(f'done: {step} steps, {skipped_steps} skipped; weights in {ckpt_path}, log in {log_path}')
if world_size > 1:
    dist.barrier()  # tear the group down together: a rank that leaves first makes gloo abort the others
    dist.destroy_process_group()
