"""FID, sFID, precision/recall (Kynkaanniemi et al., k=3), density/coverage, KID, IS, FD-DINOv2 and FRD.

Built on torch-fidelity: its Inception-v3 (FID network, TF-exact resize) and VGG16 feature
extractors and its metric functions. This script adds folder/.npz inputs decoded by the project's
one image rule, mixed image sizes, per-class results, a real-feature cache keyed by the files'
paths, sizes and modification times, and separate weight files per network (checked to hold only
tensors before torch-fidelity reads them).

This file is the command line; the parts live in modules named after what they hold: inputs.py,
weights.py, features.py (with the cache), metrics.py and report.py.

Data layout: --real and --gen are each either
  * a folder of images, searched recursively (png jpg jpeg bmp tif tiff webp, any case); with
    --per-class its first-level sub-folders are the classes (the samplers write
    <out>/<class_name>/000000.png). Each folder is decoded by one rule found by scanning it once:
    integer images are divided by 2^k - 1, k the bit depth of its largest value (at least 8; 16-bit
    PNGs of our samplers declare theirs), or --bit-depth; float images map --intensity-range onto
    [0, 1]. The result becomes 8-bit RGB, as the metric networks expect; or
  * an .npz file whose arr_0 is uint8 N x H x W x C (as the samplers and ADM write); an optional
    arr_1 holds integer labels and class_names their names (index = label). Labels without names
    are taken as the other side's sorted class folders, only when the class counts agree.

With no flags, the constants REAL_IMAGES_DIR, GEN_IMAGES_DIR and BATCH_SIZE at the top of this file
are used:  cd evaluation && python precision_recall.py
Prints the FINAL EVALUATION REPORT block; --json also writes counts, settings, versions and weights.
Exit code 0 on success, 1 if an asked metric failed, 2 for bad input.
"""

import argparse
import os
import re
import sys
import time

import torch

import dinov2_vit
import frd
from core import images
from core.cli import (
    Parser,
    bit_depth,
    ensure_writable_dir,
    ensure_writable_file,
    finite_float,
    nonnegative_int,
    positive_int,
)
from core.errors import UserError, run_cli
from features import features_of_both, resize_protocol
from inputs import DECODING, decoding_rule, match_classes, open_image_set, random_subset
from metrics import (
    METRIC_ALIASES,
    METRIC_NAMES,
    METRIC_ORDER,
    METRIC_TITLES,
    check_counts,
    compute_metrics,
    layer_for,
    network_of,
)
from reference import write_reference
from report import library_versions, print_report, size_histogram, write_json
from weights import NETWORKS, build_extractor, resolve_weights

# Used when no flags are given (the seed's way); --real / --gen / --batch-size override them.
REAL_IMAGES_DIR = "/path/to/real/images"


GEN_IMAGES_DIR = "/path/to/generated/images"
BATCH_SIZE = 32
# Improved precision/recall (Kynkaanniemi et al. 2019) is defined on VGG16 fc2 features; ADM and DiT report
# it on Inception pool3 instead, so both are offered to match either table.
PR_FEATURES = ("vgg16", "inception")  # VGG16 fc2 (Kynkaanniemi et al.) or Inception pool3 (ADM, DiT)
# FD-DINOv2 defaults to ViT-L/14, the backbone of Stein et al. 2023 (dgm-eval).
DINOV2_MODELS = tuple(dinov2_vit.ARCHITECTURES)
LOW_HIGH = dict(type=finite_float, nargs=2, metavar=("LOW", "HIGH"))  # --intensity-range's value pair


def parse_metrics(text):
    """'fid,precision/recall kid' -> ['fid', 'pr', 'kid'] in report order."""
    asked = [m.strip().lower() for m in re.split(r"[,\s]+", text) if m.strip()]
    unknown = [m for m in asked if m not in METRIC_ALIASES]
    if unknown or not asked:
        raise argparse.ArgumentTypeError(f"unknown metric(s) {unknown}; choose from {METRIC_NAMES}")
    chosen = {METRIC_ALIASES[m] for m in asked}
    return [m for m in METRIC_ORDER if m in chosen]


def protocol_item(text):
    """argparse type: KEY=VALUE of --protocol (a number stays a number in the JSON)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. sampler=ddim), got {text!r}")
    try:
        value = int(value)
    except ValueError:
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


def seed(text):
    """argparse type: a seed that numpy and torch-fidelity accept (0 <= seed < 2^32)."""
    value = nonnegative_int(text)
    # torch-fidelity seeds KID subsets and IS shuffles with np.random.RandomState, which takes 32 bits.
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be below 2^32, got {text}")
    return value


def default_cache_dir():
    """$EVAL_CACHE_DIR, else torch-fidelity's own default ($TORCH_HOME/fidelity_cache)."""
    return os.environ.get("EVAL_CACHE_DIR") or os.path.join(
        os.path.dirname(torch.hub.get_dir()), "fidelity_cache"
    )


