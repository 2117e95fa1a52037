"""Guards AVA localization (tasks/ava.py, tasks/finetune_ava.py, `python -m tasks.ava map`):
frame-mAP against a hand-computed case, the official clip frames, the RoI head's pixels -> tokens
mapping (one token, a padded batch, the resized position table), box jitter and extension, bad
input (boxes outside the frame, unknown actions, missing movies, timestamps beyond a movie, too
many boxes, malformed lines), and a tiny run of the script that is killed, resumed and must match
an uninterrupted one."""
import copy
import dataclasses
import gc
import os
import runpy
import sys
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import faults
import tasks.ava as ava
import training
from util import configurator
from model import VideoViT, get_config
from conftest import counting_video, frame_numbers, log_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = 'tasks.finetune_ava'

def detector(aligned=True, **kw):
    torch.manual_seed(0)
    vit = VideoViT(get_config('tiny', align_layers=0, **kw))
    return ava.ActionDetector(vit, 3, aligned=aligned).eval()

# ----------------------------------------------------------------------------------------------
# Frame-mAP

GT = """v1,0902,0.1,0.1,0.4,0.5,1,0
v1,0902,0.5,0.5,0.9,0.9,1,1
v2,0902,0.2,0.2,0.6,0.6,1,0
v2,0902,1.2,0.2,1.5,0.6,1,5
v1,0903,0.1,0.1,0.4,0.5,1,0
v1,0902,0.0,0.0,0.4,0.4,2,2
v2,0902,0.5,0.5,1.0,1.0,2,1
v1,0902,0.1,0.1,0.4,0.5,3,0
"""
DETECTIONS = """v1,0902,0.1,0.1,0.4,0.5,1,0.9
v1,0902,0.12,0.1,0.42,0.5,1,0.8
v2,0902,0.2,0.2,0.6,0.6,1,0.7
v1,0903,0.1,0.1,0.4,0.5,1,0.6
v2,903,0.2,0.2,0.6,0.6,1,0.5
v1,0902,0.0,0.0,0.4,0.18,2,0.95
v2,0902,0.5,0.5,1.0,1.0,2,0.85
v1,0902,0.0,0.0,0.4,0.4,2,0.3
v1,0902,0.1,0.1,0.4,0.5,3,0.9
v1,0902,0.1,0.1,0.4,0.5,4,0.5
"""
LABELMAP = ('item {\n  name: "a"\n  id: 1\n}\nlabel { name: "b" label_id: 2 }\n'
            'item {\n  name: "c"\n  id: 4\n}\n')

def test_frame_map_equals_hand_computed_ap(tmp_path):
    """Class 1: 3 ground-truth boxes (one on an excluded keyframe does not count, one outside the
    frame is skipped). Detections, best first: hit, duplicate of that hit (IoU 0.875: a false
    positive), hit, on the excluded keyframe (ignored), on a keyframe without ground truth (false);
    one box is never found. Precision 1, 1/2, 2/3, 1/2 at recall 1/3, 1/3, 2/3, 2/3: the envelope
    gives AP = 1/3 x 1 + 1/3 x 2/3 = 5/9. Class 2: IoU 0.45 (a miss at 0.5), hit, hit: precision 0,
    1/2, 2/3 -> envelope 2/3 up to recall 1: AP = 2/3. Class 3 (not in the label map, perfect) and
    class 4 (in the map, no ground truth) stay out of the mean: mAP = (5/9 + 2/3) / 2."""
    for name, text in (('gt.csv', GT), ('det.csv', DETECTIONS), ('map.pbtxt', LABELMAP),
                       ('ex.csv', 'v1,0903\n')):
        (tmp_path / name).write_text(text)
    gt, skipped = ava.read_csv(tmp_path / 'gt.csv')
    assert skipped == 1 and len(gt) == 7
    dets, _ = ava.read_csv(tmp_path / 'det.csv', with_score=True)
    assert ava.read_labelmap(tmp_path / 'map.pbtxt') == {1: 'a', 2: 'b', 4: 'c'}
    mean, aps = ava.frame_map(gt, dets, {1: 'a', 2: 'b', 4: 'c'}, {('v1', 903)})
    assert aps[1] == pytest.approx(5 / 9, abs=5e-4) and aps[2] == pytest.approx(2 / 3, abs=5e-4)
    assert np.isnan(aps[4]) and 3 not in aps
    assert mean == pytest.approx((5 / 9 + 2 / 3) / 2, abs=5e-4)
    out = ava.main(['map', '--labelmap', str(tmp_path / 'map.pbtxt'), '--groundtruth',
                    str(tmp_path / 'gt.csv'), '--detections', str(tmp_path / 'det.csv'),
                    '--exclusions', str(tmp_path / 'ex.csv')])
    assert out['mAP'] / 100 == pytest.approx((5 / 9 + 2 / 3) / 2, abs=5e-4)
    assert out['classes_scored'] == 2
    # without the exclusions keyframe v1,0903 counts: 4 boxes of class 1, the one there found at
    # score 0.6, so precision 1, 1/2, 2/3, 3/4, 3/5 at recall 1/4, 1/4, 1/2, 3/4, 3/4; the envelope
    # lifts recall 1/2 to 3/4
    _, aps_all = ava.frame_map(gt, dets, {1: 'a', 2: 'b'})
    assert aps_all[1] == pytest.approx(1 / 4 + 1 / 4 * 3 / 4 + 1 / 4 * 3 / 4, abs=5e-4)

