"""
The demo numbers of README.md and docs/demo.md from fresh runs of their own commands: every table,
as they print it. --check names the table lines that are in neither file.

    python -m tools.demo_numbers --work demo_runs                        # all: hours on 2 cores
    python -m tools.demo_numbers --work demo_runs --only stage1,qa       # some sections
    python -m tools.demo_numbers --work demo_runs --check README.md docs/demo.md

The commands run in WORK (the documents' relative paths: demo_data, out/...; the ablations' runs are
tools.ablate's, in WORK/runs). What is already in WORK is not run again, so an interrupted run goes
on where it stopped. Sections: stage1 (three seeds: random student, stage-1 student, teacher),
ablations (the paper's Table 1 and 2 and the aligned layers, with tools.ablate, and what explains
them), finetune, stage2 (retrieval), qa (multiple choice and open-ended), ava.
"""

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = (0, 1, 2)


def run(work, result, *command):
    """`python COMMAND` in WORK unless WORK/result exists; its time goes to WORK/times.txt."""
    if os.path.exists(os.path.join(work, result)):
        return
    t = time.time()
    subprocess.run([sys.executable, *command], cwd=work, check=True,
                   env={**os.environ, 'PYTHONPATH': ROOT})
    with open(os.path.join(work, 'times.txt'), 'a') as f:
        f.write(f'{time.time() - t:7.0f} s  python {" ".join(command)}\n')


def read(work, path):
    return json.load(open(os.path.join(work, path)))


def last_log(work, out_dir, key):
    return [r for r in map(json.loads, open(os.path.join(work, out_dir, 'log.jsonl')))
            if key in r][-1]


def classify(work, name, ckpt_or_teacher, data):
    """evaluate.py classify of the square's colour, 1,200 held-out videos -> (k-NN, linear)."""
    source = ['--ckpt', ckpt_or_teacher] if ckpt_or_teacher.endswith('.pt') else \
        ['--teacher', 'tiny', '--pretrained', f'{data}/tiny_clip.pt', '--frames', '4']
    run(work, f'results/{name}.json', f'{ROOT}/evaluate.py', 'classify', *source, '--train',
        f'{data}/train_color.csv', '--val', f'{data}/test_color.csv', '--root', data,
        '--clips', '1', '--crops', '1', '--out', f'results/{name}.json')
    r = read(work, f'results/{name}.json')
    return r['knn']['top1'], r['linear']['top1']


def stage1(work, seed):
    """The stage-1 demo of one seed (its own set and demo CLIP) -> its checkpoint."""
    data, out = f'demo_data_s{seed}', f'out/demo_stage1_s{seed}'
    run(work, f'{out}/last.pt', f'{ROOT}/train_stage1.py', '--preset=demo', f'--seed={seed}',
        f'--data_root={data}', f'--data_list={data}/train.csv', f'--out_dir={out}')
    return f'{out}/last.pt'


def random_student(work, seed):
    run(work, f'out/demo_random_s{seed}/last.pt', f'{ROOT}/demo.py', 'random-student',
        f'out/demo_random_s{seed}/last.pt', '--seed', str(seed))
    return f'out/demo_random_s{seed}/last.pt'


def pair(a, b):
    return f'{a:.1f} / {b:.1f}'


def section_stage1(work):
    rows = ['| seed | random student (floor) | stage-1 student | teacher (ceiling) |',
            '|---|---|---|---|']
    for s in SEEDS:
        data = f'demo_data_s{s}'
        student, floor = stage1(work, s), random_student(work, s)
        knn = [classify(work, f'{n}_s{s}', c, data)
               for n, c in (('random', floor), ('stage1', student), ('teacher', 'teacher'))]
        rows.append(f'| {s} | {pair(*knn[0])} | **{knn[1][0]:.1f}** / {knn[1][1]:.1f} | '
                    f'{pair(*knn[2])} |')
    return rows


