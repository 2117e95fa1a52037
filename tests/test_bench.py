"""Runs tools/bench.py's tiny configuration (in this process) so the benchmark cannot rot, and
checks what it reports."""
import re

import faults


def test_bench_tiny_stage1():
    out = faults.run_here('tools.bench', ['--preset=tiny'])
    assert out.returncode == 0, out.stderr
    assert '104/512 tokens kept' in out.stdout             # 8 frames x (64 - int(64 * 0.8)) tokens
    clips = float(re.search(r'([\d.]+) clips/s', out.stdout).group(1))
    share = float(re.search(r'= ([\d.]+)% of the dense fp32 matmul rate', out.stdout).group(1))
    assert clips > 0 and 0 < share < 200
    for phase in ('teacher', 'student_fwd', 'backward', 'optimizer'):
        assert phase in out.stdout


def test_bench_tiny_stage2():
    out = faults.run_here('tools.bench', ['--preset=tiny', '--stage=2', '--frames=4'])
    assert out.returncode == 0, out.stderr
    assert 'stage 2' in out.stdout and '+ text' in out.stdout
    assert float(re.search(r'([\d.]+) clips/s', out.stdout).group(1)) > 0
