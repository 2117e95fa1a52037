"""
Fine-tuning's augmentation (tasks/finetune.py), as the official
single_modality/run_class_finetuning.py: RandAugment 'rand-m7-n4-mstd0.5-inc1' and random erasing
(pixel mode, one box) with timm's semantics written out over torchvision's functional ops, label
smoothing, mixup / cutmix, and the repeated-augmentation training set. RandAugment draws its ops
once per clip, so every frame gets the same ones and motion stays intact; erasing treats each frame
as its own image (timm on [T, C, H, W]).
"""

import math

import numpy as np
import torch
# torchvision comes with open_clip
from torchvision.transforms.v2 import InterpolationMode, functional as TF

from data import MEAN, STD, VideoClassification, augment, read_frames, sample_indices


# timm's fill for the pixels that rotate / shear / translate bring in: the ImageNet mean
RA_FILL = [124, 116, 104]
# rotate / shear (timm on PIL images: the training interpolation)
RA_RESAMPLE = InterpolationMode.BILINEAR

def _ra_sign(rng, v):
    return v if rng.random() < 0.5 else -v

def _ra_factor(rng, m):  # enhancement factor of Color / Contrast / Brightness / Sharpness
    return max(0.1, 1 + _ra_sign(rng, m / 10 * 0.9))

def _ra_shear(x, m, rng, axis):
    """x' = x + f y (or y' = y + f x) about the top-left corner, |f| = m / 10 * 0.3."""
    deg = math.degrees(math.atan(_ra_sign(rng, m / 10 * 0.3)))
    return TF.affine(x, 0.0, [0, 0], 1.0, [deg, 0.0] if axis == 'x' else [0.0, deg], RA_RESAMPLE,
                     RA_FILL, center=[0, 0])

def _ra_translate(x, m, rng, axis):  # by m / 10 * 45% of the width (or height)
    shift = round(_ra_sign(rng, m / 10 * 0.45) * x.shape[-1 if axis == 'x' else -2])
    return TF.affine(x, 0.0, [shift, 0] if axis == 'x' else [0, shift], 1.0, [0.0, 0.0],
                     fill=RA_FILL)

# name -> f(clip uint8 [T,3,H,W], magnitude m in [0, 10], rng);
# the '-Increasing' variants (inc1): stronger with m
RA_OPS = {
    'AutoContrast': lambda x, m, rng: TF.autocontrast(x),
    'Equalize': lambda x, m, rng: TF.equalize(x),
    'Invert': lambda x, m, rng: TF.invert(x),
    'Rotate': lambda x, m, rng: TF.rotate(x, _ra_sign(rng, m / 10 * 30), RA_RESAMPLE, fill=RA_FILL),
    'Posterize': lambda x, m, rng: TF.posterize(x, 4 - int(m / 10 * 4)),
    # invert the values at or above the threshold
    'Solarize': lambda x, m, rng: torch.where(x.int() >= 256 - int(m / 10 * 256), 255 - x, x),
    'SolarizeAdd': lambda x, m, rng: torch.where(
        x < 128, (x.int() + int(m / 10 * 110)).clamp(max=255).byte(), x),
    'Color': lambda x, m, rng: TF.adjust_saturation(x, _ra_factor(rng, m)),
    'Contrast': lambda x, m, rng: TF.adjust_contrast(x, _ra_factor(rng, m)),
    'Brightness': lambda x, m, rng: TF.adjust_brightness(x, _ra_factor(rng, m)),
    'Sharpness': lambda x, m, rng: TF.adjust_sharpness(x, _ra_factor(rng, m)),
    'ShearX': lambda x, m, rng: _ra_shear(x, m, rng, 'x'),
    'ShearY': lambda x, m, rng: _ra_shear(x, m, rng, 'y'),
    'TranslateX': lambda x, m, rng: _ra_translate(x, m, rng, 'x'),
    'TranslateY': lambda x, m, rng: _ra_translate(x, m, rng, 'y'),
}