def build_parser():
    # --help reuses the module docstring, so the data layout is written once: its first line above the
    # flags, everything from its third paragraph on below them.
    parser = Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2])
    add = parser.add_argument
    # Inputs, device and run settings.
    add("--real", default=REAL_IMAGES_DIR, help="real images: folder (recursive) or .npz")
    add("--gen", default=GEN_IMAGES_DIR, help="generated images: folder (recursive) or .npz")
    add("--metrics", type=parse_metrics, default="fid,precision/recall", help=f"any of {METRIC_NAMES}")
    add("--batch-size", "--batch_size", type=positive_int, default=BATCH_SIZE, help="images per batch")
    add("--device", help="torch device, e.g. cuda, cuda:1, cpu (default: cuda when available, else cpu)")
    add("--num-workers", "--num_workers", type=nonnegative_int, help="image decoders (default: min(8, CPUs))")
    add("--max-samples", "--max_samples", type=positive_int, help="random subset of N images per side")
    add("--seed", type=seed, default=2020, help="seed of --max-samples subsets, KID subsets and IS splits")
    add("--json", help="also write metrics, counts, settings and versions as JSON (checked first)")
    add("--per-class", "--per_class", action="store_true", help="also report every metric per class folder")
    # The real-feature cache and the decoding rule of folder inputs.
    add("--cache-dir", "--cache_dir", help="cache (default: $EVAL_CACHE_DIR or $TORCH_HOME/fidelity_cache)")
    add("--no-cache", "--no_cache", action="store_true", help="neither read nor write the cache")
    add("--bit-depth", "--bit_depth", type=bit_depth, help="integer bit depth (default: scan each side)")
    add("--intensity-range", "--intensity_range", **LOW_HIGH, help="float-image range (default: 0 1)")
    # Metric networks and metric settings. k=3 is the paper's neighbourhood (Kynkaanniemi et al. 2019);
    # KID's 100 subsets of 1000 are torch-fidelity's defaults; 10 IS splits as in Salimans et al. 2016.
    # Distance blocks are 1000 rows, not torch-fidelity's 10000: 1000 x 50k float32 is 200 MB.
    add("--inception-weights", "--inception_weights", help="Inception file (or $EVAL_INCEPTION_WEIGHTS)")
    add("--vgg-weights", "--vgg_weights", help="VGG16 file (or $EVAL_VGG16_WEIGHTS)")
    add("--pr-features", "--pr_features", choices=PR_FEATURES, default="vgg16", help="for precision/recall")
    add("--pr-k", "--pr_k", type=positive_int, default=3, help="k nearest neighbours of precision/recall")
    add("--pr-chunk-size", "--pr_chunk_size", type=positive_int, default=1000, help="rows per distance block")
    add("--kid-subset-size", "--kid_subset_size", type=positive_int, default=1000, help="KID subset size")
    add("--kid-subsets", "--kid_subsets", type=positive_int, default=100, help="number of KID subsets")
    add("--isc-splits", "--isc_splits", type=positive_int, default=10, help="Inception Score splits")
    add(
        "--dinov2-model",
        "--dinov2_model",
        choices=DINOV2_MODELS,
        default="dinov2-vit-l-14",
        help="for fd-dinov2",
    )
    add("--dinov2-weights", "--dinov2_weights", help="DINOv2 file (or $EVAL_DINOV2_WEIGHTS)")
    # The ADM reference batch and the sampling protocol, which the images alone do not tell.
    add(
        "--write-reference",
        "--write_reference",
        metavar="OUT.npz",
        help="write --real as an ADM reference batch",
    )
    add(
        "--protocol",
        type=protocol_item,
        action="append",
        metavar="KEY=VALUE",
        help="how the samples were made, e.g. sampler=ddim (repeatable)",
    )
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    # argparse checks each value alone; the pair's order is checked here, through parser.error, so it
    # fails like any other bad flag.
    if args.intensity_range and not args.intensity_range[0] < args.intensity_range[1]:
        parser.error(
            f"--intensity-range needs LOW < HIGH, got {args.intensity_range[0]} {args.intensity_range[1]}"
        )
    # Machine-dependent defaults are filled in here, so the README's generated flag table is the same on
    # every machine.
    if args.num_workers is None:
        args.num_workers = min(8, os.cpu_count() or 1)
    if args.cache_dir is None:
        args.cache_dir = default_cache_dir()
    return args


