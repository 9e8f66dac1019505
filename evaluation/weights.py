"""Weights of the metric networks: local files, offline lookup, the one download, and the feature extractors
built from them (each file checked to hold only tensors before torch-fidelity reads it)."""

import hashlib
import os
import re
import socket
import sys
from unittest import mock
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torchvision
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

import dinov2_vit
from core import files
from core.errors import UserError

# Our metric -> the torch-fidelity metric whose default feature layer it reads (sFID's layer is ours).
TORCH_FIDELITY_NAME = {"fid": "fid", "pr": "prc", "dc": "prc", "kid": "kid", "isc": "isc", "fd-dinov2": "fid"}
# sFID (Nash et al. 2021, as ADM's evaluator computes it): the first 7 channels of the TF Inception graph's
# `mixed_6/conv` output. torch-fidelity ports that graph with torchvision's names; its weight converter
# (utils/util_convert_inception_weights.py) maps `mixed_6/conv/conv2d_params` and `mixed_6/conv/batchnorm` to
# `Mixed_6d.branch1x1.conv` and `.bn` (mixed, mixed_1, mixed_2 = Mixed_5b-d; mixed_3 = 6a; mixed_4..7 =
# 6b..6e), and the graph node `mixed_6/conv` is that block's ReLU output, so the layer is the output of
# Mixed_6d.branch1x1 (conv, batch norm, ReLU): 192 x 17 x 17 for the 299 px input, 7 x 17 x 17 kept.
SFID_LAYER = "mixed_6/conv"
SFID_CHANNELS = 7
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
# One entry per DINOv2 backbone (--dinov2-model picks one), named like torch-fidelity's extractors.
for _name in dinov2_vit.ARCHITECTURES:
    NETWORKS[_name] = {
        "extractor": _name,
        "label": f"DINOv2 ViT-{_name.split('-')[2].replace('s', 'S').replace('b', 'B').replace('l', 'L')}/14",
        "url": dinov2_vit.weights_url(_name),
        "flag": "--dinov2-weights",
        "dest": "dinov2_weights",
        "env": "EVAL_DINOV2_WEIGHTS",
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
    weights["sha256"] = file_sha256(weights["path"])
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


def file_sha256(path):
    """sha256 of a file, read in 16 MB blocks (the JSON names the exact weights behind each score)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_identity(weights):
    """What the features depend on in a weights file: its path, size and modification time."""
    stat = os.stat(weights["path"])
    return [weights["path"], stat.st_size, stat.st_mtime_ns]


class WithSpatialFeatures(nn.Module):
    """torch-fidelity's Inception-v3 that also returns sFID's spatial features, from the same forward pass."""

    def __init__(self, extractor):
        super().__init__()
        self.extractor, self.spatial = extractor, None
        extractor.Mixed_6d.branch1x1.register_forward_hook(self.keep_spatial)

    def keep_spatial(self, module, inputs, output):
        # (B, 192, 17, 17) -> first 7 channels, flattened height, width, channel: the order of ADM's
        # NHWC TensorFlow features, so mu_s / sigma_s written here match its evaluator's element by element.
        self.spatial = output[:, :SFID_CHANNELS].permute(0, 2, 3, 1).flatten(1).to(torch.float32)

    def get_requested_features_list(self):
        return [*self.extractor.get_requested_features_list(), SFID_LAYER]

    def forward(self, x):
        return (*self.extractor(x), self.spatial)


def load_dinov2(name, path):
    """torch-fidelity's DINOv2 extractor around the backbone of dinov2_vit.py holding the file's weights."""
    model = dinov2_vit.build(name, files.load_weights_only(path, "DINOv2 weights file (--dinov2-weights)"))
    # The extractor's constructor asks torch.hub for the network (GitHub code, download); handing it the
    # local model instead keeps everything else torch-fidelity's (its resize, normalisation, output).
    with mock.patch.object(torch.hub, "load", lambda repo, entry: model):
        return create_feature_extractor(name, ["dinov2"], cuda=False, verbose=False)


def build_extractor(network, weights, device):
    """torch-fidelity's extractor for `network` from a local file, with every layer a metric may use."""
    spec = NETWORKS[network]
    cls = FEATURE_EXTRACTORS_REGISTRY[spec["extractor"]]
    # Every layer any metric reads, so one pass over the images serves all of them.
    layers = sorted({cls.get_default_feature_layer_for_metric(m) for m in TORCH_FIDELITY_NAME.values()})
    # Built on the CPU, then moved: torch-fidelity's cuda=True means the default GPU, not --device's.
    try:
        if network in dinov2_vit.ARCHITECTURES:
            extractor = load_dinov2(network, weights["path"])
        else:
            extractor = create_feature_extractor(
                spec["extractor"],
                layers,
                cuda=False,
                feature_extractor_weights_path=weights["path"],
                verbose=False,
            )
    except UserError:
        raise
    except Exception as error:  # any failure to read or fit the user's file is an input problem
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UserError(
            f"{weights['path']} does not hold {spec['label']} weights for torch-fidelity's "
            f"{spec['extractor']} ({reason}); pass the right file with {spec['flag']}"
        ) from None
    if network == "inception":
        extractor = WithSpatialFeatures(extractor)
    return extractor.to(device)
