"""Shared fixtures: tiny image sets, subprocess runners and one small trained run reused by many tests."""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DDPM_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(DDPM_DIR))

# A tiny architecture that trains in a second on a CPU; 2 DDIM steps keep the sample grid of each save cheap.
TINY = "--image-size 16 --base-channels 8 --time-dim 32 --num-workers 0 --preview-steps 2".split()


# A server process imports torch and the scripts once and forks a fresh child for every run: the child
# runs the script as __main__ with the run's argv, folder and environment, and ends (atexit handlers,
# tracebacks, exit code) as `python script ...` does. Each run is thus its own process without paying the
# ~5 s of CPU that importing torch, diffusers and accelerate takes, most of this suite's time on two cores.
FORK_SERVER = r"""
import atexit, json, os, runpy, sys, time
sys.path.insert(0, sys.argv[1])
import ddpm, ddpm_conditional, ddpm_conditional_ddp  # noqa: F401 (imported once, shared by every child)
import diffusers, diffusers.training_utils, accelerate  # noqa: F401

for line in sys.stdin:
    run = json.loads(line)
    pid = os.fork()
    if pid == 0:  # the child
        os.chdir(run["cwd"])
        os.environ.clear()
        os.environ.update(run["env"])
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(os.open(run["stdout"], os.O_WRONLY | os.O_CREAT), 1)
        os.dup2(os.open(run["stderr"], os.O_WRONLY | os.O_CREAT), 2)
        sys.argv, code = run["argv"], 0
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
        except SystemExit as stop:  # read as the interpreter does: None is 0, a message is printed, exit 1
            code = stop.code
            if not (code is None or isinstance(code, int)):
                print(code, file=sys.stderr)
                code = 1
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        # atexit handlers run as at a normal exit; only the slow teardown of torch's modules is skipped.
        atexit._run_exitfuncs()
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code or 0)
    deadline = time.monotonic() + run["timeout"]
    while not (done := os.waitpid(pid, os.WNOHANG))[0] and time.monotonic() < deadline:
        time.sleep(0.02)
    if not done[0]:
        os.kill(pid, 9)
        done = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(done[1]), flush=True)
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


class ForkServer:
    """The client of FORK_SERVER: one run at a time, so threads of the tests may share it."""

    def __init__(self, folder):
        self.folder, self.count, self.lock = Path(folder), 0, threading.Lock()
        command = [sys.executable, "-c", FORK_SERVER, str(DDPM_DIR)]
        self.server = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV
        )

    def run(self, argv, cwd, env, timeout):
        with self.lock:
            self.count += 1
            out, err = self.folder / f"{self.count}.out", self.folder / f"{self.count}.err"
            run = dict(argv=argv, cwd=str(cwd), env=env, timeout=timeout, stdout=str(out), stderr=str(err))
            self.server.stdin.write(json.dumps(run) + "\n")
            self.server.stdin.flush()
            code = int(self.server.stdout.readline())
        return subprocess.CompletedProcess(argv, code, out.read_text(), err.read_text())

    def close(self):
        self.server.stdin.close()
        self.server.wait(timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)


SERVER = []  # the session's ForkServer, started by the first run


def fork_server():
    if not SERVER:
        SERVER.append(ForkServer(tempfile.mkdtemp(prefix="ddpm-runs-")))
        atexit.register(SERVER[0].close)
    return SERVER[0]


def run_script(script, *args, cwd, env=None, timeout=240):
    """Run a ddpm script as a user would, as its own process with one thread (parallel runs do not thrash)."""
    return fork_server().run([str(DDPM_DIR / script), *map(str, args)], cwd, {**ENV, **(env or {})}, timeout)


def torchrun(script, *args, cwd, nproc=2, timeout=240):
    """Launch a script on nproc CPU processes with torchrun (gloo)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, str(DDPM_DIR / script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def make_class_folders(root, classes=3, per_class=4, size=16, mode="L", seed=0):
    """Class folders of simple patterned images: class c has a bright bar at a class-specific row."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = Path(root) / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 40, (size, size), dtype=np.uint8)
            img[c * 4 : c * 4 + 3] = 230
            pil = Image.fromarray(img, "L")
            pil.convert(mode).save(folder / f"img_{i}.png")
    return Path(root)


@pytest.fixture(scope="session")
def gray_data(tmp_path_factory):
    return make_class_folders(tmp_path_factory.mktemp("gray"))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, gray_data):
    """One conditional training run (2 epochs, saves every epoch) shared by the sampling tests."""
    work = tmp_path_factory.mktemp("run")
    flags = "--num-classes 3 --run-name tiny --epochs 2 --batch-size 4 --save-interval 1 --val-split 0.2"
    result = run_script("ddpm_conditional.py", "--dataset-path", gray_data, *flags.split(), *TINY, cwd=work)
    assert result.returncode == 0, result.stderr
    return work


@pytest.fixture(scope="session")
def objective_runs(tmp_path_factory, gray_data):
    """{objective: run folder} of tiny conditional runs of the continuous-time objectives (3 steps each)."""
    work = tmp_path_factory.mktemp("objectives")
    flags = "--num-classes 3 --batch-size 4 --max-steps 3 --val-split 0.2 --ema-warmup-steps 0".split()
    runs = {}
    for objective in ("vp", "subvp", "ve", "flow"):
        argv = ("--dataset-path", gray_data, *flags, *TINY, "--objective", objective, "--run-name", objective)
        result = run_script("ddpm_conditional.py", *argv, cwd=work)
        assert result.returncode == 0, result.stderr
        runs[objective] = work / "models" / objective
    return runs


# A classifier as narrow as TINY's UNet, one level per resolution.
CLASSIFIER_TINY = "--base-channels 8 --time-dim 32 --depth 1 --num-workers 0".split()


@pytest.fixture(scope="session")
def classifier_run(tmp_path_factory, trained_run, gray_data):
    """models/classifier of a classifier of trained_run's conditional DDPM (2 epochs on the same folders)."""
    work = tmp_path_factory.mktemp("classifier")
    ddpm = trained_run / "models/tiny/ema_ckpt.pt"
    flags = "--epochs 2 --batch-size 4 --save-interval 1 --val-split 0.25 --ema-warmup-steps 0".split()
    argv = ("--dataset-path", gray_data, "--diffusion-checkpoint", ddpm, *flags, *CLASSIFIER_TINY)
    result = run_script("train_classifier.py", *argv, cwd=work)
    assert result.returncode == 0, result.stderr
    return work / "models" / "classifier"


@pytest.fixture(scope="session")
def unconditional_run(tmp_path_factory, gray_data):
    """models/uncond of an unconditional DDPM trained for 2 steps on gray_data's images (16 px, gray)."""
    work = tmp_path_factory.mktemp("unconditional")
    flags = "--run-name uncond --max-steps 2 --batch-size 4 --val-split 0".split()
    result = run_script("ddpm.py", "--dataset-path", gray_data, *flags, *TINY, cwd=work)
    assert result.returncode == 0, result.stderr
    return work / "models" / "uncond"
