"""Sample images from a DiT checkpoint: one written by train.py (EMA weights by default) or an official
DiT file (a plain state_dict such as pretrained_models/DiT-XL-2-256x256.pt from download.py).

Images go to OUTPUT/<class_name>/<index:06d>.png, written atomically at the training data's bit depth and
channel count (a 16-bit gray data set gives 16-bit gray PNGs, float data .tif files). Files that already
exist and decode completely are kept and skipped, so an interrupted run continues where it stopped. The
architecture, image size, classes and decoding rule are read from the checkpoint; flags that contradict
it are an error.
"""

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from core import images  # noqa: E402
from core.cli import Parser, finite_float, nonnegative_float, positive_int  # noqa: E402
from core.files import TEMP_MARK, atomic_write, clean_temporaries  # noqa: E402
from diffusion import classifier_free_guidance, create_diffusion  # noqa: E402
from download import official_checkpoint  # noqa: E402
from utils import (  # noqa: E402
    UserError,
    add_architecture_flags,
    add_flag,
    architecture,
    autocast,
    build_dit,
    check_output_folder,
    check_precision,
    checkpoint_mismatch,
    class_counts,
    data_rule,
    images_from_latents,
    latent_size,
    load_checkpoint,
    load_vae,
    other_model,
    run_cli,
    setup_distributed,
    state_dict_facts,
    vae_downsample,
    variant_name,
)

MAX_STEPS = 1000  # the diffusion schedule of every DiT


def build_parser(ddp):
    """Flags of sample.py, or of sample_ddp.py (other defaults, FID sample counts, .npz always)."""
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_architecture_flags(parser, None)
    add_flag(
        parser,
        "--ckpt",
        default=None,
        help="checkpoint .pt (default: the official DiT-XL/2 file for --image-size, downloaded if missing)",
    )
    add_flag(
        parser,
        "--image-size",
        type=positive_int,
        default=None,
        help="image side in pixels (default: from the checkpoint)",
    )
    add_flag(
        parser,
        "--num-classes",
        type=positive_int,
        default=None,
        help="number of classes (default: from the checkpoint)",
    )
    add_flag(
        parser,
        "--vae",
        default=None,
        help="'ema', 'mse' (stabilityai/sd-vae-ft-*) or a local diffusers folder "
        "(default: the training VAE, else ema)",
    )
    add_flag(
        parser,
        "--cfg-scale",
        type=finite_float,
        default=1.5 if ddp else 4.0,
        help=f"classifier-free guidance scale; 1 = none, 0 = unconditional (default: {1.5 if ddp else 4.0})",
    )
    add_flag(
        parser,
        "--cfg-channels",
        type=positive_int,
        default=None,
        help="guide only the first N latent channels; 3 reproduces the published FID protocol (default: all)",
    )
    add_flag(
        parser,
        "--num-sampling-steps",
        type=positive_int,
        default=250,
        help=f"respaced diffusion steps, 1..{MAX_STEPS} (default: 250)",
    )
    add_flag(
        parser,
        "--sampler",
        choices=["ddpm", "ddim"],
        default="ddpm",
        help="ancestral DDPM or DDIM (default: ddpm)",
    )
    add_flag(
        parser,
        "--eta",
        type=nonnegative_float,
        default=0.0,
        help="DDIM noise; 0 = deterministic (default: 0)",
    )
    add_flag(
        parser,
        "--class-labels",
        nargs="+",
        default=None,
        help="class indices or names to sample, counts spread evenly over them (default: all classes)",
    )
    if ddp:
        add_flag(
            parser,
            "--num-fid-samples",
            type=positive_int,
            default=50000,
            help="exact total number of images (default: 50000)",
        )
        add_flag(
            parser,
            "--per-proc-batch-size",
            "--batch-size",
            type=positive_int,
            default=32,
            help="images per process per batch (default: 32)",
        )
    else:
        add_flag(
            parser, "--num-samples", type=positive_int, default=8, help="total number of images (default: 8)"
        )
        add_flag(parser, "--batch-size", type=positive_int, default=8, help="images per batch (default: 8)")
    add_flag(
        parser,
        "--output-dir",
        default=None if ddp else "samples",
        help="output folder (default: "
        + ("SAMPLE_DIR/<model>-<ckpt>-size-<S>-cfg-<scale>-seed-<seed>" if ddp else "samples")
        + ")",
    )
    if ddp:
        add_flag(
            parser,
            "--sample-dir",
            default="samples",
            help="parent of the default output folder and .npz, as in the original DiT (default: samples)",
        )
    add_flag(
        parser,
        "--npz",
        default=None,
        help="also write all images as an .npz (arr_0 uint8 NxHxWx3, arr_1 labels, class_names) for the "
        "ADM evaluator" + (" (default: <output-dir>.npz)" if ddp else ""),
    )
    add_flag(parser, "--seed", "--global-seed", type=int, default=0, help="random seed (default: 0)")
    add_flag(
        parser,
        "--weights",
        choices=["ema", "model"],
        default="ema",
        help="which weights of a train.py checkpoint to use (default: ema)",
    )
    add_flag(
        parser,
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="fp32 (as published) or bf16 autocast on CUDA (default: fp32)",
    )
    add_flag(parser, "--overwrite", action="store_true", help="regenerate images that already exist")
    return parser


