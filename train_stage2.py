"""
Stage 2 of Unmasked Teacher (UMT): video-language pre-training on video-text and image-text pairs.

Paper section 3.2 (Li et al., ICCV 2023). The stage-1 student becomes the vision encoder of a
video-language model, next to a text encoder whose last blocks cross-attend to the video (fusion;
video_language.py). Each step takes one batch of videos (4 frames) or one batch of images (1-frame
videos), the two alternating on a shuffled schedule, and:
  1. the frozen CLIP teacher encodes the full clip; semantic masking keeps, per frame, 20% of the
     tokens (50% for images), drawn with the teacher's CLS attention as weights;
  2. ONE student forward on the visible tokens feeds four losses, all with weight 1:
     UTA  the stage-1 alignment with the teacher, continued on the visible tokens;
     VTC  video <-> text contrastive loss over the global batch (every GPU's pairs);
     VTM  video-text matching through the fusion blocks, one hard negative per video and per text;
     MLM  masked language modelling (50% of the tokens), the fusion blocks attending to the visible video.
The defaults are the paper's UMT-B/16 on the 5M corpus (WebVid-2M + CC3M), 16 GPUs x 128 pairs
(the official multi_modality/exp/pretraining/b16_5m.py).

Departure: the paper's text side is BERT-base; ours is the text tower of the same open_clip checkpoint as
the teacher (video_language.py). So official stage-2 text weights are never loaded here; an official
stage-1 (or stage-2) file gives the vision encoder only.

    torchrun --standalone --nproc_per_node=8 train_stage2.py --init=out/stage1/last.pt   # 8 GPUs x 256 pairs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=umt2 --rdzv_backend=c10d \
        --rdzv_endpoint=HOST:29500 train_stage2.py                  # on each of 2 nodes: the paper's 16 GPUs
    python train_stage2.py --init=b16_ptk710_f8_res224.pth --video_batch=128 --image_batch=128  # one GPU
    python train_stage2.py --preset=paper_l16                       # UMT-L/16, CLIP-L/14 teacher and text
    python train_stage1.py --preset=demo && python train_stage2.py --preset=demo   # CPU, a few minutes

After a crash, the same command resumes from OUT_DIR/last.pt.
"""

import dataclasses
import functools
import math
import os
import sys
import zlib

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import demo
import masking
import training
from teacher import CLIPTeacher, build_clip, check_pretrained
from util import checkpoints
from util.evaluation import evaluate_retrieval
from video_language import build_umt, clip_text_state_dict, tokenize

# ----------------------------------------------------------------------------------------------
# Configuration: the paper's values, changed by --preset=NAME and --name=value (training.configure)

# data: annotation files are the official JSON list (or JSONL) of {"video" | "image": path, "caption": str | [str]}
VIDEO_ANN = 'data/webvid2m_train.json'  # video-text pairs (paper 5M: WebVid-2M)
VIDEO_ROOT = ''                    # folder the video paths start from
IMAGE_ANN = 'data/cc3m_train.json'  # image-text pairs (paper 5M: CC3M); '' = videos only
IMAGE_ROOT = ''
VAL_ANN = ''                       # video-text set for a VTC text->video R@1 after every epoch ('' = none; the full
                                   # protocol is evaluate.py retrieval)
VAL_ROOT = ''
MAKE_DEMO = False                  # write the synthetic demo set into VIDEO_ROOT if VIDEO_ANN is missing (demo)
NUM_FRAMES = 4                     # T per video, one random frame per segment (paper: 4; retrieval fine-tuning 12)
IMG_SIZE = 224                     # RandomResizedCrop(scale 0.5-1) + flip to this size (paper: 224)
MAX_TEXT_LEN = 32                  # L, BPE tokens with [sot] and [eot] (paper: 32)
NUM_WORKERS = min(6, training.CORES)  # decoding processes per GPU, per media (official: 6)
DECODE_THREADS = 1                 # PyAV threads per worker
MAX_BAD_FRACTION = 0.05            # stop when more than this fraction of the files cannot be decoded
# model
INIT = 'out/stage1/last.pt'        # stage 1 (ours or an official .pth: its video encoder, the text from TEACHER's
                                   # CLIP) or our stage-2 model (all of it: retrieval fine-tuning)
