"""`lorabox check`: graded findings (error / warning / info) with stable ids for LoRA files and folders.

    >>> from lorabox.check import check_file
    >>> check_file("lora.safetensors", target="comfyui").exit_code()
"""
from .checks import CHECKS, check_file
from .findings import CATALOG, FileReport, Finding

__all__ = ["CATALOG", "CHECKS", "FileReport", "Finding", "check_file", "check_paths"]


def __getattr__(name):
    if name == "check_paths":
        from .runner import check_paths

        return check_paths
    raise AttributeError(name)
