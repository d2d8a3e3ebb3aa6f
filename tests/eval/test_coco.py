"""COCO-30k helpers (seeded prompts, 256 px references) and the GenEval export layout."""

import json

import pytest
from helpers import fake_generate
from PIL import Image

from eval.cli import main
from eval.coco import coco_prompts, export_geneval, prepare_coco_reference, read_geneval_metadata


def write_coco(tmp_path, n_images: int = 6):
    images = [{"id": 100 + i, "file_name": f"COCO_val2014_{100 + i:012d}.jpg"} for i in range(n_images)]
    annotations = [{"image_id": 100 + i, "id": 10 * i + k, "caption": f"  image {i} caption {k} "}
                   for i in range(n_images) for k in range(3)]
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    folder = tmp_path / "val2014"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.new("RGB", (64 + 8 * i, 48), (10 * i, 100, 200)).save(folder / im["file_name"])
    return path, folder


def test_coco_prompts_are_seeded_and_one_per_image(tmp_path):
    path, _ = write_coco(tmp_path)
    a, b, c = coco_prompts(path, 4, seed=0), coco_prompts(path, 4, seed=0), coco_prompts(path, 4, seed=1)
    assert a == b and a != c
    assert len({r["image_id"] for r in a}) == 4
    assert all(r["caption"].startswith(f"image {r['image_id'] - 100} caption") for r in a)
    with pytest.raises(ValueError, match="only 6"):
        coco_prompts(path, 7)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="COCO"):
        coco_prompts(tmp_path / "bad.json", 1)


def test_coco_reference_images(tmp_path):
    path, folder = write_coco(tmp_path)
    rows = coco_prompts(path, 6)
    (folder / rows[0]["file_name"]).write_bytes(b"broken")
    result = prepare_coco_reference(rows, folder, tmp_path / "ref", size=32)
    assert result["images"] == 5 and result["skipped"]["count"] == 1
    sizes = {Image.open(p).size for p in (tmp_path / "ref").glob("*.png")}
    assert sizes == {(32, 32)}


def test_coco_cli(tmp_path, capsys):
    path, _ = write_coco(tmp_path)
    code = main(["coco", "prompts", "--captions", str(path), "--n", "3", "--out", str(tmp_path / "p.jsonl"), "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["n"] == 3
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 3


def test_geneval_export_layout(tmp_path, capsys):
    meta = tmp_path / "evaluation_metadata.jsonl"
    lines = [{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
             {"tag": "colors", "include": [{"class": "cup", "count": 1, "color": "red"}], "prompt": "a red cup"}]
    meta.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert read_geneval_metadata(meta) == lines
    result = export_geneval(fake_generate, lines, tmp_path / "out", n_samples=3)
    assert result["prompts"] == 2
    for index, line in enumerate(lines):
        folder = tmp_path / "out" / f"{index:05d}"
        with open(folder / "metadata.jsonl") as f:
            assert json.load(f) == line  # GenEval reads it with json.load
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png", "0002.png"]
    loads = []

    def loader(run, device, compiled=False):
        loads.append(compiled)
        return fake_generate

    code = main(["geneval-export", "--run", "r", "--metadata", str(meta), "--out", str(tmp_path / "cli"), "--n", "1",
                 "--n-samples", "2", "--json", "--compile"], bench_loader=loader)
    assert code == 0 and json.loads(capsys.readouterr().out)["prompts"] == 1 and loads == [True]
    assert (tmp_path / "cli" / "00000" / "samples" / "0001.png").is_file()
