"""lorabox: exact conversion, merging, training and checking of LoRA files for diffusion models.

Imports are lazy so that `lorabox --help` and light commands start fast.
"""
__version__ = "0.1.0"

__all__ = ["load_lora", "convert", "convert_file", "inspect_file", "__version__"]


def __getattr__(name):
    if name in ("load_lora", "convert", "convert_file", "lora_from_state_dict"):
        from . import conversion as _convert

        return getattr(_convert, name)
    if name == "inspect_file":
        from .summary import inspect_file

        return inspect_file
    raise AttributeError(name)
