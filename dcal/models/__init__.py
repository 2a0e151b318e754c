from dcal.models.bev import BEVGraphModule  # noqa: F401
from dcal.models.dcal_vit import DCALConfig, DCALViT  # noqa: F401
from dcal.models.clip import CLIP, CLIPConfig  # noqa: F401
from dcal.models.protonet import ProtoNet  # noqa: F401
from dcal.models import timm_registry  # noqa: F401,E402  (registers the DCAL ViTs with timm when it is installed)
