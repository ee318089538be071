"""The benchmark scripts' ending: machine facts and results written as JSON."""
from __future__ import annotations

import json
import os
import platform
import resource
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llama_cpp


def machine() -> dict[str, str | int | float]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count() or 1, "python": platform.python_version(),
            "llama_cpp_python": llama_cpp.__version__, "loadavg_1m": os.getloadavg()[0]}



def peak_rss_bytes() -> int:
    """This process's peak resident set (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def save_results(out: str | os.PathLike[str] | None, data: Any, *, print_json: bool = False,
                 table: Callable[[Any], str] | None = None) -> Path | None:
    """The benchmark scripts' ending: write data to out as indented JSON (its
    folder created; None: no file), then print it as one JSON line
    (print_json: the last line of stdout, for scripts that parse it) or else
    as table(data), if given. Returns the path written."""
    path = None
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1))
    if print_json:
        print(json.dumps(data))
    elif table is not None:
        print(table(data))
    return path

