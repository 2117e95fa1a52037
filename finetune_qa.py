"""
Open-ended video question answering: fine-tuning the stage-2 model on MSRVTT-QA, MSVD-QA or ActivityNet-QA with the
official recipe (multi_modality/tasks/vqa.py, multi_modality/models/umt_qa.py, exp/finetuning/qa_*; paper section 4).

The stage-2 text encoder becomes the question encoder (its fusion blocks read all video tokens: no mask, no
teacher); a causal copy of its fusion blocks, cross-attending to the question, generates the answer (video_qa.py).
Loss: each answer's summed token NLL, weighted, averaged over questions. Test: the answer-list entry ranked best by
rank_answer (the 128 best first tokens, re-scored by the whole answer's likelihood), exact match with the
annotation. The defaults are the official UMT-B/16 recipe for MSRVTT-QA after 5M pre-training: 12 frames, 8 GPUs x
32 questions, lr 2e-5, 8 epochs.

    torchrun --standalone --nproc_per_node=8 finetune_qa.py --init=out/stage2/last.pt --data_root=/data/msrvtt
    torchrun --standalone --nproc_per_node=8 finetune_qa.py --preset=msvd_b16 --data_root=/data/msvd
    python finetune_qa.py --preset=anet_b16 --micro_batch=8 --data_root=/data/anet     # 1 GPU, accumulation
    python train_stage1.py --preset=demo && python train_stage2.py --preset=demo && \
        python finetune_qa.py --preset=demo                                            # CPU, 5-10 minutes

After a crash, the same command resumes from OUT_DIR/last.pt (and a finished run tests again).
"""

import json
import os
import sys

import torch

import checkpoints
import data
import evaluate
import training
import video_qa

# ----------------------------------------------------------------------------------------------
# Configuration: the official MSRVTT-QA fine-tuning of UMT-B/16 (5M); --preset=NAME, --name=value

# data: the official JSON files (video_qa.read_qa); answers are matched exactly, never cleaned
TRAIN_ANN = 'data/msrvtt_qa_train.json'  # [{"video", "question", "answer": str or [str]}]
VAL_ANN = 'data/msrvtt_qa_val.json'      # + "question_id"; accuracy after every epoch ('' = none)
TEST_ANN = 'data/msrvtt_qa_test.json'    # + "question_id"; accuracy at the end, predictions to OUT_DIR
ANSWER_LIST = 'data/msrvtt_qa_answer_list.json'  # the closed vocabulary the test answers are drawn from
DATA_ROOT = ''                     # folder the videos' relative paths start from
MAKE_DEMO = False                  # write the demo QA files (video_qa.make_demo_qa) if TRAIN_ANN is missing (demo)
NUM_FRAMES = 12                    # T: the official 'rand' frames for training, middle ones for testing (official: 12)
IMG_SIZE = 224                     # random-resized crop (0.5-1) + flip for training, whole frame for testing (224)
MAX_QUESTION_LEN = 25              # question tokens with [sot] and [eot] (official max_q_len: 25)
MAX_ANSWER_LEN = 5                 # answer tokens with [sot] and [eot] (official max_a_len: 5)
NUM_WORKERS = 6                    # decoding processes per GPU
DECODE_THREADS = 1                 # PyAV threads per worker
MAX_BAD_FRACTION = 0.05            # stop when more than this fraction of the training videos cannot be decoded
# model
INIT = 'out/stage2/last.pt'        # a train_stage2.py checkpoint (the official starts from its stage-2 .pth)
DROP_PATH = 0.2                    # stochastic depth of the last video block (official: 0.2 B, 0.4 L, 0.3 ANet L)
CHECKPOINT_BLOCKS = 0              # activation checkpointing of the first N video blocks: less memory, more compute
# optimization
TOTAL_BATCH = 256                  # questions per optimizer step over all GPUs (official: 8 GPUs x 32)
MICRO_BATCH = 32                   # questions per GPU per forward; accumulation makes up the rest (official: 32)
LR = 2e-5                          # peak lr, not scaled with the batch (official: see the presets)
MIN_LR_RATIO = 0.01                # warmup starts at, and the cosine ends at, LR x this (official: 0.01)
WARMUP_EPOCHS = 1                  # linear warmup, per iteration (official: 1)
EPOCHS = 8                         # official: MSRVTT 8, MSVD 15 (B) / 6 (L), ANet 12 (B) / 10 (L)
WEIGHT_DECAY = 0.02                # AdamW, none on biases and norms (official: 0.02)
BETAS = (0.9, 0.999)               # AdamW betas (official: 0.9, 0.999)
GRAD_CLIP = None                   # max gradient norm; None = no clipping, the norm is only logged (official: None)
MAX_BAD_STEPS = 5                  # a non-finite loss skips the step; this many in a row stop the run
# evaluation
K_TEST = 128                       # answer-list entries re-scored per question after the first-token cut (official)
DOUBLE_FIRST_TOKEN = False         # True = the official score, which counts the first token's log-prob twice
EVAL_BATCH = 32                    # questions per forward when testing
# system
DEVICE = 'auto'                    # 'auto' = the GPU when there is one; 'cpu' forces the CPU
DTYPE = 'auto'                     # 'auto' = bf16 on recent GPUs, fp16 + loss scaling on older ones, fp32 on CPU
COMPILE = True                     # torch.compile the video encoder (all tokens, static shapes)
SEED = 0                           # data order, augmentation, stochastic depth
LOG_INTERVAL = 20                  # steps between log lines (each costs a host sync)
CKPT_INTERVAL = 500                # steps between checkpoints; one is also written after every epoch
OUT_DIR = 'out/msrvtt_qa_b16'      # last.pt, log.jsonl, test_predictions.json

