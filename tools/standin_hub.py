#!/usr/bin/env python3
"""A stand-in Hugging Face hub: tiny random-weight models and small datasets under the real repository ids, written into
a Hugging Face cache (`HF_HOME`) in the layout a first online download leaves, so that the paper's commands run
exactly as the README, the configs and the notebooks write them, on a CPU, with no network.

Every hub repository a shipped config, notebook or the README names has a stand-in here (`REPOS`): the pipelines
(SD1.5, SDXL, PixArt-α, SD3, the authors' released combined model), the rewards (HPSv2/2.1, ImageReward with its BERT
vocabulary, PickScore with its processor, CLIP), DINO, and the datasets (COCO captions, HPDv2's prompts). Each is
written as `hub/models--org--name/` (or `datasets--`): `blobs/` (the files, named by their SHA-256),
`snapshots/<commit>/` (relative links into `blobs/`), `refs/main`, the tree listing huggingface_hub caches
(`trees/<commit>.json`: the *whole* repository, so files a download skipped, such as SD1.5's `v1-5-pruned*.ckpt` or
its `safety_checker/`, are listed but absent, as in a real cache) and `.no_exist/` markers for files the libraries
probe and the repository lacks. COCO is a processed `datasets` cache (`datasets/jxie___coco_captions/...`, what
`load_dataset` leaves), HPDv2 its `test.json` and `train.json`.

  python tools/standin_hub.py build DIR          # write the stand-ins into DIR (an HF_HOME); a second call reuses them
  python tools/standin_hub.py env DIR MODE       # the environment lines for MODE: offline (HF_HUB_OFFLINE=1) or
                                                 # online (HF_HUB_OFFLINE unset, every hub call refused at once)
  python tools/standin_hub.py run DIR MODE -- imagerefl train --config sd15_hps21_imagerefl --set max_steps=1
                                                 # one command in that environment (the stand-ins built first if needed)

Tests import it (`tests/test_standin_hub.py` builds the stand-ins once per session).
"""
from __future__ import annotations
import hashlib, io, json, os, shutil, socket, subprocess, sys, tempfile
from pathlib import Path

VERSION = "3"                     # bump when a stand-in changes: a cache with another stamp is rebuilt
ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------------------------
# the cache layout

def commit_of(repo_id:str)->str:
    "A fixed 40-hex commit id for a stand-in repository."
    return hashlib.sha1(f"imagerefl-standin/{VERSION}/{repo_id}".encode()).hexdigest()

def repo_folder(home:Path, repo_id:str, repo_type:str="model")->Path:
    "`HF_HOME/hub/models--org--name` (or `datasets--...`)."
    return Path(home)/"hub"/f"{repo_type}s--{repo_id.replace('/', '--')}"

def write_repo(home:Path,            # the HF_HOME
               repo_id:str,          # e.g. stable-diffusion-v1-5/stable-diffusion-v1-5
               files:dict,           # path in the repository -> bytes: what a download fetched
               absent:tuple=(),      # paths the repository has that a download does not fetch (listed, not written)
               no_exist:tuple=(),    # paths the libraries probe that the repository lacks (`.no_exist` markers)
               repo_type:str="model",
              )->Path:               # the snapshot folder
    "Write one repository into the hub cache as huggingface_hub leaves it: blobs, snapshot links, refs, tree listing."
    folder, commit = repo_folder(home, repo_id, repo_type), commit_of(repo_id)
    snap = folder/"snapshots"/commit
    listing = {}
    for rel, data in sorted(files.items()):
        sha = hashlib.sha256(data).hexdigest()
        blob = folder/"blobs"/sha
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists(): blob.write_bytes(data)
        link = snap/rel
        link.parent.mkdir(parents=True, exist_ok=True)
        try: link.symlink_to(os.path.relpath(blob, link.parent))
        except OSError: shutil.copyfile(blob, link)          # a file system without links: a copy, as huggingface_hub does
        listing[rel] = dict(size=len(data), blob_id=hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
                            lfs_sha256=sha, lfs_size=len(data))
    for rel in absent:
        fake = hashlib.sha256(f"{repo_id}/{rel}".encode()).hexdigest()
        listing.setdefault(rel, dict(size=1 << 20, blob_id=fake[:40], lfs_sha256=fake, lfs_size=1 << 20))
    for rel in no_exist:
        marker = folder/".no_exist"/commit/rel
        marker.parent.mkdir(parents=True, exist_ok=True); marker.touch()
    (folder/"refs").mkdir(parents=True, exist_ok=True)
    (folder/"refs"/"main").write_text(commit)
    (folder/"trees").mkdir(exist_ok=True)
    (folder/"trees"/f"{commit}.json").write_text(json.dumps(dict(format_version=1, files=listing), indent=1))
    return snap

