"""
Stage 1 of Unmasked Teacher (UMT): video-only pre-training of a ViT student against a frozen CLIP.

Paper section 3.1 (Li et al., ICCV 2023). Every optimizer step:
  1. the frozen CLIP teacher encodes every frame of the full, unmasked clip: the patch tokens of its
     last K blocks, and its last block's CLS attention over the patches;
  2. semantic masking keeps, per frame, 20% of the tokens, drawn with the teacher's attention as weights;
  3. the student encodes only those visible tokens, and K heads map its last K blocks into CLIP's space;
  4. L_uta = mean over the K layers and the visible tokens of 2 - 2 cos(student, teacher).
The defaults are the paper's ViT-B/16 recipe on Kinetics-710 (REFERENCE 1.7-1.8).

    torchrun --standalone --nproc_per_node=8 train_stage1.py       # one node of 8 GPUs
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_id=umt --rdzv_backend=c10d \
        --rdzv_endpoint=HOST:29500 train_stage1.py                  # on each of 4 nodes: the paper's 32 GPUs
    python train_stage1.py                                          # one GPU (gradient accumulation 32)
    python train_stage1.py --preset=paper_l16                       # UMT-L/16 with a CLIP-L/14 teacher
    python train_stage1.py --preset=demo                            # CPU, ~2 min: tiny models, synthetic videos
    python train_stage1.py --mask_type=tube --mask_ratio=0.9        # any constant below, as --name=value

Launch the same command again after a crash: the run resumes from OUT_DIR/last.pt.
"""

import dataclasses
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common
import data
import masking
from model import VideoViT, get_config, load_strict, uta_loss
from teacher import build_teacher, train_demo_clip

# ----------------------------------------------------------------------------------------------
# Configuration: the paper's values, changed by --preset=NAME and --name=value (common.configure)

# data
DATA_LIST = 'data/k710_train.csv'  # one video per line, `path,label` (comma, space or tab); labels unused here
DATA_ROOT = ''                     # folder the list's relative paths start from
MAKE_DEMO = False                  # write the synthetic demo set into DATA_ROOT if DATA_LIST is missing (demo)
NUM_FRAMES = 8                     # T, TSN-sparse frames per clip (paper: 8)
IMG_SIZE = 224                     # H = W after the multi-scale crop (paper: 224)
NUM_WORKERS = 10                   # decoding processes per GPU: decoding is CPU-bound, give it the spare cores
DECODE_THREADS = 1                 # PyAV threads per worker (1-2; workers x threads <= cores per GPU)
MAX_BAD_FRACTION = 0.05            # stop when more than this fraction of the videos cannot be decoded
# student
MODEL = 'vit_b16'                  # preset in model.CONFIGS (paper: vit_b16; vit_l16 for UMT-L)
DROP_PATH = 0.1                    # stochastic depth of the last block, linear from 0 (paper: 0.1 B, 0.2 L)
ALIGN_LAYERS = 6                   # K: the last K student blocks regress the last K teacher blocks (paper: 6)
CHECKPOINT_BLOCKS = 0              # activation checkpointing of the first N blocks: less memory, ~1/3 more compute
# teacher
TEACHER = 'ViT-B-16-quickgelu'     # open_clip name (paper: CLIP ViT-B/16 for B, ViT-L/14 for L); 'tiny': 64-px demo CLIP
TEACHER_PRETRAINED = 'openai'      # open_clip tag or a local weights file; None = random; 'demo': see the demo preset
TEACHER_SIZE = None                # teacher input px; None = CLIP's own; 196 for L/14 (14x14 patches like the student)
# masking
MASK_TYPE = 'semantic'             # 'semantic' (teacher attention, paper), 'tube' or 'random' (ablations)
MASK_RATIO = 0.8                   # fraction of each frame's tokens hidden from the student (paper: 0.8)
# optimization
TOTAL_BATCH = 2048                 # clips per optimizer step over all GPUs (paper: 2048 = 32 GPUs x 64)
MICRO_BATCH = 64                   # clips per GPU per forward; accumulation makes up the rest (paper: 64)
BASE_LR = 1.5e-4                   # lr per 256 clips: peak lr = BASE_LR * TOTAL_BATCH / 256 (paper: 1.2e-3 at 2048)
MIN_LR = 1e-5                      # cosine floor per 256 clips, scaled the same way (paper: 8e-5 at 2048)
WARMUP_EPOCHS = 40                 # linear warmup from 0, per iteration (paper: 40)
EPOCHS = 200                       # (paper: 200; the official scripts pass 201 only to dodge a scheduler crash)
WEIGHT_DECAY = 0.05                # AdamW decoupled decay, none on biases and norms (paper: 0.05)
BETAS = (0.9, 0.95)                # AdamW betas (paper: 0.9, 0.95)
GRAD_CLIP = None                   # max gradient norm; None = no clipping, the norm is only logged (paper: None)
MAX_BAD_STEPS = 5                  # a non-finite loss skips the step; this many in a row stop the run
# system
DEVICE = 'auto'                    # 'auto' = the GPU when there is one; 'cpu' forces the CPU
DTYPE = 'auto'                     # 'auto' = bf16 on recent GPUs, fp16 + loss scaling on older ones, fp32 on CPU
COMPILE = True                     # torch.compile the student (~1 min at start, then faster steps); False to debug
SEED = 0                           # initial weights, data order, masks, stochastic depth
LOG_INTERVAL = 20                  # steps between log lines (each costs a host sync)
CKPT_INTERVAL = 500                # steps between checkpoints (OUT_DIR/last.pt, also written at the end)
OUT_DIR = 'out/stage1'             # checkpoints and log.jsonl; multi-node: storage every node can read
# test knobs
MAX_STEPS = None                   # stop after this step without a final checkpoint, as if killed (resume test)
NAN_STEPS = ()                     # steps whose loss is made NaN (the skip test)

