"""
Evaluation: the paper's downstream protocols, features for your own videos, and a picture of the
semantic mask.

    retrieval   zero-shot video-text retrieval, official protocol
                (multi_modality/tasks/retrieval_utils.py): a stage-2 model (ours, or an official
                stage-2 .pth with its BERT), 4 middle frames, VTC scores (mean over frames of the
                per-frame cosine), then VTM re-ranking of the top K_TEST in both directions: t2v and
                v2t (the official logs' img_r* and txt_r*).
    classify    action recognition: k-NN and a linear probe on frozen features (stage 1 / 2, or a
                CLIP --teacher), or a fine-tuned classifier's own head. Multi-view test: clips x
                crops, softmax averaged, top-1 / top-5 (single_modality/engines/
                engine_for_finetuning.py).
    features    pooled and per-frame features of your own videos -> one .pt file; with a stage-2
                model also their VTC embeddings, and those of --text captions.
    show-mask   one PNG: the frames, the teacher's CLS attention, and the tokens the semantic mask
                keeps.
Multiple choice and open-ended QA are `python -m tasks.video_qa mc / qa`, AVA frame-mAP is
`python -m tasks.ava map`.

Commands (any checkpoint of this repo, or an official UMT .pth; hf://OWNER/REPO/FILE fetches one
once, e.g. from the Hugging Face repo OpenGVLab/UMT):
    python evaluate.py retrieval --ckpt out/stage2/last.pt --ann msrvtt_test1k.json --root videos/
    torchrun --standalone --nproc_per_node=8 evaluate.py retrieval ...   # each GPU takes a share
    python evaluate.py classify --ckpt out/stage1/last.pt --train k400_train.csv \\
        --val k400_val.csv --root k400/
    python evaluate.py features --ckpt out/stage2/last.pt a.mp4 b.mp4 --text 'a dog' --out f.pt
    python evaluate.py show-mask video.mp4 --out mask.png      # CLIP ViT-B/16 'openai' teacher
An official stage-2 checkpoint carries no vocabulary: --vocab (default bert-base-uncased's
vocab.txt, fetched once; pass a local copy offline).
Tiny CPU demo (after train_stage1.py's demo run):
    python evaluate.py classify --ckpt out/demo_stage1/last.pt --train demo_data/train_color.csv \\
        --val demo_data/test_color.csv --root demo_data --clips 1 --crops 1   # colour: k-NN, probe
"""
import argparse
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import demo
import training
from data import (BAD_ERRORS, VideoClassification, VideoText, augment, normalize,
                  read_annotations, read_frames, read_list, sample_indices)
from masking import semantic_mask
from teacher import CLIPTeacher, build_clip
from util import checkpoints
from util.bert import VOCAB
from util.configurator import fail, short_errors, user_input
from util.evaluation import (BATCH, K_TEST, MAX_TEXT_LEN, WORKERS, evaluate_retrieval, finish,
                             head_accuracy, multiview_average, new_output, per_view, topk_accuracy)

RET_FRAMES = 4        # frames per video for retrieval, middle of 4 segments (official zero-shot)
# The official zero-shot retrieval configs (exp/zero_shot/ret_*/{b16,l16}.py): caption tokens
# (B/16, L/16), a video's captions joined into one paragraph, seconds of video read (DiDeMo: the
# first 30). The text side's positions cap the tokens: CLIP's 77 cut anet's and L/16 lsmdc's;
# BERT's 512 (the official text side) cut nothing.
PROTOCOLS = {
    'msrvtt': dict(max_len=(32, 32), paragraph=False, seconds=None),
    'msvd': dict(max_len=(64, 64), paragraph=False, seconds=None),
    'lsmdc': dict(max_len=(64, 96), paragraph=False, seconds=None),
    'didemo': dict(max_len=(64, 64), paragraph=True, seconds=30),
    'anet': dict(max_len=(150, 150), paragraph=True, seconds=None),
}
KNN_K = 20            # neighbours voting in k-NN classification (DINO, Caron et al. 2021)
KNN_TEMP = 0.07       # a neighbour's vote weighs exp(cos / KNN_TEMP) (DINO)
PROBE_EPOCHS = 30     # linear probe: passes over the (pre-computed) training features
PROBE_LR = 1e-2       # AdamW peak lr of the probe, cosine-decayed to 0 (features are standardized)
PROBE_WD = 1e-4       # AdamW weight decay of the probe
TEST_CLIPS = 4        # temporal clips per test video (official Kinetics: 4)
TEST_CROPS = 3        # spatial crops per clip: 3 = left/center/right, 1 = center (official: 3)

