"""
The mechanics every training script shares, as plain functions: processes and precision, the lr
schedule and AdamW groups, the data order, and OUT_DIR (its lock, resume, the atomic checkpoint,
the log file). Settings, --help, bad input and the start-up checks are in util/configurator.py.

The method and the optimization step stay in the scripts: train_stage1.py and train_stage2.py write
out the process group, DistributedDataParallel, torch.compile, autocast, the GradScaler, backward,
the update, the non-finite skip and the logging. Nothing here owns the loop or the run's state.
"""

import fcntl
import hashlib
import json
import math
import os
import socket
import time

import numpy as np
import torch
import torch.distributed as dist

from util.configurator import BadInput, fail

CORES = len(os.sched_getaffinity(0))  # cores this process may use: no default asks for more workers

# ----------------------------------------------------------------------------------------------
# Processes, devices and precision

def init_distributed(device_name='auto'):
    """-> (rank, world_size, device). Under torchrun (RANK in the environment) this joins the
    process group: NCCL on GPUs, gloo on CPUs; plain `python script.py` is one process."""
    use_cuda = torch.cuda.is_available() and device_name != 'cpu'
    if 'RANK' in os.environ:
        dist.init_process_group('nccl' if use_cuda else 'gloo')
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for whatever still runs in fp32
        torch.backends.cudnn.allow_tf32 = True
    return rank, world_size, torch.device(f'cuda:{local_rank}' if use_cuda else 'cpu')

def pick_dtype(device, dtype='auto'):
    """'auto' = bf16 on a GPU that has it, fp16 (needs loss scaling) on older GPUs, fp32 on CPU."""
    if dtype == 'auto':
        dtype = 'float32' if device.type != 'cuda' else (
            'bfloat16' if torch.cuda.is_bf16_supported() else 'float16')
    if dtype not in ('float32', 'bfloat16', 'float16'):
        fail(f"DTYPE must be 'auto', 'float32', 'bfloat16' or 'float16', got {dtype!r}")
    return getattr(torch, dtype)

def autocast(device, dtype='auto'):
    """The forward passes' precision context (evaluation's; the training scripts write theirs)."""
    dtype = pick_dtype(device, dtype)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

def all_reduce_mean(t):
    """Average a tensor over ranks (a no-op without torch.distributed)."""
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t

def finite_everywhere(loss, grad_norm=None):
    """True when the loss (and the gradient norm, if given) is finite on every rank: all ranks take
    the same update-or-skip decision. One host sync."""
    values = torch.stack([loss.detach().float(), torch.as_tensor(
        0.0 if grad_norm is None else grad_norm, device=loss.device).float()])
    return all_reduce_mean((~torch.isfinite(values)).float().sum()).item() == 0

def seed_for(*keys):
    """A 63-bit seed from a few values (e.g. SEED, step, rank): other keys give unrelated streams.
    The scripts draw masks, stochastic depth, mixup and negatives from seeds that are functions of
    the step, so a resumed run replays them exactly without saving any generator state."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little') >> 1

# ----------------------------------------------------------------------------------------------
# Optimizer: schedule and parameter groups

def lr_at(step, total_steps, warmup_steps, peak, floor, start=0.0, clamp=False):
    """Per iteration: linear warmup start -> peak, then half-cosine peak -> floor. clamp=True is the
    official stage-2 LambdaLR (multi_modality/utils/scheduler.py): warmup from 0 and cosine to 0,
    both clamped below at floor. Only the step matters: a resume has nothing to restore or drift."""
    if clamp:
        return max(floor, lr_at(step, total_steps, warmup_steps, peak, 0.0))
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))

def set_lr(optimizer, lr):
    """Every group's lr = lr x its lr_scale (layer-wise decay in fine-tuning, 1 elsewhere)."""
    for g in optimizer.param_groups:
        g['lr'] = lr * g['lr_scale']

