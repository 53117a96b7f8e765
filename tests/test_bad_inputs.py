"""A battery of bad inputs and faults: each must end in one line that says what to do (status 2), never a traceback,
never a silently wrong result. Quick cases call the CLI's `main()` in process; a few run the console entry point in a
subprocess to prove the exit codes. The slow case (a user reward trained end to end) runs with `pytest -m slow`."""
import errno, json, os, shutil, stat, subprocess, sys, warnings
from pathlib import Path
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np, pytest, torch
from PIL import Image
from imagerefl.cli import main
from imagerefl.core import UserError, atomic_write_text, check_source, save_safetensors
from imagerefl.data import ImageCaptionDataset, load_prompts, pil_to_tensor
from imagerefl.mini.nets import mini_base_path
import imagerefl, imagerefl.sampling   # diffusers' log handler binds the real stderr now, not a test's captured one

ROOT = Path(__file__).resolve().parents[1]
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")


def run_main(capsys, *argv):
    "main(argv) -> (status, stderr); asserts the error is one line without a traceback."
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    if rc == 2: assert len(err.splitlines()) == 1 and "Traceback" not in err and err.startswith("imagerefl: error: "), err
    return rc, err


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    "Copies of the shipped mini base pipeline: plain, combined (two UNets, the authors' layout) and broken ones."
    d = tmp_path_factory.mktemp("pipes")
    base = d/"base"; shutil.copytree(mini_base_path(), base)
    comb = d/"comb"; shutil.copytree(base, comb)
    (comb/"unet").rename(comb/"original_unet"); shutil.copytree(comb/"original_unet", comb/"fine_tuned_unet")
    index = json.loads((comb/"model_index.json").read_text())
    index["_class_name"] = "CombinedStableDiffusionPipeline"
    index["original_unet"] = index["fine_tuned_unet"] = index.pop("unet")
    for k in ("feature_extractor", "image_encoder", "safety_checker", "requires_safety_checker"): index.pop(k, None)
    (comb/"model_index.json").write_text(json.dumps(index))
    out = dict(base=base, comb=comb)
    for name, src, drop in [("no_unet", base, "unet"), ("no_ft", comb, "fine_tuned_unet")]:
        out[name] = d/name; shutil.copytree(src, out[name]); shutil.rmtree(out[name]/drop)
    for name, src, part in [("trunc_ft", comb, "fine_tuned_unet"), ("trunc_unet", base, "unet")]:
        out[name] = d/name; shutil.copytree(src, out[name])
        f = out[name]/part/"diffusion_pytorch_model.safetensors"; f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    return out


def sample(folders, tmp_path, *extra, model="base"):
    return ["sample", "--model", folders[model], "--prompt", "a handwritten digit one", "--steps", "1", "--device", "cpu",
            "--out", tmp_path/"out", *extra]

# ---------------------------------------------------------------------------------------------------- files in
def test_config_not_utf8_and_yaml_line(capsys, tmp_path):
    p = tmp_path/"c.yaml"
    p.write_bytes("# caf\xe9\nseed: 1\n".encode("latin-1"))
    rc, err = run_main(capsys, "train", "--config", p)
    assert rc == 2 and "is not UTF-8 text" in err and "save the config as UTF-8" in err
    p.write_text("seed: 1\nbatch_size: 2\noptimizer:\n  lr: [1e-4\nmax_steps: 3\n")
    rc, err = run_main(capsys, "train", "--config", p)
    assert rc == 2 and "is not valid YAML at line 5" in err
    p.write_bytes("\ufeffseed: x\n".encode())                          # a BOM is not part of the first key
    rc, err = run_main(capsys, "train", "--config", p)
    assert rc == 2 and err.endswith("seed must be an integer, got 'x'")

