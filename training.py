"""
The plumbing every training script shares, written once so that the scripts cannot drift apart: settings
(constants, presets, --name=value), start-up checks, processes, precision, the lr schedule and AdamW groups,
and `Run`: resume from OUT_DIR/last.pt, update-or-skip on a non-finite loss, the log, the checkpoints.

The method stays in the scripts: each loop computes its own losses and calls run.update(...) once per
optimizer step. No trainer class owns the loop and nothing is called back.
"""

import ast
import hashlib
import json
import math
import os
import sys
import time
import types
from contextlib import nullcontext

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoints
import data

# Fault injection for the tests, unset in real runs: these steps (numbered from 1, as in the log) get a NaN
# loss and NaN gradients, and the process stops after step KILL_AFTER as if it had been killed.
NAN_STEPS = {int(s) for s in os.environ.get('UMT_NAN_STEPS', '').split(',') if s}
KILL_AFTER = int(os.environ.get('UMT_KILL_AFTER', 0))

def fail(message):
    """Stop the script with a message that names it."""
    raise SystemExit(f'{os.path.basename(sys.argv[0])}: {message}')

# ----------------------------------------------------------------------------------------------
# Settings: UPPER_CASE constants at the top of a script, changed by presets and --KEY=VALUE

def configure(constants, presets, argv):
    """Apply `--preset=NAME`, then `--KEY=VALUE` overrides, to a script's constants (its globals()).

    Values are read with ast.literal_eval (so `--mask_type=tube` and `--mask_ratio=0.9` both work),
    must have the type of the default (an int is accepted for a float), and an unknown key fails
    with the list of valid ones. Prints what differs from the defaults (the paper's recipe) and returns
    the resolved {name: value} dict, which goes into the log and into every checkpoint.
    """
    names = sorted(k for k, v in constants.items()
                   if k.isupper() and k != 'PRESETS' and not callable(v) and not isinstance(v, types.ModuleType))
    defaults = {k: constants[k] for k in names}

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
    config = {k: constants[k] for k in names}
    if int(os.environ.get('RANK', 0)) == 0:
        changed = ', '.join(f'{k}={v!r}' for k, v in config.items() if v != defaults[k])
        print(f'settings changed from the defaults: {changed or "none"}')
    return config

# ----------------------------------------------------------------------------------------------
# Start-up checks, run before anything heavy so that a typo costs seconds, not a queue slot

def split_batch(total_batch, micro_batch):
    """-> (world_size, grad_accum) with TOTAL_BATCH = MICRO_BATCH x processes x accumulation steps. Called before
    the process group exists: torchrun sets WORLD_SIZE."""
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    if total_batch % (micro_batch * world_size):
        fail(f'TOTAL_BATCH={total_batch} is not divisible by MICRO_BATCH={micro_batch} x {world_size} processes: '
             f'choose TOTAL_BATCH as a multiple of {micro_batch * world_size}, or change MICRO_BATCH')
    return world_size, total_batch // (micro_batch * world_size)

def need_files(paths, what, skip=False):
    """Stop when a path of {NAME: path} is set but missing; `what` says what the file holds and how to start."""
    for name, path in paths.items():
        if path and not skip and not os.path.exists(path):
            fail(f'{name} {path!r} not found: {what}')

def need_init(init, out_dir, what, demo_command):
    """INIT must exist, unless the run resumes from OUT_DIR/last.pt."""
    if not os.path.exists(os.path.join(out_dir, 'last.pt')) and not os.path.isfile(init):
        hint = f' Run `{demo_command}` first.' if 'demo' in init else ''
        fail(f'INIT {init!r} not found: pass --init=CHECKPOINT, {what}.{hint}')

def epoch_steps(num_items, total_batch, source, unit):
    """Optimizer steps per epoch: the incomplete last global batch of an epoch is dropped."""
    if num_items < total_batch:
        fail(f'{source} has {num_items} {unit}, fewer than one global batch of TOTAL_BATCH={total_batch}')
    return num_items // total_batch

