"""Generate images of chosen classes (by name or index, default all) from an LDM checkpoint.

Writes <output_dir>/<class_name>/<index:06d>.png (skipping files that already exist unless
--overwrite) and, with --save_grid, one grid with a row per class. The architecture, classes and
VAE come from the checkpoint; EMA weights are used unless --no_ema.
"""

import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid, save_image  # noqa: E402

from dataset import load_png, save_png, to_uint8  # noqa: E402
from models import (  # noqa: E402
    SAMPLERS,
    LatentCodec,
    denoise,
    load_checkpoint,
    load_vae,
    make_sampler,
    model_from_checkpoint,
    noise_for,
)
from utils import Parser, Timer, UserError, print_timing, run_main  # noqa: E402


def add_sampling_args(parser, default_output, default_seed):
    """Flags shared by inference.py and inference_per_class.py."""
    parser.add_argument(
        "--checkpoint", required=True, help="LDM checkpoint (e.g. ldm_checkpoints/checkpoint_best.pt)"
    )
    parser.add_argument("--output_dir", default=default_output, help="output folder (default: %(default)s)")
    parser.add_argument(
        "--batch_size", type=int, default=16, help="images per forward pass (default: %(default)s)"
    )
    parser.add_argument(
        "--cfg_scale",
        type=float,
        default=3.0,
        help="classifier-free guidance; 1 = conditional only, 0 = unconditional (default: %(default)s)",
    )
    parser.add_argument(
        "--num_inference_steps", type=int, default=50, help="sampling steps (default: %(default)s)"
    )
    parser.add_argument(
        "--scheduler",
        choices=sorted(SAMPLERS),
        default="ddim",
        help="sampler; dpmsolver++ and unipc need only 20-30 steps (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=default_seed,
        help="seed; image i of class c always gets the same noise (default: %(default)s)",
    )
    parser.add_argument(
        "--no_ema", action="store_true", help="use the raw weights instead of the EMA weights"
    )
    parser.add_argument(
        "--vae_pretrained",
        default=None,
        help="VAE hub id or folder; default: the one recorded in the checkpoint",
    )
    parser.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default="no",
        help="autocast precision on CUDA; ignored on CPU (default: %(default)s)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="regenerate images whose files already exist"
    )


def check_sampling_args(args):
    """Reject sizes that cannot work."""
    for name in ("batch_size", "num_inference_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1 (got {getattr(args, name)})")
    if args.cfg_scale < 0:
        raise UserError(f"--cfg_scale must be >= 0 (got {args.cfg_scale})")


class LDMSampler:
    """A trained LDM ready to sample: model, VAE codec, sampler and the latent shape."""

    def __init__(self, args, device):
        ckpt = load_checkpoint(args.checkpoint)
        config = ckpt["config"]
        self.device = torch.device(device)
        self.class_names = list(ckpt["class_names"])
        self.model = model_from_checkpoint(ckpt, use_ema=not args.no_ema).to(self.device)
        vae = load_vae(args.vae_pretrained or config["vae_pretrained"]).to(self.device)
        self.codec = LatentCodec(vae, config["image_channels"])
        self.latent_shape = (config["latent_channels"], config["latent_size"], config["latent_size"])
        self.sampler = make_sampler(args.scheduler, ckpt["scheduler_config"])
        self.args = args
        on_cuda = self.device.type == "cuda" and args.mixed_precision != "no"
        if args.mixed_precision != "no" and not on_cuda:
            warnings.warn(
                f"--mixed_precision {args.mixed_precision} needs CUDA; sampling in fp32", stacklevel=2
            )
        self.dtype = (
            {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision) if on_cuda else None
        )

    def sample(self, label, indices):
        """uint8 images (len(indices), H, W, C) of one class; noise depends only on seed, class and index."""
        noise = noise_for(self.args.seed, label, indices, self.latent_shape).to(self.device)
        labels = torch.full((len(indices),), label, device=self.device, dtype=torch.long)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            latents = denoise(
                self.model, self.sampler, noise, labels, self.args.cfg_scale, self.args.num_inference_steps
            )
        return to_uint8(self.codec.decode(latents.float()))


