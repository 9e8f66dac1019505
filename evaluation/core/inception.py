"""FID and KID during training: EMA samples against the run's held-out images, in the feature space of the
Inception-v3 that evaluation/ and published tables use (torch-fidelity's `inception-v3-compat`, with its
TensorFlow-exact resize to 299 px), so a curve logged here and a score from evaluation/ share one network.

The held-out features are computed once per run and cached next to the checkpoints; the scores of every
evaluation go to TensorBoard and into the checkpoint's history, so a resumed run continues its curve. FID of
few images is biased upwards (it needs thousands to settle): compare a run's own curve, and report final
numbers from evaluation/ on 10k-50k samples.
"""

import os
import socket
import sys
from unittest import mock
from urllib.parse import urlparse

import torch

from . import files
from .errors import UserError

EVERY_HELP = "every N {}: FID and KID of EMA samples against the held-out images (0: never)"
SAMPLES_HELP = "images sampled for each in-training FID / KID"
WEIGHTS_HELP = "Inception-v3 weights file of torch-fidelity (unset: its cache, else a download)"
BEST_HELP = "best checkpoint: lowest held-out loss, or lowest in-training FID (needs --eval_every)"
FEATURE = "2048"  # the pool3 features that FID and KID are defined on
KID_SUBSET = 1000  # torch-fidelity's and the KID paper's subset size, lowered when a set is smaller
KID_SUBSETS = 100


def add_eval_flags(parser, unit="epochs", dashed=False):
    """--eval_every, --eval_samples, --eval_inception_weights and --best_by (both spellings each)."""

    def add(name, **kwargs):
        parser.add_argument("--" + (name.replace("_", "-") if dashed else name), **kwargs)

    from .cli import nonnegative_int, positive_int

    add("eval_every", type=nonnegative_int, default=0, metavar="N", help=EVERY_HELP.format(unit))
    add("eval_samples", type=positive_int, default=1000, metavar="N", help=SAMPLES_HELP)
    add("eval_inception_weights", metavar="PATH", help=WEIGHTS_HELP)
    add("best_by", choices=("loss", "fid"), default="loss", help=BEST_HELP)


def check_eval_flags(eval_every, best_by, heldout_count, fraction_flag="--val_fraction"):
    """A setting that cannot produce a score is a UserError before training starts."""
    if best_by == "fid" and not eval_every:
        raise UserError("--best_by fid needs --eval_every N (how often to compute the FID)")
    if eval_every and heldout_count < 2:
        raise UserError(
            f"--eval_every needs at least 2 held-out images to compare with, but {fraction_flag} leaves "
            f"{heldout_count}: raise {fraction_flag}"
        )


# --------------------------------------------------------------------------- the network


def weights_path(given, flag="--eval_inception_weights"):
    """The Inception weights file: the flag's, else torch-hub's cached copy, else downloaded once; offline
    (HF_HUB_OFFLINE) a missing file is a UserError that names the flag."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    if given:
        if not os.path.isfile(given):
            raise UserError(f"{flag} {given}: no such file")
        return given
    cached = os.path.join(
        torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(URL_INCEPTION_V3).path)
    )
    if os.path.isfile(cached):
        return cached
    hint = f"fetch {URL_INCEPTION_V3} on a machine with internet and pass it with {flag} PATH"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"offline (HF_HUB_OFFLINE is set) and {cached} does not exist: {hint}")
    print(f"Downloading {URL_INCEPTION_V3} -> {cached}", file=sys.stderr)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(10)  # an unreachable host fails in seconds, not after minutes
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        torch.hub.download_url_to_file(URL_INCEPTION_V3, cached)
    except (OSError, RuntimeError) as error:
        raise UserError(f"cannot download the Inception weights ({error}): {hint}") from None
    finally:
        socket.setdefaulttimeout(previous)
    return cached


def load_inception(path, device, flag="--eval_inception_weights"):
    """torch-fidelity's FID Inception-v3 with the file's weights (checked to hold only tensors first:
    torch-fidelity itself unpickles with weights_only=False)."""
    from torch_fidelity.utils import create_feature_extractor

    files.load_weights_only(path, f"Inception weights file ({flag})")
    try:  # built on the CPU, then moved: torch-fidelity's cuda=True means the default GPU
        extractor = create_feature_extractor(
            "inception-v3-compat", [FEATURE], cuda=False, feature_extractor_weights_path=path, verbose=False
        )
    except Exception as error:  # a file of other keys or shapes is the user's input problem
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise UserError(
            f"{flag} {path} does not hold torch-fidelity's Inception-v3 weights ({reason})"
        ) from None
    return extractor.to(device).eval()


def random_inception_state_dict(seed=0):
    """Random weights of the real architecture, for tests on machines that cannot download the file."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    # The constructor always loads weights; skipping that once leaves the bare architecture.
    with (
        mock.patch.object(tf_inception, "load_state_dict_from_url", return_value={}),
        mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict"),
    ):
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", [FEATURE])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # He init keeps activations at scale through the depth, so features vary
        for module in net.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.weight.normal_(0.0, (2.0 / module.weight[0].numel()) ** 0.5, generator=generator)
    return net.state_dict()


