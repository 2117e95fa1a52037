"""
Spatiotemporal action localization on AVA v2.2: the UMT student fine-tuned to label person boxes
with the 80 AVA actions, tested by frame-mAP on the 60 evaluated ones (the paper's AVA v2.2
results: UMT-B 33.5, UMT-L 39.8 mAP; official code: single_modality/action_detection/).

Each training keyframe gives 8 frames around it and its ground-truth person boxes; the video
encoder's tokens are normed, averaged over time, and every (jittered) box is RoI-aligned from that
map, max-pooled and classified with a sigmoid per action. The test uses a person detector's boxes
(score >= 0.8, extended a little for pooling) and scores each action as sigmoid x detector score;
the detections are written as an AVA CSV and scored with the official frame-mAP
(`python -m tasks.ava map` computes the same number from the file). The recipe is the official
one: AdamW with layer-wise lr decay, warmup + cosine per step, stochastic depth, 30 epochs (B).

    # UMT-B/16 from the K710 fine-tuned classifier (tasks.finetune), the official route, on 8 GPUs
    # (16 x 8 in the paper)
    torchrun --standalone --nproc_per_node=8 -m tasks.finetune_ava --init=out/k710_b16/last.pt \\
        --movie_root=/data/ava
    torchrun --standalone --nproc_per_node=8 -m tasks.finetune_ava --preset=ava_l16 \\
        --movie_root=/data/ava
    # 1 GPU, an official .pth
    python -m tasks.finetune_ava --init=b16_ptk710_ftk710_f8_res224.pth --micro_batch=16
    # CPU, a few minutes
    python train_stage1.py --preset=demo && python -m tasks.finetune_ava --preset=demo

After a crash, the same command resumes from OUT_DIR/last.pt.
"""

import dataclasses
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import training
from model import load_strict
from tasks import ava
from util import checkpoints
from util.configurator import (configure, epoch_steps, fail, need_files, need_init, need_positive,
                               split_batch)

# ----------------------------------------------------------------------------------------------
# Configuration: the official AVA v2.2 fine-tuning of UMT-B/16; --preset=NAME, --name=value

# starting point and data (tasks/ava.py describes the files)
INIT = 'out/k710_b16/last.pt'      # ours (classifier, stage 1 or 2) or an official .pth
                                   # (paper: the K710 classifier)
MOVIE_ROOT = 'data/ava/movies'     # <video_id>.<ext>, each the movie from second MOVIE_START on
MOVIE_START = 900                  # the movie second where the files start: 900 for the 15-minute
                                   # cuts, 0 for whole movies
TRAIN_CSV = 'data/ava/ava_train_v2.2.csv'   # ground-truth boxes and actions (trained on these
                                            # boxes only)
VAL_CSV = 'data/ava/ava_val_v2.2.csv'       # the ground truth of the metric
DETECTIONS = 'data/ava/ava_val_person_boxes.csv'  # person boxes with scores on the val
                                                  # keyframes: tested on these
LABELMAP = 'data/ava/ava_action_list_v2.2_for_activitynet_2019.pbtxt'  # the classes scored
                                                                       # (60 of the 80)
EXCLUSIONS = 'data/ava/ava_val_excluded_timestamps_v2.2.csv'  # keyframes not scored; '' = none
MAKE_DEMO = False                  # write the synthetic set next to TRAIN_CSV if missing (demo)
NUM_CLASSES = 80                   # AVA action ids 1 .. 80, all trained (official; the pose
                                   # classes too)
DET_THRESHOLD = 0.8                # test on person boxes with at least this score (official: 0.8)
MAX_BOXES = 100                    # boxes per keyframe at most; a keyframe with more is skipped
                                   # (official cap: 100)
NUM_FRAMES = 8                     # T (paper: 8)
FRAME_STRIDE = 0.32                # seconds between the frames, centred on the keyframe
                                   # (official: 8 frames of its 25 fps clips, i.e. 2.24 s from the
                                   # first frame to the last)
SHORT_SIDE = 256                   # frames resized to this short side, training and test
                                   # (official: 256)
CROP = 224                         # training crop; the test sees the whole resized frame
                                   # (official: 224)
FLIP = True                        # random horizontal flip in training (official: yes)
NUM_WORKERS = min(10, training.CORES)  # decoding processes per GPU (official: 10)
DECODE_THREADS = 1                 # PyAV threads per worker
MAX_BAD_FRACTION = 0.05            # stop when over this fraction of the keyframes cannot be read
# model
DROP_PATH = 0.2                    # stochastic depth of the last block, linear from 0
                                   # (official: 0.2 B, 0.4 L)
