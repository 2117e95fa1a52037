"""Guards the official stage-2 and QA checkpoints in this project (issue: UMT with either text
side): UMT with the BERT text side gives the official VTC, VTM and MLM losses (tests/fixtures/
official_bert_seed1.pt), with the official MLM corruption rules; an official-layout stage-2
checkpoint (the fixture's BERT, a tiny random video encoder) loads strictly, key for key, and runs
`evaluate.py retrieval`, `python -m tasks.video_qa mc` and `evaluate.py features --text` end to end
on the demo videos; an official-layout QA checkpoint runs `python -m tasks.video_qa qa`; QA
fine-tuning starts from an official stage-2 model through the official key mapping;
`train_stage2.py --preset=demo --text_encoder=bert` trains a tiny random BERT offline and its loss
falls; hf://OWNER/REPO/FILE is fetched by huggingface_hub (mocked here) and offline gives a short
message. Nothing is downloaded: huggingface_hub.hf_hub_download fails in every test that does not
mock it."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import evaluate
import faults
import tasks.video_qa as Q
import video_language as M
from model import VideoViT, VideoViTConfig, get_config
from util import bert, checkpoints
from util.configurator import BadInput
from util.wordpiece import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, 'tests', 'fixtures', 'official_bert_seed1.pt')


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any download attempt fails, as it would without a network."""
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError('offline (tests)')
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', no_network)


@pytest.fixture(scope='module')
def ref():
    return torch.load(FIXTURE)


@pytest.fixture(scope='module')
def vocab_file(ref, tmp_path_factory):
    """The fixture's synthetic WordPiece vocabulary (bert-base-uncased's special ids) as a file."""
    path = tmp_path_factory.mktemp('vocab') / 'vocab.txt'
    path.write_text('\n'.join(ref['tokenizer']['vocab']) + '\n', encoding='utf-8')
    return str(path)


def official_vision(width, depth, align_layers, teacher_dim=32, seed=0):
    """A tiny random video encoder (patch 16, one head: width / 64 as the loader infers) -> its
    config and its weights under the official stage-2 names vision_encoder.encoder.*,
    vision_encoder.clip_decoder.*"""
    torch.manual_seed(seed)
    config = VideoViTConfig(img_size=64, patch_size=16, num_frames=4, embed_dim=width, depth=depth,
                            num_heads=1, align_layers=align_layers, teacher_dim=teacher_dim,
                            drop_path=0.0)
    sd = {('vision_encoder.' if k.startswith('clip_decoder.') else 'vision_encoder.encoder.') + k: v
          for k, v in VideoViT(config).state_dict().items()}
    return config, sd


@pytest.fixture(scope='module')
def stage2_file(ref, tmp_path_factory):
    """An official stage-2 checkpoint ({'model': state dict}): the fixture's BERT and heads, a tiny
    random video encoder of the fixture's vision width (48), its pool_norm, and a few teacher keys.
    """
    config, sd = official_vision(48, 2, 1)
    sd.update({'vision_encoder.pool_norm.weight': 1 + 0.1 * torch.randn(48),
               'vision_encoder.pool_norm.bias': 0.1 * torch.randn(48),
               'clip_teacher.proj': torch.randn(8, 4),
               'clip_teacher.ln_post.weight': torch.ones(8)})
    sd.update(ref['state_dict'])
    official = {k for k, _, _ in ref['stage2_checkpoint_keys']}
    assert set(sd) - official == {'clip_teacher.proj', 'clip_teacher.ln_post.weight'}
    assert all(tuple(sd[k].shape) == tuple(s) for k, s, _ in ref['stage2_checkpoint_keys'])
    path = tmp_path_factory.mktemp('official') / 'b16_5m.pth'
    torch.save({'model': sd}, path)
    return str(path), sd


