"""Names of choices that the settings check and the code that reads them share.

They live here, below `reb_dist.config`, so the settings check can list them without importing the
data readers or the pipelines (the layer rule: imports only point down). The code that reads each
setting keys its table by these names, and checks at import that the two agree.
"""

# data.layout: the dataset layouts reb_dist.io.data.layouts can read
LAYOUTS = ("mvtec", "loco", "btad", "mvtec3d", "folder")
# tune.validation: how reb_dist.pipelines.validation builds a validation split
VALIDATION_KINDS = ("synthetic", "test")
