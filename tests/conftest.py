"""Shared pytest fixtures: the repository root on sys.path (so `import data` works from tests/) and the
synthetic demo dataset, built once per test session."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope='session')
def demo_dir(tmp_path_factory):
    """Folder made by demo.make_demo (12 classes = colour x direction, 15 train + 5 val videos each, 96 x 96 px,
    16 frames): videos/, {train,val}.csv, {train,val}_color.csv, classes.txt, captions_{train,val,images}.json,
    images/."""
    import demo
    out = tmp_path_factory.mktemp('demo')
    demo.make_demo(str(out))
    return str(out)


def log_records(out_dir):
    """A run's log.jsonl without the start-up line and the timings (which differ between runs)."""
    lines = [json.loads(line) for line in open(os.path.join(out_dir, 'log.jsonl'))]
    return [{k: v for k, v in r.items() if k not in ('ms_per_step', 'samples_per_s', 'data_wait')}
            for r in lines if 'config' not in r]
