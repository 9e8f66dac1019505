"""The metrics on extracted features: FID, precision/recall (k-NN radii, chunked distances), KID and IS,
through torch-fidelity's metric functions, and the sample counts each one needs."""

import numpy as np
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from core.errors import UserError
from weights import NETWORKS, TORCH_FIDELITY_NAME

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
}
METRIC_ORDER = ("fid", "pr", "kid", "isc")
METRIC_TITLES = {"fid": "FID", "pr": "precision/recall", "kid": "KID", "isc": "IS"}


def layer_for(metric, network):
    """torch-fidelity's default feature layer of `metric` for the network."""
    cls = FEATURE_EXTRACTORS_REGISTRY[NETWORKS[network]["extractor"]]
    return cls.get_default_feature_layer_for_metric(TORCH_FIDELITY_NAME[metric])


def metric_values(metric, real, gen, network, args):
    """One metric from features, through torch-fidelity's metric functions."""
    layer = layer_for(metric, network)
    # FID (Heusel et al. 2017): Frechet distance of Gaussians fitted to the two sets' pool3 features,
    # |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)).
    if metric == "fid":
        real_stats = fid_features_to_statistics(real[layer])
        fid = fid_statistics_to_metric(real_stats, fid_features_to_statistics(gen[layer]), False)
        return {"fid": fid[KEY_METRIC_FID]}
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
    """Which network's features a metric uses."""
    return "vgg16" if metric == "pr" and args.pr_features == "vgg16" else "inception"


def minimum_counts(metric, args):
    """(fewest real images, fewest generated images, why) a metric needs."""
    # FID's covariance divides by N - 1; the k-th neighbour of a point, itself excluded, needs k + 1 points.
    return {
        "fid": (2, 2, "FID needs at least 2 images per side for a covariance"),
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
