"""The command-line side of the continuous-time objectives (sde.py, sde_sampling.py), shared by the pixel
UNet (ddpm/) and the DiT (dit/): their flags, the sampler a checkpoint allows and the --likelihood summary.

core.cli.Parser accepts both spellings of every flag (`--beta-max` and `--beta_max`); `dashed` picks the one
that help and the flag tables show first, the folder's own convention.
"""

import math

import torch

from . import cli, sde, sde_sampling, training
from .errors import UserError

DISCRETE_SAMPLERS = ("ddpm", "ddim")  # the DDPM objective's samplers, which each folder keeps as its own
SAMPLERS = (*DISCRETE_SAMPLERS, *sde_sampling.METHODS)

OBJECTIVE_HELP = "ddpm (discrete, {}), vp / subvp / ve SDEs, or flow (rectified flow)"
LW_HELP = "weight the vp / subvp / ve loss by g(t)^2, a bound on the likelihood (Song et al. 2021)"
SAMPLER_HELP = (
    "ddpm / ddim for ddpm models; pc, euler, heun, rk45 (= ode), dpm++ for the others "
    "(unset: ddpm; pc for SDEs; euler for flow)"
)


def _adder(parser, dashed):
    def add(name, **kwargs):
        return parser.add_argument("--" + (name[2:].replace("_", "-") if dashed else name[2:]), **kwargs)

    return add


def add_objective_flags(parser, ddpm_is="the original", dashed=False):
    """Training flags of the objective; the constants stay unset (None) so that score_sde's defaults apply
    and a constant typed for the wrong objective can be refused."""
    add = _adder(parser, dashed)
    add("--objective", default="ddpm", choices=sde.OBJECTIVES, help=OBJECTIVE_HELP.format(ddpm_is))
    add("--beta_min", type=cli.positive_float, metavar="BETA", help="vp / subvp: beta(0) (unset: 0.1)")
    add("--beta_max", type=cli.positive_float, metavar="BETA", help="vp / subvp: beta(1) (unset: 20)")
    add("--sigma_min", type=cli.positive_float, metavar="SIGMA", help="ve: lowest noise level (unset: 0.01)")
    add("--sigma_max", type=cli.positive_float, metavar="SIGMA", help="ve: largest noise level (unset: 50)")
    add("--likelihood_weighting", action="store_true", help=LW_HELP)


def add_sampler_flags(parser, likelihood_help, dashed=False):
    """--sampler, the continuous-time samplers' settings (score_sde's defaults) and --likelihood; the step
    count keeps each folder's own flag name."""
    add = _adder(parser, dashed)
    add("--sampler", choices=SAMPLERS, help=SAMPLER_HELP)
    add("--predictor", default="reverse_diffusion", choices=sde_sampling.PREDICTORS, help="pc: predictor")
    add("--snr", type=cli.positive_float, default=0.16, help="pc: signal-to-noise ratio of Langevin steps")
    add("--corrector_steps", type=cli.nonnegative_int, default=1, help="pc: Langevin steps per step, 0: none")
    add("--rtol", type=cli.positive_float, default=1e-5, help="rk45 and --likelihood: relative tolerance")
    add("--atol", type=cli.positive_float, default=1e-5, help="rk45 and --likelihood: absolute tolerance")
    add("--likelihood", metavar="DIR", help=likelihood_help)


def sampling_plan(config, args, steps, path):
    """{"objective" (None: the discrete DDPM), "method", "steps", and the continuous samplers' settings} of
    a sampling run, from the checkpoint's config and the typed flags, checked before any model is built: a
    sampler (or --likelihood) that does not apply to the checkpoint's objective is a UserError. A DDPM plan
    keeps steps as typed (None: the folder's default)."""
    objective = sde.objective_of(config)
    if objective is None:
        if args.sampler not in (None, *DISCRETE_SAMPLERS) or args.likelihood:
            wanted = "--likelihood" if args.likelihood else f"--sampler {args.sampler}"
            raise UserError(
                f"{path} is a ddpm-objective model, which samples with ddpm or ddim: {wanted} needs a "
                "model trained with --objective vp, subvp, ve or flow"
            )
        return {"objective": None, "method": args.sampler or "ddpm", "steps": steps}
    if args.sampler in DISCRETE_SAMPLERS:
        methods = "euler, heun or rk45" if objective.is_flow else "pc, euler, heun, rk45 or dpm++"
        raise UserError(
            f"{path} is a {objective.name}-objective model, which samples with {methods}, "
            f"not --sampler {args.sampler}"
        )
    method, steps = sde_sampling.resolve_sampler(objective, args.sampler, steps)
    settings = dict(predictor=args.predictor, snr=args.snr, corrector_steps=args.corrector_steps)
    settings.update(rtol=args.rtol, atol=args.atol)
    sde_sampling.check_sampler(objective, method, steps, **settings)
    return {"objective": objective, "method": method, "steps": steps, **settings}


def sample_with_plan(model_fn, plan, shape, **kwargs):
    """(samples, NFE) of one batch under a continuous plan; kwargs as sde_sampling.sample's (y, generator,
    device, and null_y / cfg_scale unless model_fn is already guided)."""
    options = {key: plan[key] for key in ("predictor", "snr", "corrector_steps", "rtol", "atol")}
    return sde_sampling.sample(
        model_fn, plan["objective"], shape, plan["steps"], plan["method"], **options, **kwargs
    )


def likelihood(accelerator, count, batch_size, seed, score_batch):
    """(mean bits/dim, its standard error, count) over `count` items split over the processes in strides.

    score_batch(indices, generator) returns the bits/dim of those items. Each batch's generator is seeded
    by its first item, so with batch size 1 no figure depends on the number of processes."""
    indices = list(range(count))[accelerator.process_index :: accelerator.num_processes]
    total = squares = 0.0
    for first in range(0, len(indices), batch_size):
        chunk = indices[first : first + batch_size]
        bpd = score_batch(chunk, torch.Generator().manual_seed(seed * 1_000_003 + chunk[0]))
        total, squares = total + bpd.sum().item(), squares + bpd.pow(2).sum().item()
    total, squares, count = training.sum_across(accelerator, total, squares, len(indices))
    mean = total / count
    # Standard error of the mean over images (the estimator's own noise is part of each image's value).
    spread = math.sqrt(max(squares / count - mean**2, 0.0) / max(count - 1, 1))
    return mean, spread, int(count)
