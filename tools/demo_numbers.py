"""
The README's demo numbers from fresh runs of the README's own commands: every table of its demo sections, printed
as the README prints it, with the time each command took. --check names the README lines that differ.

    python -m tools.demo_numbers --work demo_runs                      # all tables: about 70 min on two cores
    python -m tools.demo_numbers --work demo_runs --only stage1,qa     # some of them
    python -m tools.demo_numbers --work demo_runs --check README.md    # then compare with the README

The commands run in WORK (the README's relative paths: demo_data, out/...). A command whose result is already in
WORK is not run again, so an interrupted run goes on where it stopped. Sections: stage1 (three seeds: random
student, stage-1 student, teacher), ablations, finetune, stage2 (retrieval), qa (multiple choice and open-ended),
ava.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = (0, 1, 2)
ABLATIONS = [('semantic', 0.9, 2), ('tube', 0.8, 2), ('tube', 0.9, 2), ('random', 0.8, 2), ('random', 0.9, 2),
             ('semantic', 0.8, 1), ('semantic', 0.8, 4)]  # one constant changed from the demo preset (semantic 0.8 2)


def run(work, result, *command):
    """`python COMMAND` in WORK unless WORK/result exists; the time it took goes to WORK/times.txt."""
    if os.path.exists(os.path.join(work, result)):
        return
    t = time.time()
    subprocess.run([sys.executable, *command], cwd=work, check=True, env={**os.environ, 'PYTHONPATH': ROOT})
    with open(os.path.join(work, 'times.txt'), 'a') as f:
        f.write(f'{time.time() - t:7.0f} s  python {" ".join(command)}\n')


def read(work, path):
    return json.load(open(os.path.join(work, path)))


def last_log(work, out_dir, key):
    return [r for r in map(json.loads, open(os.path.join(work, out_dir, 'log.jsonl'))) if key in r][-1]


def classify(work, name, ckpt_or_teacher, data):
    """evaluate.py classify on the square's colour (k-NN, linear probe) -> 'k-NN / linear'."""
    source = ['--ckpt', ckpt_or_teacher] if ckpt_or_teacher.endswith('.pt') else \
        ['--teacher', 'tiny', '--pretrained', f'{data}/tiny_clip.pt', '--frames', '4']
    run(work, f'results/{name}.json', f'{ROOT}/evaluate.py', 'classify', *source, '--train', f'{data}/train_color.csv',
        '--val', f'{data}/val_color.csv', '--root', data, '--clips', '1', '--crops', '1',
        '--out', f'results/{name}.json')
    r = read(work, f'results/{name}.json')
    return r['knn']['top1'], r['linear']['top1']


def stage1(work, seed, **changes):
    """The stage-1 demo of one seed (its own set and demo CLIP); changes: ablation constants. -> its checkpoint."""
    data, tag = f'demo_data_s{seed}', ''.join(f'_{k}{v}' for k, v in changes.items())
    out = f'out/demo_stage1_s{seed}{tag}'
    run(work, f'{out}/last.pt', f'{ROOT}/train_stage1.py', '--preset=demo', f'--seed={seed}', f'--data_root={data}',
        f'--data_list={data}/train.csv', f'--out_dir={out}', *[f'--{k}={v}' for k, v in changes.items()])
    return f'{out}/last.pt'


def random_student(work, seed):
    run(work, f'out/demo_random_s{seed}/last.pt', f'{ROOT}/demo.py', 'random-student',
        f'out/demo_random_s{seed}/last.pt', '--seed', str(seed))
    return f'out/demo_random_s{seed}/last.pt'


def pair(a, b):
    return f'{a:.1f} / {b:.1f}'


