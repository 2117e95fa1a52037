"""Bad input from a user, entry point by entry point: each row must end the command with a short
message that names the input (configurator.BadInput, which the entry points print without a traceback),
or give the right result; nothing the command did not write is ever overwritten. Rows run in this
process (no start-up cost); test_the_message_is_all checks once, in a fresh process, that the user
sees the message and no traceback."""
import dataclasses
import importlib
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from util import configurator
from tasks import ava
from model import VideoViT, get_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def files(demo_dir, tmp_path_factory):
    """Good files (a 4-video list, captions, a tiny stage-1 checkpoint) and bad ones, named by what
    is wrong."""
    t = tmp_path_factory.mktemp('bad')
    lines = open(os.path.join(demo_dir, 'train.csv')).readlines()[:4]
    (t / 'good.csv').write_text(''.join(lines))
    vit = VideoViT(get_config('tiny'))
    torch.save({'model': vit.state_dict(), 'model_config': dataclasses.asdict(vit.config)},
               t / 'stage1.pt')
    bad = {'empty.csv': '', 'nolabel.csv': 'videos/a.mp4\n', 'negative.csv': 'videos/a.mp4,-1\n',
           'invalid.json': '[{"video": "a.mp4", "caption": ', 'empty.json': '',
           'shape.json': '{"a": 1}\n', 'nocaption.json': '[{"video": "a.mp4"}]',
           'intcaption.json': '[{"video": "a.mp4", "caption": 3}]',
           'novideo.json': '[{"caption": "a dog"}]', 'list.pt': '',
           'header.csv': 'video,ts,x1,y1,x2,y2,a,s\n',
           'det6.csv': 'v,0902,0.1,0.1,0.5,0.5\n', 'det7.csv': 'v,0902,0.1,0.1,0.5,0.5,1\n',
           'nan.csv': 'v,0902,0.1,0.1,0.5,0.5,1,nan\n', 'gt.csv': 'v,0902,0.1,0.1,0.5,0.5,1,0\n',
           'other_ids.csv': 'v,0902,0.1,0.1,0.5,0.5,7,0\n', 'map.json': '{"1": "walk"}',
           'map.pbtxt': 'label {\n  name: "walk"\n  label_id: 1\n}\n', 'ex_bad.csv': 'v\n',
           'mc_empty.json': '[{"video": "a.mp4", "caption": ["", " "], "answer": 0}]',
           'mc_true.json': '[{"video": "a.mp4", "caption": ["a", "b"], "answer": true}]',
           'answers_empty.json': '[]',
           'qa.json': '[{"video": "videos/red_up_00.mp4", "question": "what color", '
                      '"answer": "red"}]',
           'a.json': '["red"]'}
    for name, text in bad.items():
        (t / name).write_text(text)
    (t / 'latin1.csv').write_bytes('vid\xe9o.mp4,0\n'.encode('latin-1'))
    (t / 'zero.mp4').write_bytes(b'')
    (t / 'folder.csv').mkdir()
    torch.save(torch.zeros(3), t / 'tensor.pt')
    torch.save([1, 2], t / 'list.pt')
    torch.save({'step': 3}, t / 'noweights.pt')
    (t / 'stage2_out').mkdir()  # a stage-2 run's last.pt where stage 1 is pointed
    torch.save({'model': {}, 'model_config': {}, 'text_config': {}, 'optimizer': {}, 'step': 1,
                'config': {}}, t / 'stage2_out' / 'last.pt')
    (t / 'stage1_out').mkdir()                                   # a stage-1 run of another student
    torch.save({'model': vit.state_dict(), 'model_config': dataclasses.asdict(vit.config),
                'optimizer': {}, 'step': 1, 'config': {}}, t / 'stage1_out' / 'last.pt')
    (t / 'a_file').write_text('')
    return t, demo_dir


def stops(run, *message):
    """run() must raise BadInput whose message matches every regex of `message`."""
    with pytest.raises(configurator.BadInput) as e:
        run()
    for m in message:
        assert __import__('re').search(m, str(e.value)), (m, str(e.value))


def script(path_or_module, argv, monkeypatch):
    """A training script in this process, as `python SCRIPT ARGV` (or `python -m MODULE ARGV`); a
    command-line tool (a module with main(argv)) through its main."""
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(k, raising=False)
    argv = [str(a) for a in argv]
    if path_or_module in TOOLS:
        return lambda: importlib.import_module(path_or_module).main(argv)
    monkeypatch.setattr(sys, 'argv', [str(path_or_module), *argv])
    if str(path_or_module).endswith('.py'):
        return lambda: runpy.run_path(str(path_or_module), run_name='__main__')
    return lambda: runpy.run_module(path_or_module, run_name='__main__')


