"""
Checkpoints -> models, ours and the official UMT ones alike: every --init, --ckpt and --pretrained
of the scripts comes here. One reader of the weights, then one short loader per kind of model, named
by the caller:

    resolve(path)          hf://OWNER/REPO/FILE -> a file in the Hugging Face cache (fetched once)
    read_file(path)        a weights file -> its dict (.pt / .pth / .safetensors)
    read(source)           any checkpoint -> Weights: the state dict, our stored configs, its kind
    load_vit(...)          the student with its alignment heads (stage-2 training from stage 1)
    load_classifier(...)   a VideoClassifier (fine-tuning, AVA, a fine-tuned file's own head)
    load_stage2(...)       the video-language UMT: ours (CLIP or BERT text side), or an official
                           stage-2 .pth (BERT): retrieval, multiple choice, features, QA, stage 2

The layouts (official: OpenGVLab/unmasked_teacher, raw or under 'model' / 'module'; the architecture
comes from the shapes, since those files store no config):
    ours       {'model': weights, 'model_config': ..., ...} from train_stage1.py (a VideoViT),
               train_stage2.py (+ 'text_config': a UMT), tasks.finetune (+ 'num_classes'),
               tasks.finetune_qa (+ 'text_config', an answer decoder)
    stage 1    encoder.*, clip_decoder.* (single_modality/models/modeling_pretrain_umt.py)
    stage 2    vision_encoder.encoder.*, vision_encoder.clip_decoder.*, vision_encoder.pool_norm.*,
               text_encoder.bert.*, text_encoder.cls.*, vision_proj, text_proj, itm_head, temp, and
               the frozen teacher clip_teacher.* (multi_modality/models/umt.py; a retrieval
               fine-tuned file has text_encoder.* without bert. and no cls.*)
    QA         vision_encoder.encoder.*, text_encoder.*, text_decoder.* (umt_qa.py; read by
               tasks/video_qa.py)
    fine-tuned patch_embed.*, blocks.*, fc_norm.*, head.*, maybe pos_embed
               (single_modality/models/modeling_finetune.py)
Files are read with weights_only=True (or as safetensors): tensors and plain data, never code.
"""

import dataclasses
import json
import math

import torch

import data
from model import VideoClassifier, VideoViT, VideoViTConfig, load_strict
from training import read_checkpoint, resolve
from util.bert import bert_config, sub_state_dict
from util.configurator import fail, reported, user_input
from util.wordpiece import Tokenizer
from video_language import UMT

read_text = reported(data.read_text)  # a file it cannot read: one message

def read_file(path, what='--init'):
    """A weights file (a local path or hf://...) -> the dict it holds: .safetensors, or a torch file
    read with weights_only=True (training.read_checkpoint: tensors and plain data, never code)."""
    path = resolve(path, what)
    if not path.endswith('.safetensors'):
        return read_checkpoint(path)
    from safetensors.torch import load_file  # a dependency of open_clip
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - a file that cannot be read is the user's
        fail(f'{path} cannot be read as safetensors ({type(e).__name__}: {e})')

@dataclasses.dataclass
class Weights:
    """What read() found. sd: the state dict (unwrapped); ours: our checkpoint dict (its configs),
    None for an official file; kind: what it holds: 'vit', 'classifier', 'umt' (stage 2), 'qa'."""
    name: str
    sd: dict
    ours: dict = None
    kind: str = 'vit'

