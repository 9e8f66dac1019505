"""Generation web app and HTTP API for the trained models: `python app/serve.py --checkpoints DIR`.

One FastAPI server gives the HTML page (/), the JSON API and its OpenAPI schema (/docs, /openapi.json).
Jobs run one at a time, in the order they came, in one worker process per model kind (worker_ddpm.py,
worker_dit.py, worker_ldm.py, worker_controlnet.py), which imports only its own folder's modules and keeps
the models it loaded.
"""

import argparse
import base64
import binascii
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Literal

import uvicorn
from catalog import Catalog, Refused, safe_path
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, Field

APP_DIR = Path(__file__).resolve().parent
KINDS = ("ddpm", "dit", "ldm", "controlnet")
WORKERS = {kind: APP_DIR / f"worker_{kind}.py" for kind in KINDS}  # kind -> the worker script that samples it
KEEP_FINISHED = 50  # finished jobs (and their results) kept for GET /jobs/{id}; older ones are dropped
MAX_MASK_PIXELS = 4096 * 4096  # an uploaded mask larger than this is refused before it is decoded
MASK_FORMATS = {"PNG": ".png", "TIFF": ".tif"}  # what an upload may be, and the file suffix it is kept with


class GenerateRequest(BaseModel):
    model: str = Field(description="checkpoint name as /models lists it (relative to --checkpoints)")
    class_: str | int | None = Field(
        None, alias="class", description="class name or index (unset: all; a ControlNet: none)"
    )
    n: int = Field(4, description="number of images")
    guidance_scale: float = Field(3.0, description="classifier-free guidance scale (0: unconditional)")
    sampler: str | None = Field(None, description="one of the model's samplers (unset: its default)")
    steps: int | None = Field(None, description="sampling steps (unset: the sampler's default)")
    seed: int = Field(0, description="noise seed: the same request gives the same images")
    mask: str | None = Field(
        None,
        description="ControlNet only: base64 of a PNG or TIFF mask (binary or label map; data: prefix ok)",
    )
    conditioning_scale: float = Field(1.0, description="ControlNet only: the mask's weight (0: off)")


class BadRequest(Exception):
    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


class Job:
    def __init__(self, number, request, entry, fmt, mask):
        self.id, self.request, self.entry, self.format = f"job-{number}", request, entry, fmt
        self.mask, self.scores = mask, None  # mask: (bytes, suffix) of the decoded upload, or None
        self.status, self.total, self.error, self.user_error = "queued", request.n, None, False
        # progress: images done; evaluations: forward calls of the denoising network so far (live within
        # a batch, from the worker's hook)
        self.progress, self.evaluations = 0, 0
        self.result, self.media_type = None, None
        self.created, self.started, self.finished = time.time(), None, None
        self.finished_event = threading.Event()

    def view(self):
        return {
            "id": self.id,
            "status": self.status,
            "progress": self.progress,
            "evaluations": self.evaluations,
            "total": self.total,
            "error": self.error,
            "format": self.format,
            "model": self.request.model,
            "scores": self.scores,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
        }


