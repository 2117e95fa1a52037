"""
The CPU demo: a tiny synthetic video world, and a tiny CLIP trained on stills of it, standing in for
OpenAI's CLIP.

    python demo.py set demo_data                           # writes the set; the demo presets do too
    python demo.py random-student out/demo_random/last.pt  # the floor: random-weight stage-1 model

Videos of a coloured square moving up or down over a background of tinted greys, with captions such
as "a red square moving up", and still images. What the demo asks about is the colour of the
*square*, while the background (nine tenths of the frame) sets the pooled features of a randomly
initialized video ViT, so a k-NN on a random student's features finds the colour rarely. The demo
CLIP learns from captions which thing they talk about; the stage-1 student learns it from the CLIP's
features alone (the README has the numbers). The demo presets of train_stage1.py and train_stage2.py
(TEACHER_PRETRAINED='demo') train the CLIP once and use it as the teacher.
"""

import argparse
import dataclasses
import json
import math
import os

import numpy as np
import open_clip
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import data
import model
import teacher
import training
from util import configurator

DEMO_COLORS = {  # the squares' colours (RGB): what the k-NN asks for
    'red': (225, 45, 40), 'green': (40, 185, 60), 'blue': (45, 95, 235), 'yellow': (235, 205, 40),
    'purple': (150, 60, 200), 'orange': (240, 140, 30)}
DEMO_DIRECTIONS = ('up', 'down')  # vertical: the horizontal flip keeps captions and labels true
DEMO_VIDEOS, DEMO_VAL = 20, 5     # videos per class (colour x direction: 12), DEMO_VAL held out
DEMO_FEW = 2                      # train videos per class in train_few.csv (few-label fine-tuning)
DEMO_TEST = 100                   # held-out videos per class (test.csv, test_color.csv): 1,200, so
                                  # an ablation's accuracy has a binomial std. error <= 1.45 points
DEMO_T, DEMO_SIZE = 16, 96        # frames (8 fps) and pixels; at the models' 64 px the 24-36 px
                                  # square is 16-24 px: 2-3 patches of 8 px, a tenth of the frame
MARKER = '.umt_demo'              # in a demo folder: make_demo wrote it and may write there again
ENCODER = {'preset': 'veryfast', 'crf': '20'}  # x264; write_video(exact=True): every CPU