DROP_PATH = 0.1                    # stochastic depth of the last student block (paper: 0.1 B, 0.2 L)
EMBED_DIM = None                   # E of the VTC space; None = CLIP's width: 512 for B/16, 768 for L/14 (= paper)
FUSION_LAYER = None                # first text block with cross-attention; None = 3/4 of the depth (9 of 12 = paper)
CHECKPOINT_BLOCKS = 0              # activation checkpointing of the first N student blocks: less memory, more compute
# teacher (its checkpoint's text tower also initializes the text encoder of a stage-1 INIT)
TEACHER = 'ViT-B-16-quickgelu'     # open_clip name (paper: CLIP ViT-B/16 for B, ViT-L/14 for L); 'tiny': demo CLIP
TEACHER_PRETRAINED = 'openai'      # open_clip tag or a local weights file; None = random; 'demo': see the demo preset
TEACHER_SIZE = None                # teacher input px; None = CLIP's own; 196 for L/14 (14x14 patches like the student)
# masking
MASK_TYPE = 'semantic'             # 'semantic' (teacher attention, paper), 'tube' or 'random'
VIDEO_MASK_RATIO = 0.8             # fraction of each frame's tokens hidden from the student (paper: 0.8)
IMAGE_MASK_RATIO = 0.5             # the same for images (paper: 0.5)
# losses
MLM_PROB = 0.5                     # fraction of the text tokens masked for MLM (paper: 0.5; BERT: 0.15)
VTC_WEIGHT = 1.0                   # paper: all four losses weigh 1
VTM_WEIGHT = 1.0
MLM_WEIGHT = 1.0
UTA_WEIGHT = 1.0                   # 0 = no teacher: no masking, every token, per-frame features (retrieval fine-tuning)
VTC_GRAD = 'global'                # 'global': the gradient of the contrastive loss over the global batch (ours);
                                   # 'official': 1/world_size of it, what the official all-gather gives (section README)
# optimization. No gradient accumulation: the VTC loss over a global batch does not split into micro-batches.
VIDEO_BATCH = 2048                 # video-text pairs per video step over all GPUs (paper: 16 GPUs x 128)
IMAGE_BATCH = 2048                 # image-text pairs per image step over all GPUs (paper: 16 GPUs x 128)
LR = 1e-4                          # peak lr, not scaled with the batch (paper: 1e-4)
MIN_LR_RATIO = 0.01                # lr = LR x max(this, warmup ramp or half-cosine): official LambdaLR (paper: 0.01)
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

PRESETS = {
    'paper_b16': {},
    'paper_l16': {'INIT': 'out/stage1_l16/last.pt', 'TEACHER': 'ViT-L-14-quickgelu', 'TEACHER_SIZE': 196,
                  'DROP_PATH': 0.2, 'VIDEO_BATCH': 4096, 'IMAGE_BATCH': 4096,  # paper: 32 GPUs x 128
                  'OUT_DIR': 'out/stage2_l16'},
    # After `python train_stage1.py --preset=demo`. The demo has 180 training videos and 6 images.
    'demo': {'VIDEO_ANN': 'demo_data/captions_train.json', 'VIDEO_ROOT': 'demo_data', 'MAKE_DEMO': True,
             'IMAGE_ANN': 'demo_data/captions_images.json', 'IMAGE_ROOT': 'demo_data',
             'VAL_ANN': 'demo_data/captions_val.json', 'VAL_ROOT': 'demo_data', 'INIT': 'out/demo_stage1/last.pt',
             'TEACHER': 'tiny', 'TEACHER_PRETRAINED': 'demo', 'IMG_SIZE': 64, 'DROP_PATH': 0.0, 'VIDEO_BATCH': 16,
             'IMAGE_BATCH': 4, 'LR': 1e-3, 'EPOCHS': 30, 'COMPILE': False, 'NUM_WORKERS': 1, 'LOG_INTERVAL': 10,
             'CKPT_INTERVAL': 100, 'OUT_DIR': 'out/demo_stage2'},
    # Retrieval fine-tuning from a stage-2 model (official exp/finetuning/ret_msrvtt/b16_25m.py): VTC + VTM only, no
    # teacher and no masking, 12 frames, 8 GPUs x 32 pairs. mc_msrvtt is the training inside the official MSRVTT-MC
    # script (7k split, evaluated with `evaluate.py mc`).
    'ret_msrvtt': {'INIT': 'out/stage2/last.pt', 'VIDEO_ANN': 'data/msrvtt_ret_train9k.json', 'IMAGE_ANN': '',
                   'VAL_ANN': 'data/msrvtt_ret_test1k.json', 'NUM_FRAMES': 12, 'UTA_WEIGHT': 0.0, 'MLM_WEIGHT': 0.0,
                   'DROP_PATH': 0.2, 'VIDEO_BATCH': 256, 'LR': 1e-5, 'OUT_DIR': 'out/ret_msrvtt'},
    'mc_msrvtt': {'INIT': 'out/stage2/last.pt', 'VIDEO_ANN': 'data/msrvtt_ret_train7k.json', 'IMAGE_ANN': '',
                  'NUM_FRAMES': 12, 'UTA_WEIGHT': 0.0, 'MLM_WEIGHT': 0.0, 'DROP_PATH': 0.2, 'VIDEO_BATCH': 256,
                  'LR': 8e-5, 'EPOCHS': 5, 'WARMUP_EPOCHS': 0, 'OUT_DIR': 'out/mc_msrvtt'},
    'ret_demo': {'INIT': 'out/demo_stage2/last.pt', 'VIDEO_ANN': 'demo_data/captions_train.json',
                 'VIDEO_ROOT': 'demo_data', 'IMAGE_ANN': '', 'VAL_ANN': 'demo_data/captions_val.json',
                 'VAL_ROOT': 'demo_data', 'NUM_FRAMES': 12, 'IMG_SIZE': 64, 'UTA_WEIGHT': 0.0, 'MLM_WEIGHT': 0.0,
                 'DROP_PATH': 0.0, 'VIDEO_BATCH': 16, 'LR': 1e-4, 'EPOCHS': 5, 'COMPILE': False, 'NUM_WORKERS': 1,
                 'LOG_INTERVAL': 6, 'OUT_DIR': 'out/demo_ret'},
}

