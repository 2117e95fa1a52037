"""
Stage 1 of Unmasked Teacher (UMT): video-only pre-training of a ViT student against a frozen CLIP.

Paper section 3.1 (Li et al., ICCV 2023). Every optimizer step:
  1. the frozen CLIP teacher encodes every frame of the full, unmasked clip: the patch tokens of
     its last K blocks, and its last block's CLS attention over the patches;
  2. semantic masking keeps, per frame, 20% of the tokens, drawn with the teacher's attention;
  3. the student encodes only those visible tokens; K heads map its last K blocks into CLIP's space;
  4. L_uta = mean over the K layers and the visible tokens of 2 - 2 cos(student, teacher).
The defaults are the paper's ViT-B/16 recipe on Kinetics-710 (the official
single_modality/exp/pretraining/b16_ptk710_f8_res224.sh). TARGET runs the other rows of the paper's
Table 1 (pixel reconstruction as VideoMAE, and both combined with UTA) with VideoMAE's decoder.

    torchrun --standalone --nproc_per_node=8 train_stage1.py       # one node of 8 GPUs
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_id=umt --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 train_stage1.py                  # on each of 4 nodes: 32 GPUs
    python train_stage1.py                                          # one GPU (accumulation 32)
    python train_stage1.py --preset=paper_l16                       # UMT-L/16, CLIP-L/14 teacher
    python train_stage1.py --preset=demo                            # CPU: tiny models, synthetic
    torchrun --standalone --nproc_per_node=2 train_stage1.py --preset=demo   # 2 CPU processes
    python train_stage1.py --mask_type=tube --mask_ratio=0.9        # any constant, as --name=value
    python train_stage1.py --target=pixels                          # a Table 1 row

After a crash, the same command resumes from OUT_DIR/last.pt.
"""

import dataclasses
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import demo
import masking
import training
from model import DECODERS, Decoder, VideoViT, get_config, load_strict, masked_tokens, pixel_targets
from model import uta_loss
from teacher import CLIPTeacher, build_clip
from util.configurator import (check_pretrained, configure, epoch_steps, fail, need_files,
                               need_positive, split_batch, user_input)

# ----------------------------------------------------------------------------------------------
# Configuration: the paper's values, changed by --preset=NAME and --name=value (util/configurator)

# data
DATA_LIST = 'data/k710_train.csv'  # one video per line, `path,label` (comma, space or tab)
DATA_ROOT = ''                     # folder the list's relative paths start from
MAKE_DEMO = False                  # write the synthetic demo set into DATA_ROOT if DATA_LIST is not
NUM_FRAMES = 8                     # T, TSN-sparse frames per clip (paper: 8)
IMG_SIZE = 224                     # H = W after the multi-scale crop (paper: 224)
NUM_WORKERS = min(10, training.CORES)  # decoding processes per GPU (official: 10): CPU-bound
DECODE_THREADS = 1                 # PyAV threads per worker (workers x threads <= cores per GPU)
MAX_BAD_FRACTION = 0.05            # stop when more than this fraction of the videos cannot be read
# student
MODEL = 'vit_b16'                  # preset in model.CONFIGS (paper: vit_b16; vit_l16 for UMT-L)
DROP_PATH = 0.1                    # stochastic depth of the last block (paper: 0.1 B, 0.2 L)
ALIGN_LAYERS = 6                   # K: the last K student blocks regress the teacher's (paper: 6)
CHECKPOINT_BLOCKS = 0              # recompute the first N blocks in backward: less memory, slower
# teacher
TEACHER = 'ViT-B-16-quickgelu'     # open_clip name (paper: CLIP ViT-B/16, L/14 for L); 'tiny': demo
TEACHER_PRETRAINED = 'openai'      # open_clip tag or weights file; None = random; 'demo': the demo
TEACHER_SIZE = None                # teacher input px; None = CLIP's own; 196 for L/14 (14 x 14)
# the target (paper Table 1): UMT aligns the visible tokens with CLIP; the other rows add VideoMAE's
# decoder, which sees the visible tokens plus a mask token per hidden one and predicts those
TARGET = 'clip'                    # 'clip' (UMT, paper), 'pixels' (VideoMAE: normalized pixels, no
                                   # UTA), 'clip+pixels', 'clip+masked' (+ CLIP's features there)
