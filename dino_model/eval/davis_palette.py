"""The DAVIS colour palette for indexed PNG masks, generated locally (nothing is downloaded).

DAVIS annotations are palette ("P" mode) PNGs whose palette is the PASCAL VOC colour map: colour ``i`` spreads the
bits of ``i`` over the three channels, three bits per round, most significant output bit first. Index 0 is black
(background), 1 is (128, 0, 0), 2 is (0, 128, 0), 3 is (128, 128, 0), ... — byte-identical to the palette stored in
the official DAVIS-2017 annotations and to the ``palette.txt`` the reference label-propagation script fetches.
"""

from __future__ import annotations

import numpy as np


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC / DAVIS colour map as a ``[n, 3]`` uint8 array (the bit-shifting construction)."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


#: The 256-colour DAVIS palette, ``[256, 3]`` uint8.
DAVIS_PALETTE: np.ndarray = voc_colormap(256)
DAVIS_PALETTE.setflags(write=False)

#: The same palette flattened to the 768-int list ``PIL.Image.putpalette`` expects.
DAVIS_PALETTE_FLAT: list[int] = DAVIS_PALETTE.reshape(-1).tolist()
