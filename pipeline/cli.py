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
    "score": ("pipeline.score", "clip table -> p-MOS per clip (Ray job)"),
    "quantize": ("pipeline.quantize", "p-MOS -> corpus stats, quality level 1..5 and text prefix"),
    "caption": ("pipeline.caption", "LLM caption candidates, chosen by CLAP"),
    "export": ("pipeline.export", "caption table -> WebDataset shards, index and dataset card"),
    "verify": ("pipeline.verify", "re-read shards and check counts, keys, audio and JSON"),
    "curate": ("pipeline.curate", "ingest -> score -> quantize -> caption -> export as one job"),
    "convert-qama": ("model.pmos", "convert QAMA fairseq checkpoints to a local wav2vec2 p-MOS folder"),
    "train": ("model.train", "train QA-MDT on mosaiq shards"),
    "generate": ("model.generate", "generate audio for a prompt at a quality level"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: mosaiq COMMAND [options]   (mosaiq COMMAND --help for a command's options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


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
    try:
        return int(module.cli(rest) or 0)
    except (FileNotFoundError, ValueError) as e:  # bad paths, values and configs: no traceback
        if os.environ.get("MOSAIQ_DEBUG"):
            raise
        print(f"mosaiq {name}: {e}  (MOSAIQ_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
