"""``compactfusion`` command line: generate, train-digits, train-video-digits, bench <name>.

User errors print one line on stderr and exit with code 2 (never a traceback).
"""
from __future__ import annotations

import importlib
import sys

from .args import RunFailed, UsageError

BENCHES = {
    "codecs": "compactfusion.bench.codecs",
    "comm": "compactfusion.bench.comm",
    "quality": "compactfusion.bench.quality",
    "latency": "compactfusion.bench.latency",
    "project": "compactfusion.bench.project",
    "soak": "compactfusion.bench.soak",
    "serve": "compactfusion.bench.serve",
    "text": "compactfusion.bench.text",
}

USAGE = """usage: compactfusion <command> [options]

commands:
  generate        run a (parallel) generation; `compactfusion generate --help`
  serve           serve the model over an OpenAI-compatible HTTP API; `compactfusion serve --help`
  train-digits    train the bundled digits model
  train-video-digits  train the bundled video model (moving digits)
  bench NAME      benchmarks: {benches}
""".format(benches=", ".join(BENCHES))


#: An error is one line of at most this many characters (long values are cut where they are quoted).
MAX_ERROR_CHARS = 300


def fail(message: str, code: int = 2) -> int:
    line = f"compactfusion: error: {message}"
    print(line if len(line) <= MAX_ERROR_CHARS else line[:MAX_ERROR_CHARS - 3] + "...", file=sys.stderr)
    return code


def run_guarded(fn, argv) -> int:
    """Run a command; user errors (ValueError/TypeError/UsageError) become one line + exit 2."""
    try:
        return int(fn(argv) or 0)
    except RunFailed as e:  # a run-time failure (NaN output, diverged ranks), not a usage error
        return fail(str(e).splitlines()[0], code=1)
    except (UsageError, ValueError, TypeError, FileNotFoundError) as e:
        return fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "generate":
        from .generate import main as generate_main
        return run_guarded(generate_main, rest)
    if cmd == "serve":
        from .serve import main as serve_main
        return run_guarded(serve_main, rest)
    if cmd == "train-digits":
        from ..bundled.digits_train import main as train_main
        return run_guarded(train_main, rest)
    if cmd == "train-video-digits":
        from ..bundled.video_digits_train import main as train_video_main
        return run_guarded(train_video_main, rest)
    if cmd == "bench":
        if not rest or rest[0] not in BENCHES:
            return fail(f"bench needs one of: {', '.join(BENCHES)}")
        module = importlib.import_module(BENCHES[rest[0]])
        return run_guarded(module.main, rest[1:])
    return fail(f"unknown command {cmd!r}; use one of: generate, serve, train-digits, "
                f"train-video-digits, bench")


if __name__ == "__main__":
    sys.exit(main())
