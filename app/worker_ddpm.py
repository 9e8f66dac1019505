"""The ddpm/ worker: one process that imports only ddpm/'s modules and samples its checkpoints for the server.

The server starts it as its own Python process, so ddpm/'s utils.py, core/ and the rest can never meet
another folder's same-named modules. It reaches the model through ddpm's public sampling entry points
(ddpm_conditional_ddp.load_sampling_model, sampling_plan, sampler_for, which call Diffusion.sample or
sample_objective), loads each checkpoint once and keeps it. The protocol is worker_loop.py's.
"""

import os

import worker_loop  # app/'s shared loop, imported while app/ is still on sys.path

worker_loop.isolate("ddpm")

import torch  # noqa: E402

from core import cli  # noqa: E402
from ddpm_conditional_ddp import (  # noqa: E402
    build_parser,
    load_sampling_model,
    parse_class_labels,
    sampler_for,
    sampling_plan,
)
from flags import parse_flags  # noqa: E402
from utils import UserError, pick_device  # noqa: E402

MODELS = {}  # ckpt path -> (model on the device, class_names, config, intensity)


def flags_for(job):
    """The argv of `ddpm_conditional_ddp.py --mode sample` that this request stands for."""
    argv = ["--mode", "sample", "--ckpt", job["ckpt"], "--cfg-scale", str(job["guidance_scale"])]
    argv += ["--sampler", job["sampler"]] if job.get("sampler") else []
    argv += ["--steps", str(job["steps"])] if job.get("steps") else []
    parser = build_parser()
    return parse_flags(parser, argv), cli.explicit_flags(parser, argv)


def loaded(args, explicit, device):
    """The checkpoint's model, loaded on the first request and kept."""
    if args.ckpt not in MODELS:
        model, class_names, config, intensity, _, _ = load_sampling_model(args, explicit)
        MODELS[args.ckpt] = (model.to(device).eval(), class_names, config, intensity)
    return MODELS[args.ckpt]


def generate(job, protocol):
    device = pick_device(os.environ.get("APP_DEVICE"))
    args, explicit = flags_for(job)
    model, class_names, config, intensity = loaded(args, explicit, device)
    plan = sampling_plan(args, config)  # the request's sampler and steps, checked against the objective
    draw = sampler_for(model, config, plan, args, device)
    conditional = model.num_classes is not None
    if not conditional and job.get("class") is not None:
        raise UserError(f"{job['model']} is an unconditional model: drop class")
    # One class, or all classes round-robin as the sampling CLI does without --class-labels.
    tokens = None if job.get("class") is None else [str(job["class"])]
    labels = parse_class_labels(tokens, class_names) if conditional else [None]

    def draw_batch(batch, start):
        # Noise depends on the seed and the image index only, as in the sampling CLI's generate().
        generator = torch.Generator().manual_seed(job["seed"] * 1_000_003 + start)
        label_tensor = None if batch[0] is None else torch.tensor(batch, device=device)
        return draw(len(batch), label_tensor, generator)[0]

    def name_of(index, label):
        return f"{index:04d}" + ("" if label is None else f"_{class_names[label]}")

    wanted = worker_loop.round_robin(labels, job["n"])
    made = worker_loop.produce(job, protocol, wanted, draw_batch, name_of, intensity, model)
    if made is not None:
        files, samples = made
        columns = worker_loop.grid_columns(labels, job["n"])
        worker_loop.finish(job, protocol, files, samples, columns, intensity)


if __name__ == "__main__":
    worker_loop.serve(generate, (UserError,))
