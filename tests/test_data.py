"Integration and fault tests for imagerefl.data: files on disk, corrupt images, prompt files, the mini world."
import json, os, warnings
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np, pytest, torch
from PIL import Image
from torch.utils.data import DataLoader
from imagerefl.core import UserError
from imagerefl.data import (ImageCaptionDataset, collate, fit_image, pil_to_tensor, resize_center_crop, load_prompts,
                            load_image_captions)
from imagerefl.mini.data import mini_digits, digit_from_prompt, MINI_DIGIT_WORDS, mini_prompt


def one_line_user_error(f, contains):
    with pytest.raises(UserError) as e: f()
    msg = str(e.value)
    assert contains in msg and "\n" not in msg, msg
    return msg


def test_fit_known_answer_landscape_and_portrait():
    # 40 x 24 (w x h): shorter side 24 -> 12, width 40 -> 20; centre crop keeps columns 4..16 of the resized image,
    # i.e. columns 8..32 of the original. Columns 0..8 red, 8..32 green, 32..40 blue: the crop must be all green.
    a = np.zeros((24, 40, 3), np.uint8); a[:, :8, 0] = 255; a[:, 8:32, 1] = 255; a[:, 32:, 2] = 255
    out = pil_to_tensor(fit_image(Image.fromarray(a), 12))
    assert out.shape == (3, 12, 12)
    torch.testing.assert_close(out[:, :, 1:-1], torch.tensor([0., 1., 0.])[:, None, None].expand(3, 12, 10), atol=0.02, rtol=0)
    # squashing (the reference's Resize((R, R))) would have kept red and blue at the borders:
    squash = pil_to_tensor(Image.fromarray(a).resize((12, 12), Image.Resampling.BILINEAR))
    assert squash[0, :, 0].mean() > 0.5 and squash[2, :, -1].mean() > 0.5
    port = pil_to_tensor(fit_image(Image.fromarray(a.transpose(1, 0, 2).copy()), 12))
    torch.testing.assert_close(port, out.transpose(1, 2))


def test_fit_matches_torchvision_resize_then_crop():
    import torchvision.transforms as T
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (60, 100, 3), dtype=np.uint8)
    a = np.kron(a[::4, ::4], np.ones((4, 4, 1), np.uint8))[:60, :100]        # smooth-ish content, 60 x 100
    ref = T.Compose([T.Resize(30, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(30), T.PILToTensor()])(Image.fromarray(a)).float() / 255
    ours = pil_to_tensor(fit_image(Image.fromarray(a), 30))
    assert (ours - ref).abs().mean() < 0.02       # crop-then-resize vs resize-then-crop differ only at sub-pixel level


def test_resize_center_crop_tensor_matches_pil_on_downscale():
    a = (np.random.default_rng(1).random((48, 80, 3)) * 255).astype(np.uint8)
    t = torch.from_numpy(a).permute(2, 0, 1).float()[None] / 255
    out = resize_center_crop(t, 24)[0]
    assert out.shape == (3, 24, 24)
    assert (out - pil_to_tensor(fit_image(Image.fromarray(a), 24))).abs().mean() < 0.03


def write_folder(d, n=4, extra=()):
    rng = np.random.default_rng(0)
    (d/"sub").mkdir()
    rows = []
    for k in range(n):
        name = f"sub/{k}.png" if k % 2 else f"{k}.jpg"
        Image.fromarray(rng.integers(0, 256, (16 + 4*k, 24, 3), dtype=np.uint8)).save(d/name)
        rows.append(dict(file_name=name, text=f"a photo number {k} — ünïcode"))
    rows += list(extra)
    (d/"metadata.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return rows


def test_imagefolder_round_trip(tmp_path):
    rows = write_folder(tmp_path)
    ds = load_image_captions(str(tmp_path), resolution=12)
    assert (len(ds), ds.skipped) == (4, 0)
    for k, r in enumerate(rows):
        it = ds[k]
        assert it["caption"] == r["text"] and it["index"] == k
        torch.testing.assert_close(it["image"], pil_to_tensor(fit_image(Image.open(tmp_path/r["file_name"]), 12)))
    b = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate)))
    assert b["image"].shape == (3, 3, 12, 12) and b["caption"] == [r["text"] for r in rows[:3]]
    assert b["index"].tolist() == [0, 1, 2]
    assert load_prompts(str(tmp_path)) == [r["text"] for r in rows]


