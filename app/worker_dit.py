"""The dit/ worker: samples checkpoints of dit/train.py through dit/sample.py's own entry points
(load_model, parse_labels, sample_batch, output_rule), in a process whose sys.path holds dit/ only.
The protocol is worker_loop.py's."""

import worker_loop  # app/'s shared loop, imported while app/ is still on sys.path

worker_loop.isolate("dit")

from core import training  # noqa: E402
from core.errors import UserError  # noqa: E402
from diffusion import create_diffusion  # noqa: E402
from diffusion.objectives import choose_sampler  # noqa: E402
from sample import build_parser, class_folder, load_model, output_rule, parse_labels, sample_batch  # noqa: E402

MODELS = {}  # (ckpt, vae) -> (model, config, vae)
ACCELERATOR = []  # the one Accelerator of this process (device and autocast of sample_batch)


def flags_for(job):
    """The parsed flags of `sample.py` that this request stands for."""
    argv = ["--checkpoint", job["ckpt"], "--cfg_scale", str(job["guidance_scale"])]
    argv += ["--sampler", job["sampler"]] if job.get("sampler") else []
    argv += ["--num_inference_steps", str(job["steps"])] if job.get("steps") else []
    argv += ["--vae", job["vae"]] if job.get("vae") else []
    return build_parser().parse_args(argv)


def accelerator():
    if not ACCELERATOR:
        cpu = worker_loop.device_name() == "cpu"
        ACCELERATOR.append(training.make_accelerator("no", device="cpu" if cpu else None))
    return ACCELERATOR[0]


def generate(job, protocol):
    args, device = flags_for(job), accelerator().device
    key = (args.checkpoint, args.vae)
    if key not in MODELS:
        model, config, vae, _ = load_model(args, device)
        MODELS[key] = (model, config, vae)
    model, config, vae = MODELS[key]
    # load_model fixed the first request's sampler in config["sampling"]; each request chooses its own
    # (the config holds the checkpoint's objective keys, which is all choose_sampler reads of it).
    config = {**config, "sampling": choose_sampler(args, config, args.checkpoint)}
    plan = config["sampling"]
    diffusion = create_diffusion(plan["steps"]) if plan["objective"] is None else None
    tokens = None if job.get("class") is None else [str(job["class"])]
    labels = parse_labels(tokens, config)
    rule = output_rule(config)

    def draw(batch, start):
        seed = job["seed"] * 1_000_003 + start  # noise from the seed and the first image's index only
        return sample_batch(model, vae, diffusion, config, args, batch, seed, accelerator())[0]

    def name_of(index, label):
        return f"{index:04d}_{class_folder(config, label)}"

    wanted = worker_loop.round_robin(labels, job["n"])
    made = worker_loop.produce(job, protocol, wanted, draw, name_of, rule, model)
    if made is not None:
        files, samples = made
        worker_loop.finish(job, protocol, files, samples, worker_loop.grid_columns(labels, job["n"]), rule)


if __name__ == "__main__":
    worker_loop.serve(generate, (UserError,))