def resolve_classes(tokens, class_names):
    """Class indices from names or integer indices; all classes when none are given."""
    if not tokens:
        return list(range(len(class_names)))
    chosen = []
    for token in tokens:
        if token in class_names:
            chosen.append(class_names.index(token))
        elif token.lstrip("-").isdigit():
            index = int(token)
            if not 0 <= index < len(class_names):
                raise UserError(
                    f"--class_label {index} is out of range; the checkpoint has classes "
                    f"0..{len(class_names) - 1}: {class_names}"
                )
            chosen.append(index)
        else:
            raise UserError(
                f"--class_label '{token}' is not a class of this checkpoint; choose from {class_names}"
            )
    return chosen


def batches(items, size):
    """Consecutive chunks of at most `size` items."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def image_path(output_dir, class_name, index):
    """<output_dir>/<class_name>/<index:06d>.png"""
    return Path(output_dir) / class_name / f"{index:06d}.png"


def missing_indices(output_dir, class_name, count, overwrite):
    """Indices below `count` still to generate (all of them with --overwrite)."""
    return [i for i in range(count) if overwrite or not image_path(output_dir, class_name, i).exists()]


def write_images(output_dir, class_name, indices, images):
    """Save a batch of uint8 images under their indices."""
    (Path(output_dir) / class_name).mkdir(parents=True, exist_ok=True)
    for index, image in zip(indices, images, strict=True):
        save_png(image, image_path(output_dir, class_name, index))


def free_path(path):
    """`path`, or the first numbered variant of it that does not exist yet."""
    path, number = Path(path), 1
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}_{number:03d}{path.suffix}")
        number += 1
    return candidate


def save_grid(rows, output_dir, overwrite):
    """One grid image, a row per class, without replacing an earlier grid unless asked."""
    images = torch.from_numpy(np.concatenate(rows)).permute(0, 3, 1, 2).float() / 255  # (N, C, H, W)
    path = Path(output_dir) / "grid.png"
    path = path if overwrite else free_path(path)
    save_image(make_grid(images, nrow=len(rows[0])), path)
    print(f"grid saved to {path}")


def parse_args(argv=None):
    parser = Parser(description=__doc__)
    add_sampling_args(parser, default_output="./generated", default_seed=42)
    parser.add_argument(
        "--class_label",
        nargs="+",
        default=None,
        help="class names or indices to generate (default: every class)",
    )
    parser.add_argument("--num_samples", type=int, default=10, help="images per class (default: %(default)s)")
    parser.add_argument("--save_grid", action="store_true", help="also save grid.png with one row per class")
    parser.add_argument(
        "--no_save_images", action="store_true", help="do not write individual images (use with --save_grid)"
    )
    args = parser.parse_args(argv)
    check_sampling_args(args)
    if args.num_samples < 1:
        raise UserError(f"--num_samples must be at least 1 (got {args.num_samples})")
    return args


def main():
    args = parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    sampler = LDMSampler(args, device)
    classes = resolve_classes(args.class_label, sampler.class_names)
    timer = Timer(device)
    start, made, num_batches, rows = timer.now(), 0, 0, []
    for label in classes:
        name = sampler.class_names[label]
        write = not args.no_save_images
        todo = missing_indices(args.output_dir, name, args.num_samples, args.overwrite or not write)
        made_now = {}
        for chunk in batches(todo, args.batch_size):
            images = sampler.sample(label, chunk)
            made_now.update(zip(chunk, images, strict=True))
            if write:
                write_images(args.output_dir, name, chunk, images)
            made, num_batches = made + len(chunk), num_batches + 1
        skipped = args.num_samples - len(todo)
        print(f"class '{name}' ({label}): generated {len(todo)}, skipped {skipped} existing", flush=True)
        if args.save_grid:
            rows.append(
                np.stack(
                    [
                        made_now[i]
                        if i in made_now
                        else load_png(image_path(args.output_dir, name, i), sampler.codec.image_channels)
                        for i in range(args.num_samples)
                    ]
                )
            )
    print_timing(made, args.num_inference_steps, num_batches, timer.now() - start)
    if args.save_grid:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        save_grid(rows, args.output_dir, args.overwrite)


if __name__ == "__main__":
    run_main(main)
