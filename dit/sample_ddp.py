"""Sample many images over several processes for FID (torchrun or accelerate launch; gloo on CPU).

Exactly --num-fid-samples images, spread evenly over the classes, go to
OUTPUT/<class_name>/<index:06d>.png and into OUTPUT.npz (arr_0 uint8 NxHxWx3, arr_1 labels) for the
ADM evaluator. Batches are numbered globally and seeded by their number, so the images do not depend
on the number of processes, and a rerun only generates the missing ones.

    torchrun --nnodes=1 --nproc_per_node=N sample_ddp.py --ckpt CKPT --num-fid-samples 50000 --cfg-scale 1.5
"""

import sample
from core.errors import run_cli


def build_parser():
    return sample.build_parser(ddp=True)


if __name__ == "__main__":
    run_cli(lambda: sample.main(ddp=True))
