"Trainer integration: exact resume after SIGINT, LoRA export, DDP on two CPU processes, train() from a config."
import os, signal, subprocess, sys, textwrap, json
from pathlib import Path
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import pytest, torch
import pandas as pd
from torch import nn
from safetensors.torch import load_file
from imagerefl.core import UserError
from imagerefl.testing import tiny_sd_pipeline
from imagerefl.diffusion import Backbone
from imagerefl.data import ImageCaptionDataset
from imagerefl.objectives import ImageReFL, ImageReFLConfig
from imagerefl.train import Trainer, train
from imagerefl.data import PromptDataset
from imagerefl.config import load_config
from imagerefl.testing import FixedNoiseObjective, Brightness
from imagerefl.runfolder import write_manifest

ROOT = Path(__file__).resolve().parents[1]

def images_data(n=10, res=32):
    g = torch.Generator().manual_seed(0)
    return ImageCaptionDataset(list(torch.rand(n, 3, res, res, generator=g)), [f"a photo of thing {i}" for i in range(n)], res)

def cfg(out, *over):
    base = dict(out_dir=str(out), mixed_precision="no", log_with="none", max_steps=4, batch_size=2, gradient_accumulation_steps=2,
                checkpoint_every=0, export=False, model=dict(scheduler="ddpm", gradient_checkpointing=False),
                validation=dict(every=0), optimizer=dict(name="adam", lr=1e-3),
                objective=dict(name="imagerefl", num_inference_steps=6, start_index=3, max_mid_index=6, min_mid_index=3))
    return load_config(base, list(over))

class SignalAt(ImageReFL):
    "ImageReFL that sends this process SIGINT at micro-batch `at` (as Ctrl-C would)."
    def __init__(self, at, **kw): super().__init__(ImageReFLConfig(**kw)); self.at = at
    def __call__(self, *a, **k):
        out = super().__call__(*a, **k)
        if self.calls == self.at: signal.raise_signal(signal.SIGINT)
        return out

def run(out, objective, *over):
    bb = Backbone(tiny_sd_pipeline(resolution=32), scheduler="ddpm", num_inference_steps=6)
    tr = Trainer(cfg(out, *over), bb, objective, Brightness(), images_data())
    return tr, tr.fit()

def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    kw = dict(num_inference_steps=6, start_index=3, max_mid_index=6, min_mid_index=3)
    full, r = run(tmp_path/"a", ImageReFL(ImageReFLConfig(**kw)))
    assert r["status"] == "finished" and r["step"] == 4
    # 10 rows, global batch 2: the epoch ends inside step 3, so the resume also crosses an epoch boundary
    part, r = run(tmp_path/"b", SignalAt(3, **kw))                     # SIGINT during step 2
    assert r["status"] == "interrupted" and r["step"] == 2 and r["checkpoint"].name == "checkpoint-2"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handlers restored
    rest, r = run(tmp_path/"b", ImageReFL(ImageReFLConfig(**kw)), "resume=latest")
    assert r["status"] == "finished" and r["step"] == 4 and rest.objective.calls == 8
    a, b = full.named_trainable(), rest.named_trainable()
    assert all(torch.equal(a[n], b[n]) for n in a)                       # bit-identical weights
    import pandas as pd
    log = pd.read_csv(tmp_path/"b"/"train_log.csv")
    assert sorted(log[log.name == "loss"].step) == [1, 2, 3, 4]           # no duplicated rows after the resume
    full_log = pd.read_csv(tmp_path/"a"/"train_log.csv")
    assert log[log.name == "loss"].value.tolist() == pytest.approx(full_log[full_log.name == "loss"].value.tolist(), rel=1e-6)

def test_resume_refuses_other_process_count_and_conflicting_folder(tmp_path):
    run(tmp_path, FixedNoiseObjective(), "max_steps=1")
    with pytest.raises(UserError, match="already holds a run"): run(tmp_path, FixedNoiseObjective())
    ck = tmp_path/"checkpoints"/"checkpoint-1"; st = json.loads((ck/"trainer_state.json").read_text())
    (ck/"trainer_state.json").write_text(json.dumps(dict(st, processes=2))); write_manifest(ck)
    with pytest.raises(UserError, match="same number of processes"): run(tmp_path, FixedNoiseObjective(), "resume=latest")

