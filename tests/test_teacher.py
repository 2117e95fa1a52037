"""Guards teacher.py: the hand-written frame-wise CLIP forward must equal open_clip's own forward (targets)
and nn.MultiheadAttention's weights (CLS attention), gathering before ln_post must not change the
targets, bad inputs and GELU/QuickGELU mix-ups must fail loudly, and bf16 autocast must keep attn fp32.
Everything uses the tiny CLIP (64 px, patch 8) with random weights: no downloads (test_demo.py trains one)."""
import pytest
import torch
import torch.nn.functional as F

import demo
import teacher as tm

MEAN_IN, STD_IN, MEAN_CLIP, STD_CLIP = (torch.tensor(c).view(1, 3, 1, 1, 1) for c in
                                        (tm.IMAGENET_MEAN, tm.IMAGENET_STD, tm.CLIP_MEAN, tm.CLIP_STD))


def clip_to_imagenet(x):
    """[B, 3, T, H, W] CLIP-normalized -> ImageNet-normalized, i.e. what the data pipeline would give."""
    return (x * STD_CLIP + MEAN_CLIP - MEAN_IN) / STD_IN


def reference(teacher, x_clip, K):
    """open_clip's own forward on CLIP-normalized frames x_clip [B, 3, T, S, S] (S = native size):
    targets [K, B, N, C] and last-block CLS attention [B, T, h*w] via nn.MultiheadAttention."""
    B, _, T, S, _ = x_clip.shape
    v = demo.tiny_clip().visual  # a fresh, identical (seeded) CLIP: the teacher folded QuickGELU into SiLU in its own
    assert isinstance(teacher.visual.transformer.resblocks[0].mlp.gelu, torch.nn.SiLU)
    frames = x_clip.transpose(1, 2).reshape(B * T, 3, S, S)
    out = v.forward_intermediates(frames, indices=K + 1, output_fmt='NLC', output_extra_tokens=True)
    inter, pre = out['image_intermediates'], out['image_intermediates_prefix']  # last K+1 blocks
    tgt = torch.stack([F.normalize(v.ln_post(t) @ v.proj, dim=-1) for t in inter[1:]])  # [K, B*T, hw, C]
    tgt = tgt.reshape(K, B, -1, tgt.shape[-1])  # [K, B, T*hw, C]
    y = v.transformer.resblocks[-1].ln_1(torch.cat([pre[-2], inter[-2]], 1))  # input of the last block
    attn = v.transformer.resblocks[-1].attn(y, y, y, need_weights=True, average_attn_weights=True)[1][:, 0, 1:]
    return tgt, attn.reshape(B, T, -1)


@pytest.fixture(scope='module')
def teacher():
    return tm.CLIPTeacher(demo.tiny_clip(), align_layers=2)


def test_matches_open_clip_forward_and_mha_attention(teacher):
    torch.manual_seed(0)
    x_clip = torch.randn(2, 3, 3, 64, 64)
    targets, attn = teacher(clip_to_imagenet(x_clip))
    ref_t, ref_a = reference(teacher, x_clip, K=2)
    assert targets.shape == (2, 2, 3 * 8 * 8, 64) and attn.shape == (2, 3, 64)
    torch.testing.assert_close(targets, ref_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn, ref_a, atol=1e-6, rtol=1e-5)
    assert torch.allclose(targets.norm(dim=-1), torch.ones(()), atol=1e-5)


def test_resizes_frames_to_teacher_resolution(teacher):
    torch.manual_seed(1)
    x_clip = torch.randn(1, 3, 2, 48, 48)  # off-size clip: the teacher resizes it to 64 px (bicubic)
    targets, attn = teacher(clip_to_imagenet(x_clip))
    B, C, T, H, W = x_clip.shape
    big = F.interpolate(x_clip.transpose(1, 2).reshape(B * T, C, H, W), size=(64, 64), mode='bicubic',
                        align_corners=False).view(B, T, C, 64, 64).transpose(1, 2)
    ref_t, ref_a = reference(teacher, big, K=2)
    torch.testing.assert_close(targets, ref_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn, ref_a, atol=1e-6, rtol=1e-5)


