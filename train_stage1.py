"""
Stage 1 of Unmasked Teacher (UMT): video-only pre-training of a ViT student against a frozen CLIP.

Paper section 3.1 (Li et al., ICCV 2023). Every optimizer step:
  1. the frozen CLIP teacher encodes every frame of the full, unmasked clip: the patch tokens of its
     last K blocks, and its last block's CLS attention over the patches;
  2. semantic masking keeps, per frame, 20% of the tokens, drawn with the teacher's attention as weights;
  3. the student encodes only those visible tokens, and K heads map its last K blocks into CLIP's space;
  4. L_uta = mean over the K layers and the visible tokens of 2 - 2 cos(student, teacher).
The defaults are the paper's ViT-B/16 recipe on Kinetics-710 (the official
single_modality/exp/pretraining/b16_ptk710_f8_res224.sh).

    torchrun --standalone --nproc_per_node=8 train_stage1.py       # one node of 8 GPUs
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_id=umt --rdzv_backend=c10d \
        --rdzv_endpoint=HOST:29500 train_stage1.py                  # on each of 4 nodes: the paper's 32 GPUs
    python train_stage1.py                                          # one GPU (gradient accumulation 32)
    python train_stage1.py --preset=paper_l16                       # UMT-L/16 with a CLIP-L/14 teacher
    python train_stage1.py --preset=demo                            # CPU, ~2 min: tiny models, synthetic videos
    python train_stage1.py --mask_type=tube --mask_ratio=0.9        # any constant below, as --name=value

After a crash, the same command resumes from OUT_DIR/last.pt.
"""

import dataclasses
import math
import os
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import demo
import masking
import training
from model import CONFIGS, VideoViT, get_config, load_strict, uta_loss
from teacher import build_teacher, check_pretrained

# ----------------------------------------------------------------------------------------------
# Configuration: the paper's values, changed by --preset=NAME and --name=value (training.configure)

# data
DATA_LIST = 'data/k710_train.csv'  # one video per line, `path,label` (comma, space or tab); labels unused here
DATA_ROOT = ''                     # folder the list's relative paths start from
MAKE_DEMO = False                  # write the synthetic demo set into DATA_ROOT if DATA_LIST is missing (demo)
NUM_FRAMES = 8                     # T, TSN-sparse frames per clip (paper: 8)
IMG_SIZE = 224                     # H = W after the multi-scale crop (paper: 224)
NUM_WORKERS = min(10, training.CORES)  # decoding processes per GPU (official: 10): CPU-bound, give them spare cores
DECODE_THREADS = 1                 # PyAV threads per worker (1-2; workers x threads <= cores per GPU)
MAX_BAD_FRACTION = 0.05            # stop when more than this fraction of the videos cannot be decoded
# student
MODEL = 'vit_b16'                  # preset in model.CONFIGS (paper: vit_b16; vit_l16 for UMT-L)
DROP_PATH = 0.1                    # stochastic depth of the last block, linear from 0 (paper: 0.1 B, 0.2 L)
ALIGN_LAYERS = 6                   # K: the last K student blocks regress the last K teacher blocks (paper: 6)
CHECKPOINT_BLOCKS = 0              # activation checkpointing of the first N blocks: less memory, ~1/3 more compute
# teacher
TEACHER = 'ViT-B-16-quickgelu'     # open_clip name (paper: CLIP ViT-B/16 for B, ViT-L/14 for L); 'tiny': demo CLIP
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

PRESETS = {
    'paper_b16': {},
    'paper_l16': {'MODEL': 'vit_l16', 'TEACHER': 'ViT-L-14-quickgelu', 'TEACHER_SIZE': 196, 'DROP_PATH': 0.2,
                  'OUT_DIR': 'out/stage1_l16'},  # lower MICRO_BATCH if it does not fit: accumulation keeps the recipe
    'demo': {'DATA_LIST': 'demo_data/train.csv', 'DATA_ROOT': 'demo_data', 'MAKE_DEMO': True,
             'MODEL': 'tiny', 'TEACHER': 'tiny', 'TEACHER_PRETRAINED': 'demo', 'NUM_FRAMES': 4, 'IMG_SIZE': 64,
             'ALIGN_LAYERS': 2, 'TOTAL_BATCH': 16, 'MICRO_BATCH': 16, 'BASE_LR': 1e-2, 'MIN_LR': 1e-4,
             'WARMUP_EPOCHS': 3, 'EPOCHS': 20, 'DROP_PATH': 0.0, 'COMPILE': False, 'NUM_WORKERS': 1, 'LOG_INTERVAL': 10,
             'CKPT_INTERVAL': 100, 'OUT_DIR': 'out/demo_stage1'},
}