def umt_with_bert(ref, vocab):
    """UMT with the fixture's BERT (its 4 heads), heads and temperature, and a video encoder of
    width 48 (unused: the tests feed the fixture's video tokens)."""
    sd = ref['state_dict']
    cfg = bert.bert_config(bert.sub_state_dict(sd, 'text_encoder.bert.'),
                           heads=ref['config']['num_attention_heads'])
    vision = dataclasses.asdict(official_vision(48, 1, 0)[0])
    umt = M.UMT.from_configs(vision, dict(text_encoder='bert', bert=dataclasses.asdict(cfg),
                                          vocab=vocab, embed_dim=len(sd['text_proj.bias'])))
    video_side = {k: v for k, v in umt.state_dict().items()
                  if k.startswith(('vision_encoder.', 'pool_norm.'))}
    umt.load_state_dict({**video_side, **sd}, strict=True)
    return umt.eval()


@torch.no_grad()
def test_umt_with_bert_gives_the_official_losses(ref, monkeypatch):
    """UMT.forward with the BERT text side, on the fixture's video tokens, its hard negatives and
    its MLM corruption, returns the official VTC, VTM and MLM losses; MLM asks the text side for
    BERT's ids ([MASK] 103, [PAD] and [CLS] never masked, random ids from the whole vocabulary)."""
    x, umt = ref['inputs'], umt_with_bert(ref, ref['tokenizer']['vocab'])
    B = len(x['idx'])
    umt.encode_video = lambda video, keep, per_frame: (
        x['vision_embeds'], None, umt.vision_proj(x['pooled_vision_embeds'][:, 0]))
    ar = torch.arange(B)
    negatives = (torch.cat([ar, ref['vtm']['vision_neg_indices'], ar]),
                 torch.cat([ar, ar, ref['vtm']['text_neg_indices']]),
                 torch.cat([torch.ones(B), torch.zeros(2 * B)]).long())
    monkeypatch.setattr(M, 'vtm_pairs', lambda sim, ids: negatives)
    asked = {}

    def official_corruption(ids, mask, prob, **special):
        asked.update(special, prob=prob)
        return ref['mlm']['input_ids'], ref['mlm']['labels']
    monkeypatch.setattr(M, 'mask_text', official_corruption)
    losses = umt(None, 'masked', None, x['input_ids'], x['attention_mask'].bool(), x['idx'], 0.5)
    official = [ref['vtc']['loss'], ref['vtm']['loss'], ref['mlm']['loss'], torch.tensor(0.0)]
    torch.testing.assert_close(losses, torch.stack(official), atol=1e-5, rtol=1e-5)
    assert asked == dict(mask_id=103, never=(0, 101), random_ids=(0, 329), prob=0.5)
    assert torch.equal(umt.temp, ref['state_dict']['temp'])


def test_bert_mlm_corruption_rules(ref):
    """mask_text with the BERT side's ids: half the tokens picked, never [PAD] / [CLS] (also a
    literal [PAD] inside the text), 80% [MASK] = 103, 10% random ids from the whole vocabulary."""
    tok = Tokenizer(ref['tokenizer']['vocab'])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(104, 329, (400, 32), generator=g)
    ids[:, 0], ids[:, 20:] = 101, 0                                     # [CLS] ... padding
    ids[:, 5] = 0                                                       # a literal [PAD], mask 1
    mask = torch.arange(32)[None] < 20
    masked, labels = M.mask_text(ids, mask, 0.5, g, **tok.mlm_ids)
    picked = labels != -100
    assert not picked[:, 0].any() and not picked[:, 5].any() and not picked[:, 20:].any()
    rate = picked.sum() / (400 * 18)
    as_mask = (masked[picked] == 103).float().mean()
    replaced = picked & (masked != 103) & (masked != ids)
    assert abs(rate - 0.5) < 0.02 and abs(as_mask - 0.8) < 0.02
    assert abs(replaced.sum() / picked.sum() - 0.1) < 0.02
    assert (masked[replaced] < 100).any() and (masked[replaced] >= 0).all()  # special ids too


