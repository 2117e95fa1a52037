"""Guards util/bert.py and util/wordpiece.py, the BERT text side of the official UMT checkpoints,
against tests/fixtures/official_bert_seed1.pt: outputs of the official code (xbert.py, umt.py,
umt_qa.py, criterions.py, setup_model, tokenization_bert.py) under random weights. Every stored
output is reproduced: the text / fusion / multi_modal encodings, the projections, VTC, VTM and MLM,
the QA question encoder, answer decoder, loss and rank_answer (of tasks/video_qa.BertUMTQA, the QA
model with BERT), the tokenizer on 200 captions (raw and after data.pre_text) and the QA texts, and
the stage-2 -> fine-tuning key mapping; also strict loading of the official key layout, the tied
weights, Hugging Face BERT weights and bad input.
Every expected value is read from the file (another seed gives other numbers)."""
import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

import data
import tasks.video_qa as Q
import video_language
from model import load_strict
from util import bert
from util.wordpiece import Tokenizer

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures',
                       'official_bert_seed1.pt')


def close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def same_encoding(got, ids, mask):
    """tokenizer output (ids, mask) equals the stored ids and mask, exactly."""
    assert got[1].dtype == torch.bool  # the project's masks: True = a token (official: int64 1)
    assert torch.equal(got[0], ids) and torch.equal(got[1].long(), mask)


@pytest.fixture(scope='module')
def ref():
    return torch.load(FIXTURE)


@pytest.fixture(scope='module')
def stage2(ref):
    """The official stage-2 text encoder (BertForMaskedLM), fixture weights loaded strictly."""
    sd = bert.sub_state_dict(ref['state_dict'], 'text_encoder.')
    heads = ref['config']['num_attention_heads']
    cfg = bert.bert_config(bert.sub_state_dict(sd, 'bert.'), heads=heads)
    model = bert.BertLM(cfg).eval()
    model.load_state_dict(sd, strict=True)
    return model


def bert_qa(sd, heads, vision_width):
    """tasks/video_qa.BertUMTQA with the text weights sd (official QA keys), strictly, and a tiny
    random video encoder of vision_width."""
    cfg = bert.bert_config(bert.sub_state_dict(sd, 'text_encoder.'), heads=heads)
    vision = dict(img_size=32, patch_size=16, num_frames=2, embed_dim=vision_width, depth=1,
                  num_heads=1, align_layers=0)
    model = Q.BertUMTQA(vision, dict(text_encoder='bert', bert=dataclasses.asdict(cfg)))
    own = model.state_dict()
    load_strict(model, {**{k: v for k, v in own.items() if k.startswith('vision_encoder.')}, **sd})
    return model.eval()


@pytest.fixture(scope='module')
def qa(ref):
    return bert_qa(ref['qa']['state_dict'], ref['config']['num_attention_heads'],
                   ref['qa']['vision_width'])


@pytest.fixture(scope='module')
def tokenizer(ref, tmp_path_factory):
    path = tmp_path_factory.mktemp('vocab') / 'vocab.txt'
    path.write_text('\n'.join(ref['tokenizer']['vocab']) + '\n', encoding='utf-8')
    return Tokenizer(str(path))


def linear(ref, name, x):
    return F.linear(x, ref['state_dict'][f'{name}.weight'], ref['state_dict'][f'{name}.bias'])


def test_config_from_shapes_and_tiny_preset(ref, stage2):
    c = ref['config']
    sd = bert.sub_state_dict(ref['state_dict'], 'text_encoder.bert.')
    got = bert.bert_config(sd, heads=c['num_attention_heads'])
    for k in ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads',
              'intermediate_size', 'max_position_embeddings', 'type_vocab_size', 'fusion_layer',
              'encoder_width'):
        assert getattr(got, k) == c[k], k
    # without heads: width // 64 (BERT-base and -large), 1 at the fixture's width 64
    assert bert.bert_config(sd).num_attention_heads == c['hidden_size'] // 64
    q = ref['qa']
    enc = bert.bert_config(bert.sub_state_dict(q['state_dict'], 'text_encoder.'))
    dec = bert.decoder_config(enc)
    for cfg_, want in ((enc, q['text_encoder_config']), (dec, q['text_decoder_config'])):
        assert {k: getattr(cfg_, k) for k in want} == want
    # the tiny preset is the fixture's geometry: same keys and shapes, vocabulary aside
    tiny_cfg = dataclasses.replace(bert.CONFIGS['tiny'], vocab_size=c['vocab_size'])
    tiny = bert.BertLM(tiny_cfg).state_dict()
    want = bert.sub_state_dict(ref['state_dict'], 'text_encoder.')
    assert {k: v.shape for k, v in tiny.items()} == {k: v.shape for k, v in want.items()}