config = training.configure(globals(), PRESETS, sys.argv[1:])
fail = training.fail

# Check the constants before anything heavy happens, so a typo costs seconds, not a queue slot.
world_size = int(os.environ.get('WORLD_SIZE', 1))  # torchrun sets it; the process group comes later
for name, batch in (('VIDEO_BATCH', VIDEO_BATCH), ('IMAGE_BATCH', IMAGE_BATCH)):
    if batch % world_size or batch // world_size < 2:
        fail(f'{name}={batch} must be divisible by {world_size} processes, with at least 2 pairs per process '
             f'(VTM draws its negatives from the same GPU)')
for name, ratio in (('VIDEO_MASK_RATIO', VIDEO_MASK_RATIO), ('IMAGE_MASK_RATIO', IMAGE_MASK_RATIO),
                    ('MLM_PROB', MLM_PROB)):
    if not 0 < ratio < 1:
        fail(f'{name}={ratio} must lie strictly between 0 and 1')
if MASK_TYPE not in ('semantic', 'tube', 'random') or VTC_GRAD not in ('global', 'official'):
    fail(f"MASK_TYPE={MASK_TYPE!r} must be 'semantic', 'tube' or 'random'; VTC_GRAD={VTC_GRAD!r} 'global' or "
         "'official'")
training.need_positive(EPOCHS=EPOCHS, NUM_FRAMES=NUM_FRAMES, IMG_SIZE=IMG_SIZE, MAX_TEXT_LEN=MAX_TEXT_LEN,
                       LOG_INTERVAL=LOG_INTERVAL, CKPT_INTERVAL=CKPT_INTERVAL, MAX_BAD_STEPS=MAX_BAD_STEPS)
training.need_init(INIT, OUT_DIR, 'a train_stage1.py checkpoint (out/stage1/last.pt), an official UMT stage-1 .pth '
                   'or our stage-2 model', 'python train_stage1.py --preset=demo')
check_pretrained(TEACHER_PRETRAINED)  # a weights file that is not there
training.need_files({'VIDEO_ANN': VIDEO_ANN, 'IMAGE_ANN': IMAGE_ANN, 'VAL_ANN': VAL_ANN}, 'a JSON list (or JSONL) of '
                    '{"video" or "image": path, "caption": text or [texts]}, paths relative to the matching *_ROOT. '
                    'Try `--preset=demo` first.', MAKE_DEMO)

