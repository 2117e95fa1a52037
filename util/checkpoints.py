"""
Any checkpoint -> a model: ours and the official UMT ones alike. Every --init and --ckpt of the scripts comes here.

    ours      {'model': weights, 'model_config': ..., ...} from train_stage1.py (a VideoViT with alignment heads),
              train_stage2.py (+ 'text_config': the video-language UMT) and tasks.finetune (+ 'num_classes')
    official  OpenGVLab/unmasked_teacher state dicts (raw or under 'model' / 'module'; architecture from the shapes):
              stage 1 `encoder.*`, `clip_decoder.*` (single_modality/models/modeling_pretrain_umt.py), stage 2
              `vision_encoder.*` next to BERT and the teacher (multi_modality/models/umt.py), fine-tuned
              `patch_embed.*`, `blocks.*`, `fc_norm.*`, `head.*` (single_modality/models/modeling_finetune.py)

load() builds the model the caller asks for and reports what it loaded, what is new and what it did not use.
Files are read with weights_only=True (training.read_checkpoint): tensors and plain data, never code to run.
"""

import dataclasses
import json
import math

import torch

import data
from model import VideoClassifier, VideoViT, VideoViTConfig, load_strict
from training import fail, read_checkpoint
from video_language import UMT

def group(keys, parts=1):
    """['clip_decoder.0.head.weight', ...] -> 'clip_decoder.* (8)': keys grouped by their first `parts` name parts
    (block numbers as *), with counts."""
    groups = {}
    for k in keys:
        groups.setdefault('.'.join('*' if p.isdigit() else p for p in k.split('.')[:parts]), []).append(k)
    return ', '.join(ks[0] if ks == [g] else f'{g}.* ({len(ks)})' for g, ks in groups.items()) or 'none'

