"""
Open-ended video question answering: fine-tuning the stage-2 model on MSRVTT-QA, MSVD-QA or
ActivityNet-QA with the official recipe (multi_modality/tasks/vqa.py, multi_modality/models/
umt_qa.py, exp/finetuning/qa_*; paper section 4).

The stage-2 text encoder becomes the question encoder (its fusion blocks read all video tokens: no
mask, no teacher); a causal copy of its fusion blocks, cross-attending to the question, generates
the answer (tasks/video_qa.py), with either text side: CLIP (ours) or BERT (the paper's; an official
stage-2 .pth starts through the official key mapping, util/bert.stage2_to_finetune). Loss: each
answer's summed token NLL, weighted, averaged over questions. Test: the answer-list entry ranked
best by rank_answer (the 128 best first tokens, re-scored by the whole answer's likelihood), exact
match with the annotation. The defaults are the official UMT-B/16 recipe for MSRVTT-QA after 5M
pre-training: 12 frames, 8 GPUs x 32 questions, lr 2e-5, 8 epochs.

    torchrun --standalone --nproc_per_node=8 -m tasks.finetune_qa --init=out/stage2/last.pt \\
        --data_root=/data/msrvtt
    torchrun --standalone --nproc_per_node=8 -m tasks.finetune_qa --preset=msvd_b16 \\
        --init=b16_5m.pth --data_root=/data/msvd               # an official stage-2 checkpoint
    python -m tasks.finetune_qa --preset=anet_b16 --micro_batch=8 --data_root=/data/anet  # 1 GPU
    python train_stage1.py --preset=demo && python train_stage2.py --preset=demo && \\
        python -m tasks.finetune_qa --preset=demo                     # CPU, 5-10 minutes

--init also takes hf://OWNER/REPO/FILE, fetched once. After a crash, the same command resumes from
OUT_DIR/last.pt (and a finished run tests again).
"""

import json
import os
import sys
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

import data
import training
from tasks import video_qa
from util import bert, checkpoints
from util.configurator import (configure, fail, need_files, need_init, need_positive,
                               split_batch, epoch_steps)

# ----------------------------------------------------------------------------------------------
# Configuration: the official MSRVTT-QA fine-tuning of UMT-B/16 (5M); --preset=NAME, --name=value

# data: the official JSON files (video_qa.read_qa); answers are matched exactly, never cleaned
TRAIN_ANN = 'data/msrvtt_qa_train.json'  # [{"video", "question", "answer": str or [str]}]
VAL_ANN = 'data/msrvtt_qa_val.json'      # + "question_id"; accuracy after every epoch ('' = none)
TEST_ANN = 'data/msrvtt_qa_test.json'    # + "question_id"; accuracy at the end, predictions too
ANSWER_LIST = 'data/msrvtt_qa_answer_list.json'  # the closed vocabulary of the test answers
DATA_ROOT = ''                     # folder the videos' relative paths start from
MAKE_DEMO = False                  # write the demo QA files (video_qa.make_demo_qa) if TRAIN_ANN is
                                   # missing (demo)
NUM_FRAMES = 12                    # T: the official 'rand' frames for training, middle ones for
                                   # testing (official: 12)
IMG_SIZE = 224                     # random-resized crop (0.5-1) + flip for training, whole frame
                                   # for testing (224)
MAX_QUESTION_LEN = 25              # question tokens with [sot] and [eot] or [CLS] (official: 25)
MAX_ANSWER_LEN = 5                 # answer tokens with the start and eos tokens (official: 5)
NUM_WORKERS = min(6, training.CORES)  # decoding processes per GPU (official: 6)
DECODE_THREADS = 1                 # PyAV threads per worker
MAX_BAD_FRACTION = 0.05            # stop when more than this fraction of the training videos
                                   # cannot be decoded
# model
INIT = 'out/stage2/last.pt'        # a stage-2 checkpoint: ours (train_stage2.py) or an official
                                   # stage-2 .pth (BERT); hf://OWNER/REPO/FILE is fetched once
BERT_VOCAB = bert.VOCAB            # the WordPiece vocab.txt of an official INIT, which has none
DROP_PATH = 0.2                    # stochastic depth of the last video block (official: 0.2 B,
                                   # 0.4 L, 0.3 ANet L)