# ----------------------------------------------------------------------------------------------
# The RoI head

def test_a_box_on_one_token_picks_that_token():
    feat = torch.rand(2, 96, 8, 8, generator=torch.Generator().manual_seed(0))
    feat[1, :, 3, 5] += 2  # token (y 3, x 5) of clip 1 beats its neighbours
    box = torch.tensor([[1.0, 5 * 8, 3 * 8, 6 * 8, 4 * 8]])  # its 8 x 8 pixels
    assert torch.allclose(detector().pool(feat, box), feat[1:2, :, 3, 5], atol=1e-6)
    # the official aligned=False mixes in the next tokens for that box, and picks the token for the
    # box moved half a patch up and left
    official = detector(aligned=False)
    assert not torch.allclose(official.pool(feat, box), feat[1:2, :, 3, 5], atol=1e-3)
    pooled = official.pool(feat, box - torch.tensor([0.0, 4, 4, 4, 4]))
    assert torch.allclose(pooled, feat[1:2, :, 3, 5], atol=1e-6)

def test_pixel_boxes_of_a_padded_batch():
    """Two test clips of different sizes, each with a bright 8 x 8 square at a known place and its
    box: padding (bottom and right) keeps the pixel coordinates, and each box reads its own clip."""
    items = []
    for i, ((H, W), (x, y)) in enumerate((((24, 40), (24, 8)), ((40, 24), (8, 24)))):
        video = torch.zeros(3, 2, H, W)
        video[:, :, y:y + 8, x:x + 8] = 1
        boxes = torch.zeros(3, 4)
        boxes[0] = torch.tensor([x, y, x + 8, y + 8])
        items.append({'video': video, 'boxes': boxes, 'source': boxes / 40,
                      'labels': torch.zeros(3, 2), 'scores': torch.zeros(3), 'num_boxes': 1,
                      'index': i, 'skipped': 0})
    batch = ava.collate(items, 8)
    assert batch['video'].shape == (2, 3, 2, 40, 40)
    rois, labels, valid = ava.rois(batch)
    assert rois[:, 0].tolist() == [0, 1] and labels.shape == (2, 2) and valid.sum() == 2
    # [2, 3, 5, 5]: each token = the mean of its pixels
    feat = F.avg_pool2d(batch['video'].mean(2), 8)
    assert torch.allclose(detector().pool(feat, rois), torch.ones(2, 3), atol=1e-6)
    swapped = rois.clone()
    swapped[:, 0] = 1 - swapped[:, 0]  # each box on the other clip: only dark tokens there
    assert torch.allclose(detector().pool(feat, swapped), torch.zeros(2, 3))