def section_stage1(work):
    rows = ['| seed | random student (floor) | stage-1 student | teacher (ceiling) |', '|---|---|---|---|']
    for s in SEEDS:
        data = f'demo_data_s{s}'
        student, floor = stage1(work, s), random_student(work, s)
        knn = [classify(work, f'{n}_s{s}', c, data) for n, c in (('random', floor), ('stage1', student),
                                                                  ('teacher', 'teacher'))]
        rows.append(f'| {s} | {pair(*knn[0])} | **{knn[1][0]:.1f}** / {knn[1][1]:.1f} | {pair(*knn[2])} |')
    return rows


def section_ablations(work):
    def cell(mask, ratio, layers):  # mean over seeds 0 and 1 and half their difference, k-NN (linear)
        r = [classify(work, f'abl_s{s}_{mask}_{ratio}_{layers}', stage1(work, s) if (mask, ratio, layers) == (
            'semantic', 0.8, 2) else stage1(work, s, mask_type=mask, mask_ratio=ratio, align_layers=layers),
            f'demo_data_s{s}') for s in (0, 1)]
        (a, b), (c, d) = r
        return f'{(a + c) / 2:.1f} ± {abs(a - c) / 2:.1f} ({(b + d) / 2:.1f} ± {abs(b - d) / 2:.1f})'
    rows = ['| mask type | ratio 0.8 | ratio 0.9 |', '|---|---|---|']
    rows += [f'| {m} | {cell(m, 0.8, 2)} | {cell(m, 0.9, 2)} |' for m in ('semantic', 'tube', 'random')]
    return rows + ['', '| aligned layers (semantic, 0.8) | 1 (the last) | 2 (demo preset) | 4 (all) |',
                   '|---|---|---|---|', '| k-NN (linear) | ' + ' | '.join(cell('semantic', 0.8, k) for k in (1, 2, 4))
                   + ' |']


def section_finetune(work):
    rows = ['| fine-tuning from | seed 0 | seed 1 | seed 2 |', '|---|---|---|---|']
    for name, init in (('stage-1 demo student', stage1), ('random student', random_student)):
        cells = []
        for s in SEEDS:
            out, data = f'out/demo_finetune_{init.__name__}_s{s}', f'demo_data_s{s}'
            run(work, f'{out}/best.pt', '-m', 'tasks.finetune', '--preset=demo', f'--seed={s}', f'--data_root={data}',
                f'--train_list={data}/train_few.csv', f'--val_list={data}/val.csv', f'--init={init(work, s)}',
                f'--out_dir={out}')
            cells.append(last_log(work, out, 'test_top1')['test_top1'])
        rows.append(f'| {name} | ' + ' | '.join(f'{c:.1f}' for c in cells) + ' |')
    return rows


def stage2(work):
    """The stage-2 demo from the stage-1 demo student and from the random one -> {start: checkpoint}."""
    run(work, 'out/demo_stage1/last.pt', f'{ROOT}/train_stage1.py', '--preset=demo')
    run(work, 'out/demo_stage2/last.pt', f'{ROOT}/train_stage2.py', '--preset=demo')
    run(work, 'out/demo_stage2_random/last.pt', f'{ROOT}/train_stage2.py', '--preset=demo',
        f'--init={random_student(work, 0)}', '--out_dir=out/demo_stage2_random')
    return {'stage-1 demo student': 'out/demo_stage2/last.pt', 'random student': 'out/demo_stage2_random/last.pt'}


def section_stage2(work):
    rows = ['| stage 2 from | text -> video | video -> text |', '|---|---|---|']
    for name, ckpt in stage2(work).items():
        result = f'results/retrieval_{name.split()[0]}.json'
        run(work, result, f'{ROOT}/evaluate.py', 'retrieval', '--ckpt', ckpt, '--ann', 'demo_data/captions_val.json',
            '--root', 'demo_data', '--out', result)
        r = read(work, result)
        rows.append(f'| {name} | ' + ' | '.join(pair(r['vtc'][f'{d}_R@1'], r['reranked'][f'{d}_R@1'])
                                              for d in ('t2v', 'v2t')) + ' |')
    return rows


