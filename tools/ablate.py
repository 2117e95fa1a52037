"""
Ablations that can tell their rows apart: one reference setting of the stage-1 demo and a list of
constant changes, each trained on several paired seeds and evaluated on the demo's 1,200 held-out
videos, with the paired difference to the reference and its 95% confidence interval.

    python -m tools.ablate --name table1 --rows target=pixels target=clip+pixels \
        target=clip+masked
    python -m tools.ablate --name masks --seeds 5 --rows mask_type=tube mask_type=random \
        mask_ratio=0.9
    python -m tools.ablate --name layers --reference align_layers=2 --rows align_layers=1 \
        align_layers=4

A row is one or more `name=value` changes of train_stage1.py's constants (comma-separated:
`target=pixels,mask_type=tube,mask_ratio=0.9`), applied to `python train_stage1.py --preset=demo`
and the reference. Seed s fixes the demo set (WORK/demo_data_s{s}), its demo CLIP, the student's
initial weights, the data order and the masks: only the constants change between the runs of one
seed, so their difference is paired. Every run is evaluated as `evaluate.py classify` does (k-NN and
linear probe of the square's colour, learned on train_color.csv, tested on test_color.csv, 1 clip x
1 crop). A run whose result is in WORK is not run again, so a second call (or one with more rows or
seeds) only runs what is missing. Writes WORK/NAME.json (every run's numbers and the summary) and
WORK/NAME.png (each row's difference to the reference with its interval). train_stage1.py knows
nothing of this tool: each run is the command line it prints.
"""

import argparse
import ast
import contextlib
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from util import configurator
from data import VideoClassification
from evaluate import load_model, probe_accuracy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Student's t quantile t(0.975, df) for df = 1..30: the 95% interval of a mean of df + 1 paired
# differences
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042)


def stage1_constants():
    """The names of train_stage1.py's constants (its upper-case top-level assignments)."""
    tree = ast.parse(open(os.path.join(ROOT, 'train_stage1.py')).read())
    return {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
            if isinstance(t, ast.Name) and t.id.isupper()}


def parse_changes(text):
    """'target=pixels,mask_ratio=0.9' -> ['--target=pixels', '--mask_ratio=0.9'] ('' -> []).
    A name train_stage1.py does not have stops here, before any run (its values it checks)."""
    out = []
    for item in filter(None, text.split(',')):
        if '=' not in item or not item.split('=')[0].strip():
            configurator.fail(f'{item!r} in {text!r} is not name=value (e.g. mask_type=tube)')
        name = item.split('=')[0].strip()
        if name.upper() not in stage1_constants():
            configurator.fail(f'{name!r} in {text!r} is not a constant of train_stage1.py '
                              '(python train_stage1.py --help lists them)')
        out.append('--' + item.strip())
    return out


class Cached(torch.utils.data.Dataset):
    """A dataset whose items are decoded once: every run of a seed is evaluated on the same
    clips."""
    def __init__(self, dataset):
        self.dataset, self.items, self.num_classes = dataset, {}, dataset.num_classes

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        if i not in self.items:
            self.items[i] = self.dataset[i]
        return self.items[i]


EVAL_SETS = {}  # (seed, frames, size) -> (train, test): decoded once per process


def evaluate_run(ckpt, data_root, seed):
    """evaluate.py classify's k-NN and linear probe of the square's colour -> {'knn': top-1,
    'linear': top-1}."""
    with contextlib.redirect_stdout(io.StringIO()):  # the load report
        net, kind, config = load_model(ckpt, 'classify')
    key = (seed, config.num_frames, config.img_size)
    if key not in EVAL_SETS:
        EVAL_SETS.clear()  # one seed at a time: the runs go seed after seed
        EVAL_SETS[key] = tuple(
            Cached(VideoClassification(f'{data_root}/{split}_color.csv', data_root, key[1], key[2],
                                       mode=mode, num_clips=1, num_crops=1))
            for split, mode in (('train', 'val'), ('test', 'test')))
    with contextlib.redirect_stderr(io.StringIO()):  # the feature loops' progress bars
        r = probe_accuracy(net, kind, config, *EVAL_SETS[key], torch.device('cpu'), workers=0)
    return {'knn': r['knn']['top1'], 'linear': r['linear']['top1']}


