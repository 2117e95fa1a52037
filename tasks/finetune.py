"""
Action-recognition fine-tuning of the UMT student, with the paper's protocol (paper section 4.1,
Table 12).

The stage-1 model (or a stage-2 one, or an official UMT checkpoint) gets a classifier over all its
tokens (mean pool -> fc_norm -> dropout -> head, as the official
single_modality/models/modeling_finetune.py) and is trained end to end with the official recipe
(single_modality/run_class_finetuning.py and its exp/finetuning scripts): AdamW with layer-wise
learning-rate decay, warmup + cosine per iteration, stochastic depth, label smoothing, mixup /
cutmix, repeated augmentation, RandAugment, random-resized crops, flips and random erasing. Every
epoch is validated on 1 clip x 1 crop; the final test averages the softmax over clips x crops
(4 x 3 on Kinetics, 2 x 3 on Something-Something v2).

    # 1. K710 fine-tuning of the stage-1 model (UMT-B/16) on 8 GPUs: 16 videos x 8 GPUs x 2
    #    accumulation steps = the paper's 256 videos per step on 16 GPUs
    torchrun --standalone --nproc_per_node=8 -m tasks.finetune --init=out/stage1/last.pt \\
        --data_root=/data/k710
    # 2. K400 from the K710 model: the paper's route to 87.4% top-1
    torchrun --standalone --nproc_per_node=8 -m tasks.finetune --preset=k400_b16 \\
        --data_root=/data/k400
    # one GPU, from an official checkpoint
    python -m tasks.finetune --preset=ssv2_b16 --init=umt_b16_stage1.pth
    # CPU, a few minutes
    python train_stage1.py --preset=demo && python -m tasks.finetune --preset=demo

After a crash, the same command resumes from OUT_DIR/last.pt.
"""

import dataclasses
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
from tqdm import tqdm

import data
import demo
import training
from tasks import augment
from util import checkpoints
from util.configurator import (configure, epoch_steps, fail, need_files, need_init, need_positive,
                               split_batch, user_input)
from util.evaluation import head_accuracy

# ----------------------------------------------------------------------------------------------
# Configuration: the paper's K710 fine-tuning of UMT-B/16; --preset=NAME, --name=value

# starting point and data
INIT = 'out/stage1/last.pt'        # ours (stage 1, stage 2, fine-tuned) or an official UMT .pth
                                   # (any of those three)
TRAIN_LIST = 'data/k710_train.csv'  # `path,label` per line (comma, space or tab), labels
                                    # 0 .. NUM_CLASSES-1
VAL_LIST = 'data/k710_val.csv'     # validated every epoch (1 clip x 1 crop) and tested at the end
                                   # (multi-view)
DATA_ROOT = ''                     # folder the lists' relative paths start from
MAKE_DEMO = False                  # write the synthetic demo set into DATA_ROOT if the lists are
                                   # missing (demo)
NUM_CLASSES = 710                  # K710: 710, K400: 400, SSv2: 174
SAMPLER = 'kinetics'               # frame sampling: 'kinetics' (official kinetics_sparse.py) or
                                   # 'ssv2' (ssv2.py)
HEAD_ROWS = None                   # None: a new head unless INIT's head has NUM_CLASSES outputs;
                                   # 'first': the first NUM_CLASSES rows of INIT's head
                                   # (K710 -> K400: K710's label order starts with K400's); a JSON
                                   # list of INIT's head rows, one per class (official
                                   # label_mixto600.json); or 'names:K710_NAMES,NAMES': text files
                                   # of class names, one per line in label order, K710's then this
                                   # dataset's (util/checkpoints.head_rows)
NUM_FRAMES = 8                     # T (paper: 8; 16 for the 16-frame L/16); the sin-cos table
                                   # follows T and S
IMG_SIZE = 224                     # S (paper: 224)
NUM_WORKERS = min(10, training.CORES)  # decoding processes per GPU (official: 10)
DECODE_THREADS = 1                 # PyAV threads per worker
MAX_BAD_FRACTION = 0.05            # stop when over this fraction of the videos cannot be decoded
# augmentation and targets
NUM_SAMPLE = 2                     # repeated augmentation: clips cut from each decoded video
                                   # (paper: 2)
RRC_SCALE = (0.08, 1.0)            # random-resized-crop area fraction, aspect 3/4 - 4/3
                                   # (paper: 0.08 - 1)
