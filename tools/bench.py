"""
Speed, memory and FLOPs of one complete UMT training step, with random weights; and the data
loader's speed.

A stage-1 step is: teacher forward on the full clip -> semantic mask from its CLS attention ->
student forward on the kept tokens -> UTA loss -> backward -> AdamW step. tools.bench times each
phase, counts the model FLOPs analytically and reports the achieved FLOP/s against the hardware:
the bf16 peak of the GPU (MFU), or on CPU a dense fp32 matmul measured in the same run.

    python -m tools.bench                  # ViT-B/16 + CLIP-B/16, 8 x 224^2, batch 2, fp32 on CPU
    python -m tools.bench --preset=gpu     # batch 64, bf16, compiled student (one GPU)
    python -m tools.bench --frames=16 --mask_ratio=0.9   # any constant below can be overridden
    python -m tools.bench --preset=stage2  # one stage-2 step (VTC + VTM + MLM + UTA)
    # a Table 1 row (train_stage1 TARGET)
    python -m tools.bench --target=pixels --mask_type=tube --mask_ratio=0.9
    python -m tools.bench --table1=2,4     # Table 1's memory column, every row at 2 and 4 clips
    # loader clips/s per core, before / after tools.prepare_data
    python -m tools.bench --loader_dir=bench_clips

Weights are random (open_clip says so when it builds the teacher: intended, speed does not depend
on them).

Reading a training log's data_wait (the fraction of the time the steps waited for data): above
about 20%, the loader is behind. Raise NUM_WORKERS while cores are idle (workers x DECODE_THREADS
up to the cores per process) or, on a GPU, prepare the videos for fast sampling
(python -m tools.prepare_data; --loader_dir measures the gain per core). On a CPU the model shares
the cores with decoding: beyond idle cores there is nothing to do.
"""

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import data
import demo
import model as M
import training
from util import configurator
from masking import make_mask
from teacher import CLIPTeacher, build_clip
from tools.prepare_data import prepare
from video_language import build_umt, tokenize

# ----------------------------------------------------------------------------------------------
STAGE = 1                     # 1: video-only alignment step, 2: video-text step
MODEL = 'vit_b16'             # student preset (model.CONFIGS)
TEACHER = 'ViT-B-16-quickgelu'  # open_clip name ('tiny' for the test); weights are random here
TEACHER_SIZE = 0              # teacher resolution, 0 = the CLIP default (196 for ViT-L-14)
BATCH = 2                     # clips per step
FRAMES = 8                    # T (paper: 8 in stage 1, 4 in stage 2)
IMG_SIZE = 224                # H = W (paper: 224)
MASK_RATIO = 0.8              # paper: 0.8
MASK_TYPE = 'semantic'        # 'semantic' (paper), 'tube' or 'random': without a teacher for
                              # TARGET 'pixels'
TARGET = 'clip'               # train_stage1's TARGET (paper Table 1): 'clip', 'pixels',
                              # 'clip+pixels', 'clip+masked'
ALIGN_LAYERS = 6              # paper: 6
DTYPE = 'float32'             # 'auto' = bf16 on GPU; the CPU target is measured in fp32
COMPILE = False               # torch.compile student and teacher (static shapes: every frame keeps
                              # n_keep tokens)
CHECKPOINT_BLOCKS = 0         # activation checkpointing of the first N student blocks
WARMUP_STEPS = 2              # untimed steps (allocator, compile, oneDNN kernel selection)
STEPS = 5                     # timed steps; medians are reported
DEVICE = 'auto'               # 'auto' = the GPU when there is one; 'cpu' forces the CPU
LOADER_DIR = ''               # if set: benchmark the stage-1 data loader instead, on clips written
                              # to this folder
TABLE1 = ()                   # two batch sizes, e.g. --table1=2,4: every Table 1 row at both, one process
                              # each (memory)