def test_official_stage2_checkpoint_loads_key_for_key(ref, stage2_file, vocab_file, demo_dir):
    """load_stage2 on the official layout: strict, every model tensor from the file, the teacher
    reported unused; the text side is BERT ([CLS] for VTC and VTM), the video encoder the file's,
    pool_norm the file's vision_encoder.pool_norm; saved and loaded again as our own BERT
    checkpoint (vocabulary inside), the same model."""
    path, sd = stage2_file
    umt, report = checkpoints.load_stage2(path, vocab=vocab_file, img_size=64)
    umt.eval()  # BERT's dropout off
    assert report[0].startswith(f'loaded {path}: {len(sd) - 2} tensors (official stage 2')
    assert report[1:3] == ['new: none', 'unused: clip_teacher.* (2)']
    assert report[3] == f'vocabulary: {vocab_file} (329 tokens)'
    own = umt.state_dict()
    for k, v in sd.items():  # our name of each official key holds its tensor
        if not k.startswith('clip_teacher.'):
            ours = checkpoints.official_stage2({k: v})[0]
            assert len(ours) == 1 and torch.equal(own[next(iter(ours))], v), k
    # the text side against a BertLM of the file's weights (1 head: width / 64, as the loader)
    lm = bert.BertLM(bert.bert_config(bert.sub_state_dict(sd, 'text_encoder.bert.'))).eval()
    lm.load_state_dict(bert.sub_state_dict(sd, 'text_encoder.'))
    ids, mask = umt.tokenizer(['a red square moving up', 'a dog'], 32)
    with torch.no_grad():
        hidden, feat = umt.encode_text(ids, mask)
        h = lm.bert(ids, mask, mode='text')
        torch.testing.assert_close(feat, F.linear(h[:, 0], sd['text_proj.weight'],
                                                  sd['text_proj.bias']))
        video = torch.randn(2, 3, 4, 64, 64)
        x_vis, _, v = umt.encode_video(video, per_frame=True)
        fused = lm.bert(None, mask, x_vis, mode='fusion', text_embeds=h)
        itm = F.linear(fused[:, 0], sd['itm_head.weight'], sd['itm_head.bias'])
        torch.testing.assert_close(umt.itm_logits(hidden, mask, x_vis), itm)
        pooled = F.layer_norm(x_vis.unflatten(1, (4, -1)).mean(2), (48,),
                              sd['vision_encoder.pool_norm.weight'],
                              sd['vision_encoder.pool_norm.bias'], 1e-6)
        torch.testing.assert_close(v, F.linear(pooled, sd['vision_proj.weight'],
                                               sd['vision_proj.bias']))
    again, _ = checkpoints.load_stage2({
        'model': umt.state_dict(), 'text_config': umt.text_config,
        'model_config': dataclasses.asdict(umt.vision_encoder.config)})
    assert again.tokenizer.tokens == umt.tokenizer.tokens
    with torch.no_grad():
        assert torch.equal(again.eval().encode_text(ids, mask)[1], feat)
    with pytest.raises(BadInput, match='cannot fetch vocab.txt from the Hugging Face repo '
                       'google-bert/bert-base-uncased'):     # offline, and no --vocab
        checkpoints.load_stage2(path, vocab=bert.VOCAB)