# The README's ablation commands: python -m tools.ablate --work demo_runs --name NAME ...
ABLATIONS = {
    'table1_steps': ['--rows', 'target=pixels', 'target=pixels,mask_type=tube,mask_ratio=0.9',
                     'target=clip+pixels', 'target=clip+masked'],
    'table1_time': ['--rows', 'target=pixels,epochs=14',
                    'target=pixels,mask_type=tube,mask_ratio=0.9,epochs=17',
                    'target=clip+pixels,epochs=15', 'target=clip+masked,epochs=15'],
    'table2': ['--seeds', '8', '--rows', 'mask_type=tube', 'mask_type=random', 'mask_ratio=0.9',
               'mask_type=tube,mask_ratio=0.9', 'mask_type=random,mask_ratio=0.9'],
    'layers': ['--rows', 'align_layers=1', 'align_layers=4'],
    'pixels_why': ['--rows', 'target=pixels', 'target=pixels,norm_pix=False',
                   'target=pixels,epochs=100'],
}


def ablate(work, name):
    """tools.ablate's summary of one table -> {row: summary} (runs done before are read back)."""
    from tools import ablate as tool
    with contextlib.redirect_stdout(io.StringIO()):
        summary = tool.main(['--work', work, '--name', name] + ABLATIONS[name])
    return {s['row']: s for s in summary}


def cell(s, metric='knn'):
    """'mean (difference [95% CI])', or the mean alone for the reference row."""
    mean, (d, h) = s[metric][0], s[f'{metric}_diff']
    return f'{mean:.1f}' if d == 0 == h else f'{mean:.1f} ({d:+.1f} [{d - h:+.1f}, {d + h:+.1f}])'


def section_ablations(work):
    steps, time_ = ablate(work, 'table1_steps'), ablate(work, 'table1_time')
    t2 = ablate(work, 'table2')
    layers, why = ablate(work, 'layers'), ablate(work, 'pixels_why')
    rows = ['| Table 1 row (TARGET) | masks | k-NN, equal steps | k-NN, equal time (epochs) | '
            'linear, equal steps | paper: memory GB / K400 / MSRVTT |', '|---|---|---|---|---|---|']
    for name, mask, row, timed, epochs, paper in (
            ('UMT: align with CLIP (`clip`)', 'semantic 0.8', '', '', 20, '16.0 / 84.9 / 66.8'),
            ('pixels, VideoMAE (`pixels`)', 'tube 0.9',
             'target=pixels,mask_type=tube,mask_ratio=0.9',
             'target=pixels,mask_type=tube,mask_ratio=0.9,epochs=17', 17, '44.0 / 78.8 / 55.6'),
            ('pixels (`pixels`)', 'semantic 0.8', 'target=pixels', 'target=pixels,epochs=14', 14,
             '-'),
            ('CLIP + pixels (`clip+pixels`)', 'semantic 0.8', 'target=clip+pixels',
             'target=clip+pixels,epochs=15', 15, '52.5 / 83.9 / 64.5'),
            ('CLIP + masked recovering (`clip+masked`)', 'semantic 0.8', 'target=clip+masked',
             'target=clip+masked,epochs=15', 15, '43.6 / 84.6 / 65.2')):
        s, t = steps[row or 'reference'], time_[timed or 'reference']
        rows.append(f'| {name} | {mask} | {cell(s)} | {cell(t)} ({epochs}) | {cell(s, "linear")} | '
                    f'{paper} |')
    rows += ['', '| mask (MASK_TYPE) | ratio 0.8: k-NN | ratio 0.9: k-NN | ratio 0.8: linear | '
             'paper K400 (0.8) |', '|---|---|---|---|---|']
    for mask, paper in (('semantic', '84.9'), ('tube', '84.3'), ('random', '84.6')):
        at8 = t2['reference' if mask == 'semantic' else f'mask_type={mask}']
        at9 = t2['mask_ratio=0.9' if mask == 'semantic' else f'mask_type={mask},mask_ratio=0.9']
        rows.append(f'| {mask} | {cell(at8)} | {cell(at9)} | {cell(at8, "linear")} | {paper} |')
    rows += ['', '| aligned layers (ALIGN_LAYERS) | k-NN | linear |', '|---|---|---|']
    for k, row in ((1, 'align_layers=1'), (2, 'reference'), (4, 'align_layers=4')):
        rows.append(f'| {k}{" (the demo preset)" if k == 2 else ""} | {cell(layers[row])} | '
                    f'{cell(layers[row], "linear")} |')
    rows += ['', '| why pixels fail here | k-NN | linear |', '|---|---|---|']
    for name, row in (('normalized pixels (VideoMAE)', 'target=pixels'),
                      ('raw pixels (`norm_pix=False`)', 'target=pixels,norm_pix=False'),
                      ('normalized pixels, 100 epochs', 'target=pixels,epochs=100')):
        rows.append(f'| {name} | {cell(why[row])} | {cell(why[row], "linear")} |')
    from tools import ablate as tool
    with contextlib.redirect_stdout(io.StringIO()):
        measured = tool.explain(work, 8)
    rows += ['', '| measured on the held-out videos, 8 seeds | mean (min / max) |', '|---|---|']
    for k in measured[0]:
        xs = [100 * m[k] for m in measured]
        rows.append(f'| {k} | {sum(xs) / len(xs):.1f}% ({min(xs):.1f} / {max(xs):.1f}) |')
    return rows


