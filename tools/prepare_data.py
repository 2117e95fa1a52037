"""
Prepare a dataset for fast sparse sampling: re-encode every video of a list or annotation file
once, so that a sampled frame costs a few decoded frames instead of everything since the last
keyframe (the README has the measurements).

    python -m tools.prepare_data train.csv --root videos/ --out videos_prepared/ --workers 16
    python train_stage1.py --data_list=videos_prepared/train.csv --data_root=videos_prepared/

Writes only under --out: the videos (same relative paths, .mp4; an absolute path keeps its folders
under --out) and the new list (--out/<the list's name>). A second run skips finished videos; videos
that cannot be read are reported and left out of the new list, never fatal; images are kept where
they are. --out must be new, empty, or an earlier output of this tool (it keeps a prepare_data.json
there).
"""

import argparse
import json
import multiprocessing
import os
from fractions import Fraction

import av
from tqdm import tqdm

import data
from util import configurator
from tools.check_data import entries

SHORT_SIDE = 256  # short side of prepared videos (no upscaling): every crop of the recipe is a
                  # fraction of the short side resized to 224 (multi-scale 1 - 0.66, RRC, test
                  # crops), as on Kinetics' 256-px files
KEYINT = 8        # a keyframe every 8 frames and no B-frames: a sampled frame costs at most 8
                  # decoded frames
CRF = 26          # x264 quality (its default is 23)
MARKER = 'prepare_data.json'  # in --out: this tool's folder, which a second run may continue

def prepare_video(src, dst, short_side=SHORT_SIDE, keyint=KEYINT, crf=CRF):
    """Re-encode one video for cheap sparse sampling: H.264 with a keyframe every `keyint` frames
    and no B-frames (read_frames then decodes at most keyint frames per sampled frame), x264's
    fastdecode tuning (CAVLC, no deblocking), short side at most `short_side`, no audio. Every frame
    is kept, in order and at the source's mean frame rate, so a sample gets the same frame indices
    as from the original. Written atomically."""
    tmp = f'{dst}.tmp.mp4'
    with av.open(src) as c:
        if not c.streams.video:
            raise ValueError('no video stream')
        s = c.streams.video[0]
        rate = s.average_rate or Fraction(25)
        with av.open(tmp, 'w') as out:
            o = None
            for i, f in enumerate(c.decode(s)):
                if o is None:
                    k = min(1.0, short_side / min(f.width, f.height))
                    # yuv420p: even sides
                    w, h = 2 * round(f.width * k / 2), 2 * round(f.height * k / 2)
                    x264 = f'keyint={keyint}:min-keyint={keyint}:scenecut=0:bframes=0'
                    o = out.add_stream('libx264', rate=rate, width=w, height=h, pix_fmt='yuv420p',
                                       options={'preset': 'veryfast', 'tune': 'fastdecode',
                                                'crf': str(crf), 'threads': '1',
                                                'x264-params': x264})
                g = f.reformat(width=w, height=h, format='yuv420p', interpolation='AREA')
                g.pts, g.time_base = i, 1 / Fraction(rate)  # frame i at i / rate
                out.mux(o.encode(g))
            if o is None:
                raise ValueError('no frame could be decoded')
            out.mux(o.encode())
    os.replace(tmp, dst)

def _prepare_one(job):
    src, dst, options = job
    if not os.path.exists(dst):  # else done by an earlier run (files appear only when complete)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            prepare_video(src, dst, **options)
        except data.BAD_ERRORS as e:
            return src, f'{type(e).__name__}: {e}'
    return src, None

def target(rel):
    """A list's path -> where its prepared video goes, relative to --out (an absolute path keeps its
    folders)."""
    rel = os.path.normpath(os.path.splitext(rel)[0] + '.mp4').lstrip(os.sep)
    return None if rel.split(os.sep)[0] == '..' else rel

def prepare(file, root, out_dir, workers=os.cpu_count(), **options):
    """Re-encode every video of a list or annotation file into out_dir in parallel processes, and
    write out_dir/<file name>, the same list for the new files. -> (new list, {path: reason} of the
    videos that failed)."""
    new_file = os.path.join(out_dir, os.path.basename(file))
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) and \
            not os.path.exists(os.path.join(out_dir, MARKER)):
        configurator.fail(f'--out {out_dir!r} holds files that this tool did not write: pass a '
                          'new or empty folder')
    if os.path.realpath(new_file) == os.path.realpath(file):
        configurator.fail(f'--out {out_dir!r} would overwrite the list {file} itself: pass another '
                          'folder')
    is_json, records, paths, problems = entries(file, root)
    if any(problems):
        n, why = next((n, p) for n, p in enumerate(problems) if p)
        configurator.fail(f'{file} entry #{n}: {why} (python -m tools.check_data lists every bad '
                          'entry)')
    rels = [o.get('image') or o.get('video') for o in records] if is_json else \
        [data.parse_list_line(r.strip())[0] for r in records]
    jobs, failed = {}, {}
    for rec, rel, src in zip(records, rels, paths):
        if is_json and 'image' in rec:
            continue
        dst = target(rel) and os.path.join(out_dir, target(rel))
        if dst is None or os.path.realpath(dst) == os.path.realpath(src):
            failed[src] = 'its path leaves --out' if dst is None else \
                'the prepared video would overwrite it'
        else:
            jobs[rel] = (src, dst, options)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, MARKER), 'w') as f:
        json.dump({'list': os.path.abspath(file), 'root': root, **options}, f)
    with multiprocessing.Pool(workers) as pool:
        done = tqdm(pool.imap_unordered(_prepare_one, jobs.values()), total=len(jobs),
                    desc=f'preparing {file}')
        failed.update(r for r in done if r[1] is not None)
    kept = []
    for rec, rel, src in zip(records, rels, paths):
        if is_json and 'image' in rec:  # an image: its original file, absolute
            kept.append({**rec, 'image': os.path.abspath(src)})
        elif src not in failed:
            kept.append({**rec, 'video': target(rel)} if is_json else
                        rec.replace(rel, target(rel), 1))
    with open(new_file, 'w') as f:
        json.dump(kept, f, indent=1) if is_json else f.writelines(kept)
    for path, reason in failed.items():
        print(f'could not prepare {path}: {reason}')
    prepared = sum(src not in failed for src, _, _ in jobs.values())
    print(f'{prepared} videos prepared in {out_dir}, {len(failed)} left out -> wrote {new_file}')
    return new_file, failed

def main(argv=None):
    configurator.short_errors()
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('file', metavar='FILE',
                    help='classification list (path,label) or caption annotation (JSON)')
    ap.add_argument('--root', default=None, help='folder that relative paths in FILE start from')
    ap.add_argument('--out', required=True, metavar='DIR',
                    help='where the videos and the new list go')
    ap.add_argument('--workers', type=int, default=os.cpu_count(), help='parallel processes')
    args = ap.parse_args(argv)
    if args.workers < 1:
        configurator.fail(f'--workers {args.workers}: pass at least 1')
    return prepare(args.file, args.root, args.out, args.workers)

if __name__ == '__main__':
    main()