def adamw(model, lr, weight_decay, betas, lr_scale=None):
    """AdamW (eps 1e-8, as the official scripts; fused on a GPU) with no weight decay on 1-D
    parameters (norms, q/v biases, the temperature) and biases. lr_scale(name) -> a per-parameter
    lr multiplier (layer_decay); each group keeps its 'lr_scale' for set_lr."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            wd = 0.0 if p.ndim <= 1 or name.endswith('.bias') else weight_decay
            scale = lr_scale(name) if lr_scale else 1.0
            groups.setdefault((wd, scale), {'params': [], 'weight_decay': wd,
                                            'lr_scale': scale})['params'].append(p)
    return torch.optim.AdamW(list(groups.values()), lr=lr, betas=betas, eps=1e-8,
                             fused=next(model.parameters()).is_cuda)

def layer_decay(depth, decay, prefix=''):
    """name -> lr multiplier decay^(depth + 1 - layer) (BEiT's layer-wise decay, as the official
    fine-tuning): patch embedding layer 0, block i layer i + 1, the rest depth + 1 (full lr). The
    early layers, which hold the most general features, move least (UMT-B: 0.75^13 = 0.024)."""
    def layer(name):
        name = name.removeprefix(prefix)
        if name.startswith('patch_embed.'):
            return 0
        return int(name.split('.')[1]) + 1 if name.startswith('blocks.') else depth + 1
    return lambda name: decay ** (depth + 1 - layer(name)) if name.startswith(prefix) else 1.0

# ----------------------------------------------------------------------------------------------
# Data order: the same on every rank, for any number of workers, replayed exactly after a resume

class ResumableSampler(torch.utils.data.Sampler):
    """DistributedSampler semantics (one global permutation per (seed, epoch), padded or cut to a
    multiple of world_size, rank r takes positions r, r+W, ...) yielding (index, item_seed),
    item_seed a function of (seed, epoch, global position). set_start(p) skips this rank's first p
    samples of the next epoch iterated (that epoch only). len() = samples per rank per epoch."""
    def __init__(self, length, shuffle=True, seed=0, rank=0, world_size=1, drop_last=True):
        self.length, self.shuffle, self.seed = length, shuffle, seed
        self.rank, self.world = rank, world_size
        per_rank = length // world_size if drop_last else math.ceil(length / world_size)
        self.total, self.epoch, self.start = per_rank * world_size, 0, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def set_start(self, position):
        self.start = position

    def __len__(self):
        return self.total // self.world

    def __iter__(self):
        g = np.random.default_rng([self.seed, self.epoch])  # the same on every rank
        order = g.permutation(self.length) if self.shuffle else np.arange(self.length)
        order = np.resize(order, self.total)  # pad by repeating from the start, or cut
        seeds = g.integers(2 ** 62, size=self.total)
        start, self.start = self.start, 0
        for p in range(self.rank + start * self.world, self.total, self.world):
            yield int(order[p]), int(seeds[p])

def _worker_init(_):
    torch.set_num_threads(1)  # the workers are the parallelism; more threads oversubscribe cores

def make_loader(dataset, batch_size, shuffle, seed, rank, world_size, num_workers, drop_last=True,
                start=0):
    """DataLoader on a ResumableSampler; `start`: this rank's samples of the epoch used (resume)."""
    sampler = ResumableSampler(len(dataset), shuffle, seed, rank, world_size, drop_last)
    sampler.set_start(start)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size, sampler=sampler, num_workers=num_workers, drop_last=drop_last,
        pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None, worker_init_fn=_worker_init,
        generator=torch.Generator())  # its own: iter() must not draw from torch's global RNG
    return loader, sampler

def train_batches(dataset, batch_size, seed, rank, world_size, num_workers, step, steps_per_epoch,
                  per_step=1):
    """This rank's batches without end from optimizer step `step` on (a resume continues where it
    stopped): a new permutation each epoch, steps_per_epoch x per_step batches per epoch (per_step:
    micro-batches per optimizer step; the incomplete rest of an epoch is dropped)."""
    loader, sampler = make_loader(dataset, batch_size, True, seed, rank, world_size, num_workers)
    epoch, done = divmod(step, steps_per_epoch)
    start, per_epoch = done * per_step, steps_per_epoch * per_step
    while True:
        sampler.set_epoch(epoch)
        sampler.set_start(start * batch_size)
        if start < per_epoch:
            batches = iter(loader)
            for _ in range(per_epoch - start):
                yield next(batches)
        epoch, start = epoch + 1, 0

