"""Guards the student (model.py): shapes, attention maths, the UTA loss, bad input; and the official checkpoint
layouts it loads through util/checkpoints.load."""
import math

import pytest
import torch
import torch.nn.functional as F

from util import configurator
from util import checkpoints
from model import CONFIGS, Attention, VideoClassifier, VideoViT, get_config, sincos_table, uta_loss


def tiny(**kw):
    torch.manual_seed(0)
    return VideoViT(get_config('tiny', **kw)).eval()


def test_shapes_with_and_without_keep():
    m = tiny()
    video = torch.randn(2, 3, 8, 64, 64)               # 8 x 8 x 8 = 512 tokens
    x, aligned = m(video)
    assert x.shape == (2, 512, 96) and aligned.shape == (2, 2, 512, 64)
    assert torch.allclose(aligned.norm(dim=-1), torch.ones(2, 2, 512), atol=1e-5)
    keep = torch.stack([torch.randperm(512)[:40].sort().values for _ in range(2)])
    x, aligned = m(video, keep)
    assert x.shape == (2, 40, 96) and aligned.shape == (2, 2, 40, 64)
    # keeping every token is the same as no mask
    full = torch.arange(512).expand(2, -1)
    assert torch.allclose(m(video, full)[1], m(video)[1], atol=1e-5)


def test_other_frame_counts_and_no_heads():
    m = tiny(align_layers=0)
    x, aligned = m(torch.randn(1, 3, 1, 64, 64))       # an image is a 1-frame video
    assert x.shape == (1, 64, 96) and aligned is None
    assert m(torch.randn(1, 3, 16, 64, 64))[0].shape == (1, 1024, 96)  # longer than the table: regenerated


def test_sincos_table():
    t = sincos_table(10, 8)
    assert torch.equal(t[0], torch.tensor([0., 1.] * 4))
    assert math.isclose(t[3, 2].item(), math.sin(3 / 10000 ** (2 / 8)), rel_tol=1e-6)
    assert math.isclose(t[3, 5].item(), math.cos(3 / 10000 ** (4 / 8)), rel_tol=1e-6)
    assert torch.equal(sincos_table(20, 8)[:10], t)     # rows do not depend on the length


def test_attention_matches_naive_softmax():
    torch.manual_seed(0)
    attn = Attention(32, 4)
    torch.nn.init.normal_(attn.q_bias), torch.nn.init.normal_(attn.v_bias)
    x = torch.randn(2, 7, 32)
    q, k, v = F.linear(x, attn.qkv.weight).chunk(3, dim=-1)
    q, v = q + attn.q_bias, v + attn.v_bias               # no key bias
    split = lambda t: t.view(2, 7, 4, 8).transpose(1, 2)
    w = (split(q) @ split(k).transpose(-1, -2) / math.sqrt(8)).softmax(-1)
    ref = attn.proj((w @ split(v)).transpose(1, 2).reshape(2, 7, 32))
    assert torch.allclose(attn(x), ref, atol=1e-5)


def test_uta_loss_is_mse_of_unit_vectors():
    s, t = F.normalize(torch.randn(3, 2, 5, 16), dim=-1), F.normalize(torch.randn(3, 2, 5, 16), dim=-1)
    mse = ((s - t) ** 2).sum(-1).mean()
    assert torch.allclose(uta_loss(s, t), mse, atol=1e-6)
    assert uta_loss(s, s).abs() < 1e-6
    assert uta_loss(s, t, per_layer=True).shape == (3,)


def test_activation_checkpointing_same_gradients():
    video = torch.randn(1, 3, 2, 64, 64)
    grads = []
    for n in (0, 3):
        m = tiny(checkpoint_blocks=n).train()
        m(video)[1].sum().backward()
        grads.append(m.blocks[0].attn.qkv.weight.grad)
    assert torch.allclose(*grads, atol=1e-5)


def test_paper_parameter_counts():
    with torch.device('meta'):
        b, l = VideoViT(CONFIGS['vit_b16']), VideoViT(CONFIGS['vit_l16'])
    count = lambda m, skip='clip_decoder': sum(p.numel() for n, p in m.named_parameters() if not n.startswith(skip))
    assert (count(b), count(b, 'none')) == (85_637_376, 88_005_888)   # the paper's UMT-B size
    assert (count(l), count(l, 'none')) == (303_074_304, 307_806_720)


def official_stage1_keys(D, depth, K, C, patch=8):
    """The official stage-1 key layout, written out independently of model.py."""
    sd = {'encoder.patch_embed.proj.weight': (D, 3, 1, patch, patch), 'encoder.patch_embed.proj.bias': (D,)}
    for i in range(depth):
        p = f'encoder.blocks.{i}.'
        sd.update({p + 'norm1.weight': (D,), p + 'norm1.bias': (D,), p + 'attn.q_bias': (D,), p + 'attn.v_bias': (D,),
                   p + 'attn.qkv.weight': (3 * D, D), p + 'attn.proj.weight': (D, D), p + 'attn.proj.bias': (D,),
                   p + 'norm2.weight': (D,), p + 'norm2.bias': (D,), p + 'mlp.fc1.weight': (4 * D, D),
                   p + 'mlp.fc1.bias': (4 * D,), p + 'mlp.fc2.weight': (D, 4 * D), p + 'mlp.fc2.bias': (D,)})
    sd.update({'encoder.norm.weight': (D,), 'encoder.norm.bias': (D,)})
    for k in range(K):
        sd.update({f'clip_decoder.{k}.head.weight': (C, D), f'clip_decoder.{k}.head.bias': (C,),
                   f'clip_decoder.{k}.norm.weight': (C,), f'clip_decoder.{k}.norm.bias': (C,)})
    return {k: torch.randn(s) for k, s in sd.items()}