def folder_files(folder:Path, prefix:str="", skip=())->dict:
    "Every file under `folder` as {prefix + relative path: bytes}."
    return {prefix + p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and not any(p.relative_to(folder).as_posix().startswith(s) for s in skip)}

def saved(obj, skip=(), **kw)->dict:
    "The files `obj.save_pretrained` writes, as {path: bytes}."
    with tempfile.TemporaryDirectory(prefix="standin-") as d:
        obj.save_pretrained(d, **kw)
        return folder_files(Path(d), skip=skip)

def edit_json(files:dict, path:str, **changes)->None:
    "Change keys of the JSON file `path` in `files`."
    d = json.loads(files[path]); d.update(changes)
    files[path] = json.dumps(d, indent=2, sort_keys=True).encode()

# ---------------------------------------------------------------------------------------------------------------
# the stand-ins, tiny versions of what each repository holds

def _variants(folders:dict)->list:
    "The weight files a diffusers repository holds beside the ones a default download fetches (fp16, .bin)."
    out = []
    for f, stem in folders.items():
        out += [f"{f}/{stem}.fp16.safetensors", f"{f}/{stem.replace('model', 'pytorch_model') if stem == 'model' else stem}.bin"]
    return out

def tiny_safety_checker():
    "A tiny `StableDiffusionSafetyChecker` (SD1.5 and the released model ship one; the released model's pipeline runs it)."
    import torch
    from transformers import CLIPConfig
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return StableDiffusionSafetyChecker(CLIPConfig(
            text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1),
            vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
                               image_size=224, patch_size=32), projection_dim=32))   # 224 px: what its feature extractor gives

def sd_feature_extractor():
    "SD1.5's `feature_extractor/` (the safety checker's CLIP image processor)."
    from transformers import CLIPImageProcessor
    return CLIPImageProcessor(crop_size={"height": 224, "width": 224}, size={"shortest_edge": 224})

def sd15_files(seed:int=0)->tuple[dict, list]:
    "SD1.5's layout: PNDM scheduler (the hub's), safety checker and feature extractor listed in model_index.json."
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from imagerefl.testing import tiny_sd_pipeline
    p = tiny_sd_pipeline(seed=seed)
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, trained_betas=None)
    pipe = StableDiffusionPipeline(vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, unet=p.unet, scheduler=sched,
                                   safety_checker=tiny_safety_checker(), feature_extractor=sd_feature_extractor(),
                                   requires_safety_checker=True)
    files = saved(pipe)
    edit_json(files, "scheduler/scheduler_config.json", clip_sample=False)     # the hub's file has it; PNDM ignores it
    folders = dict(text_encoder="model", unet="diffusion_pytorch_model", vae="diffusion_pytorch_model", safety_checker="model")
    return files, _variants(folders)

def sd15(home:Path):
    files, variants = sd15_files()
    checker = sorted(k for k in files if k.startswith("safety_checker/"))   # diffusers skips it: the project passes safety_checker=None
    write_repo(home, "stable-diffusion-v1-5/stable-diffusion-v1-5", {k: v for k, v in files.items() if k not in checker},
               absent=[*checker, *variants, "v1-5-pruned.ckpt", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.ckpt",
                       "v1-5-pruned-emaonly.safetensors", "v1-inference.yaml", "README.md", ".gitattributes",
                       "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.non_ema.bin"])