FLIP = True                        # random horizontal flip (paper: yes; no for SSv2, where
                                   # left/right is the label)
RAND_AUGMENT = (4, 7, 0.5)         # RandAugment (ops, magnitude, std), 'inc1' ops; None = off
                                   # (paper: m7-n4-mstd0.5)
RANDOM_ERASE = 0.25                # chance that a frame gets one box of noise, 0 = off
                                   # (paper: 0.25, pixel mode)
LABEL_SMOOTHING = 0.1              # paper: 0.1
MIXUP = 0.8                        # mixup Beta(alpha, alpha), 0 = off (paper: 0.8)
CUTMIX = 1.0                       # cutmix Beta(alpha, alpha), 0 = off (paper: 1.0)
MIX_SWITCH_PROB = 0.5              # chance a batch gets cutmix rather than mixup when both are on
                                   # (paper: 0.5)
# model
DROP_PATH = 0.1                    # stochastic depth of the last block, linear from 0
                                   # (paper: 0.1 B, 0.2 L)
HEAD_DROPOUT = 0.0                 # dropout before the head (paper: 0)
INIT_SCALE = 0.001                 # a new head starts at trunc-normal(0.02) x this: tiny logits at
                                   # step 0 (paper)
CHECKPOINT_BLOCKS = 0              # activation checkpointing of the first N blocks: less memory,
                                   # more compute
# optimization
TOTAL_BATCH = 256                  # videos per optimizer step over all GPUs (paper: 16 GPUs x 16);
                                   # clips = x NUM_SAMPLE
MICRO_BATCH = 16                   # videos per GPU per forward; accumulation makes up the rest
                                   # (paper: 16)
BASE_LR = 2e-4                     # peak lr = BASE_LR x TOTAL_BATCH x NUM_SAMPLE / 256
                                   # (paper: K710 B 2e-4 -> 4e-4)
WARMUP_LR = 1e-6                   # warmup starts here, scaled like BASE_LR (paper: 1e-6)
MIN_LR = 1e-6                      # cosine floor, scaled like BASE_LR (paper: 1e-6)
WARMUP_EPOCHS = 2                  # linear warmup, per iteration (paper: K710 2, K400 1, SSv2 B 5)
EPOCHS = 35                        # paper: K710 B 35, K400 5, SSv2 B 30
LAYER_DECAY = 0.75                 # lr x decay^(depth + 1 - layer), patch embedding = layer 0
                                   # (paper: 0.75 B, 0.85 L)
WEIGHT_DECAY = 0.05                # AdamW, none on biases and norms (paper: 0.05)
BETAS = (0.9, 0.999)               # AdamW betas (paper: 0.9, 0.999)
GRAD_CLIP = None                   # max gradient norm; None = no clipping, the norm is only logged
                                   # (paper: None)
MAX_BAD_STEPS = 5                  # a non-finite loss skips the step; this many in a row stop
# evaluation
TEST_CLIPS = 4                     # final test: clips per video (paper: 4 Kinetics, 2 SSv2)
TEST_CROPS = 3                     # final test: crops per clip, 3 = left/center/right or
                                   # 1 = center (paper: 3)
TEST_BEST = True                   # test the epoch with the best validation top-1
                                   # (OUT_DIR/best.pt), not the last (the official scripts pass
                                   # --test_best)
# system
DEVICE = 'auto'                    # 'auto' = the GPU when there is one; 'cpu' forces the CPU
DTYPE = 'auto'                     # 'auto' = bf16 on recent GPUs, fp16 + loss scaling on older
                                   # ones, fp32 on CPU
COMPILE = True                     # torch.compile the classifier (every clip has all its tokens:
                                   # static shapes)
SEED = 0                           # new head, data order, augmentation, mixup, stochastic depth
LOG_INTERVAL = 20                  # steps between log lines (each costs a host sync)
CKPT_INTERVAL = 500                # steps between checkpoints; one is also written after each
                                   # epoch's validation
OUT_DIR = 'out/k710_b16'           # last.pt and log.jsonl

