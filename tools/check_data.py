"""
Check a dataset before a run: decode every video (or image) of a classification list or a caption
annotation file, and check every entry's format, so that bad files are found in minutes and not in
the middle of a multi-day run.

    python -m tools.check_data train.csv --root videos/          # -> train.csv.clean, train.csv.bad
    # the same for {"video" | "image", "caption"} entries
    python -m tools.check_data captions.json --root videos/

FILE.clean is FILE without its bad entries (same format: the training scripts take it as it is);
FILE.bad lists each bad entry with the reason (missing, empty, truncated, corrupt, not a video, no
caption, no label, ...).
"""

import argparse
import json
import os

import av
from tqdm import tqdm

import data
from util import configurator

def check_file(path):
    """None if every frame of `path` decodes, else the reason."""
    try:
        if path.lower().endswith(data.IMAGE_EXTS):
            data.read_frames(path, [0])  # decodes the whole image
            return None
        with av.open(path) as c:
            if not c.streams.video:
                return 'no video stream'
            s = c.streams.video[0]
            # s.frames: the header's count, 0 if unknown
            n, expected = sum(1 for _ in c.decode(s)), s.frames
        return f'only {n} of {expected} frames decodable' if n == 0 or n < expected else None
    except data.BAD_ERRORS as e:
        return f'{type(e).__name__}: {e}'

def entries(file, root):
    """-> (is_json, records: lines or dicts, their media paths or None, the format problem of each
    or None)."""
    with configurator.user_input():  # a FILE that cannot be read
        text = data.read_text(file, 'FILE')
        is_json = text.lstrip()[:1] in '[{'
        records = data.load_json(file) if is_json else None
    if is_json:
        path_of = lambda o: data.parse_annotation(o, root).path  # noqa: E731
    else:
        records = [line + '\n' for line in text.splitlines()
                   if line.strip() and not line.lstrip().startswith('#')]
        path_of = lambda line: data.join_root(root, data.parse_list_line(line.strip())[0])
    paths, problems = [], []
    for r in records:
        try:
            paths.append(path_of(r))
            problems.append(None)
        except ValueError as e:
            paths.append(None)
            problems.append(str(e))
    return is_json, records, paths, problems

def check(file, root=None, overwrite=False):
    """Decode every entry of a list or annotation file; write FILE.clean (same format) and FILE.bad
    (reasons)."""
    outputs = (f'{file}.clean', f'{file}.bad')
    if not overwrite and any(os.path.exists(p) for p in outputs):
        existing = ' or '.join(p for p in outputs if os.path.exists(p))
        configurator.fail(f'{existing} exists: move it away, or pass --overwrite to replace the '
                          'results of an earlier check')
    is_json, records, paths, problems = entries(file, root)
    reasons = [why or check_file(p)
               for p, why in zip(tqdm(paths, desc=f'checking {file}'), problems)]
    good = [r for r, why in zip(records, reasons) if why is None]
    with open(outputs[0], 'w') as f:
        json.dump(good, f, indent=1) if is_json else f.writelines(good)
    with open(outputs[1], 'w') as f:
        f.writelines(f'{p or (json.dumps(r)[:80] if is_json else r.strip())}\t{why}\n'
                     for p, r, why in zip(paths, records, reasons) if why is not None)
    print(f'{len(good)} good, {len(records) - len(good)} bad -> wrote {outputs[0]}, {outputs[1]}')
    return len(good), len(records) - len(good)

def main(argv=None):
    configurator.short_errors()
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('file', metavar='FILE',
                    help='classification list (path,label) or caption annotation (JSON)')
    ap.add_argument('--root', default=None, help='folder that relative paths in FILE start from')
    ap.add_argument('--overwrite', action='store_true',
                    help='replace FILE.clean and FILE.bad of an earlier check')
    args = ap.parse_args(argv)
    return check(args.file, args.root, args.overwrite)

if __name__ == '__main__':
    main()
