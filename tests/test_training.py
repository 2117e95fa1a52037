"""Guards training.py: overrides are type-checked, --help lists every constant with its comment, the schedule's end
points (and the official stage-2 clamp), no-decay groups and layer-wise decay, atomic checkpoints, clear messages for
checkpoints that cannot be read, and the OUT_DIR lock (a live run blocks a second one, a dead one never does)."""
import argparse
import subprocess
import sys

import pytest
import torch

import training
from util import configurator


def test_configure_presets_and_overrides():
    presets = {'demo': {'EPOCHS': 3, 'MASK_TYPE': 'tube'}}
    g = {'MASK_RATIO': 0.8, 'MASK_TYPE': 'semantic', 'EPOCHS': 201, 'PRETRAINED': None, 'lower': 1,
         'PRESETS': presets, 'F': torch.nn.functional}   # neither the presets nor a module alias are settings
    cfg = configurator.configure(g, presets, ['--preset=demo', '--mask_type=random', '--MASK_RATIO=1', '--pretrained=x.pt'])
    assert cfg == {'EPOCHS': 3, 'MASK_RATIO': 1.0, 'MASK_TYPE': 'random', 'PRETRAINED': 'x.pt'}
    assert isinstance(g['MASK_RATIO'], float)
    with pytest.raises(configurator.BadInput, match='valid: EPOCHS'):
        configurator.configure(g, presets, ['--epoch=3'])
    with pytest.raises(configurator.BadInput, match='EPOCHS must be int'):
        configurator.configure(g, presets, ['--epochs=3.5'])
    with pytest.raises(configurator.BadInput, match='unknown preset'):
        configurator.configure(g, presets, ['--preset=paper'])


def test_split_batch_lowers_the_micro_batch_only_when_it_must(monkeypatch):
    # MICRO_BATCH is the most samples one process forwards at once: a share it does not divide is cut into the
    # largest micro-batches that do; only a TOTAL_BATCH that does not split over the processes stops.
    for world, total, micro, expected in ((1, 2048, 64, (1, 64, 32)), (8, 2048, 64, (8, 64, 4)),
                                          (2, 16, 16, (2, 8, 1)), (1, 10, 4, (1, 2, 5)), (8, 2048, 48, (8, 32, 8))):
        monkeypatch.setenv('WORLD_SIZE', str(world))
        assert configurator.split_batch(total, micro) == expected
    monkeypatch.setenv('WORLD_SIZE', '4')
    with pytest.raises(configurator.BadInput, match='TOTAL_BATCH=6 must be a positive multiple of the 4 processes'):
        configurator.split_batch(6, 4)
    with pytest.raises(configurator.BadInput, match='MICRO_BATCH=0 must be positive'):
        configurator.split_batch(8, 0)


def test_lr_schedule():
    assert training.lr_at(0, 100, 10, 1.0, 0.1) == 0.0
    assert training.lr_at(5, 100, 10, 1.0, 0.1) == pytest.approx(0.5)
    assert training.lr_at(10, 100, 10, 1.0, 0.1) == pytest.approx(1.0)
    assert training.lr_at(55, 100, 10, 1.0, 0.1) == pytest.approx(0.55)
    assert training.lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    # the official stage-2 LambdaLR: lr x max(0.01, ramp from 0 or cosine to 0)
    assert training.lr_at(0, 100, 10, 1.0, 0.01, clamp=True) == 0.01
    assert training.lr_at(5, 100, 10, 1.0, 0.01, clamp=True) == pytest.approx(0.5)
    assert training.lr_at(55, 100, 10, 1.0, 0.01, clamp=True) == pytest.approx(0.5)
    assert training.lr_at(99, 100, 10, 1.0, 0.01, clamp=True) == 0.01


def test_param_groups_no_decay_on_1d_and_bias():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    m.register_parameter('temp', torch.nn.Parameter(torch.tensor(0.07)))
    scale = lambda n: 0.5 if n.startswith('0.') else 1.0
    groups = training.adamw(m, 1e-3, 0.05, (0.9, 0.999), lr_scale=scale).param_groups
    decayed = {id(p) for g in groups if g['weight_decay'] > 0 for p in g['params']}
    assert decayed == {id(m[0].weight)}
    assert {(g['weight_decay'], g['lr_scale']) for g in groups} == {(0.05, 0.5), (0.0, 0.5), (0.0, 1.0)}


def test_atomic_checkpoint_survives_a_crash(tmp_path, monkeypatch):
    path = str(tmp_path / 'last.pt')
    training.save_checkpoint({'step': 1, 'w': torch.ones(3)}, path)

    def broken_save(obj, f):                          # dies half-way through writing
        open(f, 'wb').write(b'half a checkpoint')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(OSError):
        training.save_checkpoint({'step': 2}, path)
    assert training.read_checkpoint(path)['step'] == 1