PRESETS = {
    'k710_b16': {},
    'k400_b16': {'INIT': 'out/k710_b16/best.pt', 'TRAIN_LIST': 'data/k400_train.csv',
                 'VAL_LIST': 'data/k400_val.csv', 'NUM_CLASSES': 400, 'HEAD_ROWS': 'first',
                 'BASE_LR': 2e-5, 'EPOCHS': 5, 'WARMUP_EPOCHS': 1, 'OUT_DIR': 'out/k400_b16'},
    'k600_b16': {'INIT': 'out/k710_b16/best.pt', 'TRAIN_LIST': 'data/k600_train.csv',
                 'VAL_LIST': 'data/k600_val.csv', 'NUM_CLASSES': 600,
                 'HEAD_ROWS': 'data/label_mixto600.json', 'BASE_LR': 2e-5, 'EPOCHS': 5,
                 'WARMUP_EPOCHS': 1, 'OUT_DIR': 'out/k600_b16'},
    'k700_b16': {'INIT': 'out/k710_b16/best.pt', 'TRAIN_LIST': 'data/k700_train.csv',
                 'VAL_LIST': 'data/k700_val.csv', 'NUM_CLASSES': 700,
                 'HEAD_ROWS': 'data/label_mixto700.json', 'BASE_LR': 2e-5, 'EPOCHS': 5,
                 'WARMUP_EPOCHS': 1, 'OUT_DIR': 'out/k700_b16'},
    'ssv2_b16': {'TRAIN_LIST': 'data/ssv2_train.csv', 'VAL_LIST': 'data/ssv2_val.csv',
                 'NUM_CLASSES': 174, 'SAMPLER': 'ssv2', 'FLIP': False, 'EPOCHS': 30,
                 'WARMUP_EPOCHS': 5, 'TEST_CLIPS': 2, 'OUT_DIR': 'out/ssv2_b16'},
    'k710_l16': {'INIT': 'out/stage1_l16/last.pt', 'BASE_LR': 1e-4, 'LAYER_DECAY': 0.85,
                 'DROP_PATH': 0.2, 'EPOCHS': 20, 'OUT_DIR': 'out/k710_l16'},
    'k400_l16': {'INIT': 'out/k710_l16/best.pt', 'TRAIN_LIST': 'data/k400_train.csv',
                 'VAL_LIST': 'data/k400_val.csv', 'NUM_CLASSES': 400, 'HEAD_ROWS': 'first',
                 'BASE_LR': 1e-5, 'LAYER_DECAY': 0.85, 'DROP_PATH': 0.2, 'EPOCHS': 5,
                 'WARMUP_EPOCHS': 1, 'OUT_DIR': 'out/k400_l16'},
    'ssv2_l16': {'INIT': 'out/stage1_l16/last.pt', 'TRAIN_LIST': 'data/ssv2_train.csv',
                 'VAL_LIST': 'data/ssv2_val.csv', 'NUM_CLASSES': 174, 'SAMPLER': 'ssv2',
                 'FLIP': False, 'BASE_LR': 4e-4, 'LAYER_DECAY': 0.85, 'DROP_PATH': 0.2,
                 'EPOCHS': 14, 'WARMUP_EPOCHS': 4, 'TEST_CLIPS': 2, 'OUT_DIR': 'out/ssv2_l16'},
    # CPU demo: the tiny stage-1 demo model on the synthetic classes (colour x up / down motion;
    # the horizontal flip keeps those labels true), from 2 labelled videos per class
    # (train_few.csv, 24 videos): with all 180, a random init learns the colours from the labels
    # as well, and pre-training shows where labels are few. Mixup / cutmix, RandAugment, erasing,
    # small crops and repeated augmentation only slow learning down within the 180 steps a demo
    # can afford, so they are off; a 4-block model has no deep stack of general features to
    # protect, so no layer decay either.
    'demo': {'INIT': 'out/demo_stage1/last.pt', 'TRAIN_LIST': 'demo_data/train_few.csv',
             'VAL_LIST': 'demo_data/val.csv', 'DATA_ROOT': 'demo_data', 'MAKE_DEMO': True,
             'NUM_CLASSES': 12, 'NUM_FRAMES': 4, 'IMG_SIZE': 64, 'RRC_SCALE': (0.4, 1.0),
             'MIXUP': 0.0, 'CUTMIX': 0.0, 'RAND_AUGMENT': None, 'RANDOM_ERASE': 0.0,
             'DROP_PATH': 0.0, 'LAYER_DECAY': 1.0, 'NUM_SAMPLE': 1, 'TOTAL_BATCH': 8,
             'MICRO_BATCH': 8, 'BASE_LR': 4.8e-3, 'EPOCHS': 60, 'WARMUP_EPOCHS': 5,
             'TEST_CLIPS': 2, 'COMPILE': False, 'NUM_WORKERS': 1, 'LOG_INTERVAL': 30,
             'CKPT_INTERVAL': 100, 'OUT_DIR': 'out/demo_finetune'},
}

