"""The data package: ImageFolder trees and the embedded digits to FFCV `.beton`, and the loaders that read them.

Public API (used by the training engine and the pipeline):

    DataConfig, ProgressiveResolution, WriterConfig, IMAGENET_WRITER   (config.py)
    build_loaders, read_classes, TrainLoader, ValLoader                 (loaders.py)
    check_data_folder, manifest_digest (no FFCV import)                  (folder.py)
    write_embedded_digits                                                (embedded.py)
    convert_image_folder                                                 (convert.py)
    DataError                                                            (errors.py)

`loaders` and `embedded` import FFCV; import them lazily from here so that reading a config does not.
"""

from .config import IMAGENET_WRITER, DataConfig, ProgressiveResolution, WriterConfig
from .errors import DataError

__all__ = [
    "DataConfig",
    "ProgressiveResolution",
    "WriterConfig",
    "IMAGENET_WRITER",
    "DataError",
    "build_loaders",
    "read_classes",
    "check_data_folder",
    "manifest_digest",
    "write_embedded_digits",
    "convert_image_folder",
]


def __getattr__(name: str):
    if name in ("check_data_folder", "manifest_digest"):
        from . import folder

        return getattr(folder, name)
    if name in ("build_loaders", "read_classes", "TrainLoader", "ValLoader"):
        from . import loaders

        return getattr(loaders, name)
    if name == "write_embedded_digits":
        from .embedded import write_embedded_digits

        return write_embedded_digits
    if name == "convert_image_folder":
        from .convert import convert_image_folder

        return convert_image_folder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