def test_unreadable_checkpoints_say_what_to_do(tmp_path):
    training.save_checkpoint({'step': 1, 'w': torch.ones(1000)}, tmp_path / 'last.pt')
    whole = (tmp_path / 'last.pt').read_bytes()
    (tmp_path / 'truncated.pt').write_bytes(whole[:len(whole) // 2])
    (tmp_path / 'empty.pt').write_bytes(b'')
    for name in ('truncated.pt', 'empty.pt'):
        with pytest.raises(configurator.BadInput, match=f'{name} cannot be read .*truncated or corrupt'):
            training.read_checkpoint(str(tmp_path / name))
    torch.save({'model': {}, 'args': argparse.Namespace(lr=1e-3)}, tmp_path / 'official_trainer.pth')
    with pytest.raises(configurator.BadInput, match="pickled Python objects.*keep its weights"):
        training.read_checkpoint(str(tmp_path / 'official_trainer.pth'))


def test_layer_decay():
    scale = training.layer_decay(12, 0.75, prefix='backbone.')  # the paper's B/16
    assert scale('backbone.patch_embed.proj.weight') == pytest.approx(0.75 ** 13)   # layer 0
    assert scale('backbone.blocks.11.mlp.fc2.bias') == pytest.approx(0.75)          # block i = layer i + 1
    assert scale('backbone.blocks.1.attn.q_bias') == pytest.approx(0.75 ** 11)
    assert scale('head.weight') == scale('fc_norm.bias') == 1.0                     # after the blocks: full lr


def test_help_lists_the_constants_with_their_comments(tmp_path):
    script = tmp_path / 'script.py'
    script.write_text('"""A script.\n\n    python script.py --preset=demo\n"""\nimport sys\nfrom util import configurator\n'
                      'EPOCHS = 200                       # passes over the data (paper: 200)\n'
                      'MASK_RATIO = 0.8                   # fraction hidden\n'
                      '                                   # (paper: 0.8)\n'
                      "PRESETS = {'demo': {'EPOCHS': 3}}\n"
                      'configurator.configure(globals(), PRESETS, sys.argv[1:])\nopen("ran", "w")\n')
    out = subprocess.run([sys.executable, str(script), '--help'], cwd=tmp_path, capture_output=True, text=True,
                         env={'PYTHONPATH': str(training.__file__).rsplit('/', 1)[0]})
    assert out.returncode == 0, out.stderr
    assert 'python script.py --preset=demo' in out.stdout and 'demo: EPOCHS=3' in out.stdout
    assert 'EPOCHS = 200                       # passes over the data (paper: 200)' in out.stdout
    assert '# (paper: 0.8)' in out.stdout                       # a comment's continuation line too
    assert not (tmp_path / 'ran').exists()                     # --help does nothing else
    bad = subprocess.run([sys.executable, str(script), '--epochs=x'], cwd=tmp_path, capture_output=True, text=True,
                         env={'PYTHONPATH': str(training.__file__).rsplit('/', 1)[0]})
    assert bad.returncode == 1 and 'Traceback' not in bad.stderr and 'EPOCHS must be int' in bad.stderr


def test_out_dir_lock_blocks_a_live_run_but_not_a_dead_one(tmp_path):
    holder = training.lock_out_dir(str(tmp_path))
    code = 'import sys, training; training.lock_out_dir(sys.argv[1]); print("locked", flush=True)'
    env = {'PYTHONPATH': str(training.__file__).rsplit('/', 1)[0]}
    second = subprocess.run([sys.executable, '-c', code, str(tmp_path)], capture_output=True, text=True, env=env)
    assert second.returncode != 0 and 'in use by another run' in second.stderr and 'pid' in second.stderr
    holder.close()  # the run ends (a killed process releases its lock the same way: the kernel frees it)
    killed = subprocess.Popen([sys.executable, '-c', code + '; import time; time.sleep(60)', str(tmp_path)],
                              stdout=subprocess.PIPE, text=True, env=env)
    assert killed.stdout.readline().strip() == 'locked'
    killed.kill()
    killed.wait()
    assert (tmp_path / 'run.lock').exists()                    # the dead run's lock file is still there ...
    again = subprocess.run([sys.executable, '-c', code, str(tmp_path)], capture_output=True, text=True, env=env)
    assert again.returncode == 0 and again.stdout.strip() == 'locked'   # ... and blocks nothing
    (tmp_path / 'file').write_text('')
    with pytest.raises(configurator.BadInput, match='is a file'):
        training.lock_out_dir(str(tmp_path / 'file'))
