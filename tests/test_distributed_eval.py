"Distributed evaluation: two gloo processes on the CPU write the same files and numbers as one process."
import json, os, socket, subprocess, sys
from pathlib import Path
import torch, torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a cat", "a red dog", "a small house"]


def Brightness():
    "Mean brightness plus 0.01 per prompt character."
    from imagerefl.testing import Brightness as B
    return B(per_char=0.01).requires_grad_(False)


class Counting:
    def __init__(self, pipe): self.pipe, self.calls = pipe, []
    def __call__(self, **kw): self.calls.append(len(kw["prompt"])); return self.pipe(**kw)


def work(out:str, resume:bool)->tuple:
    "One evaluation (in one process, or in each process of a distributed launch); with `resume`, lose 3 images and re-run."
    from transformers import ViTConfig, ViTModel
    from imagerefl.evaluate import evaluate, Processes
    from imagerefl.metrics import DinoFeatures
    from imagerefl.testing import tiny_sd_pipeline
    threads = torch.get_num_threads(); torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            dino = DinoFeatures(ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                                   image_size=32, patch_size=8), add_pooling_layer=False))
        ref = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        smp = Counting(tiny_sd_pipeline(seed=0))
        kw = dict(images_per_prompt=3, batch_size=2, rewards=dict(bright=Brightness()), features=dict(dino=dino),
                  reference_images=ref, fid_features=dino, progress=False,
                  sampler_kwargs=dict(num_inference_steps=2, height=32, width=32, guidance_scale=3.0))
        procs = Processes()
        ev = evaluate(smp, PROMPTS, out, **kw)
        if resume:                     # images lost (e.g. a process was killed): the re-run makes exactly those
            if procs.main:
                for p in ev.images.path[[0, 5, 6]]: os.remove(os.path.join(out, p))
            procs.gather(None)         # a barrier
            ev = evaluate(smp, PROMPTS, out, **kw)
        return procs.rank, procs.world, smp.calls
    finally: torch.set_num_threads(threads)


def test_two_gloo_processes_equal_one(tmp_path):
    (tmp_path/"w.py").write_text("import sys, json\nfrom test_distributed_eval import work\n"
                                 "print('result', json.dumps(work(sys.argv[1], True)))\n")
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    # two processes with the env:// rendezvous variables that `accelerate launch` / torchrun set
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT/"tests")]), OMP_NUM_THREADS="1",
               ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    ps = [subprocess.Popen([sys.executable, str(tmp_path/"w.py"), str(tmp_path/"two")], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    assert work(str(tmp_path/"one"), False) == (0, 1, [2, 2, 2, 2, 1])          # meanwhile, one process
    outs = [p.communicate(timeout=300) for p in ps]
    for p, (o, e) in zip(ps, outs): assert p.returncode == 0, e[-3000:]
    res = [json.loads(o.split("result", 1)[1]) for o, _ in outs]
    # 9 images in batches of 2: batches 0, 2, 4 on rank 0, batches 1, 3 on rank 1; then the 3 lost ones as [0, 5], [6]
    assert res == [[0, 2, [2, 2, 1, 2]], [1, 2, [2, 2, 1]]], res
    one = sorted(p.relative_to(tmp_path/"one") for p in (tmp_path/"one").rglob("*") if p.is_file())
    two = sorted(p.relative_to(tmp_path/"two") for p in (tmp_path/"two").rglob("*") if p.is_file())
    assert one == two and len(one) == 9 + 4, (one, two)
    for f in one:                  # the same PNG bytes, the same tables to the last digit (FID/KID included), the same run.json
        assert (tmp_path/"one"/f).read_bytes() == (tmp_path/"two"/f).read_bytes(), f


def test_the_documented_cpu_rehearsal_starts_two_processes(tmp_path):
    "The README's rehearsal of a multi-process evaluation: torchrun on 2 CPU processes; the first line says how many share it."
    from imagerefl.testing import tiny_sd_pipeline
    tiny_sd_pipeline(resolution=32).save_pretrained(tmp_path/"pipe")
    (tmp_path/"p.txt").write_text("a cat\na dog\na red house\na tree\n")
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    args = ["-m", "imagerefl.cli", "evaluate", "--model", str(tmp_path/"pipe"), "--prompts", str(tmp_path/"p.txt"),
            "--images-per-prompt", "2", "--batch-size", "2", "--steps", "2", "--device", "cpu", "--out"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    two = subprocess.run(torchrun + args + [str(tmp_path/"two")], env=env, capture_output=True, text=True, timeout=300)
    one = subprocess.run([sys.executable] + args + [str(tmp_path/"one")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0 and one.returncode == 0, two.stderr[-2000:] + one.stderr[-2000:]
    assert two.stdout.splitlines()[0] == "imagerefl: 2 processes share the work" and two.stdout.count("share the work") == 1
    assert one.stdout.splitlines()[0].startswith("imagerefl: 1 process does the work")
    files = sorted(p.relative_to(tmp_path/"one") for p in (tmp_path/"one").rglob("*.png"))
    # 8 images in 4 batches of 2: the first process made every other batch, half the images (its bar counts its own)
    assert "images: 100%" in two.stderr and "| 4/4 [" in two.stderr and "| 8/8 [" in one.stderr and "| 8/8 [" not in two.stderr
    assert len(files) == 8 and files == sorted(p.relative_to(tmp_path/"two") for p in (tmp_path/"two").rglob("*.png"))
    for f in files: assert (tmp_path/"one"/f).read_bytes() == (tmp_path/"two"/f).read_bytes(), f
