"""
Video data for UMT: frame-accurate sparse decoding with PyAV, the official sampling and augmentation
rules, the list and annotation files, and datasets that survive broken files (the data order is in
training.py).

As the official code (single_modality/datasets/, multi_modality/dataset/): stage-1 pre-training
takes 8 TSN-sparse frames, a multi-scale corner crop and a flip; stage 2 takes 4 frames,
RandomResizedCrop(scale 0.5-1, bicubic) and a flip; action-recognition fine-tuning adds RandAugment,
random erasing, mixup / cutmix and repeated augmentation, and is tested on C clips x 3 crops. A clip
is uint8 [3, T, S, S] (T frames, S pixels) until `normalize` on the device. The synthetic demo set
is in demo.py. This file is a module, not a script; its former commands are tools:
    python -m tools.check_data FILE --root DIR             decode every entry of FILE (list or JSON)
    python -m tools.prepare_data LIST --root DIR --out OUT  re-encode videos: fast sparse sampling
    python -m tools.bench --loader_dir=DIR                 the loader's clips/s per core
"""

import bisect
import json
import math
import os
import re
import warnings
from collections import namedtuple

import av
import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode, functional as TF  # comes with open_clip


MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1, 1)  # ImageNet's (official), not CLIP's
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1, 1)
MS_SCALES = (1, .875, .75, .66)  # stage-1 multi-scale crop: side = short side x scale (official)
MS_MAX_DISTORT = 1               # the w and h scale indices may differ by at most this (official)
RRC_SCALE = (0.5, 1.0)           # official stage-2 RandomResizedCrop area fraction; aspect 3/4..4/3
IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')  # still images are 1-frame videos
MIN_ATTEMPTS = 20                # judge the bad fraction only after this many loads in a process
BAD_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError, IndexError,  # raised by a broken file
              Image.DecompressionBombError)

# ----------------------------------------------------------------------------------------------
# Decoding

def _video_stream(c, threads):
    if not c.streams.video:
        raise ValueError('no video stream')
    s = c.streams.video[0]
    s.thread_type = 'AUTO' if threads > 1 else 'SLICE'  # must be set before the first decode
    s.codec_context.thread_count = threads  # keep small in DataLoader workers (workers x threads)
    return s

def _scan(c, s):
    """One demux-only pass (no decoding): sorted pts of every frame (the i-th smallest pts is frame
    i, so indices come from timestamps, and B-frames, VFR and non-zero start times need no special
    case) and, per keyframe, (pts, decode time): some demuxers (avi) seek by decode time, which is
    earlier than pts with B-frames."""
    pts, keys = [], []
    for p in c.demux(s):
        t = p.pts if p.pts is not None else p.dts
        if p.size == 0 or t is None or p.is_discard:  # flush packet or edit-list discard: not shown
            continue
        pts.append(t)
        if p.is_keyframe:
            keys.append((t, t if p.dts is None else min(t, p.dts)))
    if not pts:
        raise ValueError('no video packets')
    return sorted(pts), sorted(keys) or [(min(pts), min(pts))]