config = training.configure(globals(), PRESETS, sys.argv[1:])
fail = training.fail

# Check the constants before anything heavy happens, so a typo costs seconds, not a queue slot.
# micro_batch: MICRO_BATCH, or less where a process's share of TOTAL_BATCH needs it; grad_accum: micro-steps
world_size, micro_batch, grad_accum = training.split_batch(TOTAL_BATCH, MICRO_BATCH)
training.need_positive(EPOCHS=EPOCHS, NUM_FRAMES=NUM_FRAMES, IMG_SIZE=IMG_SIZE, LOG_INTERVAL=LOG_INTERVAL,
                       CKPT_INTERVAL=CKPT_INTERVAL, MAX_BAD_STEPS=MAX_BAD_STEPS)
if MODEL not in CONFIGS:
    fail(f'MODEL={MODEL!r} is not a model preset; valid: {", ".join(CONFIGS)}')
base_config = get_config(MODEL)
if not 0 < MASK_RATIO < 1:
    fail(f'MASK_RATIO={MASK_RATIO} must lie strictly between 0 and 1 (the fraction of tokens hidden; paper: 0.8)')
if MASK_TYPE not in ('semantic', 'tube', 'random'):
    fail(f"MASK_TYPE={MASK_TYPE!r}; valid: 'semantic', 'tube', 'random'")
if IMG_SIZE % base_config.patch_size or NUM_FRAMES % base_config.tubelet_size or not 1 <= ALIGN_LAYERS <= \
        base_config.depth:
    fail(f'IMG_SIZE={IMG_SIZE} must be a multiple of the patch size {base_config.patch_size}, NUM_FRAMES={NUM_FRAMES} '
         f'of the tubelet size {base_config.tubelet_size}, and ALIGN_LAYERS={ALIGN_LAYERS} in 1..{base_config.depth}')
check_pretrained(TEACHER_PRETRAINED)  # a weights file that is not there
training.need_files({'DATA_LIST': DATA_LIST}, 'it lists one training video per line as `path,label` (or `path '
                    'label`), paths relative to DATA_ROOT; labels are not used in stage 1. To try the script first: '
                    '`python train_stage1.py --preset=demo` (it makes a synthetic set).', MAKE_DEMO)

# ----------------------------------------------------------------------------------------------
# Processes: torchrun starts one per GPU (NCCL) or per CPU share (gloo); plain python runs one. Precision.

rank, world_size, device = training.init_distributed(DEVICE)  # joins the process group when torchrun started us
master = rank == 0                                              # rank 0 logs, checkpoints and makes the demo set
dtype = training.pick_dtype(device, DTYPE)                      # bf16 on recent GPUs, fp16 on older ones, fp32 on CPU
autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 gradients underflow unless scaled
lock = training.lock_out_dir(OUT_DIR) if master else None      # a second run on the same OUT_DIR stops here
ckpt_path = os.path.join(OUT_DIR, 'last.pt')
peak_lr = BASE_LR * TOTAL_BATCH / 256                           # linear scaling rule, as the official scripts
min_lr = MIN_LR * TOTAL_BATCH / 256

# ----------------------------------------------------------------------------------------------
# Data: TSN-sparse frames, multi-scale crop and flip (paper section 4.1); uint8 until data.normalize on the device

# The demo set and its stand-in for OpenAI CLIP (TEACHER_PRETRAINED='demo'), made once; else nothing to do.
teacher_weights = demo.setup(DATA_ROOT, DATA_LIST, MAKE_DEMO, TEACHER_PRETRAINED, master, SEED)
dataset = data.VideoClassification(DATA_LIST, DATA_ROOT, NUM_FRAMES, IMG_SIZE, mode='train', aug='multiscale',
                                   flip=True, max_bad_fraction=MAX_BAD_FRACTION, threads=DECODE_THREADS)
steps_per_epoch = training.epoch_steps(len(dataset), TOTAL_BATCH, DATA_LIST, 'videos')
total_steps, warmup_steps = EPOCHS * steps_per_epoch, WARMUP_EPOCHS * steps_per_epoch

# ----------------------------------------------------------------------------------------------
# Models: the frozen teacher and the student

torch.manual_seed(SEED)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
teacher = build_teacher(TEACHER, teacher_weights, ALIGN_LAYERS, TEACHER_SIZE).to(device)
# Frozen: eval mode, no gradients, never in DDP, the optimizer or a checkpoint (rebuilt on resume).
teacher.eval().requires_grad_(False)
student_config = get_config(MODEL, img_size=IMG_SIZE, num_frames=NUM_FRAMES, drop_path=DROP_PATH,
                            align_layers=ALIGN_LAYERS, checkpoint_blocks=CHECKPOINT_BLOCKS,
                            teacher_dim=teacher.visual.proj.shape[1])  # C: the heads regress CLIP's output width
