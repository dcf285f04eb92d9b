"""Command-line interface: ``python -m napari_s2mnet {predict,train,info,demo}``.

The CLI is a thin layer over :mod:`napari_s2mnet.batch` (files in, files out, on top of
:mod:`napari_s2mnet.inference` and :mod:`napari_s2mnet.training`); it parses arguments and hands
them on.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from napari_s2mnet.losses import LOSS_NAMES


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="segment image files/folders; writes <name>_labels.tif + <name>_features.csv per image",
    )
    p.add_argument("inputs", nargs="+", type=Path, help="image files (TIFF, PNG, JPG) or folders")
    p.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    p.add_argument("--model", type=Path, default=None, help=".safetensors model (default: bundled)")
    p.add_argument(
        "--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:N, mps"
    )
    p.add_argument("--tile-size", type=int, default=None, help="tile side in pixels")
    p.add_argument("--threshold", type=float, default=None, help="probability threshold")
    p.add_argument("--channel-axis", type=int, default=None, help="axis of channels, if any")
    p.add_argument(
        "--channels",
        type=int,
        nargs="+",
        default=None,
        help="channels that feed the model, in order (e.g. --channels 2 for the "
        "third channel and a 1-channel model); default: all",
    )
    p.add_argument(
        "--z-context",
        type=int,
        default=0,
        help="stacks: 2.5-D smoothing over +-N neighbouring slices (default 0: off)",
    )
    p.add_argument(
        "--input-transform",
        default="none",
        choices=["none", "invert", "hematoxylin"],
        help="invert: dark objects on a bright background (brightfield); hematoxylin: "
        "H&E/IHC RGB images (nuclei from the hematoxylin stain)",
    )
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from napari_s2mnet.batch import predict_paths
    from napari_s2mnet.inference import InferenceConfig

    return predict_paths(
        args.inputs,
        args.output,
        model_path=args.model,
        device=args.device,
        tile_size=args.tile_size,
        threshold=args.threshold,
        channel_axis=args.channel_axis,
        channels=args.channels,
        config=InferenceConfig(z_context=args.z_context, input_transform=args.input_transform),
    )


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train or fine-tune a model on image/label files")
    p.add_argument("--images", nargs="+", type=Path, required=True, help="image files or folders")
    p.add_argument(
        "--labels",
        nargs="+",
        type=Path,
        required=True,
        help="label files or folders, paired with --images by name: x.tif with x.tif "
        "(another folder) or x_labels/_masks/_mask/_seg.tif",
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="output .safetensors file")
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        help="start from this model (default: the bundled model; 'new' for random init)",
    )
    p.add_argument(
        "--arch", default=None, help="architecture when starting from scratch (--model new)"
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--epochs", type=int, default=None, help="virtual epochs of 10 steps (default 30)"
    )
    budget.add_argument("--seconds", type=float, default=None, help="wall-clock budget instead")
    p.add_argument("--loss", default=None, help=", ".join(LOSS_NAMES) + " (default masl)")
    p.add_argument(
        "--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:N, mps"
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classes incl. background for a new model (default 1: binary); labels "
        "are then class ids",
    )
    p.add_argument("--batch-size", type=int, default=None, help="crops per step (per process)")
    p.add_argument("--crop-size", type=int, default=None, help="training crop side in pixels")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="share held out for validation (0 disables)",
    )
    p.add_argument(
        "--allow-empty",
        action="store_true",
        help="use images without labelled objects as background-only examples",
    )
    p.add_argument(
        "--pair-by-order",
        action="store_true",
        help="pair images and labels in sorted order instead of by name",
    )
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from napari_s2mnet.batch import train_paths

    return train_paths(
        args.images,
        args.labels,
        args.output,
        model_path=args.model,
        arch=args.arch,
        epochs=args.epochs,
        seconds=args.seconds,
        loss=args.loss,
        device=args.device,
        seed=args.seed,
        num_classes=args.num_classes,
        batch_size=args.batch_size,
        crop_size=args.crop_size,
        lr=args.lr,
        val_fraction=args.val_fraction,
        allow_empty=args.allow_empty,
        pair_by_order=args.pair_by_order,
    )


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info", help="describe a model file (default: the bundled model) and devices"
    )
    p.add_argument("model", nargs="?", type=Path, default=None)
    p.set_defaults(func=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    import json

    from napari_s2mnet.checkpoint import default_model_path, load_model
    from napari_s2mnet.devices import describe_device, resolve_device
    from napari_s2mnet.model import count_parameters

    path = args.model or default_model_path()
    bundle = load_model(path)
    print(f"model file : {path}")
    print(f"name       : {bundle.name}")
    print(f"config     : {json.dumps(bundle.config.to_dict())}")
    print(f"parameters : {count_parameters(bundle.model):,}")
    print(f"device     : {describe_device(resolve_device('auto'))}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a model (default: the bundled model) to ONNX or bioimage.io"
    )
    p.add_argument(
        "model",
        nargs="?",
        type=Path,
        default=None,
        help="a .safetensors model file (default: the bundled model)",
    )
    p.add_argument(
        "--format",
        dest="fmt",
        choices=["onnx", "bioimageio"],
        default=None,
        help="onnx (.onnx file) or bioimageio (.zip package); default: from -o's suffix",
    )
    p.add_argument("-o", "--output", type=Path, required=True, help="output .onnx or .zip file")
    p.add_argument(
        "--tile-size",
        type=int,
        default=None,
        help="square tile side the graph is built for (default: the model's tile size)",
    )
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from napari_s2mnet.export import export_model

    path = export_model(args.output, args.fmt, model_path=args.model, tile_size=args.tile_size)
    print(f"wrote {path}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="open napari with the S2M-Net widget and the sample image segmented"
    )
    p.add_argument(
        "--screenshot",
        type=Path,
        default=None,
        help="save a PNG of the whole window and quit (for headless checks)",
    )
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from napari_s2mnet._qt._demo import run_demo

    return run_demo(screenshot=args.screenshot)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="python -m napari_s2mnet",
        description="S2M-Net segmentation: predict, train, inspect models, or open the napari demo.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_predict(sub)
    _add_train(sub)
    _add_info(sub)
    _add_export(sub)
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, RuntimeError) as exc:  # OSError: read-only or full output
        # Clear messages for bad input instead of tracebacks; --verbose shows the traceback.
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