def parse_args(ddp, argv=None):
    """Flags, checked before anything is loaded: counts, steps and writable output locations."""
    parser = build_parser(ddp)
    args = parser.parse_args(argv)
    if args.num_sampling_steps > MAX_STEPS:
        parser.error(
            f"argument --num-sampling-steps: must be at most {MAX_STEPS}, got {args.num_sampling_steps}"
        )
    if args.output_dir:
        check_output_folder(args.output_dir, "--output-dir")
    elif ddp:  # the default output folder goes under it
        check_output_folder(args.sample_dir, "--sample-dir")
    if args.npz:
        if os.path.isdir(args.npz):
            raise UserError(f"--npz {args.npz} is a folder: pass a file path such as samples.npz")
        check_output_folder(Path(args.npz).absolute().parent, "--npz")
    return args


def checkpoint_weights(ckpt, path, weights):
    """(state_dict, saved config) of a train.py checkpoint, an original DiT train.py file or a state_dict."""
    what = other_model(ckpt)
    if what:
        raise UserError(
            f"--ckpt {path} is {what}, not a DiT checkpoint: pass one from dit/train.py "
            "(RESULTS/NNN-<model>/checkpoints) or an official DiT file"
        )
    if isinstance(ckpt, dict) and weights in ckpt and isinstance(ckpt[weights], dict):
        saved = ckpt.get("config")
        if saved is None and "args" in ckpt:  # facebookresearch/DiT train.py: args is a Namespace
            saved = {k: getattr(ckpt["args"], k, None) for k in ("model", "vae")}
        return ckpt[weights], saved or {}
    if isinstance(ckpt, dict) and "pos_embed" in ckpt:
        return ckpt, {}
    raise UserError(f"{path} holds no DiT weights (expected a train.py checkpoint or a DiT state_dict)")


def resolve_config(args, facts, saved, vae):
    """Model config from the flags, falling back to the checkpoint; contradictions are user errors."""
    name = args.model or saved.get("model") or variant_name(facts)
    if name is None:
        raise UserError(
            f"the checkpoint's shapes ({facts}) match no DiT variant; pass --model and --num-heads"
        )
    # A checkpoint's own size overrides apply only to its own variant; another --model is compared as named.
    saved_arch = saved if name == saved.get("model") else {}
    flags = {k: getattr(args, k) for k in ("depth", "hidden_size", "num_heads")}
    arch = architecture(name, {k: flags[k] if flags[k] is not None else saved_arch.get(k) for k in flags})
    image_size = args.image_size or facts["image_size"]
    return dict(
        model=name,
        **arch,
        image_size=image_size,
        num_classes=args.num_classes or facts["num_classes"],
        in_channels=vae.config.latent_channels,
        input_size=latent_size(image_size, vae_downsample(vae), arch["patch_size"]),
        latent_scale=float(vae.config.scaling_factor),
        class_names=saved.get("class_names", []),
    )