def select_device(name):
    """The torch device to run on; CUDA when available unless told otherwise."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise UserError(f"--device {name}: {error}") from None
    # torch.device accepts "cuda:7" on any machine; checking here makes a missing GPU one clear error
    # instead of a CUDA failure after the images are read.
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
        # TF32 would shift the features away from the reference fp32 numbers the tables report.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return device


def load_inputs(args):
    """Both image sets, subset and checked for the asked metrics, with per-class index pairs; each
    folder is scanned once (all of it, also under --max-samples) for its decoding rule."""
    # Subsets are drawn from the listing alone; no image is decoded until the counts are known to suffice,
    # overall and, with --per-class, in every class.
    found = {
        "real": open_image_set(args.real, "real", "REAL_IMAGES_DIR"),
        "gen": open_image_set(args.gen, "gen", "GEN_IMAGES_DIR"),
    }
    real, gen = (random_subset(found[side], args.max_samples, args.seed) for side in ("real", "gen"))
    check_counts(args.metrics, len(real), len(gen), args, "overall")
    classes = match_classes(real, gen) if args.per_class else {}
    for name, (real_index, gen_index) in classes.items():
        check_counts(args.metrics, len(real_index), len(gen_index), args, f"class {name}")
    # The rule comes from the whole folder, not the subset, so a pixel value means the same intensity
    # whichever images --max-samples draws.
    real.intensity, gen.intensity = decoding_rule(found["real"], args), decoding_rule(found["gen"], args)
    for title, chosen, place in (("Real:", real, args.real), ("Gen: ", gen, args.gen)):
        rule = images.describe(chosen.intensity)
        print(f"{title} {len(chosen)} of {chosen.total} images in {place} ({rule})", file=sys.stderr)
    return real, gen, classes


def networks_used(args):
    """The networks the asked metrics need, in report order (FRD needs none)."""
    return [n for n in dict.fromkeys(network_of(m, args) for m in args.metrics) if n]


def per_class_metrics(result, metrics, classes, real_features, gen_features, network, args):
    """Add each class's metrics (features sliced by class, no re-extraction) to result['per_class']."""
    # FID is biased upward at small sample counts (Chong & Forsyth 2020), so per-class values compare with
    # each other only at equal counts, and not with the overall value.
    for name, (real_index, gen_index) in classes.items():
        counts = {"real": len(real_index), "gen": len(gen_index)}
        entry = result["per_class"].setdefault(name, {"counts": counts, "metrics": {}, "failures": {}})
        real_part = {k: v[real_index] for k, v in real_features.items()}
        gen_part = {k: v[gen_index] for k, v in gen_features.items()}
        values, failures = compute_metrics(metrics, real_part, gen_part, network, args)
        entry["metrics"].update(values)
        entry["failures"].update(failures)


def evaluate(args, real, gen, classes, weights):
    """All asked metrics, network by network (each network loads its own weights file)."""
    result = {"metrics": {}, "failures": {}, "per_class": {}, "image_sizes": {}}
    log = {"extracted": {"real": {}, "gen": {}}}
    # One pass per network feeds every metric on its features (overall and per class): FID, sFID, KID, IS
    # and Inception precision/recall and density/coverage all come from one Inception pass. Each network's
    # real features are cached under their own key, since they depend on its weights file.
    for network in networks_used(args):
        metrics = [m for m in args.metrics if network_of(m, args) == network]
        extractor = build_extractor(network, weights[network], args.device)
        real_features, gen_features = features_of_both(
            real, gen, network, extractor, weights[network], args, log
        )
        values, failures = compute_metrics(metrics, real_features, gen_features, network, args)
        result["metrics"].update(values)
        result["failures"].update(failures)
        per_class_metrics(result, metrics, classes, real_features, gen_features, network, args)
        # Every network sees the same images, so the last network's size histogram stands for all.
        result["image_sizes"] = {
            "real": size_histogram(real_features["image_sizes"]),
            "gen": size_histogram(gen_features["image_sizes"]),
        }
    if "frd" in args.metrics:
        frd.evaluate(result, real, gen, classes, args)
    return result, log


