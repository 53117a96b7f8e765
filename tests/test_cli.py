"The `imagerefl` command: config checks before loading, one-line errors with status 2, shipped configs."
import os, subprocess, sys
from pathlib import Path
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import pytest, yaml
from imagerefl.cli import main
from imagerefl.config import load_config, config_names, config_dir, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
PAPER = ["sd15_hps21_imagerefl", "sd15_hps21_refl", "sd15_hps21_draftk", "sd15_pickscore_imagerefl", "sdxl_hps21_imagerefl"]

def test_paper_configs_are_shipped_and_valid():
    assert set(PAPER) <= set(config_names())
    for name in config_names():
        cfg = load_config(name)
        assert isinstance(cfg, TrainConfig)
    c = load_config("sd15_hps21_imagerefl")
    assert (c.objective["name"], c.objective["start_index"], c.objective["diffusion_weight"], c.optimizer.lr,
            c.batch_size * c.gradient_accumulation_steps, c.max_steps) == ("imagerefl", 30, 0.01, 3e-4, 32, 4000)
    assert load_config("sd15_hps21_draftk").objective["k"] == 1
    assert load_config("sd15_pickscore_imagerefl").objective["reward_offset"] == -20.0

def test_configs_have_one_copy():
    "configs/ in the repository is a link to the package's imagerefl/configs/: one copy, shipped and visible at the top."
    assert (ROOT/"configs").is_symlink() and (ROOT/"configs").resolve() == config_dir().resolve()
    assert {p.stem for p in (ROOT/"configs").glob("*.yaml")} == set(config_names())

def test_accelerate_example_configs_parse():
    found = list((config_dir()/"accelerate").glob("*.yaml"))
    assert len(found) == 3
    for p in found: assert yaml.safe_load(p.read_text())["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED")

