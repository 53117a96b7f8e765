"Integration tests for imagerefl.metrics: evaluation runs on the tiny pipeline, resume, grouping, FID/KID, summaries."
import json, os
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch, torch.nn as nn
from PIL import Image
from scipy import stats, linalg
from imagerefl.core import UserError
from imagerefl.data import ImageCaptionDataset, pil_to_tensor
from imagerefl.metrics import (pairwise_diversity, summarize, DinoFeatures, ClipImageFeatures, InceptionFeatures,
                               load_features, image_distances)
from imagerefl.evaluate import image_seed, evaluate, model_id
from imagerefl.testing import tiny_sd_pipeline, Brightness as _Brightness
from transformers import ViTConfig, ViTModel

PROMPTS = ["a cat", "a red dog", "a small house"]
FAST = dict(num_inference_steps=2, height=32, width=32, guidance_scale=1.0)      # no CFG: half the UNet work
CFG = dict(FAST, guidance_scale=7.5)


def one_line_user_error(f, contains):
    with pytest.raises(UserError) as e: f()
    assert contains in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.fixture(scope="module")
def dino():
    torch.manual_seed(0)
    return DinoFeatures(ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                           image_size=32, patch_size=8), add_pooling_layer=False))


@pytest.fixture(scope="module")
def pipe(): return tiny_sd_pipeline(seed=0)


class Counting:
    "A sampler wrapper that records how many images each call asked for."
    def __init__(self, pipe): self.pipe, self.calls = pipe, []
    def __call__(self, **kw):
        assert len(kw["generator"]) == len(kw["prompt"])
        self.calls.append(len(kw["prompt"])); return self.pipe(**kw)


def Brightness(): return _Brightness(per_char=0.01).requires_grad_(False)   # mean brightness + 0.01 per prompt character, counting


def load(path): return pil_to_tensor(Image.open(path))


def test_diversity_known_answers_and_brute_force():
    q = torch.from_numpy(linalg.hadamard(16) / 4.0)                        # orthonormal rows
    d = pairwise_diversity(torch.cat([q[:5] * 4, q[:1].expand(4, 16)]), [7]*5 + ["x"]*4).set_index("prompt_id")
    np.testing.assert_allclose(d.diversity.loc[[7, "x"]].to_numpy(), [1.0, 0.0], atol=1e-12)
    # random features, scattered group ids: equal to a brute-force loop over pairs
    g = torch.Generator().manual_seed(0)
    f = torch.randn(30, 8, generator=g); ids = torch.randint(0, 4, (30,), generator=g).tolist()
    d = pairwise_diversity(f, ids).set_index("prompt_id")
    for p in set(ids):
        idx = [i for i, x in enumerate(ids) if x == p]
        cos = [float(torch.nn.functional.cosine_similarity(f[i], f[j], dim=0)) for a, i in enumerate(idx) for j in idx[a+1:]]
        assert d.n_images[p] == len(idx)
        np.testing.assert_allclose(d.diversity[p], 1 - np.mean(cos), rtol=1e-6)


def test_summarize_t_interval():
    v = np.random.default_rng(0).normal(3, 2, 25)
    s = summarize(v, confidence=0.9)
    lo, hi = stats.t.interval(0.9, 24, loc=v.mean(), scale=stats.sem(v))
    np.testing.assert_allclose([s.mean, s.ci_low, s.ci_high], [v.mean(), lo, hi])
    assert s.n == 25 and summarize([]).n == 0


def test_image_seed_deterministic_and_distinct():
    seeds = {image_seed(0, p, s) for p in range(50) for s in range(10)}
    assert len(seeds) == 500
    assert image_seed(0, 3, 2) == image_seed(0, 3, 2) != image_seed(1, 3, 2)


def test_batch_size_independence_and_grouping(tmp_path, pipe, dino):
    "Same images and same per-prompt diversity for batch sizes 1, 3 and 7 (batches of 3 and 7 straddle prompts)."
    runs = {bs: evaluate(pipe, PROMPTS, tmp_path/f"bs{bs}", images_per_prompt=2, batch_size=bs, features=dict(dino=dino),
                         sampler_kwargs=CFG, progress=False) for bs in (1, 3, 7)}
    base = runs[1]
    for bs, ev in runs.items():
        assert ev.images[["prompt_id", "sample", "seed", "path"]].equals(base.images[["prompt_id", "sample", "seed", "path"]])
        for p in base.images.path:
            a, b = load(tmp_path/"bs1"/p), load(tmp_path/f"bs{bs}"/p)
            assert (a - b).abs().max() <= 1/255 + 1e-6, (bs, p)
        np.testing.assert_allclose(ev.diversity.diversity_dino, base.diversity.diversity_dino, atol=1e-4)
    # the grouping is by prompt: recompute from the saved images with the prompt ids
    ims = torch.stack([load(tmp_path/"bs7"/p) for p in base.images.path])
    with torch.no_grad(): f = dino(ims)
    want = pairwise_diversity(f, base.images.prompt_id).diversity.to_numpy()
    np.testing.assert_allclose(runs[7].diversity.diversity_dino, want, rtol=1e-5)
    # the images of one prompt differ from each other (independent noise per image)
    assert (load(tmp_path/"bs1"/base.images.path[0]) - load(tmp_path/"bs1"/base.images.path[1])).abs().max() > 0.05


