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


def test_kept_for_backward_is_per_clip_activations_only():
    """Table 1's memory column rests on this count: what autograd keeps grows with the batch (the
    same per clip at 2 and 4 clips: counting the weights would halve it), and VideoMAE's decoder,
    which runs on every token, keeps more than UMT's alignment on the visible ones."""
    import json

    def kept(*argv):
        out = faults.run_here('tools.bench', ['--preset=tiny', *argv])
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.split('RESULT ')[-1])['saved_gib_per_clip']

    at_2, at_4 = kept('--batch=2'), kept('--batch=4')
    assert at_2 > 0 and abs(at_4 / at_2 - 1) < 0.05
    assert kept('--batch=2', '--target=pixels', '--mask_type=tube', '--mask_ratio=0.9') > 1.5 * at_2
