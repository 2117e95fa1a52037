"""Guards the VideoMAE decoder and targets of model.py (the pixel and masked-token recovering rows
of the paper's Table 1) against numbers made by the official VideoMAE code inside the UMT repository
(single_modality/models/modeling_pretrain.py, engines/engine_for_pretraining.py), stored in
tests/fixtures/official_videomae_seed1.pt with random weights: the sin-cos tables, the student as
VideoMAE's encoder, the decoder's input order and every decoder stage, both pixel targets and both
MSE losses, for tubelet 1 and 2, tube and random masks. Also that the official masks fit our `keep`
convention, that the decoder's token order does not matter, the presets, and that decoder + targets
train. Values are always read from the file (other seeds of it must pass too), never hard-coded."""
import os

import pytest
import torch

import torch.nn.functional as F

from masking import tube_mask
from model import (CONFIGS, DECODERS, Decoder, VideoViT, VideoViTConfig, load_strict, masked_tokens,
                   pixel_targets, sincos_table)

REF = torch.load(os.path.join(os.path.dirname(__file__), 'fixtures', 'official_videomae_seed1.pt'))
CASES = sorted(REF['cases'])          # tube_t1, random_t1 (tubelet 1), tube_t2 (tubelet 2)
MODELS = sorted(REF['models'])        # tubelet1, tubelet2
# Everything is float32 on CPU. Tables, targets and losses follow the official arithmetic: 1e-5.
TOL = 1e-5


def max_diff(a, b):
    return (a - b).abs().max().item()


def close(a, b):
    """Activations: our student embeds tubelets with a Linear instead of Conv3d and both attention
    stacks go through SDPA, so float32 rounding differs by a few ulps of each value (decoder
    activations reach about 10): |a - b| <= 1e-5 + 1e-5 |b| elementwise."""
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def official_decoder_key(k):
    """Official key -> our Decoder's key (None for the encoder's keys)."""
    if k in ('mask_token', 'encoder_to_decoder.weight'):
        return k
    return k[len('decoder.'):] if k.startswith('decoder.') else None


def build(name):
    """Our student (as VideoMAE's encoder) and Decoder with the official weights of model `name`."""
    ref = REF['models'][name]
    c, sd = ref['config'], ref['state_dict']
    N = ref['encoder_pos_embed'].shape[1]
    encoder = VideoViT(VideoViTConfig(
        img_size=c['img_size'], patch_size=c['patch_size'], num_frames=c['num_frames'],
        tubelet_size=c['tubelet_size'], embed_dim=c['encoder_embed_dim'], depth=c['encoder_depth'],
        num_heads=c['encoder_num_heads'], mlp_ratio=c['mlp_ratio'], align_layers=0, drop_path=0))
    # Our student uses the official key names: only the 'encoder.' prefix goes.
    load_strict(encoder, {k[len('encoder.'):]: v for k, v in sd.items()
                          if k.startswith('encoder.')})
    assert c['mlp_ratio'] == 4
    decoder = Decoder(c['encoder_embed_dim'], c['decoder_num_classes'], N, c['decoder_embed_dim'],
                      c['decoder_num_heads'], c['decoder_depth'])
    load_strict(decoder, {official_decoder_key(k): v for k, v in sd.items()
                          if official_decoder_key(k) is not None})
    return encoder.eval(), decoder.eval()


@pytest.fixture(scope='module', params=CASES)
def case(request):
    """One fixture case plus our activations on it, caught by hooks at the official cut points."""
    ref = REF['cases'][request.param]
    encoder, decoder = build(ref['model'])
    got = {}
    def keep_output(key):
        return lambda mod, inputs, output: got.__setitem__(key, output)
    decoder.encoder_to_decoder.register_forward_hook(keep_output('encoder_to_decoder'))
    def keep_input(key):
        return lambda mod, inputs: got.__setitem__(key, inputs[0])
    decoder.blocks[0].register_forward_pre_hook(keep_input('decoder_input'))
    decoder.blocks[-1].register_forward_hook(keep_output('decoder_last_block'))
    decoder.norm.register_forward_hook(keep_output('decoder_norm'))
    keep = ref['visible_index']
    with torch.no_grad():
        got['encoder_x_vis'], _ = encoder(REF['video'], keep)
        got['output'] = decoder(got['encoder_x_vis'], keep)
    return request.param, ref, got, encoder, decoder


def test_fixture_covers_tubelets_and_mask_kinds():
    kinds = {(c['tubelet_size'], c['mask_generator'].split(':')[1].split('(')[0])
             for c in REF['cases'].values()}
    assert {(1, 'TubeMaskingGenerator'), (1, 'RandomMaskingGenerator'),
            (2, 'TubeMaskingGenerator')} <= kinds, kinds