NORM_PIX = True                    # pixels normalized per patch and channel (VideoMAE: always on)
# masking
MASK_TYPE = 'semantic'             # 'semantic' (teacher attention, paper), 'tube' or 'random'
MASK_RATIO = 0.8                   # fraction of each frame's tokens hidden (paper: 0.8)
# optimization
TOTAL_BATCH = 2048                 # clips per optimizer step over all GPUs (paper: 2048 = 32 x 64)
MICRO_BATCH = 64                   # most clips per GPU per forward; accumulate the rest (paper: 64)
BASE_LR = 1.5e-4                   # lr per 256 clips: peak = BASE_LR * TOTAL_BATCH / 256 (1.2e-3)
MIN_LR = 1e-5                      # cosine floor per 256 clips, scaled the same way (paper: 8e-5)
WARMUP_EPOCHS = 40                 # linear warmup from 0, per iteration (paper: 40)
EPOCHS = 200                       # paper: 200 (official scripts: 201, to dodge a scheduler crash)
WEIGHT_DECAY = 0.05                # AdamW decoupled decay, none on biases and norms (paper: 0.05)
BETAS = (0.9, 0.95)                # AdamW betas (paper: 0.9, 0.95)
GRAD_CLIP = None                   # max gradient norm; None = no clipping, the norm is only logged
MAX_BAD_STEPS = 5                  # a non-finite loss skips the step; this many in a row stop
# system
DEVICE = 'auto'                    # 'auto' = the GPU when there is one; 'cpu' forces the CPU
DTYPE = 'auto'                     # 'auto' = bf16 on recent GPUs, fp16 + scaling on older, CPU fp32
COMPILE = True                     # torch.compile the student (~1 min at start); False to debug
SEED = 0                           # initial weights, data order, masks, stochastic depth
LOG_INTERVAL = 20                  # steps between log lines (each costs a host sync)
CKPT_INTERVAL = 500                # steps between checkpoints (OUT_DIR/last.pt, also at the end)
OUT_DIR = 'out/stage1'             # checkpoints and log.jsonl; multi-node: storage every node sees

PRESETS = {
    'paper_b16': {},
    'paper_l16': {'MODEL': 'vit_l16', 'TEACHER': 'ViT-L-14-quickgelu', 'TEACHER_SIZE': 196,
                  'DROP_PATH': 0.2, 'OUT_DIR': 'out/stage1_l16'},  # too big? lower MICRO_BATCH
    'videomae': {'TARGET': 'pixels', 'MASK_TYPE': 'tube', 'MASK_RATIO': 0.9,  # its own recipe
                 'OUT_DIR': 'out/stage1_videomae'},
    'demo': {'DATA_LIST': 'demo_data/train.csv', 'DATA_ROOT': 'demo_data', 'MAKE_DEMO': True,
             'MODEL': 'tiny', 'TEACHER': 'tiny', 'TEACHER_PRETRAINED': 'demo', 'NUM_FRAMES': 4,
             'IMG_SIZE': 64, 'ALIGN_LAYERS': 2, 'TOTAL_BATCH': 16, 'MICRO_BATCH': 16,
             'BASE_LR': 1e-2, 'MIN_LR': 1e-4, 'WARMUP_EPOCHS': 3, 'EPOCHS': 20, 'DROP_PATH': 0.0,
             'COMPILE': False, 'NUM_WORKERS': 1, 'LOG_INTERVAL': 10, 'CKPT_INTERVAL': 100,
             'OUT_DIR': 'out/demo_stage1'},
}

config = configure(globals(), PRESETS, sys.argv[1:])
# Start-up checks, before anything heavy: a typo costs seconds, not a queue slot.
# micro_batch: MICRO_BATCH, or less where a process's share of TOTAL_BATCH needs it
world_size, micro_batch, grad_accum = split_batch(TOTAL_BATCH, MICRO_BATCH)
need_positive(EPOCHS=EPOCHS, LOG_INTERVAL=LOG_INTERVAL, CKPT_INTERVAL=CKPT_INTERVAL,
              MAX_BAD_STEPS=MAX_BAD_STEPS)
