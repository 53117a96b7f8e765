"""PixArt-XL-2-512x512 and Stable Diffusion 3 medium pipelines at the real size of their transformers, random weights.

The transformers are built from their published configs (0.61 B and 2.03 B parameters). The text encoders and the VAE
are small stand-ins with the right output widths (T5 4096, CLIP 768 + 1280, 4 or 16 latent channels, downsampling 8;
the full T5-XXL alone is 4.7 B parameters), so what is measured is the transformer. Used by bench/gpu.py and by
tests/test_real_size_transformers.py.
"""
import torch
from diffusers import (AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler, PixArtAlphaPipeline,
                       PixArtTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

LORA_TARGETS = dict(pixart=["to_k", "to_q", "to_v", "to_out.0"],
                    sd3=["to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out"])
PARAMS_B = dict(pixart=0.61, sd3=2.03)

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

BUILDERS = dict(pixart=pixart_xl_512, sd3=sd3_medium)