CHECKPOINT_BLOCKS = 0              # activation checkpointing of the first N video blocks
# optimization
TOTAL_BATCH = 256                  # questions per optimizer step over all GPUs (official: 8 x 32)
MICRO_BATCH = 32                   # questions per GPU per forward; accumulation makes up the rest
LR = 2e-5                          # peak lr, not scaled with the batch (official: see the presets)
MIN_LR_RATIO = 0.01                # warmup starts at, and the cosine ends at, LR x this (0.01)
WARMUP_EPOCHS = 1                  # linear warmup, per iteration (official: 1)
EPOCHS = 8                         # official: MSRVTT 8, MSVD 15 (B) / 6 (L), ANet 12 (B) / 10 (L)
WEIGHT_DECAY = 0.02                # AdamW, none on biases and norms (official: 0.02)
BETAS = (0.9, 0.999)               # AdamW betas (official: 0.9, 0.999)
GRAD_CLIP = None                   # max gradient norm; None = not clipped, only logged (official)
MAX_BAD_STEPS = 5                  # a non-finite loss skips the step; this many in a row stop
# evaluation
K_TEST = 128                       # answer-list entries re-scored per question (official)
DOUBLE_FIRST_TOKEN = False         # True = the official score, which counts the first token's
                                   # log-probability twice
EVAL_BATCH = 32                    # questions per forward when testing
# system
DEVICE = 'auto'                    # 'auto' = the GPU when there is one; 'cpu' forces the CPU
DTYPE = 'auto'                     # 'auto' = bf16 on recent GPUs, fp16 + loss scaling on older
                                   # ones, fp32 on the CPU
COMPILE = True                     # torch.compile the video encoder (all tokens, static shapes)
SEED = 0                           # data order, augmentation, stochastic depth
LOG_INTERVAL = 20                  # steps between log lines (each costs a host sync)
CKPT_INTERVAL = 500                # steps between checkpoints; one is also written every epoch
OUT_DIR = 'out/msrvtt_qa_b16'      # last.pt, log.jsonl, test_predictions.json

def files(name):  # the official file names of one dataset
    return {'TRAIN_ANN': f'data/{name}_qa_train.json', 'VAL_ANN': f'data/{name}_qa_val.json',
            'TEST_ANN': f'data/{name}_qa_test.json',
            'ANSWER_LIST': f'data/{name}_qa_answer_list.json'}

L16 = {'INIT': 'out/stage2_l16/last.pt', 'DROP_PATH': 0.4}
PRESETS = {  # the official exp/finetuning/qa_{msrvtt,msvd,anet}/{b16,l16}_5m.py
    'msrvtt_b16': {},
    'msrvtt_l16': {**L16, 'OUT_DIR': 'out/msrvtt_qa_l16'},
    'msvd_b16': {**files('msvd'), 'EPOCHS': 15, 'OUT_DIR': 'out/msvd_qa_b16'},
    'msvd_l16': {**files('msvd'), **L16, 'LR': 6e-5, 'EPOCHS': 6, 'OUT_DIR': 'out/msvd_qa_l16'},
    'anet_b16': {**files('anet'), 'LR': 4e-5, 'EPOCHS': 12, 'OUT_DIR': 'out/anet_qa_b16'},
    'anet_l16': {**files('anet'), **L16, 'DROP_PATH': 0.3, 'LR': 4e-5, 'EPOCHS': 10,
                 'OUT_DIR': 'out/anet_qa_l16'},
    # CPU demo: questions about colour and direction of the synthetic clips, from the stage-2 demo
    'demo': {'TRAIN_ANN': 'demo_data/qa_train.json', 'VAL_ANN': '',
             'TEST_ANN': 'demo_data/qa_test.json', 'ANSWER_LIST': 'demo_data/qa_answer_list.json',
             'DATA_ROOT': 'demo_data', 'MAKE_DEMO': True, 'INIT': 'out/demo_stage2/last.pt',
             'NUM_FRAMES': 4, 'IMG_SIZE': 64, 'DROP_PATH': 0.0, 'TOTAL_BATCH': 16,
             'MICRO_BATCH': 16, 'LR': 1e-3, 'EPOCHS': 20, 'COMPILE': False, 'NUM_WORKERS': 1,
             'LOG_INTERVAL': 18, 'CKPT_INTERVAL': 100, 'OUT_DIR': 'out/demo_qa'},
}