def test_official_keys_tied_weights_and_buffer(ref, stage2, qa):
    own = stage2.state_dict()
    assert set(own) == set(bert.sub_state_dict(ref['state_dict'], 'text_encoder.'))
    text = {k for k in qa.state_dict() if not k.startswith('vision_encoder.')}
    assert text == set(ref['qa']['state_dict'])
    for model, prefix, pairs in ((stage2, 'text_encoder.', ref['tied_keys']),
                                 (qa, '', ref['qa']['tied_keys'])):
        sd = model.state_dict()
        for a, b in pairs:  # one tensor under two names, as in the official checkpoints
            assert sd[a[len(prefix):]].data_ptr() == sd[b[len(prefix):]].data_ptr(), (a, b)
    pos = own['bert.embeddings.position_ids']
    want = ref['state_dict']['text_encoder.bert.embeddings.position_ids']
    assert pos.dtype == torch.int64 and torch.equal(pos, want)
    assert not any('pooler' in k for k in own)


@torch.no_grad()
def test_text_path_and_projections(ref, stage2):
    x = ref['inputs']
    h = stage2.bert(x['input_ids'], x['attention_mask'], mode='text')
    close(h, ref['text']['last_hidden_state'])
    close(h[:, 0], ref['text']['pooled'])
    close(linear(ref, 'text_proj', h[:, 0]), ref['text']['text_proj'])
    close(linear(ref, 'vision_proj', x['pooled_vision_embeds']), ref['text']['vision_proj'])


@torch.no_grad()
def test_fusion_path_itm_and_multi_modal(ref, stage2):
    x = ref['inputs']
    text = stage2.bert(x['input_ids'], x['attention_mask'], mode='text')
    fused = stage2.bert(None, x['attention_mask'], x['vision_embeds'], x['vision_atts'],
                        mode='fusion', text_embeds=text)
    close(fused, ref['fusion']['last_hidden_state'])
    close(linear(ref, 'itm_head', fused[:, 0]), ref['fusion']['itm_logits'])
    both = stage2.bert(x['input_ids'], x['attention_mask'], x['vision_embeds'], x['vision_atts'])
    assert ref['fusion']['multi_modal_equals_text_then_fusion']
    assert (both - fused).abs().max().item() <= ref['fusion']['multi_modal_max_abs_diff']


@torch.no_grad()
def test_vtc_loss_is_the_official_one(ref, stage2):
    """video_language.vtc_loss, the caption ids as pair keys = criterions.py's soft-target VTC."""
    x = ref['inputs']
    text = stage2.bert(x['input_ids'], x['attention_mask'], mode='text')[:, 0]
    v, t = linear(ref, 'vision_proj', x['pooled_vision_embeds']), linear(ref, 'text_proj', text)
    assert len(set(x['idx'].tolist())) < len(x['idx'])  # a repeated id: soft targets are used
    close(video_language.vtc_loss(v, t, x['idx'], ref['vtc']['temp']), ref['vtc']['loss'])


@torch.no_grad()
def test_vtm_with_the_official_hard_negatives(ref, stage2):
    x, r = ref['inputs'], ref['vtm']
    v, m = x['vision_embeds'], x['attention_mask']
    t = stage2.bert(x['input_ids'], m, mode='text')
    vn, tn = r['vision_neg_indices'], r['text_neg_indices']
    # [positives; (drawn video, text); (video, drawn text)]
    v_all, t_all = torch.cat([v, v[vn], v]), torch.cat([t, t, t[tn]])
    m_all = torch.cat([m, m, m[tn]])
    assert torch.equal(m_all, r['text_atts_all'])
    out = stage2.bert(None, m_all, v_all, torch.ones(v_all.shape[:2]), mode='fusion',
                      text_embeds=t_all)
    cls = out[:, 0]
    close(cls, r['last_hidden_state_cls'])
    logits = linear(ref, 'itm_head', cls)
    close(logits, r['logits'])
    B = len(v)
    labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long()
    close(F.cross_entropy(logits, labels), r['loss'])