def sdxl(home:Path):
    "SDXL base 1.0's layout: Euler scheduler (the hub's), two text encoders, no safety checker."
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from imagerefl.testing import tiny_sdxl_pipeline
    p = tiny_sdxl_pipeline(seed=0)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                                   interpolation_type="linear", prediction_type="epsilon", steps_offset=1,
                                   timestep_spacing="leading", use_karras_sigmas=False)
    pipe = StableDiffusionXLPipeline(**{**p.components, "scheduler": sched}, force_zeros_for_empty_prompt=True, add_watermarker=False)
    files = saved(pipe)
    edit_json(files, "model_index.json", add_watermarker=None)
    files.update({k.replace("vae/", "vae_1_0/"): v for k, v in files.items() if k.startswith("vae/")})  # the fixed VAE: fetched too
    folders = dict(text_encoder="model", text_encoder_2="model", unet="diffusion_pytorch_model", vae="diffusion_pytorch_model")
    write_repo(home, "stabilityai/stable-diffusion-xl-base-1.0", files,
               absent=[*_variants(folders), "sd_xl_base_1.0.safetensors", "sd_xl_base_1.0_0.9vae.safetensors",
                       "sd_xl_offset_example-lora_1.0.safetensors", "README.md", ".gitattributes",
                       "vae_1_0/diffusion_pytorch_model.fp16.safetensors", "unet/openvino_model.bin",
                       "text_encoder/model.onnx", "unet/model.onnx"])

def pixart(home:Path):
    "PixArt-α 512's layout: DPM-Solver scheduler, T5 (its tokenizer files), the transformer under its legacy class name."
    from imagerefl.testing import tiny_pixart_pipeline
    files = saved(tiny_pixart_pipeline(seed=0, scheduler="dpm"))
    edit_json(files, "model_index.json", transformer=["diffusers", "Transformer2DModel"])
    edit_json(files, "transformer/config.json", _class_name="Transformer2DModel")
    write_repo(home, "PixArt-alpha/PixArt-XL-2-512x512", files,
               absent=["transformer/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
                       "text_encoder/model.fp16-00001-of-00002.safetensors", "README.md", ".gitattributes"])

def sd3(home:Path):
    "SD3 medium's layout: flow-matching Euler (shift 3), two CLIP encoders and T5."
    from imagerefl.testing import tiny_sd3_pipeline
    files = saved(tiny_sd3_pipeline(seed=0))
    write_repo(home, "stabilityai/stable-diffusion-3-medium-diffusers", files,
               absent=["sd3_medium.safetensors", "sd3_medium_incl_clips.safetensors", "sd3_medium_incl_clips_t5xxlfp8.safetensors",
                       "text_encoder_3/model.fp16-00001-of-00002.safetensors", "README.md", ".gitattributes", "LICENSE"])

def released(home:Path):
    "The authors' released `ControlGenAI/ImageReFL_HPS_SD`: SD1.5 parts, `original_unet/`, `fine_tuned_unet/`, their remote-code class."
    from imagerefl.sampling import CombinedStableDiffusionPipeline
    from imagerefl.testing import tiny_sd_pipeline
    base, tuned = tiny_sd_pipeline(seed=0), tiny_sd_pipeline(seed=1)
    pipe = CombinedStableDiffusionPipeline.from_pipelines(base, tuned.unet)
    files = saved(pipe)
    files.update({f"safety_checker/{k}": v for k, v in saved(tiny_safety_checker()).items()})
    files.update({f"feature_extractor/{k}": v for k, v in saved(sd_feature_extractor()).items()})
    edit_json(files, "model_index.json", _class_name=["combined_stable_diffusion", "CombinedStableDiffusion"],
              safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
              feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)
    files["combined_stable_diffusion.py"] = b"raise RuntimeError('the released model\\'s remote code was executed')\n"
    write_repo(home, "ControlGenAI/ImageReFL_HPS_SD", files, absent=["README.md", ".gitattributes"])

# rewards ---------------------------------------------------------------------------------------------------------

# a tiny open_clip CLIP whose sizes follow open_clip's conventions (64-channel heads), so that the HPS loader reads its
# architecture from the checkpoint as it reads ViT-H-14's
TINY_OPEN_CLIP = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=1, width=64, patch_size=8, head_width=64),
                      text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1))

