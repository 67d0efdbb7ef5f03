"""The ``hiera-fast`` command (also ``python -m hiera_fast``): argument parsing, ``info``, and the dispatch to
:mod:`hiera_fast.check` and :mod:`hiera_fast.bench`.

``info``   versions, the device, and which backend ``fused=True`` uses here and why.
``check``  fused vs reference parity of whole models (:mod:`hiera_fast.check`); exit 0 on PASS, 1 on FAIL.
``bench``  throughput of eager vs fused (vs fused + ``torch.compile``) for one model (:mod:`hiera_fast.bench`).

Usage errors (unknown model, a GPU-only flag without CUDA, a bad dtype) are one line on stderr and exit code 2, as
argparse's own errors are here.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

PROG = "hiera-fast"


class UsageError(Exception):
    """A bad command line that argparse cannot see (unknown model, GPU-only flag without CUDA, ...): exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the whole usage block)
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def device_for_run() -> torch.device:
    """CUDA where there is a GPU, else the CPU."""
    return torch.device("cuda" if _has_cuda() else "cpu")


def parse_dtypes(text: str) -> list[torch.dtype]:
    from .bench import parse_dtype

    try:
        return [parse_dtype(t.strip()) for t in text.split(",") if t.strip()]
    except ValueError as err:
        raise UsageError(str(err)) from None


def preset_name(name: str) -> str:
    from .bench import preset_config, preset_key

    try:
        preset_config(name)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return preset_key(name)


# ---------------------------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    from importlib import metadata

    from . import PRESETS, __version__, ops
    from .bench import _triton_version, device_name

    print(f"hiera-fast {__version__}")
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {_triton_version() or 'not installed'}")
    device = device_for_run()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f"device: {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB), "
              f"CUDA {torch.version.cuda}")
    else:
        built = f"torch built with CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only torch build"
        print(f"device: {device_name(device)}; no CUDA device ({built})")
    missing, interpreted = ops.routing.KERNELS_MISSING, ops.kernels_interpreted()
    how = "under Triton's interpreter (TRITON_INTERPRET=1)" if interpreted else "for the GPU"
    print(f"kernels: {missing}" if missing else f"kernels: hiera_fast.kernels imported, defined {how}")
    backend, reason = ops.fused_backend(device)
    print(f"fused=True on {device.type}: {backend} ({reason})")
    if device.type == "cpu" and backend != "triton-interpreter":
        print("  set TRITON_INTERPRET=1 in the environment (before hiera_fast's kernels are imported) to run the "
              "Triton kernels in Triton's interpreter on this CPU: correct in fp32/fp16, slow, for testing only; "
              f"`{PROG} check` does this itself")
    if device.type == "cuda" and backend != "triton" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("  unset TRITON_INTERPRET to launch the kernels on the GPU")
    peers = []
    for dist in ("transformers", "timm", "hiera-transformer", "hiera-optim"):
        try:
            peers.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            peers.append(f"{dist} (not installed)")
    print("peers: " + ", ".join(peers))
    print(f"models ({len(PRESETS)}): " + ", ".join(sorted(PRESETS)))
    return 0


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Triton kernels for the Hiera vision transformer: environment, parity "
                                            "check and benchmarks.")
    sub = parser.add_subparsers(dest="command", metavar="{info,check,bench}", parser_class=_Parser)

    p = sub.add_parser("info", help="versions, the device, and which backend fused=True uses here")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("check", help="fused vs reference parity (output and gradients); exit 0 on PASS, 1 on FAIL",
                       description="Compare fused=True with the eager reference on whole models (classification, "
                                   "MAE, video heads of the model's size): the output and every parameter gradient "
                                   "against a float64 eager run, and prove from ops.kernel_launches that the Triton "
                                   "kernels ran. Without CUDA: Triton's interpreter and scaled-down models.")
    p.add_argument("--model", default="hiera_base_224", help="a preset; its size picks the heads' models "
                                                             "(default: hiera_base_224)")
    p.add_argument("--heads", default="cls,mae,video", help="comma list of cls, mae, video (default: all)")
    p.add_argument("--dtype", default=None, help="comma list of fp32, fp16, bf16 (default: fp32,fp16,bf16 on CUDA; "
                                                 "fp32 on a CPU, where bf16 is refused)")
    p.add_argument("--batch", type=int, default=None, help="batch (default: 4 on CUDA, video 1; 2 on a CPU)")
    p.add_argument("--full", action="store_true", help="on a CPU, check the real model sizes (slow)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=lambda args: __import__("hiera_fast.check", fromlist=["run"]).run(args))

    p = sub.add_parser("bench", help="throughput: eager vs fused (vs torch.compile)",
                       description="Images (or clips) per second of one model: eager vs fused=True (vs fused + "
                                   "torch.compile with --compile, + CUDA graphs with --cudagraphs), and peak memory. "
                                   "Without CUDA no fused variant is timed (only eager). The peers (transformers, "
                                   "official, timm, hiera-optim, ViT-B, compiled or not) are in the benchmark suites: "
                                   "pytest benchmarks/ from a checkout.")
    p.add_argument("--model", default="hiera_base_224", help="a preset (default: hiera_base_224)")
    p.add_argument("--batch", type=int, default=None, help="batch (default: 64 on CUDA, 1 on a CPU)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: bf16 on CUDA, fp32 on a CPU)")
    p.add_argument("--compile", action="store_true", help="also time fused + torch.compile (CUDA only)")
    p.add_argument("--cudagraphs", action="store_true",
                   help="also time fused + torch.compile(mode='reduce-overhead'), i.e. CUDA graphs (CUDA only)")
    p.add_argument("--train", action="store_true", help="time a training step (forward + backward + AdamW, autocast; "
                                                        "mae_ presets: the MAE loss)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default: 20 on CUDA, 3 on a CPU)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default: 5 on CUDA, 1 on a CPU)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON (no table)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=lambda args: __import__("hiera_fast.bench", fromlist=["run"]).run(args))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, one line already printed)
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return 0
    args.argv = argv
    if args.command == "bench":
        cuda = _has_cuda()
        args.iters = args.iters if args.iters is not None else (20 if cuda else 3)
        args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    try:
        return args.func(args)
    except UsageError as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line, no traceback (HIERA_FAST_DEBUG=1 shows it)
        if os.environ.get("HIERA_FAST_DEBUG"):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        print(f"{PROG} {args.command}: error: {type(err).__name__}: {first} (HIERA_FAST_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
