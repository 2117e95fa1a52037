"""Guards common.py: overrides are type-checked, the schedule's end points, no-decay groups, atomic checkpoints."""
import random

import numpy as np
import pytest
import torch

import common


def test_configure_presets_and_overrides():
    presets = {'demo': {'EPOCHS': 3, 'MASK_TYPE': 'tube'}}
    g = {'MASK_RATIO': 0.8, 'MASK_TYPE': 'semantic', 'EPOCHS': 201, 'PRETRAINED': None, 'lower': 1,
         'PRESETS': presets, 'F': torch.nn.functional}   # neither the presets nor a module alias are settings
    cfg = common.configure(g, presets, ['--preset=demo', '--mask_type=random', '--MASK_RATIO=1', '--pretrained=x.pt'])
    assert cfg == {'EPOCHS': 3, 'MASK_RATIO': 1.0, 'MASK_TYPE': 'random', 'PRETRAINED': 'x.pt'}
    assert isinstance(g['MASK_RATIO'], float)
    with pytest.raises(SystemExit, match='valid: EPOCHS'):
        common.configure(g, presets, ['--epoch=3'])
    with pytest.raises(SystemExit, match='EPOCHS must be int'):
        common.configure(g, presets, ['--epochs=3.5'])
    with pytest.raises(SystemExit, match='unknown preset'):
        common.configure(g, presets, ['--preset=paper'])


def test_lr_schedule():
    assert common.lr_at(0, 100, 10, 1.0, 0.1) == 0.0
    assert common.lr_at(5, 100, 10, 1.0, 0.1) == pytest.approx(0.5)
    assert common.lr_at(10, 100, 10, 1.0, 0.1) == pytest.approx(1.0)
    assert common.lr_at(55, 100, 10, 1.0, 0.1) == pytest.approx(0.55)
    assert common.lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


def test_param_groups_no_decay_on_1d_and_bias():
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    m.register_parameter('temp', torch.nn.Parameter(torch.tensor(0.07)))
    groups = common.param_groups(m, 0.05, lr_scale=lambda n: 0.5 if n.startswith('0.') else 1.0)
    decayed = {id(p) for g in groups if g['weight_decay'] > 0 for p in g['params']}
    assert decayed == {id(m[0].weight)}
    assert {(g['weight_decay'], g['lr_scale']) for g in groups} == {(0.05, 0.5), (0.0, 0.5), (0.0, 1.0)}


def test_atomic_checkpoint_survives_a_crash(tmp_path, monkeypatch):
    path = str(tmp_path / 'last.pt')
    common.save_checkpoint({'step': 1, 'w': torch.ones(3)}, path)

    def broken_save(obj, f):                          # dies half-way through writing
        open(f, 'wb').write(b'half a checkpoint')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(OSError):
        common.save_checkpoint({'step': 2}, path)
    assert common.load_checkpoint(path)['step'] == 1


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    common.save_checkpoint(common.rng_state(), tmp_path / 'rng.pt')
    first = (torch.rand(3), np.random.rand(3), random.random())
    common.set_rng_state(common.load_checkpoint(tmp_path / 'rng.pt'))
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]