INIT_SCALE = 0.001                 # the new head starts at trunc-normal(0.02) x this (official)
ROI_ALIGNED = True                 # RoIAlign pixel model: True = a box pools its own area; the
                                   # official False pools the area half a patch (8 px) right of and
                                   # below it
# optimization
TOTAL_BATCH = 128                  # keyframes per optimizer step over all GPUs
                                   # (official: 16 GPUs x 8)
MICRO_BATCH = 8                    # keyframes per GPU per forward; accumulation makes up the rest
                                   # (official: 8)
BASE_LR = 2.5e-4                   # peak lr = BASE_LR x TOTAL_BATCH / 256
                                   # (official: 2.5e-4 -> 1.25e-4)
MIN_LR = 1e-6                      # cosine floor, scaled like BASE_LR (official: 1e-6 -> 5e-7)
WARMUP_EPOCHS = 5                  # linear warmup from 0, per step (official: 5)
EPOCHS = 30                        # official: 30 B, 25 L
LAYER_DECAY = 0.75                 # lr x decay^(depth + 1 - layer), patch embedding = 0
                                   # (official: 0.75 B, 0.85 L)
WEIGHT_DECAY = 0.05                # AdamW, none on biases and norms (official: 0.05)
BETAS = (0.9, 0.999)               # AdamW betas (official)
GRAD_CLIP = None                   # max gradient norm; None = only logged (official: None)
MAX_BAD_STEPS = 5                  # a non-finite loss skips the step; this many in a row stop
# evaluation
EVAL_EPOCHS = 10                   # frame-mAP on the val set every this many epochs, and at the
                                   # end (official: 10 B)
TEST_BATCH = 12                    # keyframes per test forward (official: 1.5 x the training batch)
# system
DEVICE = 'auto'                    # 'auto' = the GPU when there is one; 'cpu' forces the CPU
DTYPE = 'auto'                     # 'auto' = bf16 on recent GPUs, fp16 + loss scaling on older
                                   # ones, fp32 on CPU
COMPILE = True                     # torch.compile the detector (training clips are all CROP x CROP)
SEED = 0                           # new head, data order, crops, flips, box jitter, stochastic
                                   # depth (official: 0 B)
LOG_INTERVAL = 20                  # steps between log lines
CKPT_INTERVAL = 500                # steps between checkpoints; one is also written after every
                                   # epoch
OUT_DIR = 'out/ava_b16'            # last.pt, log.jsonl, detections_step*.csv

PRESETS = {
    'ava_b16': {},
    # the official L recipe (which also runs in fp32)
    'ava_l16': {'INIT': 'out/k710_l16/last.pt', 'DROP_PATH': 0.4, 'LAYER_DECAY': 0.85,
                'EPOCHS': 25, 'MICRO_BATCH': 4, 'EVAL_EPOCHS': 20, 'TEST_BATCH': 6, 'SEED': 6666,
                'OUT_DIR': 'out/ava_l16'},
    # CPU demo: the tiny stage-1 demo model on squares that move up, move down or stand still
    # (ava.make_demo), 4 frames 0.4 s apart at 64 px; peak lr 1e-3 for 180 steps. A 4-block model
    # has no deep stack of general features to protect, so no layer decay, and 192 keyframes need
    # no stochastic depth.
    'demo': {'INIT': 'out/demo_stage1/last.pt', 'MOVIE_ROOT': 'demo_ava/movies',
             'TRAIN_CSV': 'demo_ava/train.csv', 'VAL_CSV': 'demo_ava/val.csv',
             'DETECTIONS': 'demo_ava/val_detections.csv', 'LABELMAP': 'demo_ava/labelmap.pbtxt',
             'EXCLUSIONS': 'demo_ava/val_excluded.csv', 'MAKE_DEMO': True, 'NUM_CLASSES': 3,
             'NUM_FRAMES': 4, 'FRAME_STRIDE': 0.4, 'SHORT_SIDE': 64, 'CROP': 64, 'DROP_PATH': 0.0,
             'LAYER_DECAY': 1.0, 'TOTAL_BATCH': 16, 'MICRO_BATCH': 16, 'BASE_LR': 0.016,
             'WARMUP_EPOCHS': 2, 'EPOCHS': 15, 'EVAL_EPOCHS': 1000, 'TEST_BATCH': 16,
             'COMPILE': False, 'NUM_WORKERS': 0, 'LOG_INTERVAL': 20, 'CKPT_INTERVAL': 100,
             'OUT_DIR': 'out/demo_ava'},
}

