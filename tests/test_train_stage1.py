"""Guards train_stage1.py end to end on CPU with the tiny demo models:
- 2 processes (torchrun, gloo) end with the same weights as 1 process with the same global batch;
- a run killed after a checkpoint and resumed (next to a half-written last.pt.tmp) repeats the
  uninterrupted run exactly: same losses step for step, same final weights;
- a NaN loss skips the update and is counted; 5 in a row stop the run and keep the last good checkpoint;
- a last.pt that cannot be read stops the relaunch with a message that says what to do (never a silent restart);
- each invalid constant stops the script with its message before any data or model is built, and the demo
  teacher says what it needs when pointed at other videos.
Faults are injected by tests/faults.py, which runs the script with training.lr_at and GradScaler.scale wrapped.
"""
import json
import math
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
import faults
import training
from util import configurator
from tools.prepare_data import prepare

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / 'train_stage1.py')
FAULTS = str(ROOT / 'tests' / 'faults.py')


@pytest.fixture(scope='module')
def small_list(demo_dir, tmp_path_factory):
    """12 demo videos (the first 12 lines: one per class) -> 3 steps per epoch at 4 clips per step."""
    lines = open(os.path.join(demo_dir, 'train.csv')).readlines()[:12]
    path = tmp_path_factory.mktemp('lists') / 'small.csv'
    path.write_text(''.join(lines))
    return str(path)


def train(demo_dir, small_list, out_dir, nproc=1, check=True, two_process_reference=False, **overrides):
    """Run the script on the small list in this process, or in fresh ones (nproc via torchrun, or the 1-process
    reference of a 2-process run); returns the process (returncode, stdout, stderr)."""
    settings = dict(preset='demo', data_list=small_list, data_root=demo_dir, out_dir=str(out_dir), device='cpu',
                    teacher_pretrained=None, total_batch=4, micro_batch=2, epochs=2, warmup_epochs=1, base_lr=0.01,
                    num_workers=0, log_interval=1, ckpt_interval=100)
    settings.update(overrides)
    nan_steps, kill_after = settings.pop('nan_steps', ()), settings.pop('max_steps', 0)
    args = [f'--{k}={v}' for k, v in settings.items()]
    if nproc == 1 and not two_process_reference:  # in this process: no start-up cost
        out = faults.run_here(SCRIPT, args, nan_steps, kill_after)
    else:
        launcher = [sys.executable] if nproc == 1 else \
            [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
        env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
        env['OMP_NUM_THREADS'] = '1'  # same thread count in every run: identical float results
        env['UMT_TEST_NAN_STEPS'], env['UMT_TEST_KILL_AFTER'] = ','.join(map(str, nan_steps)), str(kill_after)
        out = subprocess.run(launcher + [FAULTS, SCRIPT] + args, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def log(out_dir):
    """{step: record} from log.jsonl; a step logged twice (before a kill and after the resume) keeps the last."""
    records = [json.loads(line) for line in open(os.path.join(out_dir, 'log.jsonl'))]
    return {r['step']: r for r in records if 'step' in r}


def weights(out_dir):
    return training.read_checkpoint(os.path.join(out_dir, 'last.pt'))['model']


def test_two_processes_equal_one(demo_dir, small_list, tmp_path):
    # No stochastic depth: its draws are per rank by design. Masks and data depend on the global position
    # of a sample only, so 1 process x 2 micro-steps and 2 processes x 1 micro-step compute the same thing.
    one = train(demo_dir, small_list, tmp_path / 'one', drop_path=0.0, two_process_reference=True)
    two = train(demo_dir, small_list, tmp_path / 'two', nproc=2, drop_path=0.0)
    assert '1 processes x 2 accumulation' in one.stdout and '2 processes x 1 accumulation' in two.stdout
    log1, log2 = log(tmp_path / 'one'), log(tmp_path / 'two')
    assert sorted(log1) == sorted(log2) == list(range(1, 7))
    for s in log1:
        assert log1[s]['loss'] == pytest.approx(log2[s]['loss'], abs=1e-6)
    assert log1[6]['loss'] < log1[1]['loss']  # it trained
    w1, w2 = weights(tmp_path / 'one'), weights(tmp_path / 'two')
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-5, atol=1e-6, msg=k)  # measured: ~1e-8


def test_the_demo_preset_under_torchrun_on_two_cpu_processes(demo_dir, tmp_path):
    # The README's `torchrun --standalone --nproc_per_node=2 train_stage1.py --preset=demo`, cut short (1 epoch, a
    # random teacher): the preset's 16 clips per step split into 8 per process (MICRO_BATCH 16 lowered), to the end.
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
    out = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                          SCRIPT, '--preset=demo', f'--data_root={demo_dir}', f'--data_list={demo_dir}/train.csv',
                          '--teacher_pretrained=None', '--epochs=1', '--warmup_epochs=1', '--num_workers=0',
                          f'--out_dir={tmp_path / "out"}'], cwd=ROOT, env=dict(env, OMP_NUM_THREADS='1'),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert '16 clips per step = 8 (MICRO_BATCH 16 lowered) x 2 processes x 1 accumulation' in out.stdout
    assert max(log(tmp_path / 'out')) == 11 == training.read_checkpoint(tmp_path / 'out' / 'last.pt')['step']


