"""Guards data.py: frame-accurate sparse decoding across containers/codecs/pixel formats, the official sampling
rules, one crop per clip in every augmentation, skip-and-replace of bad files with a loud threshold, the
resumable sampler (rank slices, resume, worker-count independence), the demo set and the --check tool."""
import json
import os
import re
import subprocess
import sys
import warnings
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

import data
import demo
from conftest import counting_video, frame_numbers
import training
from tools import prepare_data
from tools.prepare_data import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def moving_frames(n=40, h=48, w=64, seed=0):
    """A bright square crossing a noisy background: real motion, so codecs use inter / delta frames."""
    rng = np.random.default_rng(seed)
    bg = rng.integers(60, 120, (h, w, 3))
    out = np.empty((n, h, w, 3), np.uint8)
    for t in range(n):
        img = bg.copy()
        x = int(t * (w - 12) / (n - 1))
        img[10:22, x:x + 12] = (230, 50, 50)
        out[t] = np.clip(img + rng.integers(-3, 4, img.shape), 0, 255)
    return out


def write_with_pts(path, frames, pts_ms, codec='libx264'):
    """Encode with explicit timestamps in ms (variable frame rate / non-zero start time)."""
    tb = Fraction(1, 1000)
    with av.open(path, 'w') as c:
        s = c.add_stream(codec, rate=25, height=frames.shape[1], width=frames.shape[2])
        s.time_base = s.codec_context.time_base = tb
        for a, t in zip(frames, pts_ms):
            f = av.VideoFrame.from_ndarray(a, format='rgb24')
            f.pts, f.time_base = t, tb
            c.mux(s.encode(f))
        c.mux(s.encode())


def decode_all(path):
    with av.open(path) as c:
        return np.stack([f.to_ndarray(format='rgb24') for f in c.decode(video=0)])


# (file name, codec, pixel format, encoder options): B-frames, several keyframes, and every listed container
FORMATS = [
    ('h264_bframes.mp4', 'libx264', 'yuv420p', {'g': '12', 'bf': '3'}),
    ('vp9.webm', 'libvpx-vp9', 'yuv420p', {'g': '12', 'deadline': 'realtime', 'cpu-used': '8'}),
    ('mpeg4_bframes.avi', 'mpeg4', 'yuv420p', {'g': '3', 'bf': '2'}),  # avi seeks by decode time
    ('mjpeg.mov', 'mjpeg', 'yuvj420p', {}),
    ('h264.mkv', 'libx264', 'yuv420p', {'g': '12', 'bf': '3'}),
    ('anim.gif', 'gif', 'rgb8', {}),
    ('gray.mkv', 'ffv1', 'gray', {'g': '8'}),
    ('h264_10bit.mp4', 'libx264', 'yuv420p10le', {'g': '12'}),
    ('h264_444.mp4', 'libx264', 'yuv444p', {'g': '12'}),
]


@pytest.mark.parametrize('name,codec,pix_fmt,options', FORMATS, ids=[f[0] for f in FORMATS])
def test_read_frames_matches_sequential_decoding(tmp_path, name, codec, pix_fmt, options):
    if codec not in av.codecs_available:
        pytest.skip(f'encoder {codec} not in this PyAV build')
    path = str(tmp_path / name)
    data.write_video(path, moving_frames(), codec=codec, pix_fmt=pix_fmt, options=options)
    _check_accuracy(path)


def test_read_frames_vfr_and_start_time(tmp_path):
    frames = moving_frames(24)
    vfr = [0, 40, 50, 120, 130, 200, 400, 410, 420, 600] + [640 + 33 * k for k in range(14)]
    write_with_pts(str(tmp_path / 'vfr.mkv'), frames, vfr)
    write_with_pts(str(tmp_path / 'start.mp4'), frames, [5000 + 40 * k for k in range(24)])
    with av.open(str(tmp_path / 'start.mp4')) as c:
        assert c.streams.video[0].start_time > 0  # the case we want to cover
    for name in ('vfr.mkv', 'start.mp4'):
        _check_accuracy(str(tmp_path / name))