PRESETS = {
    'paper_b16': {},
    'paper_l16': {'MODEL': 'vit_l16', 'TEACHER': 'ViT-L-14-quickgelu', 'TEACHER_SIZE': 196, 'DROP_PATH': 0.2,
                  'OUT_DIR': 'out/stage1_l16'},  # lower MICRO_BATCH if it does not fit: accumulation keeps the recipe
    'demo': {'DATA_LIST': 'demo_data/train.csv', 'DATA_ROOT': 'demo_data', 'MAKE_DEMO': True,
             'MODEL': 'tiny', 'TEACHER': 'tiny', 'TEACHER_PRETRAINED': 'demo', 'IMG_SIZE': 64, 'ALIGN_LAYERS': 2,
             'TOTAL_BATCH': 16, 'MICRO_BATCH': 16, 'BASE_LR': 1e-2, 'MIN_LR': 1e-4, 'WARMUP_EPOCHS': 3,
             'EPOCHS': 20, 'DROP_PATH': 0.0, 'COMPILE': False, 'NUM_WORKERS': 1, 'LOG_INTERVAL': 10,
             'CKPT_INTERVAL': 100, 'OUT_DIR': 'out/demo_stage1'},
}

defaults = {k: v for k, v in globals().items() if k.isupper()}
config = common.configure(globals(), PRESETS, sys.argv[1:])


def fail(message):
    raise SystemExit(f'train_stage1.py: {message}')


# Check the constants before anything heavy happens, so a typo costs seconds, not a queue slot.
world_size = int(os.environ.get('WORLD_SIZE', 1))  # torchrun sets it; init_process_group comes later
try:
    base_config = get_config(MODEL)
except ValueError as e:  # an unknown preset: the message lists the valid ones
    fail(str(e))
if TOTAL_BATCH % (MICRO_BATCH * world_size):
    fail(f'TOTAL_BATCH={TOTAL_BATCH} is not divisible by MICRO_BATCH={MICRO_BATCH} x {world_size} processes: '
         f'choose TOTAL_BATCH as a multiple of {MICRO_BATCH * world_size}, or change MICRO_BATCH')
if not 0 < MASK_RATIO < 1:
    fail(f'MASK_RATIO={MASK_RATIO} must lie strictly between 0 and 1 (the fraction of tokens hidden; paper: 0.8)')
if MASK_TYPE not in ('semantic', 'tube', 'random'):
    fail(f"MASK_TYPE={MASK_TYPE!r}; valid: 'semantic', 'tube', 'random'")
if IMG_SIZE % base_config.patch_size or NUM_FRAMES % base_config.tubelet_size:
    fail(f'IMG_SIZE={IMG_SIZE} must be a multiple of the patch size {base_config.patch_size} and '
         f'NUM_FRAMES={NUM_FRAMES} of the tubelet size {base_config.tubelet_size} of {MODEL}')