def hps(home:Path):
    "`xswu/HPSv2`: HPS_v2_compressed.pt and HPS_v2.1_compressed.pt in their format ({'state_dict': {'module.*': ...}})."
    import open_clip, torch
    out = {}
    for i, name in enumerate(["HPS_v2_compressed.pt", "HPS_v2.1_compressed.pt"]):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(10 + i); m = open_clip.CLIP(**TINY_OPEN_CLIP)
        buf = io.BytesIO()
        torch.save({"state_dict": {f"module.{k}": v.half() for k, v in m.state_dict().items()}}, buf)
        out[name] = buf.getvalue()
    write_repo(home, "xswu/HPSv2", out, absent=["README.md", ".gitattributes"])

TINY_BERT_WORDS = ("a an the of and with in on at photo painting picture drawing cat dog red fox snow astronaut horse "
                   "watercolor lighthouse dawn car house tree city street man woman").split()

def imagereward(home:Path):
    "`THUDM/ImageReward` (ImageReward.pt, BLIP keys) and the `bert-base-uncased` vocab.txt its tokenizer reads."
    import torch
    from imagerefl.rewards.imagereward import ImageRewardReward
    vocab = ["[PAD]", *[f"[unused{i}]" for i in range(3)], "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_BERT_WORDS]
    arch = dict(vision=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=1, image_size=32, patch_size=8),
                text=dict(vocab_size=len(vocab) + 2, hidden_size=64, encoder_hidden_size=64, intermediate_size=96,
                          num_hidden_layers=1, num_attention_heads=1, max_position_embeddings=40))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(20); r = ImageRewardReward(arch)
    official = {}                   # ours -> the BLIP names of ImageReward.pt (the inverse of `imagereward_key`)
    for k, v in r.state_dict().items():
        if k.startswith("text."): official["blip.text_encoder." + k[5:]] = v
        elif k.startswith("mlp."): official[k] = v
        else:
            k = k[7:].replace("encoder.layers.", "blocks.").replace(".self_attn.projection.", ".attn.proj.")
            k = k.replace(".self_attn.qkv.", ".attn.qkv.").replace(".layer_norm1.", ".norm1.").replace(".layer_norm2.", ".norm2.")
            k = k.replace("post_layernorm.", "norm.").replace("embeddings.patch_embedding.", "patch_embed.proj.")
            k = k.replace("embeddings.position_embedding", "pos_embed").replace("embeddings.class_embedding", "cls_token")
            official["blip.visual_encoder." + k] = v
    buf = io.BytesIO(); torch.save(official, buf)
    write_repo(home, "THUDM/ImageReward", {"ImageReward.pt": buf.getvalue(), "med_config.json": b"{}"},
               absent=["README.md", ".gitattributes"])
    write_repo(home, "bert-base-uncased", {"vocab.txt": ("\n".join(vocab) + "\n").encode(),
               "config.json": json.dumps(dict(model_type="bert", vocab_size=len(vocab))).encode(),
               "tokenizer_config.json": json.dumps(dict(do_lower_case=True)).encode()},
               absent=["model.safetensors", "pytorch_model.bin", "tokenizer.json", "README.md", ".gitattributes"])

# files transformers asks the hub for when it loads a model and that these repositories do not have: a first online
# load leaves a `.no_exist` marker for each, and with the hub unreachable the marker is what answers at once
PROBED = ("adapter_config.json",)

def clip_files(seed:int)->dict:
    "A tiny transformers CLIP in the hub's layout: model, `preprocessor_config.json`, and the tokenizer's files (vocab and merges too)."
    import tempfile
    from transformers import CLIPImageProcessor
    from imagerefl.mini.components import clip_tokenizer, clip_tokenizer_files
    from imagerefl.testing import tiny_clip_folder
    with tempfile.TemporaryDirectory(prefix="standin-") as d:
        files = {k: v for k, v in folder_files(tiny_clip_folder(Path(d)/"m", seed=seed)).items() if k in ("config.json", "model.safetensors")}
        t = Path(d)/"t"
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(t)
        clip_tokenizer().save_pretrained(t); clip_tokenizer_files(t)
        (t/"special_tokens_map.json").write_text(json.dumps(dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                                                 unk_token="<|endoftext|>", pad_token="<|endoftext|>")))
        files.update(folder_files(t))
    return files