config = configure(globals(), PRESETS, sys.argv[1:])
# Start-up checks, before anything heavy: a typo costs seconds, not a queue slot.
# micro_batch: MICRO_BATCH, or less where a process's share of TOTAL_BATCH needs it
world_size, micro_batch, grad_accum = split_batch(TOTAL_BATCH, MICRO_BATCH)
need_positive(EPOCHS=EPOCHS, NUM_FRAMES=NUM_FRAMES, IMG_SIZE=IMG_SIZE, NUM_SAMPLE=NUM_SAMPLE,
              TEST_CLIPS=TEST_CLIPS, LOG_INTERVAL=LOG_INTERVAL, CKPT_INTERVAL=CKPT_INTERVAL,
              MAX_BAD_STEPS=MAX_BAD_STEPS)
if TEST_CROPS not in (1, 3):
    fail(f'TEST_CROPS={TEST_CROPS} must be 1 or 3')
if not (0 <= LABEL_SMOOTHING < 1 and MIXUP >= 0 and CUTMIX >= 0 and 0 <= MIX_SWITCH_PROB <= 1):
    fail('LABEL_SMOOTHING must lie in [0, 1), MIXUP and CUTMIX >= 0 (0 = off), MIX_SWITCH_PROB in '
         '[0, 1]')
if not (0 < LAYER_DECAY <= 1 and 0 < RRC_SCALE[0] <= RRC_SCALE[1] <= 1):
    fail(f'LAYER_DECAY={LAYER_DECAY} must lie in (0, 1] (1 = no decay) and RRC_SCALE={RRC_SCALE} '
         'in (0, 1]')
if not (0 <= RANDOM_ERASE <= 1 and (RAND_AUGMENT is None or (
        len(RAND_AUGMENT) == 3 and RAND_AUGMENT[0] >= 1 and 0 <= RAND_AUGMENT[1] <= 10))):
    fail(f'RANDOM_ERASE={RANDOM_ERASE} must lie in [0, 1] and RAND_AUGMENT={RAND_AUGMENT} be None '
         'or (ops >= 1, magnitude in [0, 10], magnitude std), e.g. (4, 7, 0.5) for '
         'rand-m7-n4-mstd0.5')
if SAMPLER not in ('kinetics', 'ssv2'):
    fail(f"SAMPLER={SAMPLER!r} must be 'kinetics' or 'ssv2'")
head_rows = checkpoints.head_rows(HEAD_ROWS, NUM_CLASSES)  # read now: a bad file costs seconds
need_init(INIT, OUT_DIR, 'ours (train_stage1.py, train_stage2.py, tasks.finetune) or an official '
          'UMT .pth', 'python train_stage1.py --preset=demo')
need_files({'TRAIN_LIST': TRAIN_LIST, 'VAL_LIST': VAL_LIST}, 'it lists one video per line as '
           '`path,label` (or `path label`), paths relative to DATA_ROOT, labels 0 .. '
           'NUM_CLASSES-1. To try the script: --preset=demo.', MAKE_DEMO)

# ----------------------------------------------------------------------------------------------
# Processes (torchrun's environment: one per GPU, or gloo processes on CPU), precision, OUT_DIR

# train_stage1.py's process group, precision (autocast, GradScaler) and OUT_DIR lock, in one call
rank, world_size, device, autocast, scaler, lock = training.start(DEVICE, DTYPE, OUT_DIR)
master, ckpt_path = rank == 0, os.path.join(OUT_DIR, 'last.pt')
best_path = os.path.join(OUT_DIR, 'best.pt')
# The official rule scales the lr with the clips per step, which repeated augmentation multiplies.
lr_factor = TOTAL_BATCH * NUM_SAMPLE / 256
peak_lr, warmup_lr, min_lr = BASE_LR * lr_factor, WARMUP_LR * lr_factor, MIN_LR * lr_factor