PRESETS = {
    'cpu': {},
    'gpu': {'BATCH': 64, 'DTYPE': 'auto', 'COMPILE': True, 'STEPS': 10, 'WARMUP_STEPS': 3},
    'l16_gpu': {'MODEL': 'vit_l16', 'TEACHER': 'ViT-L-14-quickgelu', 'TEACHER_SIZE': 196,
                'BATCH': 32, 'DTYPE': 'auto', 'COMPILE': True, 'STEPS': 10, 'WARMUP_STEPS': 3},
    'tiny': {'MODEL': 'tiny', 'TEACHER': 'tiny', 'IMG_SIZE': 64, 'ALIGN_LAYERS': 2, 'STEPS': 2,
             'WARMUP_STEPS': 1},
    'stage2': {'STAGE': 2, 'FRAMES': 4},  # the paper's stage-2 video step: 4 frames, plus text
}
config = configurator.configure(globals(), PRESETS, sys.argv[1:])
if STAGE not in (1, 2):
    configurator.fail(f'STAGE={STAGE} must be 1 (video-only alignment) or 2 (video-text)')
if TARGET not in ('clip', 'pixels', 'clip+pixels', 'clip+masked') or \
        MASK_TYPE not in ('semantic', 'tube', 'random'):
    configurator.fail(f"TARGET={TARGET!r} must be 'clip', 'pixels', 'clip+pixels' or "
                      f"'clip+masked', MASK_TYPE={MASK_TYPE!r} 'semantic', 'tube' or 'random'")
configurator.need_positive(BATCH=BATCH, FRAMES=FRAMES, IMG_SIZE=IMG_SIZE, STEPS=STEPS)
if not 0 < MASK_RATIO < 1 or WARMUP_STEPS < 0:
    configurator.fail(f'MASK_RATIO={MASK_RATIO} must lie strictly between 0 and 1, '
                      f'WARMUP_STEPS={WARMUP_STEPS} >= 0')

# ----------------------------------------------------------------------------------------------
# The data loader (LOADER_DIR)

def bench_loader(out_dir, n=4, clips=96, keyints=(2, 4, 8)):
    """Loader throughput per core of the stage-1 pipeline (8 TSN frames, multi-scale crop to 224
    and flip, uint8, collate): one DataLoader worker with one decoder thread, before and after
    data.prepare, on n Kinetics-like clips: 10 s, 340 x 256, 25 fps, H.264 with x264's default GOP
    (one keyframe per clip) and B-frames; a panning texture with per-frame noise, so that it is not
    trivially compressible. Ends with how to read a training log's data_wait."""
    os.makedirs(out_dir, exist_ok=True)
    for k in range(n):
        rng = np.random.default_rng(k)
        blobs = np.kron(rng.integers(0, 255, (32, 56, 3)), np.ones((8, 8, 1)))  # 256 x 448 texture
        texture = np.clip(blobs + rng.normal(0, 20, blobs.shape), 0, 255).astype(np.int16)
        frames = (np.clip(np.roll(texture, 2 * t, axis=1)[:, :340]
                          + rng.integers(-16, 17, (256, 340, 3)), 0, 255).astype(np.uint8)
                  for t in range(250))
        data.write_video(f'{out_dir}/clip{k}.mp4', frames, options={'preset': 'veryfast'})
    with open(f'{out_dir}/list.csv', 'w') as f:
        f.writelines(f'clip{k % n}.mp4,0\n' for k in range(8 * n))
    size = lambda folder: sum(os.path.getsize(f'{folder}/clip{k}.mp4') for k in range(n))
    rows = [('original (x264 default GOP, B-frames)', f'{out_dir}/list.csv', out_dir)]
    for k in keyints:
        prepared, _ = prepare(f'{out_dir}/list.csv', out_dir, f'{out_dir}/keyint{k}', workers=1,
                              keyint=k)
        rows.append((f'prepared, keyframe every {k}', prepared, f'{out_dir}/keyint{k}'))
    print(f'{"":40s} {"clips/s per core":>17s} {"ms per clip":>12s} {"file size":>10s}')
    for name, file, root in rows:
        ds = data.VideoClassification(file, root, 8, 224, mode='train', aug='multiscale', flip=True)
        loader, _ = training.make_loader(ds, 8, True, 0, 0, 1, num_workers=1)
        batches, done = iter(loader), 0
        next(batches)  # the worker starts, the first batch is not timed
        t0 = time.perf_counter()
        for b in batches:
            done += len(b['index'])
            if done >= clips:
                break
        rate = done / (time.perf_counter() - t0)
        print(f'{name:40s} {rate:17.1f} {1000 / rate:12.1f} {size(root) / size(out_dir):9.2f}x')
    print('\n'.join([
        "\nReading a training log's data_wait (the fraction of the time the steps waited for",
        'data): above about 20%, the loader is behind. Raise NUM_WORKERS while cores are idle',
        '(workers per process: about its clips/s over the clips/s per core above) or, on a GPU,',
        'prepare the videos for fast sampling (python -m tools.prepare_data). On a CPU the model',
        'shares the cores with decoding: beyond idle cores there is nothing to do.']))

