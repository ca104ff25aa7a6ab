"""Ray Data: training images read and turned into DefectMaker samples by a pool of actors, streamed.

Rows of the source dataset are tiny (an image path, a cut-paste source path, a seed); the actors
(reb_dist.pipelines.defect_batches.DefectBatchMaker) read, resize, augment and synthesise, so nothing
like an epoch of images is ever materialised. Each row's seed depends only on its global index, so a
resumed run sees the same samples it would have.
"""

from __future__ import annotations

from reb_dist.pipelines.defect_batches import DefectBatchMaker, defect_items


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