def read_frames(path, indices, threads=1, max_seconds=None):
    """Frames `indices` of a video as uint8 [len(indices), H, W, 3], pixel-identical to sequential
    decoding. `indices` may be unsorted, repeated, or past the end (-> last frame); it may also be a
    function n_frames -> indices, so a caller can sample once the true length is known without
    opening the file twice.
    max_seconds: only the first int(max_seconds x fps) frames count (the official DiDeMo reading of
    30 s)."""
    if path.lower().endswith(IMAGE_EXTS):  # a still image is a 1-frame video
        with Image.open(path) as im:
            img = np.asarray(im.convert('RGB'))
        idx = np.asarray(indices(1) if callable(indices) else indices)
        return np.repeat(img[None], len(idx), axis=0)
    with av.open(path) as c:  # `with`: containers leak in DataLoader workers otherwise
        s = _video_stream(c, threads)
        pts, keys = _scan(c, s)
        # as decord: int(seconds x mean frame rate) frames (30 s at 29.97 fps: 899)
        if max_seconds is not None and len(pts) > 1:
            fps = (float(s.average_rate) if s.average_rate
                   else (len(pts) - 1) / float((pts[-1] - pts[0]) * s.time_base))
            pts = pts[:max(1, int(max_seconds * fps))]
        idx = np.asarray(indices(len(pts)) if callable(indices) else indices, dtype=np.int64)
        if idx.size == 0 or idx.min() < 0:
            raise ValueError(f'bad frame indices {idx}')
        idx = np.minimum(idx, len(pts) - 1)  # past the end: repeat the last frame
        key_pts = [k for k, _ in keys]
        wanted = {pts[i] for i in idx}

        def decode_from(position):  # seek, then feed the packets ourselves to skip unwanted frames
            c.seek(position, stream=s, backward=True)  # lands on a keyframe at or before `position`
            for p in c.demux(s):
                # Skip decoding frames nobody asked for that no frame references (most B-frames).
                s.codec_context.skip_frame = 'DEFAULT' if p.pts in wanted else 'NONREF'
                for f in s.decode(p):
                    if f.pts is None:
                        raise ValueError('decoded a frame without a timestamp')
                    yield f

        out, it, frame = {}, None, None      # frame: the last decoded one (may be past a target)
        for i in np.unique(idx):             # sorted unique targets; decode forward only
            tgt = pts[i]
            j = max(bisect.bisect_right(key_pts, tgt) - 1, 0)  # nearest keyframe at or before tgt
            # Seek only if a keyframe lies between here and the target; else decoding on is cheaper.
            if it is None or frame.pts < key_pts[j]:
                # where to seek: the keyframe's pts; if that overshoots (avi seeks by decode time),
                # its decode time; if that overshoots too, the first keyframe (= sequential
                # decoding, always right)
                tries = [key_pts[j], keys[j][1], keys[0][1]]
                it, frame = decode_from(tries.pop(0)), None
            while frame is None or frame.pts < tgt:
                nxt = next(it, None)
                if nxt is None:  # end of stream: keep the last frame
                    break
                if frame is None and nxt.pts > tgt and tries:  # overshot: try the next position
                    it = decode_from(tries.pop(0))
                    continue
                frame = nxt
            if frame is None:
                raise ValueError('no frame could be decoded')
            out[i] = frame.to_ndarray(format='rgb24')  # convert only the frames we keep
        return np.stack([out[i] for i in idx])         # index back: order and repeats as asked

def rgb_to_yuv420(frame):
    """uint8 [H, W, 3] (H, W even) -> uint8 [3H/2, W], PyAV's yuv420p layout (Y, then U, then V):
    BT.601 limited range in integers, chroma from the mean of each 2 x 2 block. The same bytes on
    every machine and in every process, unlike a library conversion, whose SIMD paths and threads
    may round differently."""
    H, W, _ = frame.shape
    r, g, b = frame.astype(np.int32).transpose(2, 0, 1)  # [H, W] each
    y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16
    r, g, b = (x[0::2, 0::2] + x[0::2, 1::2] + x[1::2, 0::2] + x[1::2, 1::2]
               for x in (r, g, b))                       # [H/2, W/2] each, sums of 4 px
    u = ((-38 * r - 74 * g + 112 * b + 512) >> 10) + 128
    v = ((112 * r - 94 * g - 18 * b + 512) >> 10) + 128
    return (np.concatenate([y.ravel(), u.ravel(), v.ravel()]).clip(0, 255).astype(np.uint8)
            .reshape(-1, W))                             # [3H/2, W]

