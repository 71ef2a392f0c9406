"""The benchmark setting string shared by ``train_step.py`` and ``speed.py``: ``arch/patch/batch/GxN+LxM``.

``vit_small/16/128/224x2+96x8`` = ViT-S/16, 128 images per process, 2 global crops of 224 px and 8 local crops of
96 px (N must be 2: DINO's two global views).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SETTING = re.compile(r"^(\w+)/(\d+)/(\d+)/(\d+)x2\+(\d+)x(\d+)$")

#: (width, depth) of the ViTs the benchmarks know.
WIDTH_DEPTH = {"vit_tiny": (192, 12), "vit_small": (384, 12), "vit_base": (768, 12)}


@dataclass
class Setting:
    arch: str
    patch: int
    batch: int
    global_size: int
    local_size: int
    n_local: int

    @classmethod
    def parse(cls, text: str) -> "Setting":
        m = _SETTING.match(text)
        if not m:
            raise SystemExit(f"bad --setting {text!r}: expected arch/patch/batch/Gx2+LxM, e.g. vit_small/16/128/224x2+96x8")
        a, p, b, g, loc, n = m.groups()
        if a not in WIDTH_DEPTH:
            raise SystemExit(f"bad --setting {text!r}: arch must be one of {sorted(WIDTH_DEPTH)}")
        return cls(a, int(p), int(b), int(g), int(loc), int(n))

    def __str__(self) -> str:
        return f"{self.arch}/{self.patch} b{self.batch} {self.global_size}x2+{self.local_size}x{self.n_local}"