# ----------------------------------------------------------------------------------------------
# Processes, devices and precision

def setup_distributed(device_name='auto'):
    """-> (rank, world_size, device). torchrun sets RANK / LOCAL_RANK / WORLD_SIZE (NCCL on CUDA, gloo on CPU);
    plain `python script.py` runs one process."""
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
    """-> (autocast context for the forward passes, the GradScaler that fp16 needs, dtype name).
    'auto' = bf16 on a CUDA device that supports it, fp16 (+ loss scaling) on older GPUs, fp32 on CPU."""
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

def no_sync(model, skip):
    """Gradient accumulation: DDP all-reduces the gradients only on the last micro-step (skip=False)."""
    return model.no_sync() if skip and hasattr(model, 'no_sync') else nullcontext()

def seed_for(*keys):
    """A 63-bit seed from a few values (e.g. SEED, step, rank): different keys give unrelated streams.
    The scripts draw masks, stochastic depth, mixup and negatives from seeds that are functions of the
    step, so a resumed run replays them exactly without saving any generator state."""
    return int.from_bytes(hashlib.blake2b(repr(keys).encode(), digest_size=8).digest(), 'little') >> 1

# ----------------------------------------------------------------------------------------------
# Optimizer: schedule and parameter groups

def lr_at(step, total_steps, warmup_steps, peak, floor, start=0.0):
    """Per-iteration schedule: linear warmup start -> peak, then half-cosine peak -> floor. A pure function of
    the step number, so a resumed run has nothing to restore or drift."""
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))

def adamw(model, lr, weight_decay, betas, lr_scale=None):
    """AdamW (eps 1e-8, as the official scripts; fused on a GPU) with no weight decay on 1-D parameters (norms, q/v
    biases, the temperature) and biases. lr_scale(name) -> a per-parameter lr multiplier (layer_decay); each group
    keeps its 'lr_scale' for Run.set_lr."""
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            wd = 0.0 if p.ndim <= 1 or name.endswith('.bias') else weight_decay
            scale = lr_scale(name) if lr_scale else 1.0
            groups.setdefault((wd, scale), {'params': [], 'weight_decay': wd, 'lr_scale': scale})['params'].append(p)
    return torch.optim.AdamW(list(groups.values()), lr=lr, betas=betas, eps=1e-8,
                             fused=next(model.parameters()).is_cuda)

def layer_decay(depth, decay, prefix=''):
    """name -> lr multiplier decay^(depth + 1 - layer) (BEiT's layer-wise decay, used by the official fine-tuning):
    the patch embedding is layer 0, block i layer i + 1, everything after the blocks layer depth + 1 (full lr).
    The early layers, which hold the most general pre-trained features, move least (UMT-B: 0.75^13 = 0.024)."""
    def layer(name):
        name = name.removeprefix(prefix)
        if name.startswith('patch_embed.'):
            return 0
        return int(name.split('.')[1]) + 1 if name.startswith('blocks.') else depth + 1
    return lambda name: decay ** (depth + 1 - layer(name)) if name.startswith(prefix) else 1.0

# ----------------------------------------------------------------------------------------------
# One run's bookkeeping