if TEACHER_PRETRAINED and TEACHER_PRETRAINED.endswith(('.bin', '.pt', '.pth', '.safetensors')) \
        and not os.path.isfile(TEACHER_PRETRAINED):
    fail(f'teacher weights file {TEACHER_PRETRAINED!r} not found. Pass an existing file, or the open_clip tag '
         f"'openai' (downloaded once into the Hugging Face cache; needs the network the first time).")
if not os.path.exists(DATA_LIST) and not MAKE_DEMO:
    fail(f'data list {DATA_LIST!r} not found. It lists one training video per line as `path,label` (or '
         f'`path label`), paths relative to DATA_ROOT, e.g. `abseiling/xyz.mp4,0`; labels are not used in '
         f'stage 1. To try the script first: `python train_stage1.py --preset=demo` (it makes a synthetic set), '
         f'or `python data.py --make-demo demo_data` and pass --data_list=demo_data/train.csv --data_root=demo_data.')

# ----------------------------------------------------------------------------------------------
# Distributed set-up: torchrun's environment -> one process per GPU (or one CPU process per rank)

rank, world_size, device = common.setup_distributed(DEVICE)  # NCCL on GPUs, gloo on CPUs; TF32 on
master = rank == 0
grad_accum = TOTAL_BATCH // (MICRO_BATCH * world_size)       # micro-steps per optimizer step
assert grad_accum * MICRO_BATCH * world_size == TOTAL_BATCH
peak_lr = BASE_LR * TOTAL_BATCH / 256                         # linear scaling rule, as the official scripts
min_lr = MIN_LR * TOTAL_BATCH / 256
autocast, scaler, dtype_name = common.precision(device, DTYPE)
ckpt_path, log_path = os.path.join(OUT_DIR, 'last.pt'), os.path.join(OUT_DIR, 'log.jsonl')
if master:
    os.makedirs(OUT_DIR, exist_ok=True)
    changed = {k: v for k, v in config.items() if v != defaults[k]}
    print('changed from the paper defaults: ' + (', '.join(f'{k}={v!r}' for k, v in changed.items()) or 'nothing'))

# ----------------------------------------------------------------------------------------------
# Data: TSN-sparse frames, multi-scale crop and flip, ImageNet normalization (REFERENCE 1.8)

if not os.path.exists(DATA_LIST):  # MAKE_DEMO is on (checked above): one process writes the demo set
    if master:
        print(f'writing the synthetic demo set to {DATA_ROOT}/ (a few seconds)')
        data.make_demo(DATA_ROOT, seed=0)
    if world_size > 1:
        dist.barrier()
dataset = data.VideoClassification(DATA_LIST, DATA_ROOT, NUM_FRAMES, IMG_SIZE, mode='train', aug='multiscale',
                                   flip=True, max_bad_fraction=MAX_BAD_FRACTION, threads=DECODE_THREADS)
steps_per_epoch = len(dataset) // TOTAL_BATCH  # the incomplete last global batch of an epoch is dropped
if steps_per_epoch == 0:
    fail(f'{DATA_LIST} has {len(dataset)} videos, fewer than one global batch of TOTAL_BATCH={TOTAL_BATCH}')
total_steps, warmup_steps = EPOCHS * steps_per_epoch, WARMUP_EPOCHS * steps_per_epoch

# ----------------------------------------------------------------------------------------------
# Models: the frozen teacher and the student

if TEACHER_PRETRAINED == 'demo':  # the demo's stand-in for OpenAI CLIP: tiny_clip() trained on the demo frames
    TEACHER_PRETRAINED = f'{DATA_ROOT}/tiny_clip.pt'
    if master and not os.path.exists(TEACHER_PRETRAINED):
        print(f'training the demo teacher {TEACHER_PRETRAINED} on single frames and captions (about 30 s)')
        train_demo_clip(f'{DATA_ROOT}/captions_train.json', DATA_ROOT, TEACHER_PRETRAINED)
    if world_size > 1:
        dist.barrier()
torch.manual_seed(SEED)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
try:
    teacher = build_teacher(TEACHER, TEACHER_PRETRAINED, ALIGN_LAYERS, TEACHER_SIZE).to(device)
