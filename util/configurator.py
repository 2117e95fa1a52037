"""
The scripts' settings and their checks, which a first reading skips (as nanoGPT's configurator.py).

Settings are the UPPER_CASE constants atop a script. `configure(globals(), PRESETS, sys.argv[1:])`
applies `--preset=NAME`, then `--name=value` overrides, prints what differs from the defaults (the
paper's recipe) and returns the resolved {name: value} dict for the log and every checkpoint;
`--help` prints the script's docstring, every constant with its comment, and the presets.

Bad input: a file, path or value of the user's that cannot be used ends the command with one message
that names it and says what to do (BadInput, printed by short_errors' hook without a traceback). The
concept files (model, teacher, masking, data) raise ValueError; the scripts turn it into BadInput
where they read what the user named (`with user_input(): ...`). The start-up checks run before
anything heavy, so a typo costs seconds, not a queue slot.
"""

import ast
import contextlib
import os
import re
import sys

# ----------------------------------------------------------------------------------------------
# Bad input: one message, never a traceback

class BadInput(Exception):
    """A file, path or setting of the user's that cannot be used. The message says what to do."""

def fail(message):
    raise BadInput(message)

def short_errors():
    """From here on an uncaught BadInput ends the program with its message on stderr (exit code 1),
    no traceback. A traceback stays for everything else: those are bugs of our own."""
    default = sys.excepthook

    def hook(kind, error, tb):
        if not issubclass(kind, BadInput):
            return default(kind, error, tb)
        rank = f'rank {os.environ["RANK"]}: ' if int(os.environ.get('WORLD_SIZE', 1)) > 1 else ''
        print(f'{rank}{os.path.basename(sys.argv[0])}: {error}', file=sys.stderr)
    sys.excepthook = hook

@contextlib.contextmanager
def user_input(what=''):
    """A ValueError raised inside (a concept file rejecting a file, a checkpoint or a value the user
    named) becomes BadInput, prefixed with `what`."""
    try:
        yield
    except ValueError as e:
        fail(f'{what}{e}')

def reported(fn):
    """fn, whose ValueError (a concept file rejecting a file the user named) becomes BadInput."""
    def call(*args, **kwargs):
        with user_input():
            return fn(*args, **kwargs)
    return call

# ----------------------------------------------------------------------------------------------
# Settings: constants, presets, --name=value, --help

def constant_lines(path, names):
    """{NAME: source line(s)}: the assignment, its comment and the comment lines continuing it."""
    lines, out = open(path).read().splitlines(), {}
    for i, line in enumerate(lines):
        m = re.match(r'([A-Z][A-Z0-9_]*) = ', line)
        if m and m.group(1) in names and m.group(1) not in out:
            block = [line]
            while i + len(block) < len(lines) and re.match(r'\s{20,}#', lines[i + len(block)]):
                block.append(lines[i + len(block)])
            out[m.group(1)] = '\n'.join(block)
    return out

def configure(constants, presets, argv):
    """Apply `--preset=NAME`, then `--KEY=VALUE` overrides, to a script's constants (its globals()).
    Values are read with ast.literal_eval (`--mask_type=tube` and `--mask_ratio=0.9` both work),
    must have the type of the default (an int is accepted for a float), and an unknown key fails
    with the list of valid ones. -h / --help prints the docstring, the constants and the presets."""
    short_errors()
    names = sorted(k for k, v in constants.items() if k.isupper()  # plain values (not PRESETS)
                   and isinstance(v, (bool, int, float, str, tuple, list, type(None))))
    defaults = {k: constants[k] for k in names}
    if {'-h', '--help'} & set(argv):
        source = constant_lines(constants['__file__'], names)
        print(constants['__doc__'].strip()
              + "\n\nConstants (--name=value; the comment gives the paper's value):\n"
              + '\n'.join(source.get(k, f'{k} = {defaults[k]!r}') for k in names)
              + '\n\nPresets (--preset=NAME):\n'
              + '\n'.join(f'  {p}: ' + (', '.join(f'{k}={v!r}' for k, v in o.items())
                                        or 'the defaults') for p, o in presets.items()))
        raise SystemExit(0)

    def parse(arg):
        if not (arg.startswith('--') and '=' in arg):
            fail(f'arguments look like --KEY=VALUE (or --help), got {arg!r}')
        key, text = arg[2:].split('=', 1)
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word is a string
        return key.upper(), value

    def assign(key, value, source):
        if key not in names:
            fail(f'unknown setting {key!r} ({source}); valid: {", ".join(names)}')
        default = constants[key]
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if default is not None and value is not None and type(value) is not type(default):
            fail(f'{key} must be {type(default).__name__} like its default {default!r}, '
                 f'got {value!r} ({source})')
        constants[key] = value

    pairs = [parse(a) for a in argv]
    for key, value in pairs:  # the preset first, so single overrides win over it
        if key == 'PRESET':
            if value not in presets:
                fail(f'unknown preset {value!r}; valid: {", ".join(presets)}')
            for k, v in presets[value].items():
                assign(k, v, f'preset {value}')
    for key, value in pairs:
        if key != 'PRESET':
            assign(key, value, 'command line')
    config = {k: constants[k] for k in names}
    if int(os.environ.get('RANK', 0)) == 0:
        changed = ', '.join(f'{k}={v!r}' for k, v in config.items() if v != defaults[k])
        print(f'settings changed from the defaults: {changed or "none"}')
    return config

