"""Download the official DiT-XL/2 checkpoints (EMA weights, ImageNet, 1000 classes) into pretrained_models/.

python download.py                 # both 256x256 and 512x512
python download.py --image-size 256
"""

import os
import socket

import torch

from core.cli import Parser, ensure_writable_dir
from core.errors import UserError, run_cli

BASE_URL = "https://dl.fbaipublicfiles.com/DiT/models/"
OFFICIAL_FILES = {256: "DiT-XL-2-256x256.pt", 512: "DiT-XL-2-512x512.pt"}
TIMEOUT_S = 30


def official_checkpoint(image_size, folder="pretrained_models"):
    """Local path of the official DiT-XL/2 file for this image size, downloading it if needed."""
    if image_size not in OFFICIAL_FILES:
        raise UserError(
            f"official DiT-XL/2 weights exist for image sizes 256 and 512, not {image_size}; pass --ckpt"
        )
    path = os.path.join(folder, OFFICIAL_FILES[image_size])
    if not os.path.isfile(path):
        fetch(BASE_URL + OFFICIAL_FILES[image_size], path)
    return path


def fetch(url, path):
    """Download url to path (atomically), or fail fast with where to put the file by hand."""
    by_hand = f"download {url} on a machine with internet and put it at {os.path.abspath(path)}"
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(f"offline (HF_HUB_OFFLINE=1), cannot fetch {url}: {by_hand}")
    ensure_writable_dir(os.path.dirname(path) or ".", "download folder")
    socket.setdefaulttimeout(TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(url, path, progress=True)
    except OSError as err:
        raise UserError(f"cannot download {url} ({err}): {by_hand}") from None


def build_parser():
    parser = Parser(description=__doc__)
    add, sizes = parser.add_argument, sorted(OFFICIAL_FILES)
    add("--image_size", type=int, nargs="+", default=sizes, choices=sizes, help="DiT-XL/2 files to fetch")
    add("--dir", default="pretrained_models", help="destination folder")
    return parser


def main():
    args = build_parser().parse_args()
    for size in args.image_size:
        print(f"DiT-XL/2 {size}x{size}: {official_checkpoint(size, args.dir)}")


if __name__ == "__main__":
    run_cli(main)
