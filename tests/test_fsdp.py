"""FSDP on the CPU: two gloo processes, the SD UNet sharded with torch's FSDP (FSDP2 `fully_shard` and FSDP1), one
optimizer step on half the batch each equals the single-process step on the whole batch.

accelerate cannot run this on the CPU: it turns FSDP on only for GPU-like distributed types, and with `cpu=True` it
silently wraps the model in DDP instead (accelerate 1.15). So the test drives torch's FSDP directly, the layer
accelerate's FSDP plugin configures. SGD, so that the comparison is exact to float rounding (Adam's normalisation turns
rounding-level gradient differences of near-zero gradients into learning-rate-size ones).
"""
import os, socket, subprocess, sys, textwrap
from pathlib import Path
import pytest, torch

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent('''
    import os, sys, torch, torch.distributed as dist
    os.environ["HF_HUB_OFFLINE"] = "1"
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


@pytest.mark.skipif(os.environ.get("IMAGEREFL_SLOW") != "1", reason="slow: two processes per mode (~40 s each); IMAGEREFL_SLOW=1")
@pytest.mark.parametrize("mode", ["fsdp2", "fsdp1"])
def test_fsdp_step_equals_one_process(tmp_path, mode):
    (tmp_path/"w.py").write_text(WORKER)
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    ps = [subprocess.Popen([sys.executable, str(tmp_path/"w.py"), mode], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in ps]
    for p, (o, e) in zip(ps, outs): assert p.returncode == 0, e[-3000:]
    rows = [o.split() for o, _ in outs]
    for r in rows:
        local, total = int(r[4]), int(r[6])
        assert local < 0.75 * total, r                    # each process holds a shard, not the whole UNet
    assert float(rows[0][8]) < 1e-6 < float(rows[0][10]), rows[0]   # the step moved the weights, exactly as one process
