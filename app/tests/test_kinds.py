"""DiT, LDM and ControlNet checkpoints served by a real server process, driven over HTTP; the ControlNet
with uploaded masks and Dice scores."""

import base64
import io
import json
import subprocess
import sys
import time
import zipfile

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import SERVE

FAST = {"steps": 2}  # two sampler steps: the tiny models answer in about a second
CONTROLNET = "controlnet/checkpoint_best.pt"


def post(server, body, **params):
    return httpx.post(server + "/generate", json=body, params=params, timeout=120)


def upload(array, fmt="PNG", prefix=""):
    """An image as the page sends it: base64 of the file's bytes (with a data: URL prefix when given)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return prefix + base64.b64encode(buffer.getvalue()).decode()


def square_mask(value=255, size=16):
    mask = np.zeros((size, size), np.uint8)
    mask[4:12, 3:10] = value
    return mask


def label_map(size=32):
    """A 0/1/2 label map twice the model's size (resized nearest-neighbour, as inference.py does)."""
    mask = np.zeros((size, size), np.uint8)
    mask[4:14, 4:14], mask[18:28, 16:30] = 1, 2
    return mask


def pictures(reply):
    archive = zipfile.ZipFile(io.BytesIO(reply.content))
    names = sorted(n for n in archive.namelist() if n.endswith(".png"))
    return archive, names, [Image.open(io.BytesIO(archive.read(n))) for n in names]


def wait_for(server, job_id, timeout=120):
    deadline = time.monotonic() + timeout
    while (job := httpx.get(f"{server}/jobs/{job_id}").json())["status"] not in (
        "done",
        "failed",
        "cancelled",
    ):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    return job


def test_models_recognise_each_kind_and_pair_the_controlnets(kinds_server, vae_folder):
    models = {m["name"]: m for m in httpx.get(kinds_server + "/models").json()["models"]}
    dit = models["dit/0000002.pt"]
    assert dit["supported"] and dit["kind"] == "dit" and dit["samplers"] == ["ddpm", "ddim"]
    assert dit["class_names"] == ["class_0", "class_1", "class_2"] and not dit["needs_mask"]
    assert (dit["image_size"], dit["channels"], dit["intensity"]["bit_depth"]) == (16, 1, 8)
    ldm = models["ldm/checkpoint_best.pt"]
    assert ldm["supported"] and ldm["kind"] == "ldm" and ldm["samplers"] == ["ddim", "dpmsolver++", "unipc"]
    assert ldm["conditional"] and ldm["intensity"]["bit_depth"] == 16 and not ldm["needs_mask"]
    controlnet = models[CONTROLNET]
    assert controlnet["supported"] and controlnet["kind"] == "controlnet" and controlnet["needs_mask"]
    assert controlnet["samplers"][0] == "unipc" and controlnet["intensity"]["bit_depth"] == 16
    # Its recorded LDM lies outside the folder: the same run's LDM inside is found, the nearer-named one.
    assert controlnet["ldm"] == "ldm/checkpoint_best.pt"
    assert models["recorded.pt"]["ldm"] == "ldm_b/checkpoint_best.pt"  # recorded inside: that one
    orphan = models["orphan.pt"]
    assert not orphan["supported"] and "not under --checkpoints" in orphan["reason"]
    # A hub-id VAE offline: served with --vae instead.
    assert models["dit_hub.pt"]["supported"] and models["dit_hub.pt"]["vae"] == str(vae_folder)
    stub = models["DiT-official.pt"]
    assert not stub["supported"] and "without its x_embedder, pos_embed and y_embedder" in stub["reason"]
    bare = models["DiT-S-2-bare.pt"]  # an official-style file: classes from its table, the hub VAE via --vae
    assert bare["supported"] and bare["kind"] == "dit" and bare["samplers"][0] == "ddpm"
    assert bare["class_names"] == [str(i) for i in range(1000)] and bare["vae"] == str(vae_folder)
    assert (bare["channels"], bare["intensity"]["bit_depth"]) == (3, 8)
    assert models["ddpm.pt"]["kind"] == "ddpm" and not models["ddpm.pt"]["needs_mask"]
    assert not any("ldm_facts" in m or "recorded_ldm" in m for m in models.values())  # server-side only


