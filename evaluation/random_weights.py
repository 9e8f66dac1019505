"""Write random-weight Inception-v3 (FID), VGG16 and DINOv2 weight files of the real architectures.

Tests and the benchmark use them on machines that cannot download the real files: they load
through the same `--inception-weights` / `--vgg-weights` / `--dinov2-weights` path, so every code path
but the numbers themselves is the one used with real weights. Numbers from these files mean nothing.
"""

import os

import torch
import torch.nn as nn
import torchvision

import dinov2_vit
from core import files
from core.cli import Parser, ensure_writable_dir, nonnegative_int
from core.errors import run_cli
from core.inception import random_inception_state_dict  # the trainers' tests use the same file


def _init_variance_preserving(model, seed):
    """Re-initialise so activations keep their scale through depth (features stay informative)."""
    # He et al. 2015 normal init (std sqrt(2 / fan_in)), the variance-preserving choice for ReLU networks.
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            with torch.no_grad():
                module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
    return model


def random_vgg16_state_dict(seed=0):
    """State dict of torchvision's VGG16 (the architecture torch-fidelity loads) with random weights."""
    return _init_variance_preserving(torchvision.models.vgg16(), seed).state_dict()


def random_dinov2_state_dict(name="dinov2-vit-s-14", seed=0):
    """State dict of a DINOv2 backbone (dinov2_vit.py, the hub's keys and shapes) with random weights."""
    model = _init_variance_preserving(dinov2_vit.DinoVisionTransformer(name), seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # small random tokens, as the original init (truncated normal, std 0.02)
        for parameter in (model.cls_token, model.pos_embed, model.mask_token):
            parameter.normal_(0.0, 0.02, generator=generator)
    return model.state_dict()


def write_random_dinov2(folder, name="dinov2-vit-s-14", seed=0):
    """Save a random DINOv2 file named like the hub's (e.g. dinov2_vits14_pretrain.pth); returns its path."""
    ensure_writable_dir(folder, "folder")
    path = os.path.join(folder, f"random-{dinov2_vit.HUB_NAMES[name]}_pretrain.pth")
    files.atomic_save(random_dinov2_state_dict(name, seed), path)
    return path


def write_random_weights(folder, seed=0):
    """Save both files into `folder`; returns (inception_path, vgg16_path)."""
    ensure_writable_dir(folder, "folder")
    inception_path = os.path.join(folder, "random-inception-v3-compat.pth")
    vgg_path = os.path.join(folder, "random-vgg16.pth")
    files.atomic_save(random_inception_state_dict(seed), inception_path)
    files.atomic_save(random_vgg16_state_dict(seed), vgg_path)
    return inception_path, vgg_path


def main():
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="where to write random-inception-v3-compat.pth and random-vgg16.pth")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="weights seed (default: 0)")
    args = parser.parse_args()
    for path in write_random_weights(args.folder, args.seed):
        print(path)


if __name__ == "__main__":
    run_cli(main)