TOOLS = ('demo', 'tasks.video_qa', 'tasks.ava', 'tools.check_data', 'tools.prepare_data')


STAGE1 = [  # (arguments, the message), after --preset=demo --teacher_pretrained=None --device=cpu
    (['--data_list={t}/empty.csv'], [r'empty\.csv.* is empty']),
    (['--data_list={t}/nolabel.csv'], [r'nolabel\.csv line 1: no label column']),
    (['--data_list={t}/negative.csv'], [r'negative\.csv line 1: label .-1. is not a class number']),
    (['--data_list={t}/folder.csv'], [r'DATA_LIST .*folder\.csv. is a folder']),
    (['--data_list={t}/latin1.csv'], [r'latin1\.csv.* is not UTF-8']),
    (['--data_list={t}/good.csv', '--epochs=0'], [r'EPOCHS=0 must be positive']),
    (['--data_list={t}/good.csv', '--micro_batch=0'], [r'MICRO_BATCH=0']),
    (['--data_list={t}/good.csv', '--total_batch=-4'],
     [r'TOTAL_BATCH=-4 must be a positive multiple']),
    (['--data_list={t}/good.csv', '--out_dir={t}/a_file'], [r'a_file.* is a file']),
    (['--data_list={t}/good.csv', '--out_dir={t}/stage2_out', '--total_batch=4', '--micro_batch=4'],
     [r'stage2_out/last\.pt was written by another script']),
    (['--data_list={t}/good.csv', '--out_dir={t}/stage1_out', '--total_batch=4', '--micro_batch=4',
      '--align_layers=1'], [r'stage1_out/last\.pt holds another student.*pass another --out_dir']),
    (['--data_list={t}/good.csv', '--help=1'], [r'unknown setting .HELP.']),
]


@pytest.mark.parametrize('args, message', STAGE1, ids=[a[-1][:30] for a, _ in STAGE1])
def test_train_stage1(files, args, message, monkeypatch, tmp_path):
    t, demo = files
    argv = ['--preset=demo', '--teacher_pretrained=None', '--device=cpu', f'--data_root={demo}',
            f'--out_dir={tmp_path / "out"}'] + [a.format(t=t) for a in args]
    stops(script(ROOT / 'train_stage1.py', argv, monkeypatch), *message)


STAGE2 = [
    (['--video_ann={t}/invalid.json'], [r'invalid\.json is not JSON \(line 1']),
    (['--video_ann={t}/empty.json'], [r'empty\.json.* is empty']),
    (['--video_ann={t}/shape.json'], [r'shape\.json entry #0: no "video" or "image" path']),
    (['--video_ann={t}/nocaption.json'], [r'nocaption\.json entry #0: "caption" must be']),
    (['--video_ann={t}/intcaption.json'], [r'intcaption\.json entry #0: "caption" must be']),
    (['--video_ann={t}/novideo.json'], [r'novideo\.json entry #0: no "video"']),
    (['--init={t}/folder.csv'], [r'INIT .*folder\.csv. not found']),
    (['--init={t}/missing.pt'], [r'INIT .*missing\.pt. not found']),
    (['--init={t}/tensor.pt'], [r'tensor\.pt holds a Tensor, not a dict']),
    (['--init={t}/list.pt'], [r'list\.pt holds a list']),
    (['--init={t}/noweights.pt'], [r'noweights\.pt holds no video encoder weights']),
    (['--epochs=0'], [r'EPOCHS=0 must be positive']),
]


@pytest.mark.parametrize('args, message', STAGE2, ids=[a[-1][:30] for a, _ in STAGE2])
def test_train_stage2(files, args, message, monkeypatch, tmp_path):
    t, demo = files
    argv = ['--preset=demo', '--teacher_pretrained=None', '--device=cpu', f'--video_root={demo}',
            '--image_ann=', '--val_ann=', f'--init={t}/stage1.pt',
            f'--video_ann={demo}/captions_train.json', f'--out_dir={tmp_path / "out"}']
    argv += [a.format(t=t) for a in args]
    stops(script(ROOT / 'train_stage2.py', argv, monkeypatch), *message)