def test_resume_skips_existing_images_and_scores(tmp_path, pipe):
    smp, rew = Counting(pipe), Brightness()
    kw = dict(images_per_prompt=2, batch_size=4, rewards=dict(bright=rew), sampler_kwargs=FAST, progress=False)
    ev = evaluate(smp, PROMPTS, tmp_path, **kw)
    assert smp.calls == [4, 2] and rew.scored == 6
    first = {p: load(tmp_path/p) for p in ev.images.path}
    os.remove(tmp_path/ev.images.path[1]); os.remove(tmp_path/ev.images.path[4])
    (tmp_path/ev.images.path[5]).write_bytes(b"half a png")            # a torn file is made again
    ev2 = evaluate(smp, PROMPTS, tmp_path, **kw)
    assert smp.calls == [4, 2, 3] and rew.scored == 9                   # only the three missing images
    for p in ev.images.path: assert (load(tmp_path/p) - first[p]).abs().max() <= 1/255 + 1e-6
    np.testing.assert_allclose(ev2.images.bright, ev.images.bright, atol=2e-3)
    ev3 = evaluate(smp, PROMPTS, tmp_path, **kw)                        # nothing left to do
    assert smp.calls == [4, 2, 3] and rew.scored == 9
    pd.testing.assert_frame_equal(ev3.images, ev2.images)
    # more images per prompt and more prompts: only the new ones are made
    ev4 = evaluate(smp, PROMPTS + ["a boat"], tmp_path, **{**kw, "images_per_prompt": 3})
    assert sum(smp.calls) == 9 + 4 + 2 and len(ev4.images) == 12
    one_line_user_error(lambda: evaluate(smp, PROMPTS, tmp_path, **{**kw, "seeds": 5}), "use a new out_dir")
    one_line_user_error(lambda: evaluate(smp, PROMPTS, tmp_path, **{**kw, "sampler_kwargs": {**FAST, "guidance_scale": 3.0}}), "sampler_kwargs")
    one_line_user_error(lambda: evaluate(smp, ["another"] + PROMPTS, tmp_path, **kw), "another prompt list")


def test_summary_matches_per_image_table(tmp_path, pipe, dino):
    # reference = a folder of real-looking images (random blocks), written first
    ref = tmp_path/"ref"; ref.mkdir()
    rng = np.random.default_rng(0)
    for k in range(6): Image.fromarray(np.kron(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))).save(ref/f"{k}.png")
    ev = evaluate(pipe, PROMPTS, tmp_path/"run", images_per_prompt=3, batch_size=5, rewards=dict(bright=Brightness()),
                  features=dict(dino=dino), sampler_kwargs=FAST, progress=False, reference_images=ref, fid_features=dino)
    table = pd.read_csv(tmp_path/"run"/"images.csv")
    assert list(table.columns) == ["prompt_id", "prompt", "sample", "seed", "path", "bright"]
    ims = torch.stack([load(tmp_path/"run"/p) for p in table.path])
    np.testing.assert_allclose(table.bright, Brightness()(ims, table.prompt.tolist()).numpy(), rtol=1e-5)
    summary = pd.read_csv(tmp_path/"run"/"summary.csv").set_index("metric")
    assert list(summary.index) == ["bright", "diversity_dino", "fid", "kid"]
    per_prompt = table.groupby("prompt_id").bright.mean()
    lo, hi = stats.t.interval(0.95, 2, loc=per_prompt.mean(), scale=stats.sem(per_prompt))
    np.testing.assert_allclose(summary.loc["bright", ["mean", "ci_low", "ci_high"]].to_numpy(float), [table.bright.mean(), lo, hi], rtol=1e-6)
    div = pd.read_csv(tmp_path/"run"/"diversity.csv")
    assert div.n_images.tolist() == [3, 3, 3] and div.prompt.tolist() == PROMPTS
    np.testing.assert_allclose(summary.loc["diversity_dino", "mean"], div.diversity_dino.mean(), rtol=1e-9)
    # FID/KID equal a direct computation on the saved PNGs and the reference folder
    direct = image_distances(ims, ref, dino, resolution=32)
    np.testing.assert_allclose(summary.loc["fid", "mean"], direct["fid"], rtol=1e-4)
    np.testing.assert_allclose(summary.loc["kid", "mean"], direct["kid"], rtol=1e-4, atol=1e-7)
    # and FID of the generated set with itself (reference = the run's own PNG folder) is ~0
    self_ = image_distances(ims, tmp_path/"run"/"images", dino, resolution=32)
    assert abs(self_["fid"]) < 1e-3 * direct["fid"]