def test_vit_b16_has_the_official_key_layout():
    with torch.device('meta'):
        own = VideoViT(CONFIGS['vit_b16']).state_dict()
    with torch.device('meta'):
        ref = official_stage1_keys(768, 12, 6, 512, patch=16)
    assert len(ref) == 184
    assert {('encoder.' + k if not k.startswith('clip_decoder') else k): tuple(v.shape) for k, v in own.items()} \
        == {k: tuple(v.shape) for k, v in ref.items()}


@pytest.mark.parametrize('wrap', [None, 'model', 'module'])
def test_load_official_stage1(wrap):
    sd = official_stage1_keys(96, 4, 2, 64)
    model, report = checkpoints.load_vit(sd if wrap is None else {wrap: sd}, img_size=64, num_heads=3)
    assert 'unused: none' in report and 'new: none' in report
    assert isinstance(model, VideoViT) and model.config.align_layers == 2
    assert torch.equal(model.blocks[3].attn.q_bias, sd['encoder.blocks.3.attn.q_bias'])
    assert torch.equal(model.clip_decoder[1].norm.weight, sd['clip_decoder.1.norm.weight'])


def test_load_official_stage2_reports_unused():
    sd = {'vision_encoder.' + k: v for k, v in official_stage1_keys(96, 4, 2, 64).items()}
    sd.update({'vision_encoder.pool_norm.weight': torch.ones(96), 'text_encoder.bert.x': torch.zeros(2),
               'temp': torch.tensor(0.07)})
    model, report = checkpoints.load_vit(sd, img_size=64, num_heads=3)
    assert isinstance(model, VideoViT)
    assert 'unused: vision_encoder.* (1), text_encoder.* (1), temp' in report


def test_load_official_finetuned_with_pos_embed():
    sd = {k[len('encoder.'):]: v for k, v in official_stage1_keys(96, 4, 0, 64).items() if k.startswith('encoder.')}
    del sd['norm.weight'], sd['norm.bias']                           # fine-tuned models have no final norm
    sd.update({'fc_norm.weight': torch.ones(96), 'fc_norm.bias': torch.zeros(96), 'head.weight': torch.randn(5, 96),
               'head.bias': torch.randn(5), 'pos_embed': torch.randn(1, 16 * 64, 96)})   # 16 frames
    model, report = checkpoints.load_classifier({'module': sd}, img_size=64, num_heads=3, stored_table=True)
    assert isinstance(model, VideoClassifier) and 'unused: none' in report
    assert model.backbone.config.num_frames == 16
    assert torch.equal(model.backbone.pos_embed, sd['pos_embed'][0])
    assert torch.equal(model.head.weight, sd['head.weight'])
    assert model.eval()(torch.randn(2, 3, 16, 64, 64)).shape == (2, 5)


def test_load_official_wrong_shape_names_the_key():
    sd = official_stage1_keys(96, 4, 2, 64)
    sd['encoder.blocks.2.mlp.fc2.weight'] = torch.randn(96, 100)
    with pytest.raises(configurator.BadInput, match=r'blocks\.2\.mlp\.fc2\.weight'):
        checkpoints.load_vit(sd, img_size=64, num_heads=3)


def test_bad_input_is_rejected():
    m = tiny()
    with pytest.raises(ValueError, match='B, 3, T, H, W'):
        m(torch.randn(3, 8, 64, 64))
    with pytest.raises(ValueError, match='B, 3, T, H, W'):
        m(torch.randn(1, 1, 8, 64, 64))
    with pytest.raises(ValueError, match='divisible'):
        m(torch.randn(1, 3, 8, 60, 64))
    with pytest.raises(ValueError, match='tubelet'):
        VideoViT(get_config('tiny', tubelet_size=2))(torch.randn(1, 3, 3, 64, 64))
    with pytest.raises(ValueError, match='keep'):
        m(torch.randn(1, 3, 8, 64, 64), torch.zeros(1, 10, dtype=torch.int32))
    with pytest.raises(ValueError, match='keep'):
        m(torch.randn(1, 3, 8, 64, 64), torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match='align_layers'):
        VideoViT(get_config('tiny', align_layers=5))
    with pytest.raises(ValueError, match='unknown model preset'):
        get_config('vit_h14')


@pytest.mark.parametrize('tubelet', [1, 2])
def test_patch_embedding_equals_the_official_conv3d(tubelet):
    m = tiny(align_layers=0, tubelet_size=tubelet)
    m.blocks, m.norm = torch.nn.ModuleList(), torch.nn.Identity()       # leave only embedding + position table
    video = torch.randn(2, 3, 4, 64, 64)
    ref = m.patch_embed.proj(video).flatten(2).transpose(1, 2)          # [B, N, D], the official Conv3d path
    ref = ref + sincos_table(ref.shape[1], 96)
    x, _ = m(video)
    torch.testing.assert_close(x, ref, atol=1e-4, rtol=1e-4)
    keep = torch.tensor([[0, 5, 17, 30], [1, 2, 3, 31]])
    torch.testing.assert_close(m(video, keep)[0], ref.gather(1, keep[..., None].expand(-1, -1, 96)), atol=1e-4,
                               rtol=1e-4)