def files(name):  # the official file names of one dataset
    return {'TRAIN_ANN': f'data/{name}_qa_train.json', 'VAL_ANN': f'data/{name}_qa_val.json',
            'TEST_ANN': f'data/{name}_qa_test.json', 'ANSWER_LIST': f'data/{name}_qa_answer_list.json'}

L16 = {'INIT': 'out/stage2_l16/last.pt', 'DROP_PATH': 0.4}
PRESETS = {  # the official exp/finetuning/qa_{msrvtt,msvd,anet}/{b16,l16}_5m.py; other corpora differ in lr / epochs
    'msrvtt_b16': {},
    'msrvtt_l16': {**L16, 'OUT_DIR': 'out/msrvtt_qa_l16'},
    'msvd_b16': {**files('msvd'), 'EPOCHS': 15, 'OUT_DIR': 'out/msvd_qa_b16'},
    'msvd_l16': {**files('msvd'), **L16, 'LR': 6e-5, 'EPOCHS': 6, 'OUT_DIR': 'out/msvd_qa_l16'},
    'anet_b16': {**files('anet'), 'LR': 4e-5, 'EPOCHS': 12, 'OUT_DIR': 'out/anet_qa_b16'},
    'anet_l16': {**files('anet'), **L16, 'DROP_PATH': 0.3, 'LR': 4e-5, 'EPOCHS': 10, 'OUT_DIR': 'out/anet_qa_l16'},
    # CPU demo: questions about colour, shape and direction of the synthetic clips, from the stage-2 demo model
    'demo': {'TRAIN_ANN': 'demo_data/qa_train.json', 'VAL_ANN': '', 'TEST_ANN': 'demo_data/qa_test.json',
             'ANSWER_LIST': 'demo_data/qa_answer_list.json', 'DATA_ROOT': 'demo_data', 'MAKE_DEMO': True,
             'INIT': 'out/demo_stage2/last.pt', 'NUM_FRAMES': 4, 'IMG_SIZE': 64, 'DROP_PATH': 0.0,
             'TOTAL_BATCH': 16, 'MICRO_BATCH': 16, 'LR': 1e-3, 'EPOCHS': 20, 'COMPILE': False, 'NUM_WORKERS': 1,
             'LOG_INTERVAL': 18, 'CKPT_INTERVAL': 100, 'OUT_DIR': 'out/demo_qa'},
}

config = training.configure(globals(), PRESETS, sys.argv[1:])
fail = training.fail

# Check the constants before anything heavy happens, so a typo costs seconds, not a queue slot.
world_size, grad_accum = training.split_batch(TOTAL_BATCH, MICRO_BATCH)  # grad_accum: micro-steps per step
if K_TEST < 1 or MAX_ANSWER_LEN < 3 or MAX_QUESTION_LEN < 3:
    fail(f'K_TEST={K_TEST} must be >= 1, MAX_ANSWER_LEN and MAX_QUESTION_LEN >= 3 ([sot], a token, [eot])')