config = configure(globals(), PRESETS, sys.argv[1:])

# Check the constants before anything heavy happens, so a typo costs seconds, not a queue slot.
# micro_batch: MICRO_BATCH, or less where a process's share of TOTAL_BATCH needs it
world_size, micro_batch, grad_accum = split_batch(TOTAL_BATCH, MICRO_BATCH)
need_positive(EPOCHS=EPOCHS, NUM_FRAMES=NUM_FRAMES, IMG_SIZE=IMG_SIZE, EVAL_BATCH=EVAL_BATCH,
              LOG_INTERVAL=LOG_INTERVAL, CKPT_INTERVAL=CKPT_INTERVAL, MAX_BAD_STEPS=MAX_BAD_STEPS)
if K_TEST < 1 or MAX_ANSWER_LEN < 3 or MAX_QUESTION_LEN < 3:
    fail(f'K_TEST={K_TEST} must be >= 1, MAX_ANSWER_LEN and MAX_QUESTION_LEN >= 3 (a start, a '
         'token, an end)')
resuming = os.path.exists(os.path.join(OUT_DIR, 'last.pt'))  # then INIT is not needed
init_file = INIT if resuming else training.resolve(INIT, 'INIT')
need_init(init_file, OUT_DIR, 'a stage-2 checkpoint of train_stage2.py or an official stage-2 .pth',
          'python train_stage2.py --preset=demo')
need_files({'TRAIN_ANN': TRAIN_ANN, 'VAL_ANN': VAL_ANN, 'TEST_ANN': TEST_ANN,
            'ANSWER_LIST': ANSWER_LIST}, "pass --NAME=PATH (--val_ann='' for none). To try the "
           'script: --preset=demo.', MAKE_DEMO)

# ----------------------------------------------------------------------------------------------
# Processes, precision and the OUT_DIR lock (train_stage1.py's, in one call)

rank, world_size, device, autocast, scaler, lock = training.start(DEVICE, DTYPE, OUT_DIR)
master, ckpt_path = rank == 0, os.path.join(OUT_DIR, 'last.pt')
min_lr = LR * MIN_LR_RATIO

# ----------------------------------------------------------------------------------------------
# Data: the annotation files, read before any model (a bad entry is skipped and counted)

if MAKE_DEMO and master and not os.path.exists(TRAIN_ANN):
    video_qa.make_demo_qa(DATA_ROOT)  # from the demo set's captions (train_stage2's demo)
if world_size > 1:
    torch.distributed.barrier()  # the others wait for rank 0's files
train_items, train_skipped = video_qa.read_qa(TRAIN_ANN, DATA_ROOT)
answers = video_qa.read_answer_list(ANSWER_LIST)
test_items = {split: video_qa.read_qa(path, DATA_ROOT) for split, path in
              (('val', VAL_ANN), ('test', TEST_ANN)) if path}  # (items, skipped)

# ----------------------------------------------------------------------------------------------
# Model: resume from OUT_DIR/last.pt, or the QA model from the stage-2 INIT
# (checkpoints.load_stage2, then video_qa.from_stage2); its text side tokenizes the questions

torch.manual_seed(SEED)  # the same new weights on every rank (DDP broadcasts rank 0's anyway)
ckpt = training.resume(OUT_DIR, world_size, device, 'text_config')  # last.pt, None for a new run
if ckpt is not None:
    raw_model, report = video_qa.load_qa(ckpt, ckpt_path)
else:  # the video position table is regenerated for NUM_FRAMES x IMG_SIZE
    umt, report = checkpoints.load_stage2(init_file, INIT, vocab=BERT_VOCAB, num_frames=NUM_FRAMES,
                                          img_size=IMG_SIZE, drop_path=DROP_PATH,
                                          checkpoint_blocks=CHECKPOINT_BLOCKS)
    raw_model, qa_report = video_qa.from_stage2(umt, INIT)
    report += qa_report
    del umt
raw_model.to(device)  # unwrapped: what is saved and evaluated
tokenizer = raw_model.tokenizer
answer_ids, answer_mask, answers_cut = video_qa.tokenize_answers(answers, tokenizer,
                                                                 MAX_ANSWER_LEN, ANSWER_LIST)
