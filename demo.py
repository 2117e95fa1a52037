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

DEMO_SHAPES = ('square', 'circle', 'triangle', 'cross')  # what the demo teacher learns from the captions and a
                                                         # random video ViT's pooled features do not separate
DEMO_COLORS = {'red': (225, 45, 40), 'green': (40, 185, 60), 'blue': (45, 95, 235), 'yellow': (235, 205, 40),
               'purple': (150, 60, 200), 'orange': (240, 140, 30)}   # drawn at random: colour says nothing of the class
DEMO_DIRECTIONS = ('up', 'down')  # vertical, so the training flip (horizontal) keeps captions and labels true
DEMO_VIDEOS, DEMO_VAL = 20, 5     # videos per class (shape x direction), of which DEMO_VAL are held out
DEMO_T, DEMO_SIZE = 16, 96        # frames per video (8 fps) and pixels; the models see 64 px, where an object of
                                  # 28-40 px becomes 19-27 px: 2.4-3.3 patches of 8 px, enough to show its outline

def shape_mask(shape, r, yy, xx):
    """Pixels [H, W] bool of a shape of half-size r centred at 0 (yy, xx: pixel offsets from the centre)."""
    if shape == 'square':
        return (abs(yy) <= r * 0.85) & (abs(xx) <= r * 0.85)         # about the area of the circle
    if shape == 'circle':
        return yy ** 2 + xx ** 2 <= r ** 2
    if shape == 'triangle':                                          # pointing up; a horizontal flip keeps it
        return (yy <= r * 0.8) & (yy >= -r) & (abs(xx) <= (yy + r) * 0.58)
    return ((abs(yy) <= r) & (abs(xx) <= r * 0.35)) | ((abs(xx) <= r) & (abs(yy) <= r * 0.35))  # cross

def demo_frames(shape, color, direction, rng, n=DEMO_T):
    """A shape crossing about half the frame height over n frames, on a random textured background. One frame
    shows colour and shape; only the order of the frames shows the direction."""
    yy, xx = np.mgrid[:DEMO_SIZE, :DEMO_SIZE]
    coarse = torch.from_numpy(rng.uniform(70, 170, (1, 3, 4, 4)))                 # smooth colour gradients ...
    bg = F.interpolate(coarse, size=(DEMO_SIZE, DEMO_SIZE), mode='bicubic')[0].permute(1, 2, 0).numpy()
    bg = np.clip(bg + rng.normal(0, 12, (DEMO_SIZE, DEMO_SIZE, 1)), 0, 255)       # ... and grain
    r = int(rng.integers(14, 21))
    x = int(rng.integers(r + 4, DEMO_SIZE - r - 4))
    y0, y1 = (r + 4, DEMO_SIZE - r - 5)[::1 if direction == 'down' else -1]
    for t in range(n):
        img = bg.copy()
        img[shape_mask(shape, r, yy - (y0 + (y1 - y0) * t / (n - 1)), xx - x)] = DEMO_COLORS[color]
        yield img.astype(np.uint8)

