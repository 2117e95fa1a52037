"""Shared pytest fixtures: the repository root on sys.path (so `import data` works from tests/) and the
synthetic demo dataset, built once per test session."""
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