def protocol_text_len(protocol, width):
    """Caption tokens of a retrieval protocol for a vision encoder of this width (1024 = L/16, else
    B/16)."""
    return PROTOCOLS[protocol]['max_len'][width >= 1024]

# ----------------------------------------------------------------------------------------------
# k-NN and the linear probe (the retrieval protocol and the metrics are in util/evaluation.py)

def knn_predict(train_feats, train_labels, feats, num_classes, k=KNN_K, temp=KNN_TEMP, chunk=1024):
    """Weighted k-NN as in DINO: cosine similarity to every training feature, the k most similar
    vote for their class with weight exp(cos / temp). feats [Q, D] -> vote shares [Q, C] (rows sum
    to 1)."""
    train = F.normalize(train_feats.float(), dim=-1)                       # [Ntrain, D]
    out = []
    for q in F.normalize(feats.float(), dim=-1).split(chunk):              # chunks of [<=chunk, D]
        sim, idx = (q @ train.t()).topk(min(k, len(train)), dim=1)         # [Q, k]
        votes = torch.zeros(len(q), num_classes, device=q.device)
        votes.scatter_add_(1, train_labels.to(q.device)[idx], (sim / temp).exp())
        out.append(votes / votes.sum(1, keepdim=True))
    return torch.cat(out)

