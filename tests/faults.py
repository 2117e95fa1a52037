"""Runs a training script with faults injected, for the tests only: the scripts know nothing of it.

    python tests/faults.py SCRIPT [ARGS...]        python tests/faults.py -m tasks.finetune [ARGS...]
    (also under torchrun, in place of the script)

UMT_TEST_NAN_STEPS=2,4  the loss of these optimizer steps (numbered from 1, as in the log) is multiplied by NaN
                        before backward, so the loss and every gradient are NaN;
UMT_TEST_KILL_AFTER=3   the process ends after step 3 (and its checkpoint, if one was due), as a kill would.
Every script calls training.lr_at once at the start of each step, with the number of steps done: that is the hook.
"""
import os
import runpy
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import training  # noqa: E402
from util import configurator

NAN_STEPS = {int(s) for s in os.environ.get('UMT_TEST_NAN_STEPS', '').split(',') if s}
KILL_AFTER = int(os.environ.get('UMT_TEST_KILL_AFTER', 0))
step_now = [0]  # the step being computed, numbered from 1
REAL = training.lr_at, torch.amp.GradScaler.scale  # wrapped afresh by every hooks() call, never a hook in a hook


def hooks(nan_steps=(), kill_after=0):
    """(lr_at, GradScaler.scale) wrapped: the first learns the step and stops after kill_after, the second poisons the
    loss of nan_steps. Tests in this process put them in place with monkeypatch.setattr."""
    lr_at, scale = REAL

    def lr_at_hook(step, *args, **kwargs):
        if kill_after and step >= kill_after:
            raise SystemExit(0)
        step_now[0] = step + 1
        return lr_at(step, *args, **kwargs)

    def scale_hook(self, outputs):
        out = scale(self, outputs)
        return out * float('nan') if step_now[0] in nan_steps else out
    return lr_at_hook, scale_hook


if __name__ == '__main__':
    training.lr_at, torch.amp.GradScaler.scale = hooks(NAN_STEPS, KILL_AFTER)
    if sys.argv[1] == '-m':
        sys.argv = [sys.argv[2]] + sys.argv[3:]
        runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
    else:
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name='__main__')


def run_here(entry, argv, nan_steps=(), kill_after=0):
    """A training script run in this process (no start-up cost), as `python [tests/faults.py] ENTRY ARGV` would run:
    -> an object with returncode (0, or 1 for bad input, whose message goes to stderr), stdout and stderr."""
    import contextlib
    import gc
    import io
    import types
    out, err, code = io.StringIO(), io.StringIO(), 0
    saved = sys.argv, training.lr_at, torch.amp.GradScaler.scale, {k: os.environ.pop(k, None) for k in
                                                                   ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
    sys.argv = [str(entry), *map(str, argv)]
    training.lr_at, torch.amp.GradScaler.scale = hooks(nan_steps, kill_after)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if str(entry).endswith('.py'):
                runpy.run_path(str(entry), run_name='__main__')
            else:
                runpy.run_module(entry, run_name='__main__')
    except configurator.BadInput as e:
        code = 1
        err.write(f'{os.path.basename(str(entry))}: {e}\n')
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv, training.lr_at, torch.amp.GradScaler.scale = saved[:3]
        os.environ.update({k: v for k, v in saved[3].items() if v is not None})
        gc.collect()  # the run's globals (its OUT_DIR lock among them) go, as they would with its process
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
