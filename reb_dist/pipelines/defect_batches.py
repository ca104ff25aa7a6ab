"""DefectMaker samples from stream rows, Ray-free: the rows of the endless training stream and the
maker that turns a batch of rows into every class variant of each base image.

Each row's seed depends only on its global index, so a resumed run sees the same samples it would
have. The Ray Data stream (reb_dist.distributed.defect_stream) runs `DefectBatchMaker` in a pool of
actors; the one-process loop (reb_dist.pipelines.ssl_training) runs it here or in a process pool.
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
    """Rows of (path, source, seed) -> every class variant of each base image (a Ray Data
    actor in the stream, a plain callable in the one-process loop).

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