def write_video(path, frames, fps=25, codec='libx264', pix_fmt='yuv420p', options=None,
                exact=False):
    """Encode uint8 [H,W,3] frames. Reproducible bytes: the frames are made first, yuv420p (even
    sides) is converted here (rgb_to_yuv420), and the encoder runs one thread. exact=True (the demo
    sets) runs x264 without its assembly, whose paths differ between CPUs (AVX-512 machines make
    other encoding decisions from the same frames): the same bytes on every x86-64 CPU, half as
    fast."""
    frames = list(frames)
    own_yuv = pix_fmt == 'yuv420p' and frames[0].shape[0] % 2 == 0 and frames[0].shape[1] % 2 == 0
    options = {'threads': '1', **(options or {}), **({'x264-params': 'asm=0'} if exact else {})}
    with av.open(path, 'w') as c:
        s = c.add_stream(codec, rate=fps, options=options, height=frames[0].shape[0],
                         width=frames[0].shape[1], pix_fmt=pix_fmt)
        for a in frames:
            f = av.VideoFrame.from_ndarray(rgb_to_yuv420(a) if own_yuv else a,
                                           'yuv420p' if own_yuv else 'rgb24')
            c.mux(s.encode(f))
        c.mux(s.encode())  # flush delayed (B-)frames

# ----------------------------------------------------------------------------------------------
# Frame sampling (the official rules)

def sample_indices(n, num_frames, mode, rng=None, clip=0, num_clips=1):
    """Frame indices [num_frames] of a video of n frames, by the official samplers; short videos
    repeat frames.
    tsn: stage 1, SSv2 fine-tuning (single_modality/datasets/mae.py, ssv2.py): a random frame in
        each of T segments of n // T frames; n < T: sorted random frames (the official code repeats
        frame 0; ours still moves).
    sparse: Kinetics fine-tuning (datasets/kinetics_sparse.py): seg = (n-1)/T, frame i in
        [round(seg i), round(seg (i+1))].
    test: Kinetics test clip `clip` of C = num_clips (kinetics_sparse.py): frame i at
        round(seg i) + int(seg / (C+1) (clip+1)).
    ssv2: SSv2 test clip `clip` of C (datasets/ssv2.py): int(tick i + tick clip / C), tick = n/T
        (C = 2: the official segment starts and middles).
    rand: stage-2 training (multi_modality/dataset/video_utils.py): k = min(T, n) segments [s, e)
        cut at linspace(0, n, k+1), a random frame of each but its last (an official quirk kept),
        or k sorted distinct random frames if a segment is too short; padded with the last index
        up to T.
    middle: stage-2 evaluation: frame (s + e - 1) // 2 of each segment, padded the same way."""
    i = np.arange(num_frames)
    if mode == 'tsn':
        avg = n // num_frames
        if avg > 0:
            return i * avg + rng.integers(avg, size=num_frames)
        return np.sort(rng.integers(n, size=num_frames))
    if mode in ('sparse', 'test'):
        seg = (n - 1) / num_frames
        if mode == 'sparse':
            low, high = np.round(seg * i).astype(int), np.round(seg * (i + 1)).astype(int)
            return np.minimum(rng.integers(low, high + 1), n - 1)
        return np.minimum(np.round(seg * i).astype(int) + int(seg / (num_clips + 1) * (clip + 1)),
                          n - 1)
    if mode == 'ssv2':
        tick = n / num_frames
        return np.minimum((tick * i + tick * clip / num_clips).astype(int), n - 1)
    if mode in ('rand', 'middle'):
        k = min(num_frames, n)
        edges = np.linspace(0, n, k + 1).astype(int)
        if mode == 'middle':
            idx = (edges[:-1] + edges[1:] - 1) // 2
        elif np.all(edges[1:] - 1 > edges[:-1]):
            idx = rng.integers(edges[:-1], edges[1:] - 1)
        else:
            idx = np.sort(rng.permutation(n)[:k])
        return np.concatenate([idx, np.full(num_frames - k, idx[-1])])
    raise ValueError(f'unknown sampling mode {mode!r}')

# ----------------------------------------------------------------------------------------------
# Augmentation: a crop box (top, left, height, width) in source pixels, shared by a clip's frames