def test_features_match_the_backbone_and_resize_the_position_table():
    torch.manual_seed(0)
    vit = VideoViT(get_config('tiny', align_layers=0, num_frames=4))
    ref, det = copy.deepcopy(vit).eval(), ava.ActionDetector(vit, 3).eval()
    video = torch.randn(2, 3, 4, 64, 64)
    # at the training grid: the backbone's own forward (its final norm = the new one, LN(1, 0))
    with torch.no_grad():
        want = ref(video)[0].view(2, 4, 8, 8, 96).mean(1).permute(0, 3, 1, 2)
        assert torch.allclose(det.features(video), want, atol=1e-5)
        # a wider clip: the table is resized per frame, not read further along (which would shift
        # every row)
        assert det.features(torch.randn(1, 3, 4, 64, 112)).shape == (1, 96, 8, 14)
        box = torch.tensor([[0.0, 1, 2, 30, 40]])
        assert det(torch.randn(1, 3, 4, 64, 112), box).shape == (1, 3)
    with pytest.raises(ValueError, match='built for 4'):
        det.features(torch.randn(1, 3, 8, 64, 64))

# ----------------------------------------------------------------------------------------------
# Boxes

def test_jitter_and_extend_stay_inside_the_image():
    rng = np.random.default_rng(0)
    W, H = 64, 48
    corners = rng.uniform([-10, -10, 0, 0], [W, H, W + 10, H + 10], (400, 4))
    corners = np.concatenate([corners[:, :2], corners[:, :2] + np.abs(corners[:, 2:])], 1)
    boxes = ava.clip_boxes(corners, W, H)
    # the edges too
    boxes = np.concatenate([boxes, [[0, 0, W, H], [W - 1, H - 1, W, H], [0, 0, 1, 1]]])
    for _ in range(20):
        j = ava.jitter_boxes(boxes, W, H, rng)
        assert (j[:, :2] >= 0).all() and (j[:, 2] <= W).all() and (j[:, 3] <= H).all()
        assert (j[:, 2:] - j[:, :2] >= 1 - 1e-9).all()
    inner = np.array([[20.0, 10, 40, 30]])  # far from the edges
    moved = np.concatenate([ava.jitter_boxes(inner, W, H, rng) for _ in range(500)]) - inner
    # x1: 20% out, 10% in of w = 20
    assert moved[:, 0].min() >= -4 - 1e-9 and moved[:, 0].max() <= 2 + 1e-9
    # y2: 5% in, 10% out of h = 20
    assert moved[:, 3].min() >= -1 - 1e-9 and moved[:, 3].max() <= 2 + 1e-9
    # +10% width, +5% height
    assert np.allclose(ava.extend_boxes(inner, W, H), [[19, 9.5, 41, 30.5]])
    assert np.allclose(ava.extend_boxes(np.array([[0.0, 0, 64, 48]]), W, H), [[0, 0, 64, 48]])

# ----------------------------------------------------------------------------------------------
# Bad input