def test_official_masks_fit_our_keep_convention(case):
    name, ref, _, _, _ = case
    mask, keep, N = ref['mask'], ref['visible_index'], ref['num_tokens']   # mask: True = hidden
    B = mask.shape[0]
    # Every sample keeps the same number of tokens, so `keep` is a rectangular [B, N_vis] tensor.
    assert (~mask).sum(1).eq(keep.shape[1]).all() and keep.shape[1] == ref['num_visible']
    for b in range(B):
        assert torch.equal(keep[b], (~mask[b]).nonzero()[:, 0])        # ascending kept indices
    assert torch.equal(masked_tokens(keep, N), ref['masked_index'])      # our complement, ascending
    assert torch.equal(torch.cat([keep, masked_tokens(keep, N)], 1), ref['decoder_token_position'])
    if 'Tube' in ref['mask_generator']:
        # Tube: the same spatial pattern in every temporal slot.
        slots = mask.view(B, REF['geometry']['T'] // ref['tubelet_size'], -1)  # [B, t, h*w]
        assert (slots == slots[:, :1]).all()


@pytest.mark.parametrize('name', MODELS)
def test_sincos_tables(name):
    ref = REF['models'][name]
    N = ref['encoder_pos_embed'].shape[1]
    encoder, decoder = build(name)
    table = sincos_table(N, ref['encoder_pos_embed'].shape[2])           # [N, D]
    assert max_diff(table, ref['encoder_pos_embed'][0]) <= TOL
    assert max_diff(encoder.pos_embed, ref['encoder_pos_embed'][0]) <= TOL
    assert max_diff(decoder.pos_embed, ref['decoder_pos_embed'][0]) <= TOL
    assert 'pos_embed' not in decoder.state_dict()                       # fixed, never saved


@pytest.mark.parametrize('key', ['encoder_x_vis', 'encoder_to_decoder', 'decoder_input',
                                 'decoder_last_block', 'decoder_norm', 'output'])
def test_encoder_and_decoder_match_official(case, key):
    name, ref, got, _, _ = case
    assert got[key].shape == ref[key].shape, (name, key)
    print(f'{name} {key}: max |diff| {max_diff(got[key], ref[key]):.2e}')
    assert close(got[key], ref[key]), (name, key, max_diff(got[key], ref[key]))


def test_pixel_targets_and_losses_match_official(case):
    name, ref, got, _, _ = case
    t, p = ref['tubelet_size'], REF['geometry']['patch_size']
    masked = masked_tokens(ref['visible_index'], ref['num_tokens'])
    for normalize, suffix in ((True, 'normalized'), (False, 'unnormalized')):
        target = pixel_targets(REF['video'], masked, t, p, normalize=normalize)
        diff = max_diff(target, ref[f'target_{suffix}'])
        loss = F.mse_loss(got['output'], target)  # the official nn.MSELoss()
        loss_diff = abs(loss.item() - ref[f'loss_{suffix}'].item())
        print(f'{name} target_{suffix}: {diff:.2e}, loss_{suffix}: {loss_diff:.2e}')
        assert target.shape == ref[f'target_{suffix}'].shape
        assert diff <= TOL and loss_diff <= TOL, (name, suffix, diff, loss_diff)
        # the loss alone, on the official output and target
        official = F.mse_loss(ref['output'], ref[f'target_{suffix}'])
        assert abs(official - ref[f'loss_{suffix}']) <= 1e-6


def test_decoder_token_order_does_not_matter(case):
    """The official order (visible first) and raster order give the same predictions: no position
    enters the decoder but the added table."""
    name, ref, got, _, dec = case
    keep, N = ref['visible_index'], ref['num_tokens']
    masked = masked_tokens(keep, N)
    x = got['decoder_input']                                    # [B, N, width], official order
    order = torch.cat([keep, masked], 1)                                 # [B, N], token of each row
    raster = torch.empty_like(x).scatter(1, order[:, :, None].expand_as(x), x)  # [B, N, width]
    with torch.no_grad():
        for blk in dec.blocks:
            raster = blk(raster)
        out = dec.head(dec.norm(raster.gather(1, masked[:, :, None].expand(-1, -1, x.shape[2]))))
    print(f'{name} raster order vs official order: max |diff| {max_diff(out, got["output"]):.2e}')
    assert close(out, got['output']), name


def test_masked_tokens_is_the_sorted_complement():
    keep = tube_mask(3, 4, 49, 0.9)                                      # [3, 4*5]
    masked = masked_tokens(keep, 4 * 49)
    assert masked.shape == (3, 4 * 49 - keep.shape[1])
    assert (masked.diff(dim=1) > 0).all()                                # ascending, no duplicates
    both = torch.cat([keep, masked], 1).sort(dim=1).values
    assert torch.equal(both, torch.arange(4 * 49).expand(3, -1))         # disjoint and complete


def test_decoder_presets():
    # The paper's B/16 and L/16 decoders are VideoMAE's (pretrain_videomae_{base,large}_patch16_224,
    # decoder_depth 4); tiny is ours. Every student preset has one.
    assert DECODERS['vit_b16'] == (384, 6, 4) and DECODERS['vit_l16'] == (512, 8, 4)
    assert set(DECODERS) == set(CONFIGS)
