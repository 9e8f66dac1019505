"""The command-line layer of the continuous-time objectives: the sampling plan and --likelihood's summary."""

import math
from types import SimpleNamespace

import pytest
import torch

from core import cli, sde_cli
from core.errors import UserError


def flags(*argv):
    parser = cli.Parser()
    sde_cli.add_sampler_flags(parser, "bits/dim")
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    "objective,argv,method,steps",
    [("vp", [], "pc", 1000), ("flow", [], "euler", 100), ("ve", ["--sampler", "heun"], "heun", 50),
     ("subvp", ["--sampler", "dpm++"], "dpm++", 20), ("vp", ["--sampler", "ode"], "ode", None)],
)  # fmt: skip
def test_plan_defaults_follow_the_checkpoint_s_objective(objective, argv, method, steps):
    plan = sde_cli.sampling_plan({"objective": objective}, flags(*argv), None, "x.pt")
    assert (plan["objective"].name, plan["method"], plan["steps"]) == (objective, method, steps)
    assert (plan["snr"], plan["corrector_steps"], plan["predictor"]) == (0.16, 1, "reverse_diffusion")


def test_a_ddpm_plan_keeps_the_typed_steps():
    plan = sde_cli.sampling_plan({"objective": "ddpm"}, flags("--sampler", "ddim"), 7, "x.pt")
    assert plan == {"objective": None, "method": "ddim", "steps": 7}


@pytest.mark.parametrize(
    "objective,argv,message",
    [("ddpm", ["--sampler", "pc"], "needs a model trained with --objective"),
     ("ddpm", ["--likelihood", "data"], "--likelihood needs"),
     ("vp", ["--sampler", "ddim"], "samples with pc, euler, heun, rk45 or dpm++, not --sampler ddim"),
     ("flow", ["--sampler", "ddpm"], "samples with euler, heun or rk45"),
     ("ve", ["--sampler", "dpm++"], "dpm++")],
)  # fmt: skip
def test_samplers_that_do_not_apply_are_user_errors(objective, argv, message):
    with pytest.raises(UserError, match=message.replace("+", r"\+")):
        sde_cli.sampling_plan({"objective": objective}, flags(*argv), None, "x.pt")


def test_objective_flags_take_both_spellings_and_leave_constants_unset():
    parser = cli.Parser()
    sde_cli.add_objective_flags(parser)
    args = parser.parse_args(["--objective", "vp", "--beta-max", "5"])
    assert (args.beta_min, args.beta_max, args.sigma_max) == (None, 5.0, None)
    assert not args.likelihood_weighting
    assert parser.parse_args(["--beta_max", "5"]).beta_max == 5.0
    with pytest.raises(SystemExit):
        parser.parse_args(["--objective", "vpp"])


class Shard(SimpleNamespace):
    """One process of a world of `num_processes`, each holding only its own sums (no reduction)."""

    device = torch.device("cpu")

    def reduce(self, tensor, reduction):
        return tensor


@pytest.mark.parametrize("batch_size", [1, 3])
def test_likelihood_splits_items_over_processes_and_reports_the_mean_and_its_error(monkeypatch, batch_size):
    values = torch.arange(10, dtype=torch.float64) / 3
    seen = []

    def score(indices, generator):
        seen.append(list(indices))
        assert isinstance(generator, torch.Generator)
        return values[indices]

    # Two "processes": the shares are strided and disjoint; summing their sums is what the reduction does.
    shares = []
    monkeypatch.setattr(sde_cli.training, "sum_across", lambda accelerator, *v: shares.append(v) or list(v))
    for rank in range(2):
        sde_cli.likelihood(Shard(process_index=rank, num_processes=2), 10, batch_size, 0, score)
    assert sorted(i for batch in seen for i in batch) == list(range(10))
    assert all(i % 2 == seen[0][0] % 2 for i in seen[0])
    total, squares, count = (sum(column) for column in zip(*shares, strict=True))
    monkeypatch.setattr(sde_cli.training, "sum_across", lambda accelerator, *v: [total, squares, count])
    mean, error, n = sde_cli.likelihood(Shard(process_index=0, num_processes=2), 10, batch_size, 0, score)
    assert n == 10 and math.isclose(mean, values.mean().item())
    assert math.isclose(error, values.std(unbiased=False).item() / math.sqrt(9), rel_tol=1e-9)


def test_each_batch_is_seeded_by_its_first_item():
    draws = {}

    def score(indices, generator):
        draws[indices[0]] = torch.rand(1, generator=generator).item()
        return torch.zeros(len(indices))

    one = Shard(process_index=0, num_processes=1)
    sde_cli.likelihood(one, 4, 1, 5, score)
    alone = dict(draws)
    draws.clear()
    for rank in range(2):  # the same items on two processes draw the same noise
        sde_cli.likelihood(Shard(process_index=rank, num_processes=2), 4, 1, 5, score)
    assert draws == alone