def test_bad_input_is_skipped_counted_or_refused(tmp_path):
    os.makedirs(tmp_path / 'movies')
    frames = np.random.default_rng(0).integers(0, 255, (10, 32, 48, 3), dtype=np.uint8)
    data.write_video(str(tmp_path / 'movies' / 'm1.mp4'), frames, fps=10)  # 1 s of movie second 900
    (tmp_path / 'gt.csv').write_text('m1,0900,0.1,0.1,0.5,0.5,1,0\n'
                                     'm1,0900,1.3,0.1,1.6,0.5,1,1\n'  # outside the frame: skipped
                                     'm1,0900,0.5,0.5,0.4,0.6,2,2\n'  # empty (x2 < x1): skipped
                                     'm1,0905,0.1,0.1,0.5,0.5,1,0\n'  # beyond the 1-second movie
                                     'm2,0900,0.1,0.1,0.5,0.5,1,0\n')       # no such movie
    rows, skipped = ava.read_csv(tmp_path / 'gt.csv')
    assert len(rows) == 3 and skipped == 2
    kw = dict(num_classes=3, num_frames=2, stride=0.1, short_side=32, crop=32)
    train = ava.Keyframes(rows, str(tmp_path / 'movies'), 'train', **kw)
    assert train.missing == ['m2'] and train.keys == [('m1', 900), ('m1', 905)]
    with pytest.raises(ValueError, match='timestamp 905 is frame 50, outside the 10 frames'):
        train.load(1, np.random.default_rng(0))
    with pytest.warns(UserWarning, match='timestamp 905'):
        item = train[1]  # replaced by a readable keyframe, counted
    assert item['index'] == 0 and item['skipped'] >= 1 and train.num_bad >= 1
    assert item['num_boxes'] <= 1
    message = r'action id 7 \(video m1, timestamp 900\) is outside 1 .. 3'
    with pytest.raises(configurator.BadInput, match=message):
        ava.Keyframes([rows[0]._replace(action=7)], str(tmp_path / 'movies'), 'train', **kw)
    crowded = ava.Keyframes([rows[0], rows[0]._replace(box=(0.6, 0.6, 0.9, 0.9))],
                            str(tmp_path / 'movies'), 'train', **kw, max_boxes=1)
    with pytest.raises(ValueError, match='more than max_boxes=1'):
        crowded.load(0, np.random.default_rng(0))
    (tmp_path / 'bad.csv').write_text('m1,0900,0.1,0.1,0.5,0.5,1,0\nm1,09x0,0.1,0.1,0.5,0.5,1,0\n')
    with pytest.raises(configurator.BadInput, match='bad.csv line 2'):
        ava.read_csv(tmp_path / 'bad.csv')
    # the test: an unreadable keyframe gets no detections (not those of its replacement) and is
    # reported
    test = ava.Keyframes(rows, str(tmp_path / 'movies'), 'test', **kw)
    with pytest.warns(UserWarning):
        unread = ava.write_detections(detector(num_frames=2, img_size=32), test,
                                      str(tmp_path / 'det.csv'), 'cpu', 4, 0, nullcontext())
    assert unread == [('m1', 905)]
    lines = open(tmp_path / 'det.csv').read().splitlines()
    assert [line.split(',')[:2] + line.split(',')[6:7] for line in lines] \
        == [['m1', '0900', str(c)] for c in (1, 2, 3)]

# ----------------------------------------------------------------------------------------------
# The script

@pytest.fixture(scope='module')
def small_run(tmp_path_factory):
    """The demo set with 8 training and 2 test movies, and a random tiny stage-1 checkpoint."""
    tmp = tmp_path_factory.mktemp('ava')
    ava.make_demo(str(tmp / 'set'), train_movies=8, val_movies=2)
    torch.manual_seed(0)
    vit = VideoViT(get_config('tiny'))
    torch.save({'model': vit.state_dict(), 'model_config': dataclasses.asdict(vit.config)},
               tmp / 'stage1.pt')
    s = tmp / 'set'
    return tmp, ['--preset=demo', f'--init={tmp / "stage1.pt"}', f'--movie_root={s / "movies"}',
                 f'--train_csv={s / "train.csv"}', f'--val_csv={s / "val.csv"}',
                 f'--detections={s / "val_detections.csv"}',
                 f'--labelmap={s / "labelmap.pbtxt"}', f'--exclusions={s / "val_excluded.csv"}',
                 '--make_demo=False', '--num_frames=2', '--short_side=32', '--crop=32',
                 '--total_batch=8', '--micro_batch=4', '--epochs=2', '--eval_epochs=1',
                 '--drop_path=0.1', '--log_interval=1', '--device=cpu']