def clip_repo(home:Path, repo_id:str, seed:int, processor_only:bool=False):
    "A transformers CLIP repository (model, processor, tokenizer), tiny."
    files = clip_files(seed)
    if processor_only:              # LAION's ViT-H-14: what PickScore and MPS read from it is its processor
        files = {k: v for k, v in files.items() if k != "model.safetensors"}
    write_repo(home, repo_id, files, absent=["pytorch_model.bin", "README.md", ".gitattributes", "open_clip_pytorch_model.bin",
                                             "tf_model.h5", "flax_model.msgpack"], no_exist=PROBED)

def pickscore(home:Path):
    "`yuvalkirstain/PickScore_v1` (a CLIPModel, no processor: it reads LAION's) and `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`."
    files = {k: v for k, v in clip_files(31).items() if k in ("config.json", "model.safetensors")}
    write_repo(home, "yuvalkirstain/PickScore_v1", files, absent=["README.md", ".gitattributes", "pytorch_model.bin"],
               no_exist=[*PROBED, "preprocessor_config.json", "processor_config.json"])
    clip_repo(home, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", 32, processor_only=True)

def dino(home:Path):
    "`facebook/dino-vits16`: a transformers ViT (CLS features), tiny."
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(40)
        m = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
                               image_size=32, patch_size=8))
    files = saved(m)
    files.update(saved(ViTImageProcessor(size={"height": 224, "width": 224})))
    write_repo(home, "facebook/dino-vits16", files, absent=["pytorch_model.bin", "README.md", ".gitattributes"], no_exist=PROBED)

# datasets --------------------------------------------------------------------------------------------------------

PROMPTS = ["a red fox in the snow", "a watercolor painting of a lighthouse at dawn", "a photo of an astronaut riding a horse",
           "a cat on a house", "an oil painting of a city street", "a dog in a car", "a tree at dawn", "a man and a woman"]

def hpdv2(home:Path):
    "`ymhao/HPDv2`: a loading-script dataset; its prompts are in test.json and train.json (lists of objects with `prompt`)."
    test = [dict(prompt=p, image_path=[f"{i:05d}_{j}.jpg" for j in range(2)], rank=[1, 2]) for i, p in enumerate(PROMPTS)]
    train = [dict(prompt=p, image_path=[f"t{i:05d}_{j}.jpg" for j in range(2)], human_preference=[1, 0]) for i, p in enumerate(PROMPTS[::-1])]
    write_repo(home, "ymhao/HPDv2", {"test.json": json.dumps(test).encode(), "train.json": json.dumps(train).encode()},
               absent=["HPDv2.py", "README.md", "test.tar.gz", "train.tar.gz", ".gitattributes"], repo_type="dataset")

def coco(home:Path):
    "`jxie/coco_captions` as `datasets.load_dataset` leaves it: its README in the hub cache, the processed splits in the datasets cache."
    import datasets, numpy as np
    from datasets.packaged_modules.parquet.parquet import Parquet
    from datasets.data_files import DataFilesDict
    from PIL import Image
    rng = np.random.default_rng(50)
    feats = datasets.Features({"image": datasets.Image(), "filepath": datasets.Value("string"), "sentids": datasets.Value("int64"),
                               "filename": datasets.Value("string"), "imgid": datasets.Value("int64"), "split": datasets.Value("string"),
                               "sentences": {"tokens": datasets.Sequence(datasets.Value("string")), "raw": datasets.Value("string"),
                                             "imgid": datasets.Value("int64"), "sentid": datasets.Value("int64")},
                               "cocoid": datasets.Value("int64"), "caption": datasets.Value("string")})
    def jpeg(i):
        b = io.BytesIO(); Image.fromarray(rng.integers(0, 256, (48 + 8 * (i % 3), 64, 3), dtype=np.uint8)).save(b, "JPEG"); return b.getvalue()
    with tempfile.TemporaryDirectory(prefix="standin-") as d:
        files = {}
        for split, n in [("train", 16), ("validation", 4), ("test", 8)]:
            caps = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
            rows = dict(image=[{"bytes": jpeg(i), "path": None} for i in range(n)], filepath=["val2014"] * n, sentids=list(range(n)),
                        filename=[f"COCO_{i:012d}.jpg" for i in range(n)], imgid=list(range(n)), split=[split] * n,
                        sentences=[dict(tokens=c.split(), raw=c, imgid=i, sentid=i) for i, c in enumerate(caps)],
                        cocoid=list(range(n)), caption=caps)
            p = Path(d)/f"{split}-00000-of-00001.parquet"
            datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(p)); files[split] = [str(p)]
        commit = commit_of("jxie/coco_captions")
        b = Parquet(cache_dir=str(Path(d)/"build"), dataset_name="coco_captions", config_name="default", hash=commit,
                    data_files=DataFilesDict.from_patterns(files, base_path=d))
        b.download_and_prepare()
        dst = Path(home)/"datasets"/"jxie___coco_captions"/"default"/"0.0.0"/commit
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(b.cache_dir, dst)
        for lock in dst.parent.parent.parent.rglob("*.lock"): lock.unlink()
    write_repo(home, "jxie/coco_captions", {"README.md": b"---\nconfigs:\n- config_name: default\n---\n# COCO captions (stand-in)\n"},
               absent=["data/train-00000-of-00001.parquet", "data/validation-00000-of-00001.parquet",
                       "data/test-00000-of-00001.parquet", ".gitattributes"], no_exist=["coco_captions.py", ".huggingface.yaml"],
               repo_type="dataset")

