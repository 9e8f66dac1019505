"""In-training FID / KID: the Inception file path, the reference cache, and the scores' basic behaviour."""

import pytest
import torch

from core import cli, files, inception
from core.errors import UserError


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    files.atomic_save(inception.random_inception_state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def reference():
    # Smooth random images (upsampled noise) at 16 px in one channel: the small grayscale case.
    low = torch.rand(12, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    return torch.nn.functional.interpolate(low, size=16, mode="bilinear")


@pytest.fixture(scope="module")
def evaluator(weights, reference, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache") / "fid_reference.pt"
    return inception.TrainingEval(weights, "cpu", (["a.png"], reference.split(6)), str(cache), batch_size=6)


def test_identical_sets_score_zero_and_noise_raises_both_scores(evaluator, reference):
    same = evaluator.score(lambda n, first: reference[first : first + n], len(reference))
    assert abs(same["fid"]) < 1e-3 and abs(same["kid"]) < 1e-3
    noisy = evaluator.score(
        lambda n, first: reference[first : first + n] + 0.3 * torch.rand(n, 1, 16, 16), 12
    )
    assert noisy["fid"] > 1 + same["fid"] and noisy["kid"] > same["kid"]


def test_reference_features_are_cached_for_the_same_images_and_weights(evaluator, weights, tmp_path):
    cache = tmp_path / "fid_reference.pt"
    files.atomic_save({"identity": {"images": ["a.png"], "weights": None}, "features": torch.zeros(3)}, cache)
    first = inception.TrainingEval(weights, "cpu", (["a.png"], [torch.rand(2, 1, 16, 16)]), str(cache))
    assert first.reference.shape == (2, 2048)  # another identity: recomputed and rewritten

    def never():
        raise AssertionError("the cached reference was computed again")
        yield

    again = inception.TrainingEval(weights, "cpu", (["a.png"], never()), str(cache))
    assert torch.equal(again.reference, first.reference)


def test_missing_weights_offline_name_the_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(UserError, match="offline.*--eval_inception_weights PATH"):
        inception.weights_path(None)
    with pytest.raises(UserError, match="--eval_inception_weights .*no such file"):
        inception.weights_path(str(tmp_path / "missing.pth"))


def test_a_file_of_another_network_is_a_user_error(tmp_path):
    path = tmp_path / "other.pth"
    files.atomic_save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(UserError, match="does not hold torch-fidelity's Inception-v3 weights"):
        inception.load_inception(str(path), "cpu")


def test_flags_and_their_checks():
    parser = cli.Parser()
    inception.add_eval_flags(parser, dashed=True)
    args = parser.parse_args(["--eval-every", "2", "--best_by", "fid"])
    assert (args.eval_every, args.eval_samples, args.best_by) == (2, 1000, "fid")
    with pytest.raises(UserError, match="--best_by fid needs --eval_every"):
        inception.check_eval_flags(0, "fid", 10)
    with pytest.raises(UserError, match="at least 2 held-out images.*--val_fraction"):
        inception.check_eval_flags(1, "loss", 1)
    inception.check_eval_flags(1, "fid", 2)