def test_resume_refuses_a_sharded_checkpoint_without_fsdp(tmp_path):
    run(tmp_path, FixedNoiseObjective(), "max_steps=1")
    ck = tmp_path/"checkpoints"/"checkpoint-1"
    (ck/"trainable.safetensors").rename(ck/"model-rank00-of-01.safetensors"); write_manifest(ck)   # as FSDP writes it
    with pytest.raises(UserError, match="was written with FSDP, this run does not use it"): run(tmp_path, FixedNoiseObjective(), "resume=latest")

def test_lora_trains_only_the_adapter_and_exports(tmp_path):
    pipe = tiny_sd_pipeline(resolution=32); pipe.save_pretrained(tmp_path/"base")
    base_w = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    bb = Backbone(pipe, scheduler="ddpm", num_inference_steps=6)
    c = cfg(tmp_path/"run", "model.lora_rank=4", "max_steps=2", "export=true", "optimizer.lr=1e-2")
    tr = Trainer(c, bb, ImageReFL(ImageReFLConfig(num_inference_steps=6, start_index=3, max_mid_index=6, min_mid_index=3)), Brightness(), images_data(),
                 base_source=str(tmp_path/"base"))
    assert tr.fit()["status"] == "finished"
    names = set(tr.named_trainable())
    assert names and all("lora" in n for n in names)
    for n, p in tr.denoiser.named_parameters():                              # base weights untouched
        if "lora" not in n: assert torch.equal(p, base_w[n.replace(".base_layer", "")])
    fresh = tiny_sd_pipeline(resolution=32); fresh.load_lora_weights(tmp_path/"run"/"final"/"lora")
    x, t = torch.randn(1, 4, 16, 16), torch.tensor(500)
    e = torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.allclose(fresh.unet(x, t, e).sample, tr.denoiser(x, t, e).sample, atol=1e-5)
        from imagerefl.sampling import CombinedStableDiffusionPipeline
        comb = CombinedStableDiffusionPipeline.from_pretrained(tmp_path/"run"/"final"/"combined")
        assert torch.allclose(comb.fine_tuned_unet(x, t, e).sample, tr.denoiser(x, t, e).sample, atol=1e-5)
        assert torch.allclose(comb.original_unet(x, t, e).sample, tiny_sd_pipeline(resolution=32).unet(x, t, e).sample, atol=1e-6)

WORKER = textwrap.dedent('''
    import os, sys; os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from imagerefl.testing import tiny_sd_pipeline
    from imagerefl.diffusion import Backbone
    from imagerefl.train import Trainer
    from imagerefl.data import PromptDataset
    from imagerefl.config import load_config
    from imagerefl.testing import FixedNoiseObjective
    from imagerefl.core import save_safetensors
    import imagerefl.train as T, time
    if os.environ.get("RANK") == "1":      # late to the run folder: it must not find the main process's new config.yaml there
        on_time = T.resume_point
        def late(*a, **k): time.sleep(5); return on_time(*a, **k)
        T.resume_point = late
    out, batch = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    cfg = load_config(dict(out_dir=out, mixed_precision="no", log_with="none", max_steps=2, batch_size=batch,
                           gradient_accumulation_steps=2, checkpoint_every=0, export=False, validation=dict(every=0),
                           model=dict(scheduler="ddim", gradient_checkpointing=False), optimizer=dict(name="sgd", lr=0.5),
                           objective=dict(name="refl", num_inference_steps=6, min_mid_index=3, max_mid_index=6)))
    bb = Backbone(tiny_sd_pipeline(resolution=32), scheduler="ddim", num_inference_steps=6)
    tr = Trainer(cfg, bb, FixedNoiseObjective(), None, PromptDataset([f"prompt {i}" for i in range(16)]))
    r = tr.fit()
    if tr.accelerator.is_main_process:
        save_safetensors(tr.named_trainable(), out + "/weights.safetensors")
        print("processes", tr.accelerator.num_processes, r["status"])
''')

