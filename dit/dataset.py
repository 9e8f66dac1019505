"""Class-conditional image folders: root/<class_name>/<images>, classes are the sorted folder names."""

import os

from torch.utils.data import Dataset
from torchvision import transforms

from core import images
from core.errors import UserError


def find_images(root):
    """(path, label) pairs and sorted class names of root/<class_name>/<image>."""
    if not os.path.isdir(root):
        raise UserError(f"data folder not found: {root} (expected {root}/<class_name>/<image files>)")
    class_names = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not class_names:
        raise UserError(f"no class folders in {root}: put images in {root}/<class_name>/")
    samples = []
    for label, name in enumerate(class_names):
        folder = os.path.join(root, name)
        files = sorted(f for f in os.listdir(folder) if images.is_image_file(os.path.join(folder, f)))
        if not files:
            raise UserError(f"class folder {folder} has no images ({' '.join(images.IMAGE_EXTENSIONS)})")
        samples += [(os.path.join(folder, f), label) for f in files]
    return samples, class_names


class ImageFolderDataset(Dataset):
    """Center-cropped images in [-1, 1] with 3 channels for the RGB VAE; flips are left to the training loop.

    Pixel values follow the data set's one decoding rule (core.images): set `intensity` to the rule that
    scan() found, or to the rule of the checkpoint being resumed. Gray images are repeated to R = G = B.
    """

    def __init__(self, root, image_size):
        self.samples, self.class_names = find_images(root)
        self.intensity = None
        self.transform = transforms.Compose(
            [
                transforms.Resize(
                    image_size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True
                ),
                transforms.CenterCrop(image_size),
            ]
        )

    def scan(self, bit_depth=None, intensity_range=None, rank=0, world=1):
        """Decode every file once (a truncated one stops the run here) and return the data set's rule.

        With world > 1 only every world-th file from `rank` on: each process checks its share.
        """
        return images.scan([path for path, _ in self.samples[rank::world]], bit_depth, intensity_range)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        image = images.load(path, self.intensity, 3)  # (3, H, W) in [0, 1]
        # Bicubic resizing overshoots a little; clamp so the VAE sees the range it was trained on.
        return self.transform(image).clamp(0, 1) * 2 - 1, label