def load_model(args, device):
    """DiT (strictly loaded), its config (with the data's decoding rule and channels) and the VAE."""
    path = args.ckpt or official_path(args)
    ckpt = load_checkpoint(path)
    state, saved = checkpoint_weights(ckpt, path, args.weights)
    vae = load_vae(args.vae or saved.get("vae") or "ema", device)
    facts = state_dict_facts(state, vae_downsample(vae))
    config = resolve_config(args, facts, saved, vae)
    config["intensity"], config["channels"] = data_rule(ckpt)
    problem = checkpoint_mismatch(facts, config)
    if problem:
        raise UserError(f"{path} does not fit the chosen model: {problem}")
    model = build_dit(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise UserError(
            f"{path} does not load into {config['model']}: {str(err).splitlines()[1].strip()}"
        ) from None
    return model.to(device).eval(), config, vae, path


def official_path(args):
    """Official DiT-XL/2 file for --image-size (256 or 512), downloaded if missing."""
    if args.model not in (None, "DiT-XL/2"):
        raise UserError(f"--ckpt is required for {args.model}: official weights exist only for DiT-XL/2")
    return official_checkpoint(args.image_size or 256)


def class_folder(config, label):
    """Output folder name of a class: its training name, else its index."""
    names = config["class_names"]
    return names[label] if label < len(names) else str(label)


def parse_labels(tokens, config):
    """Class indices from indices or class names, checked against the model."""
    if tokens is None:
        return list(range(config["num_classes"]))
    labels = []
    for token in tokens:
        if token in config["class_names"]:
            labels.append(config["class_names"].index(token))
        elif token.lstrip("-").isdigit() and 0 <= int(token) < config["num_classes"]:
            labels.append(int(token))
        else:
            known = f" or a name in {config['class_names']}" if config["class_names"] else ""
            raise UserError(
                f"--class-labels {token}: not a class index 0..{config['num_classes'] - 1}{known}"
            )
    return list(dict.fromkeys(labels))


def output_rule(config):
    """The rule samples are written and read back with: the data's, but colour is 8-bit (PIL writes no
    deeper colour PNG), so 16-bit gray data gives 16-bit gray PNGs and colour data 8-bit RGB ones."""
    return images.EIGHT_BIT if config["channels"] == 3 else config["intensity"]


def sampling_plan(labels, total, config, output_dir):
    """(label, output path) of every image, the total spread as evenly as possible over the labels."""
    suffix = images.suffix(output_rule(config))
    plan = []
    for label, count in zip(labels, class_counts(total, len(labels)), strict=True):
        folder = os.path.join(output_dir, class_folder(config, label))
        plan += [(label, os.path.join(folder, f"{i:06d}{suffix}")) for i in range(count)]
    return plan


def clean_stale_temporaries(plan, output_dir, npz_path):
    """Remove what a killed run left half written: temporaries in the output folders and of this .npz."""
    for folder in {output_dir, *(os.path.dirname(path) for _, path in plan)}:
        clean_temporaries(folder)
    if npz_path and os.path.isdir(os.path.dirname(os.path.abspath(npz_path))):
        # The .npz folder may be shared with other runs writing theirs now: remove only this file's.
        npz = Path(npz_path).absolute()
        for stale in npz.parent.iterdir():
            if stale.name.startswith(f".{npz.name}{TEMP_MARK}"):
                stale.unlink(missing_ok=True)


def sample_batch(model, vae, diffusion, config, args, labels, seed, device):
    """Decoded images (N, channels, H, W) in [0, 1] for one batch; its noise depends only on the seed."""
    generator = torch.Generator(device).manual_seed(seed)
    size = config["input_size"]
    noise = torch.randn(len(labels), config["in_channels"], size, size, generator=generator, device=device)
    y = torch.tensor(labels, device=device)
    model_fn = classifier_free_guidance(model, args.cfg_scale, model.null_class, args.cfg_channels)
    with autocast(device, args.precision):
        latents = diffusion.sample_loop(model_fn, noise, y, args.sampler, args.eta, generator)
    return images_from_latents(vae, latents.float(), config["latent_scale"], config["channels"])


def default_output_dir(args, config, ckpt_path):
    """SAMPLE_DIR/<model>-<ckpt>-size-<S>-cfg-<scale>-seed-<seed>, as the original sample_ddp.py names it."""
    stem = os.path.splitext(os.path.basename(ckpt_path))[0]
    model = config["model"].replace("/", "-")
    name = f"{model}-{stem}-size-{config['image_size']}-cfg-{args.cfg_scale}-seed-{args.seed}"
    return os.path.join(getattr(args, "sample_dir", "samples"), name)


def write_npz(plan, path, intensity, channels, class_names):
    """All planned images as arr_0 (N, H, W, 3) uint8 RGB, as the ADM evaluator expects, their labels as
    arr_1 and class_names[label] the name of each label."""
    first = images.to_uint8_rgb(images.load(plan[0][1], intensity, channels)[None])
    arr = np.empty((len(plan), *first.shape[1:]), dtype=np.uint8)  # filled in place: 50K images are GBs
    for i, (_, image_path) in enumerate(plan):
        arr[i] = images.to_uint8_rgb(images.load(image_path, intensity, channels)[None])[0]
    labels = np.array([label for label, _ in plan])

    def write(tmp):
        with open(tmp, "wb") as file:  # a file object, so numpy adds no second .npz suffix
            np.savez(file, arr_0=arr, arr_1=labels, class_names=np.array(class_names, dtype=str))

    atomic_write(path, write)
    return arr.shape


def check_args(args, config):
    """Reject guidance settings that do not fit the model."""
    if args.cfg_channels is not None and args.cfg_channels > config["in_channels"]:
        raise UserError(
            f"--cfg-channels {args.cfg_channels}: the latents have {config['in_channels']} channels"
        )


def summed(values, world, device):
    """Each of the integers summed over all ranks."""
    counts = torch.tensor(values, dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(counts)
    return [int(c) for c in counts]


def main(ddp=False):
    args = parse_args(ddp)
    rank, world, device = setup_distributed()
    torch.set_grad_enabled(False)
    if args.ckpt is None and world > 1:
        if rank == 0:
            official_path(args)  # download once, before the other ranks look for the file
        dist.barrier()
    model, config, vae, ckpt_path = load_model(args, device)
    if rank == 0:
        check_precision(args.precision, device)
    total = args.num_fid_samples if ddp else args.num_samples
    batch_size = args.per_proc_batch_size if ddp else args.batch_size
    check_args(args, config)
    output_dir = args.output_dir or default_output_dir(args, config, ckpt_path)
    check_output_folder(output_dir, "--output-dir")
    npz_path = args.npz or (f"{output_dir.rstrip('/')}.npz" if ddp else None)
    plan = sampling_plan(parse_labels(args.class_labels, config), total, config, output_dir)
    rule = output_rule(config)
    if rank == 0:
        clean_stale_temporaries(plan, output_dir, npz_path)
    if world > 1:
        dist.barrier()  # no rank writes before the stale files are gone
    diffusion = create_diffusion(args.num_sampling_steps)
    batches = [plan[i : i + batch_size] for i in range(0, len(plan), batch_size)]
    # A file counts as done only if it decodes completely: a truncated one from a killed run is redone.
    mine = [(j, b) for j, b in enumerate(batches) if j % world == rank]
    todo = [(j, b) for j, b in mine if args.overwrite or not all(images.is_readable_image(p) for _, p in b)]
    (done,) = summed([len(mine) - len(todo)], world, device)
    if rank == 0:
        print(
            f"Sampling {len(plan)} images of {config['model']} ({ckpt_path}) into {output_dir}: "
            f"{args.sampler} {args.num_sampling_steps} steps, cfg {args.cfg_scale}, "
            f"{world} process(es) on {device}; {config['channels']}-channel {images.describe(rule)}; "
            f"{done} of {len(batches)} batches already done"
        )
    start, generated = time.time(), 0
    for j, batch in tqdm(todo, disable=rank != 0, desc="batches", file=sys.stdout):
        labels = [label for label, _ in batch]
        samples = sample_batch(model, vae, diffusion, config, args, labels, args.seed * 1_000_003 + j, device)
        for (_, path), sample in zip(batch, samples, strict=True):
            if args.overwrite or not images.is_readable_image(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                images.save(sample, path, rule)
        generated += len(batch)
    report_timing(generated, len(todo), args.num_sampling_steps, time.time() - start, world, device, rank)
    if world > 1:
        dist.barrier()
    if rank == 0 and npz_path:
        class_names = [class_folder(config, label) for label in range(config["num_classes"])]
        shape = write_npz(plan, npz_path, rule, config["channels"], class_names)
        print(f"Wrote {npz_path} with arr_0 of shape {shape}")
    if world > 1:
        dist.destroy_process_group()


def report_timing(count, batches, steps, seconds, world, device, rank):
    """Images, steps, total seconds, seconds per image, ms per denoising step, images per second."""
    count, batches = summed([count, batches], world, device)
    if rank == 0:
        per_image = seconds / count if count else math.nan
        per_step = 1000 * seconds * world / (batches * steps) if batches else math.nan
        print(
            f"Timing: {count} images, {steps} steps, {seconds:.2f} s total, {per_image:.3f} s/image, "
            f"{per_step:.1f} ms/step (per batch), {count / seconds if seconds else 0:.2f} images/s"
        )


if __name__ == "__main__":
    run_cli(main)