@torch.no_grad()
def test_mlm(ref, stage2):
    x, r = ref['inputs'], ref['mlm']
    text = stage2.bert(r['input_ids'], x['attention_mask'], x['vision_embeds'], mode='text')
    close(text, r['text_last_hidden_state'])
    fused = stage2.bert(None, x['attention_mask'], x['vision_embeds'], None, mode='fusion',
                        text_embeds=text)
    close(fused, r['fusion_last_hidden_state'])
    logits = stage2.cls.predictions(fused)                                     # [B, L, V]
    picked = r['labels'] != -100
    assert torch.equal(picked.nonzero(), r['masked_positions'])
    close(logits[picked], r['logits_at_masked'])
    close(F.cross_entropy(logits.flatten(0, 1), r['labels'].flatten()), r['loss'])
    whole = stage2(None, x['attention_mask'], x['vision_embeds'], mode='fusion', text_embeds=text)
    close(whole, logits)


@torch.no_grad()
def test_qa_question_encoder_decoder_and_loss(ref, qa):
    q = ref['qa']
    states = qa.text_encoder(q['question_input_ids'], q['question_attention_mask'],
                             q['image_embeds'], q['image_atts'])
    close(states, q['question_last_hidden_state'])
    k = torch.tensor(q['k'])
    mask = q['question_attention_mask'].repeat_interleave(k, 0)
    assert torch.equal(mask, q['decoder_encoder_attention_mask'])
    ids, amask = q['answer_input_ids'], q['answer_attention_mask']
    logits = qa.decode(ids, amask, states.repeat_interleave(k, 0), mask)
    close(logits, q['decoder_logits'])
    nll = Q.answer_nll(logits, ids, amask.bool())
    close(nll, q['decoder_loss_per_answer'])
    # answer_nll's targets are the official ones: padding -> -100, shifted by one
    assert torch.equal(ids.masked_fill(~amask.bool(), -100), q['answer_targets'])
    shifted = F.cross_entropy(logits[:, :-1].transpose(1, 2), q['answer_targets'][:, 1:],
                              reduction='none')
    close(nll, shifted.sum(1))
    # the loss of BertUMTQA.forward: the official one. Its answers per question come padded
    # [B, A, La] (question 1 has one answer and a padding row of weight 0); the video tokens are
    # the fixture's
    pad = torch.tensor([[ids[0, 0], 0, 0, 0, 0]])
    a_ids = torch.cat([ids, pad]).view(2, 2, -1)
    a_mask = torch.cat([amask.bool(), pad != 0]).view(2, 2, -1)
    weights = torch.cat([q['weights'], torch.zeros(1)]).view(2, 2)
    qa.encode_question = lambda video, i, m: qa.text_encoder(i, m, q['image_embeds'])
    try:
        loss = qa(None, q['question_input_ids'], q['question_attention_mask'], a_ids, a_mask,
                  weights)
    finally:
        del qa.encode_question
    close(loss, q['loss'])


@torch.no_grad()
def test_rank_answer(ref, qa):
    q, r = ref['qa'], ref['qa']['rank']
    k = r['k_test']
    states = q['question_last_hidden_state']
    qmask = q['question_attention_mask']
    ids, amask = r['answer_input_ids'], r['answer_attention_mask']
    start = ids[:1, :1].expand(len(states), 1)                    # [CLS], no attention mask
    first = qa.decode(start, torch.ones_like(start), states, qmask)[:, 0]
    close(first, r['start_logits'])
    top_lp, top = first.log_softmax(-1)[:, ids[:, 1]].topk(k, dim=1)  # [B, k], the first cut
    rows = r['rerank_input_ids'], r['rerank_attention_mask'].bool()
    nll = Q.answer_nll(qa.decode(*rows, states.repeat_interleave(k, 0),
                                 qmask.repeat_interleave(k, 0)), *rows)
    close(nll, r['rerank_loss'])
    for b in range(len(states)):  # the re-ranked candidates are the first-token top-k
        assert sorted(rows[0][b * k:(b + 1) * k].tolist()) == sorted(ids[top[b]].tolist())
    # the official score (the first token counted twice): its softmax over the k and its order
    cand = ids[top.flatten()], amask.bool()[top.flatten()]                     # [B k, La]
    cand_nll = Q.answer_nll(qa.decode(*cand, states.repeat_interleave(k, 0),
                                      qmask.repeat_interleave(k, 0)), *cand).view(-1, k)
    probs, order = (top_lp - cand_nll).softmax(1).sort(1, descending=True)
    close(probs, r['topk_probs'])
    assert torch.equal(top.gather(1, order), r['topk_ids'])
    # rank_answer's prediction, as BertUMTQA.answer makes it: the official one with double_first
    got = Q.rank_answer(qa.decode, states, qmask, ids, amask.bool(), k, double_first=True)
    assert torch.equal(got, r['topk_ids'][:, 0])