# ----------------------------------------------------------------------------------------------
# Processes: torchrun starts one per GPU (NCCL) or per CPU share (gloo); plain python runs one. Precision.

rank, world_size, device = training.init_distributed(DEVICE)  # joins the process group when torchrun started us
master = rank == 0                                              # rank 0 logs, checkpoints and makes the demo set
dtype = training.pick_dtype(device, DTYPE)                      # bf16 on recent GPUs, fp16 on older ones, fp32 on CPU
autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 gradients underflow unless scaled
lock = training.lock_out_dir(OUT_DIR) if master else None      # a second run on the same OUT_DIR stops here
ckpt_path = os.path.join(OUT_DIR, 'last.pt')

# ----------------------------------------------------------------------------------------------
# Data: one loader per media, each batch all-video or all-image; the schedule interleaves them

# The demo set and its stand-in for OpenAI CLIP (TEACHER_PRETRAINED='demo'), made once; else nothing to do.
teacher_weights = demo.setup(VIDEO_ROOT, VIDEO_ANN, MAKE_DEMO, TEACHER_PRETRAINED, master, SEED)
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
val_set = data.VideoText(VAL_ANN, VAL_ROOT, NUM_FRAMES, IMG_SIZE, 'eval', media='video') if VAL_ANN else None

@functools.lru_cache(maxsize=2)
def schedule(epoch):
    """Which media each step of an epoch uses: every loader's batches, shuffled (the official MetaLoader).
    A function of (SEED, epoch) only, so it is the same on every rank and after a resume."""
    order = [m for m in sets for _ in range(steps_of[m])]
    np.random.default_rng([SEED, epoch]).shuffle(order)
    return order

# ----------------------------------------------------------------------------------------------
# Models: the frozen teacher, and the video-language model (student + text side)

torch.manual_seed(SEED)  # the same new weights on every rank (DDP broadcasts rank 0's anyway)
use_teacher = UTA_WEIGHT > 0  # without it no masking either: every token, per-frame features (retrieval fine-tuning)
ckpt = training.resume(OUT_DIR, world_size, device, 'text_config')  # OUT_DIR/last.pt, or None for a new run
source = ckpt if ckpt is not None else training.read_checkpoint(INIT)
if use_teacher or 'text_config' not in source:  # CLIP's visual tower teaches, its text tower starts the text side
    clip_model = build_clip(TEACHER, teacher_weights)
# The architecture comes from the checkpoint; frames, size and regularization from the constants. The
# position table is fixed sin-cos, so 4 frames simply use the first rows of the 8-frame table.
overrides = {} if ckpt is not None else dict(num_frames=NUM_FRAMES, img_size=IMG_SIZE, drop_path=DROP_PATH,
                                             checkpoint_blocks=CHECKPOINT_BLOCKS)
if 'text_config' in source:  # our stage-2 model: resume, or retrieval fine-tuning
    raw_model, report = checkpoints.load(source, 'umt', name=ckpt_path if ckpt else INIT, **overrides)
else:
    vision, report = checkpoints.load(source, 'vit', name=INIT, **overrides)
    if vision.config.align_layers == 0:
        fail(f'INIT={INIT} has no alignment heads: stage 2 continues the stage-1 alignment (UTA)')
    raw_model = build_umt(vision, clip_model, EMBED_DIM, FUSION_LAYER)
    from_clip = {'text_encoder.' + k for k in clip_text_state_dict(clip_model)}
    new = [k for k in raw_model.state_dict() if not k.startswith('vision_encoder.') and k not in from_clip]
    report += [f'text encoder: {len(from_clip)} tensors from the text tower of {TEACHER} ({teacher_weights})',
               f'new in stage 2: {checkpoints.group(new, parts=4)}']
source = None
vision_config = raw_model.vision_encoder.config
raw_model.to(device)  # unwrapped: what is saved and evaluated
if use_teacher:
    teacher = CLIPTeacher(clip_model, vision_config.align_layers, TEACHER_SIZE).to(device)
    # Frozen: eval mode, no gradients, never in DDP, the optimizer or a checkpoint (rebuilt on resume).
    teacher.eval().requires_grad_(False)
    p, grid = vision_config.patch_size, teacher.image_size // teacher.patch
    if IMG_SIZE // p != grid or vision_config.teacher_dim != teacher.visual.proj.shape[1]:
        fail(f'student ({IMG_SIZE // p}x{IMG_SIZE // p} patches, heads to width {vision_config.teacher_dim}) and '
             f'teacher ({grid}x{grid}, width {teacher.visual.proj.shape[1]}) do not fit; set TEACHER_SIZE = '
             f'{IMG_SIZE // p * teacher.patch} or use the teacher of stage 1')