config = configure(globals(), PRESETS, sys.argv[1:])
# Start-up checks, before anything heavy: a typo costs seconds, not a queue slot.
# micro_batch: MICRO_BATCH, or less where a process's share of TOTAL_BATCH needs it
world_size, micro_batch, grad_accum = split_batch(TOTAL_BATCH, MICRO_BATCH)
need_positive(EPOCHS=EPOCHS, NUM_FRAMES=NUM_FRAMES, CROP=CROP, TEST_BATCH=TEST_BATCH,
              EVAL_EPOCHS=EVAL_EPOCHS, LOG_INTERVAL=LOG_INTERVAL, CKPT_INTERVAL=CKPT_INTERVAL,
              MAX_BAD_STEPS=MAX_BAD_STEPS)
if not (CROP <= SHORT_SIDE and 0 <= DET_THRESHOLD <= 1 and FRAME_STRIDE > 0
        and 0 < LAYER_DECAY <= 1):
    fail(f'need CROP={CROP} <= SHORT_SIDE={SHORT_SIDE}, DET_THRESHOLD={DET_THRESHOLD} in [0, 1], '
         f'FRAME_STRIDE={FRAME_STRIDE} > 0 seconds and LAYER_DECAY={LAYER_DECAY} in (0, 1]')
need_init(INIT, OUT_DIR, 'ours or an official UMT .pth', 'python train_stage1.py --preset=demo')
need_files({'TRAIN_CSV': TRAIN_CSV, 'VAL_CSV': VAL_CSV, 'DETECTIONS': DETECTIONS,
            'LABELMAP': LABELMAP, 'EXCLUSIONS': EXCLUSIONS},
           'one of the AVA v2.2 files (README). To try: --preset=demo.', MAKE_DEMO)

# ----------------------------------------------------------------------------------------------
# Processes, precision and the OUT_DIR lock (train_stage1.py's, in one call)

rank, world_size, device, autocast, scaler, lock = training.start(DEVICE, DTYPE, OUT_DIR)
master, ckpt_path = rank == 0, os.path.join(OUT_DIR, 'last.pt')
peak_lr, min_lr = BASE_LR * TOTAL_BATCH / 256, MIN_LR * TOTAL_BATCH / 256

# ----------------------------------------------------------------------------------------------
# Data: training keyframes with their ground-truth boxes; test keyframes with the detector's boxes.
# Every file the test reads is read now: a bad one costs seconds, not a training run.

if MAKE_DEMO and master and not os.path.exists(TRAIN_CSV):
    print(f'writing the synthetic AVA-style demo set to {os.path.dirname(TRAIN_CSV)}/ (a few '
          'seconds)')
    ava.make_demo(os.path.dirname(TRAIN_CSV))
if world_size > 1:
    torch.distributed.barrier()  # the others wait for rank 0's files
kw = dict(num_classes=NUM_CLASSES, num_frames=NUM_FRAMES, stride=FRAME_STRIDE,
          short_side=SHORT_SIDE, crop=CROP, flip=FLIP, movie_start=MOVIE_START,
          max_boxes=MAX_BOXES, max_bad_fraction=MAX_BAD_FRACTION, threads=DECODE_THREADS)
gt, bad_gt = ava.read_csv(TRAIN_CSV, what='TRAIN_CSV')
dets, bad_dets = ava.read_csv(DETECTIONS, with_score=True, what='DETECTIONS')
# the metric's movies: the detections on other movies are ignored
val_videos = {r.video for r in ava.read_csv(VAL_CSV, what='VAL_CSV')[0]}
train_set = ava.Keyframes(gt, MOVIE_ROOT, 'train', **kw)
test_set = ava.Keyframes([r for r in dets if r.score >= DET_THRESHOLD and r.video in val_videos],
                         MOVIE_ROOT, 'test', **kw)
ava.read_labelmap(LABELMAP)
if EXCLUSIONS:
    ava.read_exclusions(EXCLUSIONS)