except RuntimeError as e:  # weights not downloadable / not found: teacher.py's message carries the hint
    fail(str(e))
# Frozen: eval mode, no gradients, never in DDP, the optimizer or a checkpoint (rebuilt on resume).
teacher.eval().requires_grad_(False)
student_config = get_config(MODEL, img_size=IMG_SIZE, num_frames=NUM_FRAMES, drop_path=DROP_PATH,
                            align_layers=ALIGN_LAYERS, checkpoint_blocks=CHECKPOINT_BLOCKS,
                            teacher_dim=teacher.visual.proj.shape[1])  # C: the heads regress CLIP's output width
raw_model = VideoViT(student_config).to(device)  # unwrapped and uncompiled: what is saved
# The UTA loss pairs student token i with teacher token i, so both must cut a clip into the same grid.
t = NUM_FRAMES // student_config.tubelet_size
h = w = IMG_SIZE // student_config.patch_size
grid = teacher.image_size // teacher.patch
if (t, h, w) != (NUM_FRAMES, grid, grid):
    fail(f'the student cuts a clip into {t}x{h}x{w} tokens but the teacher into {NUM_FRAMES}x{grid}x{grid}: set '
         f'TEACHER_SIZE = {IMG_SIZE // student_config.patch_size * teacher.patch} (and tubelet size 1)')
n_keep = masking.num_keep(h * w, MASK_RATIO)  # visible tokens per frame (40 of 196 for ViT-B/16)

# ----------------------------------------------------------------------------------------------
# Optimizer and schedule: AdamW, no decay on 1-D parameters; lr = warmup from 0, then cosine (common.lr_at)

optimizer = torch.optim.AdamW(common.param_groups(raw_model, WEIGHT_DECAY), lr=peak_lr, betas=BETAS, eps=1e-8,
                              fused=device.type == 'cuda')
step = 0  # optimizer steps done; the data position and the lr follow from it
resume = os.path.exists(ckpt_path)  # a stray last.pt.tmp (a crash mid-write) is ignored: last.pt is intact
if world_size > 1:  # every rank must take the same decision: multi-node needs OUT_DIR on shared storage
    seen = torch.tensor([float(resume)], device=device)
    dist.all_reduce(seen)
    if 0 < seen.item() < world_size:
        fail(f'{ckpt_path} is visible on {int(seen.item())} of {world_size} ranks: put OUT_DIR on shared storage')
if resume:
    ckpt = common.load_checkpoint(ckpt_path)  # weights_only=True: tensors and plain data, never code
    load_strict(raw_model, ckpt['model'])
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
    common.set_rng_state(ckpt['rng'])  # numpy and python; torch's generator is reseeded every step anyway
    step = ckpt['step']
    if master:
        diff = ', '.join(f'{k}: {ckpt["config"].get(k)!r} -> {v!r}' for k, v in config.items()
                         if ckpt['config'].get(k) != v)
        print(f'resumed from {ckpt_path} at step {step} (epoch {ckpt["epoch"]}, clip {ckpt["position"]} of it)'
              + (f'; settings changed since: {diff}' if diff else ''))
    del ckpt
last_ckpt_step = step if resume else None

# ----------------------------------------------------------------------------------------------
# Compile and DDP

model = torch.compile(raw_model) if COMPILE else raw_model  # shapes are static: every frame keeps n_keep tokens
if world_size > 1:  # DDP around the student only: the teacher has no gradients to average
    model = DDP(model, device_ids=[device.index] if device.type == 'cuda' else None)

if master:
    n_params = sum(p.numel() for p in raw_model.parameters())
    print(f'world size {world_size} | {MICRO_BATCH} clips x {world_size} processes x {grad_accum} accumulation '
          f'steps = {TOTAL_BATCH} clips per step | {dtype_name}, compile {COMPILE}, {device}\n'
          f'peak lr {peak_lr:.3g} (BASE_LR {BASE_LR:g} x {TOTAL_BATCH}/256), floor {min_lr:.3g}, warmup '
          f'{warmup_steps} of {total_steps} steps ({steps_per_epoch} steps per epoch of {len(dataset)} videos)\n'
          f'student {MODEL}: {n_params / 1e6:.1f}M parameters, sees {t * n_keep} of {t * h * w} tokens per clip '
          f'({MASK_TYPE} mask, ratio {MASK_RATIO}), aligns its last {ALIGN_LAYERS} blocks\n'
          f'teacher {TEACHER} ({TEACHER_PRETRAINED}) at {teacher.image_size} px, frozen')
    common.append_jsonl(log_path, {'config': config, 'world_size': world_size, 'start_step': step})

