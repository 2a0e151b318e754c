"""Integrations of dcal's fused ops with other libraries.

- :mod:`dcal.integrations.transformers`: Hugging Face transformers (the ``hf`` extra):
  ``attn_implementation="dcal"`` for ViT, DeiT, Dinov2, CLIP, SigLIP and every model that
  dispatches through transformers' ``AttentionInterface``; PWCA (``dcal_pair=``) and the
  attention rollout (``dcal_rollout=``) as keyword arguments of ``model(...)``; HF's DiNAT on
  :func:`dcal.ops.neighborhood_attention2d`.

Nothing here is imported by ``import dcal``: each integration imports its library only when it
is imported itself.
"""