def inception_input(images):
    """Float images in [0, 1], (N, 1 or 3, H, W), as the uint8 RGB batch the extractor takes. Deeper data
    is rounded to 8 bits here, as every Inception-based score does."""
    x = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.no_grad()
def features(extractor, batches):
    """(N, 2048) float64 CPU features of an iterable of float image batches in [0, 1]."""
    device = next(extractor.parameters()).device
    out = [extractor(inception_input(batch).to(device))[0].double().cpu() for batch in batches]
    return torch.cat(out)


# --------------------------------------------------------------------------- the scores


def fid(real, gen):
    """Frechet distance between Gaussians fitted to two feature sets (torch-fidelity's computation)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    stats = fid_features_to_statistics(real), fid_features_to_statistics(gen)
    return float(fid_statistics_to_metric(*stats, False)[KEY_METRIC_FID])


def kid(real, gen, seed=0):
    """(mean, std) of the unbiased polynomial-kernel MMD over subsets (torch-fidelity's computation)."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = min(KID_SUBSET, len(real), len(gen))
    options = dict(kid_subsets=KID_SUBSETS, kid_subset_size=size, rng_seed=seed, verbose=False)
    result = kid_features_to_metric(real.float(), gen.float(), **options)  # the kernel's defaults: degree 3
    return float(result[KEY_METRIC_KID_MEAN]), float(result[KEY_METRIC_KID_STD])


class TrainingEval:
    """FID / KID of a model's samples against fixed reference images, the reference features cached.

    reference: (identity, batches) where identity is anything that changes when the images do (e.g. the
    held-out file list) and batches an iterable of float image batches in [0, 1], read only on a cache miss.
    """

    def __init__(self, weights, device, reference, cache_path, batch_size=50):
        path = weights_path(weights)
        self.extractor, self.batch_size = load_inception(path, device), batch_size
        stat = os.stat(path)
        identity = {
            "images": reference[0],
            "weights": [os.path.abspath(path), stat.st_size, stat.st_mtime_ns],
        }
        cached = (
            files.load_weights_only(cache_path, "FID reference cache") if os.path.isfile(cache_path) else None
        )
        if cached is not None and cached.get("identity") == identity:
            self.reference = cached["features"]
        else:  # computed once per run (and again only if the held-out images or the weights change)
            self.reference = features(self.extractor, reference[1])
            files.atomic_save({"identity": identity, "features": self.reference}, cache_path)

    def score(self, sample, count, seed=0):
        """{"fid", "kid", "kid_std"} of `count` images from sample(n, index_of_first) -> float images."""
        batches = (
            sample(min(self.batch_size, count - first), first) for first in range(0, count, self.batch_size)
        )
        generated = features(self.extractor, batches)
        if len(generated) < 2:
            raise UserError("--eval_samples must be at least 2 for FID and KID")
        kid_mean, kid_std = kid(self.reference, generated, seed)
        return {"fid": fid(self.reference, generated), "kid": kid_mean, "kid_std": kid_std}
