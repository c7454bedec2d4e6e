"""Which code turns a layer's kept tokens into quantized pages: handlers chosen by range method and backend.

Config and handler are kept apart (the pattern torchao uses for its quantization configs): ``Quantization``
says *what* a layer stores (bits, groups, residual window, range method); this registry says *which code*
packs it on a backend. The torch reference ``kernels.pages.quantize_pages`` packs every method; a faster
handler for one (method, backend) pair registers here from its own file, and is used when it accepts the
format. A handler must give the reference's bits for the formats it accepts (tested for the Triton one), so
the choice changes speed, never numerics — which is why falling back to the reference is not a silent change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kvpipe.kernels.pages import GroupRange, PackedPages, PageFormat, quantize_pages

# (keys [P, G, D], values [P, G, D], positions int32 [P, G] with -1 = empty slot, format, range rule) -> pages
PagePacker = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, PageFormat, GroupRange], PackedPages]


@dataclass(frozen=True)
class Handler:
    pack: PagePacker
    accepts: Callable[[PageFormat], bool]


_HANDLERS: dict[tuple[str, str], Handler] = {}


def register_page_packer(method: str, backend: str, pack: PagePacker,
                         accepts: Callable[[PageFormat], bool] = lambda fmt: True) -> None:
    """Use ``pack`` for ``method`` on ``backend`` whenever ``accepts(fmt)``."""
    _HANDLERS[(method, backend)] = Handler(pack, accepts)


def page_packer(method: str, backend: str, fmt: PageFormat) -> PagePacker:
    """The handler registered for (``method``, ``backend``) if it accepts ``fmt``, else the torch reference."""
    handler = _HANDLERS.get((method, backend))
    return handler.pack if handler is not None and handler.accepts(fmt) else quantize_pages


def _triton_minmax(keys, values, positions, fmt, group_range):
    from kvpipe.kernels.triton_quant import quantize_pages_triton  # imported only where Triton runs
    return quantize_pages_triton(keys, values, positions, fmt)


# The Triton kernel computes min/max ranges (KIVI's rule) and stores float16 scales.
register_page_packer("kivi", "triton", _triton_minmax, accepts=lambda fmt: fmt.scale_dtype == torch.float16)
