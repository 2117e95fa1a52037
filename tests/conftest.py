"""Shared pytest fixtures: the repository root on sys.path (so `import data` works from tests/) and the
synthetic demo dataset, built once per test session."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope='session')
def demo_dir(tmp_path_factory):
    """Folder made by demo.make_demo (8 classes = color x direction, 12 train + 3 val videos each,
    96x128 px, 16 frames): videos/, train.csv, val.csv, classes.txt, captions_{train,val,images}.json, images/."""
    import demo
    out = tmp_path_factory.mktemp('demo')
    demo.make_demo(str(out))
    return str(out)