def run(work, seed, changes):
    """One training run of the stage-1 demo and its evaluation -> its result (read back if done
    before)."""
    data_root = os.path.join(work, f'demo_data_s{seed}')
    out = os.path.join(work, 'runs', f's{seed}',
                       changes.replace('=', '-').replace(',', '_') or 'reference')
    result_file = os.path.join(out, 'result.json')
    if os.path.exists(result_file):
        return json.load(open(result_file))
    command = [sys.executable, os.path.join(ROOT, 'train_stage1.py'), '--preset=demo',
               f'--seed={seed}', f'--data_root={data_root}', f'--data_list={data_root}/train.csv',
               f'--out_dir={out}', *parse_changes(changes)]
    os.makedirs(out, exist_ok=True)
    t = time.perf_counter()
    with open(os.path.join(out, 'train.txt'), 'w') as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - t
    if code:
        tail = open(os.path.join(out, 'train.txt')).read().splitlines()[-3:]
        configurator.fail(f'the run `{" ".join(command[1:])}` failed:\n' + '\n'.join(tail))
    records = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
    steps = [r for r in records if 'ms_per_step' in r]
    result = {'seed': seed, 'changes': changes,
              **evaluate_run(os.path.join(out, 'last.pt'), data_root, seed),
              'final_loss': steps[-1]['loss'], 'steps': steps[-1]['step'],
              'train_seconds': round(seconds, 1),
              'ms_per_step': statistics.median(r['ms_per_step'] for r in steps[1:] or steps)}
    with open(result_file, 'w') as f:
        json.dump(result, f, indent=1)
    return result


def interval(xs):
    """Mean and the half-width of its 95% interval (Student's t over the seeds; nan for one
    seed)."""
    if len(xs) < 2:
        return statistics.fmean(xs), math.nan
    half = T975[min(len(xs), 31) - 2] * statistics.stdev(xs) / math.sqrt(len(xs))
    return statistics.fmean(xs), half


def summarize(results, rows):
    """results[row][seed] -> one summary per row: its means, and its paired differences to
    rows[0]."""
    out = []
    for row in rows:
        seeds = sorted(set(results[row]) & set(results[rows[0]]))
        s = {'row': row or 'reference', 'seeds': len(seeds),
             'ms_per_step': statistics.fmean(results[row][k]['ms_per_step'] for k in seeds),
             'train_seconds': statistics.fmean(results[row][k]['train_seconds'] for k in seeds)}
        for m in ('knn', 'linear'):
            s[m] = interval([results[row][k][m] for k in seeds])
            s[f'{m}_diff'] = interval([results[row][k][m] - results[rows[0]][k][m] for k in seeds])
        out.append(s)
    return out


def table(summary):
    def cell(m, h):
        return f'{m:+.1f} [{m - h:+.1f}, {m + h:+.1f}]' if not math.isnan(h) else f'{m:+.1f}'
    lines = ['| row | k-NN top-1 | difference, 95% CI | linear top-1 | difference, 95% CI | '
             'ms per step |', '|---|---|---|---|---|---|']
    for s in summary:
        knn, linear = (cell(*s[k]) if s is not summary[0] else '-'
                       for k in ('knn_diff', 'linear_diff'))
        lines.append(f'| {s["row"]} | {s["knn"][0]:.1f} | {knn} | {s["linear"][0]:.1f} | '
                     f'{linear} | {s["ms_per_step"]:.0f} |')
    return lines


