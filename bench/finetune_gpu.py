"""REB's fine-tuning at the paper's schedule on one GPU, in one process: no Ray, faiss or MLflow.

Needs torch, numpy, scipy/scikit-learn, Pillow, safetensors, PyYAML, the backbone's weights package and
this project (a GPU machine may have nothing else). It runs `finetune.engine=local`'s loop (the loop a
Ray Train worker runs) with DefectMaker samples made by a pool of CPU processes, and writes:

  <out>/backbone.safetensors   the fine-tuned backbone (`reb benchmark --set backbone.finetuned=...`)
  <out>/metrics.jsonl          loss, SSL accuracy (all and per class), images/s, per step
  <out>/ssl_curve.png          SSL accuracy per class against images seen (if matplotlib is there)
  <out>/ssl_confusion.png      which SSL classes are mistaken for which, early and late (and .json)

The paper's schedule (default): 300 steps x 1,008 images (48 base images x 7 classes x 3 accumulated
micro-batches), 256 px. Evaluate the backbone afterwards on a CPU machine with `reb benchmark`.

    python bench/finetune_gpu.py --root ../shared/data/mvtec_ad --category pill --out outputs/gpu/pill
    # CPU smoke run: --device cpu --steps 2 --images-per-step 14 --micro-batch 7 --image-size 64
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, without installing it


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="an MVTec-style root: <root>/<category>/train/good/*.png")
    p.add_argument("--category", required=True)
    p.add_argument("--out", required=True, help="output folder (its run/ subfolder holds checkpoints; rerun resumes)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--images-per-step", type=int, default=1008)
    p.add_argument("--micro-batch", type=int, default=336, help="images per forward pass (a multiple of 7)")
    p.add_argument("--freeze-steps", type=int, default=40)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--bn-stats", default="update", choices=["update", "frozen"])
    p.add_argument("--saliency", default="spectral", help="spectral (objects) | whole (textures) | a folder")
    p.add_argument("--data-workers", type=int, default=14, help="DefectMaker processes")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda")
    p.add_argument("--torch-threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    print("# python bench/finetune_gpu.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])), flush=True)

    import torch

    from reb_dist.config import FinetuneConfig
    from reb_dist.core.defectmaker import DefectMaker
    from reb_dist.io.atomic import copy_atomic
    from reb_dist.pipelines.ssl_training import TrainLoopSettings, latest_checkpoint, train_in_process

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu for a smoke run")
    train = sorted(str(q) for q in (Path(args.root) / args.category / "train" / "good").glob("*.png"))
    if len(train) < 2:
        raise SystemExit(f"{Path(args.root) / args.category / 'train' / 'good'}: fewer than 2 training images")
    f = FinetuneConfig(engine="local", steps=args.steps, images_per_step=args.images_per_step,
                       micro_batch=args.micro_batch, freeze_steps=args.freeze_steps, bn_stats=args.bn_stats,
                       saliency=args.saliency, data_workers=args.data_workers, checkpoint_every=args.checkpoint_every,
                       seed=args.seed, torch_threads=args.torch_threads)
    out = Path(args.out)
    run_dir = out / "run"
    classes = tuple(DefectMaker(task=f.task, image_size=args.image_size).classes)
    settings = TrainLoopSettings(f, "efficientnet_lite0", None, classes, str(run_dir / "metrics.jsonl"), str(run_dir))
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    start = time.perf_counter()
    last = train_in_process(settings, train, args.image_size, args.device)
    wall = time.perf_counter() - start
    checkpoint, step = latest_checkpoint(run_dir)
    copy_atomic(checkpoint / "backbone.safetensors", out / "backbone.safetensors")
    copy_atomic(run_dir / "metrics.jsonl", out / "metrics.jsonl")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    try:
        from reb_dist.pipelines.learning_curve import write_confusion
        from reb_dist.reporting.curves import learning_curve_plot

        learning_curve_plot([], rows, out / "ssl_curve.png", f"{args.category}: SSL accuracy, {args.device}")
        write_confusion(rows, list(classes), out, f"{args.category}: SSL confusion, {args.device}")
    except ImportError as exc:  # matplotlib is optional on a GPU box
        print(f"no plot ({exc})")
    images = last.get("images_seen", 0)  # from the start of the run (a resumed run's wall is only its own part)
    print(f"{args.category}: {step} steps, {images} images in {wall:.0f} s ({images / wall:.0f} images/s); "
          f"final loss {last.get('loss', float('nan')):.4f}, SSL accuracy {last.get('accuracy', float('nan')):.3f}")
    print(f"backbone -> {out / 'backbone.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
