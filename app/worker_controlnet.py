"""The controlnet/ worker: images that follow an uploaded mask, through controlnet/inference.py's
Generator (with the LDM the server paired), masks read by dataset.load_mask and scored by
mask_metrics.score, in a process whose sys.path holds controlnet/ only. The protocol is worker_loop.py's."""

import worker_loop  # app/'s shared loop, imported while app/ is still on sys.path

worker_loop.isolate("controlnet")

import torch  # noqa: E402

from core.errors import UserError  # noqa: E402
from core.images import EIGHT_BIT, open_image  # noqa: E402
from dataset import load_mask  # noqa: E402
from inference import Generator, build_parser, class_choice, comparison_row, job_seed  # noqa: E402
from mask_metrics import score  # noqa: E402

GENERATORS = {}  # (ckpt, ldm, vae) -> Generator
MASK_STEM = "mask"  # the upload's stem in job_seed: image k of a request is that of inference.py's mask.png


def flags_for(job):
    """The parsed flags of `inference.py --mask ...` that this request stands for."""
    argv = ["--checkpoint", job["ckpt"], "--ldm_checkpoint", job["ldm"], "--mask", job["mask"]]
    argv += ["--cfg_scale", str(job["guidance_scale"]), "--seed", str(job["seed"])]
    argv += ["--controlnet_scale", str(job["conditioning_scale"])]
    argv += ["--scheduler", job["sampler"]] if job.get("sampler") else []
    argv += ["--num_inference_steps", str(job["steps"])] if job.get("steps") else []
    argv += ["--vae_pretrained", job["vae"]] if job.get("vae") else []
    return build_parser().parse_args(argv)


def generator_for(args, token):
    """The Generator of this ControlNet and LDM (loaded once), set to this request's flags and class
    (token: a class name or index; None: the null-class token, as inference.py without --class_name)."""
    key = (args.checkpoint, args.ldm_checkpoint, args.vae_pretrained)
    if key not in GENERATORS:
        gen = Generator(args)
        # Generator picks CUDA whenever there is one; the server's --device wins (a workaround here,
        # inference.py has no device flag).
        device = torch.device(worker_loop.device_name())
        if device != gen.device:
            gen.device, gen.model, gen.embedder = device, gen.model.to(device), gen.embedder.to(device)
            gen.vae = gen.vae.to(device)
        GENERATORS[key] = gen
    gen = GENERATORS[key]
    # The sampling settings are read from gen.args at each generate(); the class is fixed at construction.
    gen.args = args
    if token is not None:  # a name wins over an index, as in inference.py (the server checked the index)
        names = gen.ldm.class_names
        args.class_name, args.class_label = (str(token), None) if str(token) in names else (None, int(token))
    gen.label, gen.class_folder = class_choice(args, gen.ldm.class_names)
    return gen


def generate(job, protocol):
    args = flags_for(job)
    gen = generator_for(args, job.get("class"))
    cfg = gen.cfg
    # Read as in inference.py: labels / the training's mask_max_value, shorter side resized, centre crop.
    mask = load_mask(args.mask, cfg["mask_channels"], cfg["mask_max_value"], cfg["image_size"])

    def draw(batch, start):
        seeds = [job_seed(args.seed, MASK_STEM, k) for k in batch]
        return gen.generate(mask[None].expand(len(batch), -1, -1, -1), seeds)

    def name_of(index, _):
        return f"{index:04d}" + (f"_{gen.class_folder}" if gen.class_folder else "")

    made = worker_loop.produce(job, protocol, list(range(job["n"])), draw, name_of, gen.intensity, gen.model)
    if made is None:
        return
    files, samples = made
    # Dice of each image against the mask as the model saw it, from the written files (as --eval_masks).
    pairs = [
        score(open_image(args.mask), open_image(f), "bright", gen.intensity, cfg["mask_channels"])
        for f in files
    ]
    dice = [None if pair is None else float(pair[0]) for pair in pairs]
    known = [d for d in dice if d is not None]
    scores = {"dice": dice, "mean_dice": sum(known) / len(known) if known else None}
    # The grid: mask | image for every image, as inference.py's comparison rows (8-bit).
    tiles = [comparison_row(mask, [sample]) for sample in samples]
    worker_loop.finish(job, protocol, files, tiles, min(4, job["n"]), EIGHT_BIT, scores)


if __name__ == "__main__":
    worker_loop.serve(generate, (UserError,))