REPOS = {                           # hub id -> builder; the ids the shipped configs, notebooks and README name
    "stable-diffusion-v1-5/stable-diffusion-v1-5": sd15,
    "stabilityai/stable-diffusion-xl-base-1.0": sdxl,
    "PixArt-alpha/PixArt-XL-2-512x512": pixart,
    "stabilityai/stable-diffusion-3-medium-diffusers": sd3,
    "ControlGenAI/ImageReFL_HPS_SD": released,
    "xswu/HPSv2": hps,
    "THUDM/ImageReward": imagereward,         # with bert-base-uncased
    "yuvalkirstain/PickScore_v1": pickscore,  # with laion/CLIP-ViT-H-14-laion2B-s32B-b79K
    "openai/clip-vit-base-patch32": lambda home: clip_repo(home, "openai/clip-vit-base-patch32", 30),
    "facebook/dino-vits16": dino,
    "ymhao/HPDv2": hpdv2,
    "jxie/coco_captions": coco,
}

def build(home:str|Path,            # the HF_HOME to fill (created)
          force:bool=False,         # rebuild even if a complete build of this version is there
         )->Path:
    "Write every stand-in into `home` once (a stamp file marks a complete build; a lock lets parallel callers share it)."
    import fcntl
    home = Path(home); stamp = home/"standin.json"
    home.parent.mkdir(parents=True, exist_ok=True)
    with open(home.parent/f".{home.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)                  # another process building the same folder: wait for it
        if not force and stamp.exists() and json.loads(stamp.read_text()).get("version") == VERSION: return home
        if home.exists(): shutil.rmtree(home)
        home.mkdir(parents=True)
        import torch, datasets
        from imagerefl.core import quiet_loading
        quiet_loading(); datasets.disable_progress_bars()
        with torch.random.fork_rng(devices=[]):
            for build_one in REPOS.values(): build_one(home)
        stamp.write_text(json.dumps(dict(version=VERSION, repos=sorted(REPOS))))
    return home

# ---------------------------------------------------------------------------------------------------------------
# running against it

def closed_port()->int:
    "A local TCP port nothing listens on (connections to it are refused at once)."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]      # released on close: nothing listens there

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE")

def environment(home:str|Path, mode:str, base:dict|None=None)->dict:
    """The environment of a command against the stand-ins in `home`.
    offline: HF_HUB_OFFLINE=1 (and the libraries' own switches), as on a machine told it has no network.
    online: no offline switch at all and the hub endpoint a closed local port, so every call to the hub is refused at
    once and each library falls back to the cache on its own. `datasets` alone keeps its offline switch: on a refused
    connection it retries each file it probes for about 23 s before it reads its cache (its own behaviour)."""
    assert mode in ("offline", "online"), mode
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in OFFLINE_VARS and not k.startswith("HF_")}
    env.update(HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false")
    if mode == "offline": env.update({k: "1" for k in OFFLINE_VARS})
    else: env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_DATASETS_OFFLINE="1")
    return env

