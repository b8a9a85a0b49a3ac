"""``attnkit explore``: the attention explorer, served locally or exported as one HTML file.

``attnkit explore [--port N] [--open]`` serves the page on http://127.0.0.1:N/ (never on any
other address) until Ctrl-C. ``attnkit explore --export FILE.html`` writes the same page as
one self-contained file (scripts and styles inlined, the default inputs' views embedded) that
opens offline. ``--translator DIR`` and ``--gpt FILE`` say where the trained models are
(defaults: the apps' own ``out/translate`` and ``out/gpt/gpt.pt``). See ``docs/explore.md``.
"""

from __future__ import annotations

import sys
import webbrowser
from pathlib import Path

from .._cli import UsageError
from .model_view import Models
from .server import export_html, make_server

__all__ = ["add_parser"]


def _command(args) -> int:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    models = Models(args.translator, args.gpt)
    if args.export is not None:
        target = Path(args.export)
        if not target.parent.is_dir():
            raise UsageError(f"--export: directory {str(target.parent)!r} does not exist")
        if target.is_dir():
            raise UsageError(f"--export: {str(target)!r} is a directory; give a file name")
        problems = export_html(target, models)
        missing = [f"{name} ({why})" for name, why in problems.items() if why]
        print(f"wrote {target}" + (f"; without the views of: {'; '.join(missing)}"
                                   if missing else ""))
        return 0
    try:
        server = make_server(args.port, models=models, verbose=args.verbose)
    except OSError as err:
        # Not a usage error: the command was right, the port is busy (exit code 1).
        print(f"attnkit explore: error: cannot listen on 127.0.0.1:{args.port} "
              f"({err.strerror or err}); pick another port with --port, or --port 0 for any "
              f"free one", file=sys.stderr)
        return 1
    print(f"attnkit explore: serving {server.url} (Ctrl-C to stop)", flush=True)
    if args.open:
        webbrowser.open(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("attnkit explore: stopped")
    finally:
        server.server_close()
    return 0


def add_parser(subparsers) -> None:
    """Register ``attnkit explore`` (see :mod:`attnkit.cli`)."""
    parser = subparsers.add_parser(
        "explore", help="open the attention explorer in a browser (or export it as HTML)",
        description="Serve the attention explorer on 127.0.0.1: the tutorial step by step on "
                    "a sentence you type, mask patterns with the backend's choice, and the "
                    "trained translator's and GPT's attention. --export writes the page as "
                    "one self-contained HTML file instead.")
    parser.add_argument("--port", type=int, default=8765,
                        help="port on 127.0.0.1 (default 8765; 0 = any free port)")
    parser.add_argument("--open", action="store_true", help="open the page in a web browser")
    parser.add_argument("--export", metavar="FILE.html",
                        help="write the page as one offline HTML file and exit")
    parser.add_argument("--translator", default="out/translate", metavar="DIR",
                        help="the trained translator's directory (default: out/translate)")
    parser.add_argument("--gpt", default="out/gpt/gpt.pt", metavar="FILE",
                        help="the GPT checkpoint (default: out/gpt/gpt.pt)")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    parser.set_defaults(func=_command)