@pytest.mark.parametrize("model, sampler", [("dit/0000002.pt", "ddim"), ("dit_hub.pt", "ddpm")])
def test_dit_zip_and_grid(kinds_server, model, sampler):
    body = {"model": model, "n": 3, "sampler": sampler, "seed": 2, **FAST}
    reply = post(kinds_server, body)
    assert reply.status_code == 200, reply.text
    assert json.loads(reply.headers["X-Scores"]) is None
    archive, names, images = pictures(reply)
    assert names == ["0000_class_0.png", "0001_class_1.png", "0002_class_2.png"]
    assert "scores.json" not in archive.namelist()
    assert all(image.mode == "L" and image.size == (16, 16) for image in images)  # 8-bit gray, as the data
    assert post(kinds_server, body).content == reply.content  # the seed decides the images
    grid = Image.open(io.BytesIO(post(kinds_server, body, format="grid").content))
    assert grid.format == "PNG" and grid.size[0] > 3 * 16


def test_a_bare_dit_state_dict_is_sampled_as_dit_sample_py_does(kinds_server):
    # No config in the file: dit/sample.py's load_model reads DiT-S/2 from the shapes (as for DiT-XL/2).
    body = {"model": "DiT-S-2-bare.pt", "n": 2, "class": "207", "sampler": "ddim", **FAST}
    reply = post(kinds_server, body)
    assert reply.status_code == 200, reply.text
    _, names, images = pictures(reply)
    assert len(names) == 2 and all(name.endswith(".png") for name in names)
    assert all(image.mode == "RGB" and image.size == (16, 16) for image in images)


def test_ldm_zip_and_grid_are_16_bit(kinds_server):
    body = {"model": "ldm/checkpoint_best.pt", "n": 2, "class": "class_2", "sampler": "dpmsolver++", **FAST}
    reply = post(kinds_server, body)
    assert reply.status_code == 200, reply.text
    _, names, images = pictures(reply)
    assert names == ["0000_class_2.png", "0001_class_2.png"]
    assert all(image.mode.startswith("I") and image.size == (16, 16) for image in images)
    assert len({image.tobytes() for image in images}) == 2  # each image has its own noise
    grid = Image.open(io.BytesIO(post(kinds_server, body, format="grid").content))
    assert grid.mode.startswith("I") and grid.size[0] > 2 * 16


@pytest.mark.parametrize(
    "mask, prefix",
    [(square_mask(), ""), (label_map(), "data:image/png;base64,")],
    ids=["binary", "label-map"],
)
def test_controlnet_follows_an_uploaded_mask_and_scores_it(kinds_server, mask, prefix):
    body = {"model": CONTROLNET, "n": 3, "mask": upload(mask, prefix=prefix), "conditioning_scale": 1.5}
    reply = post(kinds_server, {**body, **FAST})
    assert reply.status_code == 200, reply.text
    scores = json.loads(reply.headers["X-Scores"])
    assert len(scores["dice"]) == 3 and all(0 <= d <= 1 for d in scores["dice"])
    assert scores["mean_dice"] == pytest.approx(sum(scores["dice"]) / 3)
    archive, names, images = pictures(reply)
    assert names == ["0000.png", "0001.png", "0002.png"]
    assert json.loads(archive.read("scores.json")) == scores
    assert all(image.mode.startswith("I") and image.size == (16, 16) for image in images)  # 16-bit data
    # The grid: the mask (as the model sees it) beside each image, four pairs a row.
    grid = Image.open(io.BytesIO(post(kinds_server, {**body, **FAST}, format="grid").content))
    assert grid.size == (2 + 3 * (2 * 16 + 2), 2 + 16 + 2)
    tile = np.asarray(grid.convert("L"))[2:18, 2:18]
    assert (tile[4:12, 3:10] > tile[0:2, :].max()).all() if mask.shape == (16, 16) else tile.max() > 0
    # Another mask scale changes the images; the job view gives the scores too.
    job = httpx.post(kinds_server + "/jobs", json={**body, "conditioning_scale": 0.0, **FAST}).json()
    done = wait_for(kinds_server, job["id"])
    assert done["status"] == "done" and len(done["scores"]["dice"]) == 3
    assert httpx.get(f"{kinds_server}/jobs/{job['id']}/result").content != reply.content


def test_controlnet_takes_a_tiff_mask_and_a_class(kinds_server):
    body = {"model": CONTROLNET, "n": 1, "mask": upload(square_mask(1), "TIFF"), "class": "class_1", **FAST}
    reply = post(kinds_server, body)
    assert reply.status_code == 200, reply.text
    assert pictures(reply)[1] == ["0000_class_1.png"]


