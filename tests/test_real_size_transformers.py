"""One LoRA training step of PixArt-α and Stable Diffusion 3 at the real size of their transformers, on the CPU.

The transformers are built from the published configs of PixArt-XL-2-512x512 (0.6 B parameters) and
stable-diffusion-3-medium (2.0 B) with random weights; what the tiny test components hide shows here: head sizes,
the T5 width (4096) the captions are projected from, SD3's 16 latent channels and joint attention over image and
text tokens, LoRA on the real block layout. The text encoders and the VAE are small stand-ins of the right output
widths (the full T5-XXL alone is 4.7 B parameters), images are 256 px (32 x 32 latents, 256 image tokens), fp32.

Slow (minutes, peak RSS about 12 GB): python -m pytest -m slow tests/test_real_size_transformers.py -s
"""
import os, resource, sys, time
from pathlib import Path
import pytest, torch
from peft import LoraConfig

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow      # PixArt-XL-2 and SD3-medium transformers on the CPU (minutes, ~12 GB)
RES = 256

@pytest.mark.parametrize("family", ["pixart", "sd3"])
def test_one_lora_imagerefl_step_at_real_size(family):
    sys.path.insert(0, str(ROOT/"bench"))
    from transformers_size import BUILDERS, LORA_TARGETS, PARAMS_B
    from imagerefl.diffusion import Backbone
    from imagerefl.objectives import ImageReFL, ImageReFLConfig
    torch.manual_seed(0); t0 = time.time()
    bb = Backbone(BUILDERS[family](), num_inference_steps=40, resolution=RES).freeze()
    n = sum(p.numel() for p in bb.transformer.parameters())
    assert abs(n / 1e9 - PARAMS_B[family]) < 0.02, n               # the published size
    bb.transformer.requires_grad_(False)
    bb.add_lora(LoraConfig(r=64, lora_alpha=64, init_lora_weights="gaussian", target_modules=LORA_TARGETS[family]))
    bb.enable_memory_savings()                              # gradient checkpointing, as on a GPU
    lora = [p for p in bb.transformer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(lora, lr=1e-4)
    reward = lambda images, prompts: images.mean((1, 2, 3))
    batch = dict(caption=["a photo of a cat"], image=torch.rand(1, 3, RES, RES))
    loss, logs = ImageReFL(ImageReFLConfig(start_index=38, max_mid_index=40))(bb, batch, reward)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora)
    before = [p.detach().clone() for p in lora]; opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, lora))
    print(f"\n{family}: {n / 1e9:.2f} B parameters, LoRA {sum(p.numel() for p in lora) / 1e6:.1f} M, one step at "
          f"{RES} px in {time.time() - t0:.0f} s (build included), peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB, "
          f"loss {loss.item():.4g}")
