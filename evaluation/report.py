"""The evaluation report: the printed FINAL EVALUATION REPORT block and the --json file."""

import json
import platform
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
import torchvision
from PIL import Image

from core import files
from metrics import network_of
from weights import NETWORKS

LINE = "=" * 40


def metric_lines(values, failures, metrics, args):
    """Report lines in the seed's format ('FID (InceptionV3):     12.3456')."""
    lines = []
    for metric in metrics:
        network = network_of(metric, args)
        label = NETWORKS[network]["label"] if network else "radiomics"
        rows = {
            "fid": [(f"FID ({label}):", "fid", None)],
            "sfid": [(f"sFID ({label}):", "sfid", None)],
            "pr": [(f"Precision ({label}):", "precision", None), (f"Recall ({label}):", "recall", None)],
            "dc": [(f"Density ({label}):", "density", None), (f"Coverage ({label}):", "coverage", None)],
            "kid": [(f"KID ({label}):", "kid_mean", "kid_std")],
            "isc": [(f"IS ({label}):", "isc_mean", "isc_std")],
            "fd-dinov2": [(f"FD ({label}):", "fd_dinov2", None)],
            "frd": [("FRD (radiomics):", "frd", None)],
        }[metric]
        for title, key, spread in rows:
            if metric in failures:
                lines.append(f"{title + ' ':<23}FAILED ({failures[metric]})")
            else:
                digits = 6 if metric == "kid" else 4
                text = f"{values[key]:.{digits}f}" + (f" ± {values[spread]:.{digits}f}" if spread else "")
                lines.append(f"{title + ' ':<23}{text}")
    return lines


def print_report(result, metrics, args):
    """The FINAL EVALUATION REPORT block on stdout, then per-class blocks when asked."""
    lines = [LINE, "FINAL EVALUATION REPORT", f"Real Data: {args.real}", f"Gen Data:  {args.gen}", LINE]
    lines += metric_lines(result["metrics"], result["failures"], metrics, args)
    lines.append(LINE)
    for name, entry in result.get("per_class", {}).items():
        lines.append(f"Class {name} (real {entry['counts']['real']}, gen {entry['counts']['gen']})")
        lines += ["  " + line for line in metric_lines(entry["metrics"], entry["failures"], metrics, args)]
    if result.get("per_class"):
        lines.append(LINE)
    print("\n".join(lines), flush=True)


def library_versions():
    """Versions of everything that changes the numbers."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_fidelity": torch_fidelity.__version__,
        "numpy": np.__version__,
        "pillow": Image.__version__,
    }


def size_histogram(sizes):
    """{'HxW': count} of an (N, 2) tensor of image sizes."""
    found, counts = torch.unique(sizes, dim=0, return_counts=True)
    return {f"{h}x{w}": int(c) for (h, w), c in zip(found.tolist(), counts.tolist(), strict=True)}


def write_json(path, result):
    """Write the full result atomically (a crash never leaves half a file)."""
    files.atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