answer_ids, answer_mask = answer_ids.to(device), answer_mask.to(device)
kw = dict(text_len=MAX_QUESTION_LEN, answer_len=MAX_ANSWER_LEN, threads=DECODE_THREADS)
train_set = video_qa.VideoQuestions(train_items, NUM_FRAMES, IMG_SIZE, 'train', tokenizer,
                                    max_bad_fraction=MAX_BAD_FRACTION, **kw)
tests = {split: (video_qa.VideoQuestions(items, NUM_FRAMES, IMG_SIZE, 'eval', tokenizer, **kw),
                 skipped) for split, (items, skipped) in test_items.items()}
steps_per_epoch = epoch_steps(len(train_set), TOTAL_BATCH, TRAIN_ANN, 'usable questions')
total_steps, warmup_steps = EPOCHS * steps_per_epoch, WARMUP_EPOCHS * steps_per_epoch

# ----------------------------------------------------------------------------------------------
# Optimizer (AdamW, no decay on 1-D parameters, one lr for everything as the official), resume,
# compile, DDP

optimizer = training.adamw(raw_model, LR, WEIGHT_DECAY, BETAS)
# weights: above
step, resumed = training.restore(ckpt, optimizer, scaler, config, ckpt_path, steps_per_epoch)
report += [resumed] if resumed else []
ckpt = None  # its tensors would stay in memory for the whole run
# torch.compile of the video encoder (all tokens: static shapes) in place, then DDP around it all
model = training.wrap(raw_model, raw_model.vision_encoder, COMPILE, world_size, device)
if master:
    lowered = f' (MICRO_BATCH={MICRO_BATCH} lowered to split TOTAL_BATCH)' \
        if micro_batch < MICRO_BATCH else ''
    print('\n'.join(report + [
        f'{micro_batch} questions{lowered} x {world_size} processes x {grad_accum} accumulation '
        f'steps = {TOTAL_BATCH} per step | lr {LR:g} after {warmup_steps} warmup steps, floor '
        f'{min_lr:g} | {len(train_set)} questions, {len(train_skipped)} skipped: no video, '
        f'question or answer | answer list: {len(answers)} entries, {answers_cut} cut to '
        f'{MAX_ANSWER_LEN} tokens | {total_steps} steps']))
    training.write_log(OUT_DIR, {'config': config, 'world_size': world_size, 'start_step': step})

def evaluate_qa(split):
    """video_qa.evaluate_qa on one test set -> (results, predictions)."""
    dataset, skipped = tests[split]
    return video_qa.evaluate_qa(raw_model, dataset, answers, answer_ids, answer_mask, device,
                                autocast, K_TEST, DOUBLE_FIRST_TOKEN, EVAL_BATCH, NUM_WORKERS,
                                len(skipped), split)

# ----------------------------------------------------------------------------------------------
# Training loop

batches = training.train_batches(train_set, micro_batch, SEED, rank, world_size, NUM_WORKERS,
                                 step, steps_per_epoch, grad_accum)