class Run:
    """Processes, precision, OUT_DIR/last.pt and log.jsonl, and what happens after every backward pass.

        run = training.Run(config, OUT_DIR, DEVICE, DTYPE, GRAD_CLIP, MAX_BAD_STEPS, LOG_INTERVAL, CKPT_INTERVAL)
        ckpt = run.resume()                          # OUT_DIR/last.pt, or None for a new run
        ...                                          # build raw_model (from ckpt or the init) and the optimizer
        model = run.start(raw_model, optimizer, ckpt, total_steps, steps_per_epoch, report, COMPILE)
        batches = run.batches(dataset, MICRO_BATCH, grad_accum, SEED, NUM_WORKERS)
        while run.step < total_steps:
            run.set_lr(schedule(run.step))
            for micro, batch in run.micro_batches(batches, grad_accum):  # times the wait for data
                ... forward, backward ...
            if run.update({'loss': loss, ...}, raw_model):   # True when a checkpoint is due
                run.save(raw_model, ...)        # + whatever describes the model
        run.close()
    """

    def __init__(self, config, out_dir, device='auto', dtype='auto', grad_clip=None, max_bad_steps=5,
                 log_interval=20, ckpt_interval=500):
        self.config, self.out_dir, self.grad_clip, self.max_bad_steps = config, out_dir, grad_clip, max_bad_steps
        self.log_interval, self.ckpt_interval = log_interval, ckpt_interval
        self.rank, self.world_size, self.device = setup_distributed(device)  # NCCL on GPUs, gloo on CPUs
        self.master = self.rank == 0
        self.autocast, self.scaler, self.dtype = precision(self.device, dtype)
        self.ckpt_path, self.log_path = os.path.join(out_dir, 'last.pt'), os.path.join(out_dir, 'log.jsonl')
        if self.master:
            os.makedirs(out_dir, exist_ok=True)
        self.step, self.last_ckpt_step = 0, None

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def resume(self):
        """OUT_DIR/last.pt as a dict, or None for a new run. Every rank must take the same decision, so a
        checkpoint seen by some ranks only (OUT_DIR not on shared storage) stops the run; so does a file that
        cannot be read: starting over silently would throw the run away."""
        exists = os.path.exists(self.ckpt_path)  # a stray last.pt.tmp (a crash mid-write) is ignored: last.pt is intact
        if self.world_size > 1:
            seen = torch.tensor([float(exists)], device=self.device)
            dist.all_reduce(seen)
            if 0 < seen.item() < self.world_size:
                fail(f'{self.ckpt_path} is visible on {int(seen.item())} of {self.world_size} ranks: '
                     'put OUT_DIR on storage that every node sees')
        if not exists:
            return None
        try:
            return checkpoints.read(self.ckpt_path)
        except ValueError as e:
            fail(f'{e}\nMove it aside to start this run over (or restore a copy), then launch again.')

    def start(self, model, optimizer, ckpt, total_steps, steps_per_epoch, report=(), compile=False,
              ckpt_every_epoch=False, desc='train'):
        """Restore the optimizer, loss scaler and step from ckpt (None: a new run) and empty it (its tensors would
        stay in memory for the whole run), print `report` (where the model comes from) and a summary, open the log
        and the bar. -> the module to train: `model` compiled (compile=True) and in DDP when there are several
        processes, in train mode; save and evaluate `model` itself."""
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.optimizer, self.ckpt_every_epoch = optimizer, ckpt_every_epoch
        if ckpt is not None:
            optimizer.load_state_dict(ckpt['optimizer'])
            self.scaler.load_state_dict(ckpt['scaler'])
            self.step = self.last_ckpt_step = ckpt['step']
            diff = ', '.join(f'{k}: {ckpt["config"].get(k)!r} -> {v!r}' for k, v in self.config.items()
                             if ckpt['config'].get(k) != v)
            report = [*report, f'resumed from {self.ckpt_path} at step {self.step} (epoch '
                      f'{self.step // steps_per_epoch})' + (f'; settings changed since: {diff}' if diff else '')]
            ckpt.clear()
        if self.master:
            trained = sum(p.numel() for g in optimizer.param_groups for p in g['params'])
            print('\n'.join([*report, f'{self.world_size} processes | {self.dtype} on {self.device}, compile '
                              f'{compile} | {total_steps} steps, {steps_per_epoch} per epoch | {trained / 1e6:.2f}M '
                              'trained parameters']))
            self.write({'config': self.config, 'world_size': self.world_size, 'start_step': self.step})
        self.sums, self.good_steps, self.skipped_steps, self.bad_in_a_row = None, 0, 0, 0
        self.skipped_samples, self.samples, self.wait, self.grad_norm, self.hinted = 0, 0, 0.0, None, False
        self.t_log, self.step_log = time.perf_counter(), self.step
        self.pbar = tqdm(total=total_steps, initial=self.step, disable=not self.master, desc=desc, dynamic_ncols=True)
        model = torch.compile(model) if compile else model
        if self.world_size > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == 'cuda' else None, broadcast_buffers=False)
        return model.train()

    def batches(self, dataset, micro_batch, grad_accum, seed, num_workers):
        """This rank's micro-batches from the current step on: a resumed run continues where it stopped."""
        epoch, done = divmod(self.step, self.steps_per_epoch)
        return data.train_batches(dataset, micro_batch, seed, self.rank, self.world_size, num_workers, epoch,
                                  done * grad_accum, self.steps_per_epoch * grad_accum)

    def micro_batches(self, batches, grad_accum):
        """(micro-step, batch) for each of the grad_accum micro-steps of one optimizer step."""
        for micro in range(grad_accum):
            yield micro, self.next_batch(batches)

    def set_lr(self, lr):
        """The learning rate of this step, times each parameter group's lr_scale (called first in every step)."""
        if KILL_AFTER and self.step >= KILL_AFTER:
            raise SystemExit(0)  # test: killed after step KILL_AFTER (and its checkpoint, if one was due)
        for g in self.optimizer.param_groups:
            g['lr'] = lr * g['lr_scale']  # lr_scale: layer-wise decay in fine-tuning, 1 elsewhere
        self.lr = lr
        return lr

    def next_batch(self, batches):
        """The next batch, timing how long the step waited for it (the data-wait fraction in the log)."""
        t = time.perf_counter()
        batch = next(batches)
        self.wait += time.perf_counter() - t
        self.skipped_samples += int(batch['skipped'].sum())  # unreadable files the dataset replaced
        self.samples += len(batch['index'])
        return batch

    def update(self, losses, model):
        """After the backward pass(es) of one optimizer step: update, or skip the update if the loss is not finite.

        losses: {'loss': the total (decides), other name: a scalar or vector for the log}; model: the trained
        module (its gradient norm is logged, or clipped). Logs every LOG_INTERVAL steps, stops after MAX_BAD_STEPS
        non-finite losses in a row (keeping the last good checkpoint) and returns True when a checkpoint is due."""
        self.step += 1
        optimizer = self.optimizer
        losses = {k: torch.as_tensor(v).detach().float() for k, v in losses.items()}
        if self.step in NAN_STEPS:  # test: a step whose loss and gradients are NaN
            losses['loss'] = losses['loss'] * float('nan')
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float('nan'))
        log_now = self.step % self.log_interval == 0 or self.step == self.total_steps
        # The one host sync per step outside logging: skipping is decided on the host and identically on
        # every rank, so the flag is all-reduced first.
        bad = all_reduce_mean((~torch.isfinite(losses['loss'])).float().sum()).item() > 0
        if bad:
            optimizer.zero_grad(set_to_none=True)  # drop the poisoned gradients; weights and Adam state untouched
            self.skipped_steps, self.bad_in_a_row, self.grad_norm = self.skipped_steps + 1, self.bad_in_a_row + 1, None
            if self.master:
                tqdm.write(f'step {self.step}: non-finite loss, update skipped ({self.skipped_steps} so far)')
        else:
            self.bad_in_a_row = 0
            if self.grad_clip is not None or log_now:
                self.scaler.unscale_(optimizer)  # the real gradient scale (fp16), before measuring or clipping
                self.grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip or math.inf)
            self.scaler.step(optimizer)  # = optimizer.step() unless fp16
            self.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            flat = torch.cat([v.reshape(-1) for v in losses.values()])
            self.sums = flat if self.sums is None else self.sums + flat
            self.good_steps += 1
        self.pbar.update(1)
        stopping = self.bad_in_a_row >= self.max_bad_steps
        if log_now or stopping:
            self.log(losses)
        if stopping:
            fail(f'{self.bad_in_a_row} non-finite losses in a row (steps {self.step + 1 - self.bad_in_a_row}-'
                 f'{self.step}): stopping. The last good checkpoint is {self.ckpt_path} (step {self.last_ckpt_step}). '
                 'Lower the learning rate, use bf16 or fp32, check the data with `python data.py --check`, then '
                 'launch again to resume.')
        return self.bad_in_a_row == 0 and (self.step % self.ckpt_interval == 0 or self.step == self.total_steps
                                           or (self.ckpt_every_epoch and self.step % self.steps_per_epoch == 0))

    def log(self, losses):
        """One record: losses averaged over the good steps since the last record and over ranks, lr, grad norm,
        speed, the fraction of the time spent waiting for data, skipped samples and steps. JSONL + one line."""
        sizes = [v.numel() for v in losses.values()]
        sums = self.sums if self.sums is not None else torch.zeros(sum(sizes), device=self.device)
        counts = torch.tensor([self.samples, self.skipped_samples, self.wait], device=self.device, dtype=torch.float64)
        stats = all_reduce_mean(torch.cat([sums.double(), counts]))
        dt, steps = time.perf_counter() - self.t_log, self.step - self.step_log
        mean = (stats[:-3] / self.good_steps).tolist() if self.good_steps else [None] * len(stats[:-3])
        record = {'step': self.step, 'epoch': self.step / self.steps_per_epoch}
        for (name, value), n in zip(losses.items(), sizes):
            part, mean = mean[:n], mean[n:]
            record[name] = part[0] if value.ndim == 0 else (part if self.good_steps else None)
        record.update(lr=self.lr, grad_norm=None if self.grad_norm is None else float(self.grad_norm),
                      samples_per_s=stats[-3].item() * self.world_size / dt, ms_per_step=1000 * dt / steps,
                      data_wait=min(1.0, stats[-1].item() / dt), skipped_steps=self.skipped_steps,
                      skipped_samples=round(stats[-2].item() * self.world_size))
        if self.device.type == 'cuda':
            record['max_memory_gib'] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        if self.master:
            self.write(record)
            text = ' | '.join(f'{k} {v:.4f}' for k, v in record.items() if isinstance(v, float) and k in losses)
            tqdm.write(f'step {self.step} | {text or "loss n/a"} | lr {self.lr:.3g} | grad norm '
                       f'{record["grad_norm"] or 0:.3f} | {record["ms_per_step"]:.0f} ms/step | '
                       f'{record["samples_per_s"]:.1f} samples/s | data wait {record["data_wait"]:.0%}')
            self.pbar.set_postfix(loss=f'{record["loss"]:.4f}' if record['loss'] is not None else 'n/a',
                                  wait=f'{record["data_wait"]:.0%}')
            if record['data_wait'] > 0.2 and steps >= 5 and not self.hinted:  # once per run
                self.hinted = True
                tqdm.write(f'the step waited for data {record["data_wait"]:.0%} of the time: raise NUM_WORKERS, or '
                           'prepare the videos for fast sampling (python data.py --prepare)')
        self.sums, self.good_steps, self.wait, self.skipped_samples, self.samples = None, 0, 0.0, 0, 0
        self.t_log, self.step_log = time.perf_counter(), self.step

    def write(self, record):
        with open(self.log_path, 'a') as f:
            f.write(json.dumps(record) + '\n')

    def save(self, model, **state):
        """OUT_DIR/last.pt, atomically (master): the model's weights, `state` (its config, ...), the optimizer and
        loss-scaler state, the step and the settings."""
        if self.master:
            checkpoints.save({'model': model.state_dict(), **state, 'optimizer': self.optimizer.state_dict(),
                              'scaler': self.scaler.state_dict(), 'step': self.step, 'config': self.config},
                             self.ckpt_path)
        self.last_ckpt_step = self.step

    def close(self):
        """The end of the run: close the bar, say where the results are, leave the process group together."""
        self.pbar.close()
        if self.master:
            print(f'done: {self.step} steps, {self.skipped_steps} skipped; weights in {self.ckpt_path}, '
                  f'log in {self.log_path}')
        if self.world_size > 1:
            dist.barrier()  # tear the group down together: a rank that leaves first makes gloo abort the others
            dist.destroy_process_group()
