"""The metrics on extracted features: FID, sFID, precision/recall and density/coverage (k-NN radii, chunked
distances), KID, IS and FD-DINOv2, through torch-fidelity's metric functions, and the sample counts each
one needs."""

import numpy as np
import torch
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from core.errors import UserError
from weights import NETWORKS, SFID_LAYER, TORCH_FIDELITY_NAME

METRIC_ALIASES = {
    "fid": "fid",
    "precision/recall": "pr",
    "precision_recall": "pr",
    "precision": "pr",
    "recall": "pr",
    "pr": "pr",
    "prc": "pr",
    "kid": "kid",
    "isc": "isc",
    "is": "isc",
    "sfid": "sfid",
    "density-coverage": "dc",
    "density/coverage": "dc",
    "density_coverage": "dc",
    "dc": "dc",
    "fd-dinov2": "fd-dinov2",
    "fd_dinov2": "fd-dinov2",
    "frd": "frd",
}
METRIC_ORDER = ("fid", "sfid", "pr", "dc", "kid", "isc", "fd-dinov2", "frd")
METRIC_TITLES = {
    "fid": "FID",
    "sfid": "sFID",
    "pr": "precision/recall",
    "dc": "density/coverage",
    "kid": "KID",
    "isc": "IS",
    "fd-dinov2": "FD-DINOv2",
    "frd": "FRD",
}
METRIC_NAMES = "fid, sfid, pr, dc (density-coverage), kid, isc, fd-dinov2, frd"


def layer_for(metric, network):
    """The feature layer `metric` reads: torch-fidelity's default for its metric, or sFID's own layer."""
    if metric == "sfid":
        return SFID_LAYER
    cls = FEATURE_EXTRACTORS_REGISTRY[NETWORKS[network]["extractor"]]
    return cls.get_default_feature_layer_for_metric(TORCH_FIDELITY_NAME[metric])


def frechet_distance(real, gen):
    """|mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) of Gaussians fitted to two feature sets."""
    real_stats, gen_stats = fid_features_to_statistics(real), fid_features_to_statistics(gen)
    return fid_statistics_to_metric(real_stats, gen_stats, False)[KEY_METRIC_FID]


