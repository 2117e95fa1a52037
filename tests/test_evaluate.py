"""Guards evaluate.py: recall@k on hand-made similarity matrices (ties against the model,
multi-caption videos), re-ranking that only reorders each query's top-k, k-NN and the linear probe
on separable synthetic features, multi-view averaging, the features / show-mask / classify commands
on the demo videos with tiny checkpoints, and a 2-process gloo retrieval that must give the numbers
of one process."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluate as ev
import util.evaluation as E
from util.configurator import BadInput
from model import VideoClassifier, VideoViT, get_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# Metrics


def test_recall_ties_count_against_the_model():
    sim = torch.tensor([[0.9, 0.1, 0.2],    # text 0 -> video 0: first
                        [0.5, 0.5, 0.1],    # text 1 -> video 1: tied with video 0 -> ranked second
                        [0.3, 0.8, 0.2]])   # text 2 -> video 2: third
    m = E.retrieval_metrics(sim, torch.tensor([0, 1, 2]))
    assert m['t2v_R@1'] == pytest.approx(100 / 3) and m['t2v_R@5'] == 100
    # v2t, per column: video 0 -> text 0 first; video 1 -> text 2 scores higher; video 2 -> tie with
    # text 0
    assert m['v2t_R@1'] == pytest.approx(100 / 3) and m['v2t_R@10'] == 100
    assert m['mean'] == pytest.approx((m['t2v_mean'] + m['v2t_mean']) / 2)
    # a constant scorer gets nothing at R@1
    assert E.retrieval_metrics(torch.zeros(3, 3), torch.tensor([0, 1, 2]))['t2v_R@1'] == 0


def test_recall_at_5_and_10():
    # 12 videos; the correct video of text 0 has 6 wrong videos above it (rank 6), text 1's has 2
    # (rank 2)
    sim = torch.zeros(2, 12)
    sim[0, :7] = torch.tensor([1.0, .9, .8, .7, .6, .5, .4])   # correct: video 6 (0.4)
    sim[1, 9:] = torch.tensor([.9, .8, .7])                       # correct: video 11 (0.7)
    m = E.retrieval_metrics(sim, torch.tensor([6, 11]))
    assert (m['t2v_R@1'], m['t2v_R@5'], m['t2v_R@10']) == (0, 50, 100)
    assert m['t2v_mean'] == pytest.approx(50)


def test_recall_multi_caption_videos():
    txt2vid = torch.tensor([0, 0, 1, 1])    # two captions per video; video 2 has none
    sim = torch.tensor([[0.2, 0.9, 0.0],    # t0 -> v0: v1 above -> rank 1
                        [0.8, 0.1, 0.0],    # t1 -> v0: rank 0
                        [0.3, 0.3, 0.0],    # t2 -> v1: tie -> rank 1
                        [0.1, 0.7, 0.0]])   # t3 -> v1: rank 0
    m = E.retrieval_metrics(sim, txt2vid)
    assert m['t2v_R@1'] == 50
    # v2t: v0's best caption t1 (0.8) beats every wrong text -> rank 0; v1's best caption t3 (0.7)
    # is beaten by t0 (0.9) -> rank 1; v2 has no caption and is left out (else it would count as a
    # miss)
    assert (m['v2t_R@1'], m['v2t_R@5']) == (50, 100)
    # the other captions of the same video never push the best one down
    sim2 = sim.clone()
    # t0 (a v0 caption) now also scores 0.75 on v1: still only one wrong text (t0) >= 0.7
    sim2[0, 1] = 0.75
    assert E.retrieval_metrics(sim2, txt2vid)['v2t_R@1'] == 50


def test_rerank_only_reorders_the_top_k():
    torch.manual_seed(0)
    sim = torch.randn(7, 10)
    calls = []

    # reverses the VTC order: the lowest VTC score becomes the best ITM logit
    def pair_scores(t, v):
        calls.extend(zip(t.tolist(), v.tolist()))
        return -sim[t, v] * 10

    t2v, v2t = E.rerank(sim, 3, pair_scores, batch=4)
    assert len(calls) == len(set(calls))                     # every pair scored once
    top_t2v = sim.topk(3, dim=1).indices
    top_v2t = sim.topk(3, dim=0).indices
    for j in range(7):
        inside = set(top_t2v[j].tolist())
        assert set(t2v[j].topk(3).indices.tolist()) == inside
        assert all(t2v[j, i] == E.NO_MATCH for i in range(10) if i not in inside)
        # the third-best by VTC is first after VTM
        assert t2v[j].argmax() == top_t2v[j, 2]
    for i in range(10):
        inside = set(top_v2t[:, i].tolist())
        assert set(v2t[:, i].topk(3).indices.tolist()) == inside
        assert all(v2t[j, i] == E.NO_MATCH for j in range(7) if j not in inside)
    assert set(calls) == {(j, i) for j in range(7) for i in range(10)
                          if i in top_t2v[j].tolist() or j in top_v2t[:, i].tolist()}
    # k larger than the gallery is capped: everything is re-scored, nothing is NO_MATCH
    t2v, v2t = E.rerank(sim, 128, lambda t, v: sim[t, v])
    assert torch.equal(t2v, sim) and torch.equal(v2t, sim)


def test_multiview_average_and_topk():
    # softmax: [.25 .25 .5], [.6 .2 .2]
    logits = torch.log(torch.tensor([[[1.0, 1.0, 2.0], [3.0, 1.0, 1.0]]]))
    assert torch.allclose(E.multiview_average(logits), torch.tensor([[0.425, 0.225, 0.35]]))
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1]])
    assert E.topk_accuracy(scores, torch.tensor([2, 0]), ks=(1, 2)) == {'top1': 50.0, 'top2': 100.0}


def separable(n_per_class, num_classes=4, dim=32, seed=0, offset=None):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centers[labels] + torch.randn(len(labels), dim, generator=g)
    return x + (offset if offset is not None else 0), labels


def test_knn_separates_clusters():
    train_x, train_y = separable(10)
    test_x, test_y = separable(5, seed=1)
    votes = ev.knn_predict(train_x, train_y, test_x, 4, k=20, temp=0.07)
    assert votes.shape == (20, 4) and torch.allclose(votes.sum(1), torch.ones(20))
    assert E.topk_accuracy(votes, test_y)['top1'] == 100
    # with scrambled training labels the neighbours no longer carry the class
    scrambled = train_y[torch.randperm(40, generator=torch.Generator().manual_seed(0))]
    assert E.topk_accuracy(ev.knn_predict(train_x, scrambled, test_x, 4), test_y)['top1'] < 70
    # k = 1 is the nearest neighbour's label
    nearest = train_y[(torch.nn.functional.normalize(test_x, dim=1) @
                       torch.nn.functional.normalize(train_x, dim=1).t()).argmax(1)]
    assert torch.equal(ev.knn_predict(train_x, train_y, test_x, 4, k=1).argmax(1), nearest)


def test_linear_probe_separates_clusters():
    # a large per-dimension offset: standardization must handle it
    offset = torch.linspace(-50, 50, 32)
    train_x, train_y = separable(10, offset=offset)
    test_x, test_y = separable(5, seed=1, offset=offset)
    probe = ev.train_linear_probe(train_x, train_y, 4, epochs=30)
    assert E.topk_accuracy(probe(test_x), test_y)['top1'] == 100
    # the standardization is folded into the layer: same weights from the same seed
    assert torch.equal(ev.train_linear_probe(train_x, train_y, 4, epochs=30).weight, probe.weight)


# ------------------------------------------------------------------------------------------------
# Commands on the demo videos, with tiny random checkpoints


def tiny_stage1(path):
    torch.manual_seed(0)
    config = get_config('tiny')
    torch.save({'model': VideoViT(config).state_dict(),
                'model_config': dataclasses.asdict(config)}, path)
    return config


def videos(demo_dir, n):
    lines = open(os.path.join(demo_dir, 'val.csv'))
    return [os.path.join(demo_dir, line.split(',')[0]) for line in lines][:n]


def test_features_command(demo_dir, tmp_path):
    tiny_stage1(tmp_path / 'stage1.pt')
    paths = videos(demo_dir, 3)
    ev.main(['features', '--ckpt', str(tmp_path / 'stage1.pt'), *paths, '--out',
             str(tmp_path / 'f.pt')])
    feats = torch.load(tmp_path / 'f.pt', weights_only=True)
    assert feats['paths'] == paths and feats['skipped'] == {}
    assert feats['pooled'].shape == (3, 96) and feats['per_frame'].shape == (3, 8, 96)
    # equal tokens per frame
    assert torch.allclose(feats['per_frame'].mean(1), feats['pooled'], atol=1e-5)
    assert not torch.allclose(feats['pooled'][0], feats['pooled'][1])


def test_features_skip_unreadable_videos(demo_dir, tmp_path):
    tiny_stage1(tmp_path / 'stage1.pt')
    good = videos(demo_dir, 2)
    (tmp_path / 'broken.mp4').write_bytes(open(good[0], 'rb').read()[:300])
    bad = [str(tmp_path / 'broken.mp4'), str(tmp_path / 'missing.mp4')]
    ev.main(['features', '--ckpt', str(tmp_path / 'stage1.pt'), good[0], *bad, good[1], '--out',
             str(tmp_path / 'f.pt')])
    feats = torch.load(tmp_path / 'f.pt', weights_only=True)
    # the rows belong to these paths
    assert feats['paths'] == good and sorted(feats['skipped']) == sorted(bad)
    # every skip has its reason
    assert feats['pooled'].shape == (2, 96) and all(feats['skipped'].values())
    with pytest.raises(BadInput, match='none of the 2 videos could be read'):
        ev.main(['features', '--ckpt', str(tmp_path / 'stage1.pt'), *bad, '--out',
                 str(tmp_path / 'g.pt')])


def test_show_mask_command(demo_dir, tmp_path):
    from PIL import Image
    out = tmp_path / 'mask.png'
    show = ['show-mask', videos(demo_dir, 1)[0], '--teacher', 'tiny', '--frames', '4', '--out',
            str(out)]
    ev.main(show)
    image = Image.open(out)
    # 4 frames wide; frames, attention, kept
    assert image.size == (4 * 64, 3 * (14 + 64)) and image.mode == 'RGB'
    pixels = torch.from_numpy(np.array(image)).float().view(3, 14 + 64, 4 * 64, 3)
    # a caption strip above each row
    captions, pixels = pixels[:, :14], pixels[:, 14:]
    # text: dark pixels on a mostly white strip
    assert all((c.amin(-1) < 100).any() and (c.amin(-1) > 250).float().mean() > 0.5
               for c in captions)
    with pytest.raises(BadInput, match='exists'):                     # never written over
        ev.main(show)
    kept_row, frame_row = pixels[2], pixels[0]
    # kept tokens show the frame unchanged, hidden ones are darkened: about 20% of the 8x8 patches
    # per frame [8, 32] patches
    same = (kept_row - frame_row).abs().amax(-1).view(8, 8, 4 * 8, 8).amax((1, 3)) <= 1
    assert same.sum().item() == 4 * (64 - int(64 * 0.8))


def write_list(demo_dir, tmp_path, name, per_class):
    lines = open(os.path.join(demo_dir, f'{name}.csv')).readlines()
    by_class = {}
    for line in lines:
        by_class.setdefault(line.strip().rsplit(',', 1)[1], []).append(line)
    out = tmp_path / f'{name}.csv'
    out.write_text(''.join(line for group in by_class.values() for line in group[:per_class]))
    return str(out)


def test_classify_command(demo_dir, tmp_path):
    config = tiny_stage1(tmp_path / 'stage1.pt')
    train = write_list(demo_dir, tmp_path, 'train', 2)
    val = write_list(demo_dir, tmp_path, 'val', 1)
    args = ['--root', demo_dir, '--val', val, '--workers', '0', '--device', 'cpu']
    res = ev.main(['classify', '--ckpt', str(tmp_path / 'stage1.pt'), '--train', train, *args,
                   '--clips', '2', '--crops', '3'])  # 6 views per test video
    assert set(res) == {'knn', 'linear', 'chance_top1'} and res['chance_top1'] == round(100 / 12, 2)
    assert all(0 <= r[k] <= 100 for r in (res['knn'], res['linear']) for k in ('top1', 'top5'))
    # a fine-tuned classifier (our convention), and the same weights in the official layout, through
    # their head
    torch.manual_seed(0)
    clf = VideoClassifier(VideoViT(config), num_classes=8)
    torch.save({'model': clf.state_dict(), 'model_config': dataclasses.asdict(config),
                'num_classes': 8}, tmp_path / 'ft.pt')
    official = {k.removeprefix('backbone.'): v for k, v in clf.state_dict().items()}
    torch.save(official, tmp_path / 'official.pth')
    ours = ev.main(['classify', '--ckpt', str(tmp_path / 'ft.pt'), *args, '--clips', '1',
                    '--crops', '1'])
    theirs = ev.main(['classify', '--ckpt', str(tmp_path / 'official.pth'), '--size', '64', *args,
                      '--clips', '1', '--crops', '3'])
    assert set(ours) == {'head'} and 0 <= ours['head']['top1'] <= 100
    assert set(theirs) == {'head'}


def tiny_stage2(path):
    from demo import tiny_clip
    from video_language import build_umt
    torch.manual_seed(0)
    config = get_config('tiny', num_frames=4)
    umt = build_umt(VideoViT(config), tiny_clip())
    torch.save({'model': umt.state_dict(), 'model_config': dataclasses.asdict(config),
                'text_config': umt.text_config}, path)


def test_retrieval_two_processes_equal_one(demo_dir, tmp_path):
    tiny_stage2(tmp_path / 'stage2.pt')
    # 7 videos, 2 distinct captions each (multi-caption); the last video has 1 (uneven split over 2
    # ranks)
    items = json.load(open(os.path.join(demo_dir, 'captions_val.json')))[:7]  # one video per class
    ann = [{'video': it['video'],
            'caption': [f"{it['caption']} number {i}", f'clip {i} of the demo']}
           for i, it in enumerate(items)]
    ann[-1]['caption'] = ann[-1]['caption'][0]
    (tmp_path / 'ann.json').write_text(json.dumps(ann))
    args = ['retrieval', '--ckpt', str(tmp_path / 'stage2.pt'), '--ann', str(tmp_path / 'ann.json'),
            '--root', demo_dir, '--k_test', '3', '--batch', '3', '--workers', '0', '--device',
            'cpu']
    one = ev.main(args)
    assert one['num_videos'] == 7 and one['num_texts'] == 13
    assert set(one['vtc']) == set(one['reranked'])
    assert 't2v_R@1' in one['vtc'] and 'v2t_R@10' in one['vtc']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                    '--nproc_per_node=2', 'evaluate.py', *args, '--out',
                    str(tmp_path / 'two.json')], cwd=REPO, env=env, check=True, timeout=300)
    two = json.load(open(tmp_path / 'two.json'))
    for part in ('vtc', 'reranked'):
        assert two[part] == pytest.approx(one[part], abs=1e-9), part


def test_pickled_objects_are_refused_with_a_hint(tmp_path):
    import argparse
    trainer = {'model': {}, 'args': argparse.Namespace(lr=1e-3)}
    torch.save(trainer, tmp_path / 'official_trainer.pth')
    with pytest.raises(BadInput, match="keep its weights"):
        ev.load_model(str(tmp_path / 'official_trainer.pth'), 'classify')


def test_protocol_text_lengths_per_model_size():
    """The official zero-shot configs' max_txt_l (exp/zero_shot/ret_*/{b16,l16}.py): LSMDC asks for
    96 tokens with UMT-L/16 (width 1024) and 64 with B/16; the text side's positions cap them
    (CLIP's 77 cut anet's 150, BERT's 512 nothing: tests/test_official.py)."""
    for protocol, b16, l16 in (('msrvtt', 32, 32), ('msvd', 64, 64), ('lsmdc', 64, 96),
                               ('didemo', 64, 64), ('anet', 150, 150)):
        assert ev.protocol_text_len(protocol, 768) == b16
        assert ev.protocol_text_len(protocol, 1024) == l16