for name, value, valid in (('MASK_TYPE', MASK_TYPE, ('semantic', 'tube', 'random')),
                           ('TARGET', TARGET, ('clip', 'pixels', 'clip+pixels', 'clip+masked'))):
    if value not in valid:
        fail(f'{name}={value!r}; valid: {", ".join(map(repr, valid))}')
if not 0 < MASK_RATIO < 1:
    fail(f'MASK_RATIO={MASK_RATIO} must lie strictly between 0 and 1 (the fraction hidden)')
with user_input('the student: '):  # a MODEL, size, frame count or ALIGN_LAYERS it cannot take
    student_config = get_config(MODEL, img_size=IMG_SIZE, num_frames=NUM_FRAMES,
                                drop_path=DROP_PATH, checkpoint_blocks=CHECKPOINT_BLOCKS,
                                align_layers=0 if TARGET == 'pixels' else ALIGN_LAYERS)
# hf://OWNER/REPO/FILE: fetched once into the Hugging Face cache
teacher_pretrained = training.resolve(TEACHER_PRETRAINED, 'TEACHER_PRETRAINED')
check_pretrained(teacher_pretrained)
need_files({'DATA_LIST': DATA_LIST}, 'it lists one training video per line as `path,label` (or '
           '`path label`), paths relative to DATA_ROOT; labels are not used in stage 1. To try the '
           'script first: `python train_stage1.py --preset=demo` (it makes a synthetic set).',
           MAKE_DEMO)

# ----------------------------------------------------------------------------------------------
# Processes: torchrun starts one per GPU (NCCL) or per CPU share (gloo); plain python runs one

rank, world_size, device = training.init_distributed(DEVICE)  # joins torchrun's process group
master = rank == 0                                             # logs, saves, makes the demo set
dtype = training.pick_dtype(device, DTYPE)
autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 grads underflow
lock = training.lock_out_dir(OUT_DIR) if master else None     # a second run on OUT_DIR stops here
ckpt_path = os.path.join(OUT_DIR, 'last.pt')
peak_lr = BASE_LR * TOTAL_BATCH / 256                          # linear scaling, as the official
min_lr = MIN_LR * TOTAL_BATCH / 256

# ----------------------------------------------------------------------------------------------
# Data: TSN-sparse frames, multi-scale crop and flip (paper section 4.1), uint8 until the device

# The demo (--preset=demo) writes its synthetic set and trains its stand-in for OpenAI's CLIP, once.
teacher_weights = teacher_pretrained
if MAKE_DEMO:
    teacher_weights = demo.setup(DATA_ROOT, DATA_LIST, MAKE_DEMO, teacher_pretrained, master, SEED)
with user_input():  # a list file that cannot be read
    dataset = data.VideoClassification(DATA_LIST, DATA_ROOT, NUM_FRAMES, IMG_SIZE, mode='train',
                                       aug='multiscale', flip=True, threads=DECODE_THREADS,
                                       max_bad_fraction=MAX_BAD_FRACTION)
steps_per_epoch = epoch_steps(len(dataset), TOTAL_BATCH, DATA_LIST, 'videos')
total_steps, warmup_steps = EPOCHS * steps_per_epoch, WARMUP_EPOCHS * steps_per_epoch

# ----------------------------------------------------------------------------------------------
# Models: the frozen teacher, the student, and (Table 1's other rows) VideoMAE's decoder

teacher = None  # VideoMAE's row (TARGET 'pixels') needs a teacher only to draw semantic masks
if TARGET != 'pixels' or MASK_TYPE == 'semantic':
    with user_input():  # a model name, weights file or size that does not fit
        clip = demo.tiny_clip(teacher_weights) if TEACHER == 'tiny' else \
            build_clip(TEACHER, teacher_weights)
        teacher = CLIPTeacher(clip, ALIGN_LAYERS, TEACHER_SIZE).to(device)
    # Frozen: eval mode, no gradients, never in DDP, the optimizer or a checkpoint (rebuilt).
    teacher.eval().requires_grad_(False)
    # C: the heads regress CLIP's output width
    student_config = dataclasses.replace(student_config, teacher_dim=teacher.visual.proj.shape[1])
