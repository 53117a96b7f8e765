"""Heavier reward tests: the MPS pickle round trip against an independent re-implementation of the official code,
one-line errors for missing files / offline hub ids, preprocessing tolerance vs transformers' processor,
bf16 and gradient checkpointing on the transformers rewards, and (slow) the real ViT-H-14 HPS file format."""
import os, sys, types, json, math
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from pathlib import Path
import numpy as np, pytest, torch, torch.nn as nn, torch.nn.functional as F
from PIL import Image
from imagerefl.core import UserError
from imagerefl.rewards import load_reward, reward_names, register_reward, REWARDS, Reward
from imagerefl.rewards import convert_mps_checkpoint
from imagerefl.rewards.mps import MPS_CONDITION
from imagerefl.testing import tiny_clip_folder
from imagerefl.data import resize_center_crop
from imagerefl.rewards import normalize

PROMPTS = ["a photo of a cat", "an oil painting of a harbour at dusk"]

def _images(n=2, h=32, w=32, seed=0):
    u8 = [np.random.default_rng(seed + i).integers(0, 256, (h, w, 3), dtype=np.uint8) for i in range(n)]
    return u8, torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in u8]).float() / 255

def _one_line(excinfo): msg = str(excinfo.value); assert "\n" not in msg and msg; return msg

# ---------------------------------------------------------------------------------------------------------------
# An independent re-implementation of the official MPS modules (trainer/models/clip_model.py + cross_modeling.py of
# Kwai-Kolors/MPS), written in a different style from imagerefl's, with the same module names so torch.save pickles
# the same structure as MPS_overall_checkpoint.pth.
from transformers import CLIPModel as HFCLIPModel, CLIPConfig, CLIPImageProcessor, AutoTokenizer

class LayerNorm(nn.Module):
    def __init__(self, dim):
        super().__init__(); self.weight = nn.Parameter(torch.ones(dim)); self.register_buffer("bias", torch.zeros(dim))
    def forward(self, x): return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)

class Residual(nn.Module):
    def __init__(self, fn): super().__init__(); self.fn = fn
    def forward(self, x, *args, **kw): return self.fn(x, *args, **kw) + x

class SwiGLU(nn.Module):
    def forward(self, x):
        half = x.shape[-1] // 2
        return F.silu(x[..., half:]) * x[..., :half]

class RotaryEmbedding(nn.Module):
    def __init__(self, dim):
        super().__init__(); self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))
    def forward(self, n, *, device):
        freqs = torch.arange(n, device=device).float()[:, None] * self.inv_freq[None, :]
        return torch.cat((freqs, freqs), dim=-1)

def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

class ParallelTransformerBlock(nn.Module):
    def __init__(self, dim, dim_head=64, heads=8, ff_mult=4):
        super().__init__()
        self.norm, self.heads, self.scale = LayerNorm(dim), heads, dim_head ** -0.5
        self.fused_dims = (dim_head * heads, dim_head, dim_head, dim * ff_mult * 2)
        self.rotary_emb = RotaryEmbedding(dim_head)
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.fused_dims), bias=False)
        self.attn_out = nn.Linear(dim_head * heads, dim, bias=False)
        self.ff_out = nn.Sequential(SwiGLU(), nn.Linear(dim * ff_mult, dim, bias=False))
    def forward(self, x):
        b, n, _ = x.shape
        q, k, v, ff = self.fused_attn_ff_proj(self.norm(x)).split(self.fused_dims, dim=-1)
        q = q.reshape(b, n, self.heads, -1).permute(0, 2, 1, 3)
        pos = self.rotary_emb(n, device=x.device)
        q = q * pos.cos() + rotate_half(q) * pos.sin()
        k = k * pos.cos() + rotate_half(k) * pos.sin()
        sim = (q * self.scale) @ k[:, None].transpose(-1, -2)
        attn = (sim - sim.amax(dim=-1, keepdim=True).detach()).softmax(dim=-1)
        out = (attn @ v[:, None]).permute(0, 2, 1, 3).reshape(b, n, -1)
        return self.attn_out(out) + self.ff_out(ff)

class CrossAttention(nn.Module):
    def __init__(self, dim, *, dim_head=64, heads=12, parallel_ff=True, ff_mult=4):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm, self.context_norm = LayerNorm(dim), nn.Identity()
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, dim_head * 2, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim * 2, bias=False), SwiGLU(), nn.Linear(ff_mult * dim, dim, bias=False))
    def forward(self, x, context, mask):
        b, n, _ = x.shape
        x = self.norm(x)
        q = self.to_q(x).reshape(b, n, self.heads, -1).permute(0, 2, 1, 3) * self.scale
        k, v = self.to_kv(self.context_norm(context)).chunk(2, dim=-1)
        sim = q @ k[:, None].transpose(-1, -2) + mask[:, None].repeat(1, self.heads, 1, 1)
        attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
        out = (attn @ v[:, None]).permute(0, 2, 1, 3).reshape(b, n, -1)
        return self.to_out(out) + self.ff(x)

