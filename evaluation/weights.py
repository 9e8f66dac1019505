"""Weights of the metric networks: local files, offline lookup, the one download, and the feature extractors
built from them (each file checked to hold only tensors before torch-fidelity reads it)."""

import os
import re
import socket
import sys
from urllib.parse import urlparse

import torch
import torchvision
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from core import files
from core.errors import UserError

TORCH_FIDELITY_NAME = {"fid": "fid", "pr": "prc", "kid": "kid", "isc": "isc"}
NETWORKS = {
    "inception": {
        "extractor": "inception-v3-compat",
        "label": "InceptionV3",
        "url": URL_INCEPTION_V3,
        "flag": "--inception-weights",
        "dest": "inception_weights",
        "env": "EVAL_INCEPTION_WEIGHTS",
    },
    "vgg16": {
        "extractor": "vgg16",
        "label": "VGG16",
        "url": torchvision.models.VGG16_Weights.IMAGENET1K_V1.url,
        "flag": "--vgg-weights",
        "dest": "vgg_weights",
        "env": "EVAL_VGG16_WEIGHTS",
    },
}


def resolve_weights(network, given):
    """Local path of a network's weights (the flag, the env variable, or the library's standard file),
    checked to hold only tensors: torch-fidelity unpickles it with weights_only=False."""
    spec = NETWORKS[network]
    path = given or os.environ.get(spec["env"])
    if path:
        if not os.path.isfile(path):
            raise UserError(
                f"{spec['label']} weights file not found: {path} (given by {spec['flag']} / {spec['env']})"
            )
        weights = {"path": os.path.abspath(path), "source": "flag" if given else spec["env"], "url": None}
    else:
        cached = os.path.join(
            torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(spec["url"]).path)
        )
        if not os.path.isfile(cached):
            download_weights(spec, cached)
        weights = {"path": cached, "source": "download", "url": spec["url"]}
    files.load_weights_only(weights["path"], f"{spec['label']} weights file ({spec['flag']})")
    return weights


def download_weights(spec, destination):
    """Fetch a standard weights file once, failing within seconds when the machine is offline."""
    name = os.path.basename(destination)
    hint = f"fetch {spec['url']} elsewhere and pass the file with {spec['flag']} PATH (or set {spec['env']})"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError(
            f"offline (HF_HUB_OFFLINE is set) and {name} is not in {os.path.dirname(destination)}: {hint}"
        )
    # torch.hub release files are named <name>-<sha256 prefix>.<ext>; the prefix checks the download.
    hash_prefix = re.search(r"-([a-f0-9]{8,})\.", name)
    print(f"Downloading {spec['url']} -> {destination}", file=sys.stderr)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)  # an unreachable host fails in seconds instead of hanging
    try:
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        torch.hub.download_url_to_file(spec["url"], destination, hash_prefix and hash_prefix.group(1))
    except (OSError, RuntimeError) as error:
        raise UserError(f"cannot download {name} ({error}): {hint}") from None
    finally:
        socket.setdefaulttimeout(previous_timeout)


def weights_identity(weights):
    """What the features depend on in a weights file: its path, size and modification time."""
    stat = os.stat(weights["path"])
    return [weights["path"], stat.st_size, stat.st_mtime_ns]


def build_extractor(network, weights, device):
    """torch-fidelity's extractor for `network` from a local file, with every layer a metric may use."""
    spec = NETWORKS[network]
    cls = FEATURE_EXTRACTORS_REGISTRY[spec["extractor"]]
    # Every layer any metric reads, so one pass over the images serves all of them.
    layers = sorted({cls.get_default_feature_layer_for_metric(m) for m in TORCH_FIDELITY_NAME.values()})
    # Built on the CPU, then moved: torch-fidelity's cuda=True means the default GPU, not --device's.
    try:
        extractor = create_feature_extractor(
            spec["extractor"],
            layers,
            cuda=False,
            feature_extractor_weights_path=weights["path"],
            verbose=False,
        )
    except Exception as error:  # any failure to read or fit the user's file is an input problem
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UserError(
            f"{weights['path']} does not hold {spec['label']} weights for torch-fidelity's "
            f"{spec['extractor']} ({reason}); pass the right file with {spec['flag']}"
        ) from None
    return extractor.to(device)
