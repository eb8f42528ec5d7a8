"""Make a data folder (`train.beton`, `val.beton`, `classes.json`) for the Bit-Mixer pipeline.

    python pipelines/prepare_data.py --src /data/imagenet --out /data/imagenet-ffcv      # ImageNet preset
    python pipelines/prepare_data.py --src DIR --out OUT --max-resolution 256 --workers 16
    python pipelines/prepare_data.py --embedded digits --out data/digits                  # no download

`--src` holds `train/` and `val/`, one sub-folder per class (any image format Pillow reads). The writer
defaults are ffcv-imagenet's ImageNet settings: longest side at most 500 px, JPEG quality 90, half of the
images JPEG-compressed, 8 MiB pages.
"""

from __future__ import annotations

import argparse
import signal
import sys

from pydantic import ValidationError

from orchestrator.data.config import IMAGENET_WRITER, WriterConfig
from orchestrator.data.errors import DataError

MIB = 1024 * 1024
FLAGS = {name: "--" + name.replace("_", "-") for name in WriterConfig.model_fields} | {"page_size": "--page-size-mib"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", help="folder with train/ and val/, one sub-folder per class")
    parser.add_argument("--embedded", choices=["digits"], help="write a data set that ships inside a package")
    parser.add_argument("--out", required=True, help="output folder")
    preset = IMAGENET_WRITER
    parser.add_argument("--max-resolution", type=int, default=preset.max_resolution,
                        help="longest image side stored, in pixels (default %(default)s); 0 keeps the original size")
    parser.add_argument("--jpeg-quality", type=int, default=preset.jpeg_quality, help="default %(default)s")
    parser.add_argument("--compress-probability", type=float, default=preset.compress_probability,
                        help="fraction of images stored as JPEG, the rest raw (default %(default)s)")
    parser.add_argument("--page-size-mib", type=int, default=preset.page_size // MIB,
                        help="FFCV page size in MiB, a power of two >= 2 (default %(default)s)")
    parser.add_argument("--workers", type=int, default=preset.workers, help="writer processes (default %(default)s)")
    parser.add_argument("--max-bad-fraction", type=float, default=preset.max_bad_fraction,
                        help="fail if more than this fraction of images is unreadable (default %(default)s)")
    return parser.parse_args(argv)


def writer_config(args: argparse.Namespace) -> WriterConfig:
    try:
        return WriterConfig(
            max_resolution=args.max_resolution or None,
            jpeg_quality=args.jpeg_quality,
            compress_probability=args.compress_probability,
            page_size=args.page_size_mib * MIB,
            workers=args.workers,
            max_bad_fraction=args.max_bad_fraction,
        )
    except ValidationError as error:
        first = error.errors()[0]
        flag = FLAGS.get(str(first["loc"][0]), str(first["loc"][0])) if first["loc"] else "writer option"
        reason = first["msg"].removeprefix("Value error, ").rstrip(".")
        raise DataError(f"Invalid {flag}: {reason}.") from None


def _stop_on_sigterm(signum, frame):  # noqa: ARG001
    # Turn SIGTERM into an exception so the temporary .beton is removed on the way out.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.src and args.embedded:
            raise DataError("Pass either --src or --embedded, not both.")
        if not args.src and not args.embedded:
            raise DataError("Pass --src DIR (a folder with train/ and val/, one sub-folder per class) "
                            "or --embedded digits.")
        if args.embedded:
            from orchestrator.data.embedded import write_embedded_digits

            out = write_embedded_digits(args.out)
            print(f"digits written to {out}")
            return 0
        from orchestrator.data.convert import convert_image_folder

        summary = convert_image_folder(args.src, args.out, writer_config(args))
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"{summary.written['train']} training and {summary.written['val']} validation images of "
        f"{len(summary.classes)} classes written to {args.out}; {len(summary.skipped)} unreadable images skipped."
    )
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    sys.exit(main())
