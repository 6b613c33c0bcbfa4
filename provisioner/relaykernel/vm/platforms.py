"""What differs between notebook platforms: persistent storage, runtime limit, and who the notebook runs as."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Platform:
    """A notebook platform's preset; every field can be overridden by the cell's arguments."""

    name: str
    title: str
    storage_dir: str
    runtime_limit_hours: float | None
    laptop_alias: str


PLATFORMS = {
    "colab": Platform("colab", "Colab", "/content/drive/MyDrive/relaykernel", 12.0, "colab"),
    "aistudio": Platform("aistudio", "AI Studio", "~/work/relaykernel", None, "aistudio"),
    "kaggle": Platform("kaggle", "Kaggle", "/kaggle/working/relaykernel", 12.0, "kaggle"),
    "generic": Platform("generic", "this VM", "~/.relaykernel/storage", None, "notebook-vm"),
}