def read(source, name=None):
    """A checkpoint (path, hf://..., dict or Weights) -> Weights. A file that holds no video encoder
    is bad input that names it."""
    if isinstance(source, Weights):
        return source
    name = name or (source if isinstance(source, str) else 'the checkpoint')
    ckpt = read_file(source, name) if isinstance(source, str) else source
    if 'model_config' in ckpt:  # ours: the kind is written beside the weights
        sd, text = dict(ckpt['model']), 'text_config' in ckpt
        qa = any(k.startswith(('decoder.', 'text_decoder.')) for k in sd)
        kind = 'qa' if text and qa else 'umt' if text else 'classifier' if 'num_classes' in ckpt \
            else 'vit'
        return Weights(name, sd, ckpt, kind)
    sd = next((ckpt[k] for k in ('model', 'module') if isinstance(ckpt.get(k), dict)), ckpt)
    if not all(isinstance(v, torch.Tensor) for v in sd.values()) or \
            not any(k.endswith('patch_embed.proj.weight') for k in sd):
        fail(f'{name} holds no video encoder weights (no patch_embed.proj.weight): pass a '
             'checkpoint of this project or an official UMT .pth')
    has = lambda prefix: any(k.startswith(prefix) for k in sd)
    kind = 'qa' if has('text_decoder.') else 'umt' if has('text_encoder.') else \
        'classifier' if 'head.weight' in sd else 'vit'
    return Weights(name, sd, None, kind)

def group(keys, parts=1):
    """['clip_decoder.0.head.weight', ...] -> 'clip_decoder.* (8)': keys grouped by their first
    `parts` name parts (block numbers as *), with counts."""
    groups = {}
    for k in keys:
        name = '.'.join('*' if p.isdigit() else p for p in k.split('.')[:parts])
        groups.setdefault(name, []).append(k)
    return ', '.join(ks[0] if ks == [g] else f'{g}.* ({len(ks)})'
                     for g, ks in groups.items()) or 'none'

# ----------------------------------------------------------------------------------------------
# The video encoder of any checkpoint

