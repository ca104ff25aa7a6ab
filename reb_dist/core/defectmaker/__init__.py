"""DefectMaker: REB's synthetic defects (Bezier shapes x noise / cut-paste fills, pasted or blended).

Pure, seeded numpy code (no torch, no global RNG) so that Ray Data workers can generate the SSL
training stream in parallel and any sample can be regenerated from its seed. Modules, one job each:
shapes (where), fills (what), fusing (how it is merged), saliency (where it may be centred), and
maker (the classes of a task and the per-sample recipe).
"""

from reb_dist.core.defectmaker.fills import (
    FILLS,
    as_rgb,
    color_jitter,
    cut_paste,
    is_gray,
    random_noise,
    to_gray,
)
from reb_dist.core.defectmaker.fusing import blend, composite, paste, soften
from reb_dist.core.defectmaker.maker import (
    TASKS,
    DefectClass,
    DefectMaker,
    DefectSample,
    derive_seed,
    dihedral,
    synthesize,
)
from reb_dist.core.defectmaker.saliency import (
    border_contrast,
    find_saliency_file,
    load_saliency_folder,
    sample_centre,
    saliency_region,
    spectral_residual,
    spectral_residual_saliency,
)
from reb_dist.core.defectmaker.shapes import (
    SHAPES,
    bezier,
    bezier_clump,
    bezier_outline,
    bezier_scar,
    rectangle,
    rectangle_scar,
)

__all__ = [
    "FILLS", "SHAPES", "TASKS",
    "DefectClass", "DefectMaker", "DefectSample",
    "as_rgb", "bezier", "bezier_clump", "bezier_outline", "bezier_scar", "blend", "border_contrast",
    "color_jitter", "composite", "cut_paste", "derive_seed", "dihedral", "find_saliency_file", "is_gray",
    "load_saliency_folder", "paste", "random_noise", "rectangle", "rectangle_scar", "sample_centre",
    "saliency_region", "soften", "spectral_residual", "spectral_residual_saliency", "synthesize", "to_gray",
]
