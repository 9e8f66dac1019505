"""Class-folder image data for the LDM: discovery, the data set's decoding rule and the held-out split.

Pixels are decoded by the shared rule of core.images: the bit depth (or float range) is decided
once for the whole data set by a scan, never per image, and stored in every checkpoint.
"""

import random

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2 as T

from core import cli, datasets, images, training
from core.errors import UserError, warn

# The layout text of core, which every folder's --help shows, so that all describe their data alike.
DATA_LAYOUT = datasets.CLASS_LAYOUT


def find_class_images(root):
    """Sorted class names and (path, label) pairs of `root/<class_name>/*`."""
    # Labels are indices into the sorted class names, which every checkpoint stores.
    class_names, paths, labels = datasets.class_folders(root)
    return class_names, [(str(path), label) for path, label in zip(paths, labels, strict=True)]


def add_intensity_args(add):
    """--bit_depth and --intensity_range (through a parser's or group's add_argument): overrides of the
    decoding rule the scan finds."""
    # Unset, both come from the one scan of the data set (data_rule); the README explains the rule.
    add("--bit_depth", type=cli.bit_depth, help="bit depth of integer images (default: from the scan)")
    add("--intensity_range", type=cli.finite_float, nargs=2, metavar=("LOW", "HIGH"), help="float data range")


def check_intensity_args(args):
    """The parsed flags, once a float range is known to be increasing (checked even for integer data)."""
    if args.intensity_range is not None:
        images.float_rule(args.intensity_range)
    return args


def data_rule(paths, args, resumed=None):
    """Scan (and so verify) every image once; the decoding rule is the resumed checkpoint's if any.

    Returns {"channels": 1 or 3, "intensity": rule}."""
    found = images.scan(paths, args.bit_depth, args.intensity_range)
    # On resume the checkpoint's rule wins: rescaling the pixels mid-run would change what the model
    # has learned to reproduce.
    if resumed is not None and resumed != found["intensity"]:
        warn(
            f"the data now scans as {images.describe(found['intensity'])}; keeping the resumed "
            f"checkpoint's rule ({images.describe(resumed)})"
        )
    return {"channels": found["channels"], "intensity": resumed or found["intensity"]}


class ClassImageDataset(Dataset):
    """(image in [-1, 1] of shape (C, H, W), label) pairs; flips are applied by the training loop."""

    def __init__(self, samples, image_size, channels, intensity):
        self.samples = samples
        self.channels = channels
        self.intensity = intensity
        # Short side to image_size, then a centre crop (other shapes keep their aspect ratio), then
        # [0, 1] -> [-1, 1], the VAE's input range. No flips here: the loop draws them, so that with
        # --cache_latents both views can be encoded up front.
        self.transform = T.Compose(
            [
                T.Resize(image_size, antialias=True),
                T.CenterCrop(image_size),
                T.Normalize([0.5] * channels, [0.5] * channels),
            ]
        )

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        image = images.load(path, self.intensity, self.channels)  # (C, H, W) in [0, 1]
        return self.transform(image), label


def split_holdout(samples, val_fraction, seed):
    """Deterministic per-class split into (train, val); every class keeps at least one training image."""
    by_class = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    train, val = [], []
    # One generator per class, seeded by seed + label: a class's split depends on its own files only.
    for label in sorted(by_class):
        items = list(by_class[label])
        random.Random(seed + label).shuffle(items)
        n_val = min(len(items) - 1, max(1, round(len(items) * val_fraction))) if val_fraction > 0 else 0
        val += items[:n_val]
        train += items[n_val:]
    return train, val


def load_class_data(args, resume=None):
    """Class names, training and held-out (path, label) lists and the data rule of --data_root."""
    class_names, samples = find_class_images(args.data_root)
    # Classes are compared before the scan: the wrong --data_root fails at once, not after every image.
    if resume is not None and resume.get("class_names", class_names) != class_names:
        raise UserError(
            f"--data_root classes {class_names} differ from the resumed checkpoint's "
            f"{resume['class_names']}; resume with the same data"
        )
    data = data_rule([path for path, _ in samples], args, resume and resume.get("intensity"))
    return class_names, *split_holdout(samples, args.val_fraction, args.seed), data


def epoch_order(num_items, epoch, seed, accelerator):
    """This process's shard of the epoch's shuffled indices (same order on resume)."""
    # DistributedSampler pads the shards to equal length with repeated indices: every process runs the
    # same number of steps, as DDP's collective calls require.
    sampler = DistributedSampler(
        range(num_items),
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        shuffle=True,
        seed=seed,
    )
    sampler.set_epoch(epoch)
    return list(sampler)


def epoch_loader(dataset, args, epoch, accelerator, skip=0):
    """Batches of this process's shard of one epoch, after the first `skip` (those a resumed run had)."""
    # The order is a function of (seed, epoch) alone, so a resumed run sees the rest of its epoch
    # in the order the interrupted one would have.
    order = epoch_order(len(dataset), epoch, args.seed, accelerator)[skip * args.batch_size :]
    # Workers ignore SIGINT (Ctrl-C is the main process's, which finishes its step and saves), and
    # their seeds follow (seed, epoch), so a resumed epoch gives them the same ones.
    return DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=order,
        num_workers=args.num_workers,
        generator=torch.Generator().manual_seed(args.seed + epoch),
        pin_memory=accelerator.device.type == "cuda",
        worker_init_fn=training.ignore_sigint,
    )


def to_unit(batch):
    """(N, C, H, W) in [-1, 1] -> [0, 1], the range core.images writes."""
    return ((batch.float() + 1) / 2).clamp(0, 1)
