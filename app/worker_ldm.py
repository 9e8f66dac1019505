"""The ldm/ worker: samples checkpoints of ldm/train.py through ldm/inference.py's LDMSampler (and its
resolve_classes), in a process whose sys.path holds ldm/ only. The protocol is worker_loop.py's."""

import worker_loop  # app/'s shared loop, imported while app/ is still on sys.path

worker_loop.isolate("ldm")

import torch  # noqa: E402

from core.errors import UserError  # noqa: E402
from inference import LDMSampler, build_parser, resolve_classes  # noqa: E402
from models import load_checkpoint, make_sampler  # noqa: E402

SAMPLERS = {}  # (ckpt, vae) -> (LDMSampler, the checkpoint's scheduler_config)


def flags_for(job):
    """The parsed flags of `inference.py` that this request stands for."""
    argv = ["--checkpoint", job["ckpt"], "--cfg_scale", str(job["guidance_scale"])]
    argv += ["--seed", str(job["seed"])]
    argv += ["--scheduler", job["sampler"]] if job.get("sampler") else []
    argv += ["--num_inference_steps", str(job["steps"])] if job.get("steps") else []
    argv += ["--vae_pretrained", job["vae"]] if job.get("vae") else []
    return build_parser().parse_args(argv)


def sampler_for(args):
    """The checkpoint's LDMSampler (model and VAE loaded once), set to this request's flags."""
    key = (args.checkpoint, args.vae_pretrained)
    if key not in SAMPLERS:
        ckpt = load_checkpoint(args.checkpoint)
        SAMPLERS[key] = (LDMSampler(ckpt, args, worker_loop.device_name()), dict(ckpt["scheduler_config"]))
    sampler, scheduler_config = SAMPLERS[key]
    # LDMSampler reads seed, cfg_scale and steps from its args and builds its scheduler once; a kept
    # sampler gets the request's (a fresh scheduler, as inference.py's would be).
    sampler.args, sampler.sampler = args, make_sampler(args.scheduler, scheduler_config)
    return sampler


def generate(job, protocol):
    args = flags_for(job)
    sampler = sampler_for(args)
    labels = resolve_classes(None if job.get("class") is None else [str(job["class"])], sampler.class_names)
    # Image i is index i // len(labels) of its class: the noise inference.py gives that class's file of
    # that index, so the app and the CLI make the same images from the same seed.
    wanted = [(label, i // len(labels)) for i, label in enumerate(worker_loop.round_robin(labels, job["n"]))]

    def draw(batch, start):
        images = [None] * len(batch)
        for label in dict.fromkeys(label for label, _ in batch):  # one class per call, as inference.py
            places = [p for p, (other, _) in enumerate(batch) if other == label]
            for place, image in zip(
                places, sampler.sample(label, [batch[p][1] for p in places]), strict=True
            ):
                images[place] = image
        return torch.stack(images)

    def name_of(index, item):
        return f"{index:04d}_{sampler.class_names[item[0]]}"

    made = worker_loop.produce(job, protocol, wanted, draw, name_of, sampler.intensity, sampler.model)
    if made is not None:
        files, samples = made
        columns = worker_loop.grid_columns(labels, job["n"])
        worker_loop.finish(job, protocol, files, samples, columns, sampler.intensity)


if __name__ == "__main__":
    worker_loop.serve(generate, (UserError,))
