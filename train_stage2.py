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
     MLM  masked language modelling (50% of the tokens), the fusion blocks reading the video.
The defaults are the paper's UMT-B/16 on the 5M corpus (WebVid-2M + CC3M), 16 GPUs x 128 pairs
(the official multi_modality/exp/pretraining/b16_5m.py).

The text side (TEXT_ENCODER): 'clip', ours by default, the text tower of the same open_clip
checkpoint as the teacher (offline, one checkpoint for both); 'bert', the paper's: bert-base-uncased
(bert-large-uncased for an L/16 student), downloaded once. A stage-2 INIT (ours, or an official
stage-2 .pth with TEXT_ENCODER='bert') is loaded whole, its text side included.

    torchrun --standalone --nproc_per_node=8 train_stage2.py --init=out/stage1/last.pt   # 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=umt2 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 train_stage2.py            # on each of 2 nodes: the paper's 16
    python train_stage2.py --init=b16_ptk710_f8_res224.pth --video_batch=128 \
        --image_batch=128                                           # 1 GPU, official stage 1
    python train_stage2.py --text_encoder=bert                      # the paper's BERT text side
    python train_stage2.py --preset=paper_l16                       # UMT-L/16, CLIP-L/14 teacher
    python train_stage1.py --preset=demo && python train_stage2.py --preset=demo   # CPU, minutes
    python train_stage2.py --preset=demo --text_encoder=bert        # CPU: a tiny random BERT

