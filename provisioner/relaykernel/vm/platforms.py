"""What differs between notebook platforms: persistent storage, runtime limit, and who the notebook runs as."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Platform:
    """A notebook platform's preset; every field can be overridden by the cell's arguments."""

    name: str
    title: str
    storage_dir: str  # persistent: keys, the relay's pinned key, checkpoints (never inside workdir)
    runtime_limit_hours: float | None
    laptop_alias: str
    workdir: str  # the stock kernelspec's remote_workdir: where kernels run, what checkpoints come from
    makes_storage_parent: bool = False  # True where any folder persists (a plain box): the cell creates it


PLATFORMS = {
    "colab": Platform("colab", "Colab", "/content/drive/MyDrive/relaykernel", 12.0, "colab", "/content/relaykernel"),
    "aistudio": Platform("aistudio", "AI Studio", "~/work/.relaykernel", None, "aistudio", "~/work/relaykernel"),
    "kaggle": Platform("kaggle", "Kaggle", "/kaggle/working/.relaykernel", 12.0, "kaggle",
                       "/kaggle/working/relaykernel"),
    "generic": Platform("generic", "Linux", "~/.relaykernel/storage", None, "notebook-vm", "~/relaykernel",
                       makes_storage_parent=True),
}