class Cross_model(nn.Module):
    def __init__(self, dim=512, layer_num=4, dim_head=64, heads=8, ff_mult=4):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleList([
            Residual(CrossAttention(dim=dim, dim_head=dim_head, heads=heads, parallel_ff=True, ff_mult=ff_mult)),
            Residual(ParallelTransformerBlock(dim=dim, dim_head=dim_head, heads=heads, ff_mult=ff_mult))])
            for _ in range(layer_num)])
    def forward(self, query_tokens, context_tokens, mask):
        for cross_attn, self_attn_ff in self.layers:
            query_tokens = self_attn_ff(cross_attn(query_tokens, context_tokens, mask))
        return query_tokens

class XCLIPModel(HFCLIPModel):
    def get_text_features(self, input_ids=None):
        out = self.text_model(input_ids=input_ids)
        return self.text_projection(out[0]), self.text_projection(out[1])
    def get_image_features(self, pixel_values=None):
        return self.visual_projection(self.vision_model(pixel_values=pixel_values)[0])

class CLIPModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = XCLIPModel(config)
        self.cross_model = Cross_model(dim=32, layer_num=2, dim_head=8, heads=4, ff_mult=2)
    @property
    def logit_scale(self): return self.model.logit_scale

def _official_mps_score(model, pixel_values, input_ids, condition_ids, threshold=0.01):
    "MPS' README / ImageReFL mps_score.py scoring, for one image and one prompt (batch of one)."
    with torch.no_grad():
        text_f, text_eos = model.model.get_text_features(input_ids)
        image_f = model.model.get_image_features(pixel_values)
        condition_f, _ = model.model.get_text_features(condition_ids)
        sim = torch.einsum("bid,bjd->bji", text_f, condition_f)
        sim = torch.max(sim, dim=1, keepdim=True)[0]
        sim = sim / sim.max()
        mask = torch.where(sim > threshold, 0, float("-inf")).repeat(1, image_f.shape[1], 1)
        img = model.cross_model(image_f, text_f, mask)[:, 0, :]
        img, txt = img / img.norm(dim=-1, keepdim=True), text_eos / text_eos.norm(dim=-1, keepdim=True)
        return (model.logit_scale.exp() * txt @ img.T)[0, 0]

@pytest.fixture(scope="module")
def mps_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mps")
    clip = tiny_clip_folder(d/"processor", seed=3, pad_token="!")        # laion's ViT-H-14 tokenizer pads with "!"
    cfg = HFCLIPModel.from_pretrained(clip).config
    # pretend to be the MPS repository while pickling, as torch.save(model) did there
    mods = {n: types.ModuleType(n) for n in ("trainer", "trainer.models", "trainer.models.clip_model", "trainer.models.cross_modeling")}
    for c in (LayerNorm, Residual, SwiGLU, RotaryEmbedding, ParallelTransformerBlock, CrossAttention, Cross_model):
        c.__module__ = "trainer.models.cross_modeling"; setattr(mods["trainer.models.cross_modeling"], c.__name__, c)
    for c in (XCLIPModel, CLIPModel):
        c.__module__ = "trainer.models.clip_model"; setattr(mods["trainer.models.clip_model"], c.__name__, c)
    sys.modules.update(mods)
    try:
        torch.manual_seed(7)
        model = CLIPModel(cfg).eval()
        for p in model.parameters(): p.data.normal_(0, 0.2)
        model.model.logit_scale.data.fill_(math.log(100.))
        torch.save(model, d/"MPS_overall_checkpoint.pth")
    finally:
        for n in mods: sys.modules.pop(n)                                  # the loader must not need the MPS code
    return d, model

def test_mps_pickle_needs_opt_in(mps_files):
    d, _ = mps_files
    with pytest.raises(UserError) as e: load_reward("mps", d/"MPS_overall_checkpoint.pth", processor_path=d/"processor")
    assert "allow_pickle=True" in _one_line(e) and "convert_mps_checkpoint" in str(e.value)

