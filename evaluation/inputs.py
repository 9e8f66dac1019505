"""Inputs of the evaluation: image folders and .npz files, decoded by the project's one image rule into
8-bit RGB, with class matching, random subsets and the decoding rule's cache."""

import hashlib
import json
import os
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from core import files, images
from core.errors import UserError, warn

# The project's one list of image suffixes: what the trainers read, the evaluation reads.
IMAGE_EXTENSIONS = images.IMAGE_EXTENSIONS


# Part of the cache keys: change it with the decoding, so old cached features are not reused.
DECODING = (
    "core.images rule per side (integers / (2^bit_depth - 1), depth by one scan or --bit-depth; float by "
    "--intensity-range), alpha composited on black, palette expanded, gray repeated, round(x * 255) uint8 RGB"
)


def pil_to_rgb8(image, intensity):
    """Any PIL image as a uint8 (3, H, W) tensor under its set's rule, rounded as the samplers' .npz are."""
    # torch-fidelity's extractors accept uint8 only, so every rule (16-bit, float) ends in 8-bit RGB here,
    # by the same round(x * 255) the samplers use when they write their .npz.
    pixels = torch.from_numpy(images.decode(image, intensity, 3)).permute(2, 0, 1)  # (3, H, W) in [0, 1]
    return torch.from_numpy(images.to_uint8_rgb(pixels[None])[0]).permute(2, 0, 1).contiguous()


class FolderImages(Dataset):
    """Image files as (index, uint8 (3, H, W) tensor), or (index, error message) for unreadable files."""

    def __init__(self, root, files, intensity):
        self.root, self.files, self.intensity = root, files, intensity

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path = os.path.join(self.root, self.files[index])
        # The error comes back as a value: raised in a DataLoader worker it would reach the user wrapped
        # in the worker's traceback instead of as one error line.
        try:  # the scan read every file, but one may have changed since; the main process reports it
            return index, pil_to_rgb8(images.open_image(path), self.intensity)
        except UserError as error:
            return index, str(error)


class ArrayImages(Dataset):
    """Rows of a uint8 (N, H, W, C) array as (index, uint8 (3, H, W) tensor)."""

    def __init__(self, array):
        self.array = array

    def __len__(self):
        return len(self.array)

    def __getitem__(self, index):
        image = torch.from_numpy(np.array(self.array[index]))  # (H, W, C), copied out of the read-only map
        if image.shape[2] == 1:
            image = image.expand(-1, -1, 3)
        return index, image[:, :, :3].permute(2, 0, 1).contiguous()  # alpha dropped (ADM's layout)


@dataclass
class ImageSet:
    """One side of the comparison: image files under a folder, or the arr_0 array of an .npz file."""

    path: str
    files: list = None  # paths relative to `path` (folder input)
    array: np.ndarray = None  # (N, H, W, C) uint8 (npz input)
    classes: list = None  # per image: class name, bare npz label (int) or None
    total: int = 0  # images before --max-samples
    names: list = None  # class names, index = label: sorted class folders or the npz's class_names
    label_count: int = 0  # npz labels without names: largest label + 1 over all images
    indices: list = None  # positions drawn by --max-samples (None: all images)
    intensity: dict = None  # the decoding rule of the folder (core.images)

    def __post_init__(self):
        # Found on the whole set once; subsets keep them, so a random draw never renumbers the classes.
        if self.names is None and self.files is not None:
            self.names = sorted({c for c in self.classes or [] if c is not None})
        labels = [c for c in self.classes or [] if isinstance(c, int)]
        if labels and not self.label_count:
            self.label_count = max(labels) + 1

    def __len__(self):
        return len(self.files) if self.files is not None else len(self.array)

    def dataset(self):
        if self.files is None:
            return ArrayImages(self.array)
        return FolderImages(self.path, self.files, self.intensity)

    def subset(self, indices):
        """The images at `indices` (sorted), keeping the original total, class list and rule."""
        # Positions compose: a subset of a subset still names rows of the original .npz, which is what
        # identity() puts in the cache key.
        files = None if self.files is None else [self.files[i] for i in indices]
        array = None if self.array is None else self.array[indices]
        drawn = indices if self.indices is None else [self.indices[i] for i in indices]
        classes = [self.classes[i] for i in indices]
        return ImageSet(
            self.path, files, array, classes, self.total, self.names, self.label_count, drawn, self.intensity
        )

    def identity(self):
        """What its features depend on: every file's path, size and mtime (or the .npz file's and the
        rows drawn from it)."""
        # Size and mtime stand in for the content: hashing would read every byte on every run. realpath
        # lets a folder reached through a link or a relative path share one cache entry.
        if self.files is None:
            stat = os.stat(self.path)
            drawn = "all" if self.indices is None else digest(self.indices)
            return [os.path.realpath(self.path), stat.st_size, stat.st_mtime_ns, len(self.array), drawn]
        stats = [os.stat(os.path.join(self.path, f)) for f in self.files]
        return [os.path.realpath(self.path)] + [
            [f, s.st_size, s.st_mtime_ns] for f, s in zip(self.files, stats, strict=True)
        ]


