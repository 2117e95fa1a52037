"""
The CPU demo: a tiny synthetic video set, and a tiny CLIP trained on it to stand in for OpenAI's CLIP.

    python demo.py demo_data        # writes the set (a few seconds); the demo presets of the scripts do it themselves

Videos of a coloured square moving up or down (8 classes = 4 colours x 2 directions), with captions such as
"a red square moving up", and still images of the squares. The demo presets of train_stage1.py and
train_stage2.py (TEACHER_PRETRAINED='demo') train the tiny CLIP once on single frames and captions of the
training videos and use it as the teacher: a CLIP with random weights has nothing to teach.
"""

import json
import os
import sys

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

import checkpoints
import data
import teacher

DEMO_COLORS = {'red': (220, 40, 40), 'green': (40, 180, 60), 'blue': (40, 90, 230), 'yellow': (230, 200, 40)}
DEMO_DIRECTIONS = ('up', 'down')  # vertical: the training flip (horizontal) keeps the label true
DEMO_VIDEOS, DEMO_VAL = 15, 3     # videos per class, of which the last DEMO_VAL are held out for validation
DEMO_T, DEMO_H, DEMO_W = 16, 96, 128

def _demo_frames(color, direction, rng, n=DEMO_T):
    """A square crossing about half the frame height over n frames, on a gray background with fixed noise.
    One frame shows the color; only the order of the frames shows the direction."""
    yy, xx = np.mgrid[:DEMO_H, :DEMO_W]
    bg = np.clip(rng.integers(80, 160) + rng.normal(0, 10, (DEMO_H, DEMO_W, 1)), 0, 255).repeat(3, 2)
    r = int(rng.integers(18, 24))              # half size: 12-16 px after a 64-px resize (2-4 patches wide)
    x = int(rng.integers(r, DEMO_W - r))
    y0, y1 = (r + 2, DEMO_H - r - 3)[::1 if direction == 'down' else -1]
    for t in range(n):
        y = y0 + (y1 - y0) * t / (n - 1)
        inside = (np.abs(yy - y) <= r) & (np.abs(xx - x) <= r)
        img = bg.copy()
        img[inside] = DEMO_COLORS[color]
        yield img.astype(np.uint8)

def make_demo(out_dir, seed=0):
    """DIR/videos/*.mp4, train.csv, val.csv, classes.txt, captions_{train,val}.json, images/*.jpg and
    captions_images.json. The same seed gives byte-identical files."""
    rng = np.random.default_rng(seed)
    os.makedirs(f'{out_dir}/videos', exist_ok=True)
    os.makedirs(f'{out_dir}/images', exist_ok=True)
    classes = [(c, d) for c in DEMO_COLORS for d in DEMO_DIRECTIONS]
    split = {'train': ([], []), 'val': ([], [])}  # (list lines, caption objects)
    for label, (color, direction) in enumerate(classes):
        for k in range(DEMO_VIDEOS):
            name = f'videos/{color}_{direction}_{k:02d}.mp4'
            data.write_video(f'{out_dir}/{name}', _demo_frames(color, direction, rng), fps=8,
                        options={'preset': 'veryfast', 'crf': '20', 'threads': '1'})
            lines, caps = split['val' if k >= DEMO_VIDEOS - DEMO_VAL else 'train']
            lines.append(f'{name},{label}\n')
            if k < DEMO_VIDEOS - DEMO_VAL or k == DEMO_VIDEOS - DEMO_VAL:  # retrieval: one val video per caption
                caps.append({'video': name, 'caption': f'a {color} square moving {direction}'})
    for part, (lines, caps) in split.items():
        open(f'{out_dir}/{part}.csv', 'w').writelines(lines)
        json.dump(caps, open(f'{out_dir}/captions_{part}.json', 'w'), indent=1)
    open(f'{out_dir}/classes.txt', 'w').writelines(f'{c} square moving {d}\n' for c, d in classes)
    for color in DEMO_COLORS:  # stills: the first frame of a fresh clip
        Image.fromarray(next(_demo_frames(color, 'down', rng))).save(f'{out_dir}/images/{color}.jpg', quality=95)
    json.dump([{'image': f'images/{c}.jpg', 'caption': f'a {c} square'} for c in DEMO_COLORS],
              open(f'{out_dir}/captions_images.json', 'w'), indent=1)

