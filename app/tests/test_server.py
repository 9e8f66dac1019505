"""The server as a user meets it: a real process on a loopback port, driven over HTTP."""

import io
import subprocess
import sys
import threading
import time
import zipfile

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import SERVE

FAST = {"sampler": "ddim", "steps": 3}  # a few DDIM steps: the tiny model samples in well under a second


def post(server, path, body, **params):
    return httpx.post(server + path, json=body, params=params, timeout=120)


def wait_for(server, job_id, statuses, timeout=120):
    deadline = time.monotonic() + timeout
    while (job := httpx.get(f"{server}/jobs/{job_id}").json())["status"] not in statuses:
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


def test_health_and_models(server):
    assert httpx.get(server + "/health").json()["status"] == "ok"
    models = {m["name"]: m for m in httpx.get(server + "/models").json()["models"]}
    deep = models["runs/ddpm16.pt"]
    assert deep["supported"] and deep["kind"] == "ddpm" and deep["objective"] == "ddpm"
    assert deep["class_names"] == ["class_0", "class_1", "class_2"]
    assert deep["samplers"] == ["ddpm", "ddim"]
    assert (deep["image_size"], deep["channels"], deep["intensity"]["bit_depth"]) == (16, 1, 16)
    assert models["runs/flow.pt"]["objective"] == "flow"
    assert models["runs/flow.pt"]["samplers"] == ["euler", "heun", "rk45"]
    assert models["runs/vp.pt"]["samplers"][0] == "pc" and models["runs/vp.pt"]["intensity"]["bit_depth"] == 8
    assert not models["junk.pt"]["supported"] and "torch.load" in models["junk.pt"]["reason"]
    assert "someone-else-v3" in models["foreign.pt"]["reason"]
    assert "outside" in models["outside.pt"]["reason"]
    assert models["inside.pt"]["supported"] and models["inside.pt"]["objective"] == "flow"
    assert not models["dit.pt"]["supported"] and "without weights" in models["dit.pt"]["reason"]
    assert "train_classifier.py" in models["ldm_classifier.pt"]["reason"]
    assert "/generate" in httpx.get(server + "/openapi.json").json()["paths"]


def test_generate_zip_of_16_bit_pngs(server):
    body = {"model": "runs/ddpm16.pt", "n": 3, "seed": 5, **FAST}
    reply = post(server, "/generate", body)
    assert reply.status_code == 200, reply.text
    archive = zipfile.ZipFile(io.BytesIO(reply.content))
    names = sorted(archive.namelist())
    assert names == ["0000_class_0.png", "0001_class_1.png", "0002_class_2.png"]
    for name in names:
        image = Image.open(io.BytesIO(archive.read(name)))
        assert image.mode.startswith("I") and image.size == (16, 16)  # 16-bit, as the training data
    # The seed decides the images: the same request twice gives the same bytes, another seed does not.
    assert post(server, "/generate", body).content == reply.content
    assert post(server, "/generate", {**body, "seed": 6}).content != reply.content


def test_generate_grid(server):
    body = {"model": "runs/ddpm16.pt", "n": 4, "class": "class_1", **FAST}
    reply = post(server, "/generate", body, format="grid")
    assert reply.status_code == 200, reply.text
    grid = Image.open(io.BytesIO(reply.content))
    assert grid.format == "PNG" and grid.mode.startswith("I")
    assert grid.size[0] > 4 * 16 and grid.size[1] > 16  # one row of four 16 px images and their borders


@pytest.mark.parametrize("model, sampler", [("runs/flow.pt", "euler"), ("runs/vp.pt", "euler")])
def test_continuous_objectives(server, model, sampler):
    reply = post(server, "/generate", {"model": model, "n": 2, "class": 0, "sampler": sampler, "steps": 3})
    assert reply.status_code == 200, reply.text
    archive = zipfile.ZipFile(io.BytesIO(reply.content))
    images = [np.asarray(Image.open(io.BytesIO(archive.read(n)))) for n in sorted(archive.namelist())]
    assert len(images) == 2 and all(image.dtype == np.uint8 and image.shape == (16, 16) for image in images)


