"""Guards stage 2 (video_language.py: the text side and the objectives; train_stage2.py): shapes,
the open_clip weight mapping, the padding mask, VTC over two gloo processes = one process on the
whole batch, VTM hard negatives, MLM corruption rates, and exact resume of the training script."""
import dataclasses
import json
import os
import runpy
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import faults
import model
import training
import video_language as M
from util import checkpoints
from util.configurator import BadInput

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_umt(quick_gelu=True):
    # here, not at the top: the spawned VTC workers need not import open_clip
    from demo import tiny_clip
    torch.manual_seed(0)
    clip = tiny_clip(quick_gelu=quick_gelu)
    return M.build_umt(model.VideoViT(model.get_config('tiny', num_frames=4)), clip).eval(), clip


def test_shapes_and_checkpoint_round_trip():
    umt, _ = tiny_umt()
    assert umt.text_config['fusion_layer'] == 3 and umt.text_config['embed_dim'] == 64
    # 4 frames x 8 x 8 = 256 tokens
    video = torch.randn(2, 3, 4, 64, 64)
    keep = torch.arange(0, 256, 4).expand(2, -1)                       # 16 kept per frame
    x_vis, aligned, feat = umt.encode_video(video, keep)
    assert x_vis.shape == (2, 64, 96) and aligned.shape == (2, 2, 64, 64) and feat.shape == (2, 64)
    assert umt.encode_video(video, keep, per_frame=True)[2].shape == (2, 4, 64)
    # an image: a 1-frame video
    assert umt.encode_video(torch.randn(2, 3, 1, 64, 64))[2].shape == (2, 64)
    ids, mask = M.tokenize(['a red square moving left', 'a blue circle'])
    assert ids.shape == mask.shape == (2, 32) and mask.sum(1).tolist() == [7, 5]
    hidden, tfeat = umt.encode_text(ids, mask)
    assert hidden.shape == (2, 32, 64) and tfeat.shape == (2, 64)
    assert umt.itm_logits(hidden, mask, x_vis).shape == (2, 2)
    assert umt.mlm_logits(umt.fuse(hidden, mask, x_vis)).shape == (2, 32, M.VOCAB)
    # what evaluate.py does with a stage-2 checkpoint: random model from the two configs, then a
    # strict load
    again = M.UMT.from_configs(dataclasses.asdict(umt.vision_encoder.config), umt.text_config)
    model.load_strict(again, umt.state_dict())
    assert torch.equal(again.eval().encode_text(ids, mask)[1], tfeat)


def test_tokenize_truncation_keeps_eot():
    ids, mask = M.tokenize(['word ' * 50, 'hi'], context_length=8)
    assert ids[0, 0] == M.SOT_ID and ids[0, -1] == M.EOT_ID and mask[0].all()
    assert ids[1, :3].tolist() == [M.SOT_ID, 1883, M.EOT_ID]
    assert mask[1].tolist() == [True] * 3 + [False] * 5


@pytest.mark.parametrize('quick_gelu', [True, False])
def test_causal_text_encoder_reproduces_open_clip(quick_gelu):
    """With CLIP's causal mask switched back on, every block, embedding and ln_final must match
    open_clip."""
    umt, clip = tiny_umt(quick_gelu)
    ids, mask = M.tokenize(['a dog runs on the grass', 'hello', 'x ' * 40])
    te = umt.text_encoder
    with torch.no_grad():  # the blocks by hand, without vision tokens, under the causal mask
        x = te.token_embedding(ids) + te.positional_embedding[:ids.shape[1]]
        for blk in te.blocks:
            x = blk(x, M.text_mask(mask, causal=True))
        ours = te.ln_final(x)[torch.arange(3), M.eot_index(mask)] @ clip.text_projection
        ref = clip.encode_text(ids, normalize=False)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_padding_mask_and_mask_token():
    umt, _ = tiny_umt()
    ids, mask = M.tokenize(['a blue square moving right', 'a red circle'], context_length=32)
    with torch.no_grad():
        long_feat = umt.encode_text(ids, mask)[1]
        # less padding: same real tokens
        short_feat = umt.encode_text(ids[:, :10], mask[:, :10])[1]
        assert torch.allclose(long_feat, short_feat, atol=1e-5)
        # garbage under the padding is ignored
        noisy = ids.masked_fill(~mask, 123)
        assert torch.allclose(umt.encode_text(noisy, mask)[1], long_feat, atol=1e-5)
        masked = ids.clone()
        masked[0, 2] = M.MASK_ID
        x = umt.text_encoder.forward_text(masked, mask)
        # [MASK] is seen (bidirectional)
        assert not torch.allclose(x[0], umt.text_encoder.forward_text(ids, mask)[0])