@pytest.mark.parametrize("override,message", [
    ("optimizer.lrr=1", "unknown key 'optimizer.lrr'"),
    ("batch_size=eight", "batch_size must be an integer, got 'eight'"),
    ("objective.start_index=45", "start_index"),
    ("mixed_precision=fp8", "mixed_precision='fp8' is not allowed: use one of bf16, fp16, no"),
    ("model.lora_rank=-1", "model.lora_rank=-1 is too small"),
])
def test_bad_override_is_one_line_and_status_2(capsys, override, message):
    assert main(["train", "--config", "sd15_hps21_imagerefl", "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err

def test_draftk_k_larger_than_schedule(capsys):
    assert main(["train", "--config", "sd15_hps21_draftk", "--set", "objective.k=32"]) == 2
    assert "k must be in [1, num_inference_steps=31]" in capsys.readouterr().err

def test_unknown_config_and_offline_model(capsys, tmp_path):
    assert main(["train", "--config", "nope"]) == 2
    assert "neither a yaml file nor a shipped config" in capsys.readouterr().err
    # a valid config whose model is a hub id that is not cached: one line, before any download is tried
    assert main(["train", "--config", "sd15_hps21_refl", "--set", f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HF_HUB_OFFLINE=1" in err

def test_console_script_runs_as_module(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import sys; from imagerefl.cli import main; sys.exit(main())", "train",
                        "--config", "sd15_hps21_imagerefl", "--set", "seed=x"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "imagerefl: error: seed must be an integer, got 'x'"

def test_configs_subcommand(capsys):
    assert main(["configs"]) == 0
    assert "sd15_hps21_imagerefl" in capsys.readouterr().out

def test_every_option_has_help():
    "`imagerefl <command> --help` explains every option of every command (and of `mini pretrain`)."
    import argparse
    from imagerefl.cli import parser
    def subparsers(p):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sp in a.choices.items(): yield name, sp; yield from subparsers(sp)
    seen = []
    for name, sp in subparsers(parser()):
        for a in sp._actions:
            if a.option_strings and not isinstance(a, argparse._HelpAction):
                seen.append((name, a.option_strings[-1]))
                assert a.help, f"imagerefl {name} {a.option_strings[-1]} has no help"
    assert ("demo", "--quick") in seen and ("demo", "--seed") in seen and ("pretrain", "--quick") in seen

def test_a_full_disk_is_one_line_and_keeps_the_checkpoint_before_it(tmp_path, monkeypatch, capsys):
    "safetensors reports a full disk in its own exception type; the CLI says it in one line, status 2."
    import safetensors.torch
    from safetensors import SafetensorError
    from imagerefl.runfolder import verify_checkpoint
    real = safetensors.torch.save_file
    def full_at_step_2(tensors, filename, *a, **k):
        if "checkpoint-2" in str(filename): raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, *a, **k)
    monkeypatch.setattr(safetensors.torch, "save_file", full_at_step_2)
    out = tmp_path/"run"
    rc = main(["train", "--config", "mini_refl", "--set", f"out_dir={out}", "--set", "max_steps=2", "--set", "checkpoint_every=1",
               "--set", "batch_size=2", "--set", "validation.every=0", "--set", "export=false",
               "--set", "objective.num_inference_steps=8", "--set", "objective.min_mid_index=6", "--set", "objective.max_mid_index=8"])
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]                                   # after the progress bar
    assert rc == 2 and "Traceback" not in err and line.startswith("imagerefl: error: No space left on device"), err[-500:]
    assert "checkpoint-2" in line and line.endswith("the disk is full: free some space or choose another output folder")
    assert verify_checkpoint(out/"checkpoints"/"checkpoint-1") is None      # the checkpoint before it is intact

def test_evaluate_scores_with_the_evaluation_path_and_run_json_names_it(tmp_path, monkeypatch, capsys):
    "`imagerefl evaluate` scores rewards with their official scorer's preprocessing by default, and run.json says which."
    import json, numpy as np, pandas as pd, torch
    from imagerefl.testing import tiny_sd_pipeline
    monkeypatch.chdir(tmp_path)
    tiny_sd_pipeline(resolution=32).save_pretrained(tmp_path/"pipe")
    (tmp_path/"p.txt").write_text("a cat\na dog\n")
    args = ["evaluate", "--model", "pipe", "--prompts", "p.txt", "--reward", "imagerefl.testing:PadBrightness", "--steps", "2",
            "--images-per-prompt", "1", "--device", "cpu", "--out"]
    assert main(args + ["ev"]) == 0
    assert json.loads((tmp_path/"ev"/"run.json").read_text())["rewards"] == {
        "imagerefl.testing:PadBrightness": "evaluation: 8-bit, padded with black to twice the width"}
    assert main(args + ["tr", "--preprocessing", "training"]) == 0
    assert json.loads((tmp_path/"tr"/"run.json").read_text())["rewards"]["imagerefl.testing:PadBrightness"].startswith("training: float, shorter side to 8")
    from imagerefl.data import pil_to_tensor
    from imagerefl.rewards import normalize, resize_center_crop, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from PIL import Image
    ev, tr = (pd.read_csv(tmp_path/d/"images.csv") for d in ("ev", "tr"))
    pngs = torch.stack([pil_to_tensor(Image.open(tmp_path/"ev"/f)) for f in ev.path])
    assert all((tmp_path/"ev"/f).read_bytes() == (tmp_path/"tr"/f).read_bytes() for f in ev.path)   # the same images
    np.testing.assert_allclose(ev["imagerefl.testing:PadBrightness"], pngs.mean((1, 2, 3)) / 2, rtol=1e-6)           # the official scorer's
    np.testing.assert_allclose(tr["imagerefl.testing:PadBrightness"], normalize(resize_center_crop(pngs, 8), OPENAI_CLIP_MEAN,
                                                                OPENAI_CLIP_STD).mean((1, 2, 3)), rtol=1e-5)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e: main(args + ["x", "--preprocessing", "pil"])
    assert e.value.code == 2 and "invalid choice: 'pil'" in capsys.readouterr().err

@pytest.mark.parametrize("family,lora_rank", [("pixart", 8), ("sd3", 0)])
def test_train_sample_evaluate_on_a_tiny_transformer_pipeline(tmp_path, monkeypatch, family, lora_rank):
    "`imagerefl train` (ImageReFL, with a combined validation pass and the export), `sample` and `evaluate` run PixArt-α and SD3."
    import json, pandas as pd
    from imagerefl.testing import tiny_pixart_pipeline, tiny_sd3_pipeline
    from imagerefl.sampling import CombinedPixArtAlphaPipeline, CombinedStableDiffusion3Pipeline
    monkeypatch.chdir(tmp_path)
    (tiny_pixart_pipeline if family == "pixart" else tiny_sd3_pipeline)().save_pretrained(tmp_path/"pipe")
    sets = ["model.source=pipe", "model.resolution=null", "reward.name=imagerefl.testing:Brightness", "data.images=mini-digits",
            "data.limit=4", "batch_size=2", "gradient_accumulation_steps=1", "max_steps=2", "objective.num_inference_steps=8",
            "objective.start_index=6", "objective.max_mid_index=8", "validation.every=2", "validation.prompts=mini-digits",
            "validation.num_prompts=2", "validation.images_per_prompt=1", "validation.num_inference_steps=4",
            "validation.original_unet_steps=2", "validation.diversity_features=null", "validation.batch_size=2",
            "mixed_precision=no", "log_with=none", "out_dir=run", "model.gradient_checkpointing=false", "checkpoint_every=0",
            f"model.lora_rank={lora_rank}"]
    assert main(["train", "--config", f"{family}_hps21_imagerefl"] + [a for s in sets for a in ("--set", s)]) == 0
    final = tmp_path/"run"/"final"
    assert sorted(p.name for p in final.iterdir()) == ["combined", "lora" if lora_rank else "transformer"]
    assert json.loads((final/"combined"/"model_index.json").read_text())["_class_name"] == (
        CombinedPixArtAlphaPipeline if family == "pixart" else CombinedStableDiffusion3Pipeline).__name__
    assert (tmp_path/"run"/"samples"/"step-2.png").exists()                      # tuned + combined validation grid
    (tmp_path/"p.txt").write_text("a cat\na dog\n")
    common = ["--model", "run/final/combined", "--prompts", "p.txt", "--steps", "4", "--original-unet-steps", "2", "--device", "cpu"]
    assert main(["sample", *common, "--out", "s"]) == 0
    assert len(pd.read_csv(tmp_path/"s"/"manifest.csv")) == 2
    assert main(["evaluate", *common, "--reward", "imagerefl.testing:Brightness", "--images-per-prompt", "1", "--out", "e"]) == 0
    assert len(pd.read_csv(tmp_path/"e"/"images.csv")) == 2

def test_a_diffusion_scheduler_on_sd3_is_one_line(tmp_path, monkeypatch, capsys):
    from imagerefl.testing import tiny_sd3_pipeline
    monkeypatch.chdir(tmp_path); tiny_sd3_pipeline().save_pretrained(tmp_path/"pipe")
    assert main(["train", "--config", "sd3_hps21_imagerefl", "--set", "model.source=pipe", "--set", "model.scheduler=ddpm",
                 "--set", "out_dir=run"]) == 2
    assert "scheduler 'ddpm' cannot sample a flow-matching model: use flow_euler" in capsys.readouterr().err
