"""What the command line accepts: bounded numbers, devices that exist, output folders that can be written.

Every argument is checked before a model loads, and every refusal is one line on stderr with exit status 1
(argparse's own usage errors included: ``OneLineParser``), so that a typo never costs a model load, a long run
whose results cannot be written, or a traceback.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from kvpipe.core.spec import MAX_TOKENS
from kvpipe.errors import KVPipeError

MAX_CASES = 10_000          # cases are built before a run starts: a typo of 10^12 must not hang
MIN_CONTEXT = 128           # a needle case (filler, the fact, its key) needs about this much; less measures nothing


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``error: kvpipe run: argument --cases: ...``, exit 1."""

    def error(self, message: str):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(1)


def count(low: int = 1, high: int = MAX_TOKENS):
    """argparse type: a whole number in ``[low, high]``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is not at least {low}")
        if value > high:
            raise argparse.ArgumentTypeError(f"{value} is more than {high:,}")
        return value
    parse.__name__ = "count"            # argparse names the type in its messages
    return parse


def number(low: float | None = None, high: float | None = None, low_open: bool = False):
    """argparse type: a finite float in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"{value:g} is not {'above' if low_open else 'at least'} {low:g}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{value:g} is more than {high:g}")
        return value
    parse.__name__ = "number"
    return parse


def device(text: str) -> str:
    """argparse type: ``auto`` or a device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    import torch

    if text == "auto":
        return text
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:0, ...)") from None
    if parsed.type == "cuda":
        present = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (parsed.index or 0) >= present:
            raise argparse.ArgumentTypeError(f"{text}: this machine has {present or 'no'} CUDA device"
                                             f"{'' if present == 1 else 's'}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: this machine has no MPS device")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text}: kvpipe runs on cpu, cuda or mps devices")
    return text


def model_flags(parser: argparse.ArgumentParser, device_flag: bool = True) -> None:
    """``--device`` and ``--dtype``, the same in every command that loads a model."""
    if device_flag:
        parser.add_argument("--device", type=device, default="auto", metavar="DEVICE",
                            help="where the model runs: auto (default: the first GPU if there is one, else the CPU), "
                                 "cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                        help="the model's dtype: auto (default: bf16 on a GPU, fp32 for the embedded model on the "
                             "CPU), bf16, fp16, fp32")


def writable_folder(path: Path, option: str) -> Path:
    """``path`` made if it does not exist, refused if it is a file, under a file, or not writable: checked before the
    work whose results go there."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise KVPipeError(f"{option} {path}: is a file (or under one); give a folder") from None
    except OSError as err:
        raise KVPipeError(f"{option} {path}: cannot make this folder ({err.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise KVPipeError(f"{option} {path}: this folder is not writable")
    return path