# ---------------------------------------------------------------------------------------------- VTC


def _vtc_problem(G=6, E_in=5, E=4):
    g = torch.Generator().manual_seed(0)
    xv, xt = torch.randn(G, E_in, generator=g), torch.randn(G, E_in, generator=g)
    wv, wt = torch.randn(E_in, E, generator=g), torch.randn(E_in, E, generator=g)
    # id 0 on both ranks: a cross-rank positive
    ids = torch.tensor([0, 1, 2, 3, 0, 4])
    return xv, xt, wv, wt, ids


def _vtc_grads(xv, xt, wv, wt, ids):
    wv, wt = wv.clone().requires_grad_(), wt.clone().requires_grad_()
    temp = torch.tensor(0.07, requires_grad=True)
    loss = M.vtc_loss(xv @ wv, xt @ wt, ids, temp)
    loss.backward()
    return loss.detach(), wv.grad, wt.grad, temp.grad


def _vtc_worker(rank, world, init_file, out):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    xv, xt, wv, wt, ids = _vtc_problem()
    B = len(ids) // world
    # this rank's share of the global batch
    s = slice(rank * B, (rank + 1) * B)
    result = list(_vtc_grads(xv[s], xt[s], wv, wt, ids[s]))
    # what DDP does: the mean over ranks
    for t in result:
        dist.all_reduce(t)
        t /= world
    if rank == 0:
        torch.save(result, out)
    # leave together: a rank that tears the group down first makes gloo abort the other
    dist.barrier()
    dist.destroy_process_group()


def test_vtc_two_processes_equal_one_process(tmp_path):
    out = str(tmp_path / 'vtc.pt')
    mp.spawn(_vtc_worker, args=(2, str(tmp_path / 'init'), out), nprocs=2, join=True)
    two = torch.load(out)
    one = _vtc_grads(*_vtc_problem())
    for a, b, name in zip(two, one, ('loss', 'grad w_v', 'grad w_t', 'grad temp')):
        assert torch.allclose(a, b, atol=1e-6), f'{name}: {a} vs {b}'


def test_vtc_repeated_id_is_a_positive():
    """Samples 0 and 2 are two clips of the same video with the same caption. With a shared id the
    targets of rows 0 and 2 are [1/2, 0, 1/2], which the similarities already match (zero gradient);
    with distinct ids the loss pushes the two apart (a false negative)."""
    grads = []
    for ids in ([0, 1, 0], [0, 1, 2]):
        v = torch.tensor([[1.0, 0.1], [0, 1], [1, -0.1]], requires_grad=True)
        t = torch.tensor([[1.0, 0], [0, 1], [1, 0]], requires_grad=True)
        M.vtc_loss(v, t, torch.tensor(ids), torch.tensor(0.05)).backward()
        grads.append(max(v.grad.abs().max(), t.grad.abs().max()))
    assert grads[0] < 1e-5 and grads[1] > 1e-2, grads