def test_prompt_files(capsys, tmp_path):
    (tmp_path/"latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    rc, err = run_main(capsys, "sample", "--model", "/nope", "--prompts", tmp_path/"latin.txt", "--out", tmp_path)
    assert rc == 2 and "latin.txt is not UTF-8 text" in err
    (tmp_path/"p.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": "c",}\n')
    rc, err = run_main(capsys, "sample", "--model", "/nope", "--prompts", tmp_path/"p.jsonl", "--out", tmp_path)
    assert rc == 2 and "p.jsonl line 4 is not valid JSON" in err
    (tmp_path/"p.json").write_text('[\n "a",\n null,\n "b"\n]')
    with pytest.warns(UserWarning, match="skipping 1 null prompts"): assert load_prompts(tmp_path/"p.json") == ["a", "b"]
    (tmp_path/"p.json").write_text('{"prompts": ["a"]}')
    with pytest.raises(UserError, match="must hold a list of prompts"): load_prompts(tmp_path/"p.json")
    (tmp_path/"bom.txt").write_bytes("\ufeffa cat\n".encode())
    assert load_prompts(tmp_path/"bom.txt") == ["a cat"]

def test_image_folders(tmp_path):
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(tmp_path/"g16.png")       # 16-bit greyscale, mean 0.502
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(tmp_path/"rgb.png")
    (tmp_path/"metadata.csv").write_text("file_name,text\ng16.png,grey\nrgb.png,\n")     # an empty cell: no caption
    with pytest.warns(UserWarning, match="skipping 1 images without a caption"):
        ds = ImageCaptionDataset.from_folder(tmp_path, 8)
    assert ds.captions == ["grey"] and abs(ds[0]["image"].mean().item() - 128/255) < 1e-6
    (tmp_path/"metadata.csv").write_bytes("file_name,text\nrgb.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="metadata.csv is not UTF-8 text"): ImageCaptionDataset.from_folder(tmp_path, 8)
    (tmp_path/"metadata.csv").unlink()
    (tmp_path/"metadata.jsonl").write_text('{"file_name": "rgb.png"}\n')
    with pytest.raises(UserError, match="metadata has no caption column"): ImageCaptionDataset.from_folder(tmp_path, 8)
    (tmp_path/"metadata.jsonl").write_text('{"file_name": "rgb.png", "text": null}\n')
    with pytest.raises(UserError, match="no image in .* has a caption"), pytest.warns(UserWarning):
        ImageCaptionDataset.from_folder(tmp_path, 8)

# ---------------------------------------------------------------------------------------------------- models
def test_incomplete_or_truncated_pipeline_folders(capsys, tmp_path, folders):
    rc, err = run_main(capsys, *sample(folders, tmp_path, model="no_unet"))
    assert rc == 2 and "lists unet but it has no unet/ folder" in err and "config.json" not in err
    rc, err = run_main(capsys, *sample(folders, tmp_path, model="no_ft"))
    assert rc == 2 and "has no fine_tuned_unet/ folder" in err
    rc, err = run_main(capsys, *sample(folders, tmp_path, model="trunc_ft"))      # the damaged file, named (test_contracts.py)
    assert rc == 2 and f"{folders['trunc_ft']}/fine_tuned_unet/diffusion_pytorch_model.safetensors looks damaged" in err
    rc, err = run_main(capsys, *sample(folders, tmp_path, model="trunc_unet"))
    assert rc == 2 and f"{folders['trunc_unet']}/unet/diffusion_pytorch_model.safetensors looks damaged" in err
    assert not (tmp_path/"out").exists()

def test_hub_hint_names_hf_download():
    with pytest.raises(UserError, match="hf download no-such/model"): check_source("no-such/model", "a pipeline folder")

@NO_GPU
def test_device_cuda_without_gpu(capsys, tmp_path, folders):
    rc, err = run_main(capsys, *sample(folders, tmp_path, "--device", "cuda"))
    assert rc == 2 and "--device cpu" in err and "--set" not in err

@NO_GPU
def test_fp16_on_cpu_before_loading(capsys, tmp_path):
    rc, err = run_main(capsys, "train", "--config", "mini_refl", "--set", "mixed_precision=fp16", "--set", f"out_dir={tmp_path/'r'}")
    assert rc == 2 and "mixed_precision=fp16 needs a CUDA GPU" in err and not (tmp_path/"r").exists()

def test_pipeline_call_errors_are_value_errors(folders):
    from imagerefl.cli import load_any_pipeline
    pipe = load_any_pipeline(str(folders["comb"]))
    for kw, msg in [(dict(prompt="a", num_inference_steps=0), "num_inference_steps=0 is invalid"),
                    (dict(prompt=[], num_inference_steps=2), "no prompt")]:
        with pytest.raises(ValueError, match=msg): pipe(**kw)

def test_user_reward_in_config(tmp_path, monkeypatch, capsys):
    from imagerefl.config import load_config
    (tmp_path/"my_reward.py").write_text("import torch\nclass Bright(torch.nn.Module):\n"
                                         "    def forward(self, images, prompts): return images.mean((1, 2, 3))\n")
    monkeypatch.chdir(tmp_path)
    assert load_config("mini_refl", ["reward.name=my_reward:Bright"]).reward.name == "my_reward:Bright"
    rc, err = run_main(capsys, "train", "--config", "mini_refl", "--set", "reward.name=my_reward:Nope")
    assert rc == 2 and "module 'my_reward' has no attribute 'Nope'" in err
    rc, err = run_main(capsys, "train", "--config", "mini_refl", "--set", "reward.name=no_such_module_q:R")
    assert rc == 2 and "cannot import module 'no_such_module_q'" in err

# ---------------------------------------------------------------------------------------------------- files out
def test_out_dir_under_a_file_or_read_only(capsys, tmp_path, folders, monkeypatch):
    (tmp_path/"afile").write_text("x")
    rc, err = run_main(capsys, *sample(folders, tmp_path)[:-1], tmp_path/"afile"/"sub")
    assert rc == 2 and "a part of this path is a file" in err
    import imagerefl.core
    def refuse(*a, **k): raise OSError(errno.EROFS, "Read-only file system", str(tmp_path/"out"))
    monkeypatch.setattr(imagerefl.core.tempfile, "mkstemp", refuse)
    rc, err = run_main(capsys, *sample(folders, tmp_path))
    assert rc == 2 and "the file system is read-only: choose another output folder" in err

def test_disk_full_is_one_line_and_leaves_no_torn_file(capsys, tmp_path, folders, monkeypatch):
    def full(self, fp, *a, **k):
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", full)
    rc, err = run_main(capsys, *sample(folders, tmp_path))
    assert rc == 2 and err == "imagerefl: error: No space left on device: the disk is full: free some space or choose another output folder"
    assert list((tmp_path/"out").iterdir()) == []                     # no half-written PNG, no manifest

def test_debug_shows_the_traceback(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("IMAGEREFL_DEBUG", "1")
    with pytest.raises(UserError, match="seed must be an integer"): main(["train", "--config", "mini_refl", "--set", "seed=x"])
    monkeypatch.delenv("IMAGEREFL_DEBUG")
    with pytest.raises(UserError): main(["--debug", "train", "--config", "mini_refl", "--set", "seed=x"])

def test_ctrl_c_is_one_line_and_status_130(capsys, monkeypatch):
    import imagerefl.cli
    def interrupted(a): raise KeyboardInterrupt
    monkeypatch.setattr(imagerefl.cli, "cmd_configs", interrupted)
    assert main(["configs"]) == 130 and capsys.readouterr().err.strip() == "imagerefl: interrupted"

def test_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert stat.S_IMODE(os.stat(atomic_write_text(tmp_path/"a.txt", "x")).st_mode) == 0o644
        assert stat.S_IMODE(os.stat(save_safetensors({"w": torch.ones(1)}, tmp_path/"w.safetensors")).st_mode) == 0o644
    finally: os.umask(old)

def test_sample_manifest_and_png_text(capsys, tmp_path, folders):
    rc, _ = run_main(capsys, *sample(folders, tmp_path, "--num-images", "2", "--seed", "5", model="comb"))
    assert rc == 0
    import pandas as pd
    m = pd.read_csv(tmp_path/"out"/"manifest.csv")
    assert m.file.tolist() == ["p00000_s000.png", "p00000_s001.png"] and m.seed.tolist() == [5, 6]
    assert (m.num_inference_steps == 1).all() and m.original_unet_steps.isna().all()     # the pipeline's default split
    text = Image.open(tmp_path/"out"/"p00000_s001.png").text
    assert (text["prompt"], text["seed"], text["guidance_scale"]) == ("a handwritten digit one", "6", "7.5")

# ---------------------------------------------------------------------------------------------------- exit codes
@pytest.mark.parametrize("argv", [["sample", "--model", "m", "--prompt", "a", "--out", "o", "--num-images", "-1"],
                                  ["sample", "--model", "m", "--prompt", "a", "--out", "o", "--steps", "0"],
                                  ["evaluate", "--model", "m", "--prompts", "p", "--out", "o", "--images-per-prompt", "0"]])
def test_counts_must_be_positive(capsys, argv):
    with pytest.raises(SystemExit) as e: main(argv)
    assert e.value.code == 2 and "is too small: give an integer >= 1" in capsys.readouterr().err

def _cli(*argv, **env):
    return subprocess.run([sys.executable, "-m", "imagerefl.cli", *map(str, argv)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), **env), timeout=300)

def test_subprocess_exit_codes():
    "The console entry point's statuses (a UserError's status 2 in a subprocess: test_cli.test_console_script_runs_as_module)."
    r = subprocess.run([sys.executable, "-c", "import sys; from imagerefl.cli import main, parser; parser().format_help();"
                        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"],
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert r.returncode == 0                                           # --help answers without importing torch
    r = _cli("--version"); assert (r.returncode, r.stdout.strip()) == (0, f"imagerefl {imagerefl.__version__}")
    r = _cli("sample", "--model", "m", "--prompt", "a", "--out", "o", "--num-images", "-1")
    assert r.returncode == 2 and "-1 is too small" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------------------------- slow
@pytest.mark.slow     # trains the mini world for two steps
def test_user_reward_trains_from_the_cli(tmp_path, monkeypatch):
    (tmp_path/"my_reward.py").write_text("import torch\nclass Bright(torch.nn.Module):\n"
        "    def __init__(self): super().__init__(); self.w = torch.nn.Parameter(torch.ones(1))\n"
        "    def forward(self, images, prompts): return self.w * images.mean((1, 2, 3))\n")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "mini_refl", "--set", "reward.name=my_reward:Bright", "--set", "max_steps=2",
                 "--set", "validation.every=0", "--set", f"out_dir={tmp_path/'run'}"]) == 0
    assert (tmp_path/"run"/"config.yaml").read_text().count("my_reward:Bright") == 1