@pytest.mark.parametrize(
    "body, message",
    [
        ({"model": CONTROLNET}, "needs a mask"),
        ({"model": "ddpm.pt", "mask": upload(square_mask())}, "ControlNet models only"),
        ({"model": "ldm/checkpoint_best.pt", "mask": upload(square_mask())}, "ControlNet models only"),
        (
            {"model": CONTROLNET, "mask": base64.b64encode(b"GIF89a not really").decode()},
            "mask: not a readable",
        ),
        ({"model": CONTROLNET, "mask": "%%% not base64"}, "not valid base64"),
        ({"model": CONTROLNET, "mask": upload(np.zeros((8, 8, 3), np.uint8), "JPEG")}, "give a PNG or TIFF"),
        ({"model": CONTROLNET, "mask": "A" * 2_000_000}, "--max-upload-mb 1"),  # the body, before reading
        ({"model": CONTROLNET, "mask": "A" * 1_420_000}, "--max-upload-mb 1"),  # the decoded size
        (
            {"model": CONTROLNET, "mask": upload(square_mask()), "conditioning_scale": -1},
            "conditioning_scale",
        ),
        ({"model": "orphan.pt", "mask": upload(square_mask())}, "not under --checkpoints"),
        ({"model": "ldm/checkpoint_best.pt", "sampler": "pc"}, "does not apply"),
        ({"model": "ldm/checkpoint_best.pt", "seed": -1}, "seed must be >= 0"),
        ({"model": "dit/0000002.pt", "class": "dog"}, "not one of the model's classes"),
        ({"model": "dit/0000002.pt", "steps": 1001}, "steps must be between 1 and 1000"),
    ],
)
def test_refusals(kinds_server, body, message):
    reply = post(kinds_server, {"n": 1, **body})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert message in error and "\n" not in error


def test_a_missing_vae_is_a_reason_not_a_crash(kind_checkpoints, monkeypatch):
    # The same folder without --vae (in-process: the refusal comes before any worker): the hub id is a reason.
    sys.path.insert(0, str(SERVE.parent))
    import serve
    from fastapi.testclient import TestClient
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as in the servers (HF_HUB_OFFLINE=1)

    args = serve.build_parser().parse_args(["--checkpoints", str(kind_checkpoints)])
    args.checkpoints = kind_checkpoints.resolve()
    app = serve.create_app(args)
    try:
        client = TestClient(app)
        models = {m["name"]: m for m in client.get("/models").json()["models"]}
        hub = models["dit_hub.pt"]
        assert (
            not hub["supported"] and "stabilityai/sd-vae-ft-ema" in hub["reason"] and "--vae" in hub["reason"]
        )
        assert models["dit/0000002.pt"]["supported"]  # its recorded local VAE is there
        reply = client.post("/generate", json={"model": "dit_hub.pt", "n": 1, **FAST})
        assert reply.status_code == 400 and "--vae DIR" in reply.json()["error"]
    finally:
        app.state.jobs.close()


def test_vae_flag_must_be_a_diffusers_folder(kind_checkpoints, tmp_path):
    command = [sys.executable, str(SERVE), "--checkpoints", str(kind_checkpoints), "--vae", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert (
        result.returncode == 2
        and result.stderr.startswith("error: --vae")
        and "Traceback" not in result.stderr
    )


def test_jobs_of_different_kinds_run_in_order(kinds_server):
    mask = upload(square_mask())
    bodies = [
        {"model": "dit/0000002.pt", "n": 4, "sampler": "ddim", "steps": 10},
        {"model": CONTROLNET, "n": 2, "mask": mask, **FAST},
        {"model": "ldm/checkpoint_best.pt", "n": 2, **FAST},
        {"model": "ddpm.pt", "n": 1, "sampler": "ddim", "steps": 2},
    ]
    queued = [httpx.post(kinds_server + "/jobs", json=body).json() for body in bodies]
    done = [wait_for(kinds_server, job["id"]) for job in queued]
    assert [job["status"] for job in done] == ["done"] * 4, done
    for before, after in zip(done, done[1:], strict=False):
        assert before["finished"] <= after["started"]  # one at a time, in the order they came
    assert done[1]["scores"] is not None and done[0]["scores"] is None