# ----------------------------------------------------------------------------------------------
# Data: repeated augmentation for training; 1 clip x 1 crop to validate; clips x crops to test

if MAKE_DEMO:
    demo.setup(DATA_ROOT, TRAIN_LIST, True, None, master, SEED)
kw = dict(max_bad_fraction=MAX_BAD_FRACTION, threads=DECODE_THREADS, sampler=SAMPLER)
with user_input():  # a list file that cannot be read
    train_set = augment.RepeatedAugClassification(
        TRAIN_LIST, DATA_ROOT, NUM_FRAMES, IMG_SIZE, flip=FLIP, rrc_scale=RRC_SCALE,
        num_sample=NUM_SAMPLE, rand_augment=RAND_AUGMENT, erase_prob=RANDOM_ERASE, **kw)
    val_set = data.VideoClassification(VAL_LIST, DATA_ROOT, NUM_FRAMES, IMG_SIZE, mode='val', **kw)
    test_set = data.VideoClassification(VAL_LIST, DATA_ROOT, NUM_FRAMES, IMG_SIZE, mode='test',
                                        num_clips=TEST_CLIPS, num_crops=TEST_CROPS, **kw)
for name, ds in (('TRAIN_LIST', train_set), ('VAL_LIST', val_set)):
    if ds.num_classes > NUM_CLASSES:
        fail(f'{name} has label {ds.num_classes - 1}, but NUM_CLASSES={NUM_CLASSES}')
steps_per_epoch = epoch_steps(len(train_set), TOTAL_BATCH, TRAIN_LIST, 'videos')
total_steps, warmup_steps = EPOCHS * steps_per_epoch, WARMUP_EPOCHS * steps_per_epoch

# ----------------------------------------------------------------------------------------------
# Model: resume from OUT_DIR/last.pt, or the classifier on INIT (checkpoints.load reports)

torch.manual_seed(SEED)  # the same new head on every rank (DDP broadcasts rank 0's anyway)
ckpt = training.resume(OUT_DIR, world_size, device, 'num_classes')  # None for a new run
if ckpt is not None and ckpt['num_classes'] != NUM_CLASSES:
    fail(f'{ckpt_path} has {ckpt["num_classes"]} classes but NUM_CLASSES={NUM_CLASSES}: another '
         'OUT_DIR?')
# the sin-cos table is regenerated for NUM_FRAMES x IMG_SIZE
raw_model, report = checkpoints.load_classifier(
    INIT if ckpt is None else ckpt, NUM_CLASSES,
    head_rows=head_rows if ckpt is None else None, head_dropout=HEAD_DROPOUT,
    init_scale=INIT_SCALE, num_frames=NUM_FRAMES, img_size=IMG_SIZE, drop_path=DROP_PATH,
    checkpoint_blocks=CHECKPOINT_BLOCKS, name=INIT if ckpt is None else ckpt_path)
# the best validation top-1 so far (TEST_BEST)
best_top1 = -1.0 if ckpt is None else ckpt.get('best_top1', -1.0)
raw_model.to(device)  # unwrapped: what is saved and evaluated
model_config = raw_model.backbone.config

# ----------------------------------------------------------------------------------------------
# Optimizer: AdamW, layer-wise lr decay, warmup from WARMUP_LR then cosine; resume, compile, DDP

decay = training.layer_decay(model_config.depth, LAYER_DECAY, prefix='backbone.')
optimizer = training.adamw(raw_model, peak_lr, WEIGHT_DECAY, BETAS, decay)
# the optimizer state, the loss scale and the step (the weights are loaded above)
step, resumed = training.restore(ckpt, optimizer, scaler, config, ckpt_path, steps_per_epoch)
ckpt = None  # its tensors would stay in memory for the whole run
model = training.wrap(raw_model, raw_model, COMPILE, world_size, device)  # compile, then DDP
if master:
    lowered = f' (MICRO_BATCH={MICRO_BATCH} lowered to split TOTAL_BATCH)' \
        if micro_batch < MICRO_BATCH else ''
    print(' | '.join(report) + (f'\n{resumed}' if resumed else ''))
    print(f'{micro_batch} videos{lowered} x {NUM_SAMPLE} clips x {world_size} processes x '
          f'{grad_accum} accumulation steps = {TOTAL_BATCH} videos per step | peak lr '
          f'{peak_lr:.3g} (BASE_LR {BASE_LR:g} x {TOTAL_BATCH} x {NUM_SAMPLE} / 256), layer decay '
          f'{LAYER_DECAY}, warmup {warmup_steps} steps | {len(train_set)} videos, {total_steps} '
          'steps')
    training.write_log(OUT_DIR, {'config': config, 'world_size': world_size, 'start_step': step})

