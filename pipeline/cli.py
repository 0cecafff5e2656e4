"""`mosaiq` command line: a thin dispatcher to each stage's own argument parser.

Each subcommand lives in its module as `cli(argv) -> int`; modules are imported only when
their command runs, so `mosaiq --help` is fast and a broken optional extra breaks only its
own command.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

COMMANDS = {
    # name: (module, one-line help)
    "sample": ("pipeline.synth", "write the bundled synthetic music sample (clean + degraded clips)"),
    "ingest": ("pipeline.ingest", "folder or manifest of audio -> clip table"),
    "analyze": ("pipeline.analyze", "clip table -> measured facts (loudness, bandwidth, tempo, key, drums) and defect flags"),
    "score": ("pipeline.score", "clip table -> p-MOS per clip (Ray job)"),
    "quantize": ("pipeline.quantize", "p-MOS -> corpus stats, quality level 1..5 and text prefix"),
    "caption": ("pipeline.caption", "LLM caption candidates, chosen by CLAP"),
    "export": ("pipeline.export", "caption table -> WebDataset shards, index and dataset card"),
    "verify": ("pipeline.verify", "re-read shards and check counts, keys, audio and JSON"),
    "curate": ("pipeline.curate", "ingest -> analyze -> score -> quantize -> caption -> export -> verify as one job"),
    "convert-qama": ("model.qama", "convert QAMA fairseq checkpoints to a local wav2vec2 p-MOS folder"),
    "encode": ("model.encode", "shards -> shards with each sample's latent and text states, for training (Ray job)"),
    "train": ("model.train", "train QA-MDT on mosaiq shards"),
    "generate": ("model.generate", "generate audio for a prompt at a quality level"),
    "evaluate": ("model.evaluate", "CLAP score and FAD of a checkpoint's generations against reference audio"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: mosaiq COMMAND [options]   (mosaiq COMMAND --help for a command's options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


# what a user can fix: bad paths, values, configs, folders, missing columns
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
TRACEBACK_FILE = "mosaiq-last-error.log"


def user_error(exc: BaseException) -> BaseException | None:
    """The user error at the root of `exc`, through Ray's task wrappers; None if there is none.

    A `RayTaskError` subclasses its cause's type but prints the whole remote traceback, so its
    `cause` is read first."""
    seen: BaseException | None = exc
    for _ in range(16):
        if seen is None:
            return None
        inner = getattr(seen, "cause", None)
        if isinstance(inner, BaseException) and inner is not seen:
            seen = inner
            continue
        if isinstance(seen, USER_ERRORS):
            return seen
        seen = seen.__cause__
    return None


def run_command(name: str, fn, argv: list[str] | None) -> int:
    """Run a command's `cli(argv)`: a user error (even one raised inside a Ray task) prints as
    one line with exit code 2, its traceback goes to a log file; anything else raises."""
    try:
        return int(fn(argv) or 0)
    except Exception as e:  # noqa: BLE001 - sorted into user errors and the rest below
        err = user_error(e)
        if err is None or os.environ.get("MOSAIQ_DEBUG"):
            raise
        import tempfile
        import traceback

        path = os.path.join(tempfile.gettempdir(), TRACEBACK_FILE)
        with open(path, "w", encoding="utf-8") as f:
            traceback.print_exception(e, file=f)
        logging.getLogger("mosaiq").debug("traceback written to %s", path)
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"mosaiq {name}: {message}  (traceback in {path}; MOSAIQ_DEBUG=1 shows it)", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mosaiq: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(COMMANDS[name][0])
    return run_command(name, module.cli, rest)


if __name__ == "__main__":
    sys.exit(main())