training.need_init(INIT, OUT_DIR, 'a stage-2 checkpoint of train_stage2.py', 'python train_stage2.py --preset=demo')
training.need_files({'TRAIN_ANN': TRAIN_ANN, 'VAL_ANN': VAL_ANN, 'TEST_ANN': TEST_ANN, 'ANSWER_LIST': ANSWER_LIST},
                    "pass --NAME=PATH (--val_ann='' for none). To try the script: --preset=demo.", MAKE_DEMO)

# ----------------------------------------------------------------------------------------------
# Processes (torchrun's environment: one per GPU, or gloo processes on CPU), precision, OUT_DIR

run = training.Run(config, OUT_DIR, DEVICE, DTYPE, GRAD_CLIP, MAX_BAD_STEPS, LOG_INTERVAL, CKPT_INTERVAL)
rank, device, autocast = run.rank, run.device, run.autocast
min_lr = LR * MIN_LR_RATIO

# ----------------------------------------------------------------------------------------------
# Data: training questions (a bad entry is skipped and counted), the test sets and the answer list

if MAKE_DEMO and run.master and not os.path.exists(TRAIN_ANN):
    video_qa.make_demo_qa(DATA_ROOT)  # from the demo set's captions (train_stage2.py --preset=demo wrote them)
run.barrier()
train_items, train_skipped = video_qa.read_qa(TRAIN_ANN, DATA_ROOT)
try:
    answers, answer_ids, answer_mask, answers_cut = video_qa.read_answer_list(ANSWER_LIST, MAX_ANSWER_LEN)
except ValueError as e:  # an answer-list entry that gives no token
    fail(str(e))
answer_ids, answer_mask = answer_ids.to(device), answer_mask.to(device)
kw = dict(text_len=MAX_QUESTION_LEN, answer_len=MAX_ANSWER_LEN, threads=DECODE_THREADS)
train_set = video_qa.VideoQuestions(train_items, NUM_FRAMES, IMG_SIZE, 'train', max_bad_fraction=MAX_BAD_FRACTION, **kw)
tests = {}
for split, path in (('val', VAL_ANN), ('test', TEST_ANN)):
    if path:
        items, skipped = video_qa.read_qa(path, DATA_ROOT)
        tests[split] = video_qa.VideoQuestions(items, NUM_FRAMES, IMG_SIZE, 'eval', **kw), skipped
steps_per_epoch = training.epoch_steps(len(train_set), TOTAL_BATCH, TRAIN_ANN, 'usable questions')
total_steps, warmup_steps = EPOCHS * steps_per_epoch, WARMUP_EPOCHS * steps_per_epoch

# ----------------------------------------------------------------------------------------------
# Model: resume from OUT_DIR/last.pt, or the QA model from the stage-2 INIT (checkpoints.load, then a report)

torch.manual_seed(SEED)  # the same new weights on every rank (DDP broadcasts rank 0's anyway)
ckpt = run.resume()  # OUT_DIR/last.pt, or None
try:
    if ckpt is not None:
        raw_model, report = video_qa.load_qa(ckpt), [f'QA model from {run.ckpt_path}']
    else:  # the video position table is regenerated for NUM_FRAMES x IMG_SIZE
        umt, report = checkpoints.load(INIT, 'umt', num_frames=NUM_FRAMES, img_size=IMG_SIZE, drop_path=DROP_PATH,
                                       checkpoint_blocks=CHECKPOINT_BLOCKS)
        raw_model, qa_report = video_qa.from_stage2(umt, INIT)
        report += qa_report
        del umt
except ValueError as e:  # a checkpoint that does not fit
    fail(str(e))
raw_model.to(device)  # unwrapped and uncompiled: what is saved and evaluated

# ----------------------------------------------------------------------------------------------
# Optimizer (AdamW, no decay on 1-D parameters, one lr for everything as the official), compile, DDP

optimizer = training.adamw(raw_model, LR, WEIGHT_DECAY, BETAS)
if COMPILE:  # in place: the state_dict keys stay the same
    raw_model.vision_encoder.compile(dynamic=False)
report.append(f'{MICRO_BATCH} questions x {world_size} processes x {grad_accum} accumulation steps = {TOTAL_BATCH} per '
              f'step | lr {LR:g} after {warmup_steps} warmup steps, floor {min_lr:g} | {len(train_set)} questions, '
              f'{len(train_skipped)} skipped: no video, question or answer | answer list: {len(answers)} entries, '
              f'{answers_cut} cut to {MAX_ANSWER_LEN} tokens')
