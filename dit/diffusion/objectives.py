"""The continuous-time objectives of core/sde.py in the DiT scripts: their flags, the checkpoint keys that
record them and the sampler a run uses."""

from core import cli, sde, sde_cli
from core.errors import UserError

# The run-config keys that fix what the network predicts and how it sees positions; a resumed run keeps
# them, and a checkpoint written before they existed means the values of OLD_RUN_DEFAULTS.
OBJECTIVE_KEYS = ("objective", "beta_min", "beta_max", "sigma_min", "sigma_max", "likelihood_weighting")
MODEL_KEYS = (*OBJECTIVE_KEYS, "learn_sigma", "pos_embed")
OLD_RUN_DEFAULTS = dict(objective="ddpm", likelihood_weighting=False, learn_sigma=True, pos_embed="sincos")
DDPM_STEPS = 250  # the published DiT sampler's respaced steps
STEPS_HELP = "sampling steps (unset: ddpm / ddim 250, pc 1000, euler 100, heun 50, dpm++ 20; rk45 adapts)"
LIKELIHOOD_HELP = "instead of sampling: bits/dim of the VAE latents of the images in DIR/<class_name>/"


def add_objective_flags(parser):
    """Training flags of the objective (core/sde_cli.py) and --config."""
    sde_cli.add_objective_flags(parser, ddpm_is="the published DiT")
    parser.add_argument("--config", metavar="FILE", help=cli.CONFIG_HELP + " (presets: configs/*.yaml)")


def add_sampler_flags(parser):
    sde_cli.add_sampler_flags(parser, LIKELIHOOD_HELP)


def model_keys(args):
    """The checkpoint-config keys of a new run, the objective's constants filled in (a bad combination,
    such as --beta-max with ddpm or --likelihood-weighting with flow, is a UserError)."""
    objective = sde.objective_of(vars(args))
    keys = dict.fromkeys(OBJECTIVE_KEYS)
    keys.update(objective=args.objective, likelihood_weighting=args.likelihood_weighting)
    if objective is not None:
        keys.update({k: v for k, v in objective.to_config().items() if k in keys})
    # Continuous objectives regress eps or the velocity only; the learned variance belongs to the DDPM.
    return {**keys, "learn_sigma": objective is None, "pos_embed": args.pos_embed}


def saved_keys(config):
    """A checkpoint config's model keys, with what older files (and official ones) mean."""
    return {key: {**OLD_RUN_DEFAULTS, **config}.get(key) for key in MODEL_KEYS}


def check_resume(saved_config, args, typed, path):
    """A flag typed on resume that contradicts the checkpoint's objective or embedding is a UserError."""
    for key, value in saved_keys(saved_config).items():
        if key in typed and getattr(args, key, value) != value:
            flag = "--" + key.replace("_", "-")
            typed_value = getattr(args, key)
            raise UserError(f"{path} was trained with {key}={value}, not {flag} {typed_value}: drop it")


def choose_sampler(args, saved, path):
    """The sampling plan of core/sde_cli.py (objective, method, steps, settings), checked before any model
    or VAE is loaded; a ddpm checkpoint's steps default to the published 250."""
    plan = sde_cli.sampling_plan(saved, args, args.num_inference_steps, path)
    if plan["objective"] is None:
        plan["steps"] = plan["steps"] or DDPM_STEPS
    return plan
