"""Guards fine-tuning: layer-wise lr decay (training.py), mixup / cutmix targets, RandAugment and
random erasing (tasks/augment.py), multi-view averaging (util/evaluation.py), the classifier from
the official fine-tuned layout and from our own stage-1 / stage-2 checkpoints (util/checkpoints.py),
and tasks/finetune.py itself: bad constants, NaN skips, exact resume of a short run (with the whole
augmentation recipe on) and 2 processes = 1."""
import dataclasses
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
from tasks import augment
import faults
import training
from util import configurator
import util.evaluation
from util import checkpoints
from model import VideoClassifier, VideoViT, get_config, sincos_table
from conftest import log_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = 'tasks.finetune'
FAULTS = os.path.join(ROOT, 'tests', 'faults.py')


def tiny_vit(**kw):
    torch.manual_seed(0)
    return VideoViT(get_config('tiny', **kw))


def randomize(module):
    """Give every parameter (norms and biases too) random values, so a weight loaded into the wrong
    slot shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.05).add_(1.0 if p.ndim == 1 and p.shape[0] > 1 else 0.0)
    return module


# ----------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay


def test_layer_decay_scales():
    model = VideoClassifier(tiny_vit(align_layers=0), num_classes=5)  # depth 4
    decay_of = training.layer_decay(4, 0.75, prefix='backbone.')
    groups = training.adamw(model, 1e-3, 0.05, (0.9, 0.999), decay_of).param_groups
    scale = {id(p): g['lr_scale'] for g in groups for p in g['params']}
    decay = {id(p): g['weight_decay'] for g in groups for p in g['params']}
    # every parameter in exactly one group
    assert len(scale) == sum(1 for _ in model.parameters())
    for name, p in model.named_parameters():
        if name.startswith('backbone.patch_embed.'):
            want = 0.75 ** 5                                           # layer 0
        elif name.startswith('backbone.blocks.'):
            want = 0.75 ** (4 - int(name.split('.')[2]))               # block i = layer i + 1
        else:
            assert name.startswith(('fc_norm.', 'head.')), name
            want = 1.0                                                 # layer depth + 1
        assert scale[id(p)] == pytest.approx(want), name
        assert decay[id(p)] == (0.0 if p.ndim == 1 else 0.05), name


# ----------------------------------------------------------------------------------------------
# Mixup / cutmix


def test_mixup_cutmix_soft_targets():
    B, C = 6, 10
    torch.manual_seed(0)
    video = torch.randn(B, 3, 4, 16, 16)
    label = torch.tensor([0, 1, 2, 3, 4, 5])
    hard = augment.smooth_one_hot(label, C, 0.0)
    smooth = augment.smooth_one_hot(label, C, 0.1)
    assert torch.allclose(smooth.sum(1), torch.ones(B)) and smooth[0, 0] == pytest.approx(0.91)
    kinds = set()
    for seed in range(20):
        out, target = augment.mixup_cutmix(video, smooth, np.random.default_rng(seed), 0.8, 1.0,
                                           0.5)
        assert torch.allclose(target.sum(1), torch.ones(B), atol=1e-6) and target.min() >= 0
        _, t = augment.mixup_cutmix(video, hard, np.random.default_rng(seed), 0.8, 1.0, 0.5)
        lam = t[0, 0].item()                                           # label 0 pairs with label 5
        assert torch.allclose(t[:, label], torch.eye(B) * lam + torch.eye(B).flip(0) * (1 - lam),
                              atol=1e-6)
        assert torch.allclose(t, lam * hard + (1 - lam) * hard.flip(0), atol=1e-6)
        from_partner = (out == video.flip(0)) & (out != video)         # [B, 3, T, H, W]
        if from_partner.any() and torch.equal(out[from_partner], video.flip(0)[from_partner]) and \
                torch.all((out == video) | (out == video.flip(0))):
            kinds.add('cutmix')                  # every pixel is one sample's or the other's
            box = from_partner[0, 0, 0]          # [H, W]
            # one box for all samples, channels, frames
            assert torch.equal(from_partner, box.expand_as(from_partner))
            # lam = the kept area, exactly
            assert box.float().mean().item() == pytest.approx(1 - lam)
        else:
            kinds.add('mixup')
            assert torch.allclose(out, lam * video + (1 - lam) * video.flip(0), atol=1e-6)
    assert kinds == {'mixup', 'cutmix'}                                # switch_prob 0.5 gives both
    # switch_prob 0 / 1 and alphas of 0 pick one kind; both alphas 0 change nothing
    out, _ = augment.mixup_cutmix(video, smooth, np.random.default_rng(0), 0.8, 1.0, 0.0)
    assert not torch.all((out == video) | (out == video.flip(0)))      # mixup: blended values
    out, _ = augment.mixup_cutmix(video, smooth, np.random.default_rng(0), 0.0, 1.0, 0.0)
    assert torch.all((out == video) | (out == video.flip(0)))          # cutmix only
    out, t = augment.mixup_cutmix(video, smooth, np.random.default_rng(0), 0.0, 0.0, 0.5)
    assert out is video and t is smooth


# ----------------------------------------------------------------------------------------------
# RandAugment and random erasing


def test_rand_augment_same_ops_for_every_frame_and_magnitudes():
    frames = np.random.default_rng(0).integers(0, 256, (1, 24, 40, 3), dtype=np.uint8)
    frames = frames.repeat(4, axis=0)                               # 4 equal frames
    changed = 0
    for seed in range(20):
        out = augment.rand_augment(frames, np.random.default_rng(seed))
        assert out.shape == frames.shape and out.dtype == np.uint8
        assert all((out[t] == out[0]).all() for t in range(4))  # one draw per clip, not per frame
        changed += not (out == frames).all()
    assert changed >= 15                                         # 4 ops at p 0.5: 1/16 do nothing
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)                # [T, 3, H, W]
    for name in ('Rotate', 'Solarize', 'SolarizeAdd', 'Color', 'Contrast', 'Brightness',
                 'Sharpness', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY'):
        # magnitude 0: the identity
        assert torch.equal(augment.RA_OPS[name](x, 0.0, np.random.default_rng(0)), x), name
    # by 45% of the width = 18 columns
    shifted = augment.RA_OPS['TranslateX'](x, 10.0, np.random.default_rng(0))
    # [W]: the columns of fill
    filled = (shifted == torch.tensor(augment.RA_FILL).view(1, 3, 1, 1)).all(1).all(1).all(0)
    assert filled.sum() == 18 and (filled[:18].all() or filled[-18:].all())


def test_random_erase_one_box_per_frame():
    # two backgrounds, the same draws
    clips = [torch.full((3, 6, 32, 32), v, dtype=torch.uint8) for v in (0, 255)]
    for clip in clips:
        augment.random_erase(clip, np.random.default_rng(0), prob=1.0)
    box = (clips[0] == clips[1]).all(0)                             # [T, H, W]: the noise, on both
    for t in range(6):
        ys, xs = box[t].nonzero(as_tuple=True)
        area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        # one filled box of 2-33%
        assert 0.02 * 1024 * 0.8 <= area <= 1024 / 3 * 1.2 and box[t].sum() == area
    noise = data.normalize(clips[0])[box[None].expand(3, -1, -1, -1)]
    assert abs(noise.mean()) < 0.1 and 0.8 < noise.std() < 1.1     # about N(0, 1) once normalized
    untouched = torch.zeros(3, 6, 32, 32, dtype=torch.uint8)
    erased = augment.random_erase(untouched.clone(), np.random.default_rng(0), prob=0.0)
    assert torch.equal(erased, untouched)


# ----------------------------------------------------------------------------------------------
# Multi-view test


def test_multiview_average_is_mean_of_softmax():
    logits = torch.tensor([[[10.0, 0.0], [0.0, 3.0], [0.0, 3.0]]])   # [B=1, V=3, C=2]
    probs = util.evaluation.multiview_average(logits)
    assert torch.allclose(probs, logits.softmax(-1).mean(1))
    assert torch.allclose(probs.sum(-1), torch.ones(1))
    # the order matters: averaging logits would pick class 0, averaging probabilities picks class 1
    assert logits.mean(1).argmax().item() == 0 and probs.argmax().item() == 1
    logits = torch.randn(4, 12, 7)
    want = torch.stack([l.softmax(-1).mean(0) for l in logits])
    assert torch.allclose(util.evaluation.multiview_average(logits), want)


# ----------------------------------------------------------------------------------------------
# Starting points


def official_finetuned_keys(depth):
    """The key names of an official fine-tuned model, written out independently of model.py."""
    block = ['norm1.weight', 'norm1.bias', 'attn.q_bias', 'attn.v_bias', 'attn.qkv.weight',
             'attn.proj.weight', 'attn.proj.bias', 'norm2.weight', 'norm2.bias', 'mlp.fc1.weight',
             'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias']
    return {'patch_embed.proj.weight', 'patch_embed.proj.bias', 'fc_norm.weight', 'fc_norm.bias',
            'head.weight', 'head.bias'} | {f'blocks.{i}.{k}' for i in range(depth) for k in block}


def test_from_official_finetuned_layout():
    # heads = width / 64 is what load_official assumes for official models (B and L), so keep
    # head_dim 64
    ref = randomize(VideoClassifier(tiny_vit(embed_dim=128, num_heads=2, align_layers=0),
                                    num_classes=6)).eval()
    sd = {k.removeprefix('backbone.'): v for k, v in ref.state_dict().items()}
    assert set(sd) == official_finetuned_keys(4)
    # small inputs keep the test fast: the first rows of the same table
    video = torch.randn(2, 3, 2, 32, 32)

    model, report = checkpoints.load_classifier({'module': sd}, 6, num_frames=8, img_size=64)
    assert 'new: none' in report and 'unused: none' in report
    with torch.no_grad():
        # the head is reused: the same class count
        assert torch.allclose(model.eval()(video), ref(video), atol=1e-5)

    # fine-tuned at 4 frames: the official file then carries pos_embed [1, N, D]; it is replaced by
    # the regenerated table (here the same values, so the outputs must still agree)
    sd4 = {**sd, 'pos_embed': sincos_table(4 * 64, 128)[None]}
    model, report = checkpoints.load_classifier(sd4, 6, num_frames=4, img_size=64)
    assert 'unused: pos_embed' in report
    # and the report says what the table is, not '0 frames x 224 px'
    assert "position table: sin-cos for 4 frames x 64 px; the checkpoint's pos_embed " \
        '(256 tokens) is not used' in report
    with torch.no_grad():
        assert torch.allclose(model.eval()(video), ref(video), atol=1e-5)

    # another class count: the backbone and fc_norm are kept, the head is new and small
    model, report = checkpoints.load_classifier(sd, 3, num_frames=8, img_size=64)
    assert 'new: head.* (2)' in report and 'unused: head.* (2)' in report
    assert torch.equal(model.fc_norm.weight, ref.fc_norm.weight)
    assert model.head.weight.abs().max() < 0.002 * 3 and torch.all(model.head.bias == 0)
    with torch.no_grad():
        assert torch.allclose(model.eval().backbone(video)[0], ref.backbone(video)[0], atol=1e-5)


def test_head_transfer_keeps_the_rows_of_the_classes():
    """K710 -> K400: the first 400 rows of the K710 head; K600 / K700: the rows a label map lists
    (the official label_mixto600.json: one K710 row per class); a map of the wrong length is an
    error."""
    ref = randomize(VideoClassifier(tiny_vit(embed_dim=128, num_heads=2, align_layers=0),
                                    num_classes=10))
    sd = {k.removeprefix('backbone.'): v for k, v in ref.state_dict().items()}
    for rows in (range(4), [7, 2, 5, 0]):
        model, report = checkpoints.load_classifier(sd, 4, head_rows=rows, num_frames=8,
                                         img_size=64)
        assert torch.equal(model.head.weight, ref.head.weight[list(rows)]) and 'new: none' in report
        assert torch.equal(model.head.bias, ref.head.bias[list(rows)])
        assert 'head = 4 of its rows' in report[0]
    with pytest.raises(configurator.BadInput, match='3 rows for 4 classes'):
        checkpoints.load_classifier(sd, 4, head_rows=[1, 2, 3], num_frames=8, img_size=64)

def test_from_our_stage1_and_stage2_checkpoints():
    vit = randomize(tiny_vit())                     # stage 1: align_layers 2, with heads
    ckpt = {'model': vit.state_dict(), 'model_config': dataclasses.asdict(vit.config), 'step': 7}
    model, report = checkpoints.load_classifier(ckpt, 5, num_frames=4, img_size=64,
                                     drop_path=0.1)
    assert report[1:3] == ['new: fc_norm.* (2), head.* (2)',
                           'unused: norm.* (2), clip_decoder.* (8)']
    assert 'position table regenerated: 8 frames x 64 px -> 4 x 64' in report
    c = model.backbone.config
    assert (c.align_layers, c.num_frames, c.drop_path) == (0, 4, 0.1)
    assert len(model.backbone.clip_decoder) == 0
    for k, v in vit.state_dict().items():
        if not k.startswith(('norm.', 'clip_decoder.')):
            assert torch.equal(model.backbone.state_dict()[k], v), k
    # the classifier's features = the stage-1 blocks without the final norm, mean-pooled, through
    # fc_norm
    video = torch.randn(2, 3, 2, 32, 32)
    vit.norm = torch.nn.Identity()
    with torch.no_grad():
        pooled = vit.eval()(video)[0].mean(1)
        assert torch.allclose(model.eval().fc_norm(pooled),
                              model.fc_norm(model.backbone(video)[0].mean(1)), atol=1e-6)

    # stage 2: the video encoder sits under vision_encoder.*; the text side is reported unused
    sd2 = {**{'vision_encoder.' + k: v for k, v in ckpt['model'].items()},
           'text_encoder.w': torch.zeros(3)}
    model2, report = checkpoints.load_classifier(
        {'model': sd2, 'model_config': ckpt['model_config'], 'text_config': {}}, 5)
    assert report[2] == 'unused: text_encoder.* (1), norm.* (2), clip_decoder.* (8)'
    assert torch.equal(model2.backbone.blocks[3].mlp.fc2.weight, vit.blocks[3].mlp.fc2.weight)

    # an incomplete backbone is an error that names what is missing
    del ckpt['model']['blocks.2.attn.qkv.weight']
    with pytest.raises(configurator.BadInput, match='blocks.2.attn.qkv.weight'):
        checkpoints.load_classifier(ckpt, 5)


# ----------------------------------------------------------------------------------------------
# The script: bad constants and exact resume


@pytest.fixture(scope='module')
def small_run(tmp_path_factory, demo_dir):
    """A random tiny stage-1 checkpoint and 16 training / 7 validation videos of the demo set."""
    tmp = tmp_path_factory.mktemp('finetune')
    vit = tiny_vit()
    torch.save({'model': vit.state_dict(), 'model_config': dataclasses.asdict(vit.config)},
               tmp / 'stage1.pt')
    train = open(os.path.join(demo_dir, 'train.csv')).read().splitlines()
    val = open(os.path.join(demo_dir, 'val.csv')).read().splitlines()
    (tmp / 'train.csv').write_text('\n'.join(train[:16]) + '\n')  # 16 videos, every class (12)
    # 7 videos: 2 ranks need a padding repeat
    (tmp / 'val.csv').write_text('\n'.join(val[::3][:7]) + '\n')
    return tmp, ['--preset=demo', f'--init={tmp / "stage1.pt"}',
                 f'--train_list={tmp / "train.csv"}', f'--val_list={tmp / "val.csv"}',
                 f'--data_root={demo_dir}', '--num_frames=4', '--img_size=32', '--total_batch=8',
                 '--micro_batch=4', '--epochs=2', '--log_interval=1', '--test_clips=2',
                 '--num_workers=0', '--device=cpu',
                 # the full recipe
                 '--flip=True', '--mixup=0.8', '--cutmix=1.0', '--rrc_scale=(0.08,1.0)',
                 '--drop_path=0.1', '--rand_augment=(4,7,0.5)', '--random_erase=0.25']


def run(args, nproc=1, fresh=False, nan_steps=(), kill_after=0):
    """tasks/finetune.py in this process, or in fresh ones (fresh=True; nproc > 1 under torchrun);
    nan_steps and kill_after: tests/faults.py's faults."""
    if nproc == 1 and not fresh:
        return faults.run_here(MODULE, args, nan_steps, kill_after)
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
    env['OMP_NUM_THREADS'] = '1'  # the same thread count in every run: identical float results
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
    return subprocess.run(launcher + [FAULTS, '-m', MODULE, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_bad_constants_fail_fast(small_run, monkeypatch):
    tmp, args = small_run
    monkeypatch.delenv('RANK', raising=False)
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    for bad, message in (('--total_batch=0',
                          'TOTAL_BATCH=0 must be a positive multiple of the 1 processes'),
                         ('--init=missing.pt', "INIT 'missing.pt' not found"),
                         ('--test_crops=2', 'TEST_CROPS=2 must be 1 or 3'),
                         ('--random_erase=1.5', 'RANDOM_ERASE=1.5 must lie in'),
                         ('--rand_augment=(4,12,0.5)', 'RAND_AUGMENT=.* be None or'),
                         ('--num_classes=5', 'has label 11, but NUM_CLASSES=5')):
        monkeypatch.setattr(sys, 'argv', [MODULE, *map(str, args), bad, f'--out_dir={tmp / "bad"}'])
        with pytest.raises(configurator.BadInput, match=message):
            runpy.run_module(MODULE, run_name='__main__')


def test_nan_loss_skips_the_update(small_run):
    tmp, args = small_run
    r = run(args + [f'--out_dir={tmp / "nan"}', '--epochs=1'], nan_steps=(2,))
    assert r.returncode == 0, r.stderr
    log = {x['step']: x for x in log_records(tmp / 'nan') if 'loss' in x}
    assert log[1]['loss'] is not None and log[2]['loss'] is None and log[2]['skipped_steps'] == 1
    assert any('test_top1' in x for x in log_records(tmp / 'nan'))  # the run went on to the end
    r = run(args + [f'--out_dir={tmp / "nan2"}', '--max_bad_steps=2'], nan_steps=(1, 2))
    assert r.returncode != 0 and '2 non-finite losses in a row (steps 1-2)' in r.stderr


def test_resume_is_exact(small_run):
    tmp, args = small_run
    r = run(args + [f'--out_dir={tmp / "a"}'])          # 2 epochs x 2 steps, uninterrupted
    assert r.returncode == 0, r.stderr
    # killed after step 3 ...
    r = run(args + [f'--out_dir={tmp / "b"}', '--ckpt_interval=1'], kill_after=3)
    assert r.returncode == 0, r.stderr
    assert not any('test_top1' in line for line in open(tmp / 'b' / 'log.jsonl'))
    r = run(args + [f'--out_dir={tmp / "b"}'])          # ... and resumed from b/last.pt
    assert r.returncode == 0, r.stderr
    assert 'resumed from' in r.stdout
    a, b = log_records(tmp / 'a'), log_records(tmp / 'b')
    assert [x['step'] for x in a if 'loss' in x] == [1, 2, 3, 4]
    assert a == b                                    # losses, lr, grad norms, val and test: exact
    wa, wb = (training.read_checkpoint(tmp / name / 'last.pt') for name in ('a', 'b'))
    assert wa['num_classes'] == 12 and wa['step'] == 4
    assert all(torch.equal(wa['model'][k], wb['model'][k]) for k in wa['model'])


def test_two_processes_match_one(small_run):
    """2 gloo processes x 1 micro-step = 1 process x 2 micro-steps: the same clips (item seeds
    follow the global position), the same mean gradient, the same weights; each validation video is
    counted once although the sampler repeats one to give both ranks 4 of the 7."""
    tmp, args = small_run
    # off: their draws depend on the rank
    args = args + ['--mixup=0.0', '--cutmix=0.0', '--drop_path=0.0', '--epochs=1']
    r = run(args + [f'--out_dir={tmp / "one"}'], fresh=True)
    assert r.returncode == 0, r.stderr
    r = run(args + [f'--out_dir={tmp / "two"}'], nproc=2)
    assert r.returncode == 0, r.stderr
    w1, w2 = (training.read_checkpoint(tmp / name / 'last.pt')['model'] for name in ('one', 'two'))
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)
    one, two = log_records(tmp / 'one'), log_records(tmp / 'two')
    losses = lambda log: [x['loss'] for x in log if 'loss' in x]  # noqa: E731
    assert losses(one) == pytest.approx(losses(two), abs=1e-5)
    evals = lambda log: [{k: v for k, v in x.items() if k.startswith(('val', 'test'))}  # noqa: E731
                         for x in log if 'loss' not in x]
    assert evals(one) == evals(two) and len(evals(one)) == 2


def test_the_test_uses_the_best_epoch(small_run, monkeypatch):
    """TEST_BEST (the official --test_best): the multi-view test runs on the weights of the epoch
    with the best validation top-1, kept in best.pt, not on the last epoch's."""
    tmp, args = small_run
    calls = []

    # validation: 60% after epoch 1, 40% after epoch 2
    def scripted(classifier, dataset, *args, **kwargs):
        calls.append((dataset.mode, {k: v.clone() for k, v in classifier.state_dict().items()}))
        return {'top1': {1: 60.0, 2: 40.0}.get(len(calls), 0.0), 'top5': 100.0}
    monkeypatch.setattr(util.evaluation, 'head_accuracy', scripted)
    monkeypatch.delenv('RANK', raising=False)
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    monkeypatch.setattr(sys, 'argv', [MODULE, *map(str, args), f'--out_dir={tmp / "best"}',
                                      '--mixup=0.0'])
    runpy.run_module(MODULE, run_name='__main__')
    assert [mode for mode, _ in calls] == ['val', 'val', 'test']
    (_, epoch1), (_, epoch2), (_, tested) = calls
    assert all(torch.equal(tested[k], epoch1[k]) for k in tested)  # the best epoch's weights ...
    assert not all(torch.equal(tested[k], epoch2[k]) for k in tested)  # ... not the last one's
    assert training.read_checkpoint(tmp / 'best' / 'best.pt')['epoch'] == 1
    assert log_records(tmp / 'best')[-1]['epoch'] == 1
    assert training.read_checkpoint(tmp / 'best' / 'last.pt')['best_top1'] == 60


def test_head_rows_from_two_lists_of_class_names(tmp_path):
    """HEAD_ROWS='names:K710,K600': class i of the second list takes the row of the K710 head with
    the same name, in K710's order; a class that K710 lacks stops with its name. The official
    label_mixto600.json is such a list."""
    (tmp_path / 'k710.txt').write_text('abseiling\nair drumming\nbaking cookies\nzumba\n')
    (tmp_path / 'k600.txt').write_text('zumba\nabseiling\nbaking cookies\n')
    (tmp_path / 'k700.txt').write_text('zumba\nabseiling\nyoga on a mat\n')
    names = lambda other: f'names:{tmp_path / "k710.txt"},{tmp_path / other}'  # noqa: E731
    assert checkpoints.head_rows(names('k600.txt'), 3) == [3, 0, 2]
    with pytest.raises(configurator.BadInput,
                       match="k700.txt are not in .*k710.txt, e.g. 'yoga on a mat'"):
        checkpoints.head_rows(names('k700.txt'), 3)
    (tmp_path / 'rows.json').write_text('[3, 0, 2]')
    assert checkpoints.head_rows(str(tmp_path / 'rows.json'), 3) == [3, 0, 2]
    assert checkpoints.head_rows('first', 2) == [0, 1] and checkpoints.head_rows(None, 2) is None
    with pytest.raises(configurator.BadInput, match='one row number per class'):
        checkpoints.head_rows(str(tmp_path / 'rows.json'), 4)