raw_model = VideoViT(student_config)  # unwrapped: what is saved
ckpt = training.resume(OUT_DIR, world_size, device, not_keys=('text_config', 'num_classes'))  # None: a new run
if ckpt is not None:
    try:
        load_strict(raw_model, ckpt['model'])
    except ValueError as e:  # MODEL, IMG_SIZE, ALIGN_LAYERS or the teacher changed since that run
        fail(f'{ckpt_path} holds another student: pass another --out_dir ({str(e).splitlines()[1].strip()}, ...)')
raw_model.to(device)
# The UTA loss pairs student token i with teacher token i, so both must cut a clip into the same grid.
t = NUM_FRAMES // student_config.tubelet_size
h = w = IMG_SIZE // student_config.patch_size
grid = teacher.image_size // teacher.patch
if (t, h, w) != (NUM_FRAMES, grid, grid):
    fail(f'the student cuts a clip into {t}x{h}x{w} tokens but the teacher into {NUM_FRAMES}x{grid}x{grid}: set '
         f'TEACHER_SIZE = {IMG_SIZE // student_config.patch_size * teacher.patch} (and tubelet size 1)')
n_keep = masking.num_keep(h * w, MASK_RATIO)  # visible tokens per frame (40 of 196 for ViT-B/16)

# ----------------------------------------------------------------------------------------------
# Optimizer (AdamW, no decay on 1-D parameters), resume, compile, DDP

optimizer = training.adamw(raw_model, peak_lr, WEIGHT_DECAY, BETAS)
step = 0
if ckpt is not None:  # the run goes on where the checkpoint stopped: weights (above), optimizer, loss scale, step
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
    step = ckpt['step']
    resumed = training.resumed_line(ckpt, config, ckpt_path, steps_per_epoch)
    ckpt = None  # its tensors would stay in memory for the whole run
model = raw_model
if COMPILE:  # in place, the weight names stay; shapes are static: every frame keeps n_keep tokens
    model.forward = torch.compile(model.forward)
if world_size > 1:  # averages the gradients over ranks during backward; the teacher has none and stays outside
    model = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
model.train()
if master:
    trained = sum(p.numel() for p in raw_model.parameters())
    print('\n'.join([*([resumed] if step else []),
                     f'{micro_batch} clips' + (f' (MICRO_BATCH={MICRO_BATCH} lowered to split TOTAL_BATCH)' if micro_batch < MICRO_BATCH else '') + f' x {world_size} processes x {grad_accum} accumulation steps = {TOTAL_BATCH} '
                     f'clips per step | peak lr {peak_lr:.3g} (BASE_LR {BASE_LR:g} x {TOTAL_BATCH}/256), floor '
                     f'{min_lr:.3g}, warmup {warmup_steps} steps | {len(dataset)} videos',
                     f'student {MODEL} ({trained / 1e6:.2f}M parameters) sees {t * n_keep} of {t * h * w} tokens per '
                     f'clip ({MASK_TYPE} mask, ratio {MASK_RATIO}), aligns its last {ALIGN_LAYERS} blocks | teacher '
                     f'{TEACHER} ({teacher_weights}) at {teacher.image_size} px, frozen',
                     f'{str(dtype)[6:]} on {device}, compile {COMPILE} | {total_steps} steps, {steps_per_epoch} per '
                     'epoch']))
    training.write_log(OUT_DIR, {'config': config, 'world_size': world_size, 'start_step': step})

# ----------------------------------------------------------------------------------------------
# Training loop

# Where this rank's samples sit in the global batch: the sampler gives rank r the global positions
# r, r + W, r + 2W, ..., so row i of micro-step m is position (m * micro_batch + i) * W + r.
rows = torch.arange(micro_batch, device=device) * world_size + rank            # [B] for micro-step 0
mask_gen = torch.Generator(device=device)
batches = training.train_batches(dataset, micro_batch, SEED, rank, world_size, NUM_WORKERS, step, steps_per_epoch,
                                 grad_accum)