def _in_process_engine()->str:
    "papermill's engine that runs each notebook in a fresh IPython shell of this process (`paper_figures/make.py`'s)."
    import importlib.util
    spec = importlib.util.spec_from_file_location("imagerefl_make", ROOT/"paper_figures"/"make.py")
    make = importlib.util.module_from_spec(spec); spec.loader.exec_module(make)
    return make.in_process_engine()

def execute(commands:list[str], # command lines: `imagerefl ...`, `papermill ...`, `python: <code>` or `cd DIR`
            log_dir:Path|None=None, # each command's output goes to log_dir/<n>.log
            in_process:bool=True,   # papermill runs each notebook in this process (a fresh IPython shell), not a kernel
           )->list[dict]:           # per command: the command, its exit status, seconds
    """Run command lines in this process, one after the other, as a user types them: `imagerefl` through its entry
    point, `papermill` through its command line, Python snippets with `exec`. This process's environment is the one
    the commands see, so start it with `environment(home, mode)`. Starting a kernel and importing torch and diffusers
    costs 10-15 s per notebook, so by default the notebooks run in this process, each in its own IPython shell."""
    import contextlib, logging, shlex, time, traceback
    class Retries(logging.Handler):              # huggingface_hub retries a refused call only when the cache lacks the file
        def emit(self, record):
            if "Retrying in" in record.getMessage(): self.count += 1
    retries = Retries(); retries.count = 0
    logging.getLogger("huggingface_hub").addHandler(retries)
    out = []
    for n, cmd in enumerate(commands):
        log = io.StringIO(); t0 = time.time(); retries.count = 0
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                if cmd.startswith("cd "): os.chdir(cmd[3:].strip()); rc = 0
                elif cmd.startswith("python:"):
                    exec(compile(cmd[len("python:"):], f"<snippet {n}>", "exec"), {"__name__": "__snippet__"}); rc = 0
                else:
                    argv = shlex.split(cmd)
                    if "accelerate.state" in sys.modules:       # a command starts with accelerate's state as a new process would
                        sys.modules["accelerate.state"].AcceleratorState._reset_state()
                    if argv[0] == "imagerefl":
                        from imagerefl.cli import main
                        rc = main(argv[1:])
                    elif argv[0] == "papermill":
                        from papermill.cli import papermill as papermill_cli
                        if in_process: argv += ["--engine", _in_process_engine()]
                        papermill_cli.main(args=argv[1:], standalone_mode=False); rc = 0
                    else: raise ValueError(f"cannot run {argv[0]!r} here")
            except SystemExit as e: rc = e.code if isinstance(e.code, int) else 1
            except BaseException: traceback.print_exc(); rc = 1
        out.append(dict(command=cmd, returncode=rc, seconds=round(time.time() - t0, 1), hub_retries=retries.count))
        if log_dir is not None: Path(log_dir).mkdir(parents=True, exist_ok=True); (Path(log_dir)/f"{n:02d}.log").write_text(log.getvalue())
        print(f"[{rc}] {time.time() - t0:5.1f} s  {cmd[:150]}", file=sys.__stdout__, flush=True)
    return out

if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) >= 2 and args[0] == "build":
        print(build(args[1], force="--force" in args))
    elif len(args) == 3 and args[0] == "env":
        for k, v in sorted(environment(args[1], args[2]).items()):
            if k.startswith(("HF_", "TRANSFORMERS_", "DIFFUSERS_")): print(f"{k}={v}")
    elif len(args) == 3 and args[0] == "execute":           # execute COMMANDS.json RESULTS.json (started in the environment)
        res = execute(json.loads(Path(args[1]).read_text()), Path(args[2]).with_suffix(".logs"))
        Path(args[2]).write_text(json.dumps(res, indent=1))
    elif len(args) >= 4 and args[0] == "run" and "--" in args:
        home, mode, cmd = args[1], args[2], args[args.index("--") + 1:]
        build(home)
        sys.exit(subprocess.run(cmd, env=environment(home, mode)).returncode)
    else: sys.exit(__doc__)
