"""Walk a dataset's folders by real path, so that a symbolic link can never relabel an image.

An ImageFolder labels a file by the class folder it lies in. Following links blindly breaks that: a link
``cat/up -> ..`` makes the walk of ``cat`` enter ``dog`` and store every dog a second time as a cat; a folder
reached twice stores its images twice. :class:`TreeWalker` resolves every link it meets and decides by the
target's *real* path:

* Each class folder (for unlabelled and ILSVRC-val layouts: the dataset root) is a *boundary*: its real path. A
  class folder may itself be a link (a subset of ImageNet made of links to the full set's class folders), unless
  its target contains the dataset or overlaps another class folder.
* The real folders under every boundary are walked first, following no link; links are queued.
* Then each queued link, in order:

  - a dangling link, or a cycle of links: one ``unreadable`` reject;
  - a folder that contains the link itself (``up -> ..``), its class folder, or the dataset: ``symlink-loop``;
  - a target that lies in another class folder, inside the dataset but outside its own class folder, or a
    folder that contains another class folder: ``link-leaves-class`` (following it would relabel images);
  - a folder already walked: ``duplicate-folder``;
  - otherwise it is followed: a file becomes a candidate, a folder is walked the same way (its links join the
    queue). A target outside the dataset is followed: it lies in no class folder, so the link is its only label
    (a folder of links into a central image store is a common way to build a dataset).

* The same real file reached twice is kept once: the path reached without any link wins, otherwise the first by
  path; every other path to it is a ``duplicate-file`` reject.

Every rejected entry is reported once, so ``found = accepted + rejected`` counts each input once.

    >>> walker = TreeWalker("/data/tree")
    >>> walker.add_folder("/data/tree/cat", label=0); walker.add_folder("/data/tree/dog", label=1)
    >>> files, rejects = walker.walk()
"""

from __future__ import annotations

import os
import stat
from collections import deque
from dataclasses import dataclass

from .images import UNREADABLE, looks_like_image
from .manifest import Reject

LINK_LEAVES_CLASS = "link-leaves-class"
SYMLINK_LOOP = "symlink-loop"
DUPLICATE_FOLDER = "duplicate-folder"
DUPLICATE_FILE = "duplicate-file"


@dataclass(frozen=True, slots=True)
class FoundFile:
    """One regular file the walk keeps."""

    path: str  #: the path it was reached by (what is read)
    rel: str  #: that path relative to the dataset root, ``/``-separated
    real: str  #: its real path
    st: os.stat_result
    label: int


@dataclass(frozen=True, slots=True)
class _Folder:
    path: str  #: as reached
    real: str  #: its real path
    rel: str
    label: int
    boundary: str  #: real path of the class folder it belongs to
    linked: bool  #: reached through a link below its class folder