def digest(payload):
    """A short hash of a JSON-able value (cache names)."""
    # sort_keys: equal payloads hash equal whatever order their dicts were built in.
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def open_image_set(path, role, constant):
    """Find the images of one side; raise UserError naming the path when there are none."""
    if not os.path.exists(path):
        raise UserError(
            f"{role} images not found: {path} (pass --{role} or edit {constant} at the top of {__file__})"
        )
    # An .npz is known by its suffix; any other single file is refused rather than guessed at.
    if os.path.isfile(path) and path.lower().endswith(".npz"):
        return load_npz(path)
    if not os.path.isdir(path):
        raise UserError(f"{role} input {path} is neither a folder of images nor an .npz file")
    files = list_images(path)
    if not files:
        what = "is empty" if not os.listdir(path) else "has no images"
        raise UserError(
            f"{role} folder {path} {what} (read: {' '.join(IMAGE_EXTENSIONS)}, searched recursively)"
        )
    # Class = first-level sub-folder (the samplers write <out>/<class_name>/000000.png); images directly in
    # the root belong to no class.
    classes = [f.split(os.sep)[0] if os.sep in f else None for f in files]
    return ImageSet(path, files=files, classes=classes, total=len(files))


def list_images(root):
    """Image files under root (recursively, hidden folders skipped), as sorted relative paths."""
    # Hidden folders are tool state (caches, trash), not data. The sort makes the order, and so the
    # --max-samples draw and the cache key, independent of the file system's listing.
    found = []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        found += [os.path.join(folder, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(os.path.relpath(f, root) for f in found)


def open_npz(path):
    """np.load of an .npz archive that never unpickles (a lone .npy array is refused too)."""
    # allow_pickle=False: an .npz from elsewhere cannot run code through an object array.
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError("it holds a single .npy array, not an .npz archive")
    return data


def load_npz(path):
    """arr_0 (uint8 N x H x W [x C]), optional arr_1 labels and class_names of an .npz file."""
    # The small members are read while the archive is open; arr_0 is opened apart so it can be mapped.
    try:
        with open_npz(path) as data:
            if "arr_0" not in data.files:
                raise UserError(
                    f"{path} has no arr_0 (found: {', '.join(data.files)}); expected uint8 N x H x W x C"
                )
            labels = data["arr_1"] if "arr_1" in data.files else None
            names = data["class_names"] if "class_names" in data.files else None
        array = npz_member(path, "arr_0")
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
        raise UserError(f"cannot read {path} as .npz: {error}") from None
    array = array[..., None] if array.ndim == 3 else array
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] not in (1, 3, 4) or len(array) == 0:
        raise UserError(
            f"{path}: arr_0 is {array.dtype} {tuple(array.shape)}; expected uint8 N x H x W x C, C 1/3/4"
        )
    # Unusable labels are ignored, not refused: the images alone still serve every overall metric.
    valid_labels = (
        labels is not None
        and labels.shape == (len(array),)
        and np.issubdtype(labels.dtype, np.integer)
        and labels.min() >= 0
    )
    if not valid_labels:
        return ImageSet(path, array=array, classes=[None] * len(array), total=len(array))
    labels = [int(v) for v in labels]
    # Bare labels stay ints here; class_names() names them later, from the other side's classes if any.
    if names is None:
        return ImageSet(path, array=array, classes=labels, total=len(array))
    if names.ndim != 1 or names.dtype.kind not in "US" or max(labels) >= len(names):
        raise UserError(
            f"{path}: class_names must list a name (str) for every label 0..{max(labels)}, "
            f"got {names.dtype} {tuple(names.shape)}"
        )
    names = [str(n) for n in names]
    return ImageSet(path, array=array, classes=[names[v] for v in labels], total=len(array), names=names)


def npz_member(path, name):
    """An array of an .npz, memory-mapped when stored uncompressed (np.savez, as samplers write 50k
    images), so a large file is not read into memory; compressed members are read whole."""
    # np.load cannot map a member of a zip, but a stored (uncompressed) member is the plain .npy bytes at
    # one place in the file: find that place and map it.
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            with archive.open(info) as member:
                return np.lib.format.read_array(member)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset + 26)  # file name and extra field lengths of the local header
        # The local header's extra field can differ from the central directory's (zip64 sizes of big
        # members), so the lengths are read here rather than taken from `info`.
        name_length, extra_length = struct.unpack("<HH", handle.read(4))
        handle.seek(name_length + extra_length, os.SEEK_CUR)
        # .npy 1.0 and 2.0 differ in the header length's width; np.save writes 3.0 only for utf8 field
        # names, never for uint8 images, and any other version fails as an unreadable .npz.
        version = np.lib.format.read_magic(handle)
        read_header = {
            (1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0,
        }
        shape, fortran_order, dtype = read_header[version](handle)
        offset = handle.tell()
    order = "F" if fortran_order else "C"
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset, order=order)


