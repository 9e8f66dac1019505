"""Every bad input ends with one clear line on stderr and exit code 2, leaving the user's files alone."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CLASSIFIER_TINY, TINY, make_class_folders, run_script
from modules import UNet_conditional

SAMPLE = ("ddpm_conditional_ddp.py", *"--mode sample --num-samples 2 --sampler ddim --steps 2".split())

# Inputs refused without any special file: case, command (see commands() below), its flags | the error's text.
REFUSED = """
default_path_conditional      conditional                           | /path/to/dataset is not a folder
default_path_unconditional    unconditional                         | /path/to/dataset is not a folder
wrong_num_classes             train --num-classes 10                | 3 class folders but --num-classes is 10
bad_image_size                train --image-size 20                 | image size 20 is not supported
bad_attention_resolution      train --attn-resolutions 5            | attention resolutions [5]
resume_with_other_image_size  resume --image-size 32                | image_size=16
train_mode_under_torchrun     ddp_train --env-world-size-2          | use --mode train_ddp
cuda_requested_without_gpu    train --device cuda                   | CUDA is not available
lr_negative                   train --lr -1                         | --lr: must be a number > 0, got -1
lr_negative_unconditional     unconditional --lr -1                 | --lr: must be a number > 0
lr_negative_ddp_script        ddp_train --lr -1                     | --lr: must be a number > 0
lr_nan                        train --lr nan                        | expected a finite number, got 'nan'
lr_not_a_number               train --lr fast                       | expected a number, got 'fast'
ema_decay_2                   train --ema-decay 2                   | ema_decay: must be a fraction in [0, 1)
betas_reversed                train --beta-start 0.9 --beta-end 0.1 | needs 0 < --beta-start < --beta-end < 1
beta_end_one                  train --beta-end 1                    | needs 0 < --beta-start < --beta-end < 1
num_workers_negative          train --num-workers -1                | --num_workers: must be an integer >= 0
epochs_zero                   train --epochs 0                      | --epochs: must be an integer >= 1, got 0
epochs_negative               train --epochs -3                     | epochs: must be an integer >= 1, got -3
batch_size_zero               train --batch-size 0                  | --batch_size: must be an integer >= 1
max_steps_negative            train --max-steps -3                  | --max_steps: must be an integer >= 1
val_split_one                 train --val-split 1                   | val_split: must be a fraction in [0, 1)
base_channels_odd             train --base-channels 7               | --base-channels must be even
bit_depth_zero                train --bit-depth 0                   | must be a bit depth from 1 to 32, got 0
intensity_range_reversed      train --intensity-range 1 0           | needs LOW < HIGH, got 1 0
intensity_range_nan           train --intensity_range 0 nan         | expected a finite number
resume_with_other_bit_depth   resume --bit-depth 16                 | was trained on 8-bit integer images
sample_without_ckpt           sample_only                           | pass --ckpt
unknown_class_name            sample --class-labels cat             | 'cat' is not in the checkpoint
class_index_out_of_range      sample --class-labels 3               | class index 3 is out of range
num_samples_zero              sample --num-samples 0                | --num_samples: must be an integer >= 1
conflicting_architecture_flag sample --num-classes 8                | num_classes=3
cfg_scale_nan                 sample --cfg-scale nan                | expected a finite number, got 'nan'
cfg_scale_inf                 sample --cfg-scale inf                | expected a finite number, got 'inf'
cfg_scale_negative            sample --cfg-scale -1                 | --cfg_scale: must be a number >= 0
eta_nan                       sample --eta nan                      | expected a finite number
steps_zero                    sample --steps 0                      | --steps: must be an integer >= 1, got 0
steps_above_noise_steps       sample --steps 5000                   | --steps must be between 1 and 1000
sample_batch_size_zero        sample --batch-size 0                 | must be an integer >= 1, got 0
use_ema_bad_value             sample --use-ema maybe                | expected true or false, got 'maybe'
no_ema_with_ema_ckpt          sample_ema --no-ema                   | holds only EMA weights
sample_with_other_bit_depth   sample --bit-depth 16                 | 8-bit integer images, values / 255: drop
bare_state_dict_without_flags bare                                  | pass --num-classes
bare_state_dict_wrong_flags   bare --num-classes 3 --image-size 16  | does not fit a UNet built from the flags
bare_state_dict_with_ema      bare --num-classes 3 --use-ema        | drop --use-ema
unknown_objective             train --objective edm                 | invalid choice: 'edm'
sde_constant_on_ddpm          train --beta-max 10                   | beta_max applies to --objective vp
flow_likelihood_weighting     train --objective flow --likelihood-weighting | not to flow
ve_sigmas_reversed            train --objective ve --sigma-min 5 --sigma-max 1 | need 0 < sigma_min <
resume_with_other_objective   resume --objective vp                 | trained with objective=ddpm, not vp
resume_vp_as_flow             vp_resume --objective flow            | trained with objective=vp, not flow
config_missing                train --config nowhere.yaml           | --config nowhere.yaml cannot be read
snr_zero                      vp_sample --snr 0                     | --snr: must be a number > 0, got 0
rtol_negative                 vp_sample --rtol -1                   | --rtol: must be a number > 0
corrector_steps_negative      vp_sample --corrector-steps -1        | must be an integer >= 0
ve_with_dpm_solver            ve_sample --sampler dpm++             | applies to vp and subvp, not ve
flow_with_pc                  flow_sample --sampler pc              | no SDE for the pc sampler
ddim_on_vp_checkpoint         vp_sample --sampler ddim              | vp-objective model, which samples
pc_with_too_few_steps         vp_sample --sampler pc --steps 10     | needs steps > beta_max = 20, got 10
dpm_solver_too_many_steps     vp_sample --sampler dpm++ --steps 2000 | at most N = 1000 steps
sde_sampler_on_ddpm           sample --sampler euler                | samples with ddpm or ddim: --sampler
likelihood_on_ddpm            sample --likelihood .                 | --likelihood needs a model trained with
likelihood_missing_folder     vp_sample --likelihood nowhere        | --likelihood nowhere is not a folder
classifier_scale_negative     guided --classifier-scale -1          | classifier_scale: must be a number >= 0
classifier_scale_alone        sample --classifier-scale 2           | --classifier-scale needs --classifier
classifier_without_diffusion  classifier_bare                       | pass --diffusion-checkpoint
classifier_depth_zero         classifier_train --depth 0            | --depth: must be an integer >= 1
classifier_resume_other_depth classifier_resume --depth 3           | trained with depth=1, not 3
best_by_fid_without_eval      train --best-by fid                   | --best_by fid needs --eval_every
eval_without_heldout          train --eval-every 1 --val-split 0    | needs at least 2 held-out images
eval_weights_missing          train --eval-every 1 --val-split .25 --eval-inception-weights x | no such file
eval_every_negative           train --eval-every -1                 | --eval_every: must be an integer >= 0
"""


def commands(root, trained_run, data, objective_runs, classifier_run):
    """The commands that REFUSED names, each the start of a command line."""
    models = trained_run / "models/tiny"
    train = ("ddpm_conditional.py", *TINY, "--dataset-path", data, "--num-classes", "3")
    classifier_bare = ("train_classifier.py", *CLASSIFIER_TINY, "--dataset-path", data)
    classifier_train = (*classifier_bare, "--diffusion-checkpoint", models / "ema_ckpt.pt")
    continuous = {
        f"{name}_sample": (*SAMPLE[:5], "--ckpt", run / "ckpt.pt") for name, run in objective_runs.items()
    }
    return {
        **continuous,
        "vp_resume": (*train, "--resume", objective_runs["vp"] / "ckpt.pt"),
        "conditional": ("ddpm_conditional.py",),
        "unconditional": ("ddpm.py",),
        "train": train,
        "resume": (*train, "--resume", models / "ckpt.pt"),
        "ddp_train": ("ddpm_conditional_ddp.py", "--mode", "train"),
        "sample_only": SAMPLE,
        "sample": (*SAMPLE, "--ckpt", models / "ckpt.pt"),
        "sample_ema": (*SAMPLE, "--ckpt", models / "ema_ckpt.pt"),
        "bare": (*SAMPLE, "--ckpt", root / "bare.pt"),
        "guided": (*SAMPLE, "--ckpt", models / "ckpt.pt", "--classifier", classifier_run / "ema_ckpt.pt"),
        "classifier_bare": classifier_bare,
        "classifier_train": classifier_train,
        "classifier_resume": (*classifier_train, "--resume", classifier_run / "ckpt.pt"),
    }


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, trained_run, objective_runs, classifier_run):
    """Build every broken input once; returns {case: (script and args, expected text)}."""
    root = tmp_path_factory.mktemp("bad")
    data = make_class_folders(root / "data", classes=3, per_class=2)
    model = UNet_conditional(c_in=1, c_out=1, num_classes=3, img_size=16, base_channels=8, time_dim=32)
    torch.save(model.state_dict(), root / "bare.pt")
    starts = commands(root, trained_run, data, objective_runs, classifier_run)
    cases = {}
    for line in REFUSED.strip().splitlines():
        spec, expected = (part.strip() for part in line.split("| "))
        name, command, *flags = spec.split()
        cases[name] = ((*starts[command], *flags), expected)
    return {
        **cases,
        **bad_files(root, trained_run, starts),
        **bad_classifiers(root, trained_run, classifier_run, starts),
    }


def bad_files(root, trained_run, starts):
    """Data sets, checkpoints and output paths that cannot be used, and files of other folders."""
    (root / "empty").mkdir()
    make_class_folders(root / "no_images", classes=2, per_class=2)
    for f in (root / "no_images" / "class_1").iterdir():
        f.unlink()
    flat = root / "flat"
    flat.mkdir()
    (flat / "a.png").write_bytes((trained_run / "results/tiny/final.png").read_bytes())
    broken = make_class_folders(root / "broken", classes=2, per_class=2)
    image = broken / "class_0" / "img_0.png"
    image.write_bytes(image.read_bytes()[:60])  # truncated PNG
    (root / "garbage.pt").write_bytes(b"not a checkpoint")
    other_folders_checkpoints(root)
    a_file = root / "a_file"
    a_file.write_text("not a folder")
    (root / "out_class_file" / "class_0").parent.mkdir()
    (root / "out_class_file" / "class_0").write_text("not a folder")
    (root / "samples.npz").mkdir()
    make_class_folders(root / "strangers", classes=1, per_class=1)
    (root / "strangers" / "class_0").rename(root / "strangers" / "stranger")
    floats = root / "floats" / "class_0"
    floats.mkdir(parents=True)
    Image.fromarray(np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16), "F").save(floats / "a.tif")
    untrained, train, sample = ("ddpm_conditional.py", *TINY), starts["train"], starts["sample"]
    run = (*train, "--run-name", "tiny", "--workdir", trained_run)
    cases = {
        "empty_folder": ((*untrained, "--dataset-path", root / "empty"), "has no class sub-folders"),
        "empty_folder_unconditional": (("ddpm.py", "--dataset-path", root / "empty"), "holds no images"),
        "images_but_no_class_folders": ((*untrained, "--dataset-path", flat), "has no class sub-folders"),
        "class_folder_without_images": (
            (*untrained, "--dataset-path", root / "no_images"),
            "holds no images",
        ),
        "truncated_image": ((*untrained, "--dataset-path", broken, "--num-classes", "2"), "img_0.png"),
        "bit_depth_for_float_images": (
            (*untrained, "--dataset-path", root / "floats", "--num-classes", "1", "--bit-depth", "16"),
            "--bit_depth applies to integer images",
        ),
        "run_exists_without_resume": (run, "already holds a run"),
        "resume_without_checkpoint": (
            (*train, "--resume", "--workdir", root),
            "--resume found no checkpoint",
        ),
        "resume_missing_file": (
            (*train, "--resume", root / "no.pt"),
            f"resume file {root / 'no.pt'} does not",
        ),
        "missing_ckpt": ((*SAMPLE, "--ckpt", root / "nope.pt"), "nope.pt does not exist"),
        "garbage_ckpt": ((*SAMPLE, "--ckpt", root / "garbage.pt"), "cannot load checkpoint"),
        "workdir_is_a_file": ((*train, "--workdir", a_file), "is a file, not a folder"),
        "workdir_under_a_file": ((*train, "--workdir", a_file / "work"), "is not writable"),
        "output_dir_is_a_file": ((*sample, "--output-dir", a_file), "is a file, not a folder"),
        "output_dir_under_a_file": ((*sample, "--output-dir", a_file / "s"), "is not writable"),
        "class_folder_is_a_file": (
            (*sample, "--output-dir", root / "out_class_file", "--class-labels", "0"),
            "out_class_file/class_0 is a file, not a folder",
        ),
        "npz_path_is_a_folder": (
            (*sample, "--output-dir", root / "samples", "--npz"),
            "samples.npz is a folder: pass a file path",
        ),
        "grid_path_inside_output_dir": (
            (*sample, "--output-dir", root / "s2", "--grid-path", root / "s2" / "grid.png"),
            "is inside --output-dir",
        ),
        "config_unknown_key": (
            (*train, "--config", write(root / "typo.yaml", "objectiv: vp\n")),
            "'objectiv' is not",
        ),
        "config_not_a_mapping": (
            (*train, "--config", write(root / "list.yaml", "- vp\n")),
            "must be a mapping",
        ),
        "likelihood_of_strangers": (
            (*starts["flow_sample"], "--likelihood", root / "strangers"),
            "class folder 'stranger' is not one of the checkpoint's classes",
        ),
        "grid_path_under_a_file": (
            (*sample, "--grid-path", a_file / "g.png"),
            f"cannot be written: {a_file} is a",
        ),
    }
    # A checkpoint of another folder is named as such, with the script that takes it.
    for name, flag, what, script in (
        ("ldm", "--resume", "an LDM checkpoint", "ldm/train.py --resume"),
        ("ldm", "--ckpt", "an LDM checkpoint", "ldm/inference.py"),
        ("controlnet", "--ckpt", "a ControlNet checkpoint", "controlnet/inference.py"),
        ("dit_official", "--ckpt", "a DiT checkpoint", "dit/sample.py"),
        ("dit_trained", "--ckpt", "a DiT checkpoint", "dit/sample.py"),
    ):
        command = (*train, "--resume") if flag == "--resume" else (*SAMPLE, "--ckpt")
        case = f"resume_{name}_checkpoint" if flag == "--resume" else f"{name}_checkpoint_to_sampler"
        cases[case] = ((*command, root / f"{name}.pt"), f"is {what}, not a DDPM one: use it with {script}")
    return cases


def bad_classifiers(root, trained_run, classifier_run, starts):
    """Classifiers that do not fit the DDPM, files that are no classifier, DDPMs a classifier cannot learn."""
    good = torch.load(classifier_run / "ema_ckpt.pt", weights_only=True)
    # The same classifier file claiming another image size, channel count or class set than the DDPM's.
    for name, change in (
        ("size32", {"config": {**good["config"], "image_size": 32}}),
        ("rgb", {"config": {**good["config"], "channels": 3}}),
        ("abc", {"class_names": ["a", "b", "c"]}),
    ):
        torch.save({**good, **change}, root / f"classifier_{name}.pt")
    classifier = classifier_run / "ema_ckpt.pt"
    guided = (*SAMPLE, "--ckpt", trained_run / "models/tiny/ckpt.pt", "--classifier")
    train = starts["classifier_bare"]
    return {
        "classifier_other_image_size": (
            (*guided, root / "classifier_size32.pt"),
            "trained with image_size=32",
        ),
        "classifier_other_channels": ((*guided, root / "classifier_rgb.pt"), "channels=3, but the diffusion"),
        "classifier_other_classes": (
            (*guided, root / "classifier_abc.pt"),
            "knows the classes ['a', 'b', 'c']",
        ),
        "classifier_missing": ((*guided, root / "no_classifier.pt"), "no_classifier.pt does not exist"),
        "classifier_is_a_ddpm": (
            (*guided, trained_run / "models/tiny/ckpt.pt"),
            "is not a classifier checkpoint",
        ),
        "classifier_garbage": ((*guided, root / "garbage.pt"), "cannot load checkpoint"),
        "classifier_of_ldm": ((*guided, root / "ldm.pt"), "is an LDM checkpoint"),
        "classifier_as_ckpt": ((*SAMPLE, "--ckpt", classifier), "is a classifier: pass it as --classifier"),
        "classifier_on_vp_model": (
            (*starts["vp_sample"], "--classifier", classifier),
            "classifier guidance is for the discrete DDPM",
        ),
        "diffusion_checkpoint_missing": (
            (*train, "--diffusion-checkpoint", root / "no_ddpm.pt"),
            "no_ddpm.pt does not exist",
        ),
        "diffusion_checkpoint_is_a_classifier": (
            (*train, "--diffusion-checkpoint", classifier),
            "is not a DDPM checkpoint written by training",
        ),
        "diffusion_checkpoint_of_vp": (
            (*train, "--diffusion-checkpoint", starts["vp_sample"][-1]),
            "vp-objective model",
        ),
        "classifier_data_of_other_classes": (
            (*starts["classifier_train"], "--dataset-path", root / "strangers"),
            "but the diffusion model's classes are",
        ),
    }


def write(path, text):
    path.write_text(text)
    return path


def other_folders_checkpoints(root):
    """Files with the keys that ldm/, controlnet/ and dit/train.py write, and an official DiT file."""
    weights = {"conv_in.weight": torch.zeros(2)}
    dit = {"x_embedder.proj.weight": torch.zeros(2), "t_embedder.mlp.0.weight": torch.zeros(2)}
    files = {
        "ldm.pt": {"model_type": "ldm", "unet": weights, "ema_unet": weights, "class_names": ["a"]},
        "controlnet.pt": {"model_type": "controlnet", "controlnet": weights, "class_names": ["a"]},
        "dit_official.pt": dit,
        "dit_trained.pt": {"model": dit, "ema": dit, "opt": {}, "args": {"model": "DiT-S/8"}},
    }
    for name, content in files.items():
        torch.save(content, root / name)


@pytest.fixture(scope="module")
def checkpoint_before(trained_run):
    """The bytes of the trained run's latest checkpoint before any bad input is tried."""
    return (trained_run / "models/tiny/ckpt.pt").read_bytes()