bar = tqdm(total=total_steps, initial=step, disable=not master, desc='QA', dynamic_ncols=True)
last_ckpt_step, skipped, bad_in_a_row = step, 0, 0  # the last checkpoint, bad steps
t_log, step_log, data_wait = time.perf_counter(), step, 0.0  # since the last log line
while step < total_steps:
    lr = training.lr_at(step, total_steps, warmup_steps, LR, min_lr, clamp=True)  # official
    training.set_lr(optimizer, lr)
    step_loss = torch.zeros((), device=device)
    for micro in range(grad_accum):
        t0 = time.perf_counter()
        batch = next(batches)
        data_wait += time.perf_counter() - t0
        video = data.normalize(batch['video'].to(device, non_blocking=True))  # [b, 3, T, S, S]
        text = [batch[k].to(device) for k in ('ids', 'mask', 'answer_ids', 'answer_mask',
                                              'weights')]
        # stochastic depth, replayed on resume
        torch.manual_seed(training.seed_for(SEED, step, micro, rank))
        # DDP all-reduces the gradients in every backward; the micro-steps before the last only add
        # them up locally.
        with nullcontext() if micro == grad_accum - 1 or world_size == 1 else model.no_sync():
            with autocast:
                loss = model(video, *text)  # L = sum over answers of weight x summed NLL, / B
            scaler.scale(loss / grad_accum).backward()  # / grad_accum: summed gradients = mean's
        step_loss += loss.detach() / grad_accum

    # ---- the update of train_stage1.py in one call: unscale, clip, step unless not finite, loss
    # scale, zero_grad
    good, grad_norm = training.update(optimizer, scaler, raw_model, GRAD_CLIP, step_loss)
    step += 1
    bar.update()

    # ---- log this step (its loss averaged over the ranks: a host sync, so every LOG_INTERVAL)
    skipped, bad_in_a_row = skipped + (not good), 0 if good else bad_in_a_row + 1
    if step % LOG_INTERVAL == 0 or step == total_steps or bad_in_a_row == MAX_BAD_STEPS:
        loss_value = training.all_reduce_mean(step_loss).item()
        seconds, done = time.perf_counter() - t_log, step - step_log
        record = {'step': step, 'epoch': step / steps_per_epoch,
                  'loss': loss_value if good else None, 'lr': lr,
                  'grad_norm': grad_norm.item() if good else None,
                  'ms_per_step': 1000 * seconds / done, 'data_wait': data_wait / seconds,
                  'skipped_steps': skipped}
        if master:
            training.write_log(OUT_DIR, record)
            tqdm.write(f'step {step} | loss {loss_value:.4f} | lr {lr:.3g} | '
                       f'{record["ms_per_step"]:.0f} ms/step | data wait {record["data_wait"]:.0%}')
        t_log, step_log, data_wait = time.perf_counter(), step, 0.0
    if bad_in_a_row == MAX_BAD_STEPS:  # the loss diverged: stop, and name the checkpoint to resume
        last = f'{ckpt_path} (step {last_ckpt_step})' if last_ckpt_step else 'none written yet'
        fail(f'{MAX_BAD_STEPS} non-finite losses in a row '
             f'(steps {step + 1 - MAX_BAD_STEPS}-{step}): stopping. The last good checkpoint is '
             f'{last}: lower the learning rate, then launch again.')

    # ---- validation after every epoch; a checkpoint too
    if 'val' in tests and step % steps_per_epoch == 0:
        val = evaluate_qa('val')[0]
        if master:
            tqdm.write(f'epoch {step // steps_per_epoch}/{EPOCHS} | val accuracy '
                       f'{val["accuracy"]:.2f}')
            training.write_log(OUT_DIR, {'step': step, 'epoch': step // steps_per_epoch,
                                         'val': val})
    if good and (step % CKPT_INTERVAL == 0 or step % steps_per_epoch == 0 or step == total_steps):
        if master:
            training.save_checkpoint({'model': raw_model.state_dict(),
                                      'optimizer': optimizer.state_dict(),
                                      'scaler': scaler.state_dict(), 'step': step, 'config': config,
                                      'model_config': raw_model.vision_config,
                                      'text_config': raw_model.text_config}, ckpt_path)
        last_ckpt_step = step
bar.close()

# ----------------------------------------------------------------------------------------------
# Final test with the last weights (no model selection on the test set), and the answer-prior
# baselines

if 'test' in tests:
    test, predictions = evaluate_qa('test')
    prior = video_qa.prior_baselines(train_items, tests['test'][0].items)
    if master:
        types = ', '.join(f'{t} {a:.2f}' for t, a in test['by_type'].items())
        print(f'test: accuracy {test["accuracy"]:.2f} on {test["questions"]} questions ({types}; '
              f'{test["answer_in_list"]} with their answer in the list, '
              f'{test["unreadable_videos"]} unreadable videos, {test["skipped_entries"]} entries '
              f'skipped) | without the video: always {prior["majority_answer"]!r} '
              f'{prior["majority"]:.2f}, most frequent answer per question text '
              f'{prior["question_prior"]:.2f}')
        training.write_log(OUT_DIR, {'step': step, 'test': test, 'prior': prior})
        json.dump(predictions, open(os.path.join(OUT_DIR, 'test_predictions.json'), 'w'), indent=1)
        print(f'wrote {OUT_DIR}/test_predictions.json')
if master:
    print(f'done: {step} steps, {skipped} skipped; weights in {ckpt_path}, log in '
          f'{OUT_DIR}/log.jsonl')
if world_size > 1:
    torch.distributed.barrier()  # leave together: a rank that leaves first makes gloo abort
    torch.distributed.destroy_process_group()
