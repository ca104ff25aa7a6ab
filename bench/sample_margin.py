"""How stable LDKNN's lead over KNN and 1-NN is on seeded subsets of a class the size of the shipped one.

Features of every image of the class (a full 256-px copy made as make_sample_subset.py makes the
subset, so the bytes match) are extracted once; then for each training draw t (the training images
seed t takes) the whole test set is scored, and each test draw d takes the test images of seed
100 * d + t. Draw (t, 0) is exactly the subset `make_sample_subset.py --seed t` writes. Prints each
draw's image AUROCs and the min / mean margins.

    .venv/bin/python bench/sample_margin.py --category pill --train 32 --test-good 13 --test-defect 8 \\
        --train-draws 3 --test-draws 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_sample_subset import SOURCE, choose  # noqa: E402
from make_sample_subset import main as make_subset  # noqa: E402

from reb_dist.config import RunConfig  # noqa: E402
from reb_dist.detectors import build_detector  # noqa: E402
from reb_dist.io.feature_cache import FeatureCache  # noqa: E402
from reb_dist.pipelines.evaluate import extract_samples, load_category  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, default=SOURCE)
    p.add_argument("--category", default="pill")
    p.add_argument("--train", type=int, default=32)
    p.add_argument("--test-good", type=int, default=13)
    p.add_argument("--test-defect", type=int, default=8)
    p.add_argument("--train-draws", type=int, default=3)
    p.add_argument("--test-draws", type=int, default=8)
    p.add_argument("--set", action="append", default=[], help="settings overrides, e.g. cache.dir=...")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as full:
        make_subset(["--source", str(args.source), "--category", args.category, "--all", "--out", full])
        cfg = RunConfig.load(None, [f"data.root={full}", "backbone.device=cpu", "tracking.enabled=false",
                                    "scoring.methods=[ldknn,knn,nn1]", *args.set])
        split = load_category(cfg.data, args.category)
        detector = build_detector(cfg.backbone, cfg.scoring, cfg.data.image_size, cfg.bank)
        cache = FeatureCache.from_config(cfg.cache)
        train, _ = extract_samples(detector, split.train, cfg.data, "train features", cache)
        test, _ = extract_samples(detector, split.test, cfg.data, "test features", cache)
    labels = np.array([s.label for s in split.test])
    names = [(s.defect_type, s.image_path.name) for s in split.test]
    methods = detector.methods()
    margins: dict[str, list[float]] = {m.label: [] for m in methods[1:]}
    for t in range(args.train_draws):
        # the same draw as make_sample_subset's first pick: seed t over the sorted training images
        chosen = np.sort(np.random.default_rng(t).choice(len(train), args.train, replace=False))
        detector.fit_features(train[chosen])
        scores = {m.label: s.image_scores for m, s in detector.score_features(test, methods).items()}
        for d in range(args.test_draws):
            picked = choose(args.source / args.category, args.train, args.test_good, args.test_defect, 100 * d + t)
            wanted = {(folder.split("/")[1], f.name) for folder, files in picked.items()
                      if folder.startswith("test/") for f in files}
            keep = [i for i, n in enumerate(names) if n in wanted]
            auroc = {m: 100 * roc_auc_score(labels[keep], s[keep]) for m, s in scores.items()}
            lead = auroc[methods[0].label]
            for m in margins:
                margins[m].append(lead - auroc[m])
            print(f"train draw {t}, test draw {d} ({len(keep)} test images): "
                  + ", ".join(f"{m} {v:.1f}" for m, v in auroc.items()), flush=True)
    for m, values in margins.items():
        print(f"{methods[0].label} - {m}: min {min(values):.1f}, mean {np.mean(values):.1f} "
              f"over {len(values)} draws; led in {sum(v > 0 for v in values)}")


if __name__ == "__main__":
    main()