# ----------------------------------------------------------------------------------------------
# OUT_DIR: one run at a time, resume, atomic checkpoints, the log

def lock_out_dir(out_dir):
    """Hold OUT_DIR/run.lock while this process lives (the master calls it): a second run on the
    same OUT_DIR stops with a message. The lock is the kernel's (flock), freed however the process
    ends, even killed: only a live process holds it, a crashed run's file never blocks the next."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        fail(f'OUT_DIR {out_dir!r} is a file: pass a folder (--out_dir=...)')
    os.makedirs(out_dir, exist_ok=True)
    f = open(os.path.join(out_dir, 'run.lock'), 'a+')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        fail(f'OUT_DIR {out_dir!r} is in use by another run ({f.read().strip() or "running"}): '
             'wait for it to end, or pass another --out_dir')
    f.truncate(0)
    f.write(f'pid {os.getpid()} on {socket.gethostname()} '
            f'since {time.strftime("%Y-%m-%d %H:%M:%S")}\n')
    f.flush()
    return f  # the lock lasts as long as this file stays open

def claim_folder(folder, marker, what):
    """A folder a command writes into must be new, empty, or marked as its own by an earlier run
    (the file `marker` in it): never a folder of the user's. Makes it and leaves the marker."""
    if os.path.isfile(folder) or (os.path.isdir(folder) and os.listdir(folder)
                                  and not os.path.exists(os.path.join(folder, marker))):
        fail(f'{folder} holds files that {what} did not write: pass a new or empty folder')
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, marker), 'a').close()

def resolve(path, what='--init'):
    """A weights file by name: hf://OWNER/REPO/FILE (FILE may have folders) is fetched once into the
    Hugging Face cache by huggingface_hub.hf_hub_download and its local path returned; anything else
    is returned as it is. what: the setting it came from, for the message."""
    if not isinstance(path, str) or not path.startswith('hf://'):
        return path
    parts = path[len('hf://'):].split('/', 2)
    if len(parts) < 3 or not all(parts):
        fail(f'{what} {path}: a Hugging Face file is hf://OWNER/REPO/FILE')
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(f'{parts[0]}/{parts[1]}', parts[2])
    except Exception as e:  # noqa: BLE001 - offline, no such repo or file, no access: the user's
        fail(f'{what} {path}: cannot fetch {parts[2]} from the Hugging Face repo {parts[0]}/'
             f'{parts[1]} ({type(e).__name__}). Offline or without access, download the file '
             f'elsewhere and pass its local path: {what}=/path/to/{parts[2].split("/")[-1]}')

def read_checkpoint(path):
    """A checkpoint file -> dict, read weights_only (tensors and plain data, never code to run)."""
    if os.path.isdir(path) or not os.path.exists(path):
        fail(f'checkpoint {path!r} ' + ('is a folder' if os.path.isdir(path) else 'not found') +
             ': pass a .pt / .pth file')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to load is the file's, reported as such
        why = (str(e).splitlines() or [type(e).__name__])[0].split('. ')[0]
        if 'Unsupported global' in str(e):
            fail(f"{path} holds pickled Python objects, never loaded here. "
                 "If you trust it, keep its weights once: "
                 "torch.save(torch.load(path, weights_only=False)['model'], 'weights.pth')")
        fail(f'{path} cannot be read ({type(e).__name__}: {why}): the file is truncated or '
             'corrupt, or not a checkpoint')
    if not isinstance(ckpt, dict) or not ckpt:
        fail(f'{path} holds a {type(ckpt).__name__}, not a dict of weights: pass a checkpoint of '
             'this project or an official UMT .pth')
    return ckpt

def save_checkpoint(obj, path):
    """Write atomically: a temporary file, flushed to disk, then renamed over the old checkpoint.
    A crash (or a full disk) half-way through leaves the previous checkpoint intact."""
    tmp = f'{path}.tmp'
    torch.save(obj, tmp)
    with open(tmp, 'rb') as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic on POSIX

