"""Guards video question answering (tasks/video_qa.py, tasks/finetune_qa.py, `python -m
tasks.video_qa mc`): the multiple-choice score and its accuracy (an oracle scores 100%, shuffled
answers about chance), rank_answer on a hand-made vocabulary, the answer decoder's masks, the QA
model built from a stage-2 checkpoint (what is copied, what is new), bad annotation input, and
finetune_qa.py: bad constants, exact resume and 2 processes = 1."""
import dataclasses
import gc
import json
import math
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import faults
import tasks.video_qa as Q
import training
from conftest import log_records
from model import VideoViT, get_config
from util import checkpoints
from util.configurator import BadInput
from video_language import BPETokenizer, build_umt, tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = 'tasks.finetune_qa'
BPE = BPETokenizer()


def tiny_stage2():
    from demo import tiny_clip
    torch.manual_seed(0)
    config = get_config('tiny', num_frames=4)
    umt = build_umt(VideoViT(config), tiny_clip())
    return umt.eval(), {'model': umt.state_dict(), 'model_config': dataclasses.asdict(config),
                        'text_config': umt.text_config}


# ----------------------------------------------------------------------------------------------
# Multiple choice


def test_mc_combination_hand_made():
    # match probabilities .5, .881, .269
    itm = torch.tensor([[[0.0, 0.0], [0.0, 2.0], [0.0, -1.0]]])
    # / 0.1 -> VTC softmax of [5, 1, 2]
    sim = torch.tensor([[0.5, 0.1, 0.2]])
    z = math.exp(5) + math.exp(1) + math.exp(2)
    itm_p = [0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(1))]
    want = [0.7 * i + 0.3 * math.exp(s) / z for i, s in zip(itm_p, (5, 1, 2))]
    score = Q.mc_combine(itm, sim, torch.tensor(0.1))
    assert score[0].tolist() == pytest.approx(want, abs=1e-6)
    assert score.argmax().item() == 0                           # VTC outweighs VTM's preference
    assert Q.mc_combine(itm, sim, torch.tensor(0.1), itm_weight=1.0).argmax().item() == 1
    assert Q.mc_combine(itm, sim, torch.tensor(10.0)).argmax().item() == 1  # flat VTC: VTM decides


class Oracle(torch.nn.Module):
    """A 'stage-2 model' that knows each clip's caption (clips looked up by their pixel sum) and
    reads captions by their token ids: VTC and VTM both say 'match' exactly for the right one."""

    def __init__(self, clip_caption, captions):
        super().__init__()
        self.clip_caption, self.n = clip_caption, len(captions)
        ids = tokenize(map(data.pre_text, captions), 32)[0]
        self.caption_of = {tuple(r.tolist()): i for i, r in enumerate(ids)}
        self.temp = torch.tensor(0.07)

    def encode_video(self, video, per_frame=True):
        clips = torch.tensor([self.clip_caption[key(v)] for v in video])
        f = F.one_hot(clips, self.n).float()[:, None]                           # [B, 1, C]
        return f, None, f.expand(-1, video.shape[2], -1)

    def encode_text(self, ids, mask):
        rows = torch.tensor([self.caption_of[tuple(r.tolist())] for r in ids])
        f = F.one_hot(rows, self.n).float()
        return f[:, None].expand(-1, ids.shape[1], -1), f

    def itm_logits(self, hidden, mask, x_vis):
        match = (hidden[:, 0] * x_vis[:, 0]).sum(-1)
        return torch.stack([1 - match, match], -1) * 5


def key(video):
    return round(float(video.double().sum()), 2)


