"""FSDP on the CPU, with gloo processes.

1. One optimizer step: the SD UNet sharded with torch's FSDP (FSDP2 `fully_shard` and FSDP1) over two processes, on
   half the batch each, equals the single-process step on the whole batch.
2. Sharded checkpoints (`imagerefl.checkpoint.save_sharded` / `load_sharded`, the functions the trainer calls): Adam step 1,
   save, step 2 gives W2; fresh processes that load the checkpoint and take step 2 give W2 exactly. Each process's
   file holds its shards only; a damaged shard and another number of processes are refused in one line.
3. The trainer itself, started by `accelerate launch` with the shipped `configs/accelerate/fsdp_4gpu.yaml` on two CPU
   processes: ImageReFL with validation, checkpoints, an exact resume, the export.

accelerate cannot run FSDP on the CPU: it turns FSDP on only for GPU-like distributed types, and with `cpu=True` it
silently wraps the model in DDP instead (accelerate 1.15). So 1 and 2 drive torch's FSDP directly, the layer
accelerate's FSDP plugin configures, and 3 switches a constructed `Accelerator`'s state to FSDP (two attributes: the
distributed type, and the FSDP plugin built from the config `accelerate launch` read), after which accelerate's own
FSDP2 preparation runs on the CPU. The multi-process tests are slow (`pytest -m slow`); the quick one runs 2 in one
process (a world of one).
"""
import json, os, shutil, socket, subprocess, sys, textwrap
from pathlib import Path
import pytest, torch
import torch.distributed as dist
from torch import nn
from safetensors import safe_open
from safetensors.torch import load_file
from imagerefl.core import UserError, save_safetensors
from imagerefl.runfolder import commit_checkpoint, find_checkpoint
from imagerefl.checkpoint import save_sharded, load_sharded

ROOT = Path(__file__).resolve().parents[1]
slow = pytest.mark.slow      # several gloo processes


def launch(tmp_path, script:str, *args, world=2, env=None, timeout=600):
    "Run `script` in `world` processes with the env:// rendezvous that torchrun / `accelerate launch` set up; their outputs."
    (tmp_path/"w.py").write_text(script)
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT/'tests'}", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), **(env or {}))
    ps = [subprocess.Popen([sys.executable, str(tmp_path/"w.py"), *map(str, args)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    outs = [p.communicate(timeout=timeout) for p in ps]
    for p, (o, e) in zip(ps, outs): assert p.returncode == 0, e[-3000:]
    return [o for o, _ in outs]

def accelerate_launch(tmp_path, config:Path, script:str, *args, timeout=900)->str:
    "Run `script` with `accelerate launch --config_file config` in two CPU processes; their output."
    (tmp_path/"w.py").write_text(script)
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT/'tests'}", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               ACCELERATE_USE_CPU="true")             # without it, no GPU: two unrelated one-process runs
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
                        "--mixed_precision", "no", "--main_process_port", str(port), str(tmp_path/"w.py"), *map(str, args)],
                       env=env, capture_output=True, text=True, timeout=timeout)
    errors = "\n".join(line for line in r.stderr.splitlines() if "Error" in line)     # every process's, not only the last
    assert r.returncode == 0, errors[-3000:] + "\n...\n" + r.stderr[-2000:]
    return r.stdout

# ---------------------------------------------------------------------------------------------------------------------
# 1. one step

STEP_WORKER = textwrap.dedent('''
    import os, sys, torch, torch.distributed as dist
    torch.set_num_threads(1)
    from imagerefl.testing import tiny_sd_pipeline
    mode = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 77, 32, generator=g)
    t = torch.tensor([10, 200, 500, 900])
    def loss(m, sl): return m(x[sl], t[sl], ctx[sl]).sample.pow(2).mean()
    one = tiny_sd_pipeline(resolution=32).unet                    # one process, the whole batch
    opt = torch.optim.SGD(one.parameters(), lr=0.5); loss(one, slice(0, 4)).backward(); opt.step()
    unet = tiny_sd_pipeline(resolution=32).unet
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        for b in list(unet.down_blocks) + list(unet.up_blocks): fully_shard(b)
        m = fully_shard(unet)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        m = FSDP(unet, device_id=torch.device("cpu"), use_orig_params=True)
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in m.parameters())
    opt = torch.optim.SGD(m.parameters(), lr=0.5); loss(m, slice(2 * rank, 2 * rank + 2)).backward(); opt.step()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
    full = get_model_state_dict(m, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ref = one.state_dict()
    moved = max((ref[k] - v).abs().max().item() for k, v in tiny_sd_pipeline(resolution=32).unet.state_dict().items())
    err = max((full[k] - ref[k]).abs().max().item() for k in ref) if rank == 0 else 0.0
    total = sum(p.numel() for p in one.parameters())
    print(f"{mode} rank {rank} local {local} of {total} diff {err:.3g} moved {moved:.3g}", flush=True)
    dist.destroy_process_group()
''')