# ----------------------------------------------------------------------------------------------
# The paper's Table 1 memory column: every row at two batch sizes, each in a process of its own (a
# process's peak memory never goes down), then memory = fixed + per clip x batch, predicted at the
# paper's 64 clips per GPU

# (row, settings, the paper's memory in GB: Table 1, ViT-B/16, 32 A100, 8 x 224^2, batch 2048)
TABLE1_ROWS = [
    ('UMT: align with CLIP (semantic 0.8)', {'TARGET': 'clip'}, 16.0),
    ('pixels (VideoMAE: tube 0.9)', {'TARGET': 'pixels', 'MASK_TYPE': 'tube', 'MASK_RATIO': 0.9},
     44.0),
    ('pixels (semantic 0.8)', {'TARGET': 'pixels'}, None),
    ('CLIP + pixels', {'TARGET': 'clip+pixels'}, 52.5),
    ('CLIP + masked-token recovering', {'TARGET': 'clip+masked'}, 43.6),
]


def bench_table1(batches):
    """Runs this script once per row and batch size; prints the memory table with the paper's
    ratios."""
    if len(batches) != 2 or len(set(batches)) != 2 or \
            not all(isinstance(b, int) and b > 0 for b in batches):
        configurator.fail(f'TABLE1={batches!r}: give two different batch sizes, e.g. --table1=2,4')
    b1, b2 = batches
    overrides = [a for a in sys.argv[1:]
                 if not a.lower().startswith(('--table1', '--target', '--mask_'))]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    for name, settings, paper in TABLE1_ROWS:
        res = []
        for b in (b1, b2):
            command = [sys.executable, '-m', 'tools.bench', *overrides, f'--batch={b}', '--steps=2',
                       '--warmup_steps=1', *[f'--{k.lower()}={v!r}' for k, v in settings.items()]]
            out = subprocess.run(command, capture_output=True, text=True, cwd=root)
            if out.returncode:
                configurator.fail(f'`{" ".join(command[1:])}` failed:\n{out.stderr[-500:]}')
            res.append(json.loads(out.stdout.split('RESULT ')[-1]))
            print(f'{name}, batch {b}: {res[-1]["step_ms"]:.0f} ms, '
                  f'{res[-1]["memory_gib"]:.2f} GiB', flush=True)
        per_clip = (res[1]['memory_gib'] - res[0]['memory_gib']) / (b2 - b1)  # the RSS slope
        rows.append((name, res[1]['step_ms'] / b2, per_clip, res[0]['memory_gib'] - b1 * per_clip,
                     res[1]['saved_gib_per_clip'], res[1]['state_gib'], paper))
    # At 64 clips what grows with the batch (kept for the backward) dominates, beside the weights,
    # their gradients and AdamW's moments: predicted = state + 64 x kept per clip.
    predicted = [state + 64 * kept for *_, kept, state, _ in rows]
    print('\n| row | ms per clip | RSS: per clip, fixed (GiB) | kept for the backward per clip | '
          'weights + AdamW | predicted at 64 clips | / UMT | paper GB | paper / UMT |\n'
          '|---|---|---|---|---|---|---|---|---|')
    for (name, ms, per_clip, fixed, kept, state, paper), p in zip(rows, predicted):
        print(f'| {name} | {ms:.0f} | {per_clip:.3f}, {fixed:.2f} | {kept:.3f} GiB | {state:.2f} GiB '
              f'| {p:.1f} GiB | {p / predicted[0]:.2f}x | {paper or "-"} | '
              f'{f"{paper / rows[0][-1]:.2f}x" if paper else "-"} |')