def train_demo_clip(ann_file, root, out_path, steps=300, batch=64, lr=2e-3, seed=0):
    """Trains tiny_clip() CLIP-style on single frames of the demo's training videos and their captions
    (about 30 s on two CPU cores) and saves its weights to out_path.

    A teacher with random weights has nothing to teach: its CLS attention is blind to the moving square,
    so semantic masking hides the square most of the time and the targets carry no meaning. After this
    training it looks at the square and its features tell the colours apart; one frame cannot show the
    direction of motion, which is left to the video student. Every image is scored against all
    distinct captions (softmax over them), so two videos with the same caption are never negatives."""
    items = data.read_annotations(ann_file, root, 'video')
    clips = [data.read_frames(a.path, np.arange) for a in items]  # [T, H, W, 3] uint8 each, decoded once
    names = sorted({a.captions[0] for a in items})
    label = torch.tensor([names.index(a.captions[0]) for a in items])  # [V] the caption of each video
    text = open_clip.tokenize(names, context_length=32)  # [C, 32]
    model = teacher.tiny_clip().train()
    size = model.visual.image_size[0]
    # ImageNet -> CLIP normalization as in CLIPTeacher.__init__, computed in float64 here; the demo's numbers were
    # measured with exactly these values (the demo is small enough for a last-bit change to move them)
    scale, shift = (torch.tensor(c, dtype=torch.float32).view(3, 1, 1) for c in
                    (np.divide(teacher.IMAGENET_STD, teacher.CLIP_STD), np.subtract(teacher.IMAGENET_MEAN, teacher.CLIP_MEAN) / teacher.CLIP_STD))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    rng = np.random.default_rng(seed)
    for step in range(steps):
        idx = rng.integers(len(clips), size=batch)  # a random frame of a random video, RRC + flip
        images = data.normalize(torch.stack([data.augment(clips[i][rng.integers(len(clips[i]))][None], size, 'rrc',
                                                          rng, flip=True)[0] for i in idx]))[:, :, 0]  # [B, 3, S, S]
        img = F.normalize(model.encode_image(images * scale + shift), dim=-1)  # [B, E]
        txt = F.normalize(model.encode_text(text), dim=-1)  # [C, E]
        loss = F.cross_entropy(model.logit_scale.exp() * img @ txt.t(), label[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:  # cosine decay to 0
            g['lr'] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        opt.step()
    checkpoints.save(model.state_dict(), out_path)  # atomic: a killed run never leaves half a file

def setup(root, data_file, make_set, train_teacher, master, barrier):
    """The demo presets' preparation, done once by rank 0 while the others wait: write the synthetic set into
    `root` if `data_file` is missing (make_set), and train the demo CLIP into root/tiny_clip.pt if it is not there
    (train_teacher). Returns that path. Stops with a message (on every rank) when it cannot do either."""
    weights, captions = f'{root}/tiny_clip.pt', f'{root}/captions_train.json'
    write_set = make_set and not os.path.exists(data_file)
    if write_set and os.path.isdir(root) and os.listdir(root):
        raise SystemExit(f'{data_file} not found, and {root} is not empty: the demo writes its synthetic set only '
                         'into a new or empty folder. Pass the list of your own videos, or another folder.')
    if train_teacher and not os.path.exists(weights) and not write_set and not os.path.exists(captions):
        raise SystemExit(f"TEACHER_PRETRAINED='demo' is a tiny CLIP trained on the demo set's captions ({captions}), "
                         f'which {root} does not have. With your own videos, pass a real teacher (an open_clip tag '
                         "such as 'openai' or a weights file), or --teacher_pretrained=None for random weights.")
    if master and write_set:
        print(f'writing the synthetic demo set to {root}/ (a few seconds)')
        make_demo(root)
    if master and train_teacher and not os.path.exists(weights):
        print(f'training the demo teacher {weights} on single frames and captions (about 30 s)')
        train_demo_clip(captions, root, weights)
    barrier()
    return weights

if __name__ == '__main__':
    make_demo(sys.argv[1] if len(sys.argv) > 1 else 'demo_data')
