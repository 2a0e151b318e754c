from dcal.models.bev import BEVGraphModule  # noqa: F401
from dcal.models.dcal_vit import DCALConfig, DCALViT  # noqa: F401
from dcal.models.clip import CLIP, CLIPConfig  # noqa: F401
from dcal.models.protonet import ProtoNet  # noqa: F401