# ----------------------------------------------------------------------------------------------
# Training loop

# what a checkpoint describes
state = dict(model_config=dataclasses.asdict(model_config), num_classes=NUM_CLASSES)
batches = training.train_batches(train_set, micro_batch, SEED, rank, world_size, NUM_WORKERS, step,
                                 steps_per_epoch, grad_accum)
bar = tqdm(total=total_steps, initial=step, disable=not master, desc='fine-tune',
           dynamic_ncols=True)
last_ckpt_step, skipped, bad_in_a_row = step, 0, 0  # the last checkpoint, bad steps
t_log, step_log, data_wait, replaced = time.perf_counter(), step, 0.0, 0  # since the last log line
while step < total_steps:
    lr = training.lr_at(step, total_steps, warmup_steps, peak_lr, min_lr, start=warmup_lr)
    training.set_lr(optimizer, lr)
    step_loss = torch.zeros((), device=device)
    for micro in range(grad_accum):
        t0 = time.perf_counter()
        batch = next(batches)
        data_wait += time.perf_counter() - t0
        replaced += int(batch['skipped'].sum())  # unreadable videos the dataset replaced
        # [b x NUM_SAMPLE, 3, T, S, S] and [b x NUM_SAMPLE]: both clips of a video get its label
        video = data.normalize(batch['video'].to(device, non_blocking=True)).flatten(0, 1)
        label = batch['label'].to(device).repeat_interleave(NUM_SAMPLE)
        # Randomness is a function of (SEED, step, micro-step, rank): mixup / cutmix here and
        # stochastic depth in the model, so a resumed run replays it exactly, with any number of
        # processes.
        torch.manual_seed(training.seed_for(SEED, step, micro, rank))
        rng = np.random.default_rng(training.seed_for(SEED, step, micro, rank, 'mix'))
        # [b x NUM_SAMPLE, C], rows sum to 1
        target = augment.smooth_one_hot(label, NUM_CLASSES, LABEL_SMOOTHING)
        video, target = augment.mixup_cutmix(video, target, rng, MIXUP, CUTMIX, MIX_SWITCH_PROB)
        # DDP all-reduces the gradients in every backward; the micro-steps but the last add them up.
        with nullcontext() if micro == grad_accum - 1 or world_size == 1 else model.no_sync():
            with autocast:
                logits = model(video)                                   # [b x NUM_SAMPLE, C]
            # L = mean over clips of -sum_c target_c log softmax(logits)_c (soft targets, in fp32)
            loss = -(target * logits.float().log_softmax(-1)).sum(-1).mean()
            # Gradients add up over the micro-steps: dividing by grad_accum gives the mean loss's.
            scaler.scale(loss / grad_accum).backward()
        step_loss += loss.detach() / grad_accum

    # ---- train_stage1.py's update: unscale, clip, step unless not finite, loss scale, zero_grad
    good, grad_norm = training.update(optimizer, scaler, raw_model, GRAD_CLIP, step_loss)
    step += 1
    bar.update()

    # ---- log this step (its loss averaged over the ranks: a host sync, so every LOG_INTERVAL)
    skipped, bad_in_a_row = skipped + (not good), 0 if good else bad_in_a_row + 1
    if step % LOG_INTERVAL == 0 or step == total_steps or bad_in_a_row == MAX_BAD_STEPS:
        counts = torch.tensor([replaced, data_wait], dtype=torch.float64, device=device)
        stats = training.all_reduce_mean(torch.cat([step_loss.double().view(1), counts])).tolist()
        seconds, done = time.perf_counter() - t_log, step - step_log
        ok = lambda v: v if good else None  # a skipped step has no loss to report  # noqa: E731
        record = {'step': step, 'epoch': step / steps_per_epoch, 'loss': ok(stats[0]), 'lr': lr,
                  'grad_norm': ok(grad_norm.item()), 'samples_per_s': TOTAL_BATCH * done / seconds,
                  'ms_per_step': 1000 * seconds / done, 'data_wait': min(1.0, stats[2] / seconds),
                  'skipped_steps': skipped, 'skipped_samples': round(stats[1] * world_size)}
        if device.type == 'cuda':
            record['max_memory_gib'] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        if master:
            training.write_log(OUT_DIR, record)
            shown = f'{stats[0]:.4f}' if good else 'n/a'
            tqdm.write(f'step {step} | loss {shown} | lr {lr:.3g} | grad norm '
                       f'{grad_norm.item():.3f} | {record["ms_per_step"]:.0f} ms/step | '
                       f'{record["samples_per_s"]:.1f} samples/s | data wait '
                       f'{record["data_wait"]:.0%}')
        t_log, step_log, data_wait, replaced = time.perf_counter(), step, 0.0, 0
    if bad_in_a_row == MAX_BAD_STEPS:  # the loss diverged: stop, and name the checkpoint to resume
        last = f'{ckpt_path} (step {last_ckpt_step})' if last_ckpt_step else \
            'none: no checkpoint was written yet'
        fail(f'{bad_in_a_row} non-finite losses in a row (steps {step + 1 - bad_in_a_row}-{step}): '
             f'stopping. The last good checkpoint is {last}: lower the learning rate, then launch '
             'again to resume.')

    # ---- validation after every epoch (1 clip x 1 crop); checkpoints: last.pt, best.pt (TEST_BEST)
    if step % steps_per_epoch == 0:
        val = head_accuracy(raw_model, val_set, device, micro_batch * NUM_SAMPLE, NUM_WORKERS,
                            autocast)
        epoch = step // steps_per_epoch
        if master:
            tqdm.write(f'epoch {epoch}/{EPOCHS} | val top-1 {val["top1"]:.2f} | top-5 '
                       f'{val["top5"]:.2f} (1 clip x 1 crop, {len(val_set)} videos)')
            training.write_log(OUT_DIR, {'step': step, 'epoch': epoch,
                                         'val_top1': round(val['top1'], 2),
                                         'val_top5': round(val['top5'], 2)})
        if val['top1'] > best_top1:  # the weights of the best epoch so far, beside last.pt
            best_top1 = val['top1']
            if master:
                training.save_checkpoint({'model': raw_model.state_dict(), 'epoch': epoch,
                                          'val_top1': best_top1, **state}, best_path)
    if good and (step % CKPT_INTERVAL == 0 or step % steps_per_epoch == 0 or step == total_steps):
        if master:
            training.save_checkpoint({'model': raw_model.state_dict(),
                                      'optimizer': optimizer.state_dict(),
                                      'scaler': scaler.state_dict(), 'step': step, 'config': config,
                                      'best_top1': best_top1, **state}, ckpt_path)
        last_ckpt_step = step