TASKS = [  # (module, arguments, the message)
    ('tasks.finetune', ['--epochs=0'], [r'EPOCHS=0 must be positive']),
    ('tasks.finetune', ['--train_list={t}/negative.csv'], [r'negative\.csv line 1']),
    ('tasks.finetune', ['--head_rows="names:{t}/good.csv"'], [r"'names:' takes two files"]),
    ('tasks.finetune', ['--init={t}/noweights.pt'],
     [r'noweights\.pt holds no video encoder weights']),
    ('tasks.finetune_qa', ['--answer_list={t}/answers_empty.json'],
     [r'answers_empty\.json must be a non-empty']),
    ('tasks.finetune_qa', ['--train_ann={t}/invalid.json'], [r'invalid\.json is not JSON']),
    ('tasks.finetune_ava', ['--exclusions={t}/ex_bad.csv'],
     [r'ex_bad\.csv line 1: .v. is not video_id, timestamp']),
    ('tasks.finetune_ava', ['--detections={t}/det6.csv'], [r'det6\.csv line 1: .* \(6 columns\)']),
    ('tasks.finetune_ava', ['--labelmap={t}/map.json'],
     [r'map\.json has no .name: "\.\.\.". \+ .id: N.']),
]


@pytest.mark.parametrize('module, args, message', TASKS,
                         ids=[f'{m}:{a[-1][:25]}' for m, a, _ in TASKS])
def test_tasks(files, module, args, message, monkeypatch, tmp_path):
    t, demo = files
    # what tasks.finetune_qa reads must be checked before it needs a stage-2 model
    stage2 = tmp_path / 's2.pt'
    base = {'tasks.finetune': ['--preset=demo', f'--init={t}/stage1.pt', f'--data_root={demo}',
                               f'--train_list={demo}/train_few.csv', f'--val_list={demo}/val.csv'],
            'tasks.finetune_qa': ['--preset=demo', f'--init={stage2}', '--make_demo=False',
                                  f'--data_root={demo}', f'--train_ann={t}/qa.json',
                                  f'--test_ann={t}/qa.json', f'--answer_list={t}/a.json'],
            'tasks.finetune_ava': ['--preset=demo', f'--init={t}/stage1.pt', '--make_demo=False',
                                   f'--train_csv={t}/gt.csv', f'--val_csv={t}/gt.csv',
                                   f'--detections={t}/gt.csv', f'--labelmap={t}/map.pbtxt',
                                   f'--exclusions={t}/gt.csv', f'--movie_root={t}'],
            }[module]
    stage2.write_text('')
    argv = base + ['--device=cpu', f'--out_dir={tmp_path / "out"}'] + [a.format(t=t) for a in args]
    stops(script(module, argv, monkeypatch), *message)