def section_finetune(work):
    rows = ['| fine-tuning from | seed 0 | seed 1 | seed 2 |', '|---|---|---|---|']
    for name, init in (('stage-1 demo student', stage1), ('random student', random_student)):
        cells = []
        for s in SEEDS:
            out, data = f'out/demo_finetune_{init.__name__}_s{s}', f'demo_data_s{s}'
            run(work, f'{out}/best.pt', '-m', 'tasks.finetune', '--preset=demo', f'--seed={s}',
                f'--data_root={data}', f'--train_list={data}/train_few.csv',
                f'--val_list={data}/val.csv', f'--init={init(work, s)}', f'--out_dir={out}')
            cells.append(last_log(work, out, 'test_top1')['test_top1'])
        rows.append(f'| {name} | ' + ' | '.join(f'{c:.1f}' for c in cells) + ' |')
    return rows


def stage2(work):
    """The stage-2 demo from the stage-1 demo student and from the random one -> {start: ckpt}."""
    run(work, 'out/demo_stage1/last.pt', f'{ROOT}/train_stage1.py', '--preset=demo')
    run(work, 'out/demo_stage2/last.pt', f'{ROOT}/train_stage2.py', '--preset=demo')
    run(work, 'out/demo_stage2_random/last.pt', f'{ROOT}/train_stage2.py', '--preset=demo',
        f'--init={random_student(work, 0)}', '--out_dir=out/demo_stage2_random')
    return {'stage-1 demo student': 'out/demo_stage2/last.pt',
            'random student': 'out/demo_stage2_random/last.pt'}


def section_stage2(work):
    rows = ['| stage 2 from | text -> video | video -> text |', '|---|---|---|']
    for name, ckpt in stage2(work).items():
        result = f'results/retrieval_{name.split()[0]}.json'
        run(work, result, f'{ROOT}/evaluate.py', 'retrieval', '--ckpt', ckpt, '--ann',
            'demo_data/captions_val.json', '--root', 'demo_data', '--out', result)
        r = read(work, result)
        recalls = [pair(r['vtc'][f'{d}_R@1'], r['reranked'][f'{d}_R@1']) for d in ('t2v', 'v2t')]
        rows.append(f'| {name} | ' + ' | '.join(recalls) + ' |')
    return rows