steps_per_epoch = epoch_steps(len(train_set), TOTAL_BATCH, TRAIN_CSV, 'keyframes with a movie')
total_steps, warmup_steps = EPOCHS * steps_per_epoch, WARMUP_EPOCHS * steps_per_epoch
if master:  # both sets in one line
    sets = []
    for name, ds, bad in (('train', train_set, bad_gt), ('test', test_set, bad_dets)):
        missing = f'; {len(ds.missing)} movies not in {MOVIE_ROOT} (e.g. {ds.missing[0]}): their ' \
            'keyframes left out' if ds.missing else ''
        sets.append(f'{name}: {len(ds)} keyframes, {sum(map(len, ds.people))} boxes; {bad} boxes '
                    f'outside the frame skipped{missing}')
    print(' | '.join(sets))

# ----------------------------------------------------------------------------------------------
# Model: resume from OUT_DIR/last.pt, or a new head on INIT's encoder (checkpoints.load reports)

torch.manual_seed(SEED)  # the same new head on every rank
ckpt = training.resume(OUT_DIR, world_size, device, 'num_classes')  # None for a new run
if ckpt is not None and ckpt['num_classes'] != NUM_CLASSES:
    fail(f'{ckpt_path} has {ckpt["num_classes"]} classes but NUM_CLASSES={NUM_CLASSES}: another '
         'OUT_DIR?')
# any checkpoint gives a classifier's backbone; sin-cos table regenerated for NUM_FRAMES x CROP
encoder, report = checkpoints.load_classifier(INIT if ckpt is None else ckpt, NUM_CLASSES,
                                              num_frames=NUM_FRAMES, img_size=CROP,
                                              drop_path=DROP_PATH,
                                              name=INIT if ckpt is None else ckpt_path)
raw_model = ava.ActionDetector(encoder.backbone, NUM_CLASSES, INIT_SCALE, ROI_ALIGNED)
if ckpt is not None:
    load_strict(raw_model, ckpt['model'])
raw_model.to(device)  # unwrapped: what is saved and evaluated
model_config = raw_model.backbone.config

# ----------------------------------------------------------------------------------------------
# Optimizer: AdamW with layer-wise lr decay, warmup from 0 then cosine; resume, compile, DDP

# norm and head: full lr
decay = training.layer_decay(model_config.depth, LAYER_DECAY, prefix='backbone.')
optimizer = training.adamw(raw_model, peak_lr, WEIGHT_DECAY, BETAS, decay)
# the optimizer state, the loss scale and the step (the weights are loaded above)
step, resumed = training.restore(ckpt, optimizer, scaler, config, ckpt_path, steps_per_epoch)
ckpt = None  # its tensors would stay in memory for the whole run
# torch.compile the video encoder in place (RoIs vary in number), then DDP around the detector
model = training.wrap(raw_model, raw_model.backbone, COMPILE, world_size, device)
if master:
    lowered = f' (MICRO_BATCH={MICRO_BATCH} lowered to split TOTAL_BATCH)' \
        if micro_batch < MICRO_BATCH else ''
    print(' | '.join(report + ['the detector keeps the video encoder only: its final norm and '
                               'head are new']) + (f'\n{resumed}' if resumed else ''))
    print(f'{micro_batch} keyframes{lowered} x {world_size} processes x {grad_accum} accumulation '
          f'steps = {TOTAL_BATCH} per step | peak lr {peak_lr:.3g} (BASE_LR {BASE_LR:g} x '
          f'{TOTAL_BATCH} / 256), layer decay {LAYER_DECAY}, warmup {warmup_steps} steps | '
          f'{total_steps} steps')
    training.write_log(OUT_DIR, {'config': config, 'world_size': world_size, 'start_step': step})

def test(step):
    """The test keyframes' detections -> OUT_DIR/detections_step{step}.csv, and their frame-mAP
    (the master's)."""
    path = os.path.join(OUT_DIR, f'detections_step{step}.csv')
    unread = ava.write_detections(raw_model, test_set, path, device, TEST_BATCH, NUM_WORKERS,
                                  autocast)
    if unread:
        print(f'rank {rank}: {len(unread)} test keyframes could not be read and have no '
              f'detections, e.g. {unread[0]}')
    if master:
        result = ava.evaluate_files(LABELMAP, VAL_CSV, path, EXCLUSIONS or None)
        training.write_log(OUT_DIR, {'step': step, 'epoch': step / steps_per_epoch,
                                     'val_mAP': result['mAP'],
                                     'detections': os.path.basename(path)})
        print(f'wrote {path}')

# ----------------------------------------------------------------------------------------------
# Training loop

batches = training.train_batches(train_set, micro_batch, SEED, rank, world_size, NUM_WORKERS, step,
                                 steps_per_epoch, grad_accum)