@pytest.mark.parametrize('target', ['pixels', 'clip+pixels', 'clip+masked'])
def test_table1_targets_train_and_save_the_student_only(demo_dir, small_list, tmp_path, target):
    # The rows of the paper's Table 1 (TARGET): each trains (its loss falls), the checkpoint records TARGET and
    # keeps the decoder apart, and a downstream model loads the student alone. 'pixels' with a tube mask runs
    # without a teacher, as VideoMAE does.
    mask = ['--mask_type=tube', '--mask_ratio=0.9'] if target == 'pixels' else []
    out = train(demo_dir, small_list, tmp_path / 'run', target=target, epochs=6, warmup_epochs=1,
                base_lr=0.04, **dict(a[2:].split('=') for a in mask))
    assert 'teacher none' in out.stdout if target == 'pixels' else 'teacher tiny' in out.stdout
    records = log(tmp_path / 'run')
    first, last = records[1], records[max(records)]
    assert last['loss'] < 0.9 * first['loss'], (first['loss'], last['loss'])
    assert (first['loss_uta'] == 0) == (target == 'pixels') and first['loss_decoder'] > 0
    ckpt = training.read_checkpoint(tmp_path / 'run' / 'last.pt')
    assert ckpt['config']['TARGET'] == target and any(k.startswith('blocks.') for k in ckpt['decoder'])
    assert not any(k.startswith(('decoder', 'mask_token', 'encoder_to')) for k in ckpt['model'])
    from util import checkpoints
    student, report = checkpoints.load_vit(str(tmp_path / 'run' / 'last.pt'))
    assert student.config.align_layers == (0 if target == 'pixels' else 2) and 'unused: none' in report


def test_a_decoder_row_resumes_exactly(demo_dir, small_list, tmp_path):
    # The decoder's weights and its optimizer state come back with the student's.
    settings = dict(target='clip+pixels', ckpt_interval=2)
    train(demo_dir, small_list, tmp_path / 'full', **settings)
    train(demo_dir, small_list, tmp_path / 'killed', max_steps=3, **settings)
    train(demo_dir, small_list, tmp_path / 'killed', **settings)
    full, again = log(tmp_path / 'full'), log(tmp_path / 'killed')
    assert [full[s]['loss'] for s in full] == [again[s]['loss'] for s in full]
    assert torch.equal(training.read_checkpoint(tmp_path / 'full' / 'last.pt')['decoder']['head.weight'],
                       training.read_checkpoint(tmp_path / 'killed' / 'last.pt')['decoder']['head.weight'])


@pytest.fixture(scope='module')
def prepared_list(demo_dir, small_list, tmp_path_factory):
    """The same 12 videos re-encoded by data.prepare (a keyframe every 4 frames): (list, root)."""
    out = str(tmp_path_factory.mktemp('prepared'))
    return prepare(small_list, demo_dir, out, workers=2)[0], out