def multiscale_box(h, w, size, rng):
    """Official stage-1 GroupMultiScaleCrop: side = short side x one of MS_SCALES per axis (scale
    indices differ <= 1), sides within 3 px of `size` snap to it, offset = one of 13 fixed positions
    on a 5x5 grid."""
    sides = [int(min(h, w) * s) for s in MS_SCALES]
    sides = [size if abs(x - size) < 3 else x for x in sides]
    pairs = [(a, b) for i, a in enumerate(sides) for j, b in enumerate(sides)
             if abs(i - j) <= MS_MAX_DISTORT]
    ch, cw = pairs[rng.integers(len(pairs))]
    ch, cw = min(ch, h), min(cw, w)
    # corners, center, 4 edge centers, 4 quarter points (in quarters of the free space on each axis)
    grid = [(0, 0), (0, 4), (4, 0), (4, 4), (2, 2), (2, 0), (2, 4), (4, 2), (0, 2),
            (1, 1), (1, 3), (3, 1), (3, 3)]
    gy, gx = grid[rng.integers(len(grid))]
    return gy * ((h - ch) // 4), gx * ((w - cw) // 4), ch, cw

def rrc_box(h, w, rng, scale=RRC_SCALE):
    """RandomResizedCrop: area fraction in `scale`, log-uniform aspect in [3/4, 4/3], 10 tries."""
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1)), ch, cw
    s = min(h, w)  # fallback: the central square
    return (h - s) // 2, (w - s) // 2, s, s