if LOADER_DIR:
    bench_loader(LOADER_DIR)
    sys.exit()
if TABLE1:
    bench_table1(TABLE1)
    sys.exit()

# ----------------------------------------------------------------------------------------------
# Models and a random batch

_, _, device = training.init_distributed(DEVICE)
dtype = training.pick_dtype(device, DTYPE)
ctx = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
torch.manual_seed(0)
use_teacher = TARGET != 'pixels' or MASK_TYPE == 'semantic'  # VideoMAE's row masks without one
align = 0 if TARGET == 'pixels' else ALIGN_LAYERS
cfg = M.get_config(MODEL, num_frames=FRAMES, img_size=IMG_SIZE, align_layers=align,
                   checkpoint_blocks=CHECKPOINT_BLOCKS)
student = M.VideoViT(cfg)
# random weights: speed does not depend on them
clip_model = demo.tiny_clip() if TEACHER == 'tiny' else build_clip(TEACHER, None)
teacher = None
if use_teacher:
    teacher = CLIPTeacher(clip_model, ALIGN_LAYERS, TEACHER_SIZE or None).to(device)
t, h, w = FRAMES // cfg.tubelet_size, IMG_SIZE // cfg.patch_size, IMG_SIZE // cfg.patch_size
N = t * h * w
decoder = None  # Table 1's rows other than UMT's
if TARGET != 'clip':
    out_dim = 3 * cfg.tubelet_size * cfg.patch_size ** 2 if 'pixels' in TARGET else cfg.teacher_dim
    decoder = M.Decoder(cfg.embed_dim, out_dim, N, *M.DECODERS[MODEL]).to(device).train()
model = (student if STAGE == 1 else build_umt(student, clip_model)).to(device).train()
if COMPILE:  # in place, so the stage-2 model's vision encoder is compiled too
    student.compile()
    if decoder is not None:
        decoder.compile()
encode = (torch.compile(teacher.encode) if COMPILE else teacher.encode) if teacher else None
trained = model if decoder is None else torch.nn.ModuleList([model, decoder])
optimizer = training.adamw(trained, 1e-4, 0.05, (0.9, 0.999))
video = torch.randn(BATCH, 3, FRAMES, IMG_SIZE, IMG_SIZE, device=device)
captions = [f'a person is doing something unusual in clip number {i}' for i in range(BATCH)]
# [B, 32] each, 12 real tokens
input_ids, attention_mask = (x.to(device) for x in tokenize(captions))
ids = torch.arange(BATCH, device=device)                    # sample ids for VTC / VTM
gen = torch.Generator(device).manual_seed(0)


def sync():
    if device.type == 'cuda':
        torch.cuda.synchronize()


saved, weights = {}, {p.untyped_storage().data_ptr() for p in trained.parameters()}

def keep_for_backward(x):
    """Counts what autograd keeps for the backward (the activations; weights aside): the memory
    that grows with the batch, and on a GPU most of it. One storage counts once."""
    ptr = x.untyped_storage().data_ptr()
    if ptr not in weights:
        saved[ptr] = x.untyped_storage().nbytes()
    return x

