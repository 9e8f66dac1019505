"""A training run's configuration: flags merged with a resumed checkpoint's config, the run folders, the
data set scan and its held-out split."""

from pathlib import Path

import torch

from core import cli, images, sde
from core.files import clean_temporaries
from modules import check_architecture
from utils import (
    CHECKPOINT_FORMAT,
    UserError,
    load_checkpoint,
    pick_device,
    scan_dataset,
)

# Settings that fix the network and the noise schedule: a resumed run takes them from its checkpoint.
ARCH_KEYS = (
    "conditional",
    "image_size",
    "channels",
    "base_channels",
    "time_dim",
    "attn_resolutions",
    "num_classes",
    "noise_steps",
    "beta_start",
    "beta_end",
    # The continuous-time objective and its constants fix what the network predicts.
    "objective",
    "likelihood_weighting",
    "beta_min",
    "beta_max",
    "sigma_min",
    "sigma_max",
)


# What the objective keys mean in a checkpoint written before they existed: the discrete DDPM.
OLD_RUN_DEFAULTS = {"objective": "ddpm", "likelihood_weighting": False}


def saved_config(ckpt):
    """A checkpoint's run config, with the keys that older files lack filled in."""
    return {**OLD_RUN_DEFAULTS, **ckpt["config"]}


# Settings of one invocation that a resumed run does not inherit.
RUNTIME_KEYS = ("resume", "mode", "device", "overwrite", "max_steps", "max_minutes", "config")


OUTPUT_KINDS = ("models", "results", "runs")  # the folders of a run under --workdir


def resolve_config(args, explicit, checkpoint_format=CHECKPOINT_FORMAT, arch_keys=ARCH_KEYS):
    """The run's config dict and the checkpoint to resume from (or None).

    checkpoint_format and arch_keys are those of the trained network: a DDPM's, or train_classifier.py's.
    """
    config = vars(args).copy()
    # ddpm.py (unconditional) has no --num-classes or --cfg-dropout; both scripts get one config shape.
    config.setdefault("num_classes", None)
    config.setdefault("cfg_dropout", 0.0)
    if not args.resume:
        return config, None
    path = run_dir(config, "models") / "ckpt.pt" if args.resume == "auto" else Path(args.resume)
    if args.resume == "auto" and not path.is_file():
        raise UserError(
            f"--resume found no checkpoint at {path}: pass --resume <path> or the right --run-name"
        )
    ckpt = load_checkpoint(path, "--resume")
    # ema_ckpt.pt and bare weights lack the optimizer; other folders' files have another format.
    if "optimizer" not in ckpt or ckpt.get("format") != checkpoint_format:
        raise UserError(
            f"{path} cannot be resumed: it is not a training checkpoint (use models/<run>/ckpt.pt)"
        )
    # Untyped flags take the saved values; a typed one that changes the network is refused: weights won't fit.
    for key, value in saved_config(ckpt).items():
        if key in arch_keys and key in explicit and config[key] != value:
            raise UserError(
                f"{path} was trained with {key}={value}, not {config[key]}: drop that flag to resume"
            )
        if key not in explicit and key not in RUNTIME_KEYS:
            config[key] = value
    return config, ckpt


def run_dir(config, kind):
    """<workdir>/<kind>/<run_name>, kind being models, results or runs."""
    return Path(config["workdir"]) / kind / config["run_name"]


def validate(config, fresh):
    """Fail early, before touching any file, on settings that cannot work (single values: at parsing)."""
    pick_device(config["device"])  # an unavailable device fails now, before any data is read
    sde.objective_of(config)  # e.g. --beta-max with --objective ddpm, or --likelihood-weighting with flow
    if config["dataset_path"] is None:
        raise UserError("pass --data_root with the training images (--help shows the layout)")
    if fresh and (run_dir(config, "models") / "ckpt.pt").exists() and not config["overwrite"]:
        raise UserError(
            f"{run_dir(config, 'models')} already holds a run: pass --resume to continue it, "
            "another --run-name, or --overwrite"
        )


def model_config(config):
    """UNet constructor arguments for a training config."""
    return dict(
        c_in=config["channels"],
        c_out=config["channels"],
        time_dim=config["time_dim"],
        img_size=config["image_size"],
        base_channels=config["base_channels"],
        attn_resolutions=config["attn_resolutions"],
        num_classes=config["num_classes"],
    )


def load_data(config, ckpt):
    """List and check the images; fill in num_classes and class names."""
    try:
        check_architecture(config["image_size"], config["attn_resolutions"] or [])
    except ValueError as err:
        raise UserError(f"{err} (--image-size / --attn-resolutions)") from None
    files, labels, class_names = scan_dataset(config["dataset_path"], config["conditional"])
    if config["conditional"]:
        if config["num_classes"] not in (None, len(class_names)):
            raise UserError(
                f"{config['dataset_path']} has {len(class_names)} class folders but --num-classes is "
                f"{config['num_classes']}: pass --num-classes {len(class_names)} or leave it out"
            )
        config["num_classes"] = len(class_names)
        # Labels are indices into the sorted class folders: another folder set would silently relabel classes.
        if ckpt is not None and ckpt["class_names"] != class_names:
            raise UserError(
                f"the class folders of {config['dataset_path']} differ from the checkpoint's "
                f"{ckpt['class_names']}: resume with the data set it was trained on"
            )
    return files, labels, class_names


def prepare_outputs(config, kinds=OUTPUT_KINDS):
    """Prove the run folders writable before any work starts, and remove a killed run's temporaries.
    kinds: the folders the run writes (a classifier run writes no sample grids, so no results/)."""
    cli.ensure_writable_dir(config["workdir"], "--workdir")
    for kind in kinds:
        clean_temporaries(cli.ensure_writable_dir(run_dir(config, kind), f"run folder ({kind})"))


def scan_images(config, files, ckpt):
    """Decode every image once (a broken one fails now): fill in channels and the intensity rule."""
    found = images.scan(files, config["bit_depth"], config["intensity_range"])
    config["channels"] = config["channels"] or found["channels"]  # unset (None): the data's own depth
    config["intensity"] = found["intensity"]
    # Checkpoints from before the rule was stored resume with the scanned one, as nothing else is known.
    trained = (ckpt or {}).get("intensity", found["intensity"])
    if trained != found["intensity"]:
        raise UserError(
            f"{config['dataset_path']} scans as {images.describe(found['intensity'])}, but the checkpoint "
            f"was trained on {images.describe(trained)}: resume with the data it was trained on, "
            "or state the rule with --bit-depth / --intensity-range"
        )


def split_heldout(files, labels, fraction, seed):
    """Deterministic (train, held-out) split of the file list."""
    n_val = (
        min(max(1, round(len(files) * fraction)), len(files) - 1) if fraction > 0 and len(files) > 1 else 0
    )
    # Own seeded generator: the same split on every process and on resume, so held-out files never train.
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()

    def subset(indices):
        return [files[i] for i in sorted(indices)], [labels[i] for i in sorted(indices)]

    return subset(order[n_val:]), subset(order[:n_val])