# ----------------------------------------------------------------------------------------------
# Training loop

# Where this rank's samples sit in the global batch: the sampler gives rank r the global positions
# r, r + W, r + 2W, ..., so row i of micro-step m is position (m * MICRO_BATCH + i) * W + r.
rows = torch.arange(MICRO_BATCH, device=device) * world_size + rank            # [B] for micro-step 0
n = h * w                                                                       # tokens per frame
mask_gen = torch.Generator(device=device)
epoch = step // steps_per_epoch
loader, sampler = data.make_loader(dataset, MICRO_BATCH, shuffle=True, seed=SEED, rank=rank, world_size=world_size,
                                   num_workers=NUM_WORKERS, start=(step % steps_per_epoch) * TOTAL_BATCH // world_size)
sampler.set_epoch(epoch)
batches = iter(loader)
K = ALIGN_LAYERS
sums = torch.zeros(K + 1, device=device)  # loss and per-layer losses, summed over the good steps since the last log
good_steps, skipped_steps, bad_in_a_row, skipped_samples, grad_norm = 0, 0, 0, 0, None
t_log, step_log = time.time(), step
pbar = tqdm(total=total_steps, initial=step, disable=not master, desc='stage 1', dynamic_ncols=True)
model.train()
while step < total_steps:
    if step // steps_per_epoch != epoch:  # a new epoch: a new permutation of the videos
        epoch = step // steps_per_epoch
        sampler.set_epoch(epoch)
        batches = iter(loader)
    # Randomness is a function of the step number, so a resumed run replays it exactly: the masks from
    # (SEED, step), identical on every rank; stochastic depth from (SEED, step, rank), different per rank.
    torch.manual_seed(common.seed_for(SEED, step, rank))
    lr = common.lr_at(step, total_steps, warmup_steps, peak_lr, min_lr)
    for g in optimizer.param_groups:
        g['lr'] = lr * g['lr_scale']
    log_now = (step + 1) % LOG_INTERVAL == 0 or step + 1 == total_steps

    # ---- forward and backward over grad_accum micro-batches
    step_losses = torch.zeros(K + 1, device=device)
    for micro in range(grad_accum):
        batch = next(batches)
        video = batch['video'].to(device, non_blocking=True)                    # [B, 3, T, H, W]
        skipped_samples += int(batch['skipped'].sum())                          # bad videos replaced (CPU tensor)
        with torch.no_grad(), autocast:
            # The teacher sees the full clip: its features are the targets of every token, visible or not.
            hidden, attn = teacher.encode(video)                                # [K, B, N, E], [B, T, n]
            # Draw the masks of the whole global batch (one generator, the same on every rank) and keep
            # this rank's rows: a sample's mask depends on its global position only, so 2 GPUs x 1
            # micro-step compute exactly what 1 GPU x 2 micro-steps does. Other rows' attention is unused.
            my_rows = rows + micro * MICRO_BATCH * world_size                   # [B]
            attn_all = torch.ones(TOTAL_BATCH, NUM_FRAMES, n, device=device)   # [TOTAL_BATCH, T, n]
            attn_all[my_rows] = attn
            mask_gen.manual_seed(common.seed_for(SEED, step, 'mask'))
            keep = masking.make_mask(MASK_TYPE, attn_all, MASK_RATIO, mask_gen)[my_rows]  # [B, N_vis] kept indices
            targets = teacher.targets(hidden, keep)                             # [K, B, N_vis, C] unit vectors
        # Gradients of the micro-steps add up; DDP averages them over ranks only on the last one.
        with model.no_sync() if world_size > 1 and micro < grad_accum - 1 else nullcontext():
            with autocast:
                _, aligned = model(video, keep)                                 # [K, B, N_vis, C] unit vectors
                layer_losses = uta_loss(aligned, targets, per_layer=True)       # [K], mean of 2 - 2 cos per layer
                loss = layer_losses.mean()                                      # L_uta
            if step + 1 in NAN_STEPS:  # steps are numbered from 1, as in the log
                loss = loss * float('nan')
            # Divide by grad_accum: the summed gradients are then those of the mean over all TOTAL_BATCH clips.
            scaler.scale(loss / grad_accum).backward()
        step_losses += torch.cat([loss.detach()[None], layer_losses.detach()]) / grad_accum

    # ---- the update, or a skip if the loss is not finite
    # The one host sync per step outside logging (not per micro-step): skipping must be decided on the
    # host, and identically on every rank, so the flag is all-reduced first. The CPU waits for the
    # step's backward here, then runs ahead again: the GPU idles only while the next launches start.
    bad = common.all_reduce_mean((~torch.isfinite(step_losses[0])).float())
    if bad.item() > 0:
        optimizer.zero_grad(set_to_none=True)  # drop the poisoned gradients; weights and Adam state untouched
        skipped_steps, bad_in_a_row, grad_norm = skipped_steps + 1, bad_in_a_row + 1, None
        if master:
            tqdm.write(f'step {step + 1}: non-finite loss, update skipped ({skipped_steps} so far)')
    else:
        bad_in_a_row = 0
        if GRAD_CLIP is not None or log_now:
            scaler.unscale_(optimizer)  # real gradient scale (fp16), before measuring or clipping
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), GRAD_CLIP or math.inf)
        scaler.step(optimizer)  # = optimizer.step() unless fp16
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        sums += step_losses
        good_steps += 1
    step += 1
    pbar.update(1)

    # ---- logging (all-reduced over ranks) and checkpoints
    if log_now or bad_in_a_row >= MAX_BAD_STEPS:
        stats = common.all_reduce_mean(torch.cat([sums, torch.tensor([skipped_samples], device=device)])).tolist()
        dt = time.time() - t_log
        mean = [s / good_steps for s in stats[:K + 1]] if good_steps else [None] * (K + 1)
        record = {'step': step, 'epoch': epoch, 'loss': mean[0], 'loss_layers': mean[1:], 'lr': lr,
                  'grad_norm': None if grad_norm is None else float(grad_norm),
                  'clips_per_s': (step - step_log) * TOTAL_BATCH / dt, 'ms_per_step': 1000 * dt / (step - step_log),
                  'skipped_samples': round(stats[K + 1] * world_size), 'skipped_steps': skipped_steps,
                  'max_memory_gb': torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else None}
        if master:
            common.append_jsonl(log_path, record)
            loss_text = 'n/a' if mean[0] is None else f'{mean[0]:.4f}'
            tqdm.write(f'step {step} | loss {loss_text} | lr {lr:.3g} | grad norm {record["grad_norm"] or 0:.3f} | '
                       f'{record["ms_per_step"]:.0f} ms/step | {record["clips_per_s"]:.1f} clips/s')
            pbar.set_postfix(loss=loss_text, lr=f'{lr:.2e}', clips_s=f'{record["clips_per_s"]:.1f}')
        sums.zero_()
        good_steps, t_log, step_log = 0, time.time(), step
    if (step % CKPT_INTERVAL == 0 or step == total_steps) and bad_in_a_row == 0:
        if master:
            common.save_checkpoint({
                'model': raw_model.state_dict(), 'model_config': dataclasses.asdict(student_config),
                'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(), 'step': step,
                'epoch': step // steps_per_epoch, 'position': step % steps_per_epoch * TOTAL_BATCH,  # clips done
                'rng': common.rng_state(), 'config': config}, ckpt_path)
        last_ckpt_step = step
    if bad_in_a_row >= MAX_BAD_STEPS:
        fail(f'{bad_in_a_row} non-finite losses in a row (steps {step + 1 - bad_in_a_row}-{step}): stopping. '
             f'The last good checkpoint is {ckpt_path} (step {last_ckpt_step}). Lower BASE_LR, use bf16 or '
             f'fp32, check the data with `python data.py --check`, then launch again to resume.')
    if MAX_STEPS is not None and step >= MAX_STEPS:
        break  # a simulated kill: no final checkpoint

# ----------------------------------------------------------------------------------------------
# Clean up

pbar.close()
if master and step == total_steps:
    print(f'done: {step} steps, {skipped_steps} skipped; weights in {ckpt_path}, log in {log_path}')
if world_size > 1:
    dist.barrier()  # rank 0 may still be writing the checkpoint: tear the group down together (gloo aborts otherwise)
    dist.destroy_process_group()