def step():
    """One training step, cut into timed phases (the syncs cost a little; 'total' below is without
    them)."""
    times = {}
    t0 = time.perf_counter()
    with ctx:
        hidden, attn = encode(video) if teacher else \
            (None, torch.ones(BATCH, FRAMES, h * w, device=device))
        keep = make_mask(MASK_TYPE, attn, MASK_RATIO, gen)        # [B, T*n_keep]
        targets = teacher.targets(hidden, keep) if align else None  # [K, B, N_vis, C]
        if decoder is not None:
            masked = M.masked_tokens(keep, N)
            hidden_targets = M.pixel_targets(video, masked, cfg.tubelet_size, cfg.patch_size) \
                if 'pixels' in TARGET else teacher.targets(hidden[-1:], masked)[0]
    sync(); times['teacher'] = time.perf_counter() - t0; t0 = time.perf_counter()
    saved.clear()
    with ctx, torch.autograd.graph.saved_tensors_hooks(keep_for_backward, lambda x: x):
        if STAGE == 1:
            x, aligned = model(video, keep)
            loss = M.uta_loss(aligned, targets) if align else 0.0  # L_uta
            if decoder is not None:
                pred = decoder(x, keep)
                loss = loss + (F.mse_loss(pred.float(), hidden_targets) if 'pixels' in TARGET else
                               M.uta_loss(F.normalize(pred.float(), dim=-1)[None],
                                          hidden_targets[None]))
        else:                                                     # L_vtc + L_vtm + L_mlm + L_uta
            loss = model(video, keep, targets, input_ids, attention_mask, ids).sum()
    sync(); times['student_fwd'] = time.perf_counter() - t0; t0 = time.perf_counter()
    scaler.scale(loss).backward()
    sync(); times['backward'] = time.perf_counter() - t0; t0 = time.perf_counter()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    sync(); times['optimizer'] = time.perf_counter() - t0
    return times

# ----------------------------------------------------------------------------------------------
# Analytic FLOPs per clip (a multiply-add = 2 FLOPs; norms, activations and softmax are ignored)
#   transformer layer on n tokens of width d, MLP ratio 4:
#              2*n*12*d^2 (qkv, out, fc1, fc2) + 4*n^2*d (QK^T, AV)
#   teacher  = T frames x (patch embed 2*hw*3p^2*E + L_t layers on 1+hw tokens)
#              + K proj 2*N_vis*E*C   (forward only)
#   student  = 3 x (patch embed 2*N_vis*3p^2*D + depth layers on N_vis tokens
#              + K heads 2*N_vis*D*C)   (fwd + 2x bwd; only the kept tubelets are embedded)
#   decoder  = 3 x (2*N_vis*D*w in + its layers on all N tokens of width w + 2*N_mask*w*out)
#              (Table 1's other rows)
#   stage 2 adds 3 x text: 2 passes (caption, MLM-corrupted caption) through the text-only layers,
#              4 passes (3 VTM pairs, MLM) through the fusion layers (+ cross-attention
#              4*L*Dt^2 + 4*N_vis*D*Dt + 4*L*N_vis*Dt), and the MLM decoder 2*Dt*49408 per
#              masked token (half the real tokens)


def layer_flops(n, d, mlp_ratio=4.0):
    return 2 * n * (4 + 2 * mlp_ratio) * d * d + 4 * n * n * d