class Worker:
    """One kind's worker process, started on its first job and restarted if it dies."""

    def __init__(self, script, device):
        self.script, self.device, self.process, self.lock = script, device, None, threading.Lock()

    def start(self):
        if self.process is None or self.process.poll() is not None:
            env = {**os.environ}
            if self.device:
                env["APP_DEVICE"] = self.device
            command = [sys.executable, str(self.script)]
            self.process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
            )
            if self.receive() != {"ready": True}:
                raise RuntimeError(f"worker {self.script.name} did not start")

    def send(self, message):
        with self.lock:
            if self.process is not None and self.process.poll() is None:
                self.process.stdin.write(json.dumps(message) + "\n")
                self.process.stdin.flush()

    def receive(self):
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the worker process ended (see the server's stderr)")
        return json.loads(line)

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


class Jobs:
    """The FIFO of generation jobs and the one thread that runs them, one at a time."""

    def __init__(self, batch_size, device):
        self.batch_size, self.jobs, self.numbers = batch_size, OrderedDict(), itertools.count(1)
        self.workers = {kind: Worker(script, device) for kind, script in WORKERS.items()}
        self.pending, self.lock, self.wake = [], threading.Lock(), threading.Condition()
        self.running, self.scratch = None, tempfile.TemporaryDirectory(prefix="app-jobs-")
        threading.Thread(target=self.loop, daemon=True).start()

    def submit(self, request, entry, fmt, mask=None):
        with self.wake:
            job = Job(next(self.numbers), request, entry, fmt, mask)
            self.jobs[job.id] = job
            self.pending.append(job)
            self.forget_old()
            self.wake.notify()
        return job

    def forget_old(self):
        finished = [j for j in self.jobs.values() if j.finished_event.is_set()]
        for job in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self.jobs[job.id]

    def cancel(self, job):
        with self.wake:
            if job.status == "queued":
                self.pending.remove(job)
                self.finish(job, "cancelled")
            elif job.status == "running":
                job.status = "cancelling"
                self.workers[job.entry["kind"]].send({"op": "cancel", "id": job.id})

    def finish(self, job, status, error=None, user_error=False):
        job.status, job.error, job.user_error, job.finished = status, error, user_error, time.time()
        job.finished_event.set()

    def loop(self):
        while True:
            with self.wake:
                while not self.pending:
                    self.wake.wait()
                job = self.pending.pop(0)
                job.status, job.started = "running", time.time()
            out = Path(self.scratch.name) / job.id
            try:
                self.run(job, out)
            except Exception as error:  # a dead worker fails this job; the next job restarts it
                self.finish(job, "failed", str(error))
            finally:
                shutil.rmtree(out, ignore_errors=True)  # the images are in job.result now

    def run(self, job, out):
        worker = self.workers[job.entry["kind"]]
        worker.start()
        out.mkdir()
        r, entry = job.request, job.entry
        message = {
            "op": "generate",
            "id": job.id,
            "model": r.model,
            "ckpt": job.entry["path"],
            "class": r.class_,
        }
        message.update(n=r.n, guidance_scale=r.guidance_scale, sampler=r.sampler, steps=r.steps, seed=r.seed)
        message.update(batch_size=self.batch_size, out=str(out), grid=job.format == "grid")
        message.update(
            vae=entry.get("vae"), ldm=entry.get("ldm_path"), conditioning_scale=r.conditioning_scale
        )
        if job.mask is not None:
            data, suffix = job.mask
            (out / f"mask{suffix}").write_bytes(data)
            message["mask"], job.mask = str(out / f"mask{suffix}"), None  # on disk now, for the worker
        worker.send(message)
        while True:
            reply = worker.receive()
            if "progress" in reply:
                job.progress, job.evaluations = reply["progress"], reply.get("evaluations", job.evaluations)
            elif "cancelled" in reply:
                return self.finish(job, "cancelled")
            elif "error" in reply:
                return self.finish(job, "failed", reply["error"], reply.get("user", False))
            elif reply.get("done"):
                if job.format == "grid":
                    job.result, job.media_type = Path(reply["grid"]).read_bytes(), "image/png"
                else:
                    job.result, job.media_type = zip_of(reply["files"]), "application/zip"
                job.scores = reply.get("scores")
                return self.finish(job, "done")

    def close(self):
        for worker in self.workers.values():
            worker.stop()
        self.scratch.cleanup()


def zip_of(files):
    """The files as one zip, byte for byte the same for the same images: every entry carries the zip
    format's earliest date instead of the file's time (which would differ between two runs)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # PNGs are compressed already
        for name in files:
            archive.writestr(zipfile.ZipInfo(Path(name).name, (1980, 1, 1, 0, 0, 0)), Path(name).read_bytes())
    return buffer.getvalue()


def check(request, entry, limits):
    """The 4xx of a request that cannot run, with one clear message; None when it can."""
    if not entry["supported"]:
        raise BadRequest(f"model {request.model!r} is not supported: {entry['reason']}")
    if not 1 <= request.n <= limits.max_images:
        raise BadRequest(f"n must be between 1 and {limits.max_images} (--max-images), got {request.n}")
    if request.steps is not None:
        cap = min(limits.max_steps, entry.get("max_steps") or limits.max_steps)
        if not 1 <= request.steps <= cap:
            raise BadRequest(f"steps must be between 1 and {cap}, got {request.steps}")
    if entry["image_size"] and entry["image_size"] > limits.max_image_size:
        raise BadRequest(
            f"model image size {entry['image_size']} is over --max-image-size {limits.max_image_size}"
        )
    if request.sampler is not None and request.sampler not in entry["samplers"]:
        raise BadRequest(
            f"sampler {request.sampler!r} does not apply to this model: one of {entry['samplers']}"
        )
    if request.guidance_scale < 0:
        raise BadRequest(f"guidance_scale must be >= 0, got {request.guidance_scale}")
    if request.class_ is not None:
        if not entry["conditional"]:
            raise BadRequest(f"model {request.model!r} is unconditional: drop class")
        names = entry["class_names"]
        token = str(request.class_)
        index = (
            int(token) if token.lstrip("-").isdigit() else (names.index(token) if token in names else None)
        )
        if index is None or not 0 <= index < len(names):
            raise BadRequest(f"class {request.class_!r} is not one of the model's classes {names}")
    if request.seed < 0 and entry["kind"] in ("ldm", "controlnet"):  # their inference.py --seed rule
        raise BadRequest(f"seed must be >= 0 for {entry['kind']} models, got {request.seed}")
    if entry["needs_mask"]:
        check_mask_request(request)
    elif request.mask is not None:
        raise BadRequest(
            f"mask applies to ControlNet models only; {request.model!r} is a {entry['kind']} model"
        )
    if request.steps is None:
        check_default_steps(request, entry, limits)


def check_default_steps(request, entry, limits):
    """A request without steps takes its sampler's default, which must fit --max-steps too."""
    default = entry["default_steps"].get(request.sampler or entry["samplers"][0])
    if default and default > limits.max_steps:
        raise BadRequest(
            f"this sampler's default is {default} steps, over --max-steps {limits.max_steps}: set steps"
        )


def check_mask_request(request):
    if request.mask is None:
        raise BadRequest(f"model {request.model!r} is a ControlNet: it needs a mask (a base64 PNG or TIFF)")
    if not request.conditioning_scale >= 0:
        raise BadRequest(f"conditioning_scale must be >= 0, got {request.conditioning_scale}")


def read_mask(text, max_mb):
    """(bytes, suffix) of an uploaded mask: base64 (an optional data:...;base64, prefix) of a PNG or TIFF
    no larger than max_mb and MAX_MASK_PIXELS, which PIL decodes completely; else a BadRequest."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    limit = max_mb * 1024 * 1024
    if len(text) * 3 // 4 > limit:  # checked before decoding: base64 is 4 characters per 3 bytes
        raise BadRequest(f"mask: the upload is over --max-upload-mb {max_mb}")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("mask: not valid base64") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in MASK_FORMATS:
                raise BadRequest(f"mask: a {image.format} image, give a PNG or TIFF")
            if image.width * image.height > MAX_MASK_PIXELS:
                raise BadRequest(
                    f"mask: {image.width}x{image.height} pixels is over the limit of {MAX_MASK_PIXELS}"
                )
            image.load()  # decodes every pixel: a truncated or corrupt file fails here, not in the worker
            return data, MASK_FORMATS[image.format]
    except BadRequest:
        raise
    except Exception as error:  # PIL's errors for what is not an image (or a broken one)
        raise BadRequest(f"mask: not a readable PNG or TIFF image ({type(error).__name__})") from None


def create_app(args):
    catalog = Catalog(args.checkpoints, args.vae)
    jobs = Jobs(args.batch_size, args.device)
    app = FastAPI(title="Diffusion models generation API", version="0.1")
    app.state.jobs = jobs

    @app.exception_handler(BadRequest)
    def bad_request(_, error):
        return JSONResponse({"error": str(error)}, status_code=error.status)

    # A body that cannot hold an allowed upload is refused before it is read: base64 takes 4/3 of the
    # file's bytes, plus room for the other fields.
    body_limit = args.max_upload_mb * 1024 * 1024 * 4 // 3 + 64 * 1024

    @app.middleware("http")
    async def limit_body(request, call_next):
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > body_limit:
            return JSONResponse(
                {"error": f"mask: the upload is over --max-upload-mb {args.max_upload_mb}"}, 400
            )
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    def invalid(_, error):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return JSONResponse({"error": f"{where}: {first.get('msg')}" if where else first.get("msg")}, 422)

    def lookup(name):
        try:
            path = safe_path(args.checkpoints, name)
        except Refused as error:
            raise BadRequest(str(error)) from None
        entry = catalog.entry(Path(path).relative_to(args.checkpoints).as_posix())
        if entry.get("ldm"):  # a ControlNet's LDM, found under --checkpoints by the catalog
            entry["ldm_path"] = str(safe_path(args.checkpoints, entry["ldm"]))
        return {**entry, "path": str(path)}

    def submit(request, fmt):
        entry = lookup(request.model)
        check(request, entry, args)
        mask = read_mask(request.mask, args.max_upload_mb) if request.mask is not None else None
        # The base64 text is not kept with the job (finished jobs stay in memory); the file's bytes are.
        return jobs.submit(request.model_copy(update={"mask": None}), entry, fmt, mask)

    def result_response(job):
        if job.status == "done":
            suffix = "png" if job.format == "grid" else "zip"
            headers = {"Content-Disposition": f'attachment; filename="{job.id}.{suffix}"'}
            headers["X-Scores"] = json.dumps(job.scores)  # ControlNet's Dice per image; null for the others
            return Response(job.result, media_type=job.media_type, headers=headers)
        if job.status == "failed":
            raise BadRequest(job.error, 400 if job.user_error else 500)
        raise BadRequest(f"{job.id} is {job.status}, it has no result", 409)

    def get_job(job_id):
        if job_id not in jobs.jobs:
            raise BadRequest(f"no job {job_id!r}", 404)
        return jobs.jobs[job_id]

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(APP_DIR / "static" / "index.html")

    @app.get("/health")
    def health():
        return {"status": "ok", "queued": len(jobs.pending), "models_dir": str(args.checkpoints)}

    @app.get("/models")
    def models():
        limits = {
            "max_images": args.max_images,
            "max_steps": args.max_steps,
            "max_image_size": args.max_image_size,
            "max_upload_mb": args.max_upload_mb,
        }
        return {"models": catalog.models(), "limits": limits}

    @app.post("/generate", responses={200: {"content": {"application/zip": {}, "image/png": {}}}})
    def generate(request: GenerateRequest, format: Literal["zip", "grid"] = "zip"):
        """Generate and wait: a zip of the images, or one PNG grid with ?format=grid."""
        job = submit(request, format)
        job.finished_event.wait()
        return result_response(job)

    @app.post("/jobs", status_code=202)
    def create_job(request: GenerateRequest, format: Literal["zip", "grid"] = "zip"):
        """Queue a generation; poll GET /jobs/{id}, fetch GET /jobs/{id}/result."""
        return submit(request, format).view()

    @app.get("/jobs/{job_id}")
    def job_status(job_id: str):
        return get_job(job_id).view()

    @app.get("/jobs/{job_id}/result")
    def job_result(job_id: str):
        return result_response(get_job(job_id))

    @app.delete("/jobs/{job_id}")
    def cancel_job(job_id: str):
        job = get_job(job_id)
        jobs.cancel(job)
        return job.view()

    @app.exception_handler(Exception)
    def internal(_: Request, error: Exception):
        return JSONResponse({"error": f"internal error: {type(error).__name__}: {error}"}, status_code=500)

    return app


def positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", required=True, help="folder of checkpoints to serve (only these)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--max-images", type=positive, default=16, help="most images one request may ask for")
    parser.add_argument(
        "--max-steps", type=positive, default=1000, help="most sampling steps a request may ask for"
    )
    parser.add_argument(
        "--max-image-size", type=positive, default=512, help="largest model image size served"
    )
    parser.add_argument(
        "--batch-size", type=positive, default=8, help="images per batch (cancel acts between)"
    )
    parser.add_argument("--device", help="torch device of the workers (unset: the GPU if any, else the CPU)")
    parser.add_argument(
        "--vae",
        help="local diffusers AutoencoderKL folder, for models whose recorded VAE is not available here",
    )
    parser.add_argument(
        "--max-upload-mb", type=positive, default=10, help="largest mask upload (ControlNet) in MB"
    )
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not Path(args.checkpoints).is_dir():
        parser.exit(2, f"error: --checkpoints {args.checkpoints} is not a folder\n")
    args.checkpoints = Path(args.checkpoints).resolve()
    if args.vae is not None:
        if not (Path(args.vae) / "config.json").is_file():
            parser.exit(
                2, f"error: --vae {args.vae} is not a diffusers AutoencoderKL folder (no config.json)\n"
            )
        args.vae = str(Path(args.vae).resolve())
    app = create_app(args)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        app.state.jobs.close()


if __name__ == "__main__":
    main()