def make_demo(out_dir, seed=0):
    """DIR/videos/*.mp4 with train.csv / val.csv (class = shape x direction, 8 classes), train_shape.csv /
    val_shape.csv (class = shape: the k-NN / linear-probe labels), captions_{train,val}.json ("a red circle moving
    up", with the attributes as fields; val keeps one video per caption, for retrieval), images/*.jpg with
    captions_images.json. The same seed gives byte-identical files."""
    rng = np.random.default_rng(seed)
    os.makedirs(f'{out_dir}/videos', exist_ok=True)
    os.makedirs(f'{out_dir}/images', exist_ok=True)
    classes = [(s, d) for s in DEMO_SHAPES for d in DEMO_DIRECTIONS]
    files = {f'{part}{kind}': [] for part in ('train', 'val') for kind in ('.csv', '_shape.csv', '.json')}
    for k in range(DEMO_VIDEOS):  # class after class within each k, so any prefix of a list covers every class
        part = 'val' if k >= DEMO_VIDEOS - DEMO_VAL else 'train'
        for label, (shape, direction) in enumerate(classes):
            color = str(rng.choice(list(DEMO_COLORS)))
            name = f'videos/{shape}_{direction}_{k:02d}.mp4'
            data.write_video(f'{out_dir}/{name}', demo_frames(shape, color, direction, rng), fps=8,
                             options={'preset': 'veryfast', 'crf': '20', 'threads': '1'})
            files[f'{part}.csv'].append(f'{name},{label}\n')
            files[f'{part}_shape.csv'].append(f'{name},{DEMO_SHAPES.index(shape)}\n')
            caption = f'a {color} {shape} moving {direction}'
            if part == 'train' or caption not in {c['caption'] for c in files['val.json']}:
                files[f'{part}.json'].append({'video': name, 'caption': caption, 'color': color, 'shape': shape,
                                              'direction': direction})
    for name, content in files.items():
        path = f'{out_dir}/' + (f'captions_{name[:-5]}.json' if name.endswith('.json') else name)
        with open(path, 'w') as f:
            json.dump(content, f, indent=1) if name.endswith('.json') else f.writelines(content)
    with open(f'{out_dir}/classes.txt', 'w') as f:
        f.writelines(f'{s} moving {d}\n' for s, d in classes)
    stills = []
    for k, shape in enumerate(DEMO_SHAPES * 2):  # stills: the first frame of a fresh clip, captioned without motion
        color = str(rng.choice(list(DEMO_COLORS)))
        Image.fromarray(next(demo_frames(shape, color, 'down', rng))).save(f'{out_dir}/images/{k}.jpg', quality=95)
        stills.append({'image': f'images/{k}.jpg', 'caption': f'a {color} {shape}'})
    with open(f'{out_dir}/captions_images.json', 'w') as f:
        json.dump(stills, f, indent=1)

def train_demo_clip(ann_file, root, out_path, steps=400, batch=64, lr=2e-3, seed=0):
    """Trains tiny_clip() CLIP-style on single frames of the demo's training videos and what a frame shows of
    their captions ("a red circle"; one frame cannot show the motion), about a minute on two CPU cores, and saves
    its weights to out_path.

    A teacher with random weights has nothing to teach: its CLS attention is blind to the moving object, so
    semantic masking hides it most of the time, and its features do not tell the shapes apart. After this
    training it looks at the object and knows its shape and colour. Every image is scored against all distinct
    captions (softmax over them), so two videos with the same caption are never negatives."""
    items = data.read_annotations(ann_file, root, 'video')
    clips = [data.read_frames(a.path, np.arange) for a in items]  # [T, H, W, 3] uint8 each, decoded once
    seen = [a.captions[0].split(' moving')[0] for a in items]     # what one frame shows: 'a red circle'
    names = sorted(set(seen))
    label = torch.tensor([names.index(c) for c in seen])           # [V] the caption of each video
    text = open_clip.tokenize(names, context_length=32)            # [C, 32]
    model = teacher.tiny_clip().train()
    size = model.visual.image_size[0]
    clip_input = teacher.CLIPTeacher(teacher.tiny_clip(), 1)       # its ImageNet -> CLIP input normalization
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    rng = np.random.default_rng(seed)
    for step in range(steps):
        idx = rng.integers(len(clips), size=batch)  # a random frame of a random video, RRC + flip
        images = data.normalize(torch.stack([data.augment(clips[i][rng.integers(len(clips[i]))][None], size, 'rrc',
                                                          rng, flip=True)[0] for i in idx]))[:, :, 0]  # [B, 3, S, S]
        img = F.normalize(model.encode_image(images * clip_input.in_scale + clip_input.in_shift), dim=-1)  # [B, E]
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