model = run.start(raw_model, optimizer, ckpt, total_steps, steps_per_epoch, report, ckpt_every_epoch=True, desc='QA')

# ----------------------------------------------------------------------------------------------
# Evaluation: rank_answer over the answer list, exact match

def evaluate_qa(split):
    """Exact-match accuracy (%) on one test set, every rank scoring its share. A question whose video cannot be read
    counts as wrong (the official metric counts a missing prediction as wrong); entries without a video, question
    or answer were skipped and are only counted. -> (results, predictions)."""
    dataset, skipped = tests[split]
    raw_model.eval()

    def answer(video, b):
        with torch.no_grad(), autocast:
            pred = raw_model.answer(video, b['ids'].to(device), b['mask'].to(device), answer_ids, answer_mask, K_TEST,
                                    DOUBLE_FIRST_TOKEN)
        return pred, b['bad'].long().to(device)
    (pred, bad), index = evaluate.run_videos(dataset, answer, device, EVAL_BATCH, NUM_WORKERS, split)
    pred, bad = (evaluate.gather_rows(x, index.to(device), len(dataset)).tolist() for x in (pred, bad))
    raw_model.train()
    correct = [not b and answers[p] in it.answers for p, b, it in zip(pred, bad, dataset.items)]
    known = sum(any(a in answers for a in it.answers) for it in dataset.items)
    result = {'accuracy': 100 * sum(correct) / len(dataset), 'questions': len(dataset),
              'skipped_entries': len(skipped), 'unreadable_videos': sum(bad), 'answer_in_list': known}
    return result, [{'question_id': it.qid, 'pred': answers[p], 'answer': it.answers[0]}
                    for p, it in zip(pred, dataset.items)]

# ----------------------------------------------------------------------------------------------
# Training loop

batches = run.batches(train_set, MICRO_BATCH, grad_accum, SEED, NUM_WORKERS)
while run.step < total_steps:
    run.set_lr(training.lr_at(run.step, total_steps, warmup_steps, LR, min_lr, start=min_lr))
    step_loss = torch.zeros((), device=device)
    for micro, batch in run.micro_batches(batches, grad_accum):
        video = data.normalize(batch['video'].to(device, non_blocking=True))      # [b, 3, T, S, S] float
        text = [batch[k].to(device) for k in ('ids', 'mask', 'answer_ids', 'answer_mask', 'weights')]
        torch.manual_seed(training.seed_for(SEED, run.step, micro, rank))        # stochastic depth, replayed on resume
        # Gradients of the micro-steps add up; DDP averages them over ranks only on the last one.
        with training.no_sync(model, micro < grad_accum - 1):
            with autocast:
                loss = model(video, *text)  # L = sum over answers of weight x summed token NLL, / questions
            run.scaler.scale(loss / grad_accum).backward()  # / grad_accum: the mean over the whole step
        step_loss += loss.detach() / grad_accum

    # ---- update (or skip a non-finite step), log; validation after every epoch; checkpoint
    due = run.update({'loss': step_loss}, raw_model)
    if 'val' in tests and run.step % steps_per_epoch == 0:
        val = evaluate_qa('val')[0]
        if run.master:
            print(f'epoch {run.step // steps_per_epoch}/{EPOCHS} | val accuracy {val["accuracy"]:.2f}')
            run.write({'step': run.step, 'epoch': run.step // steps_per_epoch, 'val': val})
    if due:
        run.save(raw_model, model_config=raw_model.vision_config, text_config=raw_model.text_config)

# ----------------------------------------------------------------------------------------------
# Final test with the last weights (no model selection on the test set), and the answer-prior baselines

if 'test' in tests:
    test, predictions = evaluate_qa('test')
    prior = video_qa.prior_baselines(train_items, tests['test'][0].items)
    if run.master:
        print(f'test: accuracy {test["accuracy"]:.2f} on {test["questions"]} questions ({test["answer_in_list"]} '
              f'with their answer in the list, {test["unreadable_videos"]} unreadable videos, '
              f'{test["skipped_entries"]} entries skipped) | without the video: always '
              f'{prior["majority_answer"]!r} {prior["majority"]:.2f}, most frequent answer per question text '
              f'{prior["question_prior"]:.2f}')
        run.write({'step': run.step, 'test': test, 'prior': prior})
        json.dump(predictions, open(os.path.join(OUT_DIR, 'test_predictions.json'), 'w'), indent=1)
run.close()
