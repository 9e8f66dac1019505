"""Generate --total_samples images split evenly over all classes (e.g. for FID), resumably.

Writes <output_dir>/<class_name>/<index:06d>.png at the training data's bit depth (16-bit PNG for
data deeper than 8 bits, .tif for float data); complete files that already exist are skipped, so an
interrupted run continues where it stopped. Launched with several processes
(`accelerate launch --num_processes N inference_per_class.py ...` or `torchrun --nproc_per_node=N`)
the batches are shared out over them. --npz also writes <output_dir>_<N>x<H>x<W>x3.npz beside the
sample tree (arr_0 uint8 RGB images, arr_1 labels, class_names) for evaluation tools. --classifier
adds classifier guidance by a latent classifier of train_classifier.py, as in inference.py.
"""

from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState

from core import cli, files, images, training
from core.errors import run_cli
from inference import (
    LDMSampler,
    add_sampling_args,
    batches,
    beside,
    clean_sample_tree,
    free_path,
    image_path,
    missing_indices,
    write_images,
)
from models import load_checkpoint


def build_parser():
    parser = cli.Parser(description=__doc__)
    add_sampling_args(parser, default_output="./generated_per_class", default_seed=0)
    add = parser.add_argument
    add("--total_samples", type=cli.positive_int, default=8000, help="images over all classes, split evenly")
    add("--npz", action="store_true", help="also write <output_dir>_<N>x<H>x<W>x3.npz (images, labels)")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def per_class_counts(total, num_classes):
    """Even split; the first `total % num_classes` classes get one image more."""
    # So the counts always add up to --total_samples, and a rerun with the same flags asks for the same.
    return [total // num_classes + (c < total % num_classes) for c in range(num_classes)]


def work_batches(class_names, counts, intensity, args):
    """(label, indices) batches of the images still missing, in a fixed order for every process."""
    # Every process builds this same list and takes every N-th batch of it: no two processes ever write
    # the same file, and no list has to be sent between them.
    work = []
    for label, (name, count) in enumerate(zip(class_names, counts, strict=True)):
        todo = missing_indices(args.output_dir, name, count, intensity, args.overwrite)
        work += [(label, chunk) for chunk in batches(todo, args.batch_size)]
    return work


def npz_destination(output_dir, total, image_size, overwrite):
    """<output_dir>_<N>x<H>x<W>x3.npz beside the sample tree (numbered unless --overwrite), checked early."""
    # The ADM evaluator's naming (N x H x W x 3), beside the tree so that the images are not counted twice.
    path = beside(output_dir, f"_{total}x{image_size}x{image_size}x3.npz")
    return cli.ensure_writable_file(path if overwrite else free_path(path), "--npz")


def write_npz(path, output_dir, class_names, counts, intensity):
    """All images of the run in class order, RGB uint8 (grayscale repeated) as the ADM evaluator expects,
    with the class names, so that labels are mapped by name rather than by position."""
    # Read back from the files rather than kept from sampling: images of an earlier, interrupted run
    # are included, and memory holds one copy only at the end.
    pixels, labels = [], []
    for label, (name, count) in enumerate(zip(class_names, counts, strict=True)):
        for i in range(count):
            sample = images.load(image_path(output_dir, name, i, intensity), intensity, 3)
            pixels.append(images.to_uint8_rgb(sample[None])[0])  # (H, W, 3)
        labels += [label] * count
    arrays = {
        "arr_0": np.stack(pixels),
        "arr_1": np.array(labels, dtype=np.int64),
        "class_names": np.array(class_names, dtype=str),
    }

    def write(tmp):
        with open(tmp, "wb") as handle:  # a file handle, so numpy adds no second .npz suffix
            np.savez(handle, **arrays)

    files.atomic_write(path, write)
    print(f"saved {path}")


def main():
    # The checkpoint and both destinations are checked before the model loads or any process samples.
    args = parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    cli.ensure_writable_dir(args.output_dir, "--output_dir")
    size = ckpt["config"]["image_size"]
    npz_path = (
        npz_destination(args.output_dir, args.total_samples, size, args.overwrite) if args.npz else None
    )
    state = PartialState(cpu=not torch.cuda.is_available())  # gloo for CPU multi-process launches
    sampler = LDMSampler(ckpt, args, state.device)
    names, rule = sampler.class_names, sampler.intensity
    # One process removes what a killed run left half-written; the others only read the folders.
    if state.is_main_process:
        clean_sample_tree(args.output_dir, names)
    counts = per_class_counts(args.total_samples, len(names))
    work = work_batches(names, counts, rule, args)
    state.wait_for_everyone()  # every process saw the same missing files before any is written
    mine = work[state.process_index :: state.num_processes]
    if state.is_main_process:
        print(
            f"{len(names)} classes x {counts[0]} images | {sum(len(c) for _, c in work)} to generate in "
            f"{len(work)} batches over {state.num_processes} process(es) | {images.describe(rule)}",
            flush=True,
        )
    # Each process times its own share: on a shared machine their speeds can differ.
    timer = training.Timer(state.device)
    for label, chunk in mine:
        write_images(args.output_dir, names[label], chunk, sampler.sample(label, chunk), rule)
    made = sum(len(chunk) for _, chunk in mine)
    line = training.timing_line(
        made, args.num_inference_steps, len(mine), timer.elapsed(), f"sampling, process {state.process_index}"
    )
    print(line, flush=True)
    # The .npz waits for every process: it reads all the images back.
    state.wait_for_everyone()
    if npz_path is not None and state.is_main_process:
        write_npz(Path(npz_path), args.output_dir, names, counts, rule)


if __name__ == "__main__":
    run_cli(main)
