"""--help on every script and subcommand: it prints the commands of the docstring and, for the
scripts configured by constants, every constant with its default and comment and the presets; it
exits 0 and writes no file."""
import importlib
import os
import runpy
import sys
from pathlib import Path

import pytest

import evaluate

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ['train_stage1.py', 'train_stage2.py', 'tasks.finetune', 'tasks.finetune_qa',
           'tasks.finetune_ava', 'tools.bench']
TOOLS = {'demo': [[], ['set'], ['random-student']],
         'tasks.video_qa': [[], ['demo'], ['mc'], ['qa']], 'tasks.ava': [[], ['demo'], ['map']],
         'tools.check_data': [[]], 'tools.prepare_data': [[]],
         'evaluate': [[], ['retrieval'], ['classify'], ['features'], ['show-mask']]}


@pytest.mark.parametrize('entry', SCRIPTS)
def test_scripts(entry, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'argv', [entry, '--help'])
    with pytest.raises(SystemExit) as e:
        if entry.endswith('.py'):
            runpy.run_path(str(ROOT / entry), run_name='__main__')
        else:
            runpy.run_module(entry, run_name='__main__')
    out = capsys.readouterr().out
    assert e.value.code == 0 and os.listdir(tmp_path) == []
    assert 'python' in out.split('Constants')[0]  # the docstring's commands
    # a constant with its comment
    assert 'DEVICE = ' in out and '# ' in out.split('DEVICE = ')[1].splitlines()[0]
    assert 'Presets (--preset=NAME):' in out and ('demo: ' in out or 'tiny: ' in out)


@pytest.mark.parametrize('entry, argv', [(m, a) for m, calls in TOOLS.items() for a in calls])
def test_tools_and_subcommands(entry, argv, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    main = evaluate.main if entry == 'evaluate' else importlib.import_module(entry).main
    with pytest.raises(SystemExit) as e:
        main(argv + ['--help'])
    assert e.value.code == 0 and os.listdir(tmp_path) == [] and 'usage:' in capsys.readouterr().out


MODULES = ['data', 'model', 'masking', 'teacher', 'training', 'video_language', 'util.configurator',
           'util.checkpoints', 'util.evaluation', 'util.bert', 'util.wordpiece', 'tasks.augment']


@pytest.mark.parametrize('module', MODULES)
def test_modules_run_as_scripts_say_what_they_hold(module, monkeypatch, tmp_path, capsys):
    """`python data.py` (a newcomer's first try) prints the module's docstring, exits 0, writes
    nothing."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'argv', [module, '--help'])
    runpy.run_path(str(ROOT / (module.replace('.', '/') + '.py')), run_name='__main__')
    out = capsys.readouterr().out
    assert out.strip() == importlib.import_module(module).__doc__.strip() and len(out) > 100
    assert os.listdir(tmp_path) == []
