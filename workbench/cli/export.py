"""`python -m workbench export`: build and measure one method, and write the file a user deploys.

    export --model M --method gguf:type=Q4_K_M --out DIR [--max-tokens N] [--decode-tokens N]

Writes DIR/<model>-<type>.gguf, DIR/Modelfile (Ollama) and DIR/results.json (the row measured on
that file), and prints the row. Measured in this process; progress goes to stderr.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path


def add_export_parser(sub) -> None:
    """Register the `export` subcommand on the CLI's subparsers."""
    cmd = sub.add_parser("export", help="quantize, measure and write the file for llama.cpp / Ollama (gguf methods)")
    cmd.add_argument(
        "--model",
        default="bundled",
        help="short name (bundled), .gguf file, or a fine-tune merged by the workbench from one (its folder)",
    )
    cmd.add_argument("--method", required=True, help="e.g. gguf:type=Q4_K_M (methods that can be exported: gguf)")
    cmd.add_argument("--out", required=True, help="an empty or new folder: nothing in it is replaced")
    cmd.add_argument(
        "--eval-text", default=None, help="plain UTF-8 text file to evaluate on (default: Python's pydoc topics)"
    )
    cmd.add_argument("--max-length", type=int, default=512, help="tokens per perplexity window (default 512)")
    cmd.add_argument("--stride", type=int, default=None, help="window step (default: = max-length, no overlap)")
    cmd.add_argument("--max-tokens", type=int, default=4096, help="evaluate on the first N tokens (0 = all)")
    cmd.add_argument("--allow-long-eval", action="store_true", help="measure a text of more than a million tokens")
    cmd.add_argument("--decode-tokens", type=int, default=32, help="tokens generated to time decoding (0 = skip)")
    cmd.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    cmd.add_argument("--trust-remote-code", action="store_true", help="let the model's own Python code run")
    cmd.set_defaults(run=export_command)


def export_command(args) -> int:
    from workbench import methods
    from workbench.cli.compare import _eval_config, _model_spec, library_log_path, log
    from workbench.core import quiet
    from workbench.run import export, results, runner

    choice = export.check_exportable(methods.parse(args.method))  # before the model is opened
    spec, eval_cfg = _model_spec(args), _eval_config(args)
    quiet.import_libraries(library_log_path())
    session = runner.Session.open(spec, eval_cfg, log)
    with contextlib.redirect_stdout(sys.stderr):  # libraries print progress: keep stdout for the row
        exported = export.export(session, choice, Path(args.out), log)
    print(results.format_table([exported.result]))
    print("\nWrote " + ", ".join(str(path) for path in exported.files))
    return 0
