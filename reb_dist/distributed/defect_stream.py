"""Ray Data: training images read and turned into DefectMaker samples by a pool of actors, streamed.

Rows of the source dataset are tiny (an image path, a cut-paste source path, a seed); the actors
read, resize, augment and synthesise, so nothing like an epoch of images is ever materialised. Each
row's seed depends only on its global index, so a resumed run sees the same samples it would have.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from reb_dist.io.data.images import read_image


def sample_seed(run_seed: int, index: int) -> int:
    """Return the DefectMaker seed of stream row `index`, a 32-bit int hashed from (run_seed, index)."""
    return int(np.random.SeedSequence([run_seed, index]).generate_state(1)[0])


def defect_items(paths: list[str], start: int, count: int, run_seed: int) -> list[dict]:
    """Build rows `start .. start+count` of the endless stream: epoch-wise permutations of the images,
    each paired with a different image of the class as its cut-paste source.

    Returns:
        One dict per row with ``index`` (global row), ``path``, ``source`` and ``seed``.

    Raises:
        ValueError: If there are fewer than 2 images.
    """
    n = len(paths)
    if n < 2:
        raise ValueError("DefectMaker's cut-paste fill needs at least 2 training images")
    items = []
    for g in range(start, start + count):
        epoch, pos = divmod(g, n)
        perm = np.random.default_rng([run_seed, epoch]).permutation(n)
        base = perm[pos]
        source = perm[(pos + 1 + g % (n - 1)) % n]
        if source == base:
            source = perm[(pos + 1) % n]
        items.append({"index": g, "path": paths[base], "source": paths[source],
                      "seed": sample_seed(run_seed, g)})
    return items


class DefectBatchMaker:
    """A Ray Data actor: rows of (path, source, seed) -> every class variant of each base image.

    Called on a batch of ``index``/``path``/``source``/``seed`` columns, it returns ``image``
    (uint8, N x S x S x 3), ``label`` (class ids) and ``index`` (the source row of each sample).
    Constructor arguments are `DefectMaker`'s; images are resized to `image_size` once and cached.
    """

    def __init__(self, task: str, image_size: int, blend_prob: float, saliency: str):
        from reb_dist.core.defectmaker import DefectMaker

        self.maker = DefectMaker(task=task, image_size=image_size, blend_prob=blend_prob, saliency=saliency)
        self.image_size = image_size
        self._load = lru_cache(maxsize=1024)(self._read)

    def _read(self, path: str) -> np.ndarray:
        image = Image.fromarray(read_image(path))
        return np.asarray(image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, labels, indices = [], [], []
        for index, path, source, seed in zip(batch["index"], batch["path"], batch["source"], batch["seed"]):
            samples = self.maker.sample_all(self._load(str(path)), int(seed),
                                            source_image=self._load(str(source)), image_path=Path(str(path)))
            for s in samples:
                images.append(s.image)
                labels.append(s.class_id)
                indices.append(index)
        return {"image": np.stack(images), "label": np.asarray(labels, np.int64),
                "index": np.asarray(indices, np.int64)}


def defect_dataset(paths: list[str], start: int, count: int, *, task: str, image_size: int,
                   blend_prob: float, saliency: str, run_seed: int, data_workers: int, data_cpus: float):
    """Build a lazy, streaming Ray Dataset of DefectMaker samples (count base images x classes rows).

    Args:
        paths: The class's training images.
        start: First global row (nonzero when resuming).
        count: Base images to stream.
        task: DefectMaker task.
        image_size: Side of the square working size.
        blend_prob: DefectMaker's probability of blending instead of pasting.
        saliency: DefectMaker saliency method.
        run_seed: Seed of the whole stream.
        data_workers: Size of the `DefectBatchMaker` actor pool.
        data_cpus: CPUs per actor.

    Returns:
        A `ray.data.Dataset` with ``image``, ``label`` and ``index`` columns, in row order.
    """
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the same rows in the same order after a resume
    ds = ray.data.from_items(defect_items(paths, start, count, run_seed))
    return ds.map_batches(
        DefectBatchMaker, batch_size=4,
        fn_constructor_kwargs=dict(task=task, image_size=image_size, blend_prob=blend_prob, saliency=saliency),
        compute=ray.data.ActorPoolStrategy(size=data_workers), num_cpus=data_cpus)