def section_qa(work):
    run(work, 'demo_data/mc_test.json', '-m', 'tasks.video_qa', 'demo', 'demo_data')
    rows = ['| stage 2 from | MC accuracy, 60 questions (chance 20%) | QA test accuracy, 24 '
            'questions: all / colour / direction |', '|---|---|---|']
    for name, ckpt in stage2(work).items():
        tag = name.split()[0]
        run(work, f'results/mc_{tag}.json', '-m', 'tasks.video_qa', 'mc', '--ckpt', ckpt, '--ann',
            'demo_data/mc_test.json', '--root', 'demo_data', '--out', f'results/mc_{tag}.json')
        run(work, f'out/demo_qa_{tag}/test_predictions.json', '-m', 'tasks.finetune_qa',
            '--preset=demo', f'--init={ckpt}', f'--out_dir=out/demo_qa_{tag}')
        test = last_log(work, f'out/demo_qa_{tag}', 'test')
        types = test['test']['by_type']  # 'what' = colour, 'which' = direction
        rows.append(f'| {name} | {read(work, f"results/mc_{tag}.json")["accuracy"]:.1f} | '
                    f'{test["test"]["accuracy"]:.1f} / {types["what"]:.1f} / '
                    f'{types["which"]:.1f} |')
    prior = test['prior']
    return rows + [f'| without the video (the printed baselines) | | {prior["majority"]:.1f} '
                   f'(always '
                   f'"{prior["majority_answer"]}") / {prior["question_prior"]:.1f} (most frequent '
                   'answer per question) |']


def section_ava(work):
    rows = ['| init | seed 0 | seed 1 |', '|---|---|---|']
    stage2(work)  # for out/demo_stage1/last.pt, the preset's INIT
    for name, init in (('stage-1 demo checkpoint (`out/demo_stage1/last.pt`)',
                        'out/demo_stage1/last.pt'),
                       ('random weights (`out/demo_random_s0/last.pt`)', random_student(work, 0))):
        cells = []
        for s in (0, 1):
            out = f'out/demo_ava_{init.split("/")[1]}_s{s}'
            run(work, f'{out}/last.pt', '-m', 'tasks.finetune_ava', '--preset=demo', f'--seed={s}',
                f'--init={init}', f'--out_dir={out}')
            detections = f'{out}/' + last_log(work, out, 'detections')['detections']
            result = f'results/{out.split("/")[1]}.json'
            run(work, result, '-m', 'tasks.ava', 'map', '--labelmap', 'demo_ava/labelmap.pbtxt',
                '--groundtruth', 'demo_ava/val.csv', '--detections', detections, '--exclusions',
                'demo_ava/val_excluded.csv', '--out', result)
            r = read(work, result)
            aps = ' / '.join(f'{v:.1f}' for v in r['AP'].values())
            cells.append(f'{aps} / **{r["mAP"]:.1f}**')
        rows.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return rows


SECTIONS = {'stage1': section_stage1, 'ablations': section_ablations, 'finetune': section_finetune,
            'stage2': section_stage2, 'qa': section_qa, 'ava': section_ava}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--work', required=True, help='folder for the runs (the paths start there)')
    ap.add_argument('--only', default=','.join(SECTIONS), help=f'sections of {", ".join(SECTIONS)}')
    ap.add_argument('--check', nargs='+', metavar='DOC', help='name the table lines not in these')
    args = ap.parse_args(argv)
    # Before hours of runs: the sections must exist and the documents be there to read.
    unknown = [name for name in args.only.split(',') if name not in SECTIONS]
    if unknown:
        ap.error(f'--only: unknown section(s) {", ".join(unknown)}; valid: {", ".join(SECTIONS)}')
    missing = [doc for doc in args.check or () if not os.path.isfile(doc)]
    if missing:
        ap.error(f'--check: no file {", ".join(missing)} (pass README.md and docs/demo.md)')
    os.makedirs(os.path.join(args.work, 'results'), exist_ok=True)
    tables = {name: SECTIONS[name](args.work) for name in args.only.split(',')}
    for name, rows in tables.items():
        print(f'\n{name}:\n' + '\n'.join(rows))
    if args.check:
        docs = {line for doc in args.check for line in open(doc).read().splitlines()}
        differ = [line for rows in tables.values() for line in rows if line and line not in docs]
        print(f'\n{len(differ)} table lines are not in {", ".join(args.check)}'
              + ''.join(f'\n  {line}' for line in differ))
        return 1 if differ else 0
    return 0


if __name__ == '__main__':
    sys.exit(main())