clip_model = None  # the text tower was copied into raw_model; the teacher keeps the visual tower

# ----------------------------------------------------------------------------------------------
# Optimizer (AdamW, no decay on 1-D / 0-D parameters), resume, compile, DDP

optimizer = training.adamw(raw_model, LR, WEIGHT_DECAY, BETAS)
step = 0
if ckpt is not None:  # the run goes on where the checkpoint stopped: weights (above), optimizer, loss scale, step
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
    step = ckpt['step']
    report.append(training.resumed_line(ckpt, config, ckpt_path, steps_per_epoch))
    ckpt = None  # its tensors would stay in memory for the whole run
if COMPILE:  # the student only, in place: its shapes are static (one graph for videos, one for images), while
    # MLM's masked positions give the text side a new shape every step
    raw_model.vision_encoder.forward = torch.compile(raw_model.vision_encoder.forward, dynamic=False)
# In DDP as a whole: UMT's forward computes the four losses, one DDP forward per step; DDP averages the gradients.
model = DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == 'cuda' else None) \
    if world_size > 1 else raw_model
model.train()
if master:
    trained = sum(p.numel() for p in raw_model.parameters())
    print('\n'.join(report + [
        f'{VIDEO_BATCH} video / {IMAGE_BATCH if IMAGE_ANN else 0} image pairs per step over {world_size} processes, '
        f'{", ".join(f"{n} {m}" for m, n in steps_of.items())} steps per epoch | lr {LR:g} after {warmup_steps} warmup '
        f'steps, floor {LR * MIN_LR_RATIO:g} | text fusion from block {raw_model.text_encoder.fusion_layer} | teacher '
        + (f'{TEACHER} ({teacher_weights}), frozen' if use_teacher else 'off: every token'),
        f'{trained / 1e6:.2f}M parameters | {str(dtype)[6:]} on {device}, compile {COMPILE} | {total_steps} steps']))
    training.write_log(OUT_DIR, {'config': config, 'world_size': world_size, 'start_step': step})

# ----------------------------------------------------------------------------------------------
# Training loop. No gradient accumulation: the VTC loss over the global batch does not split into micro-batches.

epoch, position = divmod(step, steps_per_epoch)
done = {m: epoch * steps_of[m] + schedule(epoch)[:position].count(m) for m in sets}  # batches each stream gave
streams = {m: training.train_batches(ds, global_batch[m] // world_size, training.seed_for(SEED, m), rank, world_size,
                                     NUM_WORKERS, done[m], steps_of[m]) for m, ds in sets.items()}