def cubic_weights(n_in, n_out, a=-0.75):
    """[n_out, n_in] bicubic resampling weights, as torch's: a = -0.75, pixel centres aligned, edge
    taps clamped."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        x0, t = math.floor(src), src - math.floor(src)
        for k, d in zip(range(-1, 3), (1 + t, t, 1 - t, 2 - t)):  # tap x0 + k at distance d
            w[i, min(max(x0 + k, 0), n_in - 1)] += (((d - 5) * d + 8) * d - 4) * a if d > 1 else \
                ((a + 2) * d - (a + 3)) * d * d + 1
    return w

def background(rng):
    """[96, 96, 3] float: a 3 x 3 grid of grey levels (40-215), each tinted by up to +-60 per
    channel, smoothed (bicubic), with grain; different in every video. Its colours fill nine tenths
    of the frame and overlap the squares' in hue, so they, not the square, set the average colour of
    a frame. Elementwise products summed in a fixed order, no library resampling: the same values on
    every machine."""
    coarse = rng.uniform(40, 215, (1, 3, 3)) + rng.uniform(-60, 60, (3, 3, 3))  # [3 channels, 3, 3]
    w = cubic_weights(3, DEMO_SIZE)                                             # [96, 3]
    bg = sum(w[:, i, None, None] * w[None, :, j, None] * coarse[:, i, j]
             for i in range(3) for j in range(3))                               # [96, 96, 3]
    return np.clip(bg + rng.normal(0, 10, (DEMO_SIZE, DEMO_SIZE, 1)), 0, 255)

def demo_frames(color, direction, rng, n=DEMO_T, still=False):
    """A square crossing about half the frame height over n frames (still=True: one of them, at
    random). One frame shows its colour; only the order of the frames shows the direction."""
    bg, r = background(rng), int(rng.integers(12, 19))
    x = int(rng.integers(r + 4, DEMO_SIZE - r - 4))
    y0, y1 = (r + 4, DEMO_SIZE - r - 5)[::1 if direction == 'down' else -1]
    for t in [rng.integers(n)] if still else range(n):
        y, img = round(y0 + (y1 - y0) * t / (n - 1)), bg.copy()
        img[y - r:y + r, x - r:x + r] = DEMO_COLORS[color]
        yield img.astype(np.uint8)

def make_demo(out_dir, seed=0):
    """DIR/videos/*.mp4 with train.csv / val.csv (class = colour x direction, 12 classes),
    train_few.csv (the first DEMO_FEW training videos of each class), train_color.csv /
    val_color.csv (class = the square's colour: the k-NN / linear-probe labels),
    captions_{train,val}.json ("a red square moving up", with the attributes as fields; val keeps
    one video per caption, for retrieval), images/*.jpg with captions_images.json, and the held-out
    set videos/test_*.mp4 with test.csv / test_color.csv (DEMO_TEST per class, from a random stream
    of its own, so the files above do not depend on it). The same seed gives the same bytes on every
    x86-64 CPU (x264 without its assembly; the JPEG encoder's SIMD paths are exact). out_dir must be
    new, empty or an earlier demo set (its MARKER file)."""
    training.claim_folder(out_dir, MARKER, 'the demo')
    rng = np.random.default_rng(seed)
    os.makedirs(f'{out_dir}/videos', exist_ok=True)
    os.makedirs(f'{out_dir}/images', exist_ok=True)
    classes = [(c, d) for c in DEMO_COLORS for d in DEMO_DIRECTIONS]
    files = {f'{part}{kind}': [] for part in ('train', 'val')
             for kind in ('.csv', '_color.csv', '.json')}
    (files['train_few.csv'], files['images.json'], files['test.csv'],
     files['test_color.csv']) = [], [], [], []
    files['classes.txt'] = [f'{c} square moving {d}\n' for c, d in classes]
    bar = tqdm(total=(DEMO_VIDEOS + DEMO_TEST) * len(classes),
               desc=f'writing the demo set to {out_dir}', unit='video')
    for k in range(DEMO_VIDEOS):  # every class at each k, so any prefix of a list covers them all
        part = 'val' if k >= DEMO_VIDEOS - DEMO_VAL else 'train'
        for label, (color, direction) in enumerate(classes):
            bar.update()
            name = f'videos/{color}_{direction}_{k:02d}.mp4'
            data.write_video(f'{out_dir}/{name}', demo_frames(color, direction, rng), fps=8,
                             options=ENCODER, exact=True)
            files[f'{part}.csv'].append(f'{name},{label}\n')
            if k < DEMO_FEW:
                files['train_few.csv'].append(f'{name},{label}\n')
            files[f'{part}_color.csv'].append(f'{name},{list(DEMO_COLORS).index(color)}\n')
            caption = f'a {color} square moving {direction}'
            if part == 'train' or caption not in {c['caption'] for c in files['val.json']}:
                files[f'{part}.json'].append({'video': name, 'caption': caption, 'color': color,
                                              'shape': 'square', 'direction': direction})
    for k, color in enumerate(DEMO_COLORS):  # a fresh clip's first frame, captioned without motion
        Image.fromarray(next(demo_frames(color, 'down', rng))).save(
            f'{out_dir}/images/{k}.jpg', quality=95)
        files['images.json'].append({'image': f'images/{k}.jpg', 'caption': f'a {color} square'})
    test_rng = np.random.default_rng([seed, 1])  # the held-out videos: a stream of their own
    for k in range(DEMO_TEST):
        for label, (color, direction) in enumerate(classes):
            bar.update()
            name = f'videos/test_{color}_{direction}_{k:03d}.mp4'
            data.write_video(f'{out_dir}/{name}', demo_frames(color, direction, test_rng), fps=8,
                             options=ENCODER, exact=True)
            files['test.csv'].append(f'{name},{label}\n')
            files['test_color.csv'].append(f'{name},{list(DEMO_COLORS).index(color)}\n')
    for name, content in files.items():  # the .json lists as captions_*.json
        with open(f'{out_dir}/' + (f'captions_{name[:-5]}.json' if name.endswith('.json')
                                   else name), 'w') as f:
            json.dump(content, f, indent=1) if name.endswith('.json') else f.writelines(content)
    bar.close()

def tiny_clip(weights=None, seed=0, quick_gelu=True):
    """The demo's stand-in for OpenAI's CLIP: a 64-px open_clip.CLIP (8-px patches, 4 blocks of
    width 64, QuickGELU), with seeded random weights (a teacher is never saved in a checkpoint, so a
    resumed run must rebuild the same one), or those train_demo_clip wrote to `weights`."""
    vision = open_clip.model.CLIPVisionCfg(image_size=64, patch_size=8, width=64, layers=4,
                                           head_width=32)
    text = open_clip.model.CLIPTextCfg(context_length=32, vocab_size=49408, width=64, heads=2,
                                       layers=4)
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG stream
        torch.manual_seed(seed)
        clip = open_clip.CLIP(embed_dim=64, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu)
    if weights not in (None, 'openai'):  # 'openai': the real teacher's tag, random here
        if not os.path.isfile(weights):
            raise ValueError(f'tiny CLIP weights {weights!r} not found: demo.train_demo_clip '
                             'writes them (the demo presets do this themselves)')
        clip.load_state_dict(torch.load(weights, map_location='cpu', weights_only=True))
    return clip

def train_demo_clip(out_path, steps=200, batch=64, lr=1e-3, seed=0):
    """Trains tiny_clip() CLIP-style on stills of the demo world drawn afresh at every step (its own
    corpus, as OpenAI's CLIP had its own), each captioned with what a still shows ("a red square"),
    about a minute on two CPU cores; saves the weights to out_path. A teacher with random weights
    has nothing to teach: its CLS attention is blind to the square, so semantic masking hides it
    most of the time, and its features are about the background, like the random student's. After
    this training it looks at the square and knows its colour."""
    colors = list(DEMO_COLORS)
    text = open_clip.tokenize([f'a {c} square' for c in colors], context_length=32)   # [C, 32]
    clip, rng = tiny_clip(seed=seed).train(), np.random.default_rng(seed)
    clip.visual.output_tokens = True                 # visual(x) -> (CLS embedding, patch tokens)
    in_scale, in_shift = teacher.imagenet_to_clip()  # the teacher's input normalization
    opt = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.1)
    bar = tqdm(range(steps), desc=f'training the demo CLIP {out_path}', unit='step')
    for step in bar:
        # random stills of random colours, RRC + flip
        label = torch.from_numpy(rng.integers(len(colors), size=batch))
        stills = [next(demo_frames(colors[c], 'up', rng, still=True)) for c in label]
        images = data.normalize(torch.stack([data.augment(s[None], 64, 'rrc', rng, flip=True)[0]
                                             for s in stills]))  # [B, 3, 1, 64, 64]
        cls, tokens = clip.visual(images[:, :, 0] * in_scale + in_shift)  # [B, E], [B, n, W]
        txt = F.normalize(clip.encode_text(text), dim=-1).t() * clip.logit_scale.exp()  # [E, C]
        # The CLS embedding and the mean of the patch tokens both answer the caption: a tiny CLIP
        # trained on a few thousand stills would otherwise keep the caption in its CLS token only,
        # while the student learns from the patch tokens (web-scale CLIPs spread it over their
        # tokens, which is what UMT distills)
        loss = F.cross_entropy(F.normalize(cls, dim=-1) @ txt, label) \
            + F.cross_entropy(F.normalize(tokens.mean(1) @ clip.visual.proj, dim=-1) @ txt, label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:  # cosine decay to 0
            g['lr'] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        opt.step()
        bar.set_postfix(loss=f'{loss.item():.3f}')
    training.save_checkpoint(clip.state_dict(), out_path)  # atomic: no half-written file if killed

def random_student(path, seed=0):
    """The floor of every demo comparison: the demo student (model 'tiny' at 4 frames, as the demo
    presets) with random weights, as a stage-1 checkpoint that evaluate.py, train_stage2.py and
    tasks.finetune read like any other."""
    if os.path.exists(path):
        configurator.fail(f'{path} exists: pass a new file name '
                          '(a checkpoint is never written over)')
    torch.manual_seed(seed)
    config = model.get_config('tiny', num_frames=4)
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    training.save_checkpoint({'model': model.VideoViT(config).state_dict(),
                              'model_config': dataclasses.asdict(config)}, path)

def setup(root, data_file, make_set, teacher_pretrained, master, seed=0):
    """The demo presets' preparation, done once by rank 0 while the others wait: write the synthetic
    set into `root` if `data_file` is missing (make_set), and, for teacher_pretrained='demo', train
    the demo CLIP into root/tiny_clip.pt if it is not there, both from `seed`. Returns the teacher's
    weights: that file for 'demo', else teacher_pretrained. Stops with a message (on every rank)
    when it cannot."""
    train_teacher = teacher_pretrained == 'demo'
    if not (make_set or train_teacher):
        return teacher_pretrained
    weights, marker = f'{root}/tiny_clip.pt', f'{root}/captions_train.json'
    write_set = make_set and not os.path.exists(data_file)
    if write_set and os.path.isdir(root) and os.listdir(root) and \
            not os.path.exists(f'{root}/{MARKER}'):
        configurator.fail(f'{data_file} not found, and {root} holds files the demo did not write: '
                          'the demo writes its set only into a new or empty folder. Pass the list '
                          'of your own videos, or another folder.')
    if train_teacher and not os.path.exists(weights) and not write_set and \
            not os.path.exists(marker):
        configurator.fail(f"TEACHER_PRETRAINED='demo' is a tiny CLIP that knows only the demo's "
                          f'coloured squares, and {root} is not the demo set (no {marker}): pass a '
                          'real teacher, e.g. --teacher_pretrained=openai')
    if master and write_set:
        make_demo(root, seed)
    if master and train_teacher and not os.path.exists(weights):
        train_demo_clip(weights, seed=seed)  # stand-in for OpenAI's CLIP, from stills and captions
    if dist.is_initialized():
        dist.barrier()  # the others wait for rank 0's files
    return weights if train_teacher else teacher_pretrained

def main(argv=None):
    configurator.short_errors()
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest='command', required=True)
    make = sub.add_parser('set', help='write the synthetic demo set into a new folder')
    make.add_argument('folder')
    floor = sub.add_parser('random-student',
                           help='a stage-1 checkpoint of the demo student with random weights')
    floor.add_argument('path', help='where to write it (a new file)')
    for p in (make, floor):
        p.add_argument('--seed', type=int, default=0)
    args = ap.parse_args(argv)
    if args.command == 'set':
        make_demo(args.folder, args.seed)
        print(f'wrote the demo set (seed {args.seed}) to {args.folder}/')
    else:
        random_student(args.path, args.seed)
        print(f'wrote {args.path}: the demo student with random weights (seed {args.seed})')

if __name__ == '__main__':
    main()