@slow
@pytest.mark.parametrize("mode", ["fsdp2", "fsdp1"])
def test_fsdp_step_equals_one_process(tmp_path, mode):
    "SGD, so that the comparison is exact to float rounding (Adam's normalisation turns rounding-level gradient differences of near-zero gradients into learning-rate-size ones)."
    rows = [o.split() for o in launch(tmp_path, STEP_WORKER, mode, timeout=300)]
    for r in rows:
        local, total = int(r[4]), int(r[6])
        assert local < 0.75 * total, r                    # each process holds a shard, not the whole UNet
    assert float(rows[0][8]) < 1e-6 < float(rows[0][10]), rows[0]   # the step moved the weights, exactly as one process

# ---------------------------------------------------------------------------------------------------------------------
# 2. sharded checkpoints: these functions run in the test process (a world of one) and in the workers

def plain(kind:str, seed:int)->tuple[nn.Module, list[nn.Module]]:
    "A model (`unet`: the tiny SD UNet; `mlp`: three linear layers, the last with one output) and its blocks."
    if kind == "unet":
        from imagerefl.testing import tiny_sd_pipeline
        m = tiny_sd_pipeline(resolution=32, seed=seed).unet
        return m, list(m.down_blocks) + list(m.up_blocks)
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    with torch.no_grad():
        for p in m.parameters(): p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return m, [m[0], m[2], m[4]]

def build(kind:str, mode:str, seed:int)->nn.Module:
    "`plain(kind, seed)` with its blocks and the whole sharded with FSDP2 or FSDP1."
    m, blocks = plain(kind, seed)
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        for b in blocks: fully_shard(b)
        return fully_shard(m)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    return FSDP(m, device_id=torch.device("cpu"), use_orig_params=True)

def adam_step(m:nn.Module, opt, kind:str, step:int):
    "One Adam step on this process's batch of step `step` (seeded by step and rank)."
    g = torch.Generator().manual_seed(100 * step + dist.get_rank())
    if kind == "unet":
        x, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
        loss = m(x, torch.tensor([10, 500]), ctx).sample.pow(2).mean()
    else: loss = m(torch.randn(4, 8, generator=g)).pow(2).mean()
    loss.backward(); opt.step(); opt.zero_grad()