bar = tqdm(total=total_steps, initial=step, disable=not master, desc='ava', dynamic_ncols=True)
last_ckpt_step, skipped, bad_in_a_row = step, 0, 0  # the last checkpoint, bad steps
t_log, step_log, data_wait, replaced = time.perf_counter(), step, 0.0, 0  # since the last log line
while step < total_steps:
    lr = training.lr_at(step, total_steps, warmup_steps, peak_lr, min_lr)
    training.set_lr(optimizer, lr)
    step_loss, step_boxes = torch.zeros((), device=device), 0
    for micro in range(grad_accum):
        t0 = time.perf_counter()
        batch = next(batches)
        data_wait += time.perf_counter() - t0
        replaced += int(batch['skipped'].sum())  # unreadable keyframes the dataset replaced
        video = data.normalize(batch['video'].to(device, non_blocking=True))  # [b, 3, T, H, W]
        rois, target, _ = ava.rois(batch)  # [R, 5] (clip, x1, y1, x2, y2), [R, C]
        # stochastic depth, replayed on resume
        torch.manual_seed(training.seed_for(SEED, step, micro, rank))
        # DDP all-reduces the gradients in every backward; the micro-steps but the last add them up.
        with nullcontext() if micro == grad_accum - 1 or world_size == 1 else model.no_sync():
            with autocast:
                logits = model(video, rois.to(device))                   # [R, C]
            # official loss: BCE-with-logits averaged over the R x C terms, times R = the sum over
            # boxes of the mean over classes; a micro-batch whose boxes all fell outside the
            # crops adds 0
            loss = F.binary_cross_entropy_with_logits(logits.float(), target.to(device),
                                                      reduction='sum') / NUM_CLASSES
            # Gradients add up over the micro-steps: dividing by grad_accum gives the mean loss's.
            scaler.scale(loss / grad_accum).backward()
        step_loss += loss.detach() / grad_accum
        step_boxes += len(rois)

    # ---- train_stage1.py's update: unscale, clip, step unless not finite, loss scale, zero_grad
    good, grad_norm = training.update(optimizer, scaler, raw_model, GRAD_CLIP, step_loss)
    step += 1
    bar.update()

    # ---- log this step (loss and boxes averaged over the ranks: a host sync, every LOG_INTERVAL)
    skipped, bad_in_a_row = skipped + (not good), 0 if good else bad_in_a_row + 1
    if step % LOG_INTERVAL == 0 or step == total_steps or bad_in_a_row == MAX_BAD_STEPS:
        counts = torch.tensor([step_boxes / grad_accum, replaced, data_wait], dtype=torch.float64,
                              device=device)
        stats = training.all_reduce_mean(torch.cat([step_loss.double().view(1), counts])).tolist()
        seconds, done = time.perf_counter() - t_log, step - step_log
        ok = lambda v: v if good else None  # a skipped step has no loss to report  # noqa: E731
        record = {'step': step, 'epoch': step / steps_per_epoch, 'loss': ok(stats[0]),
                  'boxes': ok(stats[1]), 'lr': lr, 'grad_norm': ok(grad_norm.item()),
                  'samples_per_s': TOTAL_BATCH * done / seconds,
                  'ms_per_step': 1000 * seconds / done, 'data_wait': min(1.0, stats[3] / seconds),
                  'skipped_steps': skipped, 'skipped_samples': round(stats[2] * world_size)}
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

    # ---- frame-mAP every EVAL_EPOCHS epochs; a checkpoint after every epoch
    if step % (EVAL_EPOCHS * steps_per_epoch) == 0 and step < total_steps:
        test(step)
    if good and (step % CKPT_INTERVAL == 0 or step % steps_per_epoch == 0 or step == total_steps):
        if master:
            training.save_checkpoint({'model': raw_model.state_dict(),
                                      'optimizer': optimizer.state_dict(),
                                      'scaler': scaler.state_dict(), 'step': step, 'config': config,
                                      'model_config': dataclasses.asdict(model_config),
                                      'num_classes': NUM_CLASSES}, ckpt_path)
        last_ckpt_step = step
bar.close()

# ----------------------------------------------------------------------------------------------
# Final test: every class of every detected person box, scored by frame-mAP@0.5 IoU

test(step)
if master:
    print(f'done: {step} steps, {skipped} skipped; weights in {ckpt_path}, log in '
          f'{OUT_DIR}/log.jsonl')
if world_size > 1:
    # leave together: a rank that leaves first makes gloo abort the others
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