--init and --teacher_pretrained also take hf://OWNER/REPO/FILE (e.g. the official checkpoints of the
Hugging Face repo OpenGVLab/UMT), fetched once. After a crash, the same command resumes from
OUT_DIR/last.pt.
"""

import dataclasses
import functools
import math
import os
import sys
import time
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
from teacher import CLIPTeacher, build_clip
from util import bert, checkpoints
from util.configurator import (check_pretrained, configure, fail, need_files, need_init,
                               need_positive, user_input)
from util.evaluation import evaluate_retrieval
from util.wordpiece import Tokenizer, vocab_from_texts
from video_language import build_umt, build_umt_bert, clip_text_state_dict

# ----------------------------------------------------------------------------------------------
# Configuration: the paper's values, changed by --preset=NAME and --name=value (configure)

# data: the official JSON list (or JSONL) of {"video" | "image": path, "caption": str | [str]}
VIDEO_ANN = 'data/webvid2m_train.json'  # video-text pairs (paper 5M: WebVid-2M)
VIDEO_ROOT = ''                    # folder the video paths start from
IMAGE_ANN = 'data/cc3m_train.json'  # image-text pairs (paper 5M: CC3M); '' = videos only
IMAGE_ROOT = ''
VAL_ANN = ''                       # video-text set for a VTC text->video R@1 after every epoch
                                   # ('' = none; the full protocol is evaluate.py retrieval)
VAL_ROOT = ''
MAKE_DEMO = False                  # write the synthetic demo set into VIDEO_ROOT if VIDEO_ANN is
                                   # missing
NUM_FRAMES = 4                     # T per video, one random frame per segment (paper: 4; 12 for
                                   # retrieval fine-tuning)
IMG_SIZE = 224                     # RandomResizedCrop(scale 0.5-1) + flip to this size (paper: 224)
MAX_TEXT_LEN = 32                  # L, text tokens with [sot] and [eot] (CLIP) or [CLS] (BERT)
                                   # (paper: 32)
NUM_WORKERS = min(6, training.CORES)  # decoding processes per GPU, per media (official: 6)
DECODE_THREADS = 1                 # PyAV threads per worker
MAX_BAD_FRACTION = 0.05            # stop when more than this fraction of the files cannot be read
# model
INIT = 'out/stage1/last.pt'        # stage 1 (ours or an official .pth: its video encoder, the
                                   # text side from TEXT_ENCODER) or a stage-2 model (all of it:
                                   # fine-tuning); hf://OWNER/REPO/FILE is fetched once
TEXT_ENCODER = 'clip'              # 'clip': the text tower of TEACHER's CLIP (ours); 'bert': BERT
                                   # (paper; util/bert.py)
BERT_INIT = 'released'             # 'released': bert-base-uncased (bert-large-uncased for L/16)
                                   # from the Hugging Face hub, once; 'tiny': a random 4-layer BERT
                                   # whose vocabulary is the training captions' words (the demo)
BERT_VOCAB = bert.VOCAB            # WordPiece vocab.txt of the released and the official BERTs
DROP_PATH = 0.1                    # stochastic depth of the last student block (paper: 0.1 B,
                                   # 0.2 L)
EMBED_DIM = None                   # E of the VTC space; None = the paper's 512 (B/16) or 768 (L/16)
FUSION_LAYER = None                # first text block with cross-attention; None = 3/4 of CLIP's
                                   # depth, BERT's 9 of 12 (base) or 19 of 24 (large), as the paper
CHECKPOINT_BLOCKS = 0              # activation checkpointing of the first N student blocks
# teacher (its checkpoint's text tower also initializes the CLIP text side)
TEACHER = 'ViT-B-16-quickgelu'     # open_clip name (paper: ViT-B/16 for B, ViT-L/14 for L);
                                   # 'tiny': the demo CLIP
TEACHER_PRETRAINED = 'openai'      # open_clip tag, a weights file or hf://OWNER/REPO/FILE; None =
                                   # random; 'demo': see the demo preset
TEACHER_SIZE = None                # teacher input px; None = CLIP's own; 196 for L/14 (14 x 14)
# masking
MASK_TYPE = 'semantic'             # 'semantic' (teacher attention, paper), 'tube' or 'random'
VIDEO_MASK_RATIO = 0.8             # fraction of each frame's tokens hidden (paper: 0.8)
IMAGE_MASK_RATIO = 0.5             # the same for images (paper: 0.5)
# losses
MLM_PROB = 0.5                     # fraction of the text tokens masked (paper: 0.5; BERT's: 0.15)
VTC_WEIGHT = 1.0                   # paper: all four losses weigh 1
VTM_WEIGHT = 1.0
MLM_WEIGHT = 1.0
UTA_WEIGHT = 1.0                   # 0 = no teacher: no masking, every token, per-frame features
VTC_GRAD = 'global'                # 'global': the contrastive gradient of the global batch;
                                   # 'official': 1/world_size of it, as the official all-gather
# optimization. No gradient accumulation: the VTC loss over a global batch does not split.
VIDEO_BATCH = 2048                 # video-text pairs per video step over all GPUs (paper: 16 x 128)
IMAGE_BATCH = 2048                 # image-text pairs per image step over all GPUs (paper: 16 x 128)
LR = 1e-4                          # peak lr, not scaled with the batch (paper: 1e-4)
MIN_LR_RATIO = 0.01                # lr = LR x max(this, warmup ramp or half-cosine) (paper: 0.01)
WARMUP_EPOCHS = 1                  # linear warmup, per iteration (paper: 1)
EPOCHS = 10                        # paper: 10
WEIGHT_DECAY = 0.02                # AdamW, none on biases, norms and the temperature (paper: 0.02)
BETAS = (0.9, 0.999)               # AdamW betas (paper: 0.9, 0.999)
GRAD_CLIP = None                   # max gradient norm; None = not clipped, only logged (paper)
MAX_BAD_STEPS = 5                  # a non-finite loss skips the step; this many in a row stop
# system
DEVICE = 'auto'                    # 'auto' = the GPU when there is one; 'cpu' forces the CPU
DTYPE = 'auto'                     # 'auto' = bf16 on recent GPUs, fp16 + loss scaling on older
                                   # ones, fp32 on the CPU
COMPILE = True                     # torch.compile the student (one graph per media); False to debug
SEED = 0                           # new weights, data order, schedule, masks, negatives
LOG_INTERVAL = 20                  # steps between log lines (each costs a host sync)
CKPT_INTERVAL = 500                # steps between checkpoints (OUT_DIR/last.pt, also at the end)
OUT_DIR = 'out/stage2'             # checkpoints and log.jsonl

PRESETS = {
    'paper_b16': {},
    'paper_l16': {'INIT': 'out/stage1_l16/last.pt', 'TEACHER': 'ViT-L-14-quickgelu',
                  'TEACHER_SIZE': 196, 'DROP_PATH': 0.2, 'VIDEO_BATCH': 4096,  # paper: 32 x 128
                  'IMAGE_BATCH': 4096, 'OUT_DIR': 'out/stage2_l16'},
    # After `python train_stage1.py --preset=demo`. The demo has 180 training videos and 6 images.
    'demo': {'VIDEO_ANN': 'demo_data/captions_train.json', 'VIDEO_ROOT': 'demo_data',
             'MAKE_DEMO': True, 'IMAGE_ANN': 'demo_data/captions_images.json',
             'IMAGE_ROOT': 'demo_data', 'VAL_ANN': 'demo_data/captions_val.json',
             'VAL_ROOT': 'demo_data', 'INIT': 'out/demo_stage1/last.pt', 'BERT_INIT': 'tiny',
             'TEACHER': 'tiny', 'TEACHER_PRETRAINED': 'demo', 'IMG_SIZE': 64, 'DROP_PATH': 0.0,
             'VIDEO_BATCH': 16, 'IMAGE_BATCH': 4, 'LR': 1e-3, 'EPOCHS': 30, 'COMPILE': False,
             'NUM_WORKERS': 1, 'LOG_INTERVAL': 10, 'CKPT_INTERVAL': 100,
             'OUT_DIR': 'out/demo_stage2'},
    # Retrieval fine-tuning from a stage-2 model (official exp/finetuning/ret_msrvtt/b16_25m.py):
    # VTC + VTM only, no teacher and no masking, 12 frames, 8 GPUs x 32 pairs. mc_msrvtt is the
    # training inside the official MSRVTT-MC script (7k split, then `python -m tasks.video_qa mc`).
    'ret_msrvtt': {'INIT': 'out/stage2/last.pt', 'VIDEO_ANN': 'data/msrvtt_ret_train9k.json',
                   'IMAGE_ANN': '', 'VAL_ANN': 'data/msrvtt_ret_test1k.json', 'NUM_FRAMES': 12,
                   'UTA_WEIGHT': 0.0, 'MLM_WEIGHT': 0.0, 'DROP_PATH': 0.2, 'VIDEO_BATCH': 256,
                   'LR': 1e-5, 'OUT_DIR': 'out/ret_msrvtt'},
    'mc_msrvtt': {'INIT': 'out/stage2/last.pt', 'VIDEO_ANN': 'data/msrvtt_ret_train7k.json',
                  'IMAGE_ANN': '', 'NUM_FRAMES': 12, 'UTA_WEIGHT': 0.0, 'MLM_WEIGHT': 0.0,
                  'DROP_PATH': 0.2, 'VIDEO_BATCH': 256, 'LR': 8e-5, 'EPOCHS': 5,
                  'WARMUP_EPOCHS': 0, 'OUT_DIR': 'out/mc_msrvtt'},
    'ret_demo': {'INIT': 'out/demo_stage2/last.pt', 'VIDEO_ANN': 'demo_data/captions_train.json',
                 'VIDEO_ROOT': 'demo_data', 'IMAGE_ANN': '',
                 'VAL_ANN': 'demo_data/captions_val.json', 'VAL_ROOT': 'demo_data',
                 'NUM_FRAMES': 12, 'IMG_SIZE': 64, 'UTA_WEIGHT': 0.0,
                 'MLM_WEIGHT': 0.0, 'DROP_PATH': 0.0, 'VIDEO_BATCH': 16, 'LR': 1e-4, 'EPOCHS': 5,
                 'COMPILE': False, 'NUM_WORKERS': 1, 'LOG_INTERVAL': 6, 'OUT_DIR': 'out/demo_ret'},
}

config = configure(globals(), PRESETS, sys.argv[1:])

# Check the constants before anything heavy happens, so a typo costs seconds, not a queue slot.
world_size = int(os.environ.get('WORLD_SIZE', 1))  # torchrun sets it; the process group comes later
for name, batch in (('VIDEO_BATCH', VIDEO_BATCH), ('IMAGE_BATCH', IMAGE_BATCH)):
    if batch % world_size or batch // world_size < 2:
        fail(f'{name}={batch} must be divisible by {world_size} processes, with at least 2 pairs '
             'per process (VTM draws its negatives from the same GPU)')
for name, ratio in (('VIDEO_MASK_RATIO', VIDEO_MASK_RATIO), ('IMAGE_MASK_RATIO', IMAGE_MASK_RATIO),
                    ('MLM_PROB', MLM_PROB)):
    if not 0 < ratio < 1:
        fail(f'{name}={ratio} must lie strictly between 0 and 1')
if MASK_TYPE not in ('semantic', 'tube', 'random') or VTC_GRAD not in ('global', 'official'):
    fail(f"MASK_TYPE={MASK_TYPE!r} must be 'semantic', 'tube' or 'random'; VTC_GRAD={VTC_GRAD!r} "
         "'global' or 'official'")
if TEXT_ENCODER not in ('clip', 'bert') or BERT_INIT not in ('released', 'tiny'):
    fail(f"TEXT_ENCODER={TEXT_ENCODER!r} must be 'clip' or 'bert'; BERT_INIT={BERT_INIT!r} "
         "'released' or 'tiny'")
need_positive(EPOCHS=EPOCHS, NUM_FRAMES=NUM_FRAMES, IMG_SIZE=IMG_SIZE, MAX_TEXT_LEN=MAX_TEXT_LEN,
              LOG_INTERVAL=LOG_INTERVAL, CKPT_INTERVAL=CKPT_INTERVAL, MAX_BAD_STEPS=MAX_BAD_STEPS)
# hf://OWNER/REPO/FILE: fetched once into the Hugging Face cache (a resumed run needs no INIT)
resuming = os.path.exists(os.path.join(OUT_DIR, 'last.pt'))
init_file = INIT if resuming else training.resolve(INIT, 'INIT')
need_init(init_file, OUT_DIR, 'a train_stage1.py checkpoint (out/stage1/last.pt), an official UMT '
          'stage-1 .pth or a stage-2 model', 'python train_stage1.py --preset=demo')
teacher_pretrained = training.resolve(TEACHER_PRETRAINED, 'TEACHER_PRETRAINED')
check_pretrained(teacher_pretrained)  # a weights file that is not there
need_files({'VIDEO_ANN': VIDEO_ANN, 'IMAGE_ANN': IMAGE_ANN, 'VAL_ANN': VAL_ANN}, 'a JSON list (or '
           'JSONL) of {"video" or "image": path, "caption": text or [texts]}, paths relative to '
           'the matching *_ROOT. Try `--preset=demo` first.', MAKE_DEMO)

# ----------------------------------------------------------------------------------------------
# Processes: torchrun starts one per GPU (NCCL) or per CPU share (gloo); python runs one. Precision.

rank, world_size, device = training.init_distributed(DEVICE)  # joins torchrun's process group
master = rank == 0                                  # rank 0 logs, checkpoints, makes the demo set
dtype = training.pick_dtype(device, DTYPE)          # bf16 on recent GPUs, fp16 on older, fp32 CPU
autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
# fp16 gradients underflow unless the loss is scaled
scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
lock = training.lock_out_dir(OUT_DIR) if master else None  # a second run on OUT_DIR stops here
ckpt_path = os.path.join(OUT_DIR, 'last.pt')

# ----------------------------------------------------------------------------------------------
# Data: one loader per media, each batch all-video or all-image; the schedule interleaves them

# The demo (--preset=demo) writes its synthetic set and trains its stand-in for OpenAI's CLIP, once.
teacher_weights = teacher_pretrained
if MAKE_DEMO:
    teacher_weights = demo.setup(VIDEO_ROOT, VIDEO_ANN, MAKE_DEMO, teacher_pretrained, master, SEED)
with user_input():  # an annotation file that cannot be read
    sets = {media: data.VideoText(ann, root, NUM_FRAMES, IMG_SIZE, 'train', media=media,
                                  max_bad_fraction=MAX_BAD_FRACTION, threads=DECODE_THREADS)
            for media, ann, root in (('video', VIDEO_ANN, VIDEO_ROOT),
                                     ('image', IMAGE_ANN, IMAGE_ROOT)) if ann}
    val_set = data.VideoText(VAL_ANN, VAL_ROOT, NUM_FRAMES, IMG_SIZE, 'eval', media='video') \
        if VAL_ANN else None
global_batch = {'video': VIDEO_BATCH, 'image': IMAGE_BATCH}
steps_of = {m: len(ds) // global_batch[m] for m, ds in sets.items()}  # incomplete batches dropped
if min(steps_of.values()) == 0:
    fail(f'fewer pairs than one batch: {({m: len(ds) for m, ds in sets.items()})} vs '
         f'{global_batch}')
steps_per_epoch = sum(steps_of.values())
total_steps, warmup_steps = EPOCHS * steps_per_epoch, WARMUP_EPOCHS * steps_per_epoch

@functools.lru_cache(maxsize=2)
def schedule(epoch):
    """Which media each step of an epoch uses: every loader's batches, shuffled (the official
    MetaLoader). A function of (SEED, epoch) only: the same on every rank and after a resume."""
    order = [m for m in sets for _ in range(steps_of[m])]
    np.random.default_rng([SEED, epoch]).shuffle(order)
    return order

# ----------------------------------------------------------------------------------------------
# Models: the frozen teacher, and the video-language model (student + text side)

torch.manual_seed(SEED)  # the same new weights on every rank (DDP broadcasts rank 0's anyway)
use_teacher = UTA_WEIGHT > 0  # without it no masking either: every token, per-frame features
ckpt = training.resume(OUT_DIR, world_size, device, 'text_config')  # last.pt, None for a new run
source = checkpoints.read(ckpt if ckpt is not None else init_file, ckpt_path if ckpt else INIT)
# A stage-2 INIT is loaded whole: ours, or an official one when its BERT is wanted
whole = source.kind == 'umt' and (source.ours is not None or TEXT_ENCODER == 'bert')
if use_teacher or (not whole and TEXT_ENCODER == 'clip'):  # teaches; its text tower: the CLIP side
    with user_input():
        clip_model = demo.tiny_clip(teacher_weights) if TEACHER == 'tiny' else \
            build_clip(TEACHER, teacher_weights)
# The architecture comes from the checkpoint; frames, size and regularization from the constants.
# The position table is fixed sin-cos, so 4 frames simply use the first rows of the 8-frame table.
overrides = {} if ckpt is not None else dict(num_frames=NUM_FRAMES, img_size=IMG_SIZE,
                                             drop_path=DROP_PATH,
                                             checkpoint_blocks=CHECKPOINT_BLOCKS)
if whole:  # resume, fine-tuning, or stage 2 on from an official stage-2 model
    raw_model, report = checkpoints.load_stage2(source, vocab=BERT_VOCAB, **overrides)
else:
    vision, report = checkpoints.load_vit(source, **overrides)
    if vision.config.align_layers == 0:
        fail(f'INIT={INIT} has no alignment heads: stage 2 continues the stage-1 alignment (UTA)')
    if TEXT_ENCODER == 'clip':
        raw_model = build_umt(vision, clip_model, EMBED_DIM, FUSION_LAYER)
        loaded = {'text_encoder.' + k for k in clip_text_state_dict(clip_model)}
        report.append(f'text encoder: {len(loaded)} tensors from the text tower of {TEACHER} '
                      f'({teacher_weights})')
    else:  # BERT: the released weights (B/16: base, L/16: large), or the demo's tiny random one
        size = 'tiny' if BERT_INIT == 'tiny' else 'large' if vision.config.embed_dim >= 1024 \
            else 'base'
        if BERT_INIT == 'tiny':  # its vocabulary: the words and letters of the training captions
            captions = [c for ds in sets.values() for it in ds.items for c in it.captions]
            tokenizer, released = Tokenizer(vocab_from_texts(captions)), None
        else:
            tokenizer = Tokenizer(training.resolve(BERT_VOCAB, 'BERT_VOCAB'))
            weights = f'hf://google-bert/bert-{size}-uncased/model.safetensors'
            released = checkpoints.read_file(weights, 'the released BERT weights')
        base = bert.CONFIGS[size]
        bert_config = dataclasses.replace(base, vocab_size=len(tokenizer.tokens),
                                          fusion_layer=base.fusion_layer if FUSION_LAYER is None
                                          else FUSION_LAYER)
        raw_model, new_text = build_umt_bert(vision, bert_config, tokenizer,
                                             EMBED_DIM or bert.EMBED_DIMS[size], released)
        loaded = {'text_encoder.' + k for k in raw_model.text_encoder.state_dict()
                  if k not in new_text}
        origin = 'random weights' if released is None else f'{len(loaded)} tensors from {weights}'
        report.append(f'text encoder: BERT-{size}, {origin}, a vocabulary of '
                      f'{len(tokenizer.tokens)} tokens')
    new = [k for k in raw_model.state_dict() if not k.startswith('vision_encoder.')
           and k not in loaded]
    report.append(f'new in stage 2: {checkpoints.group(new, parts=4)}')
source = None
if MAX_TEXT_LEN > raw_model.text_encoder.max_len:
    fail(f'MAX_TEXT_LEN={MAX_TEXT_LEN}: the text side has {raw_model.text_encoder.max_len} '
         'positions')
vision_config = raw_model.vision_encoder.config
raw_model.to(device)  # unwrapped: what is saved and evaluated
if use_teacher:
    teacher = CLIPTeacher(clip_model, vision_config.align_layers, TEACHER_SIZE).to(device)
    # Frozen: eval mode, no gradients, never in DDP, the optimizer or a checkpoint (rebuilt on
    # resume).
    teacher.eval().requires_grad_(False)
    p, grid = vision_config.patch_size, teacher.image_size // teacher.patch
    if IMG_SIZE // p != grid or vision_config.teacher_dim != teacher.visual.proj.shape[1]:
        fail(f'student ({IMG_SIZE // p}x{IMG_SIZE // p} patches, heads to width '
             f'{vision_config.teacher_dim}) and teacher ({grid}x{grid}, width '
             f'{teacher.visual.proj.shape[1]}) do not fit; set TEACHER_SIZE = '
             f'{IMG_SIZE // p * teacher.patch} or use the teacher of stage 1')
clip_model = None  # the text tower was copied into raw_model; the teacher keeps the visual tower

# ----------------------------------------------------------------------------------------------
# Optimizer (AdamW, no decay on 1-D / 0-D parameters), resume, compile, DDP

optimizer = training.adamw(raw_model, LR, WEIGHT_DECAY, BETAS)
step = 0
if ckpt is not None:  # the run goes on where it stopped: weights (above), optimizer, scale, step
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
    step = ckpt['step']
    report.append(training.resumed_line(ckpt, config, ckpt_path, steps_per_epoch))
    ckpt = None  # its tensors would stay in memory for the whole run
if COMPILE:  # the student only, in place: its shapes are static (one graph for videos, one for
    # images), while MLM's masked positions give the text side a new shape every step
    raw_model.vision_encoder.forward = torch.compile(raw_model.vision_encoder.forward,
                                                     dynamic=False)
# In DDP as a whole: UMT's forward computes the four losses, one DDP forward per step; DDP averages
# the gradients.
model = DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == 'cuda'
                                else None) if world_size > 1 else raw_model
model.train()
if master:
    trained = sum(p.numel() for p in raw_model.parameters())
    pairs = f'{VIDEO_BATCH} video / {IMAGE_BATCH if IMAGE_ANN else 0} image pairs per step'
    steps = ', '.join(f'{n} {m}' for m, n in steps_of.items())
    taught = f'{TEACHER} ({teacher_weights}), frozen' if use_teacher else 'off: every token'
    print('\n'.join(report + [
        f'{pairs} over {world_size} processes, {steps} steps per epoch | lr {LR:g} after '
        f'{warmup_steps} warmup steps, floor {LR * MIN_LR_RATIO:g} | text fusion from block '
        f'{raw_model.text_encoder.fusion_layer} | teacher {taught}',
        f'{trained / 1e6:.2f}M parameters | {str(dtype)[6:]} on {device}, compile {COMPILE} | '
        f'{total_steps} steps']))
    training.write_log(OUT_DIR, {'config': config, 'world_size': world_size, 'start_step': step})

# ----------------------------------------------------------------------------------------------
# Training loop. No gradient accumulation: the VTC loss over the global batch does not split.

epoch, position = divmod(step, steps_per_epoch)
# batches each stream gave so far
done = {m: epoch * steps_of[m] + schedule(epoch)[:position].count(m) for m in sets}
streams = {m: training.train_batches(ds, global_batch[m] // world_size, training.seed_for(SEED, m),
                                     rank, world_size, NUM_WORKERS, done[m], steps_of[m])
           for m, ds in sets.items()}
# The official all-gather keeps only this rank's share of the contrastive gradient: 1/world_size.
vtc_weight = VTC_WEIGHT / world_size if VTC_GRAD == 'official' else VTC_WEIGHT
loss_weights = torch.tensor([vtc_weight, VTM_WEIGHT, MLM_WEIGHT, UTA_WEIGHT], device=device)
log_names = ('loss', 'vtc', 'vtm', 'mlm', 'uta', 'temp')  # the log record's names of stats[:6]
bar = tqdm(total=total_steps, initial=step, disable=not master, desc='stage 2', dynamic_ncols=True)
last_ckpt_step, skipped, bad_in_a_row = step, 0, 0  # the last checkpoint (0: none), bad steps
t_log, step_log, data_wait, replaced = time.perf_counter(), step, 0.0, 0  # since the last log line
while step < total_steps:
    epoch, position = divmod(step, steps_per_epoch)
    # Randomness is a function of the step number, so a resumed run replays it exactly: masks, MLM
    # corruption, VTM negatives and stochastic depth all draw from this seed (other on every rank).
    torch.manual_seed(training.seed_for(SEED, step, rank))
    lr = training.lr_at(step, total_steps, warmup_steps, LR, LR * MIN_LR_RATIO, clamp=True)
    training.set_lr(optimizer, lr)
    media = schedule(epoch)[position]
    t0 = time.perf_counter()
    batch = next(streams[media])
    data_wait += time.perf_counter() - t0
    replaced += int(batch['skipped'].sum())  # unreadable files the dataset replaced
    video = data.normalize(batch['video'].to(device, non_blocking=True))  # [B, 3, T, H, W]
    # Pair keys [B, 2]: the video (or image) file and the caption text, as crc32 (the same on every
    # rank); VTC and VTM treat pairs that share either as positives: captions of the same video
    # (MSRVTT lists each of them as its own pair) and a caption repeated across videos are not
    # false negatives.
    paths = [sets[media].items[i].path for i in batch['index'].tolist()]
    ids = torch.tensor([[zlib.crc32(p.encode()), zlib.crc32(c.encode())]
                        for p, c in zip(paths, batch['caption'])], device=device)
    # [B, L] each, by the text side's tokenizer
    input_ids, attention_mask = (x.to(device) for x in raw_model.tokenizer(batch['caption'],
                                                                          MAX_TEXT_LEN))
    keep = targets = None                                     # no teacher: every token, no UTA
    if use_teacher:
        with torch.no_grad(), autocast:
            # The teacher sees the full clip; its attention picks the visible tokens.
            hidden, attn = teacher.encode(video)                     # [K, B, N, E], [B, T, h*w]
            ratio = VIDEO_MASK_RATIO if video.shape[2] > 1 else IMAGE_MASK_RATIO
            keep = masking.make_mask(MASK_TYPE, attn, ratio)
            targets = teacher.targets(hidden, keep)                  # [K, B, N_vis, C] unit vectors
    with autocast:
        parts = model(video, keep, targets, input_ids, attention_mask, ids,
                      MLM_PROB if MLM_WEIGHT else 0.0)               # [4]
        loss = (parts * loss_weights).sum()                   # L = vtc + vtm + mlm + uta (paper)
    scaler.scale(loss).backward()

    # ---- the update: unscale, clip, step; skipped on every rank alike when a loss or gradient is
    # not finite
    scaler.unscale_(optimizer)  # the true gradients (fp16 scaled them up), before measuring them
    # inf: only measured
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), GRAD_CLIP or math.inf)
    # with fp16 the scaler judges the gradients
    good = training.finite_everywhere(loss, None if scaler.is_enabled() else grad_norm)
    if good:
        scaler.step(optimizer)  # = optimizer.step(); with fp16, skipped if a gradient overflowed
    scaler.update()             # fp16: the next loss scale
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        raw_model.temp.clamp_(0.001, 0.5)  # the official bounds on the temperature
    step += 1
    bar.update()

    # ---- log this step (its losses averaged over the ranks: a host sync, so every LOG_INTERVAL)
    skipped, bad_in_a_row = skipped + (not good), 0 if good else bad_in_a_row + 1
    if step % LOG_INTERVAL == 0 or step == total_steps or bad_in_a_row == MAX_BAD_STEPS:
        stats = torch.cat([loss.detach()[None], parts.detach(), raw_model.temp.detach()[None],
                           loss.new_tensor([replaced])])
        stats = training.all_reduce_mean(stats.float()).tolist()  # loss, vtc, vtm, mlm, uta, temp
        seconds, done = time.perf_counter() - t_log, step - step_log
        record = {'step': step, 'epoch': step / steps_per_epoch,
                  **{k: v if good else None for k, v in zip(log_names, stats)}, 'lr': lr,
                  'grad_norm': grad_norm.item() if good else None,
                  'ms_per_step': 1000 * seconds / done, 'data_wait': data_wait / seconds,
                  'skipped_steps': skipped, 'replaced_samples': round(stats[-1] * world_size)}
        if master:
            training.write_log(OUT_DIR, record)
            tqdm.write(f'step {step} | loss {stats[0]:.4f} (vtc {stats[1]:.3f}, vtm {stats[2]:.3f},'
                       f' mlm {stats[3]:.3f}, uta {stats[4]:.3f}) | lr {lr:.3g} | '
                       f'{record["ms_per_step"]:.0f} ms/step | data wait {record["data_wait"]:.0%}')
        t_log, step_log, data_wait, replaced = time.perf_counter(), step, 0.0, 0
    if bad_in_a_row == MAX_BAD_STEPS:  # the loss diverged: stop, and name the checkpoint to resume
        last = f'{ckpt_path} (step {last_ckpt_step})' if last_ckpt_step else 'none written yet'
        fail(f'{MAX_BAD_STEPS} non-finite losses in a row '
             f'(steps {step + 1 - MAX_BAD_STEPS}-{step}): stopping. The last good checkpoint is '
             f'{last}: lower the learning rate, then launch again.')

    # ---- checkpoint, and a VTC retrieval check on VAL_ANN after every epoch
    if good and (step % CKPT_INTERVAL == 0 or step == total_steps):
        if master:  # atomic: a crash while writing leaves the previous last.pt whole
            training.save_checkpoint({'model': raw_model.state_dict(),
                                      'optimizer': optimizer.state_dict(),
                                      'scaler': scaler.state_dict(), 'step': step, 'config': config,
                                      'model_config': dataclasses.asdict(vision_config),
                                      'text_config': raw_model.text_config}, ckpt_path)
        last_ckpt_step = step
    if val_set is not None and step % steps_per_epoch == 0:  # every rank encodes its share
        r1 = evaluate_retrieval(raw_model, val_set, device, k_test=0, workers=0)['vtc']['t2v_R@1']
        raw_model.train()
        if master:
            tqdm.write(f'epoch {step // steps_per_epoch}: text->video R@1 {r1:.1f}% on {VAL_ANN} '
                       f'(VTC, chance {100 / len(val_set):.1f}%)')
            training.write_log(OUT_DIR, {'step': step, 'epoch': step // steps_per_epoch,
                                         'val_t2v_r1': r1})

# ----------------------------------------------------------------------------------------------
# Cleanup

bar.close()
if master:
    print(f'done: {step} steps, {skipped} skipped; weights in {ckpt_path} (step '
          f'{last_ckpt_step}), log in {OUT_DIR}/log.jsonl')
if world_size > 1:
    dist.barrier()  # leave together: a rank that leaves first makes gloo abort the others
    dist.destroy_process_group()
