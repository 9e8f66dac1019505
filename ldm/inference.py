"""Generate images of chosen classes (by name or index, default all) from an LDM checkpoint.

Writes <output_dir>/<class_name>/<index:06d>.png at the training data's bit depth (16-bit PNG for
data deeper than 8 bits, .tif for float data), skipping complete files that already exist unless
--overwrite. --save_grid also writes a preview grid with a row per class beside the sample tree,
<output_dir>_grid.png (or --grid_path), so that an evaluation of the samples never counts it. The
architecture, classes, decoding rule and VAE come from the checkpoint; EMA weights are used unless
--no_ema. --classifier adds classifier guidance (ADM) by a latent classifier of train_classifier.py
trained for this LDM, with any --scheduler, on top of --cfg_scale.
"""

import os
import warnings
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from core import cli, files, images, training
from core.errors import UserError, run_cli
from dataset import to_unit
from models import (
    SAMPLERS,
    LatentCodec,
    check_classifier_fits,
    classifier_from_checkpoint,
    denoise,
    intensity_of,
    load_checkpoint,
    load_classifier_checkpoint,
    load_vae,
    make_sampler,
    model_from_checkpoint,
    noise_for,
)

SCALE_HELP = "classifier guidance scale (default 1 with --classifier; 0: unguided); combines with --cfg_scale"


def add_sampling_args(parser, default_output, default_seed):
    """Flags shared by inference.py and inference_per_class.py."""
    # One set of flags and one noise rule: a tree that one script began, the other can complete, and
    # the same seed, class and index give the same image in both.
    add = parser.add_argument
    add("--checkpoint", required=True, help="LDM checkpoint, e.g. ldm_checkpoints/checkpoint_best.pt")
    add("--output_dir", default=default_output, help="output folder")
    add("--batch_size", type=cli.positive_int, default=16, help="images per forward pass")
    add("--cfg_scale", type=cli.nonnegative_float, default=3.0, help="1 = conditional, 0 = unconditional")
    add("--num_inference_steps", type=cli.positive_int, default=50, help="sampling steps")
    add("--scheduler", choices=sorted(SAMPLERS), default="ddim", help="dpmsolver++/unipc: 20-30 steps")
    add("--seed", type=cli.nonnegative_int, default=default_seed, help="noise seed")
    add("--no_ema", action="store_true", help="use the raw weights instead of the EMA weights")
    add("--vae_pretrained", help="VAE hub id or folder; default: the one recorded in the checkpoint")
    add("--mixed_precision", choices=cli.MIXED_PRECISION, default="no", help="CUDA autocast; ignored on CPU")
    add("--overwrite", action="store_true", help="regenerate images whose files already exist")
    add("--classifier", metavar="PATH", help="classifier guidance by this train_classifier.py checkpoint")
    add("--classifier_scale", type=cli.nonnegative_float, metavar="S", help=SCALE_HELP)


class LDMSampler:
    """A trained LDM ready to sample: model, VAE codec, sampler, latent shape and the data's decoding rule."""

    def __init__(self, ckpt, args, device):
        # The architecture, classes, decoding rule and VAE all come from the checkpoint; --vae_pretrained
        # only points at another copy of the same VAE (e.g. a local folder on an offline machine).
        config = ckpt["config"]
        self.device = torch.device(device)
        # First, so that a classifier of another LDM fails before the model and VAE load. Callers that
        # build args without the classifier flags (older code, the app) sample unguided.
        self.classifier, self.classifier_scale = load_guide(
            ckpt, getattr(args, "classifier", None), getattr(args, "classifier_scale", None), self.device
        )
        self.class_names = list(ckpt["class_names"])
        self.intensity = intensity_of(ckpt)
        self.model = model_from_checkpoint(ckpt, use_ema=not args.no_ema).to(self.device)
        vae = load_vae(args.vae_pretrained or config["vae_pretrained"]).to(self.device)
        self.codec = LatentCodec(vae, config["image_channels"])
        self.latent_shape = (config["latent_channels"], config["latent_size"], config["latent_size"])
        self.sampler = make_sampler(args.scheduler, ckpt["scheduler_config"])
        self.args = args
        # Autocast only on CUDA: 16-bit autocast on the CPU is slower than fp32, so it falls back, as in
        # training, with a warning instead of an error.
        on_cuda = self.device.type == "cuda" and args.mixed_precision != "no"
        if args.mixed_precision != "no" and not on_cuda:
            warnings.warn(
                f"--mixed_precision {args.mixed_precision} needs CUDA; sampling in fp32", stacklevel=2
            )
        self.dtype = (
            {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision) if on_cuda else None
        )

    def sample(self, label, indices):
        """(len(indices), C, H, W) images in [0, 1] of one class; noise fixed by seed, class and index."""
        # Noise per (seed, class, index), never per batch: resumed or re-batched runs give the same images.
        noise = noise_for(self.args.seed, label, indices, self.latent_shape).to(self.device)
        labels = torch.full((len(indices),), label, device=self.device, dtype=torch.long)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            latents = denoise(
                self.model,
                self.sampler,
                noise,
                labels,
                self.args.cfg_scale,
                self.args.num_inference_steps,
                self.classifier,
                self.classifier_scale,
            )
        # Decoding runs outside autocast, in the VAE's own precision.
        return to_unit(self.codec.decode(latents.float())).cpu()