@pytest.fixture(scope="module")
def outcomes(bad_inputs, checkpoint_before, tmp_path_factory):
    """Run all cases, each as its own Python process."""
    work, results = tmp_path_factory.mktemp("bad_runs"), {}
    for name, (command, _) in bad_inputs.items():
        env = {"WORLD_SIZE": "2"} if "--env-world-size-2" in command else None
        results[name] = run_script(*[c for c in command if c != "--env-world-size-2"], cwd=work, env=env)
    return results


# Every case of bad_inputs, named here so that each is its own test.
CASES = """
default_path_conditional default_path_unconditional empty_folder empty_folder_unconditional
images_but_no_class_folders class_folder_without_images truncated_image wrong_num_classes
bad_image_size bad_attention_resolution run_exists_without_resume resume_without_checkpoint
resume_with_other_image_size train_mode_under_torchrun cuda_requested_without_gpu
sample_without_ckpt missing_ckpt garbage_ckpt unknown_class_name class_index_out_of_range
num_samples_zero conflicting_architecture_flag bare_state_dict_without_flags
bare_state_dict_wrong_flags bare_state_dict_with_ema lr_negative lr_negative_unconditional
lr_negative_ddp_script lr_nan lr_not_a_number ema_decay_2 betas_reversed beta_end_one
num_workers_negative epochs_zero epochs_negative batch_size_zero max_steps_negative val_split_one
base_channels_odd bit_depth_zero intensity_range_reversed intensity_range_nan
bit_depth_for_float_images resume_missing_file resume_with_other_bit_depth resume_ldm_checkpoint
workdir_is_a_file workdir_under_a_file cfg_scale_nan cfg_scale_inf cfg_scale_negative eta_nan
steps_zero steps_above_noise_steps sample_batch_size_zero use_ema_bad_value no_ema_with_ema_ckpt
sample_with_other_bit_depth output_dir_is_a_file output_dir_under_a_file class_folder_is_a_file
npz_path_is_a_folder grid_path_inside_output_dir grid_path_under_a_file ldm_checkpoint_to_sampler
controlnet_checkpoint_to_sampler dit_official_checkpoint_to_sampler
dit_trained_checkpoint_to_sampler unknown_objective sde_constant_on_ddpm flow_likelihood_weighting
ve_sigmas_reversed resume_with_other_objective resume_vp_as_flow config_missing snr_zero rtol_negative
corrector_steps_negative ve_with_dpm_solver flow_with_pc ddim_on_vp_checkpoint pc_with_too_few_steps
dpm_solver_too_many_steps sde_sampler_on_ddpm likelihood_on_ddpm likelihood_missing_folder
config_unknown_key config_not_a_mapping likelihood_of_strangers
classifier_scale_negative classifier_scale_alone classifier_without_diffusion classifier_depth_zero
classifier_resume_other_depth classifier_other_image_size classifier_other_channels classifier_other_classes
classifier_missing classifier_is_a_ddpm classifier_garbage classifier_of_ldm classifier_as_ckpt
classifier_on_vp_model diffusion_checkpoint_missing diffusion_checkpoint_is_a_classifier
diffusion_checkpoint_of_vp classifier_data_of_other_classes
best_by_fid_without_eval eval_without_heldout eval_weights_missing eval_every_negative
""".split()


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_clear_line_and_exit_code_2(case, bad_inputs, outcomes):
    result, expected = outcomes[case], bad_inputs[case][1]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[-1].startswith("error: ") and expected in lines[-1], lines
    assert sum(line.startswith("error: ") for line in lines) == 1


def test_every_case_is_checked(bad_inputs):
    assert sorted(CASES) == sorted(bad_inputs)


def test_failed_run_leaves_the_existing_checkpoint_untouched(trained_run, outcomes, checkpoint_before):
    assert outcomes["run_exists_without_resume"].returncode == 2
    assert (trained_run / "models/tiny/ckpt.pt").read_bytes() == checkpoint_before


def test_bare_state_dict_samples_with_the_right_flags(tmp_path):
    model = UNet_conditional(c_in=1, c_out=1, num_classes=3, img_size=16, base_channels=8, time_dim=32)
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    flags = "--num-classes 3 --image-size 16 --channels 1 --base-channels 8 --time-dim 32".split()
    result = run_script(
        *SAMPLE, "--ckpt", tmp_path / "bare.pt", *flags, "--output-dir", tmp_path / "s", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.parent.name for p in (tmp_path / "s").rglob("*.png")) == ["0", "1"]