def test_imagefolder_metadata_csv(tmp_path):
    Image.new("RGB", (10, 20), (255, 0, 0)).save(tmp_path/"a.png")
    (tmp_path/"metadata.csv").write_text('file_name,text\na.png,"red, tall"\n')
    ds = ImageCaptionDataset.from_folder(tmp_path, 8)
    assert ds[0]["caption"] == "red, tall"
    torch.testing.assert_close(ds[0]["image"], torch.tensor([1., 0., 0.])[:, None, None].expand(3, 8, 8))


def test_hf_imagefolder_reads_our_layout(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = write_folder(tmp_path)
    hf = datasets.load_dataset("imagefolder", data_dir=str(tmp_path), split="train")
    assert sorted(hf["text"]) == sorted(r["text"] for r in rows)


def test_corrupt_images_skipped_and_counted(tmp_path):
    good = tmp_path/"good.png"; Image.new("RGB", (8, 8), (0, 255, 0)).save(good)
    trunc = tmp_path/"trunc.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(trunc)
    trunc.write_bytes(trunc.read_bytes()[:200])                     # a truncated PNG
    (tmp_path/"empty.png").write_bytes(b"")
    (tmp_path/"text.jpg").write_text("hello")
    (tmp_path/"adir.png").mkdir()
    recs = [(trunc, "t"), (good, "g"), (tmp_path/"empty.png", "e"), (tmp_path/"text.jpg", "x"),
            (tmp_path/"adir.png", "d"), (tmp_path/"nope.png", "n"), (Image.new("L", (4, 6), 255), "pil")]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = ImageCaptionDataset.from_records(recs, resolution=8)
    assert (len(ds), ds.skipped, len(w)) == (2, 5, 5)
    assert [ds[i]["caption"] for i in range(2)] == ["g", "pil"]
    torch.testing.assert_close(ds[1]["image"], torch.ones(3, 8, 8))   # grey-level PIL becomes RGB
    # all unreadable: one line
    one_line_user_error(lambda: ImageCaptionDataset.from_records(recs[2:6], 8), "could be read")
    # a file that breaks after the dataset was built is skipped when read, counted once, never a crash
    good2 = tmp_path/"good2.png"; Image.new("RGB", (8, 8), (0, 0, 255)).save(good2)
    ds = ImageCaptionDataset.from_records([(good, "g"), (good2, "b")], 8)
    good2.write_bytes(b"garbage")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        items = [ds[1], ds[1], ds[0]]
    assert [it["caption"] for it in items] == ["g", "g", "g"] and ds.skipped == 1 and len(w) == 1
    good.write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one_line_user_error(lambda: ds[0], "no image")


def test_prompt_files_of_each_type(tmp_path):
    want = ["a cat, on a mat", "a dog", "ünïcode prompt"]
    (tmp_path/"p.txt").write_text("\n".join(want) + "\n\n")
    (tmp_path/"p.csv").write_text('prompt,score\n"a cat, on a mat",1\na dog,2\nünïcode prompt,3\n')
    (tmp_path/"p.tsv").write_text('text\tscore\na cat, on a mat\t1\na dog\t2\nünïcode prompt\t3\n')
    (tmp_path/"p.jsonl").write_text("\n".join(json.dumps(dict(caption=p)) for p in want))
    (tmp_path/"p.json").write_text(json.dumps(want))
    for ext in ["txt", "csv", "tsv", "jsonl", "json"]:
        assert load_prompts(str(tmp_path/f"p.{ext}")) == want, ext
    assert load_prompts(str(tmp_path/"p.csv"), limit=2) == want[:2]


def test_bad_prompt_inputs_one_line(tmp_path):
    (tmp_path/"empty.txt").write_text("")
    (tmp_path/"e.csv").write_text("prompt\n")
    (tmp_path/"nocol.csv").write_text("a,b\n1,2\n")
    (tmp_path/"bad.jsonl").write_text("{not json\n")
    (tmp_path/"p.xlsx").write_text("x")
    one_line_user_error(lambda: load_prompts(str(tmp_path/"empty.txt")), "no prompts")
    one_line_user_error(lambda: load_prompts(str(tmp_path/"e.csv")), "no prompts")
    one_line_user_error(lambda: load_prompts(str(tmp_path/"nocol.csv")), "no prompt column")
    one_line_user_error(lambda: load_prompts(str(tmp_path/"bad.jsonl")), "not valid JSON")
    one_line_user_error(lambda: load_prompts(str(tmp_path/"p.xlsx")), "unknown type")
    one_line_user_error(lambda: load_prompts(str(tmp_path/"missing.txt")), "neither a file")
    one_line_user_error(lambda: load_prompts("mini-digits", limit=0), "no prompts")
    one_line_user_error(lambda: load_image_captions(str(tmp_path)), "metadata.jsonl")
    one_line_user_error(lambda: ImageCaptionDataset.from_records([], 8), "could be read")


@pytest.mark.parametrize("name", ["hpdv2", "coco", "pickapic", "someone/some-prompts"])
def test_offline_hub_names_one_line(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    msg = one_line_user_error(lambda: load_prompts(name), "HF_HUB_OFFLINE=1")
    assert "local" in msg and "download" in msg


def test_offline_hub_image_sets_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    one_line_user_error(lambda: load_image_captions("coco", "train"), "HF_HUB_OFFLINE=1")
    one_line_user_error(lambda: load_image_captions("someone/images", "train"), "HF_HUB_OFFLINE=1")


def test_mini_digits_sizes_labels_captions():
    from sklearn.datasets import load_digits
    d = load_digits()
    tr, te, al = mini_digits("train"), mini_digits("test", 16), mini_digits("all", 8)
    assert (len(tr), len(te), len(al)) == (1527, 270, 1797)
    assert sorted(np.concatenate([tr.source_index, te.source_index]).tolist()) == list(range(1797))
    assert te[0]["image"].shape == (3, 16, 16) and al[0]["image"].shape == (3, 8, 8)
    # at 8x8 the "upscale" is the identity: the images are the sklearn digits / 16, white ink on black
    torch.testing.assert_close(torch.stack([al[i]["image"][0] for i in range(5)]), torch.from_numpy(d.images[:5]).float() / 16)
    assert torch.equal(al.labels, torch.from_numpy(d.target))
    for ds in (tr, te):
        assert [digit_from_prompt(c) for c in ds.captions] == ds.labels.tolist()
        assert all(c.startswith(mini_prompt(int(k))) for c, k in zip(ds.captions, ds.labels))
    # deterministic and independent of resolution
    assert mini_digits("test", 32).captions == te.captions
    assert np.array_equal(mini_digits("test", 32).source_index, te.source_index)
    # bold digits carry more ink than thin ones of the same class
    ink = torch.stack([al[i]["image"][0].sum() for i in range(len(al))])
    for k in range(10):
        bold = [i for i in range(len(al)) if al.labels[i] == k and "bold" in al.captions[i]]
        thin = [i for i in range(len(al)) if al.labels[i] == k and "thin" in al.captions[i]]
        assert ink[bold].min() > ink[thin].max()
    one_line_user_error(lambda: mini_digits("validation"), "train, test or all")


def test_mini_prompts():
    assert load_prompts("mini-digits") == [f"a handwritten digit {w}" for w in MINI_DIGIT_WORDS]
    assert load_prompts("mini-digits", split="test") == mini_digits("test").captions
    assert load_prompts("mini-digits", split="train", limit=5) == mini_digits("train").captions[:5]
    assert load_prompts("mini-digits", limit=3) == [mini_prompt(k) for k in range(3)]
    one_line_user_error(lambda: digit_from_prompt("a cat"), "digit word")