def official_config(sd, overrides):
    """The VideoViTConfig of official weights (our VideoViT key names), inferred from the shapes.
    Heads = width / 64 (true for B and L). A stored `pos_embed` [1, N, D] (official fine-tuning)
    gives the frame count at img_size (default 224), or the resolution at num_frames."""
    w = sd['patch_embed.proj.weight']                              # [D, 3, tubelet, patch, patch]
    D, tubelet, patch = w.shape[0], w.shape[2], w.shape[-1]
    K = sum(1 for k in sd if k.startswith('clip_decoder.') and k.endswith('.head.weight'))
    config = dict(patch_size=patch, tubelet_size=tubelet, embed_dim=D, num_heads=max(D // 64, 1),
                  depth=1 + max(int(k.split('.')[1]) for k in sd if k.startswith('blocks.')),
                  align_layers=K, mlp_ratio=sd['blocks.0.mlp.fc1.weight'].shape[0] / D,
                  teacher_dim=sd['clip_decoder.0.head.weight'].shape[0] if K else 512,
                  drop_path=0.0)
    config.update(overrides)
    # Why: the official fine-tuning stores a pos_embed only for another frame count or resolution
    # than 8 x 224 (whose fixed sin-cos table is never saved); its length is all that the file says
    # about the clips it was trained on
    if 'pos_embed' in sd:
        n = sd['pos_embed'].shape[1]
        if 'num_frames' in overrides and 'img_size' not in overrides:
            config['img_size'] = math.isqrt(n // (overrides['num_frames'] // tubelet)) * patch
        elif 'num_frames' not in overrides:
            grid = (config.get('img_size', 224) // patch) ** 2
            config['num_frames'] = max(1, n // grid) * tubelet
    return VideoViTConfig(**config)

def official_vision(sd):
    """An official stage-1, stage-2, QA or fine-tuned state dict -> (the video encoder under our
    VideoViT names, fc_norm / head / pos_embed included; the other keys). Stage 2 and QA wrap the
    stage-1 student as vision_encoder.encoder.* (its heads: vision_encoder.clip_decoder.*);
    vision_encoder.pool_norm is UMT.pool_norm, so it is not the encoder's."""
    if not any(k.startswith('vision_encoder.') for k in sd):  # stage 1, fine-tuned
        return {k.removeprefix('encoder.'): v for k, v in sd.items()}, []
    vision, rest = {}, []
    for k, v in sd.items():
        if k.startswith('vision_encoder.') and not k.startswith('vision_encoder.pool_norm.'):
            vision[k.removeprefix('vision_encoder.').removeprefix('encoder.')] = v
        else:
            rest.append(k)
    return vision, rest

def video_encoder(w, overrides):
    """Weights -> (the video encoder's tensors under VideoViT's names, the keys left over, its
    VideoViTConfig with overrides, the stored config or None)."""
    if w.ours is None:
        sd, unused = official_vision(w.sd)
        return sd, unused, official_config(sd, overrides), None
    stored = VideoViTConfig(**w.ours['model_config'])
    sd, unused = dict(w.sd), []
    if w.kind in ('umt', 'qa'):  # its video encoder only
        unused = [k for k in sd if not k.startswith('vision_encoder.')]
        sd = {k.removeprefix('vision_encoder.'): v for k, v in sd.items() if k not in unused}
    return sd, unused, dataclasses.replace(stored, **overrides), stored

def fit(model, sd, unused, prefix, w, config, stored, stored_table=False, note=''):
    """Load the video encoder (and a classifier's head) of sd into model, strict for the encoder ->
    the report: what was loaded, what is new, what was unused, and the position table."""
    vit = model.backbone if prefix else model
    own, table = model.state_dict(), sd.pop('pos_embed', None)
    feed = {k: v for k, v in sd.items() if k in own and v.shape == own[k].shape}
    unused += [k.removeprefix(prefix) for k in sd if k not in feed]  # a norm or heads left unused
    new = [k for k in own if k not in feed]
    # the video encoder (and a vit's heads) must be whole
    missing = [k if k not in sd else
               f'{k} (checkpoint {tuple(sd[k].shape)}, model {tuple(own[k].shape)})'
               for k in new if k.startswith(prefix)]
    if missing:
        fail(f'{w.name} does not hold the whole video encoder; missing or of another shape: '
             + ', '.join(missing))
    load_strict(model, {**own, **feed})
    report = [f'loaded {w.name}: {len(feed)} tensors ({w.kind}, depth {config.depth}, width '
              f'{config.embed_dim}){note}', f'new: {group(new)}']
    # The position table is the fixed sin-cos one, regenerated for the frames and resolution asked
    # for (row p does not depend on the length); an official fine-tuned file's own pos_embed is
    # used only when asked and when it fits
    here, table_line = f'{config.num_frames} frames x {config.img_size} px', []
    if table is not None and stored_table and table.shape[1:] == vit.pos_embed.shape:
        vit.pos_embed.copy_(table[0])
        table_line = [f"position table: the checkpoint's own pos_embed ({table.shape[1]} tokens = "
                      f'{here})']
    elif table is not None:
        unused.append('pos_embed')
        table_line = [f"position table: sin-cos for {here}; the checkpoint's pos_embed "
                      f'({table.shape[1]} tokens) is not used']
    elif stored is not None and (stored.num_frames, stored.img_size) != (config.num_frames,
                                                                         config.img_size):
        table_line = [f'position table regenerated: {stored.num_frames} frames x {stored.img_size} '
                      f'px -> {config.num_frames} x {config.img_size}']
    return report + [f'unused: {group(unused)}'] + table_line

# ----------------------------------------------------------------------------------------------
# One loader per kind of model

def load_vit(source, name=None, **overrides):
    """A checkpoint -> (VideoViT with its alignment heads, report lines): ours (stage 1, or the
    video encoder of stage 2) or official (stage 1, or the video encoder of stage 2). overrides:
    VideoViTConfig fields (num_frames, img_size, drop_path, ...)."""
    w = read(source, name)
    if w.kind == 'classifier':
        fail(f"{w.name} holds a classifier; it cannot give a 'vit' (a classifier has no alignment "
             'heads)')
    sd, unused, config, stored = video_encoder(w, overrides)
    with user_input(f'{w.name}: '):  # a config or tensors that do not fit: the user's checkpoint
        model = VideoViT(config)
        return model, fit(model, sd, unused, '', w, config, stored)

def load_classifier(source, num_classes=None, head_rows=None, stored_table=False, head_dropout=0.0,
                    init_scale=0.001, name=None, **overrides):
    """A checkpoint of any kind -> (VideoClassifier with num_classes outputs, report lines): the
    video encoder of any checkpoint, and its head when it has one. head_rows: the rows of the
    checkpoint's head to keep as the new head (K710 -> K400: range(400)); head_dropout, init_scale:
    the VideoClassifier's (a new head starts at init_scale x its random init). stored_table: use an
    official fine-tuned file's own pos_embed when it fits (to evaluate that file as trained)."""
    w = read(source, name)
    sd, unused, config, stored = video_encoder(w, overrides)
    classes = num_classes or (w.ours or {}).get('num_classes') or \
        (sd['head.weight'].shape[0] if 'head.weight' in sd else 0)
    if not classes:
        fail(f'{w.name} has no classifier head: say how many classes the new one has')
    if w.kind == 'classifier' and w.ours is None:  # official: the encoder has no backbone. prefix
        sd = {(k if k.startswith(('fc_norm.', 'head.', 'pos_embed')) else 'backbone.' + k): v
              for k, v in sd.items()}
    elif w.kind != 'classifier':
        sd = {'backbone.' + k: v for k, v in sd.items()}
    note = ''
    if head_rows is not None:  # a head trained on a superset of the classes (K710 -> K400 / K600)
        rows = len(sd['head.weight']) if 'head.weight' in sd else 0
        if len(head_rows) != classes or not all(0 <= r < rows for r in head_rows):
            fail(f'HEAD_ROWS: {len(head_rows)} rows for {classes} classes, from a head of {rows} '
                 f'rows in {w.name}')
        for p in ('weight', 'bias'):
            sd[f'head.{p}'] = sd[f'head.{p}'][list(head_rows)]
        note = f', head = {len(head_rows)} of its rows ({list(head_rows)[:3]}...)'
    with user_input(f'{w.name}: '):
        vit = VideoViT(dataclasses.replace(config, align_layers=0))
        model = VideoClassifier(vit, classes, head_dropout, init_scale)
        return model, fit(model, sd, unused, 'backbone.', w, config, stored, stored_table, note)

def load_stage2(source, name=None, vocab=None, **overrides):
    """A stage-2 checkpoint -> (UMT, report lines): ours, with its CLIP or BERT text side (strict),
    or an official stage-2 .pth, whose BERT (base or large, from the shapes) becomes the text side.
    vocab: the WordPiece vocabulary of an official file (util/bert.VOCAB, a local vocab.txt or
    hf://...), which it does not store; None gives a model that reads no text (video features only).
    overrides: VideoViTConfig fields (num_frames, img_size, drop_path, ...)."""
    w = read(source, name)
    if w.kind != 'umt':
        fail(f'{w.name} holds a {w.kind}: this needs a stage-2 checkpoint, with a text side '
             '(train_stage2.py, or an official UMT stage-2 .pth)')
    if w.ours is not None:
        config = dataclasses.replace(VideoViTConfig(**w.ours['model_config']), **overrides)
        with user_input(f'{w.name}: '):
            model = UMT.from_configs(dataclasses.asdict(config), w.ours['text_config'])
            load_strict(model, w.sd)
        return model, [f'loaded {w.name}: all {len(w.sd)} tensors of a stage-2 model']
    sd, unused = official_stage2(w.sd)
    vision = {k.removeprefix('vision_encoder.'): v for k, v in sd.items()
              if k.startswith('vision_encoder.')}
    config = official_config(vision, overrides)
    bert = bert_config(sub_state_dict(sd, 'text_encoder.bert.'))  # heads: width / 64, as B and L
    with user_input(f'--vocab {vocab}: '):
        tokenizer = Tokenizer(resolve(vocab, '--vocab')) if vocab else None
    text_config = dict(text_encoder='bert', bert=dataclasses.asdict(bert),
                       embed_dim=len(sd['text_proj.bias']),
                       vocab=tokenizer.tokens if tokenizer else None)
    with user_input(f'{w.name}: '):
        model = UMT.from_configs(dataclasses.asdict(config), text_config)
        own = model.state_dict()
        new = [k for k in own if k not in sd]
        # a retrieval fine-tuned file has no MLM head (its decoder is tied to the word embeddings
        # anyway); anything else missing is not an official stage-2 model of this shape
        if any(not k.startswith('text_encoder.cls.') for k in new):
            raise ValueError(f'missing {group(new, 3)}: not an official UMT stage-2 model')
        load_strict(model, {**{k: own[k] for k in new}, **sd})
    size = {768: 'base', 1024: 'large'}.get(bert.hidden_size, f'width {bert.hidden_size}')
    words = f'{vocab} ({len(tokenizer.tokens)} tokens)' if tokenizer else 'none (no text)'
    return model, [
        f'loaded {w.name}: {len(sd)} tensors (official stage 2: video encoder depth '
        f'{config.depth}, width {config.embed_dim}; BERT-{size}, fusion from layer '
        f'{bert.fusion_layer})', f'new: {group(new, 3)}', f'unused: {group(unused)}',
        f'vocabulary: {words}']

def official_stage2(sd):
    """An official stage-2 state dict -> (our UMT's names, the keys left over: the teacher). Only
    the video encoder moves: vision_encoder.encoder.X is our vision_encoder.X, its pool_norm our
    pool_norm; the BERT keys are ours already (a retrieval fine-tuned file's text_encoder.X, which
    setup_model renamed from text_encoder.bert.X, gets its bert. back). The alignment heads load as
    they are; used only if stage-2 training goes on (UTA), where ours normalize with LayerNorm eps
    1e-6 and then L2 (official stage 2: eps 1e-5, the L2 norm in the loss): a 1e-5 difference."""
    out, unused = {}, []
    for k, v in sd.items():
        if k.startswith('vision_encoder.pool_norm.'):
            out[k.removeprefix('vision_encoder.')] = v
        elif k.startswith('vision_encoder.'):
            out['vision_encoder.' + k.removeprefix('vision_encoder.').removeprefix('encoder.')] = v
        elif k.startswith('text_encoder.') and not k.startswith(('text_encoder.bert.',
                                                                 'text_encoder.cls.')):
            out['text_encoder.bert.' + k.removeprefix('text_encoder.')] = v
        elif k.startswith(('text_encoder.', 'vision_proj.', 'text_proj.', 'itm_head.', 'temp')):
            out[k] = v
        else:  # clip_teacher.*: the frozen CLIP of stage 2, saved with it, not needed here
            unused.append(k)
    return out, unused

def head_rows(spec, num_classes):
    """HEAD_ROWS -> the rows of INIT's head that become the new head, one per class (None: a new
    head). 'names:A,B': class i of list B is row A.index(B[i]); a class of B missing from A is an
    error that names it."""
    if spec is None:
        return None
    if spec == 'first':
        return list(range(num_classes))
    if spec.startswith('names:'):
        files = spec[len('names:'):].split(',')
        lists = [[n.strip() for n in read_text(f, 'HEAD_ROWS file').splitlines() if n.strip()]
                 for f in files]
        if len(lists) != 2:
            fail(f"HEAD_ROWS={spec!r}: 'names:' takes two files, K710's class names and this "
                 "dataset's")
        missing = [n for n in lists[1] if n not in lists[0]]
        if missing:
            fail(f'HEAD_ROWS: {len(missing)} classes of {files[1]} are not in {files[0]}, e.g. '
                 f'{missing[0]!r}: check the spelling, or start those classes from a new head')
        rows = [lists[0].index(n) for n in lists[1]]
    elif spec.endswith('.json'):
        try:
            rows = json.loads(read_text(spec, 'HEAD_ROWS'))
        except json.JSONDecodeError as e:
            fail(f'HEAD_ROWS {spec} is not JSON ({e})')
    else:
        fail(f"HEAD_ROWS={spec!r} must be None, 'first', a .json list of rows or "
             "'names:K710_NAMES,NAMES'")
    if not isinstance(rows, list) or len(rows) != num_classes or \
            not all(isinstance(r, int) and r >= 0 for r in rows):
        fail(f'HEAD_ROWS={spec!r} must give one row number per class, NUM_CLASSES={num_classes}')
    return rows


if __name__ == '__main__':  # a module, not a script: say what it holds
    print(__doc__.strip())