def test_mc_oracle_scores_100_and_shuffled_answers_chance(demo_dir, tmp_path):
    records = json.load(open(os.path.join(demo_dir, 'captions_train.json')))[::2]  # every other
    captions = sorted({r['caption'] for r in records})
    rng = np.random.default_rng(0)
    ann = []
    for r in records:
        for _ in range(3):
            others = rng.choice([c for c in captions if c != r['caption']], 4, replace=False)
            options = rng.permutation([r['caption']] + list(others)).tolist()
            ann.append({'video': r['video'], 'caption': options,
                        'answer': options.index(r['caption'])})
    json.dump(ann, open(tmp_path / 'mc.json', 'w'))
    shuffled = [dict(a, answer=int(rng.integers(5))) for a in ann]
    json.dump(shuffled, open(tmp_path / 'shuffled.json', 'w'))
    clips = Q.VideoQuestions(Q.read_mc(tmp_path / 'mc.json', demo_dir), 4, 32, 'eval', BPE, 32)
    # clip 3j = video j, as the model sees it
    oracle = Oracle({key(data.normalize(clips[3 * j]['video'])): captions.index(r['caption'])
                     for j, r in enumerate(records)}, captions)
    right = Q.evaluate_mc(oracle, clips, torch.device('cpu'), batch=16, workers=0)
    assert right == {'accuracy': 100.0, 'num_questions': 3 * len(records), 'chance': 20.0,
                     'unreadable_videos': 0}
    shuffled = Q.VideoQuestions(Q.read_mc(tmp_path / 'shuffled.json', demo_dir), 4, 32, 'eval', BPE,
                                32)
    accuracy = Q.evaluate_mc(oracle, shuffled, torch.device('cpu'), batch=16, workers=0)['accuracy']
    assert 10 < accuracy < 30
    # the command line on a real (random) stage-2 model; a missing video counts as a wrong answer
    torch.save(tiny_stage2()[1], tmp_path / 's2.pt')
    small = ann[:5] + [dict(ann[0], video='videos/missing.mp4')]
    json.dump(small, open(tmp_path / 'small.json', 'w'))
    res = Q.main(['mc', '--ckpt', str(tmp_path / 's2.pt'), '--ann', str(tmp_path / 'small.json'),
                  '--root', demo_dir, '--frames', '4', '--size', '32', '--workers', '0', '--device',
                  'cpu', '--out', str(tmp_path / 'mc_out.json')])
    assert res['num_questions'] == 6 and res['unreadable_videos'] == 1
    assert res['accuracy'] <= 100 * 5 / 6 and json.load(open(tmp_path / 'mc_out.json')) == res


# ----------------------------------------------------------------------------------------------
# Open-ended QA: ranking, decoder, loading


class Bigram(torch.nn.Module):
    """p(next token | previous token) from a table chosen by the question ([b, 0, 0] = table)."""

    def __init__(self, tables):
        super().__init__()
        self.logp = torch.tensor(tables).clamp_min(1e-9).log()            # [questions, V, V]

    def forward(self, ids, mask, question, question_mask):
        return self.logp[question[:, 0, 0].long()[:, None], ids]          # [N, La, V]


