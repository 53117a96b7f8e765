"bench/gpu.py's CPU rehearsal: the GPU script's code paths run on tiny components, and a broken path fails loudly."
import ast, importlib, sys
from pathlib import Path
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]/"bench"))
import gpu  # noqa: E402


def test_gpu_bench_cpu_rehearsal(tmp_path, capsys):
    out = tmp_path/"gpu.md"
    assert gpu.main(["--cpu-rehearsal", "--objectives", "imagerefl", "--steps", "1", "--pairs", "2", "--out", str(out)]) == 0
    text = out.read_text()
    assert "A CPU rehearsal: these are not GPU figures" in text and "FAILED" not in text
    rows = [l.strip("| ").split(" | ") for l in text.splitlines() if l.startswith("| ") and not l.startswith(("| part", "| ---"))]
    assert len(rows) == 14 and all(len(r) == 4 and r[3].startswith("CPU rehearsal") for r in rows)   # the device beside every figure
    for what in ("bf16 autocast | ok", "fp16 sampling | ok", "SDPA attention | ok", "gradient checkpointing | ok", "8-bit Adam |",
                 "imagerefl, reference-like |", "imagerefl, ours-full |", "imagerefl, ours-lora |", "median ratio",
                 "| pixart | ImageReFL step, LoRA", "| pixart | combined (switch at the end)", "| sd3 | ImageReFL step, LoRA",
                 "| sd3 | combined (switch at the end)"):
        assert what in text, what


def test_gpu_bench_fails_loudly(tmp_path, monkeypatch):
    def broken(run, pipe): raise RuntimeError("no kernel image is available")
    monkeypatch.setattr(gpu, "check_sdpa", broken)
    assert gpu.main(["--cpu-rehearsal", "--objectives", "", "--pairs", "1", "--out", str(tmp_path/"gpu.md")]) == 1
    assert "| check | SDPA attention | FAILED: RuntimeError: no kernel image is available |" in (tmp_path/"gpu.md").read_text()
    assert gpu.main([]) == 2 or gpu.torch.cuda.is_available()                    # no GPU and no --cpu-rehearsal: refused


def test_reward_preprocessing_bench_pixels():
    "bench/reward_preprocessing.py's pixel table: HPS's paths agree on square images and not on non-square ones."
    import reward_preprocessing as rp
    t = rp.pixel_table()
    hps = t[t.reward.str.startswith("HPS")].groupby("shape").mean_abs.max()
    assert hps["square"] < 1e-6 and t[t.reward.str.startswith("HPS") & (t["shape"] == "non-square")].mean_abs.min() > 0.1
    at224 = t[t["size"] == "224x224"]
    assert len(at224) == 6 and at224.max_abs.max() < 1e-6                    # at the model's size every path agrees
    assert 0 < t[t.reward.str.startswith("ImageReward") & (t["size"] == "512x512")].mean_abs.min() < 0.01


def test_scripts_import_what_exists():
    "Every `from imagerefl... import name` in the benchmarks, tools and figure scripts (lazy ones included) names a module and attribute that exist."
    root, missing, n = Path(__file__).resolve().parents[1], [], 0
    for f in sorted([*root.glob("bench/*.py"), *root.glob("tools/*.py"), *root.glob("paper_figures/*.py")]):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "imagerefl":
                mod = importlib.import_module(node.module)
                for a in node.names:
                    n += 1
                    if not hasattr(mod, a.name):
                        try: importlib.import_module(f"{node.module}.{a.name}")
                        except ImportError: missing.append(f"{f.name}:{node.lineno} {node.module}.{a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "imagerefl": n += 1; importlib.import_module(a.name)
    assert n > 20 and not missing, missing