def whole(m:nn.Module)->dict:
    "All weights, gathered onto the main process's CPU (what the export does)."
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
    return get_model_state_dict(m, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

def first_run(kind, mode, out:Path)->dict:
    "Step 1, a sharded checkpoint written as the trainer writes it (temporary folder, barrier, commit), step 2: W2."
    m = build(kind, mode, seed=0); opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    adam_step(m, opt, kind, 1)
    root = out/"checkpoints"; tmp = root/".tmp-checkpoint-1"
    if dist.get_rank() == 0: tmp.mkdir(parents=True)
    dist.barrier(); save_sharded(m, opt, tmp); dist.barrier()
    if dist.get_rank() == 0: commit_checkpoint(tmp, root/"checkpoint-1")
    dist.barrier()
    adam_step(m, opt, kind, 2)
    return whole(m)

def resumed_run(kind, mode, out:Path)->dict:
    "Other initial weights, the checkpoint loaded, step 2: must be W2."
    m = build(kind, mode, seed=1); opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    load_sharded(m, opt, out/"checkpoints"/"checkpoint-1")
    adam_step(m, opt, kind, 2)
    return whole(m)

def test_sharded_checkpoint_in_a_world_of_one(tmp_path, monkeypatch):
    "Quick: FSDP2 on one gloo process; the resume is exact, the header records the sharding, the refusals are one line."
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        w2, again = first_run("mlp", "fsdp2", tmp_path), resumed_run("mlp", "fsdp2", tmp_path)
        fresh = whole(build("mlp", "fsdp2", seed=1))
    finally: dist.destroy_process_group()
    assert all(torch.equal(w2[k], again[k]) for k in w2) and not torch.equal(w2["0.weight"], fresh["0.weight"])
    ck = tmp_path/"checkpoints"/"checkpoint-1"
    assert sorted(p.name for p in ck.iterdir()) == ["manifest.json", "model-rank00-of-01.safetensors", "optimizer-rank00-of-01.safetensors"]
    with safe_open(str(ck/"model-rank00-of-01.safetensors"), "pt") as f: head = json.loads(f.metadata()["sharding"])
    assert head["world_size"] == 1 and head["shards"]["2.weight"] == dict(shape=[64, 64], offset=[0, 0])
    import imagerefl.checkpoint as T
    monkeypatch.setattr(T, "_rank_world", lambda: (0, 2))                # as if two processes resumed it
    with pytest.raises(UserError, match=r"holds the shards of 1 process, this run has 2: resume with 1 process$"):
        load_sharded(nn.Linear(1, 1), None, ck)
    monkeypatch.undo()
    (ck/"optimizer-rank00-of-01.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(UserError, match="optimizer-rank00-of-01.safetensors has 16 bytes"): load_sharded(nn.Linear(1, 1), None, ck)

CKPT_WORKER = textwrap.dedent('''
    import sys, torch, torch.distributed as dist
    from pathlib import Path
    torch.set_num_threads(1)
    from test_fsdp import first_run, resumed_run, save_safetensors
    kind, mode, phase, out = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    dist.init_process_group("gloo")
    w = (first_run if phase == "first" else resumed_run)(kind, mode, out)
    if dist.get_rank() == 0: save_safetensors(w, out/f"{phase}.safetensors")
    dist.destroy_process_group()
''')

@slow
@pytest.mark.parametrize("kind, mode", [("unet", "fsdp2"), ("unet", "fsdp1"), ("mlp", "fsdp2")])
def test_sharded_checkpoint_two_processes(tmp_path, kind, mode):
    "The tiny UNet under FSDP2 and FSDP1; the MLP's one-row last layer leaves process 1 an empty shard of it."
    out = tmp_path/"run"
    launch(tmp_path, CKPT_WORKER, kind, mode, "first", out)
    launch(tmp_path, CKPT_WORKER, kind, mode, "resume", out)
    w2, again = load_file(out/"first.safetensors"), load_file(out/"resume.safetensors")
    assert all(torch.equal(w2[k], again[k]) for k in w2)                         # bit-identical weights after the resume
    start = plain(kind, 0)[0].state_dict()
    assert max((w2[k] - start[k]).abs().max().item() for k in w2) > 1e-4         # the steps moved the weights
    ck, total = out/"checkpoints"/"checkpoint-1", sum(v.numel() for v in w2.values())
    for r in range(2):
        for part in ("model", "optimizer"): assert (ck/f"{part}-rank{r:02d}-of-02.safetensors").exists()
        held = load_file(ck/f"model-rank{r:02d}-of-02.safetensors")
        assert sum(v.numel() for v in held.values()) < 0.75 * total, (r, total)  # each process's file: its shards only
    if kind == "mlp": assert held["4.weight"].shape == (0, 64)
    with pytest.raises(UserError, match=r"holds the shards of 2 processes, this run has 1: resume with 2 processes$"):
        load_sharded(plain(kind, 0)[0], None, ck)                                # this test process: a world of one
    shutil.copytree(ck, ck.with_name("checkpoint-0"))                          # an older intact checkpoint
    shard = ck/"model-rank01-of-02.safetensors"; b = bytearray(shard.read_bytes()); b[-1] ^= 1; shard.write_bytes(bytes(b))
    said = []
    assert find_checkpoint(out/"checkpoints", said.append) == ck.with_name("checkpoint-0")   # the resume falls back
    assert said == [f"skipping {ck}: model-rank01-of-02.safetensors changed since it was written (checksum)"]
    with pytest.raises(UserError, match="model-rank01-of-02.safetensors changed since it was written"):
        load_sharded(plain(kind, 0)[0], None, ck)

# ---------------------------------------------------------------------------------------------------------------------
# 3. the trainer under FSDP2

TRAIN_WORKER = textwrap.dedent('''
    import sys, torch, accelerate
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    torch.set_num_threads(1)
    class FSDPOnCPU(accelerate.Accelerator):
        "accelerate builds DDP on the CPU whatever the config says: switch the state to FSDP once it is set up."
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.state.fsdp_plugin = FullyShardedDataParallelPlugin()     # from the fsdp_config that accelerate launch read
            self.state.distributed_type = DistributedType.FSDP
    accelerate.Accelerator = FSDPOnCPU
    from imagerefl.testing import tiny_sd_pipeline
    from imagerefl.diffusion import Backbone
    from imagerefl.objectives import ImageReFL, ImageReFLConfig
    from imagerefl.train import Trainer
    from imagerefl.config import load_config
    from test_train import Brightness, images_data
    out, base, over = sys.argv[1], sys.argv[2], sys.argv[3:]
    cfg = load_config(dict(out_dir=out, mixed_precision="no", log_with="none", max_steps=2, batch_size=1, gradient_accumulation_steps=2,
                           checkpoint_every=1, export=True, model=dict(scheduler="ddpm", gradient_checkpointing=True),
                           validation=dict(every=1, original_unet_steps=2, num_inference_steps=4, images_per_prompt=1, batch_size=2),
                           optimizer=dict(name="adam", lr=1e-3),
                           objective=dict(name="imagerefl", num_inference_steps=6, start_index=2, min_mid_index=2, max_mid_index=6)), over)
    bb = Backbone(tiny_sd_pipeline(resolution=32), scheduler="ddpm", num_inference_steps=6)
    tr = Trainer(cfg, bb, ImageReFL(ImageReFLConfig(num_inference_steps=6, start_index=2, min_mid_index=2, max_mid_index=6)),
                 Brightness(), images_data(), val_prompts=["a photo of thing 1", "a photo of thing 2"], base_source=base)
    local = sum(p.to_local().numel() for p in tr.params)
    r = tr.fit()
    print("rank", tr.accelerator.process_index, "fsdp", tr.fsdp, "local", local, "status", r["status"], "step", r["step"], flush=True)
''')

@slow
def test_trainer_under_fsdp2_resumes_exactly_and_exports(tmp_path):
    "`accelerate launch` with the shipped fsdp_4gpu.yaml (two CPU processes, no bf16): ImageReFL with validation, checkpoints, resume, export."
    from imagerefl.testing import tiny_sd_pipeline
    tiny_sd_pipeline(resolution=32).save_pretrained(tmp_path/"base")
    total = sum(p.numel() for p in tiny_sd_pipeline(resolution=32).unet.parameters())
    config = ROOT/"configs"/"accelerate"/"fsdp_4gpu.yaml"
    out = accelerate_launch(tmp_path, config, TRAIN_WORKER, tmp_path/"a", tmp_path/"base")
    rows = [r for r in out.splitlines() if r.startswith("rank ")]
    assert len(rows) == 2 and all("fsdp True" in r and "status finished step 2" in r for r in rows), out
    assert all(int(r.split("local ")[1].split()[0]) < 0.75 * total for r in rows), rows   # each process: a shard of the UNet
    accelerate_launch(tmp_path, config, TRAIN_WORKER, tmp_path/"b", tmp_path/"base", "max_steps=1", "export=false")
    ck = tmp_path/"b"/"checkpoints"/"checkpoint-1"
    assert {"model-rank00-of-02.safetensors", "optimizer-rank01-of-02.safetensors", "manifest.json"} <= {p.name for p in ck.iterdir()}
    assert not (ck/"trainable.safetensors").exists()
    accelerate_launch(tmp_path, config, TRAIN_WORKER, tmp_path/"b", tmp_path/"base", "resume=latest")
    name = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(tmp_path/"a"/"final"/name), load_file(tmp_path/"b"/"final"/name)
    assert all(torch.equal(a[k], b[k]) for k in a)                              # the resumed run exports the same UNet
    start = tiny_sd_pipeline(resolution=32).unet.state_dict()
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-4
    assert (tmp_path/"a"/"final"/"combined"/"model_index.json").exists() and (tmp_path/"a"/"samples"/"step-2.png").exists()