def test_fid_against_scipy_and_input_forms(tmp_path, dino):
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(50, 3, 32, 32, generator=g), torch.rand(40, 3, 32, 32, generator=g) ** 2
    r = image_distances(a, b, dino, batch_size=13, kid_subset_size=20)
    with torch.no_grad(): fa, fb = dino(a).double().numpy(), dino(b).double().numpy()
    ca, cb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    want = ((fa.mean(0) - fb.mean(0))**2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    np.testing.assert_allclose(r["fid"], want, rtol=1e-3)
    assert (r["n_generated"], r["n_reference"]) == (50, 40)
    # the same images given as a Dataset and as an iterable of batches give the same numbers
    ds = ImageCaptionDataset(list(b), [""] * len(b), 32)
    r2 = image_distances(list(a.split(7)), ds, dino, kid_subset_size=20)
    np.testing.assert_allclose([r2["fid"], r2["kid"]], [r["fid"], r["kid"]], rtol=1e-5)
    one_line_user_error(lambda: image_distances(a[:1], b, dino), "at least 2")
    one_line_user_error(lambda: image_distances(a, tmp_path/"nope", dino), "does not exist")


def test_default_inception_is_one_line_when_unavailable():
    try: InceptionFeatures()
    except UserError as e: assert "\n" not in str(e) and "feature" in str(e)
    else: pytest.skip("torch-fidelity and its Inception weights are available here")


def test_clip_features_and_registry(tmp_path):
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(0)
    m = CLIPModel(CLIPConfig(text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, bos_token_id=0, eos_token_id=1, pad_token_id=1), vision_config=dict(hidden_size=32,
        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=8), projection_dim=16))
    m.save_pretrained(tmp_path/"clip")
    x = torch.rand(2, 3, 64, 80)
    torch.testing.assert_close(load_features("clip", str(tmp_path/"clip"), "cpu")(x), ClipImageFeatures(m)(x))
    one_line_user_error(lambda: load_features("clip", str(tmp_path/"missing")), "does not exist")
    one_line_user_error(lambda: load_features("dino"), "HF_HUB_OFFLINE=1")


def test_bad_inputs_one_line(tmp_path, pipe):
    one_line_user_error(lambda: evaluate(pipe, [], tmp_path), "prompt list is empty")
    one_line_user_error(lambda: evaluate(pipe, PROMPTS, tmp_path, images_per_prompt=2, seeds=[1, 2, 3]), "one per sample")
    one_line_user_error(lambda: evaluate(pipe, PROMPTS, tmp_path, features=dict(d="dino")), "HF_HUB_OFFLINE=1")
    (tmp_path/"empty.txt").write_text("")
    one_line_user_error(lambda: evaluate(pipe, str(tmp_path/"empty.txt"), tmp_path), "no prompts")


def test_pil_sampler_and_explicit_seed_list(tmp_path):
    "Any callable with the diffusers convention works, also one returning PIL images; a seed list is shared by prompts."
    def sampler(prompt, generator, output_type, **kw):
        class Out: pass
        o = Out(); o.images = [Image.fromarray((torch.rand(8, 8, 3, generator=g) * 255).byte().numpy()) for g in generator]
        return o
    ev = evaluate(sampler, PROMPTS, tmp_path, images_per_prompt=2, seeds=[11, 12], batch_size=4, progress=False)
    assert ev.images.seed.tolist() == [11, 12] * 3
    a, b = load(tmp_path/ev.images.path[0]), load(tmp_path/ev.images.path[2])
    assert torch.equal(a, b)                                           # same seed, same noise image
    want = (torch.rand(8, 8, 3, generator=torch.Generator().manual_seed(12)) * 255).byte().permute(2, 0, 1).float() / 255
    assert torch.equal(load(tmp_path/ev.images.path[1]), want)