def _check_accuracy(path):
    ref = decode_all(path)
    n = len(ref)
    assert len(data.read_frames(path, np.arange)) == n      # indices from the true length
    rng = np.random.default_rng(0)
    cases = [[0], [n - 1], list(range(n)), [n + 5, 3, 3, 0]]  # edges, everything, past-the-end + repeats
    cases += [rng.integers(0, n, 8) for _ in range(6)]         # unsorted random sparse sets
    for k, idx in enumerate(cases):
        got = data.read_frames(path, idx, threads=1 + k % 2)
        np.testing.assert_array_equal(got, ref[np.minimum(idx, n - 1)], err_msg=f'{path} {idx}')
    got = data.read_frames(path, lambda m: data.sample_indices(m, 8, 'middle'))  # callable form
    np.testing.assert_array_equal(got, ref[data.sample_indices(n, 8, 'middle')])


def test_max_seconds_reads_only_the_start(tmp_path):  # the official DiDeMo protocol reads the first 30 s
    path = str(tmp_path / 'a.mp4')
    frames = moving_frames(40)
    data.write_video(path, frames, fps=25)                                   # 1.6 s
    got = data.read_frames(path, lambda n: np.arange(n), max_seconds=1.0)    # the frames of the first second
    np.testing.assert_array_equal(got, decode_all(path)[:25])

def test_still_images_are_one_frame_videos(tmp_path):
    img = moving_frames(2)[0]
    for name in ('a.png', 'a.jpg'):
        Image.fromarray(img).save(tmp_path / name)
        out = data.read_frames(str(tmp_path / name), [0, 0, 0])
        assert out.shape == (3, 48, 64, 3) and len(data.read_frames(str(tmp_path / name), np.arange)) == 1
    np.testing.assert_array_equal(data.read_frames(str(tmp_path / 'a.png'), [0])[0], img)  # png is lossless


# ------------------------------------------------------------------------------------------------------------
# Sampling

def test_sample_indices():
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = data.sample_indices(100, 8, 'tsn', rng)  # segments of 100 // 8 = 12 frames
        assert all(12 * i <= x < 12 * (i + 1) for i, x in enumerate(idx))
    short = data.sample_indices(5, 8, 'tsn', rng)  # shorter than num_frames: repeats, never fails
    assert len(short) == 8 and short.max() < 5 and np.all(np.diff(short) >= 0)
    assert data.sample_indices(100, 4, 'middle').tolist() == [12, 37, 62, 87]
    # fine-tuning test rule: seg = (n-1)/T, frame i of clip c at round(seg*i) + int(seg/(C+1)*(c+1))
    assert data.sample_indices(33, 4, 'test', clip=0, num_clips=1).tolist() == [4, 12, 20, 28]
    assert data.sample_indices(33, 4, 'test', clip=1, num_clips=3).tolist() == [4, 12, 20, 28]
    assert data.sample_indices(33, 4, 'test', clip=2, num_clips=3).tolist() == [6, 14, 22, 30]
    assert data.sample_indices(3, 8, 'test').max() <= 2
    with pytest.raises(ValueError):
        data.sample_indices(10, 4, 'bogus')

# The official samplers, written out from their formulas (loops, Python rounding), to compare against.
def official_sparse_range(n, T):  # kinetics_sparse.py, training: a frame in [round(seg i), round(seg (i+1))], clipped
    seg = (n - 1) / T
    return [(int(np.round(seg * i)), min(int(np.round(seg * (i + 1))), n - 1)) for i in range(T)]

def official_ssv2_test(n, T, clip):  # ssv2.py, 2 test clips: the segment starts, then the segment middles
    tick = n / T
    both = sorted([int(tick / 2.0 + tick * x) for x in range(T)] + [int(tick * x) for x in range(T)])
    return both[clip::2]

def official_segments(n, T):  # video_utils.py: min(T, n) intervals of linspace(0, n); the last index is exclusive
    k = min(T, n)
    cuts = np.linspace(start=0, stop=n, num=k + 1).astype(int)
    return [(cuts[i], cuts[i + 1] - 1) for i in range(k)]

