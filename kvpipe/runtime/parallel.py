"""Finding the tensor-parallel group of a model loaded with transformers' ``tp_plan`` (launched by ``torchrun``)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from kvpipe.core.shards import HeadShards
from kvpipe.errors import UnsupportedModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def head_shards(model: PreTrainedModel) -> HeadShards:
    """This process's share of ``model``'s KV heads: the rank and size of its tensor-parallel group (transformers
    keeps the device mesh as ``model._device_mesh``, its ``tp`` dimension the group), or one process's."""
    size = getattr(model, "tp_size", None) or getattr(model, "_tp_size", None) or 1
    mesh = getattr(model, "_device_mesh", None)
    if size <= 1 or mesh is None:
        return HeadShards()
    import torch.distributed as dist

    names = mesh.mesh_dim_names or ()
    tp_mesh = mesh["tp"] if "tp" in names else mesh
    if tp_mesh.ndim != 1:
        raise UnsupportedModelError(f"kvpipe found a {tp_mesh.ndim}-D device mesh {names} and no 'tp' dimension; "
                                    "it supports tensor parallelism over one mesh dimension named 'tp'")
    group = tp_mesh.get_group()
    shards = HeadShards(group, dist.get_rank(group), dist.get_world_size(group))
    heads = model.config.num_key_value_heads
    if heads % shards.world:
        raise UnsupportedModelError(f"{type(model).__name__} has {heads} KV heads, which {shards.world} ranks cannot "
                                    "share evenly; use a tensor-parallel size that divides the KV heads")
    return shards
