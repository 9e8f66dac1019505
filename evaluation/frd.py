"""FRD, the Frechet Radiomics Distance (Konz et al. 2024), through the frd-score package.

FRD fits Gaussians to hand-crafted radiomic features (first-order intensity statistics, texture matrices,
wavelet and LoG filtered versions) of each image, so unlike the ImageNet networks its features mean
something for medical images. frd-score reads the image files itself (its own decoding, not this
project's image rule) and returns log(d_F^2) for its default FRD v1. It is optional: it needs frd-score
and a pyradiomics build (the pyradiomics release on PyPI does not install on Python >= 3.10; the
pyradiomics-bhklab fork does), listed in requirements-frd.txt.
"""

import contextlib
import os
import sys
from importlib import metadata

from core.errors import UserError

REQUIREMENTS = "evaluation/requirements-frd.txt"


def check_available():
    """Raise UserError in one line when frd-score or pyradiomics cannot be imported."""
    try:
        import frd_score  # noqa: F401
        import radiomics  # noqa: F401
    except ImportError as error:
        raise UserError(
            f"--metrics frd needs the optional packages frd-score and pyradiomics ({error}): "
            f"pip install -r {REQUIREMENTS}"
        ) from None


def check_inputs(real, gen):
    """FRD reads files, so both sides must be folders."""
    for image_set in (real, gen):
        if image_set.files is None:
            raise UserError(
                f"--metrics frd reads image files, but {image_set.path} is an .npz: pass a folder"
            )


def frd_of(real_files, gen_files, args):
    """frd-score's FRD (its defaults: v1, joint normalisation) of two lists of image files."""
    from frd_score import compute_frd

    # frd-score's own process pool; 0 DataLoader workers here means work in one process there too.
    workers = max(1, args.num_workers)
    # compute_frd prints its value even when not verbose; stdout holds only the report.
    with contextlib.redirect_stdout(sys.stderr):
        return float(compute_frd([real_files, gen_files], num_workers=workers, verbose=False))


def paths(image_set, indices=None):
    chosen = image_set.files if indices is None else [image_set.files[i] for i in indices]
    return [os.path.join(image_set.path, f) for f in chosen]


def evaluate(result, real, gen, classes, args):
    """FRD overall and per class into result (failures recorded, as for the other metrics)."""
    targets = [(result, paths(real), paths(gen))]
    for name, (real_index, gen_index) in classes.items():
        entry = result["per_class"].setdefault(
            name, {"counts": {"real": len(real_index), "gen": len(gen_index)}, "metrics": {}, "failures": {}}
        )
        targets.append((entry, paths(real, real_index.tolist()), paths(gen, gen_index.tolist())))
    for entry, real_files, gen_files in targets:
        try:
            entry["metrics"]["frd"] = frd_of(real_files, gen_files, args)
        except Exception as error:  # reported in the output and the exit code, never hidden
            entry["failures"]["frd"] = f"{type(error).__name__}: {error}"


def protocol(args):
    """What an FRD value depends on: the package versions and its settings (its defaults)."""
    versions = {}
    for package in ("frd-score", "pyradiomics-bhklab", "pyradiomics", "SimpleITK"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {
        "features": "frd-score radiomic features (FRD v1 defaults), images read by frd-score",
        "resize": "none (frd-score's default)",
        "precision": "frd-score's (float64 statistics)",
        "versions": versions,
    }