@pytest.mark.parametrize('n, T', [(300, 8), (250, 16), (64, 8), (37, 4), (9, 8), (8, 8), (5, 8), (2, 4), (1, 4)])
def test_sampling_equals_the_official_samplers(n, T):
    rng = np.random.default_rng(n * 100 + T)
    ranges = official_sparse_range(n, T)
    draws = np.stack([data.sample_indices(n, T, 'sparse', rng) for _ in range(300)])   # [300, T]
    assert all(draws[:, i].min() == lo and draws[:, i].max() == hi for i, (lo, hi) in enumerate(ranges)), \
        'sparse: every frame of [round(seg i), round(seg (i+1))] is drawn, ends included, and nothing else'
    if n >= 2 * T:
        for clip in (0, 1):
            assert data.sample_indices(n, T, 'ssv2', clip=clip, num_clips=2).tolist() == official_ssv2_test(n, T, clip)
    segments = official_segments(n, T)
    middle = [(a + b) // 2 for a, b in segments]
    assert data.sample_indices(n, T, 'middle').tolist() == middle + [middle[-1]] * (T - len(segments))
    draws = np.stack([data.sample_indices(n, T, 'rand', rng) for _ in range(300)])     # [300, T]
    if all(b > a for a, b in segments):  # the official random choice from range(a, b): b itself is never drawn
        assert all(draws[:, i].min() == a and draws[:, i].max() == b - 1 for i, (a, b) in enumerate(segments))
    else:                                # an empty range: the official fallback, a sorted random draw
        assert all(np.all(np.diff(d[:len(segments)]) > 0) for d in draws) and draws.max() < n
    assert np.all(draws[:, len(segments):] == draws[:, len(segments) - 1:len(segments)])  # padded with the last

# ------------------------------------------------------------------------------------------------------------
# Augmentation

KINDS = [('multiscale', 1), ('rrc', 1), ('center', 1), ('center', 3), ('squash', 1)]


@pytest.mark.parametrize('kind,crops', KINDS)
def test_augment_one_crop_for_all_frames(kind, crops):
    frame = np.random.default_rng(1).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    clip = np.repeat(frame[None], 4, axis=0)  # identical frames in -> identical frames out
    for seed in range(8):
        views = data.augment(clip, 32, kind, np.random.default_rng(seed), flip=True, num_crops=crops)
        assert len(views) == crops
        for v in views:
            assert v.shape == (3, 4, 32, 32) and v.dtype == torch.uint8
            assert torch.equal(v[:, :1].expand_as(v), v)
        if crops == 3:  # three different positions along the long side
            assert not torch.equal(views[0], views[1]) and not torch.equal(views[1], views[2])


@pytest.mark.parametrize('kind', ['multiscale', 'rrc'])
def test_flip_is_a_mirror_of_the_same_crop(kind):
    clip = np.random.default_rng(2).integers(0, 256, (2, 64, 80, 3), dtype=np.uint8)
    flipped = 0
    for seed in range(12):
        a = data.augment(clip, 32, kind, np.random.default_rng(seed), flip=False)[0]
        b = data.augment(clip, 32, kind, np.random.default_rng(seed), flip=True)[0]
        assert torch.equal(b, a) or torch.equal(b, a.flip(-1))
        flipped += not torch.equal(b, a)
    assert 0 < flipped < 12  # a fair coin, not always / never


def test_normalization_and_boxes():
    gray = np.full((1, 40, 60, 3), 128, np.uint8)
    v = data.augment(gray, 16, 'center')[0]
    assert v.dtype == torch.uint8 and (v == 128).all()
    expected = (torch.tensor(128 / 255) - data.MEAN) / data.STD
    assert torch.allclose(data.normalize(v), expected.expand_as(v), atol=1e-5)
    rng = np.random.default_rng(0)
    allowed = {int(256 * s) for s in data.MS_SCALES} - {222} | {224}  # 222 is within 3 px of 224: snapped
    for _ in range(200):
        y, x, h, w = data.multiscale_box(256, 340, 224, rng)
        assert {h, w} <= allowed and y % ((256 - h) // 4 or 1) == 0 and x + w <= 340 and y + h <= 256
        order = sorted(allowed, reverse=True)
        assert abs(order.index(h) - order.index(w)) <= data.MS_MAX_DISTORT
        y, x, h, w = data.rrc_box(256, 340, rng)
        assert 0.49 <= h * w / (256 * 340) <= 1.0 and 0.74 <= w / h <= 1.35 and x + w <= 340 and y + h <= 256
    assert data.eval_boxes(50, 80, 3) == [(0, 0, 50, 50), (0, 15, 50, 50), (0, 30, 50, 50)]
    assert data.eval_boxes(80, 50, 1) == [(15, 0, 50, 50)]


# ------------------------------------------------------------------------------------------------------------
# Bad files

@pytest.fixture
def bad_folder(tmp_path):
    """4 good videos and one file of each bad kind, listed in list.txt (space separated)."""
    good = []
    for k in range(4):
        data.write_video(str(tmp_path / f'good{k}.mp4'), moving_frames(12, seed=k))
        good.append(f'good{k}.mp4')
    (tmp_path / 'empty.mp4').write_bytes(b'')
    (tmp_path / 'truncated.mp4').write_bytes((tmp_path / 'good0.mp4').read_bytes()[:2000])
    (tmp_path / 'random.mp4').write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / 'text.mp4').write_text('this is not a video\n' * 20)
    with av.open(str(tmp_path / 'audio.mp4'), 'w') as c:  # audio only
        s = c.add_stream('aac', rate=16000)
        for i in range(8):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format='fltp', layout='mono')
            f.sample_rate, f.pts = 16000, i * 1024
            c.mux(s.encode(f))
        c.mux(s.encode())
    bad = ['missing.mp4', 'empty.mp4', 'truncated.mp4', 'random.mp4', 'text.mp4', 'audio.mp4']
    names = good[:2] + bad + good[2:]
    (tmp_path / 'list.txt').write_text(''.join(f'{n} {k % 3}\n' for k, n in enumerate(names)))
    return tmp_path, good, bad, names


