"""Sample images from a DiT checkpoint: one written by train.py (EMA weights by default) or an official
DiT file (a plain state_dict such as pretrained_models/DiT-XL-2-256x256.pt from download.py).

Images go to OUTPUT/<class_name>/<index:06d>.png; files that already exist are kept and skipped, so an
interrupted run continues where it stopped. The architecture, image size and classes are read from the
checkpoint; flags that contradict it are an error.
"""

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from diffusion import classifier_free_guidance, create_diffusion  # noqa: E402
from download import official_checkpoint  # noqa: E402
from utils import (  # noqa: E402
    UserError,
    add_architecture_flags,
    add_flag,
    architecture,
    autocast,
    build_dit,
    check_precision,
    checkpoint_mismatch,
    class_counts,
    images_from_latents,
    latent_size,
    load_checkpoint,
    load_vae,
    run_cli,
    setup_distributed,
    state_dict_facts,
    to_pil,
    vae_downsample,
    variant_name,
)


def build_parser(ddp):
    """Flags of sample.py, or of sample_ddp.py (other defaults, FID sample counts, .npz always)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
        type=int,
        default=None,
        help="image side in pixels (default: from the checkpoint)",
    )
    add_flag(
        parser,
        "--num-classes",
        type=int,
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
        type=float,
        default=1.5 if ddp else 4.0,
        help=f"classifier-free guidance scale; 1 = none, 0 = unconditional (default: {1.5 if ddp else 4.0})",
    )
    add_flag(
        parser,
        "--cfg-channels",
        type=int,
        default=None,
        help="guide only the first N latent channels; 3 reproduces the published FID protocol (default: all)",
    )
    add_flag(
        parser, "--num-sampling-steps", type=int, default=250, help="respaced diffusion steps (default: 250)"
    )
    add_flag(
        parser,
        "--sampler",
        choices=["ddpm", "ddim"],
        default="ddpm",
        help="ancestral DDPM or DDIM (default: ddpm)",
    )
    add_flag(parser, "--eta", type=float, default=0.0, help="DDIM noise; 0 = deterministic (default: 0)")
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
            type=int,
            default=50000,
            help="exact total number of images (default: 50000)",
        )
        add_flag(
            parser,
            "--per-proc-batch-size",
            "--batch-size",
            type=int,
            default=32,
            help="images per process per batch (default: 32)",
        )
    else:
        add_flag(parser, "--num-samples", type=int, default=8, help="total number of images (default: 8)")
        add_flag(parser, "--batch-size", type=int, default=8, help="images per batch (default: 8)")
    add_flag(
        parser,
        "--output-dir",
        default=None if ddp else "samples",
        help="output folder (default: "
        + ("samples/<model>-<ckpt>-size-<S>-cfg-<scale>-seed-<seed>" if ddp else "samples")
        + ")",
    )
    add_flag(
        parser,
        "--npz",
        default=None,
        help="also write all images as an .npz (arr_0 uint8 NxHxWx3, arr_1 labels) for the ADM evaluator"
        + (" (default: <output-dir>.npz)" if ddp else ""),
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


def checkpoint_weights(ckpt, path, weights):
    """(state_dict, saved config) of a train.py checkpoint, an original DiT train.py file or a state_dict."""
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
        image_mode=saved.get("image_mode", "RGB"),
        class_names=saved.get("class_names", []),
    )


def load_model(args, device):
    """DiT (strictly loaded), its config and the VAE."""
    path = args.ckpt or official_path(args)
    state, saved = checkpoint_weights(load_checkpoint(path), path, args.weights)
    vae = load_vae(args.vae or saved.get("vae") or "ema", device)
    facts = state_dict_facts(state, vae_downsample(vae))
    config = resolve_config(args, facts, saved, vae)
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


def sampling_plan(labels, total, config, output_dir):
    """(label, output path) of every image, the total spread as evenly as possible over the labels."""
    plan = []
    for label, count in zip(labels, class_counts(total, len(labels)), strict=True):
        folder = os.path.join(output_dir, class_folder(config, label))
        plan += [(label, os.path.join(folder, f"{i:06d}.png")) for i in range(count)]
    return plan


def sample_batch(model, vae, diffusion, config, args, labels, seed, device):
    """Decoded uint8 images (N, H, W, 3) for one batch; its noise depends only on the seed."""
    generator = torch.Generator(device).manual_seed(seed)
    size = config["input_size"]
    noise = torch.randn(len(labels), config["in_channels"], size, size, generator=generator, device=device)
    y = torch.tensor(labels, device=device)
    model_fn = classifier_free_guidance(model, args.cfg_scale, model.null_class, args.cfg_channels)
    with autocast(device, args.precision):
        latents = diffusion.sample_loop(model_fn, noise, y, args.sampler, args.eta, generator)
    return images_from_latents(vae, latents.float(), config["latent_scale"])


def default_output_dir(args, config, ckpt_path):
    """samples/<model>-<ckpt>-size-<S>-cfg-<scale>-seed-<seed>, as the original sample_ddp.py names it."""
    stem = os.path.splitext(os.path.basename(ckpt_path))[0]
    model = config["model"].replace("/", "-")
    name = f"{model}-{stem}-size-{config['image_size']}-cfg-{args.cfg_scale}-seed-{args.seed}"
    return os.path.join("samples", name)


def write_npz(plan, path):
    """All planned images as arr_0 (N, H, W, 3) uint8, RGB as the ADM evaluator expects; labels as arr_1."""
    arr = np.stack([np.asarray(Image.open(p).convert("RGB")) for _, p in plan])
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, arr_0=arr, arr_1=np.array([label for label, _ in plan]))
    os.replace(tmp, path)
    return arr.shape


def check_args(args, total, batch_size, config):
    """Reject counts and guidance settings that cannot work."""
    if total < 1 or batch_size < 1:
        raise UserError("the number of samples and the batch size must be at least 1")
    if args.cfg_channels is not None and not 1 <= args.cfg_channels <= config["in_channels"]:
        raise UserError(
            f"--cfg-channels {args.cfg_channels}: the latents have {config['in_channels']} channels"
        )
    if not 1 <= args.num_sampling_steps <= 1000:
        raise UserError(f"--num-sampling-steps {args.num_sampling_steps}: use 1..1000")


def main(ddp=False):
    args = build_parser(ddp).parse_args()
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
    check_args(args, total, batch_size, config)
    output_dir = args.output_dir or default_output_dir(args, config, ckpt_path)
    npz_path = args.npz or (f"{output_dir.rstrip('/')}.npz" if ddp else None)
    plan = sampling_plan(parse_labels(args.class_labels, config), total, config, output_dir)
    diffusion = create_diffusion(args.num_sampling_steps)
    batches = [plan[i : i + batch_size] for i in range(0, len(plan), batch_size)]
    done = {j for j, b in enumerate(batches) if not args.overwrite and all(os.path.exists(p) for _, p in b)}
    todo = [(j, b) for j, b in enumerate(batches) if j % world == rank and j not in done]
    if rank == 0:
        print(
            f"Sampling {len(plan)} images of {config['model']} ({ckpt_path}) into {output_dir}: "
            f"{args.sampler} {args.num_sampling_steps} steps, cfg {args.cfg_scale}, "
            f"{world} process(es) on {device}; "
            f"{len(done)} of {len(batches)} batches already done"
        )
    start, generated = time.time(), 0
    for j, batch in tqdm(todo, disable=rank != 0, desc="batches", file=sys.stdout):
        images = sample_batch(
            model,
            vae,
            diffusion,
            config,
            args,
            [label for label, _ in batch],
            args.seed * 1_000_003 + j,
            device,
        )
        for (_, path), image in zip(batch, images, strict=True):
            if args.overwrite or not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                to_pil(image, config["image_mode"]).save(path)
        generated += len(batch)
    report_timing(generated, len(todo), args.num_sampling_steps, time.time() - start, world, device, rank)
    if world > 1:
        dist.barrier()
    if rank == 0 and npz_path:
        print(f"Wrote {npz_path} with arr_0 of shape {write_npz(plan, npz_path)}")
    if world > 1:
        dist.destroy_process_group()


def report_timing(images, batches, steps, seconds, world, device, rank):
    """Images, steps, total seconds, seconds per image, ms per denoising step, images per second."""
    counts = torch.tensor([images, batches], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(counts)
    images, batches = int(counts[0]), int(counts[1])
    if rank == 0:
        per_image = seconds / images if images else math.nan
        per_step = 1000 * seconds * world / (batches * steps) if batches else math.nan
        print(
            f"Timing: {images} images, {steps} steps, {seconds:.2f} s total, {per_image:.3f} s/image, "
            f"{per_step:.1f} ms/step (per batch), {images / seconds if seconds else 0:.2f} images/s"
        )


if __name__ == "__main__":
    run_cli(main)