def test_pairs_sharing_a_caption_are_positives():
    """Keys [B, 2] = (sample, caption): different clips with the same caption (rows 0 and 2) are
    positives in VTC and never a VTM negative; the same problem with one key per pair treats them
    as negatives."""
    keys = torch.tensor([[0, 7], [1, 8], [2, 7], [3, 9]])
    assert M.same_pair(keys, keys).tolist() == [[True, False, True, False],
                                                [False, True, False, False],
                                                [True, False, True, False],
                                                [False, False, False, True]]
    grads = []
    # caption keys == merged ids != sample ids only
    for ids in (keys, torch.tensor([0, 1, 0, 3]), keys[:, 0]):
        v = torch.tensor([[1.0, 0.1], [0, 1], [1, -0.1], [-1, 0]], requires_grad=True)
        t = torch.tensor([[1.0, 0], [0, 1], [1, 0], [-1, 0]], requires_grad=True)
        M.vtc_loss(v, t, ids, torch.tensor(0.05)).backward()
        grads.append(torch.cat([v.grad, t.grad]))
    assert torch.allclose(grads[0], grads[1])
    assert grads[0].abs().max() < 1e-5 < 1e-2 < grads[2].abs().max()
    torch.manual_seed(0)
    for _ in range(50):
        vi, ti, labels = M.vtm_pairs(torch.zeros(4, 4), keys)
        # no drawn negative is a positive
        assert not M.same_pair(keys[vi[4:]], keys[ti[4:]]).diagonal().any()

# ---------------------------------------------------------------------------------------------- VTM


def test_vtm_never_draws_a_positive_and_labels_are_right():
    torch.manual_seed(0)
    # repeated ids: several positives per row
    ids = torch.tensor([0, 1, 0, 2, 3, 3])
    B = len(ids)
    for _ in range(50):
        vi, ti, labels = M.vtm_pairs(torch.randn(B, B) * 5, ids)
        assert labels.tolist() == [1] * B + [0] * 2 * B
        # a label is whether the ids agree
        assert torch.equal(labels, (ids[vi] == ids[ti]).long())
        assert torch.equal(vi[:B], torch.arange(B)) and torch.equal(ti[:B], torch.arange(B))
        assert torch.equal(ti[B:2 * B], torch.arange(B))
        assert torch.equal(vi[2 * B:], torch.arange(B))
    # one caption for the whole batch:
    vi, ti, labels = M.vtm_pairs(torch.randn(3, 3), torch.tensor([7, 7, 7]))
    # no negative exists; another item is drawn
    assert (vi != ti)[3:].all()


def test_vtm_negatives_follow_softmax_of_similarity_over_temperature():
    """The official hard negatives: softmax(cos / temp) over the non-positives, temp = 0.07 at the
    start. With cosines in [-1, 1] that is sharp; softmax of the raw cosines would be nearly
    uniform."""
    g = torch.Generator().manual_seed(0)
    v, t = (torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1) for _ in range(2))
    # [5, 5] cosine similarities
    cos, ids = v @ t.t(), torch.arange(5)
    # video 0's negative texts
    want = (cos[0] / 0.07).masked_fill(ids == 0, float('-inf')).softmax(0)
    torch.manual_seed(0)
    counts = torch.zeros(5)
    for _ in range(4000):
        # the text drawn for video 0
        counts[M.vtm_pairs(cos / 0.07, ids)[1][10]] += 1
    assert counts[0] == 0 and (counts / 4000 - want).abs().max() < 0.03, (counts / 4000, want)
    # sharp vs. flat
    assert want.max() > 0.5 > (cos[0].masked_fill(ids == 0, float('-inf')).softmax(0)).max()