def test_official_stage2_retrieval_mc_and_features(stage2_file, vocab_file, demo_dir, tmp_path,
                                                   capsys):
    """The commands on an official stage-2 checkpoint, end to end on the demo videos: retrieval
    (VTC, then VTM re-ranking), multiple choice, and features with text embeddings (video features
    alone need no vocabulary)."""
    path, _ = stage2_file
    common = ['--ckpt', path, '--root', demo_dir, '--size', '64', '--workers', '0', '--device',
              'cpu']
    ann = os.path.join(demo_dir, 'captions_val.json')
    res = evaluate.main(['retrieval', '--ann', ann, '--vocab', vocab_file, '--k_test', '4',
                         '--protocol', 'anet', *common])
    out = capsys.readouterr().out
    assert 'official stage 2' in out and 'unused: clip_teacher.* (2)' in out
    assert "captions cut at 64 tokens (the text side's positions), not 150" in out
    assert res['num_videos'] == res['num_texts'] == 12
    assert set(res['vtc']) == set(res['reranked']) and 0 <= res['reranked']['t2v_R@1'] <= 100
    records = json.load(open(ann))[:5]
    mc = [{'video': r['video'], 'caption': [r['caption']] + [o['caption'] for o in records
                                                             if o is not r][:3], 'answer': 0}
          for r in records]
    json.dump(mc, open(tmp_path / 'mc.json', 'w'))
    res = Q.main(['mc', '--ann', str(tmp_path / 'mc.json'), '--vocab', vocab_file, '--frames', '4',
                  *common])
    assert res['num_questions'] == 5 and res['chance'] == 25.0
    video = os.path.join(demo_dir, records[0]['video'])
    feats = evaluate.main(['features', '--ckpt', path, video, '--vocab', vocab_file, '--text',
                           'a red square', '--text', 'a blue square', '--size', '64', '--out',
                           str(tmp_path / 'f.pt')])
    assert feats['text_embed'].shape == (2, 32) and feats['embed'].shape == (1, 8, 32)
    assert torch.allclose(feats['text_embed'].norm(dim=-1), torch.ones(2))
    feats = evaluate.main(['features', '--ckpt', path, video, '--size', '64', '--out',
                           str(tmp_path / 'g.pt')])                         # no text, no vocab
    assert 'text_embed' not in feats and feats['embed'].shape == (1, 8, 32)


def test_official_qa_checkpoint_evaluates(ref, vocab_file, demo_dir, tmp_path, capsys):
    """An official QA checkpoint (text_encoder.*, text_decoder.bert.*, text_decoder.cls.*, the video
    encoder of width 64) loads strictly as BertUMTQA and answers the demo questions with
    rank_answer over the answer list, answers ending in ' [SEP]'."""
    config, vision = official_vision(64, 1, 0)
    sd = {**vision, **ref['qa']['state_dict']}
    torch.save({'model': sd}, tmp_path / 'qa.pth')
    qa, report = Q.load_qa(str(tmp_path / 'qa.pth'), vocab=vocab_file)
    assert report[0].startswith(f'loaded {tmp_path / "qa.pth"}: {len(sd)} tensors (official QA')
    assert report[1] == 'unused: none' and isinstance(qa, Q.BertUMTQA)
    assert qa.tokenizer.answer_eos == ' [SEP]'
    ids = Q.tokenize_answers(['guitar'], qa.tokenizer, 5)[0]
    assert ids.tolist() == [[101, 238, 102, 0, 0]]                  # [CLS] guitar [SEP]
    Q.make_demo_qa(demo_dir, tmp_path / 'demo')
    test = json.load(open(tmp_path / 'demo' / 'qa_test.json'))[:6]
    json.dump(test, open(tmp_path / 'test.json', 'w'))
    res = Q.main(['qa', '--ckpt', str(tmp_path / 'qa.pth'), '--ann', str(tmp_path / 'test.json'),
                  '--answer_list', str(tmp_path / 'demo' / 'qa_answer_list.json'), '--root',
                  demo_dir, '--vocab', vocab_file, '--frames', '4', '--size', '64', '--workers',
                  '0', '--device', 'cpu', '--double_first_token', '--out',
                  str(tmp_path / 'res.json')])
    assert res['questions'] == 6 and 0 <= res['accuracy'] <= 100
    assert json.load(open(tmp_path / 'res.json')) == res
    assert 'official QA model' in capsys.readouterr().out


