"""tools/ablate.py: the 95% interval of a mean over paired seeds, paired differences to the reference row, and a
short end-to-end ablation (two seeds, two rows) that writes its JSON and PNG and, called again, trains nothing."""
import json
import math
import os

import pytest

from tools import ablate


def test_interval_is_students_t_over_the_seeds():
    mean, half = ablate.interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0 and half == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5), rel=1e-4)
    assert math.isnan(ablate.interval([7.0])[1])                      # one seed: no interval


def test_differences_are_paired_by_seed():
    # Row B is 10 points above the reference on every seed: the seeds' spread cancels, the interval is 0.
    ref = {s: {'knn': 50.0 + 20 * s, 'linear': 60.0, 'ms_per_step': 1.0, 'train_seconds': 1.0} for s in range(3)}
    row = {s: {**r, 'knn': r['knn'] + 10, 'linear': r['linear'] - s} for s, r in ref.items()}
    ref_summary, row_summary = ablate.summarize({'': ref, 'b=1': row}, ['', 'b=1'])
    assert ref_summary['knn_diff'] == (0.0, 0.0) and row_summary['knn_diff'] == (10.0, 0.0)
    assert row_summary['knn'][1] > 20                                  # unpaired, the spread is large
    assert row_summary['linear_diff'][0] == -1.0 and row_summary['linear_diff'][1] > 0


def test_bad_rows_are_named():
    with pytest.raises(ablate.configurator.BadInput, match="'tube' in 'mask_type=semantic,tube' is not name=value"):
        ablate.parse_changes('mask_type=semantic,tube')


def test_unknown_constants_stop_before_any_run():
    with pytest.raises(ablate.configurator.BadInput, match="'mask_typ' in 'mask_typ=tube' is not a "
                       "constant of train_stage1.py"):
        ablate.parse_changes('mask_typ=tube')
    assert ablate.parse_changes('mask_type=tube,align_layers=1') == ['--mask_type=tube',
                                                                     '--align_layers=1']


@pytest.fixture(scope='module')
def small_work(demo_dir, tmp_path_factory):
    """Two seeds' demo folders over the session's demo videos, with short train / test colour lists."""
    work = tmp_path_factory.mktemp('ablate')
    for seed in (0, 1):
        folder = work / f'demo_data_s{seed}'
        folder.mkdir()
        os.symlink(os.path.join(demo_dir, 'videos'), folder / 'videos')
        for name, lines in (('train.csv', 24), ('train_color.csv', 36), ('test_color.csv', 48)):
            (folder / name).write_text(''.join(open(os.path.join(demo_dir, name)).readlines()[:lines]))
        (folder / '.umt_demo').write_text('')
    return work


def test_a_small_ablation_end_to_end(small_work, capsys):
    argv = ['--name', 't', '--work', str(small_work), '--seeds', '2', '--rows', 'mask_type=tube',
            '--reference', 'teacher_pretrained=None,epochs=1,warmup_epochs=1,total_batch=8,micro_batch=8']
    summary = ablate.main(argv)
    assert [s['row'] for s in summary] == ['teacher_pretrained=None,epochs=1,warmup_epochs=1,total_batch=8,'
                                           'micro_batch=8', 'teacher_pretrained=None,epochs=1,warmup_epochs=1,'
                                           'total_batch=8,micro_batch=8,mask_type=tube']
    saved = json.load(open(small_work / 't.json'))
    assert len(saved['runs']) == 4 and {r['seed'] for r in saved['runs']} == {0, 1}
    assert all(0 <= r['knn'] <= 100 and r['steps'] == 3 for r in saved['runs'])
    diffs = [r['knn'] for r in saved['runs'] if 'tube' in r['changes']]
    refs = [r['knn'] for r in saved['runs'] if 'tube' not in r['changes']]
    assert summary[1]['knn_diff'][0] == pytest.approx(sum(diffs) / 2 - sum(refs) / 2)
    assert (small_work / 't.png').stat().st_size > 1000
    assert '| row | k-NN top-1 |' in capsys.readouterr().out
    logs = sorted(small_work.glob('runs/s*/*/train.txt'))
    stamps = [p.stat().st_mtime_ns for p in logs]
    ablate.main(argv)                                                  # everything is done: nothing runs again
    assert [p.stat().st_mtime_ns for p in logs] == stamps
