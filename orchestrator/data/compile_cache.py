"""An on-disk cache for the machine code FFCV's loaders compile with numba.

Every new worker process compiles its loaders' pipelines again: about 5 CPU-seconds for the training
loader's first batch on the 2-core machine, paid by both workers of every stage. FFCV compiles each
operation of a pipeline (decoders, flip, normalisation, the page reader) through its own
`Compiler.compile`, which calls `numba.njit` without numba's `cache=True`. `enable_compile_cache` makes
that call pass `cache=True` and points numba's cache at one folder shared by every process of the
machine, so a process after the first loads the compiled code instead of compiling it again.

Numba keys each cached function on its source file's time stamp, its bytecode, the values its closure
holds (crop scale, mean and std, output size) and the CPU, so a loader of other settings or another
machine compiles its own entry; a function numba cannot cache (one holding a ctypes pointer, code made
with `exec`) is compiled as before. The cache changes no result, only when the compiling happens.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

CACHE_DIR_VARIABLE = "NUMBA_CACHE_DIR"  # numba's own setting; the default below when it is unset
_MARK = "_bitmixer_cached_njit"


def compile_cache_dir() -> str:
    """The folder of numba's cache: $NUMBA_CACHE_DIR, else ~/.cache/bitmixer/numba (stable across runs,
    like DeepSpeed's op cache)."""
    return os.environ.get(CACHE_DIR_VARIABLE) or str(Path.home() / ".cache" / "bitmixer" / "numba")


def cached_njit(njit):
    """`njit` as FFCV calls it (`njit(signature, **options)(function)`), with numba's on-disk cache on;
    a function numba cannot cache is compiled without it."""
    def with_options(*args, **options):
        cached, plain = njit(*args, cache=True, **options), njit(*args, **options)

        def decorate(function):
            try:
                return cached(function)
            except RuntimeError:  # numba finds no file to key the cache on (code made with exec)
                return plain(function)
        return decorate
    setattr(with_options, _MARK, True)
    return with_options


def cache_typed_dict_functions() -> None:
    """Turn numba's on-disk cache on for the functions behind `numba.typed.Dict` (make, get, set, ...).

    `import ffcv` fills a typed Dict at module level (`ffcv.fields.rgb_image.IMAGE_MODES`), and numba
    compiles the dict's functions for it in every process that imports FFCV: 3.7 of the 3.8 CPU-seconds
    of that import on the 2-core machine, paid by every Train worker of every stage. Numba declares them
    with a plain `@njit`; with caching on they load from the cache folder (1.4 CPU-seconds for the
    import). They are keyed on their argument types, so a dict of other types compiles its own entry."""
    from numba.core.dispatcher import Dispatcher
    from numba.typed import typeddict
    for function in vars(typeddict).values():
        if isinstance(function, Dispatcher) and not getattr(function, _MARK, False):
            function.enable_caching()
            setattr(function, _MARK, True)


def enable_compile_cache(cache_dir: str | os.PathLike | None = None) -> str:
    """Make this process's FFCV loaders compile through numba's on-disk cache in `cache_dir` (default:
    `compile_cache_dir()`); returns the folder. Call it before the loaders are built; calling it twice
    changes nothing."""
    folder = str(cache_dir or compile_cache_dir())
    Path(folder).mkdir(parents=True, exist_ok=True)
    os.environ[CACHE_DIR_VARIABLE] = folder
    import numba.core.config
    from numba.core.errors import NumbaWarning

    numba.core.config.CACHE_DIR = folder  # numba read the variable when it was imported: set it here too
    cache_typed_dict_functions()  # before FFCV is imported: importing it fills a typed Dict
    from ffcv.pipeline import compiler

    # A function that holds a ctypes pointer (FFCV's JPEG decoder) is compiled each time, as before.
    warnings.filterwarnings("ignore", message="Cannot cache compiled function", category=NumbaWarning)
    if not getattr(compiler.njit, _MARK, False):
        compiler.njit = cached_njit(compiler.njit)  # Compiler.compile looks `njit` up in its module
    return folder
