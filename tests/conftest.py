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


def counting_video(path, n, fps, band=1, height=16):
    """n frames, black but for a white band of `band` columns, frame i at columns band x i .. (lossless H.264): which
    frames a reader returned can be read back from their pixels (frame_numbers)."""
    import numpy as np
    import data
    os.makedirs(os.path.dirname(path), exist_ok=True)
    frames = np.zeros((n, height, band * n + n % 2, 3), dtype=np.uint8)
    for i in range(n):
        frames[i, :, band * i:band * (i + 1)] = 255
    data.write_video(str(path), frames, fps=fps, options={'qp': '0'})
    return str(path)


def frame_numbers(frames, band=1):
    """uint8 [T, H, W, 3] of a counting_video (band: its band's width in these frames) -> the frame numbers [T]."""
    import numpy as np
    return [int(np.asarray(f, dtype=float).mean(axis=(0, 2)).argmax()) // band for f in frames]


def log_records(out_dir):
    """A run's log.jsonl without the start-up line and the timings (which differ between runs)."""
    lines = [json.loads(line) for line in open(os.path.join(out_dir, 'log.jsonl'))]
    return [{k: v for k, v in r.items() if k not in ('ms_per_step', 'samples_per_s', 'data_wait')}
            for r in lines if 'config' not in r]
