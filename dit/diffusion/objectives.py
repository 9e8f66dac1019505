"""The continuous-time objectives of core/sde.py in the DiT scripts: their flags, the checkpoint keys that
record them and the sampler a run uses."""

from core import cli, sde, sde_sampling
from core.errors import UserError

# The run-config keys that fix what the network predicts and how it sees positions; a resumed run keeps
# them, and a checkpoint written before they existed means the values of OLD_RUN_DEFAULTS.
OBJECTIVE_KEYS = ("objective", "beta_min", "beta_max", "sigma_min", "sigma_max", "likelihood_weighting")
MODEL_KEYS = (*OBJECTIVE_KEYS, "learn_sigma", "pos_embed")
OLD_RUN_DEFAULTS = dict(objective="ddpm", likelihood_weighting=False, learn_sigma=True, pos_embed="sincos")
DISCRETE_SAMPLERS = ("ddpm", "ddim")
SAMPLERS = (*DISCRETE_SAMPLERS, *sde_sampling.METHODS)
DDPM_STEPS = 250  # the published DiT sampler's respaced steps

OBJECTIVE_HELP = "ddpm (discrete, the published DiT), vp / subvp / ve SDEs, or flow (rectified flow)"
LW_HELP = "weight the vp / subvp / ve loss by g(t)^2, a bound on the likelihood (Song et al. 2021)"
SAMPLER_HELP = "ddpm / ddim for ddpm checkpoints; pc, euler, heun, rk45 (= ode), dpm++ for the others"
STEPS_HELP = "sampling steps (unset: ddpm / ddim 250, pc 1000, euler 100, heun 50, dpm++ 20; rk45 adapts)"
LIKELIHOOD_HELP = "instead of sampling: bits/dim of the VAE latents of the images in DIR/<class_name>/"


def add_objective_flags(parser):
    """Training flags of the objective (its constants unset: score_sde's) and --config."""
    add = parser.add_argument
    add("--objective", default="ddpm", choices=sde.OBJECTIVES, help=OBJECTIVE_HELP)
    add("--beta_min", type=cli.positive_float, help="vp / subvp: beta(0) (unset: 0.1)")
    add("--beta_max", type=cli.positive_float, help="vp / subvp: beta(1) (unset: 20)")
    add("--sigma_min", type=cli.positive_float, help="ve: smallest noise level (unset: 0.01)")
    add("--sigma_max", type=cli.positive_float, help="ve: largest noise level (unset: 50)")
    add("--likelihood_weighting", action="store_true", help=LW_HELP)
    add("--config", metavar="FILE", help=cli.CONFIG_HELP + " (presets: configs/*.yaml)")


def add_sampler_flags(parser):
    """Sampling flags: the sampler and the continuous-time samplers' settings (score_sde's defaults)."""
    add = parser.add_argument
    add("--sampler", choices=SAMPLERS, help=SAMPLER_HELP + " (unset: ddpm; pc for SDEs; euler for flow)")
    add("--predictor", default="reverse_diffusion", choices=sde_sampling.PREDICTORS, help="pc: predictor")
    add("--snr", type=cli.positive_float, default=0.16, help="pc: signal-to-noise ratio of Langevin steps")
    add("--corrector_steps", type=cli.nonnegative_int, default=1, help="pc: Langevin steps per step, 0: none")
    add("--rtol", type=cli.positive_float, default=1e-5, help="rk45 and --likelihood: relative tolerance")
    add("--atol", type=cli.positive_float, default=1e-5, help="rk45 and --likelihood: absolute tolerance")
    add("--likelihood", metavar="DIR", help=LIKELIHOOD_HELP)


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
    """{"objective" (None: the DDPM), "method", "steps"} of a sampling run, checked before any model or VAE
    is loaded: a sampler (or --likelihood) that does not apply to the checkpoint is a UserError."""
    objective = sde.objective_of(saved)
    steps = args.num_inference_steps
    if objective is None:
        if args.sampler not in (None, *DISCRETE_SAMPLERS) or args.likelihood:
            wanted = "--likelihood" if args.likelihood else f"--sampler {args.sampler}"
            raise UserError(
                f"{path} is a ddpm-objective model, which samples with ddpm or ddim: {wanted} needs a "
                "model trained with --objective vp, subvp, ve or flow"
            )
        return {"objective": None, "method": args.sampler or "ddpm", "steps": steps or DDPM_STEPS}
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


def sample_latents(model_fn, plan, shape, y, generator, device):
    """(latents, NFE) of one batch from a continuous-time model; model_fn is already guided, so the
    sampler runs it at scale 1 (its two halves are one batch: one evaluation)."""
    options = {k: plan[k] for k in ("predictor", "snr", "corrector_steps", "rtol", "atol")}
    return sde_sampling.sample(
        model_fn, plan["objective"], shape, plan["steps"], plan["method"], y=y, generator=generator,
        device=device, **options,
    )  # fmt: skip
