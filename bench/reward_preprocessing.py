"""How far each reward's training path (differentiable, float, shorter side + centre crop) is from its evaluation
path (the official scorer's preprocessing of the 8-bit image), on natural images of the sizes diffusion models make.

Pixels: mean and max absolute difference of the model inputs, in units of the [0, 1] pixel range (the normalisation
undone). Scores: only where you pass real checkpoints (the differences of random weights say nothing about a real
model's scores); each row then gives the mean and max |score(training) - score(evaluation)| over the images, and the
mean relative gap.

    python bench/reward_preprocessing.py                                    # pixels only, no weights needed
    python bench/reward_preprocessing.py --hps HPS_v2.1_compressed.pt --imagereward ImageReward.pt \\
        --bert-vocab bert-base-uncased/vocab.txt --pickscore PickScore_v1 --processor CLIP-ViT-H-14-laion2B-s32B-b79K
"""
from __future__ import annotations
import argparse, platform
import numpy as np, pandas as pd, torch
from PIL import Image
from sklearn.datasets import load_sample_image
from imagerefl.data import pil_to_tensor
from imagerefl.rewards import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_image_processor, clip_processor_pixels,
                               hps_eval_pixels, imagereward_eval_pixels, load_reward, normalize, resize_center_crop)

SIZES = [(224, 224), (512, 512), (1024, 1024), (320, 480), (480, 320), (768, 1024), (576, 1024)]   # (H, W)
PROMPTS = {"china.jpg": "a chinese temple among trees", "flower.jpg": "a pink flower, close-up"}

def images():
    "sklearn's two bundled photographs, each resized (Pillow, Lanczos) to every size: what a pipeline would save."
    for name in PROMPTS:
        src = Image.fromarray(load_sample_image(name))
        for h, w in SIZES: yield name, (h, w), src.resize((w, h), Image.LANCZOS)

def unnormalised(x): return x * torch.tensor(OPENAI_CLIP_STD).view(-1, 3, 1, 1) + torch.tensor(OPENAI_CLIP_MEAN).view(-1, 3, 1, 1)

def pixel_table():
    proc = clip_image_processor()
    paths = {"HPSv2/2.1 (pad vs crop)": (lambda ims: hps_eval_pixels(ims), "round"),
             "ImageReward (PIL vs float)": (lambda ims: imagereward_eval_pixels(ims), "round"),
             "PickScore / CLIP score / MPS (processor vs float)": (lambda ims: clip_processor_pixels(ims, proc), "floor")}
    rows = []
    for name, (h, w), im in images():
        x = pil_to_tensor(im)[None]
        for reward, (ev, rounding) in paths.items():
            d = (unnormalised(ev([im])) - resize_center_crop(x, 224, 224, rounding)).abs()
            rows.append(dict(reward=reward, image=name, size=f"{h}x{w}", mean_abs=float(d.mean()), max_abs=float(d.max())))
    t = pd.DataFrame(rows)
    t["shape"] = np.where(t["size"].map(lambda s: len(set(s.split("x"))) == 1), "square", "non-square")
    return t

def score_table(args):
    loaders = []
    if args.hps: loaders.append(("hps-v2.1", dict(path=args.hps)))
    if args.imagereward: loaders.append(("imagereward", dict(path=args.imagereward, tokenizer_path=args.bert_vocab)))
    if args.pickscore: loaders.append(("pickscore", dict(path=args.pickscore, processor_path=args.processor)))
    rows = []
    for name, kw in loaders:
        r = load_reward(name, device=args.device, **kw)
        for img, (h, w), im in images():
            x = pil_to_tensor(im)[None]
            with torch.no_grad():
                t, e = (float(r(x, [PROMPTS[img]], preprocessing=p)) for p in ("training", "evaluation"))
            rows.append(dict(reward=name, image=img, size=f"{h}x{w}", training=t, evaluation=e, gap=abs(t - e),
                             rel_gap=abs(t - e) / max(abs(e), 1e-12)))
    return pd.DataFrame(rows)

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hps"); ap.add_argument("--imagereward"); ap.add_argument("--bert-vocab")
    ap.add_argument("--pickscore"); ap.add_argument("--processor"); ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.device}")
    t = pixel_table()
    print("\n## Pixels: |training - evaluation| in [0, 1] units, per image size (both photographs)\n")
    print(t.pivot_table(index="size", columns="reward", values="mean_abs", sort=False).round(4).to_string())
    print("\n## Pixels, by shape: mean (max) over images and sizes\n")
    g = t.groupby(["reward", "shape"]).agg(mean_abs=("mean_abs", "mean"), max_abs=("max_abs", "max")).round(4)
    print(g.to_string())
    s = score_table(args)
    if len(s):
        print("\n## Scores (real checkpoints)\n")
        print(s.round(5).to_string(index=False))
    else: print("\n(no checkpoints given: no score table; pass --hps / --imagereward / --pickscore for one)")
