from dcal.models.bev import BEVGraphModule  # noqa: F401
from dcal.models.dcal_vit import DCALConfig, DCALViT  # noqa: F401