def eval_boxes(h, w, num_crops=1):
    """Resize short side to S then crop S x S == crop the short-side square: center (1) or
    start/center/end of the long side (3), as the official multi-view test."""
    assert num_crops in (1, 3), 'num_crops must be 1 or 3'
    s, long_free = min(h, w), max(h, w) - min(h, w)
    offsets = [long_free // 2] if num_crops == 1 else [0, long_free // 2, long_free]
    return [(o, 0, s, s) if h > w else (0, o, s, s) for o in offsets]

def augment(frames, size, kind, rng=None, flip=False, num_crops=1, scale=RRC_SCALE,
            interp='bicubic'):
    """uint8 [T,H,W,3] -> list of uint8 [3,T,S,S], one per crop; `normalize` makes them model inputs
    on the device (a uint8 clip is 4x less to copy than floats, and the CPU does no float work).
    kind: 'multiscale' (stage 1), 'rrc' (stage 2 bicubic; fine-tuning: `scale` 0.08-1, interp
    'bilinear', as the official code), 'center' (eval: short side -> S, 1 or 3 crops), 'squash'
    (stage-2 eval: whole frame -> SxS). One box and one flip decision per clip, so motion stays
    consistent across frames."""
    T, H, W, _ = frames.shape
    if kind == 'multiscale':
        boxes, mode = [multiscale_box(H, W, size, rng)], 'bilinear'
    elif kind == 'rrc':
        boxes, mode = [rrc_box(H, W, rng, scale)], interp
    elif kind == 'center':
        boxes, mode = eval_boxes(H, W, num_crops), 'bilinear'
    elif kind == 'squash':
        boxes, mode = [(0, 0, H, W)], 'bicubic'  # aspect not kept, as the official stage-2 eval
    else:
        raise ValueError(f'unknown augmentation {kind!r}')
    flipped = flip and rng.random() < 0.5
    views = []
    for y, x, ch, cw in boxes:
        clip = (torch.from_numpy(np.ascontiguousarray(frames[:, y:y + ch, x:x + cw]))
                .permute(0, 3, 1, 2))  # [T, 3, ch, cw]
        if (ch, cw) != (size, size):  # uint8 in and out (rounded, clamped): torch's fast uint8 path
            clip = TF.resize(clip, [size, size], getattr(InterpolationMode, mode.upper()),
                             antialias=True)
        views.append((clip.flip(-1) if flipped else clip)
                     .permute(1, 0, 2, 3).contiguous())  # [3, T, S, S]
    return views

def normalize(video):
    """uint8 [..., 3, T, S, S] on the device -> float, ImageNet mean / std: the model input."""
    return (video.float() / 255 - MEAN.to(video.device)) / STD.to(video.device)

# ----------------------------------------------------------------------------------------------
# Datasets. A key is an index or (index, seed); every random choice of an item comes from
# default_rng(seed), so the data is the same whatever the number of workers, and a resumed run sees
# exactly what it would have seen.

class RobustDataset(torch.utils.data.Dataset):
    """Shared machinery: per-item RNG and skip-and-replace of bad files with a loud failure
    threshold. Subclasses pass the file of every item and define load(i, rng) -> dict."""
    def __init__(self, paths, max_bad_fraction):
        self.paths, self.max_bad_fraction = paths, max_bad_fraction
        self.attempts, self.num_bad, self.bad_files = 0, 0, {}  # per process (each worker its own)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, key)
        rng = np.random.default_rng(seed)
        for skipped in range(100):
            self.attempts += 1
            try:  # 'index' is the item actually returned (a replacement if the asked one was bad)
                return dict(self.load(index, rng), index=index, skipped=skipped)
            except BAD_ERRORS as e:
                self._bad(self.paths[index], f'{type(e).__name__}: {e}')
                index = int(rng.integers(len(self)))  # replacement drawn with the item's own rng
        raise RuntimeError('100 bad samples in a row')

    def _bad(self, path, reason):
        self.num_bad += 1
        if path not in self.bad_files:
            self.bad_files[path] = reason
            warnings.warn(f'bad sample {path} ({reason}): replaced by a random sample')
        if self.attempts >= MIN_ATTEMPTS and self.num_bad > self.max_bad_fraction * self.attempts:
            examples = '\n'.join(f'  {p}: {r}' for p, r in list(self.bad_files.items())[:5])
            raise RuntimeError(f'{self.num_bad} of {self.attempts} samples were bad (more than '
                               f'max_bad_fraction={self.max_bad_fraction}); the dataset looks '
                               f'broken. Examples:\n{examples}\n'
                               'Run `python -m tools.check_data FILE` to list every bad entry.')

def join_root(root, p):
    return os.path.join(root, p) if root and not os.path.isabs(p) else p

def read_text(path, what):
    """The text of a file the user named (`what` says which setting or argument), or a BadInput
    that says why not."""
    if not os.path.isfile(path):
        raise ValueError(f'{what} {path!r} '
                         + ('is a folder' if os.path.isdir(path) else 'not found')
                         + ': pass a file')
    try:
        text = open(path, encoding='utf-8').read()
    except UnicodeDecodeError as e:
        raise ValueError(f'{what} {path!r} is not UTF-8 text ({e.reason} at byte {e.start})')
    if not text.strip():
        raise ValueError(f'{what} {path!r} is empty')
    return text

def parse_list_line(line):
    """'path,label' (or 'path label', 'path<TAB>label') -> (path, label >= 0); ValueError says
    what is wrong."""
    parts = line.rsplit(',', 1) if ',' in line else line.rsplit(None, 1)
    if len(parts) != 2 or not parts[0].strip():
        raise ValueError('no label column (`path,label`)')
    if not parts[1].strip().isdigit():
        raise ValueError(f'label {parts[1].strip()!r} is not a class number 0, 1, ...')
    return parts[0].strip(), int(parts[1])

def parse_entries(file, records, parse, max_bad_fraction=None):
    """[(where, record)] -> [parse(record)]. A record that parse rejects (ValueError) stops the
    command when the file is an evaluation file (max_bad_fraction None: a skipped entry would change
    the metric); a training file skips it as a bad video is skipped, warns, and stops only when more
    than max_bad_fraction of its entries are bad."""
    out, bad = [], []
    for where, record in records:
        try:
            out.append(parse(record))
        except ValueError as e:
            text = json.dumps(record) if isinstance(record, dict) else record.strip()
            bad.append(f'{file} {where}: {e}: {text[:80]}')
    tool = (f'`python -m tools.check_data {file}` lists every bad entry and writes {file}.clean '
            'without them')
    if bad and (max_bad_fraction is None or len(bad) > max_bad_fraction * len(records)):
        limit = ('' if max_bad_fraction is None
                 else f' (more than MAX_BAD_FRACTION={max_bad_fraction})')
        raise ValueError(f'{len(bad)} of {len(records)} entries of {file} are bad{limit}, '
                         f'e.g. {bad[0]}. {tool}.')
    if bad:
        warnings.warn(f'skipped {len(bad)} of {len(records)} entries of {file}, e.g. {bad[0]}; '
                      f'{tool}')
    return out

def read_list(list_file, root=None, what='list', max_bad_fraction=None):
    """Classification list: `path label` per line, separated by a comma, spaces or a tab ->
    [(path, label)]. A line that does not parse is handled by parse_entries (named; skipped in a
    training list)."""
    lines = [(f'line {n}', line)
             for n, line in enumerate(read_text(list_file, what).splitlines(), 1)
             if line.strip() and not line.lstrip().startswith('#')]
    out = [(join_root(root, path), label) for path, label in
           parse_entries(list_file, lines, lambda line: parse_list_line(line.strip()),
                         max_bad_fraction)]
    if not out:
        raise ValueError(f'{list_file} lists no video (one `path,label` per line)')
    return out

Annotation = namedtuple('Annotation', 'path captions is_image')

def load_json(path, what='annotation file'):
    """A JSON list of objects, or JSONL (one object per line) -> list of dicts; bad input names the
    file and line."""
    text = read_text(path, what)
    try:
        objs = json.loads(text)
    except json.JSONDecodeError as first:
        try:  # JSONL: one object per line
            objs = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise ValueError(f'{path} is not JSON (line {first.lineno}: {first.msg}) nor JSONL '
                             '(one object per line)')
    objs = [objs] if isinstance(objs, dict) else objs
    if not isinstance(objs, list) or not all(isinstance(o, dict) for o in objs):
        raise ValueError(f'{path} must hold a list of objects {{...}}, got {type(objs).__name__}')
    if not objs:
        raise ValueError(f'{path} holds no entry')
    return objs

def pre_text(text):
    """Caption cleaning as the official pre_text (multi_modality/dataset/utils.py), for captions,
    questions and answer options (not QA answers): lower case; , . ' ! ? " ( ) * # : ; ~ deleted;
    - and / become spaces; <person> becomes person; runs of spaces collapse."""
    text = re.sub(r'[,.\'!?"()*#:;~]', '', text.lower()).replace('-', ' ').replace('/', ' ')
    return re.sub(r'\s+', ' ', text.replace('<person>', 'person')).strip()

def parse_annotation(o, root=None):
    """One entry {"video" or "image": path, "caption": str or [str]} -> Annotation; ValueError says
    what is wrong. Blank sentences inside a caption list are dropped (paragraph lists written by
    people have some; the official paragraph, joined and cleaned, is the same without them): an
    entry is bad only when no caption is left."""
    key = 'image' if 'image' in o else 'video'
    if not isinstance(o.get(key), str) or not o[key]:
        raise ValueError('no "video" or "image" path')
    caps = o.get('caption')
    caps = ([c for c in caps if not isinstance(c, str) or c.strip()] if isinstance(caps, list)
            else [caps])
    if not caps or not all(isinstance(c, str) and c.strip() for c in caps):
        raise ValueError('"caption" must be a non-empty text or a list of them')
    return Annotation(join_root(root, o[key]), [pre_text(c) for c in caps], key == 'image')

def read_annotations(ann_file, root=None, media=None, max_bad_fraction=None):
    """Official JSON list (or JSONL) of {"video" or "image": path, "caption": str or [str]} ->
    [Annotation], captions cleaned by pre_text; media='video' / 'image' keeps one kind. A bad entry
    is handled by parse_entries (named; skipped in a training file, max_bad_fraction set)."""
    entries = [(f'entry #{i}', o) for i, o in enumerate(load_json(ann_file))]
    return [a for a in parse_entries(ann_file, entries, lambda o: parse_annotation(o, root),
                                     max_bad_fraction)
            if media is None or media == ('image' if a.is_image else 'video')]

class VideoClassification(RobustDataset):
    """Kinetics-style classification. train: TSN frames + aug ('multiscale' stage 1, 'rrc') + flip;
    val: 1 clip, center crop; test: num_clips x num_crops views -> video [V,3,T,S,S] when V > 1.
    sampler: 'kinetics' or 'ssv2', the official test rule of each dataset (sample_indices)."""
    def __init__(self, list_file, root=None, num_frames=8, size=224, mode='train',
                 aug='multiscale', flip=True, num_clips=1, num_crops=1, max_bad_fraction=0.05,
                 threads=1, sampler='kinetics'):
        assert (mode in ('train', 'val', 'test') and aug in ('multiscale', 'rrc')
                and sampler in ('kinetics', 'ssv2'))
        self.samples = read_list(list_file, root,
                                 max_bad_fraction=max_bad_fraction if mode == 'train' else None)
        self.num_classes = max(label for _, label in self.samples) + 1
        self.num_frames, self.size, self.mode, self.aug, self.flip = \
            num_frames, size, mode, aug, flip
        self.num_clips, self.num_crops = (num_clips, num_crops) if mode == 'test' else (1, 1)
        self.threads, self.sampler = threads, sampler
        super().__init__([p for p, _ in self.samples], max_bad_fraction)

    def load(self, i, rng):
        path, label = self.samples[i]
        T, C = self.num_frames, self.num_clips
        if self.mode == 'train':
            frames = read_frames(path, lambda n: sample_indices(n, T, 'tsn', rng), self.threads)
            return {'video': augment(frames, self.size, self.aug, rng, self.flip)[0],
                    'label': label}
        # val / test: all clips decoded in one pass, then C clips x crops views. The official SSv2
        # validation (ssv2.py) takes the segment middles: its test clip 2 of 2
        rule = 'test' if self.sampler == 'kinetics' else 'ssv2'
        clips = [(1, 2)] if rule == 'ssv2' and self.mode == 'val' else [(c, C) for c in range(C)]
        frames = read_frames(path, lambda n: np.concatenate(
            [sample_indices(n, T, rule, clip=c, num_clips=k) for c, k in clips]), self.threads)
        views = [v for c in range(C) for v in augment(frames[c * T:(c + 1) * T], self.size,
                                                      'center', num_crops=self.num_crops)]
        return {'video': torch.stack(views) if len(views) > 1 else views[0], 'label': label}

class VideoText(RobustDataset):
    """Video/image-caption pairs (stage 2). train: 'rand' frames, RRC + flip, one random caption;
    eval: middle frames, squash resize, first caption. `.items` keeps every caption for retrieval
    evaluation; paragraph=True joins a video's captions into one (paragraph retrieval); max_seconds:
    read only the start of each video. Images give [3,1,S,S]; keep images and videos in separate
    loaders (media=...), as the official MetaLoader."""
    def __init__(self, ann_file, root=None, num_frames=4, size=224, mode='train', media=None,
                 max_bad_fraction=0.05, threads=1, paragraph=False, max_seconds=None):
        assert mode in ('train', 'eval') and media in (None, 'video', 'image')
        self.items = read_annotations(ann_file, root, media,
                                      max_bad_fraction if mode == 'train' else None)
        if paragraph:
            self.items = [a._replace(captions=[' '.join(a.captions)]) for a in self.items]
        self.num_frames, self.size, self.mode, self.threads = num_frames, size, mode, threads
        self.max_seconds = max_seconds
        super().__init__([a.path for a in self.items], max_bad_fraction)

    def load(self, i, rng):
        item = self.items[i]
        T = 1 if item.is_image else self.num_frames
        if self.mode == 'train':
            frames = read_frames(item.path, lambda n: sample_indices(n, T, 'rand', rng),
                                 self.threads, self.max_seconds)
            caption = item.captions[rng.integers(len(item.captions))]
            return {'video': augment(frames, self.size, 'rrc', rng, flip=True)[0],
                    'caption': caption}
        frames = read_frames(item.path, lambda n: sample_indices(n, T, 'middle'), self.threads,
                             self.max_seconds)
        return {'video': augment(frames, self.size, 'squash')[0], 'caption': item.captions[0]}

if __name__ == '__main__':  # `python data.py` (or --help): what it holds, the tools replacing it
    print(__doc__.strip())