def test_qa_from_official_stage2_uses_the_official_mapping(ref, stage2_file, vocab_file):
    """from_stage2 of an official stage-2 model: the QA text weights are exactly those of
    bert.stage2_to_finetune (setup_model's mapping); the decoder's cross-attention key / value,
    which read the video (width 48) in stage 2 and the question (64) here, are new."""
    path, sd = stage2_file
    umt, _ = checkpoints.load_stage2(path, vocab=vocab_file, img_size=64)
    qa, report = Q.from_stage2(umt, 'b16_5m.pth')
    mapped = bert.stage2_to_finetune(sd, decoder=True)
    own = qa.state_dict()
    new = [k for k in own if k.startswith(('text_encoder.', 'text_decoder.'))
           and not torch.equal(own[k], mapped[k])]
    assert new and all('.crossattention.self.' in k and k.startswith('text_decoder.') for k in new)
    assert report[1] == 'new: text_decoder.bert.encoder.layer.*.crossattention.* (8)'
    assert 'text blocks [2, 3]' in report[0] and qa.tokenizer.tokens == umt.tokenizer.tokens
    assert isinstance(qa, Q.BertUMTQA) and qa.vision_encoder.config.align_layers == 0


def test_finetune_qa_from_an_official_stage2_checkpoint(stage2_file, vocab_file, demo_dir,
                                                         tmp_path):
    """tasks/finetune_qa.py from an official stage-2 .pth (its vocabulary from BERT_VOCAB): one
    step, then the test; the checkpoint it writes is a BERT QA model with its vocabulary."""
    path, _ = stage2_file
    Q.make_demo_qa(demo_dir, tmp_path / 'demo')
    train = json.load(open(tmp_path / 'demo' / 'qa_train.json'))[::30][:4]
    json.dump(train, open(tmp_path / 'train.json', 'w'))
    args = ['--preset=demo', f'--init={path}', f'--bert_vocab={vocab_file}',
            f'--train_ann={tmp_path / "train.json"}', f'--test_ann={tmp_path / "train.json"}',
            f'--answer_list={tmp_path / "demo" / "qa_answer_list.json"}', '--make_demo=False',
            f'--data_root={demo_dir}', '--img_size=64', '--total_batch=4', '--micro_batch=4',
            '--epochs=1', '--num_workers=0', '--device=cpu', f'--out_dir={tmp_path / "out"}']
    out = faults.run_here('tasks.finetune_qa', args)
    assert out.returncode == 0, out.stdout + out.stderr
    assert 'text_decoder.bert.encoder.layer.*.crossattention.* (8)' in out.stdout
    ckpt = torch.load(tmp_path / 'out' / 'last.pt', weights_only=True)
    assert ckpt['text_config']['text_encoder'] == 'bert'
    assert len(ckpt['text_config']['vocab']) == 329


def test_train_stage2_with_a_tiny_bert(demo_dir, tmp_path):
    """`train_stage2.py --preset=demo --text_encoder=bert`, cut short: a tiny random BERT whose
    vocabulary is the demo captions' words trains offline and its loss falls; the checkpoint holds
    the vocabulary, and evaluate.py reads it back without any vocabulary file."""
    torch.manual_seed(0)
    config = get_config('tiny')
    torch.save({'model': VideoViT(config).state_dict(), 'model_config': dataclasses.asdict(config)},
               tmp_path / 's1.pt')
    captions = json.load(open(os.path.join(demo_dir, 'captions_train.json')))[::9][:20]
    json.dump(captions, open(tmp_path / 'train.json', 'w'))
    settings = dict(preset='demo', text_encoder='bert', teacher_pretrained=None, device='cpu',
                    num_workers=0, video_ann=tmp_path / 'train.json', video_root=demo_dir,
                    image_ann='', val_ann='', init=tmp_path / 's1.pt', video_batch=4, epochs=4,
                    log_interval=1, out_dir=tmp_path / 'out')
    out = faults.run_here(os.path.join(ROOT, 'train_stage2.py'),
                          [f'--{k}={v}' for k, v in settings.items()])
    assert out.returncode == 0, out.stdout + out.stderr
    assert 'text encoder: BERT-tiny, random weights, a vocabulary of' in out.stdout
    log = [json.loads(line) for line in open(tmp_path / 'out' / 'log.jsonl')]
    losses = [r['loss'] for r in log if 'loss' in r]
    assert len(losses) == 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, losses
    ckpt = torch.load(tmp_path / 'out' / 'last.pt', weights_only=True)
    vocab = ckpt['text_config']['vocab']
    assert vocab[:5] == ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] and 'square' in vocab
    umt, _ = checkpoints.load_stage2(ckpt)
    words = captions[0]['caption'].split()                      # 'a red square moving up'
    ids, _ = umt.tokenizer([' '.join(words)], 8)
    assert ids[0, :len(words) + 1].tolist() == [2] + [vocab.index(w) for w in words]