def test_vtm_in_the_model_divides_by_the_temperature(monkeypatch):
    umt, _ = tiny_umt()
    seen = []
    original = M.vtm_pairs
    monkeypatch.setattr(M, 'vtm_pairs', lambda sim, ids: seen.append(sim) or original(sim, ids))
    video, ids = torch.randn(3, 3, 4, 64, 64), torch.arange(3)
    input_ids, mask = M.tokenize(['a red square', 'a blue circle', 'a green cross'])
    with torch.no_grad():
        umt(video, torch.arange(0, 256, 4).expand(3, -1), None, input_ids, mask, ids, mlm_prob=0.0)
        _, _, v = umt.encode_video(video, torch.arange(0, 256, 4).expand(3, -1))
        t = umt.encode_text(input_ids, mask)[1]
    cos = torch.nn.functional.normalize(v, dim=-1) @ torch.nn.functional.normalize(t, dim=-1).t()
    torch.testing.assert_close(seen[0], cos / 0.07, atol=1e-4, rtol=1e-4)

# ---------------------------------------------------------------------------------------------- MLM


def test_mlm_rates_and_never_masked_tokens():
    g = torch.Generator().manual_seed(0)
    B, L = 400, 32
    lengths = torch.randint(3, L + 1, (B,), generator=g)
    mask = torch.arange(L)[None] < lengths[:, None]
    ids = torch.randint(1, M.SOT_ID, (B, L), generator=g)
    ids[:, 0] = M.SOT_ID
    ids[torch.arange(B), lengths - 1] = M.EOT_ID
    ids = ids.masked_fill(~mask, 0)
    masked, labels = M.mask_text(ids, mask, prob=0.5, generator=g)
    picked = labels != -100
    eligible = mask.clone()
    eligible[:, 0] = False
    assert not picked[~eligible].any()                                  # never padding, never [sot]
    assert torch.equal(masked[~picked], ids[~picked]) and torch.equal(labels[picked], ids[picked])
    rate = picked.sum() / eligible.sum()
    as_mask = (masked[picked] == M.MASK_ID).float().mean()
    as_random = ((masked[picked] != M.MASK_ID) & (masked[picked] != ids[picked])).float().mean()
    unchanged = (masked[picked] == ids[picked]).float().mean()
    assert abs(rate - 0.5) < 0.03 and abs(as_mask - 0.8) < 0.03
    assert abs(as_random - 0.1) < 0.02 and abs(unchanged - 0.1) < 0.02
    replaced = picked & (masked != M.MASK_ID) & (masked != ids)
    # random ids are ordinary tokens
    assert (masked[replaced] < M.SOT_ID).all()
    # [eot] can be masked, as BERT's [SEP]
    assert picked[torch.arange(B), lengths - 1].any()


# ---------------------------------------------------------------------------------------------- the
# script


def run_stage2(out_dir, files, check=True, **overrides):
    """train_stage2.py in this process on a small slice of the demo set; returns the process."""
    settings = dict(preset='demo', teacher_pretrained=None, device='cpu', num_workers=0,
                    video_batch=2, image_batch=2, epochs=2, warmup_epochs=1, lr=1e-3,
                    log_interval=1, ckpt_interval=100, out_dir=str(out_dir), **files)
    settings.update(overrides)
    # tests/faults.py
    settings_nan, settings_kill = settings.pop('nan_steps', ()), settings.pop('max_steps', 0)
    out = faults.run_here(os.path.join(ROOT, 'train_stage2.py'),
                          [f'--{k}={v}' for k, v in settings.items()], settings_nan, settings_kill)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def read_log(out_dir):
    records = [json.loads(line) for line in open(os.path.join(out_dir, 'log.jsonl'))]
    return {r['step']: r for r in records if 'loss' in r}, [r for r in records if 'val_t2v_r1' in r]


@pytest.fixture(scope='module')
def stage2_files(demo_dir, tmp_path_factory):
    """8 training videos (of 8 classes), 4 of the images, the 12 validation videos, and a random
    tiny stage-1 checkpoint in our format -> 4 video + 2 image steps per epoch at 2 pairs per step.
    """
    folder = tmp_path_factory.mktemp('stage2')
    for name, count in (('captions_train.json', 8), ('captions_images.json', 4),
                        ('captions_val.json', None)):
        items = json.load(open(os.path.join(demo_dir, name)))[:count]
        json.dump(items, open(folder / name, 'w'))
    torch.manual_seed(0)
    config = model.get_config('tiny')
    torch.save({'model': model.VideoViT(config).state_dict(),
                'model_config': dataclasses.asdict(config)}, folder / 's1.pt')
    return dict(video_ann=folder / 'captions_train.json', video_root=demo_dir,
                val_ann=folder / 'captions_val.json', val_root=demo_dir,
                image_ann=folder / 'captions_images.json', image_root=demo_dir,
                init=folder / 's1.pt')


