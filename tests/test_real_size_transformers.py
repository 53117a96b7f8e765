"""One LoRA training step of PixArt-α and Stable Diffusion 3 at the real size of their transformers, on the CPU.

The transformers are built from the published configs of PixArt-XL-2-512x512 (0.6 B parameters) and
stable-diffusion-3-medium (2.0 B) with random weights; what the tiny test components hide shows here: head sizes,
the T5 width (4096) the captions are projected from, SD3's 16 latent channels and joint attention over image and
text tokens, LoRA on the real block layout. The text encoders and the VAE are small stand-ins of the right output
widths (the full T5-XXL alone is 4.7 B parameters), images are 256 px (32 x 32 latents, 256 image tokens), fp32.

Slow (minutes, peak RSS about 12 GB): IMAGEREFL_SLOW=1 python -m pytest tests/test_real_size_transformers.py -s
"""
import os, resource, time
import pytest, torch
from diffusers import (AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler, PixArtAlphaPipeline,
                       PixArtTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline)
from peft import LoraConfig
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

pytestmark = pytest.mark.skipif(os.environ.get("IMAGEREFL_SLOW") != "1",
                                reason="slow: PixArt-XL-2 and SD3-medium transformers on the CPU (minutes, ~12 GB); IMAGEREFL_SLOW=1")
RES = 256

def _vae(latent_channels, **kw):
    "A small VAE with the real downsampling factor 8."
    return AutoencoderKL(block_out_channels=[16, 16, 16, 16], in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                         layers_per_block=1, norm_num_groups=8, **kw)

def _t5(tok, d_model=4096):
    return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=d_model, d_kv=64, d_ff=64, num_layers=1, num_heads=2,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)).eval()

def _clip(tok, hidden):
    return CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=64,
        num_attention_heads=4, num_hidden_layers=1, max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)).eval()

def pixart_xl_512():
    from imagerefl.testing import tiny_t5_tokenizer
    tok = tiny_t5_tokenizer(120)
    tr = PixArtTransformer2DModel(sample_size=64, num_layers=28, patch_size=2, attention_head_dim=72, num_attention_heads=16,
                                  caption_channels=4096, in_channels=4, out_channels=8, cross_attention_dim=1152,
                                  attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                  norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    sched = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000)
    return PixArtAlphaPipeline(tokenizer=tok, text_encoder=_t5(tok), vae=_vae(4), transformer=tr, scheduler=sched)

def sd3_medium():
    from imagerefl.mini.components import clip_tokenizer
    from imagerefl.testing import tiny_t5_tokenizer
    tok, tok2, tok3 = clip_tokenizer(), clip_tokenizer(pad_token="!"), tiny_t5_tokenizer(256)
    tr = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                               attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                               caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
    return StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=_vae(16, scaling_factor=1.5305, shift_factor=0.0609), text_encoder=_clip(tok, 768),
                                    tokenizer=tok, text_encoder_2=_clip(tok2, 1280), tokenizer_2=tok2,
                                    text_encoder_3=_t5(tok3), tokenizer_3=tok3)

@pytest.mark.parametrize("build,params_b,targets", [
    (pixart_xl_512, 0.61, ["to_k", "to_q", "to_v", "to_out.0"]),
    (sd3_medium, 2.03, ["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"])])
def test_one_lora_imagerefl_step_at_real_size(build, params_b, targets):
    from imagerefl.diffusion import Backbone
    from imagerefl.objectives import ImageReFL, ImageReFLConfig
    torch.manual_seed(0); t0 = time.time()
    bb = Backbone(build(), num_inference_steps=40, resolution=RES).freeze()
    n = sum(p.numel() for p in bb.transformer.parameters())
    assert abs(n / 1e9 - params_b) < 0.02, n               # the published size
    bb.transformer.requires_grad_(False)
    bb.add_lora(LoraConfig(r=64, lora_alpha=64, init_lora_weights="gaussian", target_modules=targets))
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
    print(f"\n{build.__name__}: {n / 1e9:.2f} B parameters, LoRA {sum(p.numel() for p in lora) / 1e6:.1f} M, one step at "
          f"{RES} px in {time.time() - t0:.0f} s (build included), peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB, "
          f"loss {loss.item():.4g}")
