"""Score generated digits: the share a classifier of the real 8x8 digits recognises as the digit asked for.

The classifier (an RBF support-vector machine) learns from three quarters of scikit-learn's 8x8 digits and
reports its accuracy on the other quarter, a sanity figure for the score. Generated images are brought back
to the 8x8, 0..16 features the way build_digits mapped the real digits up (area downsampling, see
build_digits.digit_features), so a sample counts as recognised when it reads as its digit at 8x8. Blank or
noisy images all land in one or two classes, so they score about chance (10%); a grey background is not
forgiven (it shifts every feature).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from build_digits import digit_features

HELDOUT_FRACTION = 0.25


def heldout_split(labels, seed=0):
    """Indices of the training and held-out digits: a stratified split, the same for the same seed."""
    from sklearn.model_selection import train_test_split

    return train_test_split(
        np.arange(len(labels)), test_size=HELDOUT_FRACTION, stratify=labels, random_state=seed
    )


def train_classifier(seed=0):
    """The fitted classifier and its accuracy on the held-out real digits (takes well under a second)."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    train, heldout = heldout_split(digits.target, seed)
    classifier = SVC(gamma=0.001).fit(digits.data[train], digits.target[train])
    return classifier, classifier.score(digits.data[heldout], digits.target[heldout])


def load_samples(folder):
    """The images of the class folders 0..9 under folder: uint8 (N, H, W) and the digit each was asked for."""
    images, labels = [], []
    for class_dir in sorted(Path(folder).iterdir()):
        if not (class_dir.is_dir() and class_dir.name.isdigit()):
            continue
        for path in sorted(p for p in class_dir.iterdir() if p.is_file()):
            with Image.open(path) as img:
                images.append(np.asarray(img.convert("L")))  # the demo's data, so its samples, are 8-bit
            labels.append(int(class_dir.name))
    if not images:
        raise FileNotFoundError(f"no samples in class folders 0..9 under {folder}")
    return np.stack(images), np.array(labels)


def recognition(classifier, images, labels):
    """Share of images recognised as their label, and {digit: (recognised, total)}."""
    hits = classifier.predict(digit_features(images)) == labels
    per_class = {int(d): (int(hits[labels == d].sum()), int((labels == d).sum())) for d in np.unique(labels)}
    return float(hits.mean()), per_class


def describe(share, per_class, classifier_accuracy):
    """The report: overall share, per digit, and the classifier's own accuracy on real digits."""
    total = sum(n for _, n in per_class.values())
    recognised = sum(hit for hit, _ in per_class.values())
    digits = ", ".join(f"{d}: {hit}/{n}" for d, (hit, n) in per_class.items())
    return (
        f"recognised:  {recognised} of {total} samples ({share:.0%}) read as the digit asked for\n"
        f"             per digit {digits}\n"
        f"             (by a classifier of the real 8x8 digits that gets {classifier_accuracy:.1%} of "
        "held-out real ones right)"
    )


def score_folder(folder, seed=0):
    """(share, per_class, classifier accuracy) of the samples under folder."""
    classifier, accuracy = train_classifier(seed)
    share, per_class = recognition(classifier, *load_samples(folder))
    return share, per_class, accuracy


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("samples", help="folder holding the class folders 0..9 of generated digits")
    args = parser.parse_args()
    try:
        print(describe(*score_folder(args.samples)))
    except (FileNotFoundError, NotADirectoryError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