def test_resume_repeats_the_uninterrupted_run(stage2_files, tmp_path):
    """Killed after step 5 (checkpoint at 4), resumed across the epoch end: the same losses step
    for step and the same final weights. Step 3's loss is made NaN in both runs: its update is
    skipped, and counted."""
    full = run_stage2(tmp_path / 'full', stage2_files, nan_steps=(3,))
    assert ': 64 tensors (vit' in full.stdout and 'text_encoder.blocks.*.cross_attn' in full.stdout
    killed = tmp_path / 'killed'
    run_stage2(killed, stage2_files, nan_steps=(3,), ckpt_interval=4, max_steps=5)
    assert training.read_checkpoint(killed / 'last.pt')['step'] == 4
    resumed = run_stage2(killed, stage2_files, nan_steps=(3,), ckpt_interval=4)
    assert f'resumed from {killed / "last.pt"} at step 4' in resumed.stdout
    (a, val_a), (b, val_b) = read_log(tmp_path / 'full'), read_log(killed)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert a[3]['loss'] is None and a[3]['skipped_steps'] == 1 and a[12]['skipped_steps'] == 1
    fields = ('loss', 'vtc', 'vtm', 'mlm', 'uta', 'temp', 'grad_norm')
    for s in a:
        assert [a[s][k] for k in fields] == [b[s][k] for k in fields], f'step {s}'
    # epochs 1 and 2
    assert [r['val_t2v_r1'] for r in val_a] == [r['val_t2v_r1'] for r in val_b[-2:]]
    ckpt_a, ckpt_b = (training.read_checkpoint(d / 'last.pt') for d in (tmp_path / 'full', killed))
    assert all(torch.equal(ckpt_a['model'][k], ckpt_b['model'][k]) for k in ckpt_a['model'])
    # what evaluate.py does with it
    checkpoints.load_stage2(ckpt_a)


@pytest.mark.parametrize('overrides, world_size, message', [
    (['--init=no/such.pt'], 1, "INIT 'no/such.pt' not found: pass --init=CHECKPOINT"),
    (['--video_batch=6'], 4, 'VIDEO_BATCH=6 must be divisible by 4 processes'),
    (['--image_batch=2'], 2, 'at least 2 pairs per process'),
    (['--video_mask_ratio=1.0'], 1, 'VIDEO_MASK_RATIO=1.0 must lie strictly between 0 and 1'),
    (['--mask_type=block'], 1, "MASK_TYPE='block'"),
    ([f'--init={__file__}', '--video_ann=missing.json'], 1, "VIDEO_ANN 'missing.json' not found"),
])
def test_invalid_settings_fail_fast(overrides, world_size, message, monkeypatch):
    def too_late(*args, **kwargs):
        raise AssertionError('the script got past its checks')
    import data, teacher
    # nothing heavy may run before the checks
    monkeypatch.setattr(data, 'VideoText', too_late)
    monkeypatch.setattr(teacher, 'build_clip', too_late)
    script = os.path.join(ROOT, 'train_stage2.py')
    monkeypatch.setattr(sys, 'argv', [script, '--out_dir=/nonexistent/out'] + overrides)
    monkeypatch.setenv('WORLD_SIZE', str(world_size))          # read before init_process_group
    monkeypatch.delenv('RANK', raising=False)
    with pytest.raises(BadInput, match=message):
        runpy.run_path(script, run_name='__main__')