def picture(summary, path, title):
    """Each row's difference to the reference (dot) and its 95% interval (bar), k-NN left, linear
    probe right."""
    rows, label_w, panel_w, row_h, top = summary[1:], 340, 320, 26, 40
    finite = [abs(x) for s in rows for m in ('knn', 'linear')
              for x in (s[f'{m}_diff'][0] - s[f'{m}_diff'][1],
                        s[f'{m}_diff'][0] + s[f'{m}_diff'][1])
              if not math.isnan(x)]
    span = max([5.0] + finite) * 1.1  # points either side of 0
    img = Image.new('RGB', (label_w + 2 * panel_w + 20, top + row_h * len(rows) + 30), 'white')
    draw = ImageDraw.Draw(img)
    draw.text((8, 6), f'{title}: difference to the reference, points (95% interval)', fill='black')
    for p, m in enumerate(('k-NN', 'linear')):
        x0 = label_w + p * (panel_w + 10)
        to_x = lambda v: x0 + panel_w / 2 + v / span * panel_w / 2  # noqa: E731
        draw.rectangle([x0, top - 6, x0 + panel_w, top + row_h * len(rows)],
                       outline=(200, 200, 200))
        draw.line([(to_x(0), top - 6), (to_x(0), top + row_h * len(rows))], fill=(160, 160, 160))
        draw.text((x0 + 4, top - 18), f'{m}   (-{span:.0f} .. +{span:.0f})', fill='black')
        for i, s in enumerate(rows):
            mean, half = s[f'{"knn" if p == 0 else "linear"}_diff']
            y = top + row_h * i + row_h // 2
            colour = (200, 40, 40) if not math.isnan(half) and mean - half > 0 else \
                (40, 40, 200) if not math.isnan(half) and mean + half < 0 else (90, 90, 90)
            if not math.isnan(half):
                draw.line([(to_x(max(mean - half, -span)), y), (to_x(min(mean + half, span)), y)],
                          fill=colour, width=3)
            draw.ellipse([to_x(mean) - 4, y - 4, to_x(mean) + 4, y + 4], fill=colour)
    for i, s in enumerate(rows):
        draw.text((8, top + row_h * i + row_h // 2 - 6), s['row'][:54], fill='black')
    img.save(path)


def explain(work, seeds, ratio=0.8, tol=25):
    """Why the toy can differ from the paper, on each seed's held-out videos (4 frames at 64 px) and
    its demo CLIP: the square's share of the tokens and of the teacher's CLS attention, the share of
    the square's tokens each mask keeps (ratio 0.8) and how often a frame keeps none, and how well a
    linear probe tells the colour from the teacher's last-layer tokens pooled over the square's
    tokens only, the background's only, or all of them."""
    from demo import DEMO_COLORS, tiny_clip
    from evaluate import train_linear_probe
    from masking import random_mask, semantic_mask, tube_mask
    from teacher import CLIPTeacher
    from data import normalize
    rgb = torch.tensor(list(DEMO_COLORS.values()), dtype=torch.float32)             # [6, 3]
    rows = []
    for seed in range(seeds):
        root = os.path.join(work, f'demo_data_s{seed}')
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            teacher = CLIPTeacher(tiny_clip(f'{root}/tiny_clip.pt'), align_layers=1)
        stats, pooled = {}, {}
        g = torch.Generator().manual_seed(seed)  # the masks: the same in every call
        for split, mode in (('train', 'val'), ('test', 'test')):
            ds = VideoClassification(f'{root}/{split}_color.csv', root, 4, 64, mode=mode)
            loader = torch.utils.data.DataLoader(ds, batch_size=64)
            feats = []
            for b in loader:
                clips, labels = b['video'].float(), b['label']             # [B, 3, T, 64, 64]
                # [B, T, 64, 64]: the pixels of the square's colour
                near = (clips - rgb[labels][:, :, None, None, None]).norm(dim=1) < tol
                # [B, T, 8, 8]: each token's share of them
                square = near.unflatten(2, (8, 8)).unflatten(4, (8, 8)).float().mean((3, 5))
                square = (square >= 0.5).flatten(2)                        # [B, T, 64] tokens
                with torch.no_grad():
                    # [1, B, N, E], [B, T, 64]
                    hidden, attn = teacher.encode(normalize(b['video']))
                    tokens = teacher.targets(hidden)[0]                     # [B, N, C]
                sq = square.flatten(1).float()[:, :, None]                  # [B, N, 1]
                feats.append(torch.stack([(tokens * sq).sum(1) / sq.sum(1).clamp(min=1),
                                          (tokens * (1 - sq)).sum(1) / (1 - sq).sum(1),
                                          tokens.mean(1)]))
                if split == 'test':
                    B, T, n = attn.shape
                    keeps = {'semantic': semantic_mask(attn, ratio, g),
                             'random': random_mask(B, T, n, ratio, generator=g),
                             'tube': tube_mask(B, T, n, ratio, generator=g)}
                    add = lambda k, v: stats.setdefault(k, []).append(v)  # noqa: E731
                    add('square tokens', square.float().mean().item())
                    add('attention on the square', ((attn * square).sum() / attn.sum()).item())
                    for kind, keep in keeps.items():
                        kept = square.flatten(1).gather(1, keep).view(B, T, -1)  # [B, T, n_keep]
                        add(f'{kind}: square tokens kept', (kept.sum() / square.sum()).item())
                        add(f'{kind}: frames keeping none',
                            (kept.sum(-1) == 0).float().mean().item())
            pooled[split] = torch.cat(feats, 1), torch.tensor([label for _, label in ds.samples])
        for i, name in enumerate(('square tokens', 'background tokens', 'all tokens')):
            probe = train_linear_probe(pooled['train'][0][i], pooled['train'][1], len(DEMO_COLORS))
            hit = probe(pooled['test'][0][i]).argmax(1) == pooled['test'][1]
            stats[f'colour from {name} (linear probe)'] = [hit.float().mean().item()]
        rows.append({k: statistics.fmean(v) for k, v in stats.items()})
    print(f'\nthe teacher and the masks on the held-out videos, mean over seeds 0-{seeds - 1} '
          '(min / max):')
    for k in rows[0]:
        xs = [100 * r[k] for r in rows]
        print(f'| {k} | {statistics.fmean(xs):.1f}% ({min(xs):.1f} / {max(xs):.1f}) |')
    return rows


def main(argv=None):
    configurator.short_errors()
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--name', default='ablation',
                    help='the table: WORK/NAME.json and WORK/NAME.png')
    ap.add_argument('--rows', nargs='+', default=[],
                    help='constant changes, one row each: name=value[,name=value]')
    ap.add_argument('--reference', default='',
                    help='changes of the reference row (default: the demo preset as is)')
    ap.add_argument('--seeds', type=int, default=5,
                    help='paired seeds 0 .. SEEDS-1 (at least 2 for an interval)')
    ap.add_argument('--work', default='ablations',
                    help='folder of the demo sets, the runs and the results')
    ap.add_argument('--explain', action='store_true',
                    help='measure the teacher and the masks on each seed instead')
    args = ap.parse_args(argv)
    if args.explain:
        return explain(args.work, args.seeds)
    if not 1 <= args.seeds <= 31:
        configurator.fail(f'--seeds {args.seeds}: pass 1 to 31')
    for text in [args.reference] + args.rows:
        parse_changes(text)
    rows = [args.reference] + [','.join(filter(None, [args.reference, r])) for r in args.rows]
    results = {row: {} for row in rows}
    bar = tqdm(total=len(rows) * args.seeds, desc=f'ablation {args.name}', unit='run')
    # seed after seed: the demo set and the evaluation clips of a seed are reused
    for seed in range(args.seeds):
        for row in rows:
            bar.set_postfix(seed=seed, row=row or 'reference')
            results[row][seed] = run(args.work, seed, row)
            bar.update()
    bar.close()
    summary = summarize(results, rows)
    lines = table(summary)
    reference = ' '.join(parse_changes(args.reference))
    print(f'\n{args.name}: {args.seeds} seeds, reference `--preset=demo {reference}`, 1200 '
          'held-out videos\n' + '\n'.join(lines))
    runs = [r for row in rows for r in results[row].values()]
    with open(os.path.join(args.work, f'{args.name}.json'), 'w') as f:
        json.dump({'reference': args.reference, 'rows': args.rows, 'seeds': args.seeds,
                   'summary': summary, 'runs': runs}, f, indent=1)
    picture(summary, os.path.join(args.work, f'{args.name}.png'), args.name)
    print(f'wrote {args.work}/{args.name}.json and {args.name}.png; training took '
          f'{sum(r["train_seconds"] for r in runs) / 60:.0f} min over {len(runs)} runs')
    return summary


if __name__ == '__main__':
    main()