def load_guide(ckpt, path, scale, device):
    """(classifier, scale) of --classifier and --classifier_scale, checked against the LDM; (None, 0.0)
    without --classifier."""
    if path is None:
        if scale is not None:
            raise UserError(
                "--classifier_scale needs --classifier PATH (a checkpoint of train_classifier.py)"
            )
        return None, 0.0
    classifier_ckpt = load_classifier_checkpoint(path)
    check_classifier_fits(classifier_ckpt, ckpt, path)
    prediction = ckpt["scheduler_config"].get("prediction_type")
    if prediction not in ("epsilon", "v_prediction"):
        raise UserError(
            f"classifier guidance needs an epsilon or v_prediction LDM; this one predicts {prediction!r}"
        )
    return classifier_from_checkpoint(classifier_ckpt).to(device), 1.0 if scale is None else scale


def resolve_classes(tokens, class_names):
    """Class indices from names or integer indices; all classes when none are given."""
    if not tokens:
        return list(range(len(class_names)))
    chosen = []
    # A name wins over an index: a class folder may well be called "3".
    for token in tokens:
        if token in class_names:
            chosen.append(class_names.index(token))
        elif token.lstrip("-").isdigit():
            # Negative numbers pass the test above, so the range check names them instead of 'not a class'.
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


def image_path(output_dir, class_name, index, intensity):
    """<output_dir>/<class_name>/<index:06d>.png (.tif for float data)."""
    return Path(output_dir) / class_name / f"{index:06d}{images.suffix(intensity)}"


def missing_indices(output_dir, class_name, count, intensity, overwrite):
    """Indices below `count` still to generate: all with --overwrite, else those without a complete file
    (an interrupted run can leave a truncated one, which is made again)."""
    return [
        i
        for i in range(count)
        if overwrite or not images.is_readable_image(image_path(output_dir, class_name, i, intensity))
    ]


def clean_sample_tree(output_dir, class_names):
    """Delete temporaries that a sampler killed while writing left in the class folders."""
    # Tools that list the folders (an evaluation, a copy) would otherwise meet half-written files.
    for name in class_names:
        files.clean_temporaries(Path(output_dir) / name)


def write_images(output_dir, class_name, indices, samples, intensity):
    """Save a batch of samples (N, C, H, W) in [0, 1] under their indices, each file atomically."""
    (Path(output_dir) / class_name).mkdir(parents=True, exist_ok=True)
    # images.save writes at the data's depth (16-bit PNG, float TIFF), through a temporary file.
    for index, sample in zip(indices, samples, strict=True):
        images.save(sample, image_path(output_dir, class_name, index, intensity), intensity)


def beside(output_dir, ending):
    """A file next to the sample tree, <output_dir><ending>: outside it, so evaluation never counts it."""
    folder = Path(output_dir)
    if not folder.name:  # "." or "..": name the file after the folder itself
        folder = Path(os.path.abspath(folder))
    return folder.with_name(folder.name + ending)


def free_path(path):
    """`path`, or the first numbered variant of it that does not exist yet."""
    # Numbered, never replaced: an earlier grid or .npz survives a second run without --overwrite.
    path, number = Path(path), 1
    candidate = path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}_{number:03d}{path.suffix}")
        number += 1
    return candidate