def _within(path: str, folder: str) -> bool:
    """Whether real path ``path`` is ``folder`` or lies under it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class TreeWalker:
    """The walk of one scan: every class folder shares one memory of the folders and files already reached."""

    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self.root_real = os.path.realpath(root)
        self.rejects: list[Reject] = []
        self._boundaries: dict[str, str] = {}  # real class folder -> its relative path
        self._walked: dict[str, str] = {}  # real folder -> relative path it was walked by
        self._pending: list[_Folder] = []  # boundaries whose real trees are still to walk
        self._links: deque[tuple[str, str, int, str, str]] = deque()  # path, rel, label, boundary, parent real
        # Files reached without a link below their class folder are unique by construction (class folders do not
        # overlap, real folders are walked once); only files reached through links need the duplicate check.
        self._direct: list[FoundFile] = []
        self._linked: list[FoundFile] = []

    # -- helpers --------------------------------------------------------------------------------------------

    def _rel(self, path: str) -> str:
        return os.path.relpath(path, self.root).replace(os.sep, "/")

    def _show(self, real: str) -> str:
        """A target as a human reads it: relative to the dataset when inside it, else absolute."""
        if _within(real, self.root_real):
            rel = os.path.relpath(real, self.root_real).replace(os.sep, "/")
            return "the dataset root" if rel == "." else repr(rel)
        return repr(real)

    def _reject(self, rel: str, reason: str) -> None:
        self.rejects.append(Reject(rel, reason))

    def _owner(self, real: str) -> str | None:
        """The class folder (real path) holding ``real``, if any."""
        p = real
        while True:
            if p in self._boundaries:
                return p
            parent = os.path.dirname(p)
            if parent == p:
                return None
            p = parent

    # -- registering class folders --------------------------------------------------------------------------

    def add_folder(self, path: str, label: int) -> bool:
        """Register a class folder (or the dataset root) to walk with ``label``. Register the real folders first,
        then linked ones: a linked class folder is refused (and reported) when its target contains the dataset
        or overlaps a registered class folder. Returns whether it was registered."""
        rel = self._rel(path)
        if rel == ".":
            real = self.root_real
        elif not os.path.islink(path):
            real = os.path.normpath(os.path.join(self.root_real, rel))
        else:
            try:
                real = os.path.realpath(path, strict=True)
            except OSError as e:
                self._reject(rel, f"{UNREADABLE}: broken link ({e.strerror or e})")
                return False
            if _within(self.root_real, real):
                self._reject(rel, f"{SYMLINK_LOOP}: class folder links to {self._show(real)}, which contains the dataset")
                return False
            for other, other_rel in self._boundaries.items():
                if real == other:
                    self._reject(rel, f"{DUPLICATE_FOLDER}: class folder links to class folder {other_rel!r}")
                    return False
                if _within(real, other) or _within(other, real):
                    self._reject(rel, f"{LINK_LEAVES_CLASS}: class folder links to {self._show(real)}, which "
                                      f"overlaps class folder {other_rel!r}")
                    return False
        self._boundaries[real] = rel
        self._walked[real] = rel
        self._pending.append(_Folder(path, real, rel, label, real, linked=False))
        return True

    # -- walking --------------------------------------------------------------------------------------------

    def _walk_tree(self, top: _Folder) -> None:
        """Walk real folders under ``top`` (depth first, by name); queue links, collect regular files."""
        stack = [top]
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(folder.path) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as e:
                self._reject(folder.rel, f"{UNREADABLE}: {e.strerror or e}")
                continue
            subfolders = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue  # hidden files (.DS_Store, our own temp files) are not inputs
                rel = entry.name if folder.rel == "." else f"{folder.rel}/{entry.name}"
                real = os.path.join(folder.real, entry.name)
                try:
                    if entry.is_symlink():
                        self._links.append((entry.path, rel, folder.label, folder.boundary, folder.real))
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError as e:
                    self._reject(rel, f"{UNREADABLE}: {e.strerror or e}")
                    continue
                if stat.S_ISDIR(st.st_mode):
                    self._walked[real] = rel
                    subfolders.append(_Folder(entry.path, real, rel, folder.label, folder.boundary, folder.linked))
                elif stat.S_ISREG(st.st_mode):
                    (self._linked if folder.linked else self._direct).append(
                        FoundFile(entry.path, rel, real, st, folder.label))
                else:  # FIFO, socket, device: reading could block or make no sense
                    self._reject(rel, f"{UNREADABLE}: not a regular file")
            stack.extend(reversed(subfolders))

    def _follow(self, path: str, rel: str, label: int, boundary: str, parent_real: str) -> None:
        """Decide one queued link (see the module docstring) and follow it when it is safe."""
        try:
            real = os.path.realpath(path, strict=True)  # raises on a dangling link and on a cycle of links
            st = os.stat(real)
        except OSError as e:
            self._reject(rel, f"{UNREADABLE}: broken link ({e.strerror or e})")
            return
        is_dir = stat.S_ISDIR(st.st_mode)
        if is_dir:
            contained = ("this link" if _within(parent_real, real) else "its class folder" if _within(boundary, real)
                         else "the dataset" if _within(self.root_real, real) else None)
            if contained:
                self._reject(rel, f"{SYMLINK_LOOP}: links to {self._show(real)}, which contains {contained}")
                return
        if not _within(real, boundary):
            owner = self._owner(real)
            if owner is not None:
                self._reject(rel, f"{LINK_LEAVES_CLASS}: links to {self._show(real)}, inside class folder "
                                  f"{self._boundaries[owner]!r}")
                return
            if _within(real, self.root_real):
                self._reject(rel, f"{LINK_LEAVES_CLASS}: links to {self._show(real)}, outside its class folder "
                                  f"{self._boundaries[boundary]!r}")
                return
        if is_dir:
            inner = next((b for b in self._boundaries if b != boundary and _within(b, real)), None)
            if inner is not None:
                self._reject(rel, f"{LINK_LEAVES_CLASS}: links to {self._show(real)}, which contains class folder "
                                  f"{self._boundaries[inner]!r}")
            elif real in self._walked:
                self._reject(rel, f"{DUPLICATE_FOLDER}: same folder as {self._walked[real]!r}")
            else:
                self._walked[real] = rel
                self._walk_tree(_Folder(path, real, rel, label, boundary, linked=True))
        elif stat.S_ISREG(st.st_mode):
            self._linked.append(FoundFile(path, rel, real, st, label))
        else:
            self._reject(rel, f"{UNREADABLE}: not a regular file")

    def walk(self) -> tuple[list[FoundFile], list[Reject]]:
        """Walk every registered folder; returns the kept files and every reject (including those of
        :meth:`add_folder`)."""
        for top in self._pending:
            self._walk_tree(top)
        self._pending.clear()
        while self._links:
            self._follow(*self._links.popleft())
        kept = self._direct
        if self._linked:
            first_rel = {c.real: c.rel for c in kept}
            for cand in sorted(self._linked, key=lambda c: c.rel):
                if cand.real in first_rel:
                    self._reject(cand.rel, f"{DUPLICATE_FILE}: same file as {first_rel[cand.real]!r}")
                else:
                    first_rel[cand.real] = cand.rel
                    kept.append(cand)
        self._direct, self._linked = [], []
        return kept, self.rejects


def any_image_under(root: str) -> bool:
    """Whether some file under the folder ``root`` (links followed, each real folder once) starts with an image
    signature (:func:`dino_model.data.images.looks_like_image` of its first 16 bytes). Stops at the first one, so a real dataset costs a few small
    reads; a folder without images is walked whole. A necessary condition only: the scan decides what is kept."""
    seen: set[str] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir():  # follows links; loops end at `seen`
                    stack.append(entry.path)
                elif entry.is_file():
                    with open(entry.path, "rb") as f:
                        if looks_like_image(f.read(16)):
                            return True
            except OSError:
                continue
    return False