meter = training.Meter({'loss': 0, 'loss_layers': ALIGN_LAYERS}, device, step)
bar = tqdm(total=total_steps, initial=step, disable=not master, desc='stage 1', dynamic_ncols=True)
last_ckpt_step = step  # 0: none yet
while step < total_steps:
    # Randomness is a function of the step number, so a resumed run replays it exactly: the masks from
    # (SEED, step), identical on every rank; stochastic depth from (SEED, step, rank), different per rank.
    torch.manual_seed(training.seed_for(SEED, step, rank))
    lr = training.lr_at(step, total_steps, warmup_steps, peak_lr, min_lr)
    training.set_lr(optimizer, lr)
    losses = torch.zeros(ALIGN_LAYERS + 1, device=device)  # L_uta, then per aligned layer
    for micro in range(grad_accum):
        batch = meter.next(batches)                                             # times the wait for data
        video = data.normalize(batch['video'].to(device, non_blocking=True))   # [B, 3, T, H, W]
        with torch.no_grad(), autocast:
            # The teacher sees the full clip: its features are the targets of every token, visible or not.
            hidden, attn = teacher.encode(video)                                # [K, B, N, E], [B, T, h*w]
            # Draw the masks of the whole global batch (one generator, the same on every rank) and keep
            # this rank's rows: a sample's mask depends on its global position only, so 2 GPUs x 1
            # micro-step compute exactly what 1 GPU x 2 micro-steps does. Other rows' attention is unused.
            my_rows = rows + micro * micro_batch * world_size                   # [B]
            attn_all = torch.ones(TOTAL_BATCH, NUM_FRAMES, h * w, device=device)  # [TOTAL_BATCH, T, h*w]
            attn_all[my_rows] = attn
            mask_gen.manual_seed(training.seed_for(SEED, step, 'mask'))
            keep = masking.make_mask(MASK_TYPE, attn_all, MASK_RATIO, mask_gen)[my_rows]  # [B, N_vis] kept indices
            targets = teacher.targets(hidden, keep)                             # [K, B, N_vis, C] unit vectors
        # DDP all-reduces the gradients in every backward; the micro-steps before the last only add them up locally.
        sync = micro == grad_accum - 1 or world_size == 1
        with nullcontext() if sync else model.no_sync():
            with autocast:
                _, aligned = model(video, keep)                                 # [K, B, N_vis, C] unit vectors
                layer_losses = uta_loss(aligned, targets, per_layer=True)       # [K], mean of 2 - 2 cos per layer
                loss = layer_losses.mean()                                      # L_uta
            # Gradients add up over the micro-steps: dividing by grad_accum makes them those of the mean loss.
            scaler.scale(loss / grad_accum).backward()
        losses += torch.cat([loss.detach()[None], layer_losses.detach()]) / grad_accum

    # ---- the update: unscale, clip, step; skipped, on every rank alike, when the loss or a gradient is not finite
    scaler.unscale_(optimizer)  # the true gradients (fp16 scaled them up), before measuring or clipping them
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), GRAD_CLIP or math.inf)  # inf: only measured
    good = training.finite_everywhere(losses[0], None if scaler.is_enabled() else grad_norm)  # fp16: the scaler's job
    if good:
        scaler.step(optimizer)  # = optimizer.step(); with fp16, skipped if a gradient overflowed
    scaler.update()             # fp16: the next loss scale
    optimizer.zero_grad(set_to_none=True)
    step += 1
    bar.update()

    # ---- log and checkpoint
    # a skipped step is counted, its losses left out of the averages
    meter.add(good, loss=losses[0], loss_layers=losses[1:])
    if step % LOG_INTERVAL == 0 or step == total_steps or meter.bad_in_a_row == MAX_BAD_STEPS:
        record = meter.record(step, steps_per_epoch, lr, grad_norm)
        if master:
            training.log(OUT_DIR, record, NUM_WORKERS, device, bar)
    training.stop_if_bad(meter, MAX_BAD_STEPS, step, ckpt_path, last_ckpt_step)  # MAX_BAD_STEPS in a row
    if good and (step % CKPT_INTERVAL == 0 or step == total_steps):
        if master:  # atomic: a crash while writing leaves the previous last.pt whole
            training.save_checkpoint({'model': raw_model.state_dict(), 'optimizer': optimizer.state_dict(),
                                      'scaler': scaler.state_dict(), 'step': step, 'config': config,
                                      'model_config': dataclasses.asdict(student_config)}, ckpt_path)
        last_ckpt_step = step

# ----------------------------------------------------------------------------------------------
# Cleanup

bar.close()
if master:
    print(f'done: {step} steps, {meter.skipped_steps} skipped; weights in {ckpt_path} (step {last_ckpt_step}), log in '
          f'{OUT_DIR}/log.jsonl')
if world_size > 1:
    dist.barrier()  # leave together: a rank that leaves first makes gloo abort the others
    dist.destroy_process_group()
