"""Generate images that follow masks with a trained ControlNet on its LDM."""

import math
import warnings
import zlib
from pathlib import Path

import torch

from core import cli, files, images, training
from core.datasets import list_images
from core.errors import UserError, run_cli
from core.images import open_image
from dataset import load_mask
from mask_metrics import FOREGROUND, score, summary
from models import SCHEDULERS, decode, load_controlled_unet, load_ldm, load_vae, make_scheduler
from models import sample_latents as run_sampler
from utils import PRECISION_HELP, load_checkpoint

# Shown as the --help epilog: where every output goes and how masks are read, in one place.
LAYOUT = """outputs:
  <output_dir>/<mask_stem>_<k:03d>.png               k = 0 .. num_images-1 (null-class token)
  <output_dir>/<class_name>/<mask_stem>_<k:03d>.png  with --class_name / --class_label
  written at the training data's depth (recorded in the checkpoint): 8-bit PNG, 16-bit PNG for
  grayscale data deeper than 8 bits, .tif for float data.
  <comparison_dir>/[<class_name>/]<mask_stem>.png    with --save_comparison: mask | image 0 | ...
  (8-bit PNG; default <output_dir>_comparison beside output_dir, so output_dir holds only samples)
Existing readable outputs are skipped (resume) unless --overwrite; truncated ones are made again.
Masks are scaled like in training (labels / the checkpoint's mask_max_value), their shorter side is
resized nearest-neighbour to the model's image size and the centre is cropped."""


def build_parser():
    """The command line; the first name of a flag is canonical, later ones are accepted aliases."""
    p = cli.Parser(description=__doc__, epilog=LAYOUT)
    # One line per flag; cli.Parser appends each flag's default to its help.
    add = p.add_argument
    add("--checkpoint", "--ckpt", required=True, help="ControlNet checkpoint (controlnet/train.py)")
    add("--ldm_checkpoint", help="LDM checkpoint (default: the path recorded in --checkpoint)")
    add("--mask", help="one mask image (or use --mask_folder)")
    add("--mask_folder", help="folder of mask images (png jpg jpeg bmp tif tiff webp)")
    add("--output_dir", default="./generated", help="where images go")
    add("--comparison_dir", help="where --save_comparison rows go (default: <output_dir>_comparison)")
    add("--num_images", type=cli.positive_int, default=1, help="images per mask")
    add("--batch_size", type=cli.positive_int, default=16, help="images per forward pass")
    add("--controlnet_scale", type=cli.nonnegative_float, default=1.0, help="mask weight; 0 off, 1.5+ strict")
    add("--scheduler", default="unipc", choices=sorted(SCHEDULERS), help="sampling scheduler")
    add("--num_inference_steps", type=cli.positive_int, default=25, help="sampling steps")
    add("--class_name", help="generate this LDM class (default: the null-class token)")
    add("--class_label", type=int, help="generate this class index instead of a name")
    add("--cfg_scale", "--guidance_scale", type=cli.finite_float, default=3.0, help="class guidance; 1 off")
    add("--seed", type=cli.nonnegative_int, default=42, help="seed; image k of a mask is reproducible")
    add("--save_comparison", action="store_true", help="also write mask | generated rows per mask")
    add("--eval_masks", action="store_true", help="Dice/IoU of each mask and its Otsu-segmented image")
    add("--foreground", default="bright", choices=FOREGROUND, help="masked part's brightness (--eval_masks)")
    add("--mask_max_value", type=cli.positive_int, help="full-intensity label (default: training's K)")
    add("--overwrite", action="store_true", help="regenerate images that already exist")
    add("--no_ema", action="store_true", help="use the raw instead of the EMA weights")
    add("--vae_pretrained", help="VAE hub id or local folder (default: the checkpoint's)")
    add("--mixed_precision", "--precision", type=cli.mixed_precision, default="no", help=PRECISION_HELP)
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    # Exactly one source of masks; p.error prints the usual usage line and exits with status 2.
    if (args.mask is None) == (args.mask_folder is None):
        p.error("give exactly one of --mask and --mask_folder")
    return args


def mask_files(args):
    """The masks to follow, from --mask or --mask_folder."""
    if args.mask:
        # Checked before any model loads, so a wrong path costs nothing and reads as one error line.
        if not Path(args.mask).is_file():
            raise UserError(f"--mask {args.mask} does not exist")
        return [Path(args.mask)]
    if not Path(args.mask_folder).is_dir():
        raise UserError(f"--mask_folder {args.mask_folder} does not exist")
    found = list_images(args.mask_folder)
    if not found:
        raise UserError(f"--mask_folder {args.mask_folder} holds no images (png jpg jpeg bmp tif tiff webp)")
    return found


def class_choice(args, class_names):
    """(label, folder name) of the requested class, or (None, None) for the null-class token."""
    # A name wins over a label when both are given.
    if args.class_name is not None:
        if args.class_name not in class_names:
            raise UserError(
                f"--class_name '{args.class_name}' is not one of the checkpoint's classes {class_names}"
            )
        return class_names.index(args.class_name), args.class_name
    if args.class_label is not None:
        if not 0 <= args.class_label < len(class_names):
            raise UserError(f"--class_label {args.class_label} is out of range 0..{len(class_names) - 1}")
        return args.class_label, class_names[args.class_label]
    # None selects the null-class token: samples follow the mask alone, with no class guidance.
    return None, None


