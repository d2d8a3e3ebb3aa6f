"""Image inputs of the metrics: folders read recursively and sorted, captioned folders, lazily decoded lists
that skip and count unreadable files."""

import numpy as np
import pytest
from PIL import Image

from eval.images import ImageFolderNotFound, LazyImages, SkipCounter, captioned_images, list_images, split_batch
from transfusion_mot.common.errors import InputNotFound, InvalidInput


def test_list_images_is_recursive_sorted_and_clear_when_empty(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/2.PNG", "1.jpg", "a.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name, format="PNG" if name.lower().endswith("png") else "JPEG")
    (tmp_path / "notes.txt").write_text("x")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == ["1.jpg", "a.png", "b/2.PNG"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageFolderNotFound, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(InputNotFound, match="image folder not found"):
        list_images(tmp_path / "none")


def test_a_sample_folder_is_the_images_its_manifest_lists(tmp_path):
    """`tmot sample` writes its images, grid.png and manifest.json: a metric scores the samples, not the
    grid; a manifest naming a missing image is a one-line error; another program's manifest is ignored."""
    from transfusion_mot.common.images import image_grid
    from transfusion_mot.data.imageio import save_images

    images = [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(3)]
    save_images(images, tmp_path / "s", [{"prompt": "p", "seed": i} for i in range(3)], manifest={"steps": 2})
    image_grid(images).save(tmp_path / "s" / "grid.png")
    assert [p.name for p in list_images(tmp_path / "s")] == ["00000.png", "00001.png", "00002.png"]
    (tmp_path / "s" / "00001.png").unlink()
    with pytest.raises(InvalidInput, match="lists 1 images that are missing .first: 00001.png"):
        list_images(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text('{"name": "someone else\'s"}')
    assert [p.name for p in list_images(tmp_path / "s")] == ["00000.png", "00002.png", "grid.png"]


def test_lazy_images_skip_and_count_or_refuse(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (4, 4), (9, 9, 9)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    skipped = SkipCounter()
    assert len(LazyImages([good, bad, good], skipped)[0:3]) == 2 and skipped.total == 1
    assert skipped.as_dict()["reasons"] and skipped.as_dict()["count"] == 1
    strict = LazyImages([good, bad])
    assert strict[0][0, 0].tolist() == [9, 9, 9]
    with pytest.raises(InvalidInput, match="unreadable image"):
        strict[1]


def test_captioned_images_and_split_batch(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "a red circle", "split": "val"}\n')
    paths, texts = captioned_images(tmp_path)
    assert paths == [tmp_path / "x.png"] and texts == ["a red circle"]
    with pytest.raises(InvalidInput, match="lists no images of split 'train'"):
        captioned_images(tmp_path, split="train")
    batch = np.zeros((3, 4, 4, 3), dtype=np.uint8)
    assert len(split_batch(batch)) == 3 and split_batch([1, 2]) == [1, 2]