def command_rows(t, demo):
    """(command, arguments, the message) of the evaluation commands: evaluate.py, python -m
    tasks.video_qa (mc) and python -m tasks.ava (map)."""
    video = os.path.join(demo, open(os.path.join(demo, 'val.csv')).readline().split(',')[0])
    ava = ['map', '--labelmap', f'{t}/map.pbtxt', '--groundtruth', f'{t}/gt.csv', '--detections']
    stage1, new = f'{t}/stage1.pt', f'{t}/new.pt'
    return [
        ('evaluate', ['features', '--ckpt', stage1, video, '--out', stage1],
         [r'stage1\.pt exists']),
        ('evaluate', ['features', '--ckpt', stage1, video, '--out', f'{t}/no/such/dir/f.pt'],
         [r'does not exist']),
        ('evaluate', ['features', '--ckpt', f'{t}/folder.csv', video, '--out', new],
         [r'folder\.csv. is a folder']),
        ('evaluate', ['features', '--ckpt', f'{t}/tensor.pt', video, '--out', new],
         [r'holds a Tensor']),
        ('evaluate', ['features', '--ckpt', stage1, video, '--text', 'a dog', '--out', new],
         [r'--text needs a stage-2 checkpoint']),
        ('evaluate', ['features', '--ckpt', 'hf://OpenGVLab', video, '--out', new],
         [r'--ckpt hf://OpenGVLab: a Hugging Face file is hf://OWNER/REPO/FILE']),
        ('evaluate', ['classify', '--ckpt', stage1, '--train', f'{t}/good.csv', '--val',
                      f'{t}/good.csv', '--clips', '0'], [r'--clips 0: pass a positive number']),
        ('evaluate', ['classify', '--ckpt', stage1, '--train', f'{t}/empty.csv', '--val',
                      f'{t}/good.csv'], [r'empty\.csv.* is empty']),
        ('evaluate', ['retrieval', '--ckpt', stage1, '--ann', f'{demo}/captions_val.json'],
         [r'stage1\.pt holds a vit: this needs a stage-2 checkpoint']),
        ('evaluate', ['show-mask', f'{t}/zero.mp4', '--teacher', 'tiny', '--out', f'{t}/m.png'],
         [r'zero\.mp4 cannot be read']),
        ('evaluate', ['show-mask', video, '--teacher', 'tiny', '--mask_ratio', '1.0', '--out',
                      f'{t}/m.png'], [r'--mask_ratio 1\.0 must lie strictly between 0 and 1']),
        ('tasks.video_qa', ['mc', '--ckpt', stage1, '--ann', f'{t}/mc_empty.json'],
         [r'mc_empty\.json: entry #0']),
        ('tasks.video_qa', ['mc', '--ckpt', stage1, '--ann', f'{t}/mc_true.json'],
         [r'mc_true\.json: entry #0']),
        ('tasks.video_qa', ['mc', '--ckpt', stage1, '--ann', f'{t}/mc_true.json', '--out', stage1],
         [r'stage1\.pt exists']),
        ('tasks.video_qa', ['qa', '--ckpt', stage1, '--ann', f'{t}/qa.json', '--answer_list',
                            f'{t}/answers_empty.json'],
         [r'answers_empty\.json must be a non-empty']),
        ('tasks.video_qa', ['qa', '--ckpt', stage1, '--ann', f'{t}/qa.json', '--answer_list',
                            f'{t}/a.json', '--root', demo],
         [r'stage1\.pt holds a vit, not a video QA model']),
        ('tasks.ava', ['map', '--labelmap', f'{t}/map.json', '--groundtruth', f'{t}/gt.csv',
                       '--detections', f'{t}/gt.csv'], [r'map\.json has no']),
        ('tasks.ava', ava + [f'{t}/det6.csv'], [r'det6\.csv line 1: .*\(6 columns\)']),
        ('tasks.ava', ava + [f'{t}/det7.csv'], [r'det7\.csv line 1: .*\(7 columns\)']),
        ('tasks.ava', ava + [f'{t}/header.csv'], [r'header\.csv line 1']),
        ('tasks.ava', ava + [f'{t}/nan.csv'], [r'nan\.csv line 1: .*not finite']),
        ('tasks.ava', ava + [f'{t}/missing.csv'], [r'missing\.csv. not found']),
        ('tasks.ava', ['map', '--labelmap', f'{t}/map.pbtxt', '--groundtruth', f'{t}/other_ids.csv',
                       '--detections', f'{t}/other_ids.csv'],
         [r'no class of .*map\.pbtxt has a ground-truth row']),
    ]


def test_evaluation_commands(files, capsys):
    t, demo = files
    for command, argv, message in command_rows(t, demo):
        stops(lambda: importlib.import_module(command).main(argv), *message)
    assert torch.load(t / 'stage1.pt', weights_only=True)['model']            # never written over
    # exclusions and detections that match nothing are counted and said, not silently dropped
    (t / 'ex.csv').write_text('w,0902\n')
    (t / 'det.csv').write_text('v,0902,0.1,0.1,0.5,0.5,1,0.9\nu,0903,0.1,0.1,0.5,0.5,1,0.9\n')
    out = ava.main(['map', '--labelmap', f'{t}/map.pbtxt', '--groundtruth', f'{t}/gt.csv',
                    '--detections', f'{t}/det.csv', '--exclusions', f'{t}/ex.csv'])
    assert out['mAP'] == 100
    assert out['unmatched']['detection rows on keyframes without ground truth'] == 1
    assert out['unmatched']['excluded keyframes of videos not in the ground truth'] == 1
    assert '1 excluded keyframes of videos not in the ground truth' in capsys.readouterr().out