def test_hf_paths_are_fetched_once_and_offline_says_what_to_do(tmp_path, monkeypatch):
    """checkpoints.resolve: hf://OWNER/REPO/FILE -> huggingface_hub.hf_hub_download(OWNER/REPO,
    FILE) (mocked), a local path as it is; offline, a message that says to pass a local file; and
    through a command, in a fresh process with an empty offline cache, no traceback."""
    import huggingface_hub
    calls = []
    local = tmp_path / 'weights.pth'
    torch.save({'model': {}}, local)
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download',
                        lambda repo, name: calls.append((repo, name)) or str(local))
    got = checkpoints.resolve('hf://OpenGVLab/UMT/stage2/b16_5m.pth', 'INIT')
    assert got == str(local) and calls == [('OpenGVLab/UMT', 'stage2/b16_5m.pth')]
    assert checkpoints.resolve(str(local)) == str(local) and checkpoints.resolve(None) is None
    assert checkpoints.read_file('hf://OpenGVLab/UMT/w.pth') == {'model': {}}

    def no_network(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError('cannot reach the hub')
    monkeypatch.setattr(huggingface_hub, 'hf_hub_download', no_network)
    with pytest.raises(BadInput, match=r'INIT hf://OpenGVLab/UMT/b16_5m\.pth: cannot fetch b16_5m'
                       r'\.pth from the Hugging Face repo OpenGVLab/UMT \(LocalEntryNotFoundError\)'
                       r'.*pass its local path: INIT=/path/to/b16_5m\.pth'):
        checkpoints.resolve('hf://OpenGVLab/UMT/b16_5m.pth', 'INIT')
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_HOME': str(tmp_path / 'hf')}
    out = subprocess.run([sys.executable, 'evaluate.py', 'features', '--ckpt',
                          'hf://OpenGVLab/UMT/b16_5m.pth', 'a.mp4', '--out',
                          str(tmp_path / 'f.pt')],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and 'Traceback' not in out.stderr, out.stderr
    assert 'pass its local path: --ckpt=/path/to/b16_5m.pth' in out.stderr


def test_build_umt_bert_copies_released_weights():
    """build_umt_bert with a released BERT state dict (Hugging Face names): every tensor of the text
    side comes from it but the fusion layers' cross-attention, which BERT never had; the text side
    reads the video width (encoder_width set from the student)."""
    torch.manual_seed(0)
    tokens = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'a', 'red', 'square']
    cfg = dataclasses.replace(bert.CONFIGS['tiny'], vocab_size=len(tokens))
    released = {k: v for k, v in bert.BertLM(cfg).state_dict().items()
                if '.crossattention.' not in k}
    vit = VideoViT(get_config('tiny'))
    umt, new = M.build_umt_bert(vit, cfg, Tokenizer(tokens), 32, released)
    assert new and all('.crossattention.' in k for k in new)
    text = umt.text_encoder.state_dict()
    assert all(torch.equal(text[k], v) for k, v in released.items())
    assert text['bert.encoder.layer.2.crossattention.self.key.weight'].shape == (64, 96)
    assert umt.text_config['bert']['encoder_width'] == 96 and umt.text_config['vocab'] == tokens
    with pytest.raises(ValueError, match='fusion_layer=4 must be below the 4 layers'):
        M.build_umt_bert(vit, dataclasses.replace(cfg, fusion_layer=4), Tokenizer(tokens), 32)
