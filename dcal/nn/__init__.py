from dcal.nn.convert import fuse_attention  # noqa: F401
from dcal.nn.mha import FusedMultiheadAttention  # noqa: F401
from dcal.nn.neighborhood import LocalGraphAttention, NeighborhoodAttention2D, convert_unfold_state_dict  # noqa: F401
from dcal.nn.pwca import PWCAAttention  # noqa: F401