bar.close()

# ----------------------------------------------------------------------------------------------
# Final test: TEST_CLIPS x TEST_CROPS views per video, softmax averaged (the official multi-view)

views, tested = TEST_CLIPS * TEST_CROPS, {'epoch': EPOCHS}
if TEST_BEST:  # the official --test_best: reload the epoch with the best validation top-1
    if world_size > 1:
        torch.distributed.barrier()  # rank 0 wrote best.pt
    tested = training.read_checkpoint(best_path)
    raw_model.load_state_dict(tested['model'])
test = head_accuracy(raw_model, test_set, device, max(1, micro_batch * NUM_SAMPLE // views),
                     NUM_WORKERS, autocast)
if master:
    print(f'test of epoch {tested["epoch"]}: top-1 {test["top1"]:.2f} | top-5 {test["top5"]:.2f} '
          f'({TEST_CLIPS} clips x {TEST_CROPS} crops, {len(test_set)} videos; chance '
          f'{100 / NUM_CLASSES:.1f})')
    training.write_log(OUT_DIR, {'step': step, 'test_top1': round(test['top1'], 2),
                                 'test_top5': round(test['top5'], 2), 'views': views,
                                 'epoch': tested['epoch']})
    print(f'done: {step} steps, {skipped} skipped; weights in {ckpt_path}, the best epoch in '
          f'{best_path}, log in {OUT_DIR}/log.jsonl')
if world_size > 1:
    # leave together: a rank that leaves first makes gloo abort the others
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
