"""
The small pieces of training infrastructure that every script shares, and nothing else:
constant overrides, distributed set-up, precision, the learning-rate schedule, parameter groups,
atomic checkpoints and RNG state. train_stage1.py, train_stage2.py and finetune.py import it;
the training logic itself stays in each script, where it can be read top to bottom.
"""

import ast
import hashlib
import json
import math
import os
import random
import types
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------------------------
# Configuration: UPPER_CASE constants at the top of a script, changed by presets and --KEY=VALUE


def configure(constants, presets, argv):
    """Apply `--preset=NAME`, then `--KEY=VALUE` overrides, to a script's constants (its globals()).

    Values are read with ast.literal_eval (so `--mask_type=tube` and `--mask_ratio=0.9` both work),
    must have the type of the default (an int is accepted for a float), and an unknown key fails
    with the list of valid ones. Returns the resolved {name: value} dict, which goes into the log
    and into every checkpoint.
    """
    names = sorted(k for k, v in constants.items()
                   if k.isupper() and k != 'PRESETS' and not callable(v) and not isinstance(v, types.ModuleType))

    def parse(arg):
        if not (arg.startswith('--') and '=' in arg):
            raise SystemExit(f'arguments look like --KEY=VALUE, got {arg!r}')
        key, text = arg[2:].split('=', 1)
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word is a string
        return key.upper(), value

    def assign(key, value, source):
        if key not in names:
            raise SystemExit(f'unknown setting {key!r} ({source}); valid: {", ".join(names)}')
        default = constants[key]
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if default is not None and value is not None and type(value) is not type(default):
            raise SystemExit(f'{key} must be {type(default).__name__} like its default {default!r}, '
                             f'got {value!r} ({source})')
        constants[key] = value

    pairs = [parse(a) for a in argv]
    for key, value in pairs:  # the preset first, so single overrides win over it
        if key == 'PRESET':
            if value not in presets:
                raise SystemExit(f'unknown preset {value!r}; valid: {", ".join(presets)}')
            for k, v in presets[value].items():
                assign(k, v, f'preset {value}')
    for key, value in pairs:
        if key != 'PRESET':
            assign(key, value, 'command line')
    return {k: constants[k] for k in names}


# ----------------------------------------------------------------------------------------------
# Distributed set-up and precision


def setup_distributed(device_name='auto'):
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; plain `python script.py` runs one process.

    Returns (rank, world_size, device). NCCL on CUDA, gloo on CPU.
    """
    use_cuda = torch.cuda.is_available() and device_name != 'cpu'
    if 'RANK' in os.environ:
        dist.init_process_group('nccl' if use_cuda else 'gloo')
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get('LOCAL_RANK', 0))
    else:
        rank, world_size, local_rank = 0, 1, 0
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for whatever still runs in fp32
        torch.backends.cudnn.allow_tf32 = True
    device = torch.device(f'cuda:{local_rank}' if use_cuda else 'cpu')
    return rank, world_size, device


def precision(device, dtype='auto'):
    """One autocast context for the forward passes, and the GradScaler that fp16 needs.

    'auto' = bf16 on a CUDA device that supports it, fp16 (+ loss scaling) on older GPUs, fp32 on CPU.
    """
    if dtype == 'auto':
        dtype = 'float32' if device.type != 'cuda' else ('bfloat16' if torch.cuda.is_bf16_supported() else 'float16')
    if dtype not in ('float32', 'bfloat16', 'float16'):
        raise SystemExit(f"DTYPE must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    ctx = nullcontext() if dtype == 'float32' else torch.autocast(device.type, dtype=getattr(torch, dtype))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == 'float16')
    return ctx, scaler, dtype


def all_reduce_mean(t):
    """Average a tensor over ranks (a no-op without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


# ----------------------------------------------------------------------------------------------
# Optimizer: schedule and parameter groups


def lr_at(step, total_steps, warmup_steps, peak, floor, start=0.0):
    """Per-iteration schedule: linear warmup start -> peak, then half-cosine peak -> floor.

    A pure function of the step number, so a resumed run has nothing to restore or drift.
    """
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def param_groups(model, weight_decay, lr_scale=None):
    """AdamW groups: no weight decay on 1-D parameters (norms, q/v biases, ...) and biases.

    lr_scale(name) -> float gives a per-parameter learning-rate multiplier (layer-wise decay in
    fine-tuning); the scripts multiply each group's lr by its 'lr_scale' at every step.
    """
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0.0 if p.ndim <= 1 or name.endswith('.bias') else weight_decay
        scale = lr_scale(name) if lr_scale else 1.0
        groups.setdefault((wd, scale), {'params': [], 'weight_decay': wd, 'lr_scale': scale})['params'].append(p)
    return list(groups.values())


# ----------------------------------------------------------------------------------------------
# Checkpoints and RNG state


def save_checkpoint(obj, path):
    """Write atomically: a temporary file, flushed to disk, then renamed over the old checkpoint.

    A crash (or a full disk) half-way through leaves the previous checkpoint intact.
    """
    tmp = f'{path}.tmp'
    torch.save(obj, tmp)
    with open(tmp, 'rb') as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX


def load_checkpoint(path):
    """weights_only=True: a checkpoint can hold tensors and plain data, never code to execute."""
    return torch.load(path, map_location='cpu', weights_only=True)


def rng_state():
    """Every random generator a run draws from, in a form torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            'numpy': [torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            'python': random.getstate()}


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state(('MT19937', keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state['python']
    random.setstate((version, tuple(internal), gauss_next))


def seed_for(*keys):
    """A 63-bit seed from a few values (e.g. SEED, step, rank): different keys give unrelated streams.
    The scripts draw masks, stochastic depth and negatives from seeds that are functions of the step,
    so a resumed run replays them exactly without saving any generator state."""
    return int.from_bytes(hashlib.blake2b(repr(keys).encode(), digest_size=8).digest(), 'little') >> 1


def append_jsonl(path, record):
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')