def test_bad_files_are_replaced_and_counted(bad_folder):
    folder, good, bad, names = bad_folder
    ds = data.VideoClassification(str(folder / 'list.txt'), str(folder), num_frames=4, size=32,
                                  max_bad_fraction=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        items = [ds[(i, 100 + i)] for i in range(len(ds))] + [ds[(i, 200 + i)] for i in range(len(ds))]
    for it in items:
        assert os.path.basename(ds.paths[it['index']]) in good and torch.isfinite(it['video']).all()
        assert it['video'].shape == (3, 4, 32, 32)
    assert sum(it['skipped'] for it in items) == ds.num_bad >= 2 * len(bad)  # every bad hit counted exactly
    assert sorted(os.path.basename(p) for p in ds.bad_files) == sorted(bad)
    assert len(caught) == len(bad)  # one warning per file, however often it is hit
    for i, name in enumerate(names):  # good items come back unchanged, bad ones are replaced
        assert (items[i]['skipped'] == 0) == (name in good)


def test_bad_fraction_threshold_raises_with_examples(bad_folder):
    folder, _, bad, _ = bad_folder
    ds = data.VideoClassification(str(folder / 'list.txt'), str(folder), num_frames=4, size=32,
                                  max_bad_fraction=0.05)
    with pytest.raises(RuntimeError, match='max_bad_fraction') as err, warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for k in range(100):
            ds[(k % len(ds), k)]
    assert ds.attempts >= data.MIN_ATTEMPTS  # not judged on too few samples
    assert sum(name in str(err.value) for name in bad) >= 1


def test_check_separates_good_and_bad(bad_folder):
    folder, good, bad, _ = bad_folder
    lst = str(folder / 'list.txt')
    out = subprocess.run([sys.executable, '-m', 'tools.check_data', lst, '--root', str(folder)], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    assert '4 good, 6 bad' in out.stdout
    assert [line.split()[0] for line in open(lst + '.clean')] == good
    bad_lines = open(lst + '.bad').read().splitlines()
    assert sorted(os.path.basename(line.split('\t')[0]) for line in bad_lines) == sorted(bad)
    assert all(len(line.split('\t')[1]) > 0 for line in bad_lines)  # every bad entry has a reason


# ------------------------------------------------------------------------------------------------------------
# Sampler and determinism

def test_resumable_sampler():
    full = list(training.ResumableSampler(10, seed=3))
    assert full == list(training.ResumableSampler(10, seed=3)) and sorted(i for i, _ in full) == list(range(10))
    s = training.ResumableSampler(10, seed=3)
    s.set_epoch(1)
    assert [i for i, _ in s] != [i for i, _ in full]  # a new order every epoch
    for world, drop_last in [(3, True), (3, False), (4, False)]:
        ranks = [list(training.ResumableSampler(10, seed=3, rank=r, world_size=world, drop_last=drop_last))
                 for r in range(world)]
        assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == len(training.ResumableSampler(
            10, rank=0, world_size=world, drop_last=drop_last))
        flat = [ranks[p % world][p // world] for p in range(world * len(ranks[0]))]
        if drop_last:  # disjoint slices of one global permutation, the same (index, seed) per position
            assert flat == full[:9] and len({i for i, _ in flat}) == 9
        else:          # padded with the first indices to a multiple of world_size
            assert flat[:10] == full and {i for i, _ in flat} == set(range(10))
    s = training.ResumableSampler(10, seed=3, rank=1, world_size=2)
    whole = list(s)
    s.set_start(3)
    assert list(s) == whole[3:]  # skips exactly, without touching the skipped items
    assert list(s) == whole      # one-shot: the next epoch starts from 0 again


def test_items_reproducible_and_independent_of_workers(demo_dir):
    ds = data.VideoClassification(os.path.join(demo_dir, 'train.csv'), demo_dir, num_frames=4, size=32)
    classes = len(demo.DEMO_COLORS) * len(demo.DEMO_DIRECTIONS)
    assert ds.num_classes == classes and len(ds) == classes * (demo.DEMO_VIDEOS - demo.DEMO_VAL)
    a, b = ds[(5, 123)], ds[(5, 123)]
    assert torch.equal(a['video'], b['video']) and not torch.equal(a['video'], ds[(5, 124)]['video'])
    assert torch.equal(ds[7]['video'], ds[7]['video'])  # int key: seed derived from the index
    batches = {}
    for workers in (0, 2):
        loader, sampler = training.make_loader(ds, 4, True, 0, 0, 1, workers, start=8)
        sampler.set_epoch(2)
        batches[workers] = [batch for _, batch in zip(range(3), loader)]
    for x, y in zip(batches[0], batches[2]):
        assert torch.equal(x['video'], y['video']) and torch.equal(x['index'], y['index'])
    loader, sampler = training.make_loader(ds, 4, True, 0, 0, 1, 0)
    sampler.set_epoch(2)
    first = [batch for _, batch in zip(range(3), loader)]
    assert torch.equal(first[2]['video'], batches[0][0]['video'])  # start=8 resumes at batch 2 exactly


def test_classification_eval_views(demo_dir):
    val = os.path.join(demo_dir, 'val.csv')
    item = data.VideoClassification(val, demo_dir, num_frames=4, size=32, mode='test', num_clips=2,
                                    num_crops=3)[0]
    assert item['video'].shape == (6, 3, 4, 32, 32) and item['label'] == 0
    assert data.VideoClassification(val, demo_dir, num_frames=4, size=32, mode='val')[0]['video'].shape == \
        (3, 4, 32, 32)


def test_pre_text_cleans_captions_as_the_official_code():
    assert data.pre_text('A Man, riding a bike!') == 'a man riding a bike'                  # lower case, , and ! go
    assert data.pre_text('It\'s (really) "good"? #1 *ok*: yes; no~') == 'its really good 1 ok yes no'
    assert data.pre_text('a two-year-old and/or a cat.') == 'a two year old and or a cat'  # - and / become spaces
    assert data.pre_text('  <person> waves \n  at <person>  ') == 'person waves at person'
    assert data.pre_text('keep <b> & 5% + [x]') == 'keep <b> & 5% + [x]'                   # nothing else changes

def test_video_text(demo_dir, tmp_path):
    ann = os.path.join(demo_dir, 'captions_train.json')
    ds = data.VideoText(ann, demo_dir, num_frames=4, size=32)
    item = ds[(3, 0)]
    assert item['video'].shape == (3, 4, 32, 32) and item['caption'] in ds.items[3].captions
    assert item['index'] == 3 and item['skipped'] == 0
    images = data.VideoText(os.path.join(demo_dir, 'captions_images.json'), demo_dir, size=32, media='image')
    assert len(images) == len(demo.DEMO_COLORS) and images[0]['video'].shape == (3, 1, 32, 32)
    assert len(data.VideoText(ann, demo_dir, media='image')) == 0
    # JSONL of the same objects, with a caption list: the same items; eval mode uses the first caption
    objs = json.load(open(ann))
    objs[0]['caption'] = [objs[0]['caption'], 'another caption']
    (tmp_path / 'a.jsonl').write_text(''.join(json.dumps(o) + '\n' for o in objs))
    ev = data.VideoText(str(tmp_path / 'a.jsonl'), demo_dir, num_frames=4, size=32, mode='eval')
    assert len(ev) == len(ds) and ev.items[0].captions == [objs[0]['caption'][0], 'another caption']
    assert ev[0]['caption'] == objs[0]['caption'][0] and torch.equal(ev[0]['video'], ev[(0, 9)]['video'])
    paragraphs = data.VideoText(str(tmp_path / 'a.jsonl'), demo_dir, mode='eval', paragraph=True)  # DiDeMo, ANet
    assert paragraphs.items[0].captions == [objs[0]['caption'][0] + ' another caption']



def official_paragraph(captions):
    """The official rule (multi_modality/dataset: preprocess_para_retrieval_data joins a video's raw captions with
    spaces, then pre_text cleans the whole paragraph), written out here as the test's reference."""
    text = re.sub(r'([,.\'!?"()*#:;~])', '', ' '.join(captions).lower()).replace('-', ' ').replace('/', ' ')
    return re.sub(r'\s{2,}', ' ', text.replace('<person>', 'person')).rstrip('\n').strip(' ')


def test_a_blank_sentence_in_a_paragraph_is_dropped(tmp_path):
    sentences = ['A man walks in.', ' \n ', 'He sits-down, <person> waves!', '']
    (tmp_path / 'p.json').write_text(json.dumps([{'video': 'v12.mp4', 'caption': sentences},
                                                 {'video': 'v13.mp4', 'caption': ['   ', 'x']}]))
    items = data.VideoText(str(tmp_path / 'p.json'), mode='eval', paragraph=True).items
    assert items[0].captions == [official_paragraph(sentences)] == ['a man walks in he sits down person waves']
    assert items[1].captions == ['x']
    (tmp_path / 'blank.json').write_text(json.dumps([{'video': 'v12.mp4', 'caption': [' ', '\n']}]))
    with pytest.raises(ValueError, match=r'blank\.json entry #0: "caption" must be a non-empty text'):
        data.VideoText(str(tmp_path / 'blank.json'), mode='eval', paragraph=True)


def test_bad_entries_of_a_training_file_are_skipped_and_counted(demo_dir, tmp_path):
    # A training file skips a bad entry as a bad video is skipped, and stops past MAX_BAD_FRACTION; an evaluation
    # file stops at the first (a skipped entry would change the metric). Every message names tools.check_data.
    objs = json.load(open(os.path.join(demo_dir, 'captions_train.json')))[:40]
    objs[3] = {'video': objs[3]['video']}                          # no caption
    objs[7] = {'caption': 'a red square'}                          # no path
    (tmp_path / 'ann.json').write_text(json.dumps(objs))
    with pytest.warns(UserWarning, match=r'skipped 2 of 40 entries of .*ann\.json, e\.g\. .*entry #3: "caption"'
                                         r'.*tools\.check_data .*ann\.json'):
        train = data.VideoText(str(tmp_path / 'ann.json'), demo_dir, mode='train', max_bad_fraction=0.05)
    assert len(train) == 38 and [a.path for a in train.items] == [data.parse_annotation(o, demo_dir).path
                                                                   for i, o in enumerate(objs) if i not in (3, 7)]
    with pytest.raises(ValueError, match=r'2 of 40 entries .* are bad \(more than MAX_BAD_FRACTION=0\.04\)'
                                                r'.*tools\.check_data'):
        data.VideoText(str(tmp_path / 'ann.json'), demo_dir, mode='train', max_bad_fraction=0.04)
    with pytest.raises(ValueError, match=r'ann\.json entry #3: "caption" must be.*tools\.check_data'):
        data.VideoText(str(tmp_path / 'ann.json'), demo_dir, mode='eval')
    lines = open(os.path.join(demo_dir, 'train.csv')).readlines()[:40]
    lines[5] = lines[5].split(',')[0] + '\n'                       # no label
    (tmp_path / 'list.csv').write_text(''.join(lines))
    with pytest.warns(UserWarning, match=r'list\.csv line 6: no label column'):
        assert len(data.VideoClassification(str(tmp_path / 'list.csv'), demo_dir, mode='train')) == 39
    with pytest.raises(ValueError, match=r'list\.csv line 6: no label column.*tools\.check_data'):
        data.VideoClassification(str(tmp_path / 'list.csv'), demo_dir, mode='val')

# ------------------------------------------------------------------------------------------------------------
# Preparing videos for fast decoding

def test_prepare_keeps_the_frames_reports_failures_and_resumes(demo_dir, tmp_path):
    lines = open(os.path.join(demo_dir, 'train.csv')).readlines()[::64] + ['videos/missing.mp4,0\n']
    (tmp_path / 'list.csv').write_text(''.join(lines))                       # 3 demo videos and a missing one
    new, failed = prepare(str(tmp_path / 'list.csv'), demo_dir, str(tmp_path / 'out'), workers=2)
    assert list(failed) == [os.path.join(demo_dir, 'videos/missing.mp4')]    # reported, not fatal, left out
    assert open(new).read() == ''.join(lines[:3])                            # same relative paths, now in out/
    for line in lines[:3]:
        rel = line.split(',')[0]
        src, dst = os.path.join(demo_dir, rel), str(tmp_path / 'out' / rel)
        assert len(decode_all(dst)) == len(decode_all(src)) == 16       # every frame kept, in order
        ours, ref = data.read_frames(dst, np.arange(16)).astype(int), data.read_frames(src, np.arange(16)).astype(int)
        dist = np.abs(ours[:, None] - ref[None]).mean(axis=(2, 3, 4))       # [16, 16] frame-to-frame distances
        assert (dist.argmin(1) == np.arange(16)).all() and dist.diagonal().max() < 4  # frame i is frame i, up to
        #                                                                      re-encoding loss (crf 26: ~2 / 255)
        with av.open(dst) as c:                                              # a keyframe every 8 frames, no B-frames
            keys = [p.is_keyframe for p in c.demux(video=0) if p.size]
        assert keys == [k % prepare_data.KEYINT == 0 for k in range(16)] and prepare_data.KEYINT == 8
    stamp = os.path.getmtime(tmp_path / 'out' / lines[0].split(',')[0])
    prepare(str(tmp_path / 'list.csv'), demo_dir, str(tmp_path / 'out'), workers=1)  # a second run ...
    assert os.path.getmtime(tmp_path / 'out' / lines[0].split(',')[0]) == stamp           # ... skips finished files
    ann = [{'video': lines[0].split(',')[0], 'caption': 'a'}, {'image': 'images/red.jpg', 'caption': 'b'}]
    (tmp_path / 'ann.json').write_text(json.dumps(ann))
    new, _ = prepare(str(tmp_path / 'ann.json'), demo_dir, str(tmp_path / 'out'), workers=1)
    assert json.load(open(new)) == [ann[0], {'image': os.path.join(demo_dir, 'images/red.jpg'), 'caption': 'b'}]


def test_ssv2_validation_takes_the_segment_middles(tmp_path):
    """The official ssv2.py validation: tick = n / T, frame int(tick / 2 + tick i); at n = 10, T = 4: 1, 3, 6, 8 (the
    segment starts 0, 2, 5, 7 are its first test clip). Kinetics validation is unchanged: round(seg i) +
    int(seg / 2)."""
    counting_video(tmp_path / 'v.mp4', 10, 10, band=8, height=80)                   # square: the crop keeps it all
    (tmp_path / 'list.csv').write_text('v.mp4,0\n')
    val = lambda sampler: frame_numbers(data.VideoClassification(                   # 80 -> 40 px: bands of 4
        str(tmp_path / 'list.csv'), str(tmp_path), 4, 40, mode='val', sampler=sampler)[0]['video'].permute(1, 2, 3, 0),
        band=4)
    assert data.sample_indices(10, 4, 'ssv2', clip=0, num_clips=2).tolist() == [0, 2, 5, 7]
    assert val('ssv2') == [1, 3, 6, 8]
    assert val('kinetics') == data.sample_indices(10, 4, 'test').tolist() == [1, 3, 5, 8]


@pytest.mark.parametrize('fps, kept', [(Fraction(30000, 1001), 899), (25, 750), (30, 900)])
def test_the_first_30_seconds_are_int_30_fps_frames(tmp_path, fps, kept):
    """The official DiDeMo reading (trimmed30) keeps int(30 x fps) frames: 899 at 29.97 fps, where the frames whose
    time is under 30 s would be 900."""
    path = str(tmp_path / 'long.mp4')
    frames = np.zeros((int(31 * fps), 16, 16, 3), dtype=np.uint8)
    data.write_video(path, frames, fps=fps, options={'preset': 'ultrafast'})
    assert len(data.read_frames(path, lambda n: np.arange(n), max_seconds=30)) == kept
