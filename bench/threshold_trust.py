"""How far a `reb fit --calibrate` threshold can be trusted: its methods on the real test set.

For each held-out fraction, one detector is fitted as `reb fit --calibrate` fits it (the held-out
training images are not in the bank) and scores its synthetic validation split (held-out normals +
one DefectMaker anomaly each) and the category's real test images. Every threshold method is then
taken from the same validation scores and applied to the test images: the false-positive rate on
normal test images and the recall of real defects, beside what the calibration itself expects (its
validation false-positive rate and 95% interval). Nothing here is tuned on the test set: the test
images only measure each method.

Prints a markdown table and the command that made it. Example:
    .venv/bin/python bench/threshold_trust.py --root /work/shared/data/mvtec_ad --category pill \
        --fractions 0.03,0.1
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from common import bench_parser, print_command

from reb_dist.commands.fit import synthetic_scores
from reb_dist.config import RunConfig
from reb_dist.core.thresholds import calibrate, fpr_interval, threshold_counts, threshold_metrics
from reb_dist.pipelines.evaluate import extract_with_masks, fit_detector, load_category
from reb_dist.pipelines.validation import synthetic_split


def main() -> None:
    p = bench_parser(__doc__.split("\n")[0])
    p.add_argument("--fractions", default="0.03,0.1", help="held-out shares of the training images")
    p.add_argument("--methods", default="f1,quantile,auto")
    args = p.parse_args()
    print_command()
    cfg = RunConfig.load(None, [f"data.root={args.root}", "tracking.enabled=false", *args.overrides])
    split = load_category(cfg.data, args.category)
    rows = []
    for fraction in (float(f) for f in args.fractions.split(",")):
        validation = synthetic_split(split, fraction, cfg.tune.seed, cfg.data.image_size, cfg.finetune.saliency)
        detector = fit_detector(cfg, replace(split, train=validation.train))
        labels, scores, source = synthetic_scores(detector, validation, cfg.data.batch_size)
        test, _ = extract_with_masks(detector, split.test, cfg.data, "test features")
        method = detector.default_method
        test_scores = detector.score_features(test, [method])[method].image_scores
        test_labels = np.array([s.label for s in split.test])
        detector.close()
        separable = scores[labels == 1].min() > scores[labels == 0].max()
        for name in args.methods.split(","):
            c = calibrate(labels, scores, name, cfg.tune.quantile, source)
            m = threshold_metrics(test_labels, test_scores, c.threshold)
            counts = threshold_counts(test_labels, test_scores, c.threshold)
            flagged, normals, anomalies = counts["fp"], counts["fp"] + counts["tn"], counts["tp"] + counts["fn"]
            lo, hi = fpr_interval(flagged, normals)
            rows.append([args.category, f"{fraction:g}", f"{c.normals} + {c.anomalies}", "yes" if separable else "no",
                         name if name == c.method else f"{name} ({c.method})",
                         f"{100 * c.normal_fpr:.1f} [{100 * c.fpr_interval[0]:.1f}, {100 * c.fpr_interval[1]:.1f}]",
                         f"{100 * m['fpr']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] ({flagged}/{normals})",
                         f"{100 * m['recall']:.1f} ({counts['tp']}/{anomalies})",
                         f"{m['f1']:.3f}", "yes" if c.warning() else "no"])
            print(f"{rows[-1]}", flush=True)
    header = ["category", "held out", "validation normal + anomalous", "anomalies all above normals", "method",
              "expected FPR % [95%]", "test FPR % [95%]", "test recall %", "test F1", "warned"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
