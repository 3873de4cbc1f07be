"""`python -m fracture_fastai.export RUN_DIR --onnx`: the run's model in a format that runs outside fastai.

ONNX: `model.onnx` beside the run's model.json, which `predict --backend onnx` runs on onnxruntime, without torch.
"""
from __future__ import annotations

import sys

from .errors import ArgumentParser, UserError, cli_errors

__all__ = ["main"]


def _parser():
    p = ArgumentParser(prog="python -m fracture_fastai.export",
                       description="Export a run's model (its model.json + model.safetensors) for deployment.",
                       epilog="Exit code: 0 written, 2 usage error. Run it with: python -m fracture_fastai.predict "
                              "RUN_DIR IMAGES --backend onnx")
    p.add_argument("run", metavar="RUN_DIR", help="a run folder of fracture_fastai.run, or its model.json")
    p.add_argument("--onnx", action="store_true", help="write model.onnx (image batch -> class probabilities)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip comparing the ONNX model's output with torch's on a random batch")
    return p


@cli_errors
def main(argv=None) -> int:
    "Command line: export the run's model; prints the path written."
    args = _parser().parse_args(argv)
    if not args.onnx: raise UserError("say which format to write: --onnx (the one there is)")
    from .model_io import export_onnx, read_description
    read_description(args.run)  # a wrong path fails in one line before torch loads
    print(export_onnx(args.run, check=args.check))
    return 0


if __name__ == "__main__":
    sys.exit(main())