K, tubelet, p = student_config.align_layers, student_config.tubelet_size, student_config.patch_size
t, h, w = NUM_FRAMES // tubelet, IMG_SIZE // p, IMG_SIZE // p  # the token grid: N = t*h*w
# The UTA loss pairs student token i with teacher token i: both must cut a clip into the same grid.
grid = teacher.image_size // teacher.patch if teacher else h
if (t, h, w) != (NUM_FRAMES, grid, grid):
    fail(f'the student cuts a clip into {t}x{h}x{w} tokens but the teacher into {NUM_FRAMES}x'
         f'{grid}x{grid}: set TEACHER_SIZE = {h * teacher.patch} (and tubelet size 1)')
n_keep = masking.num_keep(h * w, MASK_RATIO)  # visible tokens per frame (40 of 196 for ViT-B/16)
torch.manual_seed(SEED)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
raw_model = VideoViT(student_config)  # unwrapped: what is saved
raw_decoder = None  # only Table 1's rows other than UMT's: trained with the student, saved apart
if TARGET != 'clip':
    out_dim = 3 * tubelet * p * p if 'pixels' in TARGET else student_config.teacher_dim
    raw_decoder = Decoder(student_config.embed_dim, out_dim, t * h * w, *DECODERS[MODEL])
ckpt = training.resume(OUT_DIR, world_size, device, not_keys=('text_config', 'num_classes'))
if ckpt is not None:  # resume: the run goes on where it stopped
    with user_input(f'{ckpt_path} holds another student (pass another --out_dir): '):
        load_strict(raw_model, ckpt['model'])
        if raw_decoder is not None:
            load_strict(raw_decoder, ckpt.get('decoder', {}))
raw_model.to(device)
trained = raw_model  # what AdamW updates
if raw_decoder is not None:
    trained = torch.nn.ModuleList([raw_model, raw_decoder.to(device)])

# ----------------------------------------------------------------------------------------------
# Optimizer (AdamW, no decay on 1-D parameters), resume, compile, DDP

optimizer = training.adamw(trained, peak_lr, WEIGHT_DECAY, BETAS)
step = 0
if ckpt is not None:  # the weights are loaded above; now the optimizer, the loss scale, the step
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
    step = ckpt['step']
    if master:
        print(training.resumed_line(ckpt, config, ckpt_path, steps_per_epoch))
    ckpt = None  # its tensors would stay in memory for the whole run
model, decoder = raw_model, raw_decoder
if COMPILE:  # in place, the weight names stay; shapes are static: every frame keeps n_keep tokens
    model.forward = torch.compile(model.forward)
    if decoder is not None:
        decoder.forward = torch.compile(decoder.forward)
if world_size > 1:  # averages the gradients over ranks in backward; the teacher has none, stays out
    ids = [device.index] if device.type == 'cuda' else None
    model = DistributedDataParallel(model, device_ids=ids)
    if decoder is not None:  # a DDP of its own, which all-reduces in every backward (correct)
        decoder = DistributedDataParallel(decoder, device_ids=ids)
model.train()
if decoder is not None:
    decoder.train()
if master:
    lowered = f' (MICRO_BATCH {MICRO_BATCH} lowered)' if micro_batch < MICRO_BATCH else ''
    params = sum(x.numel() for x in trained.parameters()) / 1e6
    frozen = f'{TEACHER} ({teacher_weights}) at {teacher.image_size} px' if teacher else 'none'
    print(f'{TOTAL_BATCH} clips per step = {micro_batch}{lowered} x {world_size} processes x '
          f'{grad_accum} accumulation | peak lr {peak_lr:.3g}, floor {min_lr:.3g}, warmup '
          f'{warmup_steps} steps | {len(dataset)} videos, {total_steps} steps, {steps_per_epoch} '
          f'per epoch\nstudent {MODEL} ({params:.2f}M parameters) sees {t * n_keep} of {t * h * w} '
          f'tokens per clip ({MASK_TYPE} mask {MASK_RATIO}) | target {TARGET} | teacher {frozen} | '
          f'{str(dtype)[6:]} on {device}')
    training.write_log(OUT_DIR, {'config': config, 'world_size': world_size, 'start_step': step})

# ----------------------------------------------------------------------------------------------
# Training loop

