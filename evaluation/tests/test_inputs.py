"""Image decoding, file discovery, .npz reading, batching and cache keys (no networks involved)."""

import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

import features
import inputs
from core import images
from core.errors import UserError


def decoded(path):
    """One file as the script decodes it, as a set of its own: (3, H, W) uint8."""
    with Image.open(path) as image:
        return inputs.pil_to_rgb8(image, images.scan([path])["intensity"])


def test_16bit_is_scaled_not_clipped(tmp_path):
    levels = np.arange(0, 256, dtype=np.uint16).reshape(16, 16)
    Image.fromarray(levels * 257).save(tmp_path / "deep.png")  # 16-bit PNG, mode I;16
    Image.fromarray(levels.astype(np.uint8)).save(tmp_path / "flat.png")
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode.startswith("I")
    deep, flat = decoded(tmp_path / "deep.png"), decoded(tmp_path / "flat.png")
    assert deep.dtype == torch.uint8 and deep.shape == (3, 16, 16)
    assert torch.equal(deep, flat)
    assert torch.equal(deep[0], torch.from_numpy(levels.astype(np.uint8)))


def test_grayscale_rgba_palette_become_rgb(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    opaque = np.arange(64).reshape(8, 8, 1) % 2 == 0
    rgba = np.concatenate([rgb, np.where(opaque, 255, 0).astype(np.uint8)], axis=2)
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    Image.fromarray(rgb).quantize(16).save(tmp_path / "palette.png")
    gray = decoded(tmp_path / "gray.png")
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    # Alpha is composited on black, as every folder's training loader does (core.images).
    composited = torch.from_numpy(np.where(opaque, rgb, 0).astype(np.uint8)).permute(2, 0, 1)
    assert torch.equal(decoded(tmp_path / "alpha.png"), composited)
    with Image.open(tmp_path / "palette.png") as image:
        expected = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(decoded(tmp_path / "palette.png"), expected)


def test_folder_listing_is_recursive_sorted_and_case_insensitive(tmp_path):
    for name in ("b/2.PNG", "a/1.jpeg", "a/x/3.TIF", "top.webp", ".hidden/4.png", "notes.txt"):
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    files = inputs.list_images(str(tmp_path))
    assert files == sorted(["a/1.jpeg", os.path.join("a", "x", "3.TIF"), "b/2.PNG", "top.webp"])
    image_set = inputs.open_image_set(str(tmp_path), "real", "REAL_IMAGES_DIR")
    assert image_set.classes == ["a", "a", "b", None]


def test_npz_grayscale_rgba_and_labels(tmp_path):
    gray = np.random.default_rng(1).integers(0, 256, (3, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "gray.npz", gray, np.array([2, 0, 1]))
    image_set = inputs.load_npz(str(tmp_path / "gray.npz"))
    index, image = image_set.dataset()[1]
    assert index == 1 and image.shape == (3, 8, 8) and torch.equal(image[2], torch.from_numpy(gray[1]))
    assert image_set.classes == [2, 0, 1]
    rgba = np.random.default_rng(2).integers(0, 256, (2, 8, 8, 4), dtype=np.uint8)
    np.savez(tmp_path / "rgba.npz", arr_0=rgba)
    _, image = inputs.load_npz(str(tmp_path / "rgba.npz")).dataset()[0]
    assert torch.equal(image, torch.from_numpy(rgba[0, :, :, :3]).permute(2, 0, 1))


def test_collate_groups_mixed_sizes_and_keeps_indices():
    items = [(0, torch.zeros(3, 4, 4)), (1, torch.ones(3, 6, 6)), (2, torch.full((3, 4, 4), 2.0))]
    errors, groups = features.collate_by_size(items + [(3, "cannot read image x.png: broken")])
    assert errors == ["cannot read image x.png: broken"]
    by_size = {tuple(images.shape[2:]): (index.tolist(), images) for index, images in groups}
    assert by_size[(4, 4)][0] == [0, 2] and torch.equal(by_size[(4, 4)][1][1], items[2][1])
    assert by_size[(6, 6)][0] == [1]


def test_random_subset_is_seeded_sorted_and_bounded(tmp_path):
    image_set = inputs.ImageSet(
        str(tmp_path), files=[f"{i}.png" for i in range(20)], classes=[None] * 20, total=20
    )
    first = inputs.random_subset(image_set, 5, seed=3)
    assert first.files == inputs.random_subset(image_set, 5, seed=3).files
    assert first.files != inputs.random_subset(image_set, 5, seed=4).files
    assert len(first) == 5 and first.total == 20
    assert [int(f[:-4]) for f in first.files] == sorted(int(f[:-4]) for f in first.files)
    assert inputs.random_subset(image_set, 50, seed=3) is image_set


def test_npz_labels_match_sorted_class_folders(tmp_path):
    folder = inputs.ImageSet(
        str(tmp_path), files=["cat/0.png", "dog/0.png", "dog/1.png"], classes=["cat", "dog", "dog"]
    )
    labels = inputs.ImageSet(str(tmp_path), array=np.zeros((3, 2, 2, 3), np.uint8), classes=[1, 0, 1])
    pairs = inputs.match_classes(folder, labels)
    assert {c: (r.tolist(), g.tolist()) for c, (r, g) in pairs.items()} == {
        "cat": ([0], [1]),
        "dog": ([1, 2], [0, 2]),
    }
    with pytest.raises(UserError, match="per-class"):
        inputs.match_classes(folder, inputs.ImageSet(str(tmp_path), files=["x.png"], classes=[None]))


def test_cache_name_follows_files_and_weights(tmp_path, weights):
    for i in range(2):
        Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(tmp_path / f"{i}.png")
    image_set = inputs.open_image_set(str(tmp_path), "real", "REAL_IMAGES_DIR")
    inception = {"path": weights[0]}
    name = features.real_cache_name(image_set, "inception", inception)
    assert name == features.real_cache_name(image_set, "inception", inception)
    assert name != features.real_cache_name(image_set, "vgg16", {"path": weights[1]})
    later = time.time() + 10
    os.utime(tmp_path / "1.png", (later, later))
    assert name != features.real_cache_name(image_set, "inception", inception)


def test_uncompressed_npz_is_memory_mapped_and_equal(tmp_path):
    images = np.random.default_rng(3).integers(0, 256, (4, 6, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", images, np.arange(4))
    np.savez_compressed(tmp_path / "packed.npz", images)
    plain, packed = (
        inputs.load_npz(str(tmp_path / "plain.npz")),
        inputs.load_npz(str(tmp_path / "packed.npz")),
    )
    assert isinstance(plain.array, np.memmap) and not isinstance(packed.array, np.memmap)
    assert np.array_equal(plain.array, images) and np.array_equal(packed.array, images)
    assert plain.classes == [0, 1, 2, 3]
    assert torch.equal(plain.subset([1, 3]).dataset()[1][1], torch.from_numpy(images[3]).permute(2, 0, 1))


def test_npz_class_names_map_labels_by_name_when_the_folder_lacks_a_class(tmp_path, capsys):
    folder = inputs.ImageSet(str(tmp_path), files=["b/0.png", "c/0.png", "c/1.png"], classes=["b", "c", "c"])
    arrays = np.zeros((4, 2, 2, 3), np.uint8)
    np.savez(tmp_path / "named.npz", arrays, np.array([0, 1, 2, 1]), class_names=np.array(["a", "b", "c"]))
    named = inputs.load_npz(str(tmp_path / "named.npz"))
    assert named.classes == ["a", "b", "c", "b"] and named.names == ["a", "b", "c"]
    pairs = inputs.match_classes(folder, named)
    assert {c: (r.tolist(), g.tolist()) for c, (r, g) in pairs.items()} == {
        "b": ([0], [1, 3]),
        "c": ([1, 2], [2]),
    }
    assert "warning" not in capsys.readouterr().err


def test_npz_labels_without_names_need_equal_class_counts(tmp_path, capsys):
    folder = inputs.ImageSet(str(tmp_path), files=["b/0.png", "c/0.png"], classes=["b", "c"])
    bare = inputs.ImageSet(str(tmp_path), array=np.zeros((3, 2, 2, 3), np.uint8), classes=[0, 1, 2])
    with pytest.raises(UserError, match="ambiguous"):
        inputs.match_classes(folder, bare)
    # A subset keeps the count of the whole set: drawing no label 2 does not make it look unambiguous.
    assert bare.subset([0, 1]).label_count == 3
    with pytest.raises(UserError, match="ambiguous"):
        inputs.match_classes(folder, bare.subset([0, 1]))
    two = inputs.ImageSet(str(tmp_path), array=np.zeros((2, 2, 2, 3), np.uint8), classes=[1, 0])
    assert set(inputs.match_classes(folder, two)) == {"b", "c"}
    assert "warning: " in capsys.readouterr().err