def random_subset(image_set, max_samples, seed):
    """At most max_samples images, drawn without replacement (same seed and input -> same subset)."""
    if max_samples is None or len(image_set) <= max_samples:
        return image_set
    # Sorted, so the subset keeps the set's own order: files and mapped rows are read front to back.
    indices = np.sort(np.random.default_rng(seed).choice(len(image_set), max_samples, replace=False))
    return image_set.subset(indices.tolist())


def decoding_rule(image_set, args):
    """The decoding rule of one side from one scan of all its files (remembered in the cache while they
    are unchanged, since a scan decodes every image); .npz arrays are 8-bit."""
    if image_set.files is None:
        return images.EIGHT_BIT
    paths = [os.path.join(image_set.path, f) for f in image_set.files]
    # The scan is the costliest step before extraction, so it is cached, keyed like the features by the
    # files' identity, plus the flags that change the rule and DECODING itself.
    if args.no_cache:
        return images.scan(paths, args.bit_depth, args.intensity_range)["intensity"]
    key = [image_set.identity(), args.bit_depth, args.intensity_range, DECODING]
    path = os.path.join(args.cache_dir, f"scan-{digest(key)}.json")
    if os.path.exists(path):
        return read_cached_rule(path)
    rule = images.scan(paths, args.bit_depth, args.intensity_range)["intensity"]
    files.atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(rule)))
    return rule


def damaged_cache(path, reason):
    """The error for a cache file this script did not write (it is refused, never unpickled)."""
    return UserError(
        f"cache file {path} was not written by this script ({reason}): delete it, or pass --no-cache"
    )


def read_cached_rule(path):
    """A decoding rule saved by an earlier scan, checked field by field (JSON never runs code)."""
    # Every field is checked: a foreign or hand-edited file must fail as a cache error, not decode wrongly.
    # `type(depth) is int` also refuses True and 3.0; float_rule() checks low < high.
    try:
        rule = json.loads(Path(path).read_text())
        if rule["kind"] == "float":
            return images.float_rule(rule["range"])
        depth = rule["bit_depth"]
        if rule["kind"] == "integer" and type(depth) is int and 1 <= depth <= 32:
            return {"kind": "integer", "bit_depth": depth}
        reason = f"unknown rule {rule}"
    except (OSError, ValueError, KeyError, TypeError, UserError) as error:
        reason = f"{type(error).__name__}: {str(error)[:100]}"
    raise damaged_cache(path, reason)


def class_names(own, other):
    """Class name of each image of `own`: folder names and named npz labels as they are; bare npz
    labels as the other side's names (index = label), refused when the class counts differ."""
    if not any(isinstance(c, int) for c in own.classes):
        return own.classes
    if not other.names:  # no names on the other side either: the numbers are the names
        return [None if c is None else str(c) for c in own.classes]
    # Label i = i-th sorted class only when the counts agree; with another count the guess would silently
    # compare different classes.
    if own.label_count != len(other.names):
        raise UserError(
            f"--per-class: {own.path} has labels 0..{own.label_count - 1} but no class_names, and "
            f"{other.path} has {len(other.names)} classes, so which label is which class is ambiguous: "
            "write class_names (index = label) into the .npz, as the samplers do"
        )
    warn(
        f"{own.path} has no class_names: taking label i as the i-th of the {len(other.names)} sorted "
        f"classes of {other.path}"
    )
    return [None if c is None else other.names[c] for c in own.classes]


def match_classes(real, gen):
    """{class name: (real indices, gen indices)} for the classes found on both sides."""
    real_names, gen_names = class_names(real, gen), class_names(gen, real)
    real_set, gen_set = set(real_names) - {None}, set(gen_names) - {None}
    if not real_set & gen_set:
        raise UserError(
            f"--per-class: no class sub-folders (or npz labels) common to {real.path} and {gen.path} "
            f"(real: {sorted(real_set)[:10]}, gen: {sorted(gen_set)[:10]})"
        )
    # A class on one side only is skipped, not an error: a sampling run may cover part of the classes.
    if real_set ^ gen_set:
        print(
            f"Per-class: skipping classes found on one side only: {sorted(real_set ^ gen_set)}",
            file=sys.stderr,
        )

    # Index tensors, so per_class_metrics can slice the feature tensors with them directly.
    def indices(names, wanted):
        return torch.tensor([i for i, n in enumerate(names) if n == wanted])

    return {c: (indices(real_names, c), indices(gen_names, c)) for c in sorted(real_set & gen_set)}