def kth_neighbour_radii(features, k, chunk):
    """Distance of every row to its k-th nearest other row (itself excluded), in blocks of `chunk` rows."""
    radii = []
    for start in range(0, len(features), chunk):
        distances = torch.cdist(features[start : start + chunk], features)
        # Sorted column 0 is the row itself (distance 0), so column k is the k-th neighbour.
        radii.append(distances.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def density_coverage(real, gen, k, chunk):
    """Density and coverage (Naeem et al. 2020) on the real k-NN balls, in blocks of `chunk` generated rows.

    density = mean over generated samples of (number of real balls holding it) / k; coverage = share of
    real balls holding at least one generated sample. Strict `<`, as the authors' prdc package."""
    # float64: the `<` against the radii must not flip on rounding of 4096-dim float32 distances.
    real, gen = real.to(torch.float64), gen.to(torch.float64)
    radii = kth_neighbour_radii(real, k, chunk)
    inside_count, nearest_gen = 0, torch.full((len(real),), float("inf"), dtype=torch.float64)
    for start in range(0, len(gen), chunk):
        distances = torch.cdist(gen[start : start + chunk], real)  # (chunk, R)
        inside_count += (distances < radii[None, :]).sum().item()
        nearest_gen = torch.minimum(nearest_gen, distances.min(dim=0).values)
    density = inside_count / (k * len(gen))
    coverage = (nearest_gen < radii).double().mean().item()
    return density, coverage


def metric_values(metric, real, gen, network, args):
    """One metric from features, through torch-fidelity's metric functions."""
    layer = layer_for(metric, network)
    # FID (Heusel et al. 2017): Frechet distance of Gaussians fitted to the two sets' pool3 features,
    # |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)).
    if metric == "fid":
        return {"fid": frechet_distance(real[layer], gen[layer])}
    # sFID (Nash et al. 2021): the same distance on 7 x 17 x 17 = 2023 spatial features of Mixed_6d, which
    # see layout and structure that the pooled pool3 features average away.
    if metric == "sfid":
        return {"sfid": frechet_distance(real[layer], gen[layer])}
    # FD-DINOv2 (Stein et al. 2023): the Frechet distance on DINOv2 class tokens, which follow human
    # judgements of image quality better than Inception features.
    if metric == "fd-dinov2":
        return {"fd_dinov2": frechet_distance(real[layer], gen[layer])}
    if metric == "dc":
        density, coverage = density_coverage(
            real[layer].to(args.device), gen[layer].to(args.device), args.pr_k, args.pr_chunk_size
        )
        return {"density": density, "coverage": coverage}
    if metric == "pr":
        # Improved precision/recall (Kynkaanniemi et al. 2019): each sample's k-NN distance within its own
        # set is a ball radius; precision = share of generated samples inside some real ball, recall the
        # converse.
        # Generated first (torch-fidelity's input1); part-wise distances keep 50k x 50k within a few GB.
        prc = prc_features_to_metric(
            gen[layer].to(args.device),
            real[layer].to(args.device),
            prc_neighborhood=args.pr_k,
            prc_batch_size=args.pr_chunk_size,
            save_cpu_ram=True,
            verbose=False,
        )
        return {
            "precision": prc[KEY_METRIC_PRECISION],
            "recall": prc[KEY_METRIC_RECALL],
            "f_score": prc["f_score"],
        }
    # KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic kernel (x.y / d + 1)^3, averaged over
    # random subsets, so unlike FID it has no bias from the sample count.
    if metric == "kid":
        kid = kid_features_to_metric(
            gen[layer],
            real[layer],
            kid_subsets=args.kid_subsets,
            kid_subset_size=args.kid_subset_size,
            rng_seed=args.seed,
            verbose=False,
        )
        return {"kid_mean": kid[KEY_METRIC_KID_MEAN], "kid_std": kid[KEY_METRIC_KID_STD]}
    # Inception Score (Salimans et al. 2016): exp E[KL(p(y|x) || p(y))] on generated images only, from
    # logits without the final bias as in the original code, mean and spread over shuffled splits.
    isc = isc_features_to_metric(gen[layer], args.isc_splits, True, args.seed)
    return {"isc_mean": isc[KEY_METRIC_ISC_MEAN], "isc_std": isc[KEY_METRIC_ISC_STD]}


def compute_metrics(metrics, real, gen, network, args):
    """(values, failures) of several metrics; a failure is recorded and reported, never hidden."""
    values, failures = {}, {}
    for metric in metrics:
        try:
            result = metric_values(metric, real, gen, network, args)
        except Exception as error:  # reported in the output and the exit code
            failures[metric] = f"{type(error).__name__}: {error}"
            continue
        if all(np.isfinite(v) for v in result.values()):
            values.update(result)
        else:
            failures[metric] = f"non-finite result {result}"
    return values, failures


def network_of(metric, args):
    """Which network's features a metric uses (FRD uses none: it reads the image files itself)."""
    if metric in ("pr", "dc"):
        return args.pr_features
    if metric == "fd-dinov2":
        return args.dinov2_model
    return None if metric == "frd" else "inception"


def minimum_counts(metric, args):
    """(fewest real images, fewest generated images, why) a metric needs."""
    # FID's covariance divides by N - 1; the k-th neighbour of a point, itself excluded, needs k + 1 points.
    return {
        "fid": (2, 2, "FID needs at least 2 images per side for a covariance"),
        "sfid": (2, 2, "sFID needs at least 2 images per side for a covariance"),
        "fd-dinov2": (2, 2, "FD-DINOv2 needs at least 2 images per side for a covariance"),
        "frd": (2, 2, "FRD needs at least 2 images per side for a covariance"),
        "dc": (args.pr_k + 1, 1, f"density/coverage with k={args.pr_k} needs k+1 real images"),
        "pr": (
            args.pr_k + 1,
            args.pr_k + 1,
            f"precision/recall with k={args.pr_k} needs k+1 images per side",
        ),
        "kid": (
            args.kid_subset_size,
            args.kid_subset_size,
            f"KID needs --kid-subset-size={args.kid_subset_size} images per side (pass a smaller one)",
        ),
        "isc": (0, args.isc_splits, f"IS needs --isc-splits={args.isc_splits} generated images"),
    }[metric]


def check_counts(metrics, n_real, n_gen, args, where):
    """Raise UserError before any feature extraction if a side has too few images for a metric."""
    for metric in metrics:
        need_real, need_gen, why = minimum_counts(metric, args)
        if n_real < need_real or n_gen < need_gen:
            raise UserError(f"{where}: {n_real} real and {n_gen} generated images, but {why}")