def official_config(sd, overrides):
    """The VideoViTConfig of official weights (our VideoViT key names), inferred from the shapes. Heads = width / 64
    (true for B and L). A stored `pos_embed` [1, N, D] (official fine-tuning) gives the frame count at img_size
    (default 224), or the resolution at num_frames."""
    w = sd['patch_embed.proj.weight']                                      # [D, 3, tubelet, patch, patch]
    D, tubelet, patch = w.shape[0], w.shape[2], w.shape[-1]
    K = sum(1 for k in sd if k.startswith('clip_decoder.') and k.endswith('.head.weight'))
    config = dict(patch_size=patch, tubelet_size=tubelet, embed_dim=D, num_heads=max(D // 64, 1), drop_path=0.0,
                  depth=1 + max(int(k.split('.')[1]) for k in sd if k.startswith('blocks.')), align_layers=K,
                  mlp_ratio=sd['blocks.0.mlp.fc1.weight'].shape[0] / D,
                  teacher_dim=sd['clip_decoder.0.head.weight'].shape[0] if K else 512)
    config.update(overrides)
    if 'pos_embed' in sd:
        n = sd['pos_embed'].shape[1]
        if 'num_frames' in overrides and 'img_size' not in overrides:
            config['img_size'] = math.isqrt(n // (overrides['num_frames'] // tubelet)) * patch
        elif 'num_frames' not in overrides:
            config['num_frames'] = max(1, n // (config.get('img_size', 224) // patch) ** 2) * tubelet
    return VideoViTConfig(**config)

def describe(ckpt, overrides, name):
    """A checkpoint dict -> (kind, weights, config, stored config or None, extra, unused): kind as load's `want`;
    config = the stored one (ours) or the one the shapes give (official), with `overrides` applied."""
    if 'model_config' in ckpt:  # ours
        kind = 'umt' if 'text_config' in ckpt else 'classifier' if 'num_classes' in ckpt else 'vit'
        stored = VideoViTConfig(**ckpt['model_config'])
        return kind, dict(ckpt['model']), dataclasses.replace(stored, **overrides), stored, ckpt, []
    sd = next((ckpt[k] for k in ('model', 'module') if isinstance(ckpt.get(k), dict)), ckpt)
    if not all(isinstance(v, torch.Tensor) for v in sd.values()) or not any(k.endswith('patch_embed.proj.weight')
                                                                            for k in sd):
        fail(f'{name} holds no video encoder weights (no patch_embed.proj.weight): pass a checkpoint of this project '
             'or an official UMT .pth')
    unused = []
    if any(k.startswith('vision_encoder.') for k in sd):  # official stage 2: its BERT text side cannot be used here
        unused = [k for k in sd if not k.startswith('vision_encoder.') or k.startswith('vision_encoder.pool_norm.')]
        sd = {k.removeprefix('vision_encoder.'): v for k, v in sd.items() if k not in unused}
    kind = 'classifier' if 'head.weight' in sd else 'vit'
    sd = {k.removeprefix('encoder.'): v for k, v in sd.items()}
    config = official_config(sd, overrides)
    if kind == 'classifier':
        sd = {(k if k.startswith(('fc_norm.', 'head.', 'pos_embed')) else 'backbone.' + k): v for k, v in sd.items()}
    return kind, sd, config, None, {}, unused

def load(source, want='auto', num_classes=None, head_rows=None, stored_table=False, head_dropout=0.0, init_scale=0.001,
         name=None, **overrides):
    """A checkpoint (path or dict) -> (model, report lines). A checkpoint that cannot give the model asked for is
    bad input (training.BadInput) that names it.

    want: 'vit' (VideoViT with alignment heads: stage-2 training), 'umt' (our stage-2 model), 'classifier'
    (VideoClassifier with num_classes outputs: fine-tuning; its backbone from any kind) or 'auto' (what the
    checkpoint holds). overrides: VideoViTConfig fields (num_frames, img_size, drop_path, ...). The sin-cos
    position table is regenerated for the new frames / resolution; stored_table=True uses an official
    fine-tuned file's own `pos_embed` when it fits (to evaluate that file as it was trained). head_rows: the
    rows of the checkpoint's classifier head to keep as the new head (K710 -> K400: range(400)); head_dropout and
    init_scale: the VideoClassifier's (a new head starts at init_scale x its random init). name: for the report.
    """
    name = name or (source if isinstance(source, str) else 'the checkpoint')
    ckpt = read_checkpoint(source) if isinstance(source, str) else source
    kind, sd, config, stored, extra, unused = describe(ckpt, overrides, name)
    want = kind if want == 'auto' else want
    try:
        return build(kind, want, sd, config, stored, extra, unused, num_classes, head_rows, stored_table, head_dropout,
                     init_scale, name)
    except ValueError as e:  # load_strict or a config that does not fit: the checkpoint is the user's input
        fail(f'{name}: {e}')

def build(kind, want, sd, config, stored, extra, unused, num_classes, head_rows, stored_table, head_dropout,
          init_scale, name):
    """load()'s second half: the model of `want` from the described checkpoint, and the report."""
    if want == 'umt':
        if kind != 'umt':
            fail(f'{name} holds a {kind}, not a stage-2 video-language model of train_stage2.py')
        model = UMT.from_configs(dataclasses.asdict(config), extra['text_config'])
        load_strict(model, sd)
        return model, [f'loaded {name}: all {len(sd)} tensors of a stage-2 model']
    if kind == 'umt':  # its video encoder only
        unused += [k for k in sd if not k.startswith('vision_encoder.')]
        sd = {k.removeprefix('vision_encoder.'): v for k, v in sd.items() if k.startswith('vision_encoder.')}
    if want == 'vit' and kind != 'classifier':
        model = vit = VideoViT(config)
        prefix = ''
    elif want == 'classifier':
        classes = num_classes or extra.get('num_classes') or (sd['head.weight'].shape[0] if 'head.weight' in sd else 0)
        if not classes:
            fail(f'{name} has no classifier head: say how many classes the new one has')
        vit = VideoViT(dataclasses.replace(config, align_layers=0))
        model, prefix = VideoClassifier(vit, classes, head_dropout, init_scale), 'backbone.'
        if kind != 'classifier':
            sd = {prefix + k: v for k, v in sd.items()}
        if head_rows is not None:  # a head trained on a superset of the classes (K710 -> K400 / K600 / K700)
            rows = len(sd['head.weight']) if 'head.weight' in sd else 0
            if len(head_rows) != classes or not all(0 <= r < rows for r in head_rows):
                fail(f'HEAD_ROWS: {len(head_rows)} rows for {classes} classes, from a head of {rows} rows in {name}')
            sd['head.weight'], sd['head.bias'] = sd['head.weight'][list(head_rows)], sd['head.bias'][list(head_rows)]
    else:
        fail(f'{name} holds a {kind}; it cannot give a {want!r} (a classifier has no alignment heads)')
    own, table = model.state_dict(), sd.pop('pos_embed', None)
    feed = {k: v for k, v in sd.items() if k in own and v.shape == own[k].shape}
    unused += [k.removeprefix(prefix) for k in sd if k not in feed]  # a final norm or heads a classifier does not use
    new = [k for k in own if k not in feed]
    missing = [k if k not in sd else f'{k} (checkpoint {tuple(sd[k].shape)}, model {tuple(own[k].shape)})'
               for k in new if k.startswith(prefix)]  # the video encoder (and, for 'vit', its heads) must be whole
    if missing:
        fail(f'{name} does not hold the whole video encoder; missing or of another shape: ' + ', '.join(missing))
    load_strict(model, {**own, **feed})
    rows = '' if head_rows is None else f', head = {len(head_rows)} of its rows ({list(head_rows)[:3]}...)'
    report = [f'loaded {name}: {len(feed)} tensors ({kind}, depth {config.depth}, width {config.embed_dim}){rows}',
              f'new: {group(new)}']
    here, table_line = f'{config.num_frames} frames x {config.img_size} px', []
    if table is not None and stored_table and table.shape[1:] == vit.pos_embed.shape:
        vit.pos_embed.copy_(table[0])
        table_line = [f"position table: the checkpoint's own pos_embed ({table.shape[1]} tokens = {here})"]
    elif table is not None:
        unused.append('pos_embed')
        table_line = [f"position table: sin-cos for {here}; the checkpoint's pos_embed ({table.shape[1]} tokens) is "
                      'not used']
    elif stored is not None and (stored.num_frames, stored.img_size) != (config.num_frames, config.img_size):
        table_line = [f'position table regenerated: {stored.num_frames} frames x {stored.img_size} px -> '
                      f'{config.num_frames} x {config.img_size}']
    report += [f'unused: {group(unused)}'] + table_line
    return model, report

def head_rows(spec, num_classes):
    """HEAD_ROWS -> the rows of INIT's head that become the new head, one per class (None: a new head).
    'names:A,B': class i of list B is row A.index(B[i]); a class of B missing from A is an error that names it."""
    if spec is None:
        return None
    if spec == 'first':
        return list(range(num_classes))
    if spec.startswith('names:'):
        lists = [[n.strip() for n in data.read_text(f, 'HEAD_ROWS file').splitlines() if n.strip()]
                 for f in spec[6:].split(',')]
        if len(lists) != 2:
            fail(f"HEAD_ROWS={spec!r}: 'names:' takes two files, K710's class names and this dataset's")
        missing = [n for n in lists[1] if n not in lists[0]]
        if missing:
            fail(f'HEAD_ROWS: {len(missing)} classes of {spec[6:].split(",")[1]} are not in {spec[6:].split(",")[0]}, '
                 f'e.g. {missing[0]!r}: check the spelling, or start those classes from a new head')
        rows = [lists[0].index(n) for n in lists[1]]
    elif spec.endswith('.json'):
        try:
            rows = json.loads(data.read_text(spec, 'HEAD_ROWS'))
        except json.JSONDecodeError as e:
            fail(f'HEAD_ROWS {spec} is not JSON ({e})')
    else:
        fail(f"HEAD_ROWS={spec!r} must be None, 'first', a .json list of rows or 'names:K710_NAMES,NAMES'")
    if not isinstance(rows, list) or len(rows) != num_classes or not all(isinstance(r, int) and r >= 0 for r in rows):
        fail(f'HEAD_ROWS={spec!r} must give one row number per class, NUM_CLASSES={num_classes}')
    return rows
