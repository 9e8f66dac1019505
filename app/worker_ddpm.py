"""The ddpm/ worker: one process that imports only ddpm/'s modules and samples its checkpoints for the server.

The server starts it as its own Python process, so ddpm/'s utils.py, core/ and the rest can never meet
another folder's same-named modules. It reaches the model through ddpm's public sampling entry points
(ddpm_conditional_ddp.load_sampling_model, sampling_plan, sampler_for, which call Diffusion.sample or
sample_objective), loads each checkpoint once and keeps it.

Protocol: JSON lines. stdin: {"op": "generate", "id", "ckpt", "class", "n", "guidance_scale", "sampler",
"steps", "seed", "batch_size", "out", "grid"} or {"op": "cancel", "id"}. stdout: {"id", "progress": k,
"total": n} after each batch, then one of {"id", "done": true, "files": [...], "grid": path or null},
{"id", "cancelled": true} or {"id", "error": message, "user": bool}.
"""

import json
import os
import queue
import sys
import threading
import traceback
from pathlib import Path

DDPM_DIR = Path(__file__).resolve().parents[1] / "ddpm"
# Only ddpm/ on the path: the app's own folder is dropped so no name of it shadows one of ddpm's.
sys.path[:] = [str(DDPM_DIR)] + [
    p for p in sys.path[1:] if Path(p or ".").resolve() != DDPM_DIR.parent / "app"
]

import torch  # noqa: E402

from core import cli, images  # noqa: E402
from ddpm_conditional_ddp import (  # noqa: E402
    build_parser,
    load_sampling_model,
    parse_class_labels,
    sampler_for,
    sampling_plan,
)
from flags import parse_flags  # noqa: E402
from utils import UserError, pick_device, save_grid  # noqa: E402

MODELS = {}  # ckpt path -> (model on the device, class_names, config, intensity)
CANCELLED = set()
LOCK = threading.Lock()


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


def generate(job, send):
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
    wanted = [labels[i % len(labels)] for i in range(job["n"])]
    out, files, samples = Path(job["out"]), [], []
    for start in range(0, job["n"], job["batch_size"]):
        with LOCK:  # checked between batches: a running job stops at the next one
            cancelled = job["id"] in CANCELLED
        if cancelled:
            return send({"id": job["id"], "cancelled": True})
        batch = wanted[start : start + job["batch_size"]]
        # Noise depends on the seed and the image index only, as in the sampling CLI's generate().
        generator = torch.Generator().manual_seed(job["seed"] * 1_000_003 + start)
        label_tensor = None if batch[0] is None else torch.tensor(batch, device=device)
        batch_samples, _ = draw(len(batch), label_tensor, generator)
        for offset, (label, sample) in enumerate(zip(batch, batch_samples, strict=True)):
            name = f"{start + offset:04d}" + ("" if label is None else f"_{class_names[label]}")
            path = out / (name + images.suffix(intensity))
            images.save(sample, path, intensity)  # at the training data's depth (16-bit PNG when deeper)
            files.append(str(path))
        samples.append(batch_samples)
        send({"id": job["id"], "progress": min(start + len(batch), job["n"]), "total": job["n"]})
    grid = None
    if job.get("grid"):
        grid = str(out / "grid.png")
        columns = len(labels) if len(labels) > 1 else min(8, job["n"])
        save_grid(torch.cat(samples), min(columns, job["n"]), grid, intensity)
    send({"id": job["id"], "done": True, "files": files, "grid": grid})


def main():
    # The protocol keeps the real stdout; anything the model code prints goes to stderr instead.
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    jobs = queue.Queue()

    def send(message):
        with LOCK:
            protocol.write(json.dumps(message) + "\n")
            protocol.flush()

    def read():  # a reader thread, so a cancel arrives while a job runs
        for line in sys.stdin:
            message = json.loads(line)
            if message["op"] == "cancel":
                with LOCK:
                    CANCELLED.add(message["id"])
            else:
                jobs.put(message)
        jobs.put(None)

    threading.Thread(target=read, daemon=True).start()
    send({"ready": True})
    while (job := jobs.get()) is not None:
        try:
            generate(job, send)
        except (UserError, SystemExit) as error:  # SystemExit: a flag value argparse refused
            message = str(error) if isinstance(error, UserError) else "invalid sampling settings"
            send({"id": job["id"], "error": message, "user": True})
        except Exception as error:
            traceback.print_exc()
            send({"id": job["id"], "error": f"{type(error).__name__}: {error}", "user": False})


if __name__ == "__main__":
    main()