def test_ddp_two_cpu_processes_equal_one(tmp_path):
    script = tmp_path/"worker.py"; script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    one = subprocess.run([sys.executable, str(script), str(tmp_path/"one"), "4"], env=env, capture_output=True, text=True, timeout=300)
    assert "processes 1 finished" in one.stdout, one.stderr[-2000:]
    # two CPU processes with the gloo backend, the way `accelerate launch`/torchrun start them (env:// rendezvous)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                          str(script), str(tmp_path/"two"), "2"], env=env, capture_output=True, text=True, timeout=300)
    assert "processes 2 finished" in two.stdout, two.stderr[-3000:]
    a, b = load_file(tmp_path/"one"/"weights.safetensors"), load_file(tmp_path/"two"/"weights.safetensors")
    base = tiny_sd_pipeline(resolution=32).unet
    moved = max((a[n] - p.detach()).abs().max().item() for n, p in base.named_parameters())
    assert moved > 1e-3                                                    # the updates are not trivially zero
    for n in a: torch.testing.assert_close(b[n], a[n], rtol=1e-5, atol=1e-6)

def test_train_from_config_with_saved_model_and_reward(tmp_path):
    import open_clip
    from imagerefl.rewards import open_clip_model
    tiny = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=32, patch_size=8, head_width=16),
                text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2))
    (tmp_path/"cfgs").mkdir(); (tmp_path/"cfgs"/"tiny-hps-train.json").write_text(json.dumps(tiny))
    open_clip.add_model_config(tmp_path/"cfgs")
    m, _ = open_clip_model("tiny-hps-train")
    torch.save({"state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}}, tmp_path/"HPS_v2.1_compressed.pt")
    tiny_sd_pipeline(resolution=32).save_pretrained(tmp_path/"base")
    (tmp_path/"prompts.txt").write_text("\n".join(f"a photo of thing {i}" for i in range(6)))
    r = train(dict(out_dir=str(tmp_path/"run"), mixed_precision="no", log_with="none", max_steps=1, batch_size=2,
                   gradient_accumulation_steps=1, validation=dict(every=0),
                   model=dict(source=str(tmp_path/"base"), scheduler="ddim", gradient_checkpointing=False),
                   reward=dict(name="hps-v2.1", path=str(tmp_path/"HPS_v2.1_compressed.pt"), arch="tiny-hps-train"),
                   data=dict(prompts=str(tmp_path/"prompts.txt")),
                   objective=dict(name="refl", num_inference_steps=4, min_mid_index=2, max_mid_index=4)))
    assert r["status"] == "finished"
    assert (tmp_path/"run"/"final"/"unet"/"diffusion_pytorch_model.safetensors").exists()
    assert (tmp_path/"run"/"final"/"combined"/"model_index.json").exists()
    assert "name: refl" in (tmp_path/"run"/"config.yaml").read_text()

@pytest.mark.parametrize("kind, over, said", [
    ("DEEPSPEED", [], "training under DeepSpeed is not supported: untested"),
    ("FSDP", ["model.lora_rank=4"], "set fsdp_version: 2 in the accelerate config, model.lora_rank=0, or train with DDP")])
def test_deepspeed_and_fsdp1_lora_are_refused_before_any_step(tmp_path, kind, over, said, monkeypatch):
    "DeepSpeed's checkpoints would hold one process's partitions; under FSDP the trainer takes FSDP2 with the full UNet and no EMA."
    import accelerate
    from accelerate.utils import DistributedType
    class Sharded(accelerate.Accelerator):
        @property
        def distributed_type(self): return DistributedType[kind]
        @distributed_type.setter
        def distributed_type(self, v): pass
    import imagerefl.train
    monkeypatch.setattr(imagerefl.train, "Accelerator", Sharded)          # FSDP1: the state's plugin is not FSDP2
    with pytest.raises(UserError, match=said):
        run(tmp_path, FixedNoiseObjective(), "max_steps=1", *over)
    assert not (tmp_path/"checkpoints").exists()

def test_validation_images_and_run_name_go_to_wandb(monkeypatch):
    "wandb is not a dependency (not installed here): the logging call is checked against a stand-in module and tracker."
    import sys, types
    from imagerefl.tracking import tracker_init, log_images
    fake = types.ModuleType("wandb"); fake.Image = lambda a, caption=None: (a.shape, caption)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logged = {}
    tracker = types.SimpleNamespace(name="wandb", log=lambda d, step: logged.update(d=d, step=step))
    trainer = types.SimpleNamespace(accelerator=types.SimpleNamespace(trackers=[tracker]), step=7)
    log_images(trainer.accelerator.trackers, {"tuned": torch.rand(2, 3, 8, 8), "combined": torch.rand(2, 3, 8, 8)}, ["a cat", "a dog"], trainer.step)
    assert logged["step"] == 7 and set(logged["d"]) == {"val/tuned", "val/combined"}
    assert logged["d"]["val/combined"] == [((8, 8, 3), "combined: a cat"), ((8, 8, 3), "combined: a dog")]
    kw = tracker_init(load_config(dict(log_with="wandb", tracker_project_name="p", run_name="r", tracker_kwargs=dict(entity="me"))))
    assert kw["project_name"] == "p" and kw["init_kwargs"] == {"wandb": {"entity": "me", "name": "r"}}

def test_validation_at_a_resolution_other_than_the_models(tmp_path):
    "Training at 16 px on a 32 px model: the combined validation images are drawn at the training size too (found at SD1.5 size)."
    bb = Backbone(tiny_sd_pipeline(resolution=32), scheduler="ddpm", num_inference_steps=6, resolution=16)
    tr = Trainer(cfg(tmp_path, "max_steps=1", "gradient_accumulation_steps=1", "validation.every=1", "validation.num_inference_steps=4",
                     "validation.original_unet_steps=2", "validation.images_per_prompt=1"),
                 bb, ImageReFL(ImageReFLConfig(num_inference_steps=6, start_index=3, max_mid_index=6, min_mid_index=3)),
                 Brightness(), images_data(res=16), val_prompts=["a photo of thing 0"])
    tr.fit()
    from PIL import Image
    assert Image.open(tmp_path/"samples"/"step-1.png").size[1] < 2 * 32      # two rows (tuned, combined) of 16 px images

@pytest.fixture
def own_precision():
    "accelerate keeps one mixed-precision setting per process; this test's bf16 must not meet the other tests' fp32 (internal reset, as accelerate's own tests do)."
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(); yield; AcceleratorState._reset_state()

def test_bf16_frozen_parts_and_fp32_adapter(tmp_path, own_precision):
    "mixed_precision=bf16 with LoRA on tiny components: VAE, text encoder and reward in bf16, the adapter in fp32, a finite step that moves it."
    bb = Backbone(tiny_sd_pipeline(resolution=32), scheduler="ddpm", num_inference_steps=6)
    tr = Trainer(cfg(tmp_path, "mixed_precision=bf16", "model.lora_rank=4", "max_steps=1", "gradient_accumulation_steps=1"), bb,
                 ImageReFL(ImageReFLConfig(num_inference_steps=6, start_index=3, max_mid_index=6, min_mid_index=3)), Brightness(), images_data())
    assert tr.frozen_dtype == torch.bfloat16 and bb.vae.dtype == torch.bfloat16 and bb.pipe.text_encoder.dtype == torch.bfloat16
    lora = {n: p.detach().clone() for n, p in tr.denoiser.named_parameters() if p.requires_grad}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    logs = tr.update()
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in logs.values() if isinstance(v, (int, float)))
    assert max((p.detach() - lora[n]).abs().max().item() for n, p in tr.denoiser.named_parameters() if p.requires_grad) > 0

def test_consistency_term_from_a_config(tmp_path):
    "objective.consistency_weight > 0 names its feature network in the config; without one it is refused in one line."
    with pytest.raises(UserError, match="needs objective.consistency_network, the feature network of the consistency term: one of"):
        load_config("mini_imagerefl", ["objective.consistency_weight=0.5"])
    r = train("mini_imagerefl", [f"out_dir={tmp_path/'run'}", "objective.consistency_weight=0.5", "objective.consistency_network=mini",
                                 "max_steps=2", "batch_size=4", "log_every=1", "validation.every=0", "export=false",
                                 "objective.num_inference_steps=8", "objective.start_index=6", "objective.max_mid_index=8"])
    assert r["status"] == "finished"
    log = pd.read_csv(tmp_path/"run"/"train_log.csv")                  # long format: step, name, value
    d = log[log.name == "consistency_distance"].value
    assert len(d) == 2 and d.between(0, 2).all()