def run(args, monkeypatch, kill_after=0):
    """tasks/finetune_ava.py in this process (the imports are paid once), stopped after step
    kill_after if given."""
    monkeypatch.delenv('RANK', raising=False)
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    # tests/faults.py
    monkeypatch.setattr(training, 'lr_at', faults.hooks(kill_after=kill_after)[0])
    monkeypatch.setattr(sys, 'argv', [MODULE, *args])
    try:
        with pytest.raises(SystemExit) if kill_after else nullcontext():
            runpy.run_module(MODULE, run_name='__main__')
    finally:
        # the run's globals (its OUT_DIR lock among them) go, as they would with its process
        gc.collect()


def test_bad_constants_fail_fast(small_run, monkeypatch):
    tmp, args = small_run
    for bad, message in (('--crop=48', 'need CROP=48 <= SHORT_SIDE=32'),
                         ('--init=missing.pt', "INIT 'missing.pt' not found"),
                         ('--labelmap=missing.pbtxt', "LABELMAP 'missing.pbtxt' not found"),
                         ('--num_classes=1', r'action id 2 .* is outside 1 .. 1')):
        with pytest.raises(configurator.BadInput, match=message):
            run(args + [bad, f'--out_dir={tmp / "bad"}'], monkeypatch)

def test_resume_is_exact_and_the_reported_map_is_the_files(small_run, monkeypatch, capsys):
    """16 training keyframes = 2 steps of 8 per epoch, 2 accumulation steps each; frame-mAP after
    epoch 1 and at the end. Killed after step 3 and resumed, the run must log exactly what an
    uninterrupted one does."""
    tmp, args = small_run
    run(args + [f'--out_dir={tmp / "a"}'], monkeypatch)
    run(args + [f'--out_dir={tmp / "b"}', '--ckpt_interval=1'], monkeypatch, kill_after=3)
    assert not any('val_mAP' in x and x['step'] == 4 for x in log_records(tmp / 'b'))
    capsys.readouterr()
    run(args + [f'--out_dir={tmp / "b"}'], monkeypatch)
    assert 'resumed from' in capsys.readouterr().out
    a, b = log_records(tmp / 'a'), log_records(tmp / 'b')
    assert [x['step'] for x in a if 'loss' in x] == [1, 2, 3, 4]
    assert [x['step'] for x in a if 'val_mAP' in x] == [2, 4]
    # losses, lr, grad norms, box counts, mAP: exact
    assert a == b and a[-2]['loss'] > 0 and a[-2]['boxes'] > 0
    s = tmp / 'set'
    out = ava.main(['map', '--labelmap', str(s / 'labelmap.pbtxt'), '--groundtruth',
                    str(s / 'val.csv'), '--detections', str(tmp / 'b' / a[-1]['detections']),
                    '--exclusions', str(s / 'val_excluded.csv')])
    assert out['mAP'] == a[-1]['val_mAP'] and 0 < out['mAP'] <= 100


# the official clip, frame by frame
@pytest.mark.parametrize('fps, frames', [(25, [-29, -21, -13, -5, 3, 11, 19, 27]),
                                         # the same times at 30 fps
                                         (30, [-35, -25, -16, -6, 4, 13, 23, 32])])
def test_clip_frames_are_the_officials(tmp_path, fps, frames):
    """The official code cuts 8 frames out of a 300-frame span of its 25 fps clips, keyframe at
    150: TemporalCrop(8, 8, sparse) starts at (300 - 64) // 2 + (8 - 1) // 2 = 121 = 29 frames
    before the keyframe, then every 8th (-29 ... +27: one frame early of centred). At another frame
    rate the same times, t x fps rounded."""
    # 4 s: movie seconds 900 - 904
    movie = counting_video(tmp_path / 'movies' / 'm.mp4', 4 * fps, fps)
    keyframes = ava.Keyframes([ava.Row('m', 902, (0.1, 0.1, 0.5, 0.5), 1, 1.0)],
                              os.path.dirname(movie), 'train', num_classes=1, num_frames=8,
                              stride=0.32, movie_start=900)
    # around frame 2 x fps = second 902
    assert [n - 2 * fps for n in frame_numbers(keyframes.frames(0))] == frames
    assert np.allclose(ava.clip_times(8, 0.32) * 25, [-29, -21, -13, -5, 3, 11, 19, 27])
