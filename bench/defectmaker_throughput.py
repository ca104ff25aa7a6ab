"""DefectMaker throughput: samples per second per worker (pure and through Ray Data), and end-to-end
training images per second of a short fine-tuning run on Ray Train.

Prints figures and the command that made them. Example:
    .venv/bin/python bench/defectmaker_throughput.py --root /work/shared/data/mvtec_ad --category pill
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
from common import bench_parser, print_command


def main() -> None:
    p = bench_parser(__doc__)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--base-images", type=int, default=64, help="base images for the Ray Data measurement")
    p.add_argument("--data-workers", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=6, help="0 skips the end-to-end training measurement")
    args = p.parse_args()

    from reb_dist.config import RunConfig
    from reb_dist.distributed.runtime import ensure_ray
    from reb_dist.pipelines.evaluate import load_category
    from reb_dist.distributed.defect_stream import defect_dataset
    from reb_dist.pipelines.defect_batches import DefectBatchMaker, defect_items

    cfg = RunConfig.load(None, [f"data.root={args.root}", f"data.image_size={args.image_size}", *args.overrides])
    paths = [str(s.image_path) for s in load_category(cfg.data, args.category).train]
    print_command()

    # 1. one process, no Ray: the pure DefectMaker cost (image read + resize + 7 variants)
    maker = DefectBatchMaker("defectmaker", args.image_size, 0.5, "spectral")
    rows = defect_items(paths, 0, 16, 0)
    batch = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    maker(batch)  # warm the image cache and imports
    rows = defect_items(paths, 16, 32, 0)
    batch = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    t = time.perf_counter()
    n = len(maker(batch)["label"])
    pure = n / (time.perf_counter() - t)
    print(f"DefectMaker, one process:        {pure:7.1f} samples/s ({args.image_size} px, 7 classes)")

    # 2. Ray Data: the streaming pipeline with an actor pool, consumed as fast as it comes
    started = ensure_ray()
    ds = defect_dataset(paths, 0, args.base_images, task="defectmaker", image_size=args.image_size,
                        blend_prob=0.5, saliency="spectral", run_seed=0, data_workers=args.data_workers,
                        data_cpus=0.5)
    t = time.perf_counter()
    n = sum(len(b["label"]) for b in ds.iter_batches(batch_size=56))
    secs = time.perf_counter() - t
    print(f"Ray Data stream, {args.data_workers} actors:      {n / secs:7.1f} samples/s in all, "
          f"{n / secs / args.data_workers:.1f} per worker ({n} samples in {secs:.1f} s, actor start-up included)")

    # 3. end to end: DefectMaker stream -> 2-worker TorchTrainer, images per second of training
    if args.train_steps:
        from reb_dist.distributed.finetune import finetune, read_metrics

        with tempfile.TemporaryDirectory() as tmp:
            tcfg = RunConfig.load(None, [
                f"data.root={args.root}", f"data.image_size={args.image_size}",
                f"finetune.steps={args.train_steps}", "finetune.images_per_step=112", "finetune.micro_batch=28",
                "finetune.freeze_steps=0", f"finetune.checkpoint_every={args.train_steps}",
                "finetune.cpus_per_worker=0.5", f"finetune.storage_path={tmp}", "finetune.run_name=bench",
                *args.overrides])
            t = time.perf_counter()
            result = finetune(tcfg, args.category, f"{tmp}/backbone.safetensors")
            wall = time.perf_counter() - t
            metrics = read_metrics(result.run_dir)
            steady = [m["images_per_second_worker"] for m in metrics[1:]] or [metrics[0]["images_per_second_worker"]]
            images = args.train_steps * 112
            print(f"fine-tuning, 2 workers:          {images / wall:7.1f} images/s end to end "
                  f"({images} images, {wall:.0f} s with Ray start-up); "
                  f"{2 * float(np.median(steady)):.1f} images/s in steady steps")
    if started:
        import ray

        ray.shutdown()


if __name__ == "__main__":
    main()