# ----------------------------------------------------------------------------------------------
# Start-up checks

def split_batch(total_batch, micro_batch):
    """-> (world_size, micro, grad_accum) with TOTAL_BATCH = micro x processes x grad_accum.
    MICRO_BATCH is the most samples one process forwards at once: when a process's share of
    TOTAL_BATCH is no multiple of it (the demo's 16 clips over 2 processes: 8 each), micro is the
    largest size up to MICRO_BATCH that divides the share. Only a TOTAL_BATCH the processes cannot
    split stops the run. Called before the process group exists: torchrun sets WORLD_SIZE."""
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    if micro_batch < 1:
        fail(f'MICRO_BATCH={micro_batch} must be positive')
    if total_batch < 1 or total_batch % world_size:
        fail(f'TOTAL_BATCH={total_batch} must be a positive multiple of the {world_size} '
             'processes: change it, or the number of processes')
    share = total_batch // world_size
    micro = max(m for m in range(1, min(micro_batch, share) + 1) if share % m == 0)
    return world_size, micro, share // micro

def need_files(paths, what, skip=False):
    """Stop when a path of {NAME: path} is set but is not a file; `what` says what it holds."""
    for name, path in paths.items():
        if path and (os.path.isdir(path) or not skip and not os.path.isfile(path)):
            fail(f'{name} {path!r} ' + ('is a folder' if os.path.isdir(path) else 'not found')
                 + f': {what}')

def need_init(init, out_dir, what, demo_command):
    """INIT must be a file, unless the run resumes from OUT_DIR/last.pt."""
    if not os.path.exists(os.path.join(out_dir, 'last.pt')) and not os.path.isfile(init):
        hint = f' Run `{demo_command}` first.' if 'demo' in init else ''
        fail(f'INIT {init!r} not found: pass --init=CHECKPOINT, {what}.{hint}')

def need_positive(**values):
    """Stop on a count (EPOCHS, ...) that is not positive."""
    for name, v in values.items():
        if v is None or v <= 0:
            fail(f'{name}={v} must be positive')

def epoch_steps(num_items, total_batch, source, unit):
    """Optimizer steps per epoch: the incomplete last global batch of an epoch is dropped."""
    if num_items < total_batch:
        fail(f'{source} has {num_items} {unit}, fewer than one global batch of '
             f'TOTAL_BATCH={total_batch}')
    return num_items // total_batch

def check_pretrained(pretrained):
    """A TEACHER_PRETRAINED that names a weights file must be one."""
    if pretrained and pretrained.endswith(('.bin', '.pt', '.pth', '.safetensors')) and \
            not os.path.isfile(pretrained):
        fail(f"teacher weights file {pretrained!r} not found. Pass an existing file, or the "
             "open_clip tag 'openai' (downloaded once into the Hugging Face cache; needs the "
             "network the first time).")

if __name__ == '__main__':  # a module, not a script: say what it holds
    print(__doc__.strip())