def resume(out_dir, world_size, device, kind_key='model_config', not_keys=()):
    """OUT_DIR/last.pt as a dict, or None for a new run. Ranks must agree: a checkpoint seen by some
    only (OUT_DIR not on shared storage) stops the run, as does an unreadable file or one another
    script wrote (no `kind_key`, or one of `not_keys`): starting over would throw the run away."""
    path = os.path.join(out_dir, 'last.pt')
    exists = os.path.exists(path)  # a last.pt.tmp left by a crash is ignored: last.pt is intact
    if world_size > 1:
        seen = torch.tensor([float(exists)], device=device)
        dist.all_reduce(seen)
        if 0 < seen.item() < world_size:
            fail(f'{path} is visible on {int(seen.item())} of {world_size} ranks: put OUT_DIR on '
                 'storage that every node sees')
    if not exists:
        return None
    try:
        ckpt = read_checkpoint(path)
    except BadInput as e:
        fail(f'{e}. Move it aside to start this run over (or restore a copy), then launch again.')
    if kind_key not in ckpt or 'optimizer' not in ckpt or any(k in ckpt for k in not_keys):
        fail(f'{path} was written by another script: pass another --out_dir')
    return ckpt

def resumed_line(ckpt, config, path, steps_per_epoch):
    """'resumed from PATH at step S (epoch E)' and the settings changed since the checkpoint."""
    old = ckpt['config']
    diff = ', '.join(f'{k}: {old.get(k)!r} -> {v!r}' for k, v in config.items() if old.get(k) != v)
    return (f'resumed from {path} at step {ckpt["step"]} (epoch {ckpt["step"] // steps_per_epoch})'
            + (f'; settings changed since: {diff}' if diff else ''))

def write_log(out_dir, record):
    """One JSON line in OUT_DIR/log.jsonl (the master writes)."""
    with open(os.path.join(out_dir, 'log.jsonl'), 'a') as f:
        f.write(json.dumps(record) + '\n')

# ----------------------------------------------------------------------------------------------
# For the downstream scripts (tasks/): what the stage scripts write out, in three calls

def start(device_name, dtype_name, out_dir):
    """train_stage1.py's processes, precision and OUT_DIR lock -> (rank, world_size, device,
    autocast, scaler, lock): rank 0 holds the lock; the GradScaler only acts in fp16."""
    rank, world_size, device = init_distributed(device_name)
    scaler = torch.amp.GradScaler(device.type,
                                  enabled=pick_dtype(device, dtype_name) == torch.float16)
    return (rank, world_size, device, autocast(device, dtype_name), scaler,
            lock_out_dir(out_dir) if rank == 0 else None)

def restore(ckpt, optimizer, scaler, config, path, steps_per_epoch):
    """train_stage1.py's resume: the optimizer state, the loss scale and the step of ckpt (None: a
    new run, step 0) -> (step, the report line or None)."""
    if ckpt is None:
        return 0, None
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
    return ckpt['step'], resumed_line(ckpt, config, path, steps_per_epoch)

def wrap(raw_model, part, compile, world_size, device):
    """train_stage1.py's compile and DDP: torch.compile of `part` (raw_model or a piece with static
    shapes) in place (the weights keep their names); DDP around raw_model with several processes."""
    if compile:
        part.forward = torch.compile(part.forward)
    model = (torch.nn.parallel.DistributedDataParallel(
        raw_model, device_ids=[device.index] if device.type == 'cuda' else None)
        if world_size > 1 else raw_model)
    return model.train()

def update(optimizer, scaler, model, grad_clip, loss):
    """train_stage1.py's update in one call: unscale, clip (or only measure), step unless the loss
    or a gradient is not finite on some rank (in fp16 overflowing gradients are the scaler's to
    skip), the next loss scale, zero the gradients -> (good, gradient norm)."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    good = finite_everywhere(loss, None if scaler.is_enabled() else grad_norm)
    if good:
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return good, grad_norm


if __name__ == '__main__':  # a module, not a script: say what it holds
    print(__doc__.strip())