@pytest.mark.parametrize(
    "change, status, message",
    [
        ({"model": "../train/models/ddpm16/ema_ckpt.pt"}, 400, "'..'"),
        ({"model": "/etc/passwd"}, 400, "absolute path"),
        ({"model": "outside.pt"}, 400, "points outside"),
        ({"model": "missing.pt"}, 400, "not a checkpoint under --checkpoints"),
        ({"model": "junk.pt"}, 400, "not supported"),
        ({"n": 9}, 400, "--max-images"),
        ({"n": 0}, 400, "n must be between 1 and 8"),
        ({"steps": 1001}, 400, "steps must be between 1 and 1000"),
        ({"sampler": "pc"}, 400, "does not apply"),
        ({"class": "class_7"}, 400, "not one of the model's classes"),
        ({"class": 3}, 400, "not one of the model's classes"),
        ({"guidance_scale": -1}, 400, "guidance_scale"),
        ({"n": "many"}, 422, "n:"),
    ],
)
def test_bad_requests_are_refused(server, change, status, message):
    reply = post(server, "/generate", {"model": "runs/ddpm16.pt", "n": 1, **FAST, **change})
    assert reply.status_code == status, reply.text
    assert message in reply.json()["error"]
    assert httpx.get(server + "/health").json()["status"] == "ok"  # and the server keeps serving


def test_flow_model_refuses_an_sde_sampler(server):
    reply = post(server, "/generate", {"model": "runs/flow.pt", "n": 1, "sampler": "pc"})
    assert reply.status_code == 400 and "euler" in reply.json()["error"]


def test_max_image_size(checkpoints):
    # A second server with a limit under the models' 16 px: checked in-process on the same request path.
    sys.path.insert(0, str(SERVE.parent))
    import serve

    args = serve.build_parser().parse_args(["--checkpoints", str(checkpoints), "--max-image-size", "8"])
    args.checkpoints = checkpoints.resolve()
    app = serve.create_app(args)
    try:
        from fastapi.testclient import TestClient

        reply = TestClient(app).post("/generate", json={"model": "runs/ddpm16.pt", "n": 1, **FAST})
        assert reply.status_code == 400 and "--max-image-size 8" in reply.json()["error"]
    finally:
        app.state.jobs.close()


def test_missing_checkpoints_folder_is_one_error_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SERVE), "--checkpoints", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stderr.startswith("error: --checkpoints")
    assert "Traceback" not in result.stderr


def test_concurrent_requests_finish_in_order(server):
    body = {"model": "runs/ddpm16.pt", "n": 4, "sampler": "ddim", "steps": 20}
    first = post(server, "/jobs", body).json()
    second = post(server, "/jobs", {**body, "seed": 1}).json()
    first, second = (wait_for(server, job["id"], {"done", "failed"}) for job in (first, second))
    assert first["status"] == second["status"] == "done"
    assert first["finished"] <= second["started"]  # one at a time, in the order they came
    assert httpx.get(f"{server}/jobs/{first['id']}/result").status_code == 200
    # Two blocking requests from two clients at once both get their images.
    replies = [None, None]

    def request(i):
        replies[i] = post(server, "/generate", {**body, "seed": i}, format="grid")

    threads = [threading.Thread(target=request, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [reply.status_code for reply in replies] == [200, 200]
    assert replies[0].content != replies[1].content


def test_cancel_queued_and_running_jobs(server):
    # 1000 DDPM steps per batch of 2: several seconds per batch, so the job is caught while running.
    slow = {"model": "runs/ddpm16.pt", "n": 8, "sampler": "ddpm", "steps": 1000}
    running = post(server, "/jobs", slow).json()
    queued = post(server, "/jobs", {**slow, "n": 1}).json()
    assert httpx.delete(f"{server}/jobs/{queued['id']}").json()["status"] == "cancelled"
    wait_for(server, running["id"], {"running"})
    httpx.delete(f"{server}/jobs/{running['id']}")
    stopped = wait_for(server, running["id"], {"cancelled", "done", "failed"})
    assert stopped["status"] == "cancelled" and stopped["progress"] < 8
    assert httpx.get(f"{server}/jobs/{running['id']}/result").status_code == 409
    assert httpx.get(f"{server}/jobs/{queued['id']}").json()["started"] is None  # it never ran
    # The worker takes the next job as usual.
    assert post(server, "/generate", {"model": "runs/ddpm16.pt", "n": 1, **FAST}).status_code == 200
    assert httpx.get(f"{server}/jobs/job-0").status_code == 404


def test_progress_counts_images_and_network_evaluations(server):
    # n 3 in batches of 2 with DDIM-3: two batches of 3 steps, one forward pass each (guidance shares
    # its pass), so 6 evaluations; the images count reaches n.
    job = post(server, "/jobs", {"model": "runs/ddpm16.pt", "n": 3, **FAST}).json()
    assert (job["progress"], job["evaluations"], job["total"]) == (0, 0, 3)
    done = wait_for(server, job["id"], {"done", "failed"})
    assert (done["status"], done["progress"], done["evaluations"]) == ("done", 3, 6), done