def test_tools_and_demo(files, monkeypatch, tmp_path):
    t, demo = files
    (tmp_path / 'mine').mkdir()
    (tmp_path / 'mine' / 'train.csv').write_text('my own list\n')          # a folder of the user's
    stops(script('demo', ['set', tmp_path / 'mine'], monkeypatch),
          r'mine holds files that the demo did not')
    assert (tmp_path / 'mine' / 'train.csv').read_text() == 'my own list\n'
    stops(script('demo', ['random-student', t / 'stage1.pt'], monkeypatch), r'stage1\.pt exists')
    stops(script('tasks.video_qa', ['demo', tmp_path / 'mine'], monkeypatch),
          r'captions_train\.json. not found')
    stops(script('tasks.ava', ['demo', tmp_path / 'mine'], monkeypatch),
          r'mine holds files that the AVA demo did not')
    stops(script('tools.bench', ['--stage=3'], monkeypatch), r'STAGE=3 must be 1')
    stops(script('tools.bench', ['--steps=0'], monkeypatch), r'STEPS=0 must be positive')
    stops(script('tools.bench', ['--table1=4,4'], monkeypatch), r'TABLE1=\(4, 4\): give two different')
    stops(script('tools.check_data', [t / 'folder.csv'], monkeypatch), r'folder\.csv. is a folder')
    prepare = [t / 'good.csv', '--root', demo, '--out', tmp_path / 'mine']
    stops(script('tools.prepare_data', prepare, monkeypatch),
          r'holds files that this tool did not write')
    for entry in ('demo', 'tasks.video_qa', 'tasks.ava', 'tools.check_data', 'tools.prepare_data'):
        with pytest.raises(SystemExit) as e:  # no argument: the usage, nothing else
            script(entry, [], monkeypatch)()
        assert e.value.code == 2


def test_check_data_sorts_out_bad_entries(files, monkeypatch, capsys):
    t, demo = files
    good = {'video': 'videos/red_up_00.mp4', 'caption': 'a red square'}
    no_caption = {'video': 'videos/red_up_01.mp4'}
    (t / 'mixed.json').write_text(json.dumps([good, no_caption]))
    script('tools.check_data', [t / 'mixed.json', '--root', demo], monkeypatch)()
    assert json.load(open(t / 'mixed.json.clean')) == [good]
    assert '"caption" must be' in open(t / 'mixed.json.bad').read()
    stops(script('tools.check_data', [t / 'mixed.json', '--root', demo], monkeypatch),
          r'mixed\.json\.clean .*exists')


def test_prepare_writes_only_under_out(files, monkeypatch, tmp_path):
    """Absolute paths in the list: the videos go under --out, keeping their folders; the sources
    are untouched."""
    t, demo = files
    src = os.path.join(demo, 'videos', 'red_up_00.mp4')
    before = (os.path.getmtime(src), open(src, 'rb').read())
    (tmp_path / 'abs.csv').write_text(f'{src},0\n')
    argv = [tmp_path / 'abs.csv', '--out', tmp_path / 'prep', '--workers', 1]
    script('tools.prepare_data', argv, monkeypatch)()
    new = (tmp_path / 'prep' / 'abs.csv').read_text()
    assert new == f'{src.lstrip(os.sep)},0\n' and (tmp_path / 'prep' / src.lstrip(os.sep)).exists()
    assert (os.path.getmtime(src), open(src, 'rb').read()) == before


def test_the_message_is_all(files, tmp_path):
    """In a fresh process, as a user sees it: the message on stderr, exit code 1, no traceback."""
    t, _ = files
    out = subprocess.run([sys.executable, 'evaluate.py', 'features', '--ckpt', str(t / 'tensor.pt'),
                          'a.mp4', '--out', str(tmp_path / 'f.pt')], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 1 and 'Traceback' not in out.stderr
    assert out.stderr.strip().startswith('evaluate.py: ')
    assert 'tensor.pt holds a Tensor' in out.stderr


def test_demo_numbers_checks_its_arguments_before_any_run(tmp_path, capsys, monkeypatch):
    """A wrong section or a missing document stops at once, before hours of runs, creating nothing."""
    from tools import demo_numbers

    def too_late(work):
        raise AssertionError('a section ran before the arguments were checked')
    monkeypatch.setattr(demo_numbers, 'SECTIONS', dict.fromkeys(demo_numbers.SECTIONS, too_late))
    for argv, message in ((['--check', str(tmp_path / 'nosuch.md')], 'no file .*nosuch.md'),
                          (['--only', 'stage'], "unknown section.*stage; valid: stage1")):
        with pytest.raises(SystemExit) as e:
            demo_numbers.main(['--work', str(tmp_path / 'work'), *argv])
        assert e.value.code == 2 and re.search(message, capsys.readouterr().err)
    assert os.listdir(tmp_path) == []