def test_tokenizer_on_every_caption(ref, tokenizer):
    t = ref['tokenizer']
    L = t['max_length']
    for kind, texts in (('raw', t['captions']), ('pre_text', t['captions_pre_text'])):
        assert [tokenizer.tokenize(s) for s in texts] == t[f'tokens_{kind}']
        same_encoding(tokenizer(texts, L), t[f'input_ids_{kind}'], t[f'attention_mask_{kind}'])
    # the project's pre_text gives the official ids (its strings may differ in whitespace only)
    same_encoding(tokenizer([data.pre_text(s) for s in t['captions']], L),
                  t['input_ids_pre_text'], t['attention_mask_pre_text'])
    a = t['qa']
    assert [data.pre_text(s) for s in a['questions']] == a['questions_pre_text']
    same_encoding(tokenizer(a['questions_pre_text'], a['max_q_len']),
                  a['question_input_ids'], a['question_attention_mask'])
    same_encoding(tokenizer(a['answers_with_eos'], a['max_a_len']),
                  a['answer_input_ids'], a['answer_attention_mask'])


def test_tokenizer_on_the_model_inputs(ref, tokenizer):
    x, q = ref['inputs'], ref['qa']
    same_encoding(tokenizer(x['texts'], x['input_ids'].shape[1]), x['input_ids'],
                  x['attention_mask'])
    for texts, name in ((q['questions'], 'question'), (q['answers'], 'answer')):
        ids = q[f'{name}_input_ids']
        same_encoding(tokenizer(texts, ids.shape[1]), ids, q[f'{name}_attention_mask'])
    r = q['rank']
    ids = r['answer_input_ids']
    same_encoding(tokenizer([c + ' [SEP]' for c in r['candidates']], ids.shape[1]), ids,
                  r['answer_attention_mask'])


def test_tokenizer_bad_vocab(tmp_path):
    with pytest.raises(ValueError, match='cannot read'):
        Tokenizer(str(tmp_path / 'missing.txt'))
    (tmp_path / 'words.txt').write_text('a\nb\n')
    with pytest.raises(ValueError, match='not a BERT vocab'):
        Tokenizer(str(tmp_path / 'words.txt'))
    with pytest.raises(ValueError, match='not a BERT vocab'):
        Tokenizer(['[PAD]', 'a'])


def test_stage2_to_finetune_key_mapping(ref):
    full = dict(ref['state_dict'])  # + the vision keys of the whole stage-2 checkpoint
    for key, shape, dtype in ref['stage2_checkpoint_keys']:
        full.setdefault(key, torch.zeros(shape, dtype=getattr(torch, dtype)))
    assert len(full) == len(ref['stage2_checkpoint_keys'])
    for name, decoder in (('qa', True), ('retrieval', False)):
        m = ref['checkpoint_mapping'][name]
        out = bert.stage2_to_finetune(full, decoder)
        pairs = dict(m['pairs'])
        assert len(pairs) == len(m['pairs'])
        assert all(out[new] is full[old] for new, old in pairs.items())
        rest = [k for k in out if k not in pairs]  # the vision keys pass unchanged
        assert len(rest) == m['n_vision_pairs'] and all(out[k] is full[k] for k in rest)
        assert not any(k.startswith('text_encoder.') for k in rest)
        vision = {k for k in out if k.startswith('vision_encoder.')}
        assert set(out) - set(m['model_text_keys']) - vision == set(m['unexpected_keys']) - vision
        assert set(m['model_text_keys']) - set(out) == set(m['missing_keys'])
    # the mapped QA text side has exactly BertUMTQA's keys and shapes, but for the decoder's
    # cross-attention key / value: copied from the encoder they read the video width (48 here), not
    # the question's (64). The official QA model needs the two widths equal, as every release has.
    out = bert.stage2_to_finetune(full, decoder=True)
    sd = {k: v for k, v in out.items() if k.startswith(('text_encoder.', 'text_decoder.'))}
    cfg = bert.bert_config(bert.sub_state_dict(sd, 'text_encoder.'))
    vision = dict(img_size=32, patch_size=16, num_frames=2, embed_dim=cfg.encoder_width, depth=1,
                  num_heads=1, align_layers=0)
    qa = Q.BertUMTQA(vision, dict(text_encoder='bert', bert=dataclasses.asdict(cfg)))
    own = {k: v for k, v in qa.state_dict().items() if not k.startswith('vision_encoder.')}
    assert set(sd) == set(own)
    wrong = {k for k in own if own[k].shape != sd[k].shape}
    assert wrong
    assert all(k.startswith('text_decoder.') and '.crossattention.self.' in k for k in wrong)