def test_targets_with_keep_equal_gathered_full_targets(teacher):
    torch.manual_seed(2)
    hidden, _ = teacher.encode(torch.randn(2, 3, 2, 64, 64))  # [K, B, N, E], N = 128
    keep = torch.stack([torch.randperm(128)[:40].sort().values for _ in range(2)])  # [B, 40]
    full = teacher.targets(hidden)  # [K, B, N, C]
    kept = teacher.targets(hidden, keep)  # [K, B, 40, C]
    assert kept.shape == (2, 2, 40, 64)
    torch.testing.assert_close(kept, full[:, torch.arange(2)[:, None], keep])


def test_image_size_resizes_positional_embedding():
    t = tm.CLIPTeacher(demo.tiny_clip(), align_layers=1, image_size=56)  # 56 / 8 = 7x7 grid instead of 8x8
    pos, old = t.pos_resized, t.visual.positional_embedding
    assert pos.shape == (1 + 49, 64) and torch.equal(pos[0], old[0])  # CLS row kept as is
    assert tm.CLIPTeacher(demo.tiny_clip(), align_layers=1).pos_resized is None  # native size: nothing resized
    torch.testing.assert_close(tm.resize_pos_embed(old, 8), old)  # same grid: bicubic is the identity
    targets, attn = t(torch.randn(2, 3, 4, 64, 64))  # the 64-px clip is resized down to 56
    assert targets.shape == (1, 2, 4 * 49, 64) and attn.shape == (2, 4, 49)
    assert torch.isfinite(targets).all() and (attn > 0).all() and (attn.sum(-1) < 1).all()
    with pytest.raises(ValueError, match='multiple of the patch size'):
        tm.CLIPTeacher(demo.tiny_clip(), align_layers=1, image_size=60)


def test_bad_inputs_and_arguments_raise(teacher):
    with pytest.raises(ValueError, match=r'\[B, 3, T, H, W\]'):
        teacher.encode(torch.randn(2, 3, 64, 64))  # an image batch, no time axis
    with pytest.raises(ValueError, match=r'\[B, 3, T, H, W\]'):
        teacher.encode(torch.randn(2, 4, 2, 64, 64))  # 4 channels
    for bad in (0, 5, 2.0):
        with pytest.raises(ValueError, match='align_layers'):
            tm.CLIPTeacher(demo.tiny_clip(), align_layers=bad)


def test_frozen_deterministic_and_no_grad(teacher):
    teacher.train()
    assert not teacher.training and not teacher.visual.training  # train() keeps the teacher in eval
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not hasattr(teacher, 'transformer')  # text tower not kept
    a, b = demo.tiny_clip(), demo.tiny_clip()  # seeded: a resumed demo rebuilds the same teacher
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    targets, attn = teacher(torch.randn(1, 3, 1, 64, 64, requires_grad=True))
    assert not targets.requires_grad and not attn.requires_grad


def test_quickgelu_check():
    tm.check_quickgelu(demo.tiny_clip(quick_gelu=True))  # passes
    with pytest.raises(ValueError, match='-quickgelu'):
        tm.check_quickgelu(demo.tiny_clip(quick_gelu=False))


def test_build_clip_checks_quickgelu_for_weight_files(monkeypatch, tmp_path):
    # open_clip builds nn.GELU for 'ViT-B-16' + a file, silently; build_clip must refuse it.
    weights = tmp_path / 'weights.bin'
    weights.write_bytes(b'')
    monkeypatch.setattr(tm.open_clip, 'create_model', lambda name, pretrained: demo.tiny_clip(quick_gelu=False))
    with pytest.raises(ValueError, match='QuickGELU'):
        tm.build_clip('ViT-B-16', str(weights))
    tm.build_clip('ViT-B-16', None)  # random weights: GELU is fine, no check


def test_missing_weights_file_gives_hint(tmp_path):
    missing = str(tmp_path / 'no_such_weights.bin')  # open_clip rejects it before any download
    with pytest.raises(ValueError, match='open_clip_pytorch_model.bin') as err:
        tm.build_clip('ViT-B-16-quickgelu', missing)
    assert 'quickgelu' in str(err.value) and missing in str(err.value)


def test_autocast_bf16_on_cpu(teacher):
    torch.manual_seed(3)
    video = torch.randn(1, 3, 2, 64, 64)
    ref_t, ref_a = teacher(video)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        targets, attn = teacher(video)
    assert attn.dtype == torch.float32 and targets.dtype == torch.float32
    assert (targets * ref_t).sum(-1).min() > 0.98  # cosine to the fp32 targets
    torch.testing.assert_close(attn, ref_a, atol=2e-2, rtol=0.1)