def section_qa(work):
    run(work, 'demo_data/mc_test.json', '-m', 'tasks.video_qa', 'demo_data')
    rows = ['| stage 2 from | MC accuracy, 60 questions (chance 20%) | QA test accuracy, 24 questions: all / colour '
            '/ direction |', '|---|---|---|']
    for name, ckpt in stage2(work).items():
        tag = name.split()[0]
        run(work, f'results/mc_{tag}.json', f'{ROOT}/evaluate.py', 'mc', '--ckpt', ckpt, '--ann',
            'demo_data/mc_test.json', '--root', 'demo_data', '--out', f'results/mc_{tag}.json')
        run(work, f'out/demo_qa_{tag}/test_predictions.json', '-m', 'tasks.finetune_qa', '--preset=demo',
            f'--init={ckpt}', f'--out_dir=out/demo_qa_{tag}')
        test = last_log(work, f'out/demo_qa_{tag}', 'test')
        types = test['test']['by_type']  # 'what' = colour, 'which' = direction
        rows.append(f'| {name} | {read(work, f"results/mc_{tag}.json")["accuracy"]:.1f} | '
                    f'{test["test"]["accuracy"]:.1f} / {types["what"]:.1f} / {types["which"]:.1f} |')
    prior = test['prior']
    return rows + [f'| without the video (the printed baselines) | | {prior["majority"]:.1f} (always '
                   f'"{prior["majority_answer"]}") / {prior["question_prior"]:.1f} (most frequent answer per '
                   'question) |']


def section_ava(work):
    rows = ['| init | seed 0 | seed 1 |', '|---|---|---|']
    stage2(work)  # for out/demo_stage1/last.pt, the preset's INIT
    for name, init in (('stage-1 demo checkpoint (`out/demo_stage1/last.pt`)', 'out/demo_stage1/last.pt'),
                       ('random weights (`out/demo_random_s0/last.pt`)', random_student(work, 0))):
        cells = []
        for s in (0, 1):
            out = f'out/demo_ava_{init.split("/")[1]}_s{s}'
            run(work, f'{out}/last.pt', '-m', 'tasks.finetune_ava', '--preset=demo', f'--seed={s}', f'--init={init}',
                f'--out_dir={out}')
            detections = f'{out}/' + last_log(work, out, 'detections')['detections']
            run(work, f'results/{out.split("/")[1]}.json', f'{ROOT}/evaluate.py', 'ava-map', '--labelmap',
                'demo_ava/labelmap.pbtxt', '--groundtruth', 'demo_ava/val.csv', '--detections', detections,
                '--exclusions', 'demo_ava/val_excluded.csv', '--out', f'results/{out.split("/")[1]}.json')
            r = read(work, f'results/{out.split("/")[1]}.json')
            cells.append(' / '.join(f'{v:.1f}' for v in r['AP'].values()) + f' / **{r["mAP"]:.1f}**')
        rows.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return rows


SECTIONS = {'stage1': section_stage1, 'ablations': section_ablations, 'finetune': section_finetune,
            'stage2': section_stage2, 'qa': section_qa, 'ava': section_ava}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--work', required=True, help='folder for the runs (the README paths start there)')
    ap.add_argument('--only', default=','.join(SECTIONS), help=f'comma-separated sections of {", ".join(SECTIONS)}')
    ap.add_argument('--check', metavar='README', help='say which table lines differ from this README')
    args = ap.parse_args(argv)
    os.makedirs(os.path.join(args.work, 'results'), exist_ok=True)
    tables = {name: SECTIONS[name](args.work) for name in args.only.split(',')}
    for name, rows in tables.items():
        print(f'\n{name}:\n' + '\n'.join(rows))
    if args.check:
        readme = open(args.check).read().splitlines()
        differ = [line for rows in tables.values() for line in rows if line and line not in readme]
        print(f'\n{len(differ)} table lines are not in {args.check}' + ''.join(f'\n  {line}' for line in differ))
        return 1 if differ else 0
    return 0


if __name__ == '__main__':
    sys.exit(main())