def job_seed(seed, stem, k):
    """Seed of image k of a mask: independent of batching and of which files already exist."""
    # crc32 rather than hash(): Python salts str hashes per process, which would break reproducibility.
    return seed * 1_000_003 + zlib.crc32(f"{stem}:{k}".encode())


class Generator:
    """The loaded ControlNet, LDM and VAE plus the sampling settings."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # TF32 matmuls on Ampere and later: much faster sampling for a precision loss sampling tolerates.
        torch.backends.cuda.matmul.allow_tf32 = True
        ckpt = load_checkpoint(args.checkpoint, "controlnet", "--checkpoint")
        self.cfg = ckpt["config"]
        # train.py records the LDM's absolute path; --ldm_checkpoint overrides it when the file has moved.
        ldm_path = args.ldm_checkpoint or self.cfg["ldm_checkpoint"]
        if not Path(ldm_path).is_file():
            raise UserError(f"LDM checkpoint {ldm_path} not found; pass it with --ldm_checkpoint")
        self.ldm = load_ldm(ldm_path)
        self.model = load_controlled_unet(ckpt, self.ldm, use_ema=not args.no_ema).to(self.device)
        self.embedder = self.ldm.class_embedder.to(self.device)
        self.vae = load_vae(args.vae_pretrained or self.cfg["vae_pretrained"]).to(self.device)
        self.label, self.class_folder = class_choice(args, self.ldm.class_names)
        self.dtype = self.autocast_dtype()
        self.intensity = written_rule(ckpt.get("intensity", images.EIGHT_BIT), self.cfg["image_channels"])

    def autocast_dtype(self):
        """Autocast dtype on CUDA; None (fp32) otherwise."""
        mode = self.args.mixed_precision
        if mode == "auto":  # bf16 where CUDA has it, else fp32
            mode = "bf16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
        if mode == "no":
            return None
        # Half precision is only used on CUDA; elsewhere fp32 with a warning, so GPU command lines still run.
        if self.device.type != "cuda":
            warnings.warn(
                f"--mixed_precision {self.args.mixed_precision} needs CUDA; using fp32", stacklevel=2
            )
            return None
        return {"fp16": torch.float16, "bf16": torch.bfloat16}[mode]

    def tokens(self, n):
        """Conditioning and null tokens (N, 1, D); null is None when no guidance applies."""
        null = self.embedder(torch.full((n,), self.ldm.null_label, device=self.device))
        # No class chosen: the null token is the conditioning itself and guidance has nothing to contrast.
        if self.label is None:
            return null, None
        return self.embedder(torch.full((n,), self.label, device=self.device)), null

    def latent_noise(self, seeds):
        """(N, c, h, w) starting noise, one generator per image."""
        side = self.cfg["image_size"] // self.cfg["vae_downsample"]
        shape = (self.model.unet.config.in_channels, side, side)
        # One CPU generator per image: image k's noise depends only on its seed, not on its batch or device.
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])

    @torch.no_grad()
    def generate(self, conditioning, seeds):
        """Images (N, C, H, W) in [0, 1] following conditioning (N, Cm, H, W)."""
        tokens, null = self.tokens(len(seeds))
        # A fresh scheduler per batch: the multistep solvers keep state from their previous steps.
        scheduler = make_scheduler(self.args.scheduler, self.ldm.scheduler_config)
        with torch.autocast(
            self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None
        ):
            latents = run_sampler(
                self.model,
                scheduler,
                self.latent_noise(seeds).to(self.device),
                conditioning.to(self.device),
                tokens,
                null,
                self.args.cfg_scale,
                self.args.controlnet_scale,
                self.args.num_inference_steps,
            )
            # Decoded under the same autocast as sampling; back to fp32 and from [-1, 1] to [0, 1] for saving.
            return (decode(self.vae, latents, self.cfg).float() + 1) / 2


def written_rule(intensity, channels):
    """The rule samples are written under: the data's, except colour, which PIL writes as 8-bit RGB.

    core.images.save would tag such a file with the data's depth although it holds 8-bit values.
    """
    return intensity if channels == 1 else images.EIGHT_BIT


def output_folder(args, class_folder):
    """The folder samples go to: output_dir, or its class sub-folder."""
    return Path(args.output_dir) / class_folder if class_folder else Path(args.output_dir)


def comparison_folder(args):
    """Where comparisons go: --comparison_dir, else <output_dir>_comparison beside the samples."""
    if args.comparison_dir:
        return Path(args.comparison_dir)
    # Beside output_dir, not inside it, so output_dir holds only samples; a root folder has no name
    # to suffix and needs an explicit --comparison_dir.
    out = Path(args.output_dir).absolute()
    if not out.name:
        raise UserError(f"--output_dir {out} has no parent folder for comparisons: pass --comparison_dir")
    return out.with_name(f"{out.name}_comparison")


def output_path(args, class_folder, stem, k, intensity):
    """Where image k of a mask goes."""
    return output_folder(args, class_folder) / f"{stem}_{k:03d}{images.suffix(intensity)}"


def plan_jobs(args, masks, class_folder, intensity):
    """(mask path, k) for every image still to make; readable existing files are kept unless --overwrite."""
    jobs = [(m, k) for m in masks for k in range(args.num_images)]
    if args.overwrite:
        return jobs
    return [
        (m, k)
        for m, k in jobs
        # A truncated file (a run killed mid-write) is unreadable, so it counts as missing and is made again.
        if not images.is_readable_image(output_path(args, class_folder, m.stem, k, intensity))
    ]


def comparison_row(mask, generated):
    """mask | image 0 | image 1 ... as one (C, H, W) tensor in [0, 1]; gray tiles become RGB beside colour."""
    tiles = [mask, *generated]
    # Tiles join along the width (dim 2), which needs one channel count: gray goes to RGB beside colour.
    if len({t.shape[0] for t in tiles}) > 1:
        tiles = [t.expand(3, -1, -1) if t.shape[0] == 1 else t for t in tiles]
    return torch.cat(tiles, dim=2)


def check_outputs(args):
    """Prove every output folder writable before any model is loaded."""
    cli.ensure_writable_dir(args.output_dir, "--output_dir")
    if args.save_comparison:
        cli.ensure_writable_dir(comparison_folder(args), "--comparison_dir")


def run(args):
    """Generate every planned image in batches, then comparisons and mask scores."""
    masks = mask_files(args)
    check_outputs(args)
    gen = Generator(args)
    # Masks are prepared as in training: size, channels and label scale come from the checkpoint.
    size, channels = gen.cfg["image_size"], gen.cfg["mask_channels"]
    max_value = args.mask_max_value or gen.cfg["mask_max_value"]
    # Each mask is loaded once and reused for generation, comparisons and the mask scores.
    conditioning = {m: load_mask(m, channels, max_value, size) for m in masks}  # (Cm, H, W) each
    folder = output_folder(args, gen.class_folder)
    folder.mkdir(parents=True, exist_ok=True)
    files.clean_temporaries(folder)  # left by a run killed while writing
    jobs = plan_jobs(args, masks, gen.class_folder, gen.intensity)
    print(f"{len(masks)} masks x {args.num_images} images: {len(jobs)} to generate in {args.output_dir}")
    # The timer starts after loading: the timing line covers sampling, decoding and saving only.
    timer = training.Timer(gen.device)
    # Batches mix masks freely: job_seed makes every image independent of the batch it lands in.
    # Each batch is saved at once, so a killed run keeps its finished images for the next run.
    for i in range(0, len(jobs), args.batch_size):
        batch = jobs[i : i + args.batch_size]
        samples = gen.generate(
            torch.stack([conditioning[m] for m, _ in batch]),
            [job_seed(args.seed, m.stem, k) for m, k in batch],
        )
        for (m, k), sample in zip(batch, samples.cpu(), strict=True):
            images.save(sample, output_path(args, gen.class_folder, m.stem, k, gen.intensity), gen.intensity)
    batches = math.ceil(len(jobs) / args.batch_size)
    print(training.timing_line(len(jobs), args.num_inference_steps, batches, timer.elapsed(), "timing"))
    if args.save_comparison:
        save_comparisons(args, gen, masks, conditioning)
    if args.eval_masks:
        evaluate(args, gen, masks)


def saved_paths(args, gen, mask):
    """The num_images generated files of one mask."""
    return [output_path(args, gen.class_folder, mask.stem, k, gen.intensity) for k in range(args.num_images)]


def save_comparisons(args, gen, masks, conditioning):
    """<comparison_dir>/[<class>/]<mask_stem>.png: the mask as the model sees it, then its images."""
    folder = comparison_folder(args) / (gen.class_folder or "")
    folder.mkdir(parents=True, exist_ok=True)
    files.clean_temporaries(folder)
    # Rows are built from the files on disk, so images skipped as already made appear too.
    for m in masks:
        channels = gen.cfg["image_channels"]
        generated = [images.load(p, gen.intensity, channels) for p in saved_paths(args, gen, m)]
        images.save(comparison_row(conditioning[m], generated), folder / f"{m.stem}.png", images.EIGHT_BIT)
    print(f"comparisons in {folder}")


def evaluate(args, gen, masks):
    """Print Dice/IoU between each mask, as the model was given it, and its Otsu-segmented images."""
    scores = [
        score(open_image(m), open_image(p), args.foreground, gen.intensity, gen.cfg["mask_channels"])
        for m in masks
        for p in saved_paths(args, gen, m)
    ]
    # score() returns None for a pair it cannot score; the summary covers the others.
    print(f"{summary([s for s in scores if s is not None])} (controlnet_scale {args.controlnet_scale})")


def main():
    run(parse_args())


if __name__ == "__main__":
    # run_cli turns a UserError into one 'error: ...' line on stderr and a non-zero exit.
    run_cli(main)
