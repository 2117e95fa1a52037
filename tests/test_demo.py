"""The demo set and what the demo is built to show: its labels and captions say what is drawn (and stay true under
the training flip); the demo CLIP learns the squares' colours from the captions; and the README's evaluation of a
representation (k-NN on the held-out videos, evaluate.py classify) tells that teacher from a random student."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

import data
import demo
import evaluate
import teacher as tm

ROOT = Path(__file__).resolve().parents[1]


def square_pixels(frame, rgb, tol=25):
    """uint8 [H, W, 3] -> (count, mean row) of the pixels within `tol` of the colour rgb."""
    close = np.linalg.norm(frame.astype(float) - np.array(rgb), axis=-1) < tol
    return int(close.sum()), np.nonzero(close)[0].mean() if close.any() else None


def digest(folder):
    return {'./' + os.path.relpath(os.path.join(d, f), folder): hashlib.sha256(open(os.path.join(d, f), 'rb').read())
            .hexdigest() for d, _, files in os.walk(folder) for f in files}


def listed_digests():
    """tests/demo_seed0.sha256: the SHA-256 of every file of make_demo(DIR, seed=0) (`cd DIR && sha256sum -c` reads
    it). Its first 256 lines were made on an Intel Xeon with AVX-512 and AMX, before the held-out set existed; the
    held-out lines (test.csv, test_color.csv, videos/test_*.mp4) were added from a set made by this code on another
    Intel Xeon with AVX-512, whose first 256 files matched those lines. A set made on any x86-64 CPU must match."""
    lines = open(ROOT / 'tests' / 'demo_seed0.sha256').read().splitlines()
    return {path: sha for sha, path in (line.split('  ', 1) for line in lines)}


def test_make_demo_writes_the_listed_bytes_on_every_cpu(demo_dir, tmp_path):
    # The set of this process, and one made in a fresh process with other thread counts (as another machine would
    # have), are the bytes of the list: videos (x264 without assembly), stills (JPEG), lists and JSON files.
    listed = listed_digests()
    for folder in (demo_dir, tmp_path / 'fresh'):
        if folder != demo_dir:
            env = {**os.environ, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}
            subprocess.run([sys.executable, '-c', f'import demo; demo.make_demo({str(folder)!r}, 0)'], env=env,
                           check=True, timeout=300, capture_output=True)
        made = digest(folder)
        assert set(made) == set(listed), sorted(set(made) ^ set(listed))[:5]
        differ = [path for path in listed if made[path] != listed[path]]
        assert not differ, f'{len(differ)} files differ from tests/demo_seed0.sha256, e.g. {differ[:5]}'
    classes = len(demo.DEMO_COLORS) * len(demo.DEMO_DIRECTIONS)
    for split, per_class in (('train', demo.DEMO_VIDEOS - demo.DEMO_VAL), ('val', demo.DEMO_VAL),
                             ('test', demo.DEMO_TEST)):
        for suffix in ('', '_color'):
            assert len(open(os.path.join(demo_dir, f'{split}{suffix}.csv')).readlines()) == classes * per_class
    few = open(os.path.join(demo_dir, 'train_few.csv')).readlines()        # the fine-tuning demo's labelled videos
    assert few == open(os.path.join(demo_dir, 'train.csv')).readlines()[:classes * demo.DEMO_FEW]
    assert sorted(int(line.split(',')[1]) for line in few) == sorted(list(range(classes)) * demo.DEMO_FEW)
    captions = json.load(open(os.path.join(demo_dir, 'captions_val.json')))
    assert len(captions) == classes == len({c['caption'] for c in captions})  # retrieval: one video per caption


class AlwaysFlip:
    def random(self):
        return 0.0


@pytest.mark.parametrize('split', ['train', 'val'])
def test_labels_and_captions_say_what_is_drawn_even_after_a_flip(demo_dir, split):
    classes = [line.split() for line in open(os.path.join(demo_dir, 'classes.txt'))]    # 'red square moving up'
    colors = list(demo.DEMO_COLORS)
    captions = {c['video']: c for c in json.load(open(os.path.join(demo_dir, f'captions_{split}.json')))}
    rows = [line.strip().split(',') for line in open(os.path.join(demo_dir, f'{split}.csv'))]
    color_rows = [line.strip().split(',') for line in open(os.path.join(demo_dir, f'{split}_color.csv'))]
    checked = 0
    for (path, label), (path2, color_label) in list(zip(rows, color_rows))[::5]:
        color, direction = classes[int(label)][0], classes[int(label)][-1]
        assert path == path2 and colors[int(color_label)] == color
        if path in captions:
            c = captions[path]
            assert c['caption'] == f'a {color} square moving {direction}'
            assert (c['color'], c['shape'], c['direction']) == (color, 'square', direction)
        frames = data.read_frames(os.path.join(demo_dir, path), [0, demo.DEMO_T - 1])   # uint8 [2, H, W, 3]
        flipped = data.augment(frames, demo.DEMO_SIZE, 'center', AlwaysFlip(), flip=True)[0].permute(1, 2, 3, 0)
        assert not torch.equal(flipped, torch.from_numpy(frames))                       # it did flip
        for clip in (frames, flipped.numpy()):
            (n0, y0), (n1, y1) = (square_pixels(f, demo.DEMO_COLORS[color]) for f in clip)
            assert min(n0, n1) > 0.6 * (2 * 12) ** 2                                   # the square, whole
            assert (y1 - y0) * (1 if direction == 'down' else -1) > 30                  # moving as the caption says
            others = [square_pixels(clip[0], demo.DEMO_COLORS[c])[0] for c in colors if c != color]
            assert max(others) < 0.6 * n0                                # the background has no square's worth
        checked += 1
    assert checked >= 10


@pytest.fixture(scope='module')
def demo_clip(demo_dir, tmp_path_factory):
    path = str(tmp_path_factory.mktemp('clip') / 'tiny_clip.pt')
    demo.train_demo_clip(path, steps=100)
    return path


def test_demo_clip_learns_the_colors(demo_dir, demo_clip, tmp_path):
    """The demo teacher (a tiny CLIP trained for 100 steps here) names the squares' colours; random weights do not."""
    items = data.read_annotations(f'{demo_dir}/captions_val.json', demo_dir, 'video')   # 12 videos, 12 captions
    frames = data.normalize(torch.stack([data.augment(data.read_frames(a.path, [8]), 64, 'center')[0] for a in items]))
    colors = [a.captions[0].split()[1] for a in items]
    names = list(demo.DEMO_COLORS)
    def color_accuracy(clip):
        t = tm.CLIPTeacher(clip, align_layers=1)
        images = frames[:, :, 0] * t.in_scale + t.in_shift  # ImageNet -> CLIP normalization, as encode
        txt = F.normalize(clip.encode_text(open_clip.tokenize([f'a {c} square' for c in names], 32)), dim=-1)
        with torch.no_grad():
            pred = (F.normalize(clip.encode_image(images), dim=-1) @ txt.t()).argmax(1)
        return sum(names[p] == c for p, c in zip(pred, colors)) / len(colors)
    assert color_accuracy(demo.tiny_clip(demo_clip)) >= 10 / 12
    assert color_accuracy(demo.tiny_clip(None)) <= 5 / 12
    with pytest.raises(ValueError, match="train_demo_clip"):
        demo.tiny_clip(str(tmp_path / 'missing.pt'))


def test_representation_eval_tells_the_teacher_from_a_random_student(demo_dir, demo_clip, tmp_path):
    """The README's k-NN on the squares' colour, small: 2 frames, one view. The teacher's pooled tokens find the
    colour; a random student's are mostly about the background."""
    lists = ['--train', f'{demo_dir}/train_color.csv', '--val', f'{demo_dir}/val_color.csv', '--root', demo_dir,
             '--frames', '2', '--clips', '1', '--crops', '1', '--device', 'cpu', '--workers', '0']
    ceiling = evaluate.main(['classify', '--teacher', 'tiny', '--pretrained', demo_clip, *lists])
    demo.random_student(str(tmp_path / 'random.pt'))
    floor = evaluate.main(['classify', '--ckpt', str(tmp_path / 'random.pt'), *lists])
    assert ceiling['knn']['top1'] >= floor['knn']['top1'] + 25, (ceiling, floor)
    assert floor['knn']['top1'] < 60 and ceiling['chance_top1'] == round(100 / 6, 2)