n_vis = t * (h * w - int(h * w * MASK_RATIO))
teacher_flops = 0
if teacher:
    v = teacher.visual
    hw = (teacher.image_size // teacher.patch) ** 2
    E, Lt, C = v.conv1.out_channels, len(v.transformer.resblocks), v.proj.shape[1]
    teacher_flops = FRAMES * (2 * hw * 3 * teacher.patch ** 2 * E + Lt * layer_flops(1 + hw, E)) \
        + ALIGN_LAYERS * 2 * n_vis * E * C
student_flops = 3 * (2 * n_vis * 3 * cfg.tubelet_size * cfg.patch_size ** 2 * cfg.embed_dim
                     + cfg.depth * layer_flops(n_vis, cfg.embed_dim, cfg.mlp_ratio)
                     + align * 2 * n_vis * cfg.embed_dim * cfg.teacher_dim)
decoder_flops = 0
if decoder is not None:
    width, _, depth = M.DECODERS[MODEL]
    decoder_flops = 3 * (2 * n_vis * cfg.embed_dim * width + depth * layer_flops(N, width)
                         + 2 * (N - n_vis) * width * out_dim)
text_flops = 0
if STAGE == 2:
    te = model.text_encoder
    L, Dt, Lf, D = input_ids.shape[1], te.ln_final.normalized_shape[0], te.fusion_layer, \
        cfg.embed_dim
    cross = 4 * L * Dt * Dt + 4 * n_vis * D * Dt + 4 * L * n_vis * Dt
    n_masked = 0.5 * (int(attention_mask[0].sum()) - 1)
    text_flops = 3 * (2 * Lf * layer_flops(L, Dt)
                      + 4 * (len(te.blocks) - Lf) * (layer_flops(L, Dt) + cross)
                      + n_masked * 2 * Dt * (Dt + te.token_embedding.num_embeddings))
flops_per_clip = teacher_flops + student_flops + decoder_flops + text_flops


def matmul_rate(n=2048, reps=10):
    """Dense fp32 matmul FLOP/s on this device right now: the CPU's practical ceiling."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    sync(); t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)

# ----------------------------------------------------------------------------------------------
# Run

hardware = torch.cuda.get_device_name() if device.type == 'cuda' else \
    f'{torch.get_num_threads()} threads'
print(f'device {device} ({hardware}), '
      f'dtype {str(dtype)[6:]}, compile {COMPILE}, batch {BATCH} x {FRAMES} x {IMG_SIZE}^2, '
      f'{MASK_TYPE} mask {MASK_RATIO} ({n_vis}/{N} tokens kept), stage {STAGE}, target {TARGET}, '
      f'student {MODEL}, teacher {TEACHER if teacher else "none"}')
for _ in range(WARMUP_STEPS):
    step()
if device.type == 'cuda':
    torch.cuda.reset_peak_memory_stats()
phases, totals = [], []
for _ in range(STEPS):
    phases.append(step())
    sync(); t0 = time.perf_counter()
    step()                          # the same step again, timed whole (no phase syncs inside)
    sync(); totals.append(time.perf_counter() - t0)
median = lambda xs: sorted(xs)[len(xs) // 2]
step_s = median(totals)
achieved = flops_per_clip * BATCH / step_s
if device.type == 'cuda':
    peak_mem = torch.cuda.max_memory_allocated() / 2 ** 30
    name = torch.cuda.get_device_name()
    # dense bf16
    peak = 989e12 if 'H100' in name or 'H200' in name else \
        (312e12 if 'A100' in name else float('nan'))
    ceiling = f'MFU {achieved / peak:.1%} of the {peak / 1e12:.0f} TFLOP/s dense bf16 peak'
else:
    # KiB -> GiB, whole process
    peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    rate = matmul_rate()
    ceiling = f'{achieved / rate:.1%} of the dense fp32 matmul rate measured now ' \
        f'({rate / 1e9:.1f} GFLOP/s)'
print(f'step {step_s * 1e3:.0f} ms (median of {STEPS}) | {BATCH / step_s:.2f} clips/s | peak '
      f'memory {peak_mem:.2f} GiB')
print('phases (ms, median): '
      + ', '.join(f'{k} {median([p[k] for p in phases]) * 1e3:.0f}' for k in phases[0]))
print(f'FLOPs per clip: teacher {teacher_flops / 1e9:.1f} G + student {student_flops / 1e9:.1f} G '
      '(fwd+bwd) '
      + (f'+ decoder {decoder_flops / 1e9:.1f} G (fwd+bwd) ' if decoder is not None else '')
      + (f'+ text {text_flops / 1e9:.1f} G (fwd+bwd) ' if STAGE == 2 else '')
      + f'= {flops_per_clip / 1e9:.1f} G')
print(f'achieved {achieved / 1e9:.1f} GFLOP/s = {ceiling}')
activations = sum(saved.values()) / 2 ** 30
state = sum(p.numel() for p in trained.parameters()) * 16 / 2 ** 30  # fp32 weight, grad, 2 moments
print(f'kept for the backward: {activations / BATCH:.3f} GiB per clip | weights, gradients and AdamW '
      f'state {state:.2f} GiB')
print('RESULT ' + json.dumps({'step_ms': step_s * 1e3, 'memory_gib': peak_mem, 'state_gib': state,
                              'saved_gib_per_clip': activations / BATCH,
                              'gflops_per_clip': flops_per_clip / 1e9}))
