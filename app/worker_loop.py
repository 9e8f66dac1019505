"""What every worker shares: a sys.path that holds one model folder only, the JSON-lines protocol loop
and the batch loop that writes images and reports progress.

A worker (worker_<kind>.py) imports this module first, while app/ is still on sys.path, then calls
isolate(folder): from there on only that folder's modules (its utils.py, models.py, core/) can be
imported, so they never meet another folder's same-named ones. Everything that needs the folder's own
code (core.images, core.training) is imported inside the functions, after isolate().

Protocol: JSON lines. stdin: {"op": "generate", "id", "ckpt", "class", "n", "guidance_scale", "sampler",
"steps", "seed", "batch_size", "out", "grid", and per kind "vae", "ldm", "mask", "conditioning_scale"} or
{"op": "cancel", "id"}. stdout: {"ready": true} once, then per job {"id", "progress": k, "total": n,
"evaluations": m} after each batch and every half second while one samples, and one of {"id", "done":
true, "files": [...], "grid": path or null, "scores": ...}, {"id", "cancelled": true} or {"id", "error":
message, "user": bool}.
"""

import json
import os
import queue
import sys
import threading
import traceback
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent


def isolate(folder):
    """Put the model folder ROOT/<folder> first on sys.path and take app/ off it; returns the folder."""
    path = APP_DIR.parent / folder
    sys.path[:] = [str(path)] + [p for p in sys.path[1:] if Path(p or ".").resolve() != APP_DIR]
    return path


def device_name():
    """The torch device the server asked for (--device), else the GPU if any, else the CPU."""
    import torch

    return os.environ.get("APP_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


class Protocol:
    """The worker's end of the pipe: messages out, cancels in (read by a thread while a job runs)."""

    def __init__(self):
        # The protocol keeps the real stdout; anything the model code prints goes to stderr instead.
        self.out = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        self.jobs, self.cancels, self.lock = queue.Queue(), set(), threading.Lock()
        threading.Thread(target=self.read, daemon=True).start()

    def read(self):
        for line in sys.stdin:
            message = json.loads(line)
            if message["op"] == "cancel":
                with self.lock:
                    self.cancels.add(message["id"])
            else:
                self.jobs.put(message)
        self.jobs.put(None)

    def send(self, message):
        with self.lock:
            self.out.write(json.dumps(message) + "\n")
            self.out.flush()

    def cancelled(self, job_id):
        with self.lock:
            return job_id in self.cancels


def serve(generate, user_errors):
    """Run generate(job, protocol) for each job until stdin closes. user_errors (the folder's UserError)
    and SystemExit (a flag value argparse refused) are the requester's fault: a 400, not a 500."""
    import torch

    torch.set_grad_enabled(False)  # sampling builds no graphs; jobs run in this thread, where it holds
    protocol = Protocol()
    protocol.send({"ready": True})
    while (job := protocol.jobs.get()) is not None:
        try:
            generate(job, protocol)
        except (*user_errors, SystemExit) as error:
            message = "invalid sampling settings" if isinstance(error, SystemExit) else str(error)
            protocol.send({"id": job["id"], "error": message, "user": True})
        except Exception as error:
            traceback.print_exc()
            protocol.send({"id": job["id"], "error": f"{type(error).__name__}: {error}", "user": False})


class Evaluations:
    """Live progress inside a batch: counts the forward calls of the denoising network (a forward hook,
    so every folder's own sampler is counted without a change to it) and, while a batch samples, sends
    the images done so far and the count every TICK seconds."""

    TICK = 0.5

    def __init__(self, job, protocol, total, network):
        self.job, self.protocol, self.total, self.count = job, protocol, total, 0
        self.hook = network.register_forward_hook(self.counted) if network is not None else None

    def counted(self, *_):
        self.count += 1

    def send(self, done):
        message = {"id": self.job["id"], "progress": done, "total": self.total, "evaluations": self.count}
        self.protocol.send(message)

    def during(self, done, work):
        """work() while a thread reports progress (done images, the growing count) until it returns."""
        stop = threading.Event()

        def tick():
            while not stop.wait(self.TICK):
                self.send(done)

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            return work()
        finally:
            stop.set()
            ticker.join()

    def close(self):
        if self.hook is not None:
            self.hook.remove()


def produce(job, protocol, items, draw, name_of, rule, network=None):
    """Draw the images of items in batches of job["batch_size"]: draw(batch, start) gives (N, C, H, W) in
    [0, 1]; image i is saved as OUT/<name_of(i, item)><suffix> at the rule's depth. network (the
    denoising nn.Module draw calls) has its evaluations counted for the live progress. Returns (files,
    samples), or None once a cancel stopped it (checked between batches; the reply is sent here)."""
    from core import images  # the worker's own folder's copy (isolate() came first)

    out, files, samples, size = Path(job["out"]), [], [], job["batch_size"]
    meter = Evaluations(job, protocol, len(items), network)
    try:
        for start in range(0, len(items), size):
            if protocol.cancelled(job["id"]):
                protocol.send({"id": job["id"], "cancelled": True})
                return None
            batch = items[start : start + size]
            batch_samples = meter.during(start, lambda: draw(batch, start)).cpu()  # noqa: B023 (called now)
            for offset, (item, sample) in enumerate(zip(batch, batch_samples, strict=True)):
                path = out / (name_of(start + offset, item) + images.suffix(rule))
                images.save(sample, path, rule)  # at the training data's depth (16-bit PNG when deeper)
                files.append(str(path))
            samples.extend(batch_samples)
            meter.send(start + len(batch))
        return files, samples
    finally:
        meter.close()


def round_robin(labels, n):
    """The label of each of n images: one class, or all classes in turn (as the sampling CLIs spread them)."""
    return [labels[i % len(labels)] for i in range(n)]


def grid_columns(labels, n):
    """A row per round of classes, or up to 8 images per row."""
    return min(len(labels) if len(labels) > 1 else 8, n)


def save_grid(tiles, columns, path, rule):
    """One PNG grid of tiles (C, H, W) in [0, 1], at the rule's depth where PNG holds it (else 8-bit)."""
    import torch

    from core import images, training

    grid = training.make_grid(torch.stack(tiles), columns)
    images.save(grid, path, rule if images.suffix(rule) == ".png" else images.EIGHT_BIT)
    return str(path)


def finish(job, protocol, files, grid_tiles, columns, rule, scores=None):
    """Write the grid (when asked) and scores.json (when there are scores), then report the job done."""
    out, grid = Path(job["out"]), None
    if job.get("grid"):
        grid = save_grid(grid_tiles, columns, out / "grid.png", rule)
    if scores is not None:
        (out / "scores.json").write_text(json.dumps(scores, indent=1))
        files = [*files, str(out / "scores.json")]
    protocol.send({"id": job["id"], "done": True, "files": files, "grid": grid, "scores": scores})