def test_run_folder_refuses_another_model(tmp_path, pipe):
    "Model B evaluated into model A's folder is refused (it used to exit 0 with A's numbers); the same model resumes."
    kw = dict(images_per_prompt=1, batch_size=3, rewards=dict(bright=Brightness()), sampler_kwargs=FAST, progress=False)
    evaluate(pipe, PROMPTS, tmp_path, **kw)
    assert json.loads((tmp_path/"run.json").read_text())["model"] == model_id(pipe)
    one_line_user_error(lambda: evaluate(tiny_sd_pipeline(seed=1), PROMPTS, tmp_path, **kw), "another model")
    tuned = tiny_sd_pipeline(seed=0)
    with torch.no_grad(): tuned.unet.conv_out.weight.mul_(1.01)                # a "fine-tuned" UNet, everything else equal
    one_line_user_error(lambda: evaluate(tuned, PROMPTS, tmp_path, **kw), "another model")
    smp = Counting(tiny_sd_pipeline(seed=0))                                   # the same weights, wrapped: accepted, nothing made
    evaluate(smp, PROMPTS, tmp_path, **kw)
    assert smp.calls == []
    # the CLI: a pipeline folder evaluated into a folder made by another one
    from imagerefl.cli import main
    pipe.save_pretrained(tmp_path/"A"); tiny_sd_pipeline(seed=1).save_pretrained(tmp_path/"B")
    args = ["evaluate", "--prompts", str(tmp_path/"p.txt"), "--steps", "2", "--guidance-scale", "1", "--images-per-prompt", "1", "--device", "cpu"]
    (tmp_path/"p.txt").write_text("a cat\n")
    assert main(args + ["--model", str(tmp_path/"A"), "--out", str(tmp_path/"cli")]) == 0
    assert main(args + ["--model", str(tmp_path/"B"), "--out", str(tmp_path/"cli")]) == 2


def test_damaged_images_csv_and_run_json(tmp_path, pipe):
    "A row cut mid-value is not reused (it was: a wrong number, exit 0); empty files give one line, never a traceback."
    smp, rew = Counting(pipe), Brightness()
    kw = dict(images_per_prompt=2, batch_size=4, rewards=dict(bright=rew), sampler_kwargs=FAST, progress=False)
    ev = evaluate(smp, PROMPTS, tmp_path, **kw)
    f = tmp_path/"images.csv"
    text = f.read_text(); full = text.rstrip("\n").rsplit(",", 1)[1]
    f.write_text(text.rstrip("\n")[:-4])                                       # the last reward loses its last 4 digits
    assert float(text.rstrip("\n")[:-4].rsplit(",", 1)[1]) != float(full)      # ... and still parses as a number
    with pytest.warns(UserWarning, match="1 damaged row"): ev2 = evaluate(smp, PROMPTS, tmp_path, **kw)
    assert smp.calls == [4, 2, 1] and rew.scored == 7                          # the cut row's image made and scored again
    np.testing.assert_allclose(ev2.images.bright, ev.images.bright, rtol=1e-6)
    assert pd.read_csv(f).bright.iloc[-1] == pytest.approx(float(full), rel=1e-9)
    # a garbled row in the middle (its path unreadable): dropped and scored again
    lines = f.read_text().splitlines(keepends=True); lines[2] = lines[2].replace(",", ";", 2)
    f.write_text("".join(lines))
    with pytest.warns(UserWarning, match="1 damaged row"): evaluate(smp, PROMPTS, tmp_path, **kw)
    assert smp.calls == [4, 2, 1] and rew.scored == 8
    f.write_text("")                                                           # empty: every reward computed again, no traceback
    with pytest.warns(UserWarning, match="is empty"): ev3 = evaluate(smp, PROMPTS, tmp_path, **kw)
    assert smp.calls == [4, 2, 1] and rew.scored == 8 + 6
    np.testing.assert_allclose(ev3.images.bright, ev.images.bright, rtol=1e-6)
    for bad in ("", "{\"seeds\": 0", "[]"):                                   # empty, cut, not a run record
        (tmp_path/"run.json").write_text(bad)
        one_line_user_error(lambda: evaluate(smp, PROMPTS, tmp_path, **kw), "run.json is empty or damaged")
    assert not list(tmp_path.glob(".*.tmp")) and not list((tmp_path/"images").glob(".*.tmp"))   # no temporary file left


def test_diversity_with_one_image_per_prompt_is_refused_before_sampling(tmp_path):
    calls = []
    def smp(**kw): calls.append(kw); raise AssertionError("no image may be made")
    one_line_user_error(lambda: evaluate(smp, PROMPTS, tmp_path/"e", images_per_prompt=1, features=dict(pool=nn.Flatten())),
                        "so it needs images_per_prompt >= 2 (got 1)")
    assert not calls and not (tmp_path/"e").exists()