def rand_augment(frames, rng, num_ops=4, magnitude=7, magnitude_std=0.5, prob=0.5):
    """uint8 [T,H,W,3] -> uint8 [T,H,W,3]: num_ops ops drawn with replacement, each applied with
    probability prob at a magnitude drawn from N(magnitude, magnitude_std) clipped to [0, 10]; the
    same draws for every frame."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # [T,3,H,W]
    for name in rng.choice(list(RA_OPS), num_ops, replace=True):
        if rng.random() < prob:
            x = RA_OPS[name](x, float(np.clip(rng.normal(magnitude, magnitude_std), 0, 10)), rng)
    return x.permute(0, 2, 3, 1).numpy()

def random_erase(clip, rng, prob=0.25, area=(0.02, 1 / 3), aspect=0.3):
    """uint8 [3,T,S,S], in place: each frame, with probability prob, gets one box (area fraction in
    `area`, log-uniform aspect in [aspect, 1/aspect], 10 tries) of noise that is N(0, 1) per pixel
    after normalization (timm's 'pixel' mode), clipped to the uint8 range."""
    _, T, H, W = clip.shape
    for t in range(T):
        if rng.random() >= prob:
            continue
        for _ in range(10):
            a = H * W * rng.uniform(*area)
            r = math.exp(rng.uniform(math.log(aspect), -math.log(aspect)))
            h, w = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
            if h < H and w < W:
                y, x = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
                noise = (rng.standard_normal((3, h, w), dtype=np.float32) * STD[:, 0].numpy()
                         + MEAN[:, 0].numpy())
                clip[:, t, y:y + h, x:x + w] = torch.from_numpy(
                    np.clip(np.round(noise * 255), 0, 255).astype(np.uint8))
                break
    return clip

def smooth_one_hot(label, num_classes, smoothing):
    """[B] class ids -> [B, C] targets: 1 - smoothing + smoothing / C on the label, smoothing / C
    elsewhere."""
    off = smoothing / num_classes
    target = torch.full((len(label), num_classes), off, device=label.device)
    return target.scatter_(1, label[:, None], 1 - smoothing + off)

def mixup_cutmix(video, target, rng, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5):
    """Batch-mode mixup / cutmix (timm's Mixup): video [B, 3, T, H, W], soft target [B, C] -> both
    mixed. One coin flip picks cutmix (probability switch_prob) or mixup and one lam ~ Beta(alpha,
    alpha) for the whole batch; sample b is mixed with sample B-1-b (the batch reversed, as timm).
    Cutmix pastes one box, the same on every frame, and lam becomes the exact kept area. Targets mix
    with the same lam, so rows still sum to 1."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return video, target
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if use_cutmix else
                rng.beta(mixup_alpha, mixup_alpha))
    partner = video.flip(0)                                        # [B, 3, T, H, W], sample B-1-b
    if use_cutmix:
        H, W = video.shape[-2:]
        # a box of area (1 - lam) H W, centred anywhere; the box is clipped
        cut_h, cut_w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = rng.integers(H), rng.integers(W)
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
        video = video.clone()
        video[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)  # the real share left after clipping
    else:
        video = video * lam + partner * (1 - lam)
    return video, target * lam + target.flip(0) * (1 - lam)

class RepeatedAugClassification(VideoClassification):
    """Fine-tuning training set with repeated augmentation (the official num_sample): each video is
    decoded once and gives num_sample clips, each with its own RandAugment, random-resized crop,
    flip and random erasing (the official order) -> video [num_sample, 3, T, S, S]. Decoding is the
    expensive part: this multiplies the clips per second."""
    def __init__(self, *args, num_sample=2, rrc_scale=(0.08, 1.0), rand_augment=None,
                 erase_prob=0.0, **kw):
        super().__init__(*args, mode='train', **kw)
        self.num_sample, self.rrc_scale = num_sample, rrc_scale
        # (ops, magnitude, std) or None; a probability
        self.rand_augment, self.erase_prob = rand_augment, erase_prob

    def load(self, i, rng):
        path, label = self.samples[i]
        mode = 'sparse' if self.sampler == 'kinetics' else 'tsn'
        frames = read_frames(path, lambda n: sample_indices(n, self.num_frames, mode, rng),
                             self.threads)
        clips = []
        for _ in range(self.num_sample):
            clip = rand_augment(frames, rng, *self.rand_augment) if self.rand_augment else frames
            clip = augment(clip, self.size, 'rrc', rng, self.flip, scale=self.rrc_scale,
                           interp='bilinear')[0]
            clips.append(random_erase(clip, rng, self.erase_prob) if self.erase_prob else clip)
        return {'video': torch.stack(clips), 'label': label}              # [num_sample, 3, T, S, S]


if __name__ == '__main__':  # a module, not a script: say what it holds
    print(__doc__.strip())