@pytest.mark.parametrize('prepared', [False, True], ids=['original', 'prepared'])
def test_resume_repeats_the_uninterrupted_run(demo_dir, small_list, prepared_list, tmp_path, prepared):
    # Stochastic depth on, a data worker, 2 micro-steps, a checkpoint mid-epoch and a resume across the epoch end.
    if prepared:
        small_list, demo_dir = prepared_list
    common_settings = dict(drop_path=0.2, num_workers=1, ckpt_interval=2)
    train(demo_dir, small_list, tmp_path / 'full', **common_settings)
    killed = tmp_path / 'killed'
    train(demo_dir, small_list, killed, max_steps=3, **common_settings)          # checkpoint at 2, killed after 3
    assert training.read_checkpoint(killed / 'last.pt')['step'] == 2
    # A crash in the middle of the next checkpoint write would leave a half-written temporary file:
    # the resume must ignore it and take the intact last.pt.
    (killed / 'last.pt.tmp').write_bytes((killed / 'last.pt').read_bytes()[:1000])
    resumed = train(demo_dir, small_list, killed, **common_settings)
    assert f'resumed from {killed / "last.pt"} at step 2' in resumed.stdout
    full, again = log(tmp_path / 'full'), log(killed)
    assert sorted(full) == sorted(again) == list(range(1, 7))
    for s in full:  # exact: same data, masks, drop-path draws and optimizer state
        assert (again[s]['loss'], again[s]['loss_layers'], again[s]['grad_norm']) == \
               (full[s]['loss'], full[s]['loss_layers'], full[s]['grad_norm']), f'step {s}'
    w_full, w_again = weights(tmp_path / 'full'), weights(killed)
    assert all(torch.equal(w_full[k], w_again[k]) for k in w_full)


def test_nan_loss_is_skipped_then_stops(demo_dir, small_list, tmp_path):
    # Step 2 is NaN (skipped, counted), step 3 is fine again, steps 4-8 are NaN: 5 in a row stop the run.
    out = train(demo_dir, small_list, tmp_path, check=False, epochs=3, ckpt_interval=1, mask_type='tube',
                nan_steps=(2, 4, 5, 6, 7, 8))
    assert out.returncode != 0
    assert '5 non-finite losses in a row (steps 4-8)' in out.stderr
    assert 'last good checkpoint is' in out.stderr and '(step 3)' in out.stderr
    records = log(tmp_path)
    assert records[2]['loss'] is None and records[2]['skipped_steps'] == 1
    assert math.isfinite(records[3]['loss']) and records[3]['skipped_steps'] == 1  # the skip kept the weights clean
    assert records[8]['skipped_steps'] == 6 and 9 not in records
    ckpt = training.read_checkpoint(tmp_path / 'last.pt')
    assert ckpt['step'] == 3                                         # no checkpoint during the bad streak
    assert all(torch.isfinite(v).all() for v in ckpt['model'].values())


