"""Guards training.py and checkpoints.py's file handling: overrides are type-checked, the schedule's end points,
no-decay groups and layer-wise decay, atomic checkpoints, and clear messages for checkpoints that cannot be read."""
import argparse

import pytest
import torch

import checkpoints
import training


def test_configure_presets_and_overrides():
    presets = {'demo': {'EPOCHS': 3, 'MASK_TYPE': 'tube'}}
    g = {'MASK_RATIO': 0.8, 'MASK_TYPE': 'semantic', 'EPOCHS': 201, 'PRETRAINED': None, 'lower': 1,
         'PRESETS': presets, 'F': torch.nn.functional}   # neither the presets nor a module alias are settings
    cfg = training.configure(g, presets, ['--preset=demo', '--mask_type=random', '--MASK_RATIO=1', '--pretrained=x.pt'])
    assert cfg == {'EPOCHS': 3, 'MASK_RATIO': 1.0, 'MASK_TYPE': 'random', 'PRETRAINED': 'x.pt'}
    assert isinstance(g['MASK_RATIO'], float)
    with pytest.raises(SystemExit, match='valid: EPOCHS'):
        training.configure(g, presets, ['--epoch=3'])
    with pytest.raises(SystemExit, match='EPOCHS must be int'):
        training.configure(g, presets, ['--epochs=3.5'])
    with pytest.raises(SystemExit, match='unknown preset'):
        training.configure(g, presets, ['--preset=paper'])


def test_lr_schedule():
    assert training.lr_at(0, 100, 10, 1.0, 0.1) == 0.0
    assert training.lr_at(5, 100, 10, 1.0, 0.1) == pytest.approx(0.5)
    assert training.lr_at(10, 100, 10, 1.0, 0.1) == pytest.approx(1.0)
    assert training.lr_at(55, 100, 10, 1.0, 0.1) == pytest.approx(0.55)
    assert training.lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


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
    checkpoints.save({'step': 1, 'w': torch.ones(3)}, path)

    def broken_save(obj, f):                          # dies half-way through writing
        open(f, 'wb').write(b'half a checkpoint')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(OSError):
        checkpoints.save({'step': 2}, path)
    assert checkpoints.read(path)['step'] == 1


def test_unreadable_checkpoints_say_what_to_do(tmp_path):
    checkpoints.save({'step': 1, 'w': torch.ones(1000)}, tmp_path / 'last.pt')
    whole = (tmp_path / 'last.pt').read_bytes()
    (tmp_path / 'truncated.pt').write_bytes(whole[:len(whole) // 2])
    (tmp_path / 'empty.pt').write_bytes(b'')
    for name in ('truncated.pt', 'empty.pt'):
        with pytest.raises(ValueError, match=f'{name} cannot be read .*truncated or corrupt'):
            checkpoints.read(str(tmp_path / name))
    torch.save({'model': {}, 'args': argparse.Namespace(lr=1e-3)}, tmp_path / 'official_trainer.pth')
    with pytest.raises(ValueError, match="pickled Python objects.*keep only its weights"):
        checkpoints.read(str(tmp_path / 'official_trainer.pth'))


def test_layer_decay():
    scale = training.layer_decay(12, 0.75, prefix='backbone.')  # the paper's B/16
    assert scale('backbone.patch_embed.proj.weight') == pytest.approx(0.75 ** 13)   # layer 0
    assert scale('backbone.blocks.11.mlp.fc2.bias') == pytest.approx(0.75)          # block i = layer i + 1
    assert scale('backbone.blocks.1.attn.q_bias') == pytest.approx(0.75 ** 11)
    assert scale('head.weight') == scale('fc_norm.bias') == 1.0                     # after the blocks: full lr