def test_mps_matches_official_scoring(mps_files):
    d, ref = mps_files
    tok, proc = AutoTokenizer.from_pretrained(d/"processor"), CLIPImageProcessor.from_pretrained(d/"processor")
    u8, x = _images(2, seed=5)
    expected = []
    for a, p in zip(u8, PROMPTS):           # MPS' own evaluation scores one image at a time
        ids = tok(p, max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids
        cond = tok(MPS_CONDITION, max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids
        expected.append(_official_mps_score(ref, proc(Image.fromarray(a), return_tensors="pt")["pixel_values"], ids, cond))
    expected = torch.stack(expected)
    r = load_reward("mps", d/"MPS_overall_checkpoint.pth", allow_pickle=True, processor_path=d/"processor")
    torch.testing.assert_close(r(x, PROMPTS), expected, atol=1e-4, rtol=1e-4)
    # the converted safetensors gives the same scores without unpickling anything
    dst = convert_mps_checkpoint(d/"MPS_overall_checkpoint.pth", d/"mps.safetensors")
    import imagerefl.rewards as R
    orig = R.read_mps_pickle
    R.read_mps_pickle = lambda *a: (_ for _ in ()).throw(AssertionError("unpickled"))
    try: r2 = load_reward("mps", dst, processor_path=d/"processor")
    finally: R.read_mps_pickle = orig
    torch.testing.assert_close(r2(x, PROMPTS), expected, atol=1e-4, rtol=1e-4)
    # differentiable, and the 0.3 threshold of MPS' eval script is available
    xg = x.clone().requires_grad_(True); r2(xg, PROMPTS).sum().backward(); assert xg.grad.abs().sum() > 0
    r3 = load_reward("mps", dst, processor_path=d/"processor", condition_threshold=0.3)
    a, p = u8[0], PROMPTS[0]
    ids = tok(p, max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids
    e3 = _official_mps_score(ref, proc(Image.fromarray(a), return_tensors="pt")["pixel_values"], ids, cond, threshold=0.3)
    torch.testing.assert_close(r3(x[:1], PROMPTS[:1])[0], e3, atol=1e-4, rtol=1e-4)

def test_mps_refuses_foreign_globals(tmp_path):
    class Evil:
        def __reduce__(self): return (os.system, (f"touch {tmp_path}/pwned",))
    torch.save({"model": Evil()}, tmp_path/"evil.pth")
    with pytest.raises(UserError) as e: load_reward("mps", tmp_path/"evil.pth", allow_pickle=True)
    assert "system" in _one_line(e) and not (tmp_path/"pwned").exists()

def test_mps_missing_and_wrong_files(tmp_path):
    with pytest.raises(UserError) as e: load_reward("mps")
    assert "MPS_overall_checkpoint.pth" in _one_line(e)
    with pytest.raises(UserError) as e: load_reward("mps", tmp_path/"nope.pth")
    assert "does not exist" in _one_line(e)
    from imagerefl.core import save_safetensors
    save_safetensors({"a": torch.zeros(1)}, tmp_path/"other.safetensors")
    with pytest.raises(UserError) as e: load_reward("mps", tmp_path/"other.safetensors")
    assert "convert_mps_checkpoint" in _one_line(e)

# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kw,needle", [
    ("hps-v2.1", {}, "hf download xswu/HPSv2 HPS_v2.1_compressed.pt"),
    ("hps-v2", {}, "hf download xswu/HPSv2 HPS_v2_compressed.pt"),
    ("imagereward", {}, "hf download THUDM/ImageReward ImageReward.pt"),
    ("pickscore", {}, "hf download yuvalkirstain/PickScore_v1"),
    ("clip-score", {}, "hf download openai/clip-vit-base-patch32"),
    ("hps-v2.1", {"path": "/no/such/HPS_v2.1_compressed.pt"}, "does not exist"),
    ("pickscore", {"path": "/no/such/folder"}, "does not exist"),
    ("clip-score", {"path": "someone/not-cached"}, "HF_HUB_OFFLINE=1"),
])
def test_missing_or_offline_is_one_line(monkeypatch, name, kw, needle):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as e: load_reward(name, **kw)
    assert needle in _one_line(e)

def test_imagereward_needs_bert_vocab(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path/"ImageReward.pt").write_bytes(b"")
    with pytest.raises(UserError) as e: load_reward("imagereward", tmp_path)
    assert "bert-base-uncased vocab.txt" in _one_line(e) and "tokenizer_path=" in str(e.value)

def test_bad_options_and_inputs(tmp_path):
    with pytest.raises(UserError) as e: load_reward("hps-v2.1", tmp_path, colour="red")
    assert "colour" in _one_line(e)
    with pytest.raises(UserError) as e: load_reward("hps-v2.1", tmp_path)          # a folder without the file
    assert "has no HPS_v2.1_compressed.pt" in _one_line(e)
    (tmp_path/"HPS_v2.1_compressed.pt").write_text("not a torch file")
    with pytest.raises(UserError) as e: load_reward("hps-v2.1", tmp_path, arch=dict(embed_dim=8,
        vision_cfg=dict(image_size=16, layers=1, width=16, patch_size=8, head_width=8),
        text_cfg=dict(context_length=77, vocab_size=49408, width=16, heads=1, layers=1)))
    assert "not a readable HPS checkpoint" in _one_line(e)

def test_registry_is_extensible():
    class MeanPixel(Reward):                                            # a Reward subclass: the base does the preprocessing
        def __init__(self): super().__init__(size=8); self.w = nn.Parameter(torch.ones(1))
        def score(self, px, prompts): return self.w * px.mean((1, 2, 3))
    @register_reward("brightness")
    def _load(path=None, arch=None): return MeanPixel()
    try:
        assert "brightness" in reward_names()
        r = load_reward("brightness")
        assert not r.training and not r.w.requires_grad
        _, x = _images(2)
        assert r(x, PROMPTS).shape == (2,)
        with pytest.raises(UserError) as e: r(x, PROMPTS[:1])
        assert "one prompt string per image" in _one_line(e)
        with pytest.raises(UserError) as e: r(x[0], PROMPTS)
        assert "(B,3,H,W)" in _one_line(e)
    finally: REWARDS.pop("brightness")

# ---------------------------------------------------------------------------------------------------------------
def test_preprocessing_tolerance_vs_transformers_processor():
    "Our torch path vs transformers' CLIPImageProcessor (uint8 torchvision resize, floor crop) on a real photo."
    from sklearn.datasets import load_sample_image
    img = np.array(load_sample_image("china.jpg"))                          # 427 x 640
    proc = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    ref = proc(Image.fromarray(img), return_tensors="pt")["pixel_values"][0]
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    ours = normalize(resize_center_crop(x, 224, rounding="floor"), proc.image_mean, proc.image_std)[0]
    d = (ours - ref).abs() * torch.tensor(proc.image_std).view(3, 1, 1)     # in [0,1] pixel units
    print(f"vs CLIPImageProcessor: mean {d.mean():.5f}, max {d.max():.5f}")
    # measured: mean 0.0011, max 0.0159 (uint8 rounding, and bicubic overshoot that uint8 clips and we keep)
    assert d.mean() < 1/255 and d.max() < 0.02
    # the round crop of torchvision would be one pixel off here: the convention matters
    off = normalize(resize_center_crop(x, 224, rounding="round"), proc.image_mean, proc.image_std)[0]
    assert ((off - ref).abs() * torch.tensor(proc.image_std).view(3, 1, 1)).mean() > 2 * d.mean()

def test_transformers_rewards_bf16_and_checkpointing(tmp_path):
    clip = tiny_clip_folder(tmp_path/"clip", seed=1)
    _, x = _images(2, 48, 40, seed=2)
    r = load_reward("pickscore", clip)
    s = r(x, PROMPTS)
    r16 = load_reward("pickscore", clip, dtype=torch.bfloat16)
    assert r16.dtype == torch.bfloat16 and r16(x, PROMPTS).dtype == torch.float32
    torch.testing.assert_close(r16(x, PROMPTS), s, atol=1.5, rtol=0.02)      # logit scale 100: bf16 ~ 3 digits
    def grad(m):
        xg = x.clone().requires_grad_(True); m(xg, PROMPTS).sum().backward(); return xg.grad
    rc = load_reward("pickscore", clip, gradient_checkpointing=True)
    calls = []
    rc.vision_blocks()[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    torch.testing.assert_close(grad(rc), grad(r))
    assert len(calls) == 2 and not rc.training                               # recomputed in backward, in eval mode

# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow     # builds the real ViT-H-14 (986 M params, ~5 GB RAM)
def test_real_hps_file_format_round_trip(tmp_path):
    import open_clip
    torch.manual_seed(0)
    m = open_clip.create_model("ViT-H-14", pretrained=None)
    torch.save({"state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}}, tmp_path/"HPS_v2.1_compressed.pt")
    del m
    r = load_reward("hps-v2.1", tmp_path)
    assert sum(p.numel() for p in r.parameters()) > 9.8e8 and r.size == 224
    _, x = _images(1, 256, 320)
    assert torch.isfinite(r(x, PROMPTS[:1])).all()