def test_unreadable_last_checkpoint_is_not_overwritten(demo_dir, small_list, tmp_path):
    train(demo_dir, small_list, tmp_path, max_steps=1, ckpt_interval=1)
    whole = (tmp_path / 'last.pt').read_bytes()
    (tmp_path / 'last.pt').write_bytes(whole[:len(whole) // 3])                # a disk that filled up, say
    out = train(demo_dir, small_list, tmp_path, check=False)
    assert out.returncode != 0 and 'last.pt cannot be read' in out.stderr and 'Move it aside' in out.stderr
    assert (tmp_path / 'last.pt').read_bytes() == whole[:len(whole) // 3]      # left as it was, for the user


def test_demo_teacher_says_what_it_needs(small_list, tmp_path, monkeypatch):
    (tmp_path / 'my_videos').mkdir()
    (tmp_path / 'my_videos' / 'a.mp4').write_bytes(b'')
    monkeypatch.delenv('RANK', raising=False)
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    monkeypatch.setattr(sys, 'argv', [SCRIPT, '--preset=demo', f'--data_list={small_list}', '--device=cpu',
                                      f'--data_root={tmp_path / "my_videos"}', f'--out_dir={tmp_path / "out"}'])
    with pytest.raises(configurator.BadInput, match="TEACHER_PRETRAINED='demo' is a tiny CLIP that knows only the demo's "
                                         r"coloured squares.*captions_train.json.*--teacher_pretrained=openai"):
        runpy.run_path(SCRIPT, run_name='__main__')


@pytest.mark.parametrize('overrides, world_size, message', [
    (['--preset=demo', '--total_batch=7'], 2, 'TOTAL_BATCH=7 must be a positive multiple of the 2 processes'),
    (['--preset=demo', '--micro_batch=0'], 1, 'MICRO_BATCH=0 must be positive'),
    (['--preset=demo', '--mask_ratio=1.0'], 1, 'MASK_RATIO=1.0 must lie strictly between 0 and 1'),
    (['--preset=demo', '--mask_ratio=0'], 1, 'MASK_RATIO=0.0 must lie strictly between 0 and 1'),
    (['--preset=demo', '--mask_type=block'], 1, "MASK_TYPE='block'"),
    (['--preset=demo', '--img_size=60'], 1, 'student: img_size=60 must be a positive multiple of the patch size 8'),
    (['--preset=demo', '--num_frames=0'], 1, 'student: .*num_frames=0'),
    (['--preset=demo', '--align_layers=5'], 1, 'student: align_layers=5 must be between 0 and the depth 4'),
    (['--preset=demo', '--model=vit_s16'], 1, "student: unknown model preset 'vit_s16'"),
    (['--preset=demo', '--target=mae'], 1, "TARGET='mae'; valid: 'clip', 'pixels'"),
    (['--data_list=missing.csv'], 1, "DATA_LIST 'missing.csv' not found.*path,label.*--preset=demo"),
    (['--teacher_pretrained=no/such/clip.bin', '--data_list=missing.csv'], 1, "teacher weights file .* not found"),
])
def test_invalid_settings_fail_fast(overrides, world_size, message, monkeypatch):
    def too_late(*args, **kwargs):
        raise AssertionError('the script got past its checks')
    import data, teacher
    monkeypatch.setattr(data, 'VideoClassification', too_late)   # nothing heavy may run before the checks
    monkeypatch.setattr(teacher, 'CLIPTeacher', too_late)
    monkeypatch.setattr(sys, 'argv', [SCRIPT, '--out_dir=/nonexistent/out'] + overrides)
    monkeypatch.setenv('WORLD_SIZE', str(world_size))            # read before init_process_group
    monkeypatch.delenv('RANK', raising=False)
    with pytest.raises(configurator.BadInput, match=message):
        runpy.run_path(SCRIPT, run_name='__main__')


def test_checks_that_need_the_data_or_the_teacher(demo_dir, small_list, tmp_path, monkeypatch):
    base = [SCRIPT, '--preset=demo', f'--data_list={small_list}', f'--data_root={demo_dir}', f'--out_dir={tmp_path}',
            '--device=cpu', '--teacher_pretrained=None']
    monkeypatch.delenv('RANK', raising=False)
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    monkeypatch.setattr(sys, 'argv', base)  # 12 videos, 16 clips per step
    with pytest.raises(configurator.BadInput, match='has 12 videos, fewer than one global batch of TOTAL_BATCH=16'):
        runpy.run_path(SCRIPT, run_name='__main__')
    # The tiny teacher at 72 px cuts frames into 9x9 patches, the student at 64 px into 8x8: UTA pairs tokens
    # by position, so this must stop and name the size that fits.
    monkeypatch.setattr(sys, 'argv', base + ['--total_batch=4', '--micro_batch=4', '--teacher_size=72'])
    with pytest.raises(configurator.BadInput, match='student cuts a clip into 4x8x8 tokens but the teacher into 4x9x9.*'
                                         'TEACHER_SIZE = 64'):
        runpy.run_path(SCRIPT, run_name='__main__')


def test_data_wait_is_logged(demo_dir, small_list, tmp_path, monkeypatch):
    """The log's data_wait is the fraction of the step time spent waiting for the next batch: a loader made slow on
    purpose (0.3 s more per clip, decoded in the main process) must raise it."""
    monkeypatch.delenv('RANK', raising=False)
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    load = data.VideoClassification.load

    def wait(out_dir, delay):
        monkeypatch.setattr(data.VideoClassification, 'load',
                            lambda self, i, rng: time.sleep(delay) or load(self, i, rng))
        monkeypatch.setattr(sys, 'argv', [SCRIPT, '--preset=demo', f'--data_list={small_list}',
                                          f'--data_root={demo_dir}', f'--out_dir={out_dir}', '--device=cpu',
                                          '--teacher_pretrained=None',
                                          '--total_batch=4', '--micro_batch=4', '--epochs=1', '--num_workers=0',
                                          '--log_interval=3'])
        runpy.run_path(SCRIPT, run_name='__main__')
        return log(out_dir)[3]['data_wait']
    fast, slow = wait(tmp_path / 'fast', 0.0), wait(tmp_path / 'slow', 0.3)
    assert 0 <= fast < slow - 0.3 <= 1, (fast, slow)
