"""``kimivl preprocess IMAGE... --out FILE.npz``: the image pipeline on files, for inspection.

Writes ``pixel_values`` (all images' patches concatenated in the given order) and
``image_grid_hws`` (int64, one (grid_h, grid_w) row per image), the same arrays the Kimi-VL
processor returns. bfloat16, which .npz cannot name, is stored as its uint16 bit patterns.
An input it cannot take is one line on stderr and exit status 2; nothing is written then.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from .image import WIRE_DTYPES, ImageError, ProcessorConfig, preprocess_image_bytes

PROG = "kimivl preprocess"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Run the Kimi-VL image processor on image files.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files, in prompt order")
    parser.add_argument("--out", required=True, metavar="FILE.npz", help="where to write the arrays")
    parser.add_argument("--model", metavar="DIR", help="model directory whose preprocessor_config.json to use")
    parser.add_argument(
        "--dtype", choices=WIRE_DTYPES, default="float32",
        help="pixel_values element type (default float32; bfloat16 is saved as uint16 bits)",
    )  # fmt: skip
    args = parser.parse_args(argv)

    def fail(where: str, reason: object) -> int:
        print(f"{PROG}: {where}: {reason}", file=sys.stderr)
        return 2

    try:
        config = ProcessorConfig.from_model_dir(args.model)
    except OSError as e:
        return fail(args.model, e.strerror or e)
    except (ValueError, TypeError) as e:  # bad JSON or bad values
        return fail(f"{args.model}/preprocessor_config.json", e)
    patches, grids = [], []
    for path in args.images:
        try:
            with open(path, "rb") as f:
                data = f.read()
            out = preprocess_image_bytes(data, config, args.dtype)
        except OSError as e:
            return fail(path, e.strerror or e)
        except ImageError as e:
            return fail(path, e)
        patches.append(out.pixel_values)
        grids.append(out.grid_hw)
    pixel_values = np.concatenate(patches)
    if args.dtype == "bfloat16":
        pixel_values = pixel_values.view(np.uint16)
    try:
        with open(args.out, "wb") as f:  # a file object: numpy would append ".npz" to a bare name
            np.savez(f, pixel_values=pixel_values, image_grid_hws=np.array(grids, dtype=np.int64))
    except OSError as e:
        return fail(args.out, e.strerror or e)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