def test_load_hf_bert():
    """A Hugging Face BertForPreTraining state dict (old gamma / beta names, pooler, NSP head, no
    tied copies): everything loads, and only the cross-attention is new."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(bert.CONFIGS['tiny'], vocab_size=50)
    src = bert.BertLM(cfg).state_dict()
    hf = {}
    for k, v in src.items():
        if not ('.crossattention.' in k or k.startswith('cls.predictions.decoder.')
                or k == 'bert.embeddings.position_ids'):
            hf[k.replace('LayerNorm.weight', 'LayerNorm.gamma').replace('.bias', '.beta')
              if 'LayerNorm' in k else k] = v
    hf.update({'bert.pooler.dense.weight': torch.zeros(64, 64),
               'cls.seq_relationship.bias': torch.zeros(2)})
    model = bert.BertLM(cfg)
    new = bert.load_hf_bert(model, hf)
    assert new and all('.crossattention.' in k for k in new)
    # weight and bias of query, key, value, output.dense, output.LayerNorm per fusion layer
    assert len(new) == 10 * (cfg.num_hidden_layers - cfg.fusion_layer)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in src.items() if k not in new)
    tied = model.cls.predictions.decoder.weight
    assert tied is model.bert.embeddings.word_embeddings.weight
    assert torch.equal(tied, src['bert.embeddings.word_embeddings.weight'])
    with pytest.raises(ValueError, match='not the weights'):
        bert.load_hf_bert(bert.BertLM(cfg), {k: v for k, v in hf.items() if 'layer.0.out' not in k})


def test_bad_mode_and_missing_context(stage2):
    ids = torch.tensor([[101, 5, 6]])
    with pytest.raises(ValueError, match='mode'):
        stage2.bert(ids, mode='vision')
    with pytest.raises(ValueError, match='pass context'):
        stage2.bert(ids)                                       # multi_modal needs the video
    D = stage2.bert.embeddings.word_embeddings.embedding_dim
    assert stage2.bert(ids, mode='text').shape == (1, 3, D)


def test_tokenizer_rules_on_a_hand_made_vocab(tmp_path):
    """The rules that the fixture's vocabulary cannot tell apart (both ways give [UNK] there)."""
    words = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'a', 'man', '##man', '$', '5', '^', 'b',
             'cafe', '猫']
    (tmp_path / 'vocab.txt').write_text('\n'.join(words) + '\n', encoding='utf-8')
    tok = Tokenizer(str(tmp_path / 'vocab.txt'))
    assert tok.tokenize('a\u200bman') == ['a', '##man']           # format characters (Cf) dropped
    assert tok.tokenize('man\ufffd\x07') == ['man']              # so are U+FFFD and controls
    assert tok.tokenize('$5^b') == ['$', '5', '^', 'b']          # ASCII symbols split too
    assert tok.tokenize('Café猫MAN') == ['cafe', '猫', 'man']      # accents, CJK spacing, lower case
    assert tok.tokenize('amanb a[SEP]') == ['[UNK]', 'a', '[SEP]']  # a word WordPiece cannot cover
    ids, mask = tok(['a man a man', '[PAD]'], 4)
    assert ids.tolist() == [[2, 5, 6, 5], [2, 0, 0, 0]]       # [CLS] + 3 tokens, no [SEP]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]      # a literal [PAD] is a real token