def train_linear_probe(feats, labels, num_classes, epochs=PROBE_EPOCHS, lr=PROBE_LR,
                       weight_decay=PROBE_WD, batch=256, seed=0):
    """A linear classifier on frozen features [N, D] -> nn.Linear(D, C) that takes the raw features.
    Features are standardized first (MAE's linear probe puts a BatchNorm without affine before the
    layer); the standardization is folded into the returned layer: W' = W / std, b' = b - W' @ mean.
    """
    feats, labels = feats.float(), labels.to(feats.device)
    mean, std = feats.mean(0), feats.std(0) + 1e-6
    x = (feats - mean) / std                                                 # [N, D]
    with torch.random.fork_rng(devices=[]):  # seeded: the same probe on every rank and in every run
        torch.manual_seed(seed)
        probe = nn.Linear(x.shape[1], num_classes).to(x.device)
        g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = -(-len(x) // batch)
    for epoch in range(epochs):
        for i, idx in enumerate(torch.randperm(len(x), generator=g).split(batch)):
            step = epoch * steps_per_epoch + i
            opt.param_groups[0]['lr'] = training.lr_at(step, epochs * steps_per_epoch, 0, lr, 0.0)
            loss = F.cross_entropy(probe(x[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        probe.weight.div_(std)
        probe.bias.sub_(probe.weight @ mean)
    return probe.requires_grad_(False)

# ----------------------------------------------------------------------------------------------
# Loading the model a command needs, and features from any model

def load_model(path, command, num_frames=None, img_size=None, vocab=None):
    """The model a command needs, through util/checkpoints.py -> (model in eval mode, kind,
    VideoViTConfig of its video encoder). retrieval, and features of a stage-2 checkpoint: the
    stage-2 UMT ('umt'; vocab: an official file's vocabulary, None for video features only);
    otherwise the video encoder ('vit'), or a fine-tuned classifier with its own head and, for an
    official one, its own stored position table ('classifier')."""
    w = checkpoints.read(training.resolve(path, '--ckpt'), path)  # hf://...: fetched once
    overrides = {k: v for k, v in (('num_frames', num_frames), ('img_size', img_size)) if v}
    if command == 'retrieval' or (command == 'features' and w.kind == 'umt'):
        net, report = checkpoints.load_stage2(w, vocab=vocab, **overrides)
        kind, encoder = 'umt', net.vision_encoder
    elif w.kind == 'classifier':
        net, report = checkpoints.load_classifier(w, stored_table=True, **overrides)
        kind, encoder = 'classifier', net.backbone
    else:
        net, report = checkpoints.load_vit(w, **overrides)
        kind, encoder = 'vit', net
    print('\n'.join(report))
    return net.eval(), kind, encoder.config

def pooled_features(net, kind, config, video):
    """video [B, 3, T, H, W] -> (pooled [B, D], per_frame [B, t, D]): means of the encoder's output
    tokens over the whole clip and over each time step (t = T / tubelet). The student has no CLS
    token, so pooling is a mean (the official models pool by a mean too). A fine-tuned classifier
    applies its fc_norm, i.e. these are the inputs of its head."""
    if kind == 'umt':
        x = net.encode_video(video)[0]                                  # [B, N, D], final-normed
    elif kind == 'teacher':
        x = net(video)[0][-1]                                           # [B, N, C], last block
    elif kind == 'classifier':
        x = net.backbone(video)[0]                                      # [B, N, D], no final norm
    else:
        x = net(video)[0]                                               # [B, N, D], final-normed
    B, N, D = x.shape
    t = video.shape[2] // config.tubelet_size
    per_frame = x.view(B, t, N // t, D).mean(2)                         # [B, t, D], (t, h, w) order
    pooled = x.mean(1)                                                  # [B, D]
    if kind == 'classifier':
        pooled, per_frame = net.fc_norm(pooled), net.fc_norm(per_frame)
    return pooled.float(), per_frame.float()

def evaluate_classification(net, kind, config, args, device):
    """k-NN + linear probe on frozen pooled features, or a classifier's own head, on the multi-view
    test set."""
    T, S = args.frames or config.num_frames, args.size or config.img_size
    test = VideoClassification(args.val, args.root, T, S, mode='test', num_clips=args.clips,
                               num_crops=args.crops)
    if kind == 'classifier':  # fine-tuned: its own head, softmax averaged over the views
        return {'head': head_accuracy(net, test, device, args.batch, args.workers)}
    train = VideoClassification(args.train, args.root, T, S, mode='val')   # 1 clip, center crop
    return probe_accuracy(net, kind, config, train, test, device, args.batch, args.workers)

def probe_accuracy(net, kind, config, train, test, device, batch=BATCH, workers=WORKERS):
    """k-NN and linear-probe top-1 / top-5 of frozen pooled features: learned on `train` (1 view per
    video), tested on every view of `test` (k-NN vote shares and probe softmax averaged over a
    video's views)."""
    num_classes = max(train.num_classes, test.num_classes)
    feats = lambda video: pooled_features(net, kind, config, video)[0]
    train_x, train_y = per_view(train, feats, device, batch, workers, 'train features')  # [N, 1, D]
    test_x, test_y = per_view(test, feats, device, batch, workers, 'test features')     # [N, V, D]
    votes = knn_predict(train_x[:, 0], train_y, test_x.flatten(0, 1), num_classes)     # [N*V, C]
    probe = train_linear_probe(train_x[:, 0], train_y, num_classes)
    return {'knn': topk_accuracy(votes.unflatten(0, test_x.shape[:2]).mean(1), test_y),  # averaged
            'linear': topk_accuracy(multiview_average(probe(test_x)), test_y),
            'chance_top1': 100.0 / num_classes}

def extract_features(net, kind, config, paths, device, frames=None, size=None, texts=()):
    """Your own videos -> {'paths', 'pooled' [N, D], 'per_frame' [N, t, D]}, 'skipped' {path:
    reason}, and for a stage-2 model 'embed' [N, t, E] (per-frame unit vectors in the VTC space)
    and, for texts, 'texts' and 'text_embed' [M, E] (the captions' unit vectors there: cosine with
    'embed', averaged over frames, is the retrieval score). 'paths' lists the videos the rows belong
    to: an unreadable one is skipped, not fatal. Stage 2 reads its frames as its retrieval eval
    (middle frames, whole frame resized); the others as the classification test (center)."""
    T, S = frames or config.num_frames, size or config.img_size
    out, kept, skipped = {'pooled': [], 'per_frame': [], 'embed': []}, [], {}
    for path in tqdm(paths, desc='features'):
        try:
            clip = read_frames(path, lambda n: sample_indices(n, T, 'middle'))  # uint8 [T, H, W, 3]
        except BAD_ERRORS as e:  # missing, empty, truncated, not a video
            skipped[path] = f'{type(e).__name__}: {e}'
            continue
        crop = 'squash' if kind == 'umt' else 'center'
        video = normalize(augment(clip, S, crop)[0][None].to(device))  # [1, 3, T, S, S]
        with torch.no_grad():
            for key, value in zip(out, pooled_features(net, kind, config, video)):
                out[key].append(value.cpu())
            if kind == 'umt':
                embed = net.encode_video(video, per_frame=True)[2]            # [1, t, E]
                out['embed'].append(F.normalize(embed.float(), dim=-1).cpu())
        kept.append(path)
    for path, reason in skipped.items():
        print(f'skipped {path}: {reason}')
    if not kept:
        fail(f'none of the {len(paths)} videos could be read')
    result = {'paths': kept, 'skipped': skipped, **{k: torch.cat(v) for k, v in out.items() if v}}
    if texts:
        ids, mask = net.tokenizer(list(texts), min(MAX_TEXT_LEN, net.text_encoder.max_len))
        with torch.no_grad():
            embed = net.encode_text(ids.to(device), mask.to(device))[1]          # [M, E]
        result.update(texts=list(texts), text_embed=F.normalize(embed.float(), dim=-1).cpu())
    return result

def mask_picture(video, attn, keep):
    """video [3, T, S, S] uint8, attn [T, n] teacher CLS attention, keep [T*n_keep] -> uint8
    [3*S, T*S, 3]: row 1 the frames, row 2 the attention (per-frame max = red) over them, row 3
    hidden tokens darkened."""
    _, T, S, _ = video.shape
    g = int(round(attn.shape[1] ** 0.5))                               # h = w token grid
    # [T, g, g] -> [T, S, S]
    up = lambda m: m.view(T, g, g).repeat_interleave(S // g, 1).repeat_interleave(S // g, 2)
    rgb = video.float().permute(1, 2, 3, 0) / 255                      # [T, S, S, 3]
    heat = up(attn / attn.amax(1, keepdim=True))                       # [T, S, S], 1 = the most
    # blue to red, [T, S, S, 3]
    heat = torch.stack([(1.5 - (4 * heat - c).abs()).clamp(0, 1) for c in (3, 2, 1)], -1)
    kept = torch.zeros(T * g * g)
    kept[keep] = 1.0
    # 3 x [T, S, S, 3]
    rows = [rgb, 0.4 * rgb + 0.6 * heat, rgb * (0.15 + 0.85 * up(kept))[..., None]]
    # [3, T, S, S, 3] -> [3S, T*S, 3]
    grid = torch.stack(rows).permute(0, 2, 1, 3, 4).reshape(3 * S, T * S, 3)
    return (grid * 255).round().byte().numpy()

def teacher_model(name, weights):
    """A CLIP teacher by open_clip name and weights, or 'tiny' (demo.tiny_clip: the demo's)."""
    with user_input():
        clip = demo.tiny_clip(weights) if name == 'tiny' else build_clip(name, weights)
        return CLIPTeacher(clip, align_layers=1)

def show_mask(video_path, out, teacher_name, pretrained, frames, mask_ratio, seed=0):
    """Teacher attention and the semantic mask (masking.semantic_mask, as in training) for one video
    -> PNG."""
    from PIL import Image
    try:
        clip = read_frames(video_path, lambda n: sample_indices(n, frames, 'middle'))
    except BAD_ERRORS as e:
        fail(f'{video_path} cannot be read as a video ({type(e).__name__}: {e})')
    teacher = teacher_model(teacher_name, pretrained)
    video = augment(clip, teacher.image_size, 'center')[0][None]        # [1, 3, T, S, S] uint8
    _, attn = teacher.encode(normalize(video))                          # [1, T, h*w]
    generator = torch.Generator().manual_seed(seed)
    keep = semantic_mask(attn, mask_ratio, generator=generator)         # [1, T * kept per frame]
    picture = mask_picture(video[0], attn[0], keep[0])                   # [3S, T*S, 3]
    kept = f'kept tokens: {keep.shape[1] // frames} of {attn.shape[2]} per frame, ratio ' \
        f'{mask_ratio}'
    labels = ['frames', 'teacher CLS attention: blue low, red high', kept]
    Image.fromarray(label_rows(picture, labels)).save(out)
    print(f"wrote {out}: {frames} frames of {video_path}; rows: the frames, the teacher's CLS "
          'attention (blue = low, red = high), the tokens the semantic mask keeps '
          f'({kept.split(": ")[1]}; hidden ones darkened)')

def label_rows(picture, labels, height=14):
    """uint8 [rows x S, W, 3] -> the same with a white caption strip above each of the len(labels)
    rows."""
    from PIL import Image, ImageDraw
    S, W = picture.shape[0] // len(labels), picture.shape[1]
    canvas = Image.new('RGB', (W, len(labels) * (S + height)), 'white')
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(labels):
        draw.text((2, i * (S + height) + 1), text, fill='black')
        canvas.paste(Image.fromarray(picture[i * S:(i + 1) * S]), (0, i * (S + height) + height))
    return np.asarray(canvas)

# ----------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--ckpt', default=None, help='checkpoint of this repo or an official UMT '
                        '.pth; hf://OWNER/REPO/FILE is fetched once')
    common.add_argument('--root', default=None, help='folder the paths of the list start from')
    common.add_argument('--frames', type=int, default=None, help='frames per clip (default: the '
                        'model config)')
    common.add_argument('--size', type=int, default=None, help='resolution (default: the model)')
    common.add_argument('--batch', type=int, default=BATCH)
    common.add_argument('--workers', type=int, default=WORKERS)
    common.add_argument('--device', default='auto', help="'auto' (a GPU if there is one) or 'cpu'")
    common.add_argument('--out', default=None, help='write the results here (JSON)')
    vocab = argparse.ArgumentParser(add_help=False)
    vocab.add_argument('--vocab', default=None, help="an official checkpoint's WordPiece vocab.txt "
                       f'(default: {VOCAB})')
    r = sub.add_parser('retrieval', parents=[common, vocab], help='zero-shot video-text retrieval')
    r.add_argument('--ann', required=True, help='JSON (or JSONL) list of {"video": path, '
                   '"caption": str or [str]}')
    r.add_argument('--k_test', type=int, default=K_TEST)
    r.add_argument('--protocol', choices=sorted(PROTOCOLS), default='msrvtt',
                   help='text length, paragraphs, seconds')
    r.add_argument('--max_len', type=int, default=None, help="caption tokens (default: the "
                   "protocol's)")
    c = sub.add_parser('classify', parents=[common], help='k-NN / linear probe / fine-tuned head')
    c.add_argument('--train', default=None, help='training list (path,label): k-NN memory and '
                   'probe data')
    c.add_argument('--val', required=True, help='test list (path,label)')
    c.add_argument('--clips', type=int, default=TEST_CLIPS)
    c.add_argument('--crops', type=int, default=TEST_CROPS, choices=(1, 3))
    c.add_argument('--teacher', default=None, help="instead of --ckpt: a CLIP teacher's pooled "
                   'tokens (the ceiling)')
    c.add_argument('--pretrained', default='openai', help="the teacher's weights: open_clip tag, "
                   'a local file or hf://OWNER/REPO/FILE')
    f = sub.add_parser('features', parents=[common, vocab], help='features of your own videos')
    f.add_argument('videos', nargs='+')
    f.add_argument('--text', action='append', default=[], help='a caption to embed too (stage 2; '
                   'repeat for more)')
    m = sub.add_parser('show-mask', help='PNG of the teacher attention and the semantic mask')
    m.add_argument('video')
    m.add_argument('--out', default='mask.png')
    m.add_argument('--teacher', default='ViT-B-16-quickgelu', help="open_clip model name, or "
                   "'tiny' (the demo CLIP)")
    m.add_argument('--pretrained', default='openai', help='open_clip tag, a local weights file or '
                   'hf://OWNER/REPO/FILE')
    m.add_argument('--frames', type=int, default=8)
    m.add_argument('--mask_ratio', type=float, default=0.8, help='fraction of each frame hidden '
                   '(paper: 0.8)')
    m.add_argument('--seed', type=int, default=0)
    return p.parse_args(argv)

def check_args(args):
    """Every number and output of the command line, before anything is loaded."""
    small = {f'--{k}': getattr(args, k, None) for k in ('frames', 'size', 'batch', 'clips',
                                                        'max_len')}
    for name, value in small.items():
        if value is not None and value < 1:
            fail(f'{name} {value}: pass a positive number')
    if getattr(args, 'workers', 0) < 0 or getattr(args, 'k_test', 0) < 0:
        fail('--workers and --k_test must be 0 or more')
    if not 0 < getattr(args, 'mask_ratio', 0.5) < 1:
        fail(f'--mask_ratio {args.mask_ratio} must lie strictly between 0 and 1 (the fraction of '
             'tokens hidden)')
    if args.command != 'show-mask' and not (args.ckpt or getattr(args, 'teacher', None)):
        fail(f'{args.command} needs --ckpt CHECKPOINT')
    if getattr(args, 'out', None) or args.command == 'features':
        new_output(args.out or 'features.pt')
    if args.command == 'classify' and not args.train and (args.teacher or not args.ckpt):
        fail('k-NN and the linear probe need --train (the labelled features they learn from)')

def main(argv=None):
    short_errors()
    args = parse_args(argv)
    check_args(args)
    pretrained = training.resolve(getattr(args, 'pretrained', None), '--pretrained')
    if args.command == 'show-mask':
        return show_mask(args.video, args.out, args.teacher, pretrained, args.frames,
                         args.mask_ratio, args.seed)
    with user_input():  # the files first, before any model: a typo costs seconds
        if args.command == 'retrieval':
            read_annotations(args.ann)
        for path in (getattr(args, 'train', None), getattr(args, 'val', None)):  # classify's
            if path:
                read_list(path)
    _, _, device = training.init_distributed(args.device)
    if getattr(args, 'teacher', None):  # classify the teacher's own features: what it teaches
        net, kind = teacher_model(args.teacher, pretrained), 'teacher'
        config = SimpleNamespace(num_frames=args.frames or 8, img_size=net.image_size,
                                 tubelet_size=1)
    else:  # an official stage-2 file's vocabulary is read only where text is
        text = args.command == 'retrieval' or getattr(args, 'text', None)
        vocab = (args.vocab or VOCAB) if text else None
        net, kind, config = load_model(args.ckpt, args.command, args.frames, args.size, vocab)
    net.to(device)
    if args.command == 'features':  # one process: a few videos of your own
        if args.text and kind != 'umt':
            fail(f'--text needs a stage-2 checkpoint (a text side); {args.ckpt} holds a {kind}')
        feats = extract_features(net, kind, config, args.videos, device, args.frames, args.size,
                                 args.text)
        torch.save(feats, args.out or 'features.pt')
        shapes = ', '.join(f'{k} {tuple(v.shape)}' for k, v in feats.items() if torch.is_tensor(v))
        print(f'wrote {args.out or "features.pt"}: {len(feats["paths"])} videos '
              f'({len(feats["skipped"])} skipped), {shapes}')
        return feats
    if args.command == 'retrieval':
        protocol = PROTOCOLS[args.protocol]
        data = VideoText(args.ann, args.root, num_frames=args.frames or RET_FRAMES,
                         size=args.size or config.img_size, mode='eval',
                         paragraph=protocol['paragraph'], max_seconds=protocol['seconds'])
        max_len = args.max_len or protocol_text_len(args.protocol, config.embed_dim)
        if max_len > net.text_encoder.max_len:
            print(f'captions cut at {net.text_encoder.max_len} tokens (the text side\'s positions),'
                  f' not {max_len}')
        results = evaluate_retrieval(net, data, device, args.k_test, args.batch, args.workers,
                                     max_len)
    else:
        results = evaluate_classification(net, kind, config, args, device)
    return finish(results, args.out)

if __name__ == '__main__':
    main()