def outside_samples(path, output_dir, flag):
    """Refuse an extra output inside the sample tree, where evaluation would count it as a sample."""
    # Both resolved: a relative path or a symlinked folder must not slip inside unnoticed.
    if Path(path).resolve().is_relative_to(Path(output_dir).resolve()):
        raise UserError(
            f"{flag} {path} is inside --output_dir {output_dir}, where it would count as a sample; "
            "put it outside (default: beside the folder)"
        )
    return Path(path)


def save_grid(rows, path):
    """One preview grid (8-bit PNG), a row per class, written atomically."""
    # An 8-bit preview whatever the data's depth: it is for looking at, never for evaluation.
    grid = make_grid(torch.cat(rows), nrow=len(rows[0]))
    files.atomic_write(path, lambda tmp: save_image(grid, tmp, format="png"))
    print(f"grid saved to {path}")


def build_parser():
    parser = cli.Parser(description=__doc__)
    add_sampling_args(parser, default_output="./generated", default_seed=42)
    add = parser.add_argument
    # This script's own flags; the sampling ones are shared with inference_per_class.py.
    add("--class_label", nargs="+", help="class names or indices to generate (default: every class)")
    add("--num_samples", type=cli.positive_int, default=10, help="images per class")
    add("--save_grid", action="store_true", help="also save a grid, a row per class, <output_dir>_grid.png")
    add("--grid_path", help="save the grid here instead (implies --save_grid; must be outside --output_dir)")
    add("--no_save_images", action="store_true", help="do not write single images (use with --save_grid)")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def grid_destination(args):
    """Where the grid goes (None without one), checked before any sampling starts."""
    # Checked before the model loads: a bad --grid_path fails at once, not after all the sampling.
    if not (args.save_grid or args.grid_path):
        return None
    path = outside_samples(
        args.grid_path or beside(args.output_dir, "_grid.png"), args.output_dir, "--grid_path"
    )
    # Without --overwrite an existing grid is kept and the new one takes the next free number.
    return cli.ensure_writable_file(path if args.overwrite else free_path(path), "--grid_path")


def main():
    # Every check that can fail comes first, before the model loads and before any file is written.
    args = parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    classes = resolve_classes(args.class_label, list(ckpt["class_names"]))
    grid_path = grid_destination(args)
    write = not args.no_save_images
    if write:
        cli.ensure_writable_dir(args.output_dir, "--output_dir")
    # TF32 matmuls on CUDA, as in training (the DiT paper's setting); no effect on the CPU.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    sampler = LDMSampler(ckpt, args, device)
    rule, channels = sampler.intensity, sampler.codec.image_channels
    clean_sample_tree(args.output_dir, sampler.class_names)
    # Timed from here: loading the model and the VAE is not part of the images/s figure.
    timer = training.Timer(device)
    made, num_batches, rows = 0, 0, []
    for label in classes:
        name = sampler.class_names[label]
        # Without image files there is nothing to skip: the grid's samples are all generated.
        todo = missing_indices(args.output_dir, name, args.num_samples, rule, args.overwrite or not write)
        made_now = {}
        # Batches never mix classes: one label per call, each index with its own noise.
        for chunk in batches(todo, args.batch_size):
            samples = sampler.sample(label, chunk)
            made_now.update(zip(chunk, samples, strict=True))
            if write:
                write_images(args.output_dir, name, chunk, samples, rule)
            made, num_batches = made + len(chunk), num_batches + 1
        skipped = args.num_samples - len(todo)
        print(f"class '{name}' ({label}): generated {len(todo)}, skipped {skipped} existing", flush=True)
        # The grid shows every index: new samples from memory, skipped ones read back from their files.
        if grid_path is not None:
            row = [
                made_now[i]
                if i in made_now
                else images.load(image_path(args.output_dir, name, i, rule), rule, channels)
                for i in range(args.num_samples)
            ]
            rows.append(torch.stack(row))  # (num_samples, C, H, W)
    # Throughput of what this run generated; skipped files do not count.
    print(training.timing_line(made, args.num_inference_steps, num_batches, timer.elapsed()), flush=True)
    if grid_path is not None:
        save_grid(rows, grid_path)


if __name__ == "__main__":
    run_cli(main)