# The official all-gather keeps only this rank's share of the contrastive gradient: 1/world_size of ours.
vtc_weight = VTC_WEIGHT / world_size if VTC_GRAD == 'official' else VTC_WEIGHT
loss_weights = torch.tensor([vtc_weight, VTM_WEIGHT, MLM_WEIGHT, UTA_WEIGHT], device=device)
meter = training.Meter(dict.fromkeys(['loss', 'vtc', 'vtm', 'mlm', 'uta', 'temp'], 0), device, step)
bar = tqdm(total=total_steps, initial=step, disable=not master, desc='stage 2', dynamic_ncols=True)
last_ckpt_step = step  # 0: none yet
while step < total_steps:
    epoch, position = divmod(step, steps_per_epoch)
    # Randomness is a function of the step number, so a resumed run replays it exactly: masks, MLM
    # corruption, VTM negatives and stochastic depth all draw from this seed (different on every rank).
    torch.manual_seed(training.seed_for(SEED, step, rank))
    lr = training.lr_at(step, total_steps, warmup_steps, LR, LR * MIN_LR_RATIO, clamp=True)
    training.set_lr(optimizer, lr)
    media = schedule(epoch)[position]
    batch = meter.next(streams[media])
    video = data.normalize(batch['video'].to(device, non_blocking=True))  # [B, 3, T, H, W]; T = 1 for images
    # Pair keys [B, 2]: the video (or image) file and the caption text, as crc32 (the same on every rank); VTC and
    # VTM treat pairs that share either as positives: captions of the same video (MSRVTT lists each of them as
    # its own pair) and a caption repeated across videos are not false negatives.
    paths = [sets[media].items[i].path for i in batch['index'].tolist()]
    ids = torch.tensor([[zlib.crc32(p.encode()), zlib.crc32(c.encode())] for p, c in zip(paths, batch['caption'])],
                       device=device)
    input_ids, attention_mask = (x.to(device) for x in tokenize(batch['caption'], MAX_TEXT_LEN))  # [B, L] each
    keep = targets = None                                               # no teacher: every token, no UTA
    if use_teacher:
        with torch.no_grad(), autocast:
            # The teacher sees the full clip; its attention picks the visible tokens (more of them for images).
            hidden, attn = teacher.encode(video)                        # [K, B, N, E], [B, T, h*w]
            keep = masking.make_mask(MASK_TYPE, attn, VIDEO_MASK_RATIO if video.shape[2] > 1 else IMAGE_MASK_RATIO)
            targets = teacher.targets(hidden, keep)                     # [K, B, N_vis, C] unit vectors
    with autocast:
        parts = model(video, keep, targets, input_ids, attention_mask, ids, MLM_PROB if MLM_WEIGHT else 0.0)  # [4]
        loss = (parts * loss_weights).sum()                             # L = L_vtc + L_vtm + L_mlm + L_uta (paper)
    scaler.scale(loss).backward()

    # ---- the update: unscale, clip, step; skipped, on every rank alike, when the loss or a gradient is not finite
    scaler.unscale_(optimizer)  # the true gradients (fp16 scaled them up), before measuring or clipping them
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), GRAD_CLIP or math.inf)  # inf: only measured
    good = training.finite_everywhere(loss, None if scaler.is_enabled() else grad_norm)  # fp16: the scaler's job
    if good:
        scaler.step(optimizer)  # = optimizer.step(); with fp16, skipped if a gradient overflowed
    scaler.update()             # fp16: the next loss scale
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        raw_model.temp.clamp_(0.001, 0.5)  # the official bounds on the temperature
    step += 1
    bar.update()

    # ---- log, checkpoint, and a VTC retrieval check on VAL_ANN after every epoch
    # a skipped step is counted, its losses left out of the averages
    meter.add(good, loss=loss, vtc=parts[0], vtm=parts[1], mlm=parts[2], uta=parts[3], temp=raw_model.temp)
    if step % LOG_INTERVAL == 0 or step == total_steps or meter.bad_in_a_row == MAX_BAD_STEPS:
        record = meter.record(step, steps_per_epoch, lr, grad_norm)
        if master:
            training.log(OUT_DIR, record, NUM_WORKERS, device, bar)
    training.stop_if_bad(meter, MAX_BAD_STEPS, step, ckpt_path, last_ckpt_step)  # MAX_BAD_STEPS in a row
    if good and (step % CKPT_INTERVAL == 0 or step == total_steps):
        if master:  # atomic: a crash while writing leaves the previous last.pt whole
            training.save_checkpoint({'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(),
                                      'scaler': scaler.state_dict(), 'step': step, 'config': config,
                                      'model_config': dataclasses.asdict(vision_config),
                                      'text_config': raw_model.text_config}, ckpt_path)
        last_ckpt_step = step
    if val_set is not None and step % steps_per_epoch == 0:  # every rank encodes its share
        r1 = evaluate_retrieval(raw_model, val_set, device, k_test=0, workers=0)['vtc']['t2v_R@1']
        raw_model.train()
        if master:
            tqdm.write(f'epoch {step // steps_per_epoch}: text->video R@1 {r1:.1f}% on {VAL_ANN} (VTC, chance '
                       f'{100 / len(val_set):.1f}%)')
            training.write_log(OUT_DIR, {'step': step, 'epoch': step // steps_per_epoch, 'val_t2v_r1': r1})

# ----------------------------------------------------------------------------------------------
# Cleanup

bar.close()
if master:
    print(f'done: {step} steps, {meter.skipped_steps} skipped; weights in {ckpt_path} (step {last_ckpt_step}), log in '
          f'{OUT_DIR}/log.jsonl')
if world_size > 1:
    dist.barrier()  # leave together: a rank that leaves first makes gloo abort the others
    dist.destroy_process_group()