def test_rank_answer_hand_made_vocabulary():
    # tokens: 0 pad, 1 [sot], 2 [eot], 3 a, 4 b, 5 c; answer list: "a", "b", "c", "b c"
    uniform = [1 / 6] * 6
    one = [uniform, [0, 0, 0, .6, .35, .05], uniform, [0, 0, .5, 0, 0, .5], [0, 0, .9, 0, 0, .1],
           [0, 0, 1, 0, 0, 0]]
    two = [uniform, [0, 0, 0, .3, .2, .5], uniform, [0, 0, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0],
           [0, 0, 1, 0, 0, 0]]
    ids = torch.tensor([[1, 3, 2, 0], [1, 4, 2, 0], [1, 5, 2, 0], [1, 4, 5, 2]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    decoder, question = Bigram([one, two]), torch.tensor([0.0, 1.0]).view(2, 1, 1).expand(2, 3, 8)
    qmask = torch.ones(2, 3, dtype=torch.bool)
    nll = Q.answer_nll(decoder(ids, mask, question[:1].expand(4, -1, -1), qmask[:1]), ids, mask)
    want = [-math.log(.3), -math.log(.315), -math.log(.05), -math.log(.035)]
    assert nll.tolist() == pytest.approx(want, rel=1e-5)
    # question 1: "b" (p = .35 x .9 = .315) beats "a" (.6 x .5 = .30) although "a" has the likelier
    # first token; question 2: "c" is both. chunk=3 splits the 2 x 4 candidate rows across
    # questions.
    assert Q.rank_answer(decoder, question, qmask, ids, mask, k=4, chunk=3).tolist() == [1, 2]
    assert Q.rank_answer(decoder, question, qmask, ids, mask, k=1).tolist() == [0, 2]  # top first
    # the official score counts the first token twice: .6 x .30 > .35 x .315, so "a" wins there
    got = Q.rank_answer(decoder, question, qmask, ids, mask, k=4, double_first=True)
    assert got.tolist() == [0, 2]


def test_decoder_is_causal_and_ignores_question_padding():
    qa, _ = Q.from_stage2(tiny_stage2()[0])
    dec = qa.decoder.eval()
    ids, mask = tokenize(['a red square moving up'], 10)
    torch.manual_seed(0)
    q, qmask = torch.randn(1, 6, 64), torch.tensor([[True] * 4 + [False] * 2])
    with torch.no_grad():
        out = dec(ids, mask, q, qmask)
        later = ids.clone()
        later[0, 4] = 1234                                                 # change answer token 4
        out2 = dec(later, mask, q, qmask)
        assert torch.equal(out[:, :4], out2[:, :4]) and not torch.allclose(out[:, 4:], out2[:, 4:])
        q2 = q.clone()
        # garbage under the question's padding
        q2[:, 4:] = 100.0
        assert torch.allclose(dec(ids, mask, q2, qmask), out, atol=1e-5)


def test_qa_model_from_stage2_checkpoint():
    umt, ckpt = tiny_stage2()
    loaded, report = checkpoints.load_stage2(ckpt, num_frames=4, img_size=32)
    qa, qa_report = Q.from_stage2(loaded, 's2.pt')
    assert qa_report[0].startswith('QA model from s2.pt: 144 of 146 tensors')
    assert 'text blocks [3]' in qa_report[0]
    assert qa_report[1] == 'new: decoder.blocks.*.cross_attn.kv_proj.* (2)'
    assert 'vision_encoder.clip_decoder.* (8), text_encoder.ln_text.* (2)' in qa_report[2]
    assert 'itm_head.* (2)' in qa_report[2] and 'mlm_head' not in qa_report[2]
    te, dec = umt.text_encoder, qa.decoder
    # decoder block 0 = fusion block 3
    for name, p in dec.blocks[0].named_parameters():
        if 'kv_proj' not in name:
            assert torch.equal(p, te.blocks[3].get_parameter(name)), name
    assert torch.equal(dec.token_embedding.weight, te.token_embedding.weight)
    assert torch.equal(dec.head[0].weight, umt.mlm_head[0].weight)
    assert torch.equal(dec.bias, umt.mlm_bias)
    assert qa.vision_encoder.config.align_layers == 0 and len(qa.vision_encoder.clip_decoder) == 0
    # the official loss: weighted sum of each answer's summed NLL, / questions
    video, (ids, mask) = torch.randn(2, 3, 4, 32, 32), tokenize(['what color', 'which way'], 25)
    a_ids, a_mask = (x.view(2, 2, 5) for x in tokenize(['red', 'blue', 'up', ''], 5))
    w = torch.tensor([[0.75, 0.25], [1.0, 0.0]])
    with torch.no_grad():
        q = qa.encode_question(video, ids, mask)
        nll = [Q.answer_nll(dec(a_ids[b], a_mask[b], q[b:b + 1].expand(2, -1, -1),
                                mask[b:b + 1].expand(2, -1)), a_ids[b], a_mask[b])
               for b in range(2)]
        want = ((w[0] * nll[0]).sum() + (w[1] * nll[1]).sum()) / 2
        assert torch.allclose(qa(video, ids, mask, a_ids, a_mask, w), want, atol=1e-5)
    again, report = Q.load_qa({'model': qa.state_dict(), 'model_config': qa.vision_config,
                               'text_config': qa.text_config})
    assert report == ['loaded the checkpoint: all 146 tensors of a QA model']
    pairs = zip(again.state_dict().values(), qa.state_dict().values())
    assert all(torch.equal(a, b) for a, b in pairs)
    with pytest.raises(BadInput, match='holds a umt, not a video QA model'):
        Q.load_qa(ckpt)


# ----------------------------------------------------------------------------------------------
# Annotations and bad input


def test_annotations_and_bad_input(demo_dir, tmp_path):
    video = json.load(open(os.path.join(demo_dir, 'captions_train.json')))[0]['video']
    ann = [{'video': video, 'question': "What's UP? (a-b/c)  <person>",
            'answer': ['Cat', 'Cat', 'dog']},
           {'video': video, 'question': 'no answer'},                     # skipped and counted
           {'video': video, 'question': 'blank answer', 'answer': ' '},
           {'question': 'no video', 'answer': 'x'},
           {'video': 'videos/missing.mp4', 'question': 'q', 'answer': 'up', 'question_id': 'q7'}]
    json.dump(ann, open(tmp_path / 'qa.json', 'w'))
    items, skipped = Q.read_qa(tmp_path / 'qa.json', demo_dir)
    assert skipped == [1, 2, 3] and len(items) == 2
    assert items[0].question == 'whats up a b c person'            # pre_text; answers never cleaned
    assert items[0].answers == ['Cat', 'dog'] and items[0].weights == pytest.approx([2 / 3, 1 / 3])
    assert items[1].qid == 'q7' and items[0].qid == 0
    # a missing video: evaluation flags it (the question counts as wrong), training replaces it
    ev = Q.VideoQuestions(items, 4, 32, 'eval', BPE, 25)
    assert ev[1]['bad'] and not ev[0]['bad'] and ev[1]['video'].abs().sum() == 0
    tr = Q.VideoQuestions(items, 4, 32, 'train', BPE, 25)
    with pytest.warns(UserWarning, match='missing.mp4'):
        got = tr[(1, 0)]
    assert got['index'] == 0 and got['skipped'] >= 1 and got['answer_ids'].shape == (2, 5)
    assert got['weights'].tolist() == pytest.approx([2 / 3, 1 / 3])
    # answer list: an entry that gives no token is an error that names it; long ones are cut
    bad = ['cat', '', 5, 'a very long answer with many words']
    json.dump(bad, open(tmp_path / 'bad.json', 'w'))
    with pytest.raises(BadInput, match=r"2 answer-list entries give no token, e\.g\. #1 '', #2 5"):
        Q.tokenize_answers(Q.read_answer_list(tmp_path / 'bad.json'), BPE, 5, 'bad.json')
    json.dump(['cat', 'a very long answer with many words'], open(tmp_path / 'list.json', 'w'))
    ids, mask, cut = Q.tokenize_answers(Q.read_answer_list(tmp_path / 'list.json'), BPE, 5)
    assert cut == 1 and ids.shape == (2, 5) and mask.sum(1).tolist() == [3, 5]
    json.dump({'a': 1}, open(tmp_path / 'dict.json', 'w'))
    with pytest.raises(BadInput, match='must be a non-empty JSON list'):
        Q.read_answer_list(tmp_path / 'dict.json')
    wrong = [{'video': video, 'caption': ['a', 'b'], 'answer': 2}]
    json.dump(wrong, open(tmp_path / 'mc.json', 'w'))
    with pytest.raises(BadInput, match='entry #0'):
        Q.read_mc(tmp_path / 'mc.json')
    # the demo files: parsed from the caption template, or from explicit fields
    assert Q.demo_attributes({'caption': 'a dark red circle moving down'}) == \
        {'color': 'dark red', 'shape': 'circle', 'direction': 'down'}
    record = {'caption': 'something else', 'color': 'red', 'shape': 'star', 'direction': 'up'}
    assert Q.demo_attributes(record) == {'color': 'red', 'shape': 'star', 'direction': 'up'}
    assert Q.demo_attributes({'caption': 'something else'}) is None
    with pytest.raises(BadInput, match='holds files that the demo did not write'):
        # never into a folder of the user's
        Q.make_demo_qa(demo_dir, tmp_path)
    Q.make_demo_qa(demo_dir, tmp_path / 'demo_qa')
    test, mc = (json.load(open(tmp_path / 'demo_qa' / f)) for f in ('qa_test.json', 'mc_test.json'))
    val = json.load(open(os.path.join(demo_dir, 'captions_val.json')))
    assert len(test) == 2 * len(val)                                      # colour, direction
    assert {t['question'] for t in test} == {Q.DEMO_QUESTIONS['color'],
                                             Q.DEMO_QUESTIONS['direction']}  # one shape: not asked
    assert all(len(set(m['caption'])) == 5 and m['caption'][m['answer']].startswith('a ')
               for m in mc)
    answers = set(json.load(open(tmp_path / 'demo_qa' / 'qa_answer_list.json')))
    assert answers >= {t['answer'] for t in test}


# ----------------------------------------------------------------------------------------------
# The script


@pytest.fixture(scope='module')
def qa_run(demo_dir, tmp_path_factory):
    """A random tiny stage-2 checkpoint; 12 training questions (+1 without an answer), 7 test
    questions; 3 steps of 4 questions (2 micro-steps of 2)."""
    tmp = tmp_path_factory.mktemp('qa')
    Q.make_demo_qa(demo_dir, tmp)
    torch.save(tiny_stage2()[1], tmp / 's2.pt')
    train = json.load(open(tmp / 'qa_train.json'))[::23][:12]      # 12 questions of all three kinds
    no_answer = {'video': train[0]['video'], 'question': 'no answer'}
    json.dump(train + [no_answer], open(tmp / 'train.json', 'w'))
    json.dump(json.load(open(tmp / 'qa_test.json'))[:7], open(tmp / 'test.json', 'w'))
    return tmp, ['--preset=demo', f'--init={tmp / "s2.pt"}', f'--train_ann={tmp / "train.json"}',
                 f'--val_ann={tmp / "test.json"}', f'--test_ann={tmp / "test.json"}',
                 '--make_demo=False', f'--answer_list={tmp / "qa_answer_list.json"}',
                 f'--data_root={demo_dir}', '--img_size=32', '--total_batch=4', '--micro_batch=2',
                 '--epochs=1', '--log_interval=1', '--eval_batch=3', '--num_workers=0',
                 '--device=cpu']


def run_here(args, monkeypatch, kill_after=0):
    """tasks/finetune_qa.py in this process (no start-up cost); kill_after: tests/faults.py's
    simulated kill."""
    monkeypatch.setattr(training, 'lr_at', faults.hooks(kill_after=kill_after)[0])
    monkeypatch.setattr(sys, 'argv', [MODULE, *map(str, args)])
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(k, raising=False)
    try:
        runpy.run_module(MODULE, run_name='__main__')
    except SystemExit as e:
        if not (kill_after and e.code == 0):  # not the simulated kill
            raise
    finally:
        gc.collect()  # the run's globals (its OUT_DIR lock among them) go, as with its process


@pytest.mark.parametrize('bad, message', [
    ('--total_batch=0', 'TOTAL_BATCH=0 must be a positive multiple of the 1 proc'),
    ('--init=missing.pt', "INIT 'missing.pt' not found"),
    ('--test_ann=missing.json', "TEST_ANN 'missing.json' not found")])
def test_bad_constants_fail_fast(qa_run, bad, message, monkeypatch):
    tmp, args = qa_run
    with pytest.raises(BadInput, match=message):
        run_here(args + [bad, f'--out_dir={tmp / "bad"}'], monkeypatch)


def test_resume_is_exact_and_two_processes_match_one(qa_run, monkeypatch, capsys):
    tmp, args = qa_run
    run_here(args + [f'--out_dir={tmp / "a"}'], monkeypatch)             # 3 steps, uninterrupted
    out = capsys.readouterr().out
    assert 'new: decoder.blocks.*.cross_attn.kv_proj.* (2)' in out
    assert '1 skipped: no video, question or answer' in out and 'without the video: always' in out
    # killed after step 2 ...
    run_here(args + [f'--out_dir={tmp / "b"}', '--ckpt_interval=1'], monkeypatch, kill_after=2)
    assert not any('test' in r for r in log_records(tmp / 'b'))
    run_here(args + [f'--out_dir={tmp / "b"}'], monkeypatch)             # ... and resumed
    assert 'resumed from' in capsys.readouterr().out
    ra, rb = log_records(tmp / 'a'), log_records(tmp / 'b')
    # losses, grad norms, val, test
    assert [r['step'] for r in ra if 'loss' in r] == [1, 2, 3] and ra == rb
    wa, wb = (training.read_checkpoint(tmp / d / 'last.pt')['model'] for d in ('a', 'b'))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # 2 gloo processes x 2 questions = 1 process x 2 micro-steps x 2
    env = {**{k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')},
           'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                        '--nproc_per_node=2', '-m', MODULE, *args, f'--out_dir={tmp / "two"}'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    two, w2 = log_records(tmp / 'two'), training.read_checkpoint(tmp / 'two' / 'last.pt')['model']
    for k in wa:
        a, b = wa[k].clone(), w2[k].clone()
        if k.endswith('attn.in_proj.bias'):  # the key bias has a zero gradient in exact arithmetic
            # (softmax ignores a shift): its float noise, which follows the summation order, is all
            # Adam sees, so its updates differ; leave it out
            third = len(a) // 3
            a[third:2 * third] = b[third:2 * third] = 0
        assert torch.allclose(a, b, atol=1e-5), k
    losses = lambda log: [r['loss'] for r in log if 'loss' in r]
    assert losses(ra) == pytest.approx(losses(two), abs=1e-5)
    evals = lambda log: [{k: v for k, v in r.items() if k in ('val', 'test')}
                         for r in log if 'loss' not in r]
    # 7 questions split 4 + 3, counted once
    assert evals(ra) == evals(two) and len(evals(ra)) == 2
    assert len(json.load(open(tmp / 'two' / 'test_predictions.json'))) == 7