# Where this rank's samples sit in the global batch: the sampler gives rank r the global positions
# r, r + W, r + 2W, ..., so row i of micro-step m is position (m * micro_batch + i) * W + r.
rows = torch.arange(micro_batch, device=device) * world_size + rank            # [B], micro-step 0
mask_gen = torch.Generator(device=device)
batches = training.train_batches(dataset, micro_batch, SEED, rank, world_size, NUM_WORKERS, step,
                                 steps_per_epoch, grad_accum)
bar = tqdm(total=total_steps, initial=step, disable=not master, desc='stage 1', dynamic_ncols=True)
last_ckpt_step, skipped, bad_in_a_row = step, 0, 0  # the last checkpoint (0: none), bad steps
t_log, step_log, data_wait, replaced = time.perf_counter(), step, 0.0, 0  # since the last log line
while step < total_steps:
    # Randomness is a function of the step number, so a resumed run replays it exactly: the masks
    # from (SEED, step), the same on every rank; stochastic depth from (SEED, step, rank).
    torch.manual_seed(training.seed_for(SEED, step, rank))
    lr = training.lr_at(step, total_steps, warmup_steps, peak_lr, min_lr)
    training.set_lr(optimizer, lr)
    losses = torch.zeros(3 + K, device=device)  # the loss, L_uta, the decoder's, L_uta per layer
    for micro in range(grad_accum):
        t0 = time.perf_counter()
        batch = next(batches)
        data_wait += time.perf_counter() - t0
        replaced += int(batch['skipped'].sum())  # unreadable videos the dataset replaced
        video = data.normalize(batch['video'].to(device, non_blocking=True))   # [B, 3, T, H, W]
        with torch.no_grad(), autocast:
            # The teacher sees the full clip: its features are the targets of every token.
            # [K, B, N, E] patch tokens of the last K blocks, [B, T, h*w] CLS attention
            hidden, attn = teacher.encode(video) if teacher else (None, None)
            # Draw the masks of the whole global batch (one generator, the same on every rank) and
            # keep this rank's rows: a sample's mask depends on its global position only, so 2 GPUs
            # x 1 micro-step compute exactly what 1 GPU x 2 micro-steps does.
            my_rows = rows + micro * micro_batch * world_size                   # [B]
            attn_all = torch.ones(TOTAL_BATCH, NUM_FRAMES, h * w, device=device)  # others: unused
            attn_all[my_rows] = attn if attn is not None else 1.0
            mask_gen.manual_seed(training.seed_for(SEED, step, 'mask'))
            keep = masking.make_mask(MASK_TYPE, attn_all, MASK_RATIO, mask_gen)  # [TOTAL, N_vis]
            keep = keep[my_rows]                                                # [B, N_vis]
            targets = teacher.targets(hidden, keep) if K else None             # [K, B, N_vis, C]
            if decoder is not None:  # Table 1: what the decoder must predict at the hidden tokens
                masked = masked_tokens(keep, t * h * w)                         # [B, N_mask]
                if 'pixels' in TARGET:
                    hidden_targets = pixel_targets(video, masked, tubelet, p, NORM_PIX)  # 3*p*p
                else:  # CLIP's last-layer features of the hidden tokens
                    hidden_targets = teacher.targets(hidden[-1:], masked)[0]   # [B, N_mask, C]
        # DDP all-reduces the gradients in every backward; the micro-steps but the last add them up.
        sync = micro == grad_accum - 1 or world_size == 1
        with nullcontext() if sync else model.no_sync():
            with autocast:
                x, aligned = model(video, keep)                 # [B, N_vis, D], [K, B, N_vis, C]
                # L_uta = mean over the K layers and visible tokens of 2 - 2 cos(student, teacher)
                layer_losses = uta_loss(aligned, targets, per_layer=True) if K else x.new_zeros(0)
                loss_uta = layer_losses.mean() if K else x.new_zeros(())
                loss_decoder = x.new_zeros(())
                if decoder is not None:  # Table 1's other rows: the decoder predicts hidden tokens
                    pred = decoder(x, keep)                                # [B, N_mask, 3*p*p or C]
                    # pixels: mean of (pred - target)^2, VideoMAE's; CLIP's features: 2 - 2 cos
                    loss_decoder = F.mse_loss(pred.float(), hidden_targets) if 'pixels' in TARGET \
                        else uta_loss(F.normalize(pred.float(), dim=-1)[None], hidden_targets[None])
                loss = loss_uta + loss_decoder
            # Gradients add up over the micro-steps: dividing by grad_accum gives the mean loss's.
            scaler.scale(loss / grad_accum).backward()
        losses += torch.cat([torch.stack([loss, loss_uta, loss_decoder]), layer_losses]).detach() \
            / grad_accum

    # ---- the update: unscale, clip, step; skipped on every rank alike when something is not finite
    scaler.unscale_(optimizer)  # the true gradients (fp16 scaled them up), before clipping them
    grad_norm = torch.nn.utils.clip_grad_norm_(trained.parameters(), GRAD_CLIP or math.inf)
    good = training.finite_everywhere(losses[0], None if scaler.is_enabled() else grad_norm)
    if good:
        scaler.step(optimizer)  # = optimizer.step(); with fp16, skipped if a gradient overflowed
    scaler.update()             # fp16: the next loss scale
    optimizer.zero_grad(set_to_none=True)
    step += 1
    bar.update()

    # ---- log this step (its losses averaged over the ranks: a host sync, so every LOG_INTERVAL)
    skipped, bad_in_a_row = skipped + (not good), 0 if good else bad_in_a_row + 1
    if step % LOG_INTERVAL == 0 or step == total_steps or bad_in_a_row == MAX_BAD_STEPS:
        stats = torch.cat([losses, losses.new_tensor([replaced])])
        stats = training.all_reduce_mean(stats).tolist()
        seconds, done = time.perf_counter() - t_log, step - step_log
        ok = lambda v: v if good else None  # a skipped step has no loss to report  # noqa: E731
        record = {'step': step, 'epoch': step / steps_per_epoch, 'loss': ok(stats[0]),
                  'loss_uta': ok(stats[1]), 'loss_decoder': ok(stats[2]) if decoder else None,
                  'loss_layers': ok(stats[3:3 + K]), 'lr': lr, 'grad_norm': ok(grad_norm.item()),
                  'ms_per_step': 1000 * seconds / done, 'clips_per_s': TOTAL_BATCH * done / seconds,
                  'data_wait': data_wait / seconds, 'skipped_steps': skipped,
                  'replaced_videos': round(stats[-1] * world_size)}
        if master:
            training.write_log(OUT_DIR, record)
            tqdm.write(f'step {step} | loss {stats[0]:.4f} | lr {lr:.3g} | grad norm '
                       f'{grad_norm.item():.3f} | {record["ms_per_step"]:.0f} ms/step | '
                       f'{record["clips_per_s"]:.1f} clips/s | data wait {record["data_wait"]:.0%}')
        t_log, step_log, data_wait, replaced = time.perf_counter(), step, 0.0, 0
    if bad_in_a_row == MAX_BAD_STEPS:  # the loss diverged: stop, and name the checkpoint to resume
        last = f'{ckpt_path} (step {last_ckpt_step})' if last_ckpt_step else 'none written yet'
        first = step + 1 - MAX_BAD_STEPS
        fail(f'{MAX_BAD_STEPS} non-finite losses in a row (steps {first}-{step}): stopping. The '
             f'last good checkpoint is {last}: lower the learning rate, then launch again.')

    # ---- checkpoint: atomic, so a crash while writing leaves the previous last.pt whole
    if good and (step % CKPT_INTERVAL == 0 or step == total_steps):
        if master:
            state = {'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(),
                     'scaler': scaler.state_dict(), 'step': step, 'config': config,
                     'model_config': dataclasses.asdict(student_config)}
            if raw_decoder is not None:  # only to resume: no downstream model loads a decoder
                state['decoder'] = raw_decoder.state_dict()
            training.save_checkpoint(state, ckpt_path)
        last_ckpt_step = step

# ----------------------------------------------------------------------------------------------
# Cleanup

bar.close()
if master:
    print(f'done: {step} steps, {skipped} skipped; weights in {ckpt_path} (step {last_ckpt_step}), '
          f'log in {OUT_DIR}/log.jsonl')
if world_size > 1:
    dist.barrier()  # leave together: a rank that leaves first makes gloo abort the others
    dist.destroy_process_group()
