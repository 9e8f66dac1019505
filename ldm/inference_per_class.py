"""Generate --total_samples images split evenly over all classes (e.g. for FID), resumably.

Writes <output_dir>/<class_name>/<index:06d>.png; files that already exist are skipped, so an
interrupted run continues where it stopped. Launched with several processes
(`accelerate launch --num_processes N inference_per_class.py ...` or `torchrun --nproc_per_node=N`)
the batches are shared out over them. --npz also writes samples_<N>x<H>x<W>x3.npz (arr_0 uint8 RGB
images, arr_1 labels) for evaluation tools.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402

from dataset import load_png  # noqa: E402
from inference import (  # noqa: E402
    LDMSampler,
    add_sampling_args,
    batches,
    check_sampling_args,
    free_path,
    image_path,
    missing_indices,
    write_images,
)
from utils import Parser, Timer, UserError, print_timing, run_main  # noqa: E402


def parse_args(argv=None):
    parser = Parser(description=__doc__)
    add_sampling_args(parser, default_output="./generated_per_class", default_seed=0)
    parser.add_argument(
        "--total_samples",
        type=int,
        default=8000,
        help="images over all classes, split evenly (default: %(default)s)",
    )
    parser.add_argument("--npz", action="store_true", help="also write an .npz of all images and labels")
    args = parser.parse_args(argv)
    check_sampling_args(args)
    if args.total_samples < 1:
        raise UserError(f"--total_samples must be at least 1 (got {args.total_samples})")
    return args


def per_class_counts(total, num_classes):
    """Even split; the first `total % num_classes` classes get one image more."""
    return [total // num_classes + (c < total % num_classes) for c in range(num_classes)]


def work_batches(class_names, counts, args):
    """(label, indices) batches of the images still missing, in a fixed order for every process."""
    work = []
    for label, (name, count) in enumerate(zip(class_names, counts, strict=True)):
        todo = missing_indices(args.output_dir, name, count, args.overwrite)
        work += [(label, chunk) for chunk in batches(todo, args.batch_size)]
    return work


def write_npz(output_dir, class_names, counts, overwrite):
    """All images of the run in class order, RGB (grayscale repeated) as the ADM evaluator expects."""
    images, labels = [], []
    for label, (name, count) in enumerate(zip(class_names, counts, strict=True)):
        images += [load_png(image_path(output_dir, name, i), 3) for i in range(count)]
        labels += [label] * count
    arr = np.stack(images)
    path = Path(output_dir) / f"samples_{'x'.join(str(s) for s in arr.shape)}.npz"
    path = path if overwrite else free_path(path)
    np.savez(path, arr_0=arr, arr_1=np.array(labels, dtype=np.int64))
    print(f"saved {path}")


def main():
    args = parse_args()
    state = PartialState(cpu=not torch.cuda.is_available())  # gloo for CPU multi-process launches
    sampler = LDMSampler(args, state.device)
    names = sampler.class_names
    counts = per_class_counts(args.total_samples, len(names))
    work = work_batches(names, counts, args)
    state.wait_for_everyone()  # every process saw the same missing files before any is written
    mine = work[state.process_index :: state.num_processes]
    if state.is_main_process:
        print(
            f"{len(names)} classes x {counts[0]} images | {sum(len(c) for _, c in work)} to generate in "
            f"{len(work)} batches over {state.num_processes} process(es)",
            flush=True,
        )
    timer = Timer(state.device)
    start = timer.now()
    for label, chunk in mine:
        write_images(args.output_dir, names[label], chunk, sampler.sample(label, chunk))
    made = sum(len(chunk) for _, chunk in mine)
    print_timing(
        made,
        args.num_inference_steps,
        len(mine),
        timer.now() - start,
        label=f"sampling, process {state.process_index}",
    )
    state.wait_for_everyone()
    if args.npz and state.is_main_process:
        write_npz(args.output_dir, names, counts, args.overwrite)


if __name__ == "__main__":
    run_main(main)