def metric_protocol(metric, args, real, gen, weights, versions):
    """What one score depends on, written next to it: features, counts, seed, resize, precision, weights
    (with their sha256), library versions, and the sampling protocol given by --protocol."""
    network = network_of(metric, args)
    entry = {"counts": {"real": len(real), "gen": len(gen)}, "seed": args.seed}
    if network:
        entry["features"] = f"{NETWORKS[network]['extractor']}:{layer_for(metric, network)}"
        entry["resize"] = resize_protocol(network)
        entry["weights"] = {"path": weights[network]["path"], "sha256": weights[network]["sha256"]}
        # The networks run in float32 (TF32 off on CUDA); torch-fidelity fits the Gaussians in float64.
        entry["precision"] = "float32 network and features, float64 statistics and distances"
        entry["versions"] = versions
    else:
        entry.update(frd.protocol(args))
    entry["settings"] = {
        "pr": {"k": args.pr_k},
        "dc": {"k": args.pr_k},
        "kid": {"subset_size": args.kid_subset_size, "subsets": args.kid_subsets},
        "isc": {"splits": args.isc_splits},
    }.get(metric, {})
    entry["sampling"] = dict(args.protocol or [])
    return entry


def describe(args, real, gen, weights, log, seconds):
    """Everything but the metric values that a reader of the numbers needs to reproduce them."""
    used = networks_used(args)
    # The values move with the feature layer, resize, decoding, weights file and library versions, so these
    # go next to the numbers: two tables compare only when these agree.
    settings = {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()}
    versions = library_versions()
    return {
        "real": os.path.abspath(args.real),
        "gen": os.path.abspath(args.gen),
        "counts": {"real": len(real), "gen": len(gen), "real_total": real.total, "gen_total": gen.total},
        "features": {
            m: f"{NETWORKS[network_of(m, args)]['extractor']}:{layer_for(m, network_of(m, args))}"
            for m in args.metrics
            if network_of(m, args)
        },
        "protocol": {m: metric_protocol(m, args, real, gen, weights, versions) for m in args.metrics},
        "preprocessing": {
            "decoding": DECODING,
            "intensity": {"real": real.intensity, "gen": gen.intensity},
            "resize": {NETWORKS[n]["extractor"]: resize_protocol(n) for n in used},
        },
        "weights": {
            NETWORKS[n]["extractor"]: {**weights[n], "bytes": os.path.getsize(weights[n]["path"])}
            for n in used
        },
        "cache": {"enabled": not args.no_cache, "dir": args.cache_dir, "extracted": log["extracted"]},
        "settings": settings,
        "versions": versions,
        "seconds": seconds,
    }


def check_outputs(args):
    """Fail on an unwritable --json, --write-reference or cache folder before any image is read."""
    if args.json:
        ensure_writable_file(args.json, "--json")
    if args.write_reference:
        if not args.write_reference.lower().endswith(".npz"):
            raise UserError(f"--write-reference {args.write_reference}: the file name must end in .npz")
        ensure_writable_file(args.write_reference, "--write-reference")
    if not args.no_cache:
        ensure_writable_dir(args.cache_dir, "--cache-dir")


def reference_mode(args):
    """--write-reference: --real (subset by --max-samples) as an ADM reference batch; no --gen needed."""
    found = open_image_set(args.real, "real", "REAL_IMAGES_DIR")
    real = random_subset(found, args.max_samples, args.seed)
    if len(real) < 2:
        raise UserError(f"--write-reference needs at least 2 real images for a covariance, found {len(real)}")
    real.intensity = decoding_rule(found, args)
    print(f"Real: {len(real)} of {real.total} images in {args.real}", file=sys.stderr)
    weights = resolve_weights("inception", args.inception_weights)
    write_reference(args.write_reference, real, weights, args, {"extracted": {"real": {}, "gen": {}}})
    return 0


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    # Outputs and device are checked before any image is read, so a typo fails in a second, not after the
    # extraction.
    check_outputs(args)
    args.device = select_device(args.device)
    if args.write_reference:
        return reference_mode(args)
    if "frd" in args.metrics:
        frd.check_available()  # before any image is read: a missing package is one line, not a late failure
    titles = ", ".join(METRIC_TITLES[m] for m in args.metrics)
    print(
        f"Metrics {titles} on {args.device}, batch size {args.batch_size}, {args.num_workers} workers",
        file=sys.stderr,
    )
    real, gen, classes = load_inputs(args)
    if "frd" in args.metrics:
        frd.check_inputs(real, gen)
    # Weights only for the networks the asked metrics use, after the inputs, so bad input fails before
    # any download.
    weights = {n: resolve_weights(n, getattr(args, NETWORKS[n]["dest"])) for n in networks_used(args)}
    result, log = evaluate(args, real, gen, classes, weights)
    result.update(describe(args, real, gen, weights, log, time.perf_counter() - start))
    print_report(result, args.metrics, args)
    if args.json:
        write_json(args.json, result)
        print(f"Wrote {args.json}", file=sys.stderr)
    # Exit 1 when any metric failed, overall or in one class: a script must not take a partial report for
    # a full one.
    failed = bool(result["failures"]) or any(e["failures"] for e in result["per_class"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
