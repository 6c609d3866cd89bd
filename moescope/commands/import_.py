"""`moescope import FORMAT SRC DST`: turn routing traces other frameworks write into a moescope trace run."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from ..errors import CLIError


def _formats_text() -> str:
    from ..importers import IMPORTERS

    out = ["formats (what each reads):"]
    for imp in IMPORTERS.values():
        out.append(f"  {imp.name}")
        out += textwrap.wrap(imp.reads, 100, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(out)


EPILOG_TAIL = """
examples:
  moescope import megatron routing/ traces --num-experts 64 --micro-batch-size 4
  moescope import sglang /tmp/expert_distribution/expert_distribution_recorder_1718000000.0_0.pt traces
  moescope import vllm-routed requests/ traces --num-experts 128 --layers 1-47
  moescope import vllm-eplb eplb_state.pt traces --run serve-eplb
  moescope check traces && moescope report traces

exit codes: 0 imported; 2 bad usage (unknown format, missing or unused option, DST/RUN exists);
3 unreadable or damaged source file (the message names it).
"""



def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `import` command to the CLI."""
    from ..importers import IMPORTERS

    p = subparsers.add_parser(
        "import",
        help="convert Megatron-Core, SGLang or vLLM routing dumps into a moescope trace",
        description="Read routing that another framework already wrote (SRC: a file, or a directory of the "
        "format's files) and write it as run RUN under trace root DST, through moescope's trace writer: "
        "check, report, sql and the dashboard then read it like a recorded run. Loads are exact sums of the "
        "source; what the source does not hold (router probabilities, logits) is left empty, never 0.",
        epilog=_formats_text() + "\n" + EPILOG_TAIL,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("format", metavar="FORMAT", choices=list(IMPORTERS), help=f"one of: {', '.join(IMPORTERS)}")
    p.add_argument("src", metavar="SRC", help="source file, or a directory of the format's files")
    p.add_argument("dst", metavar="DST", help="trace root to write the run into (created if missing)")
    p.add_argument("--run", metavar="RUN", help="run name (default: SRC's name without its extension)")
    p.add_argument("--tag", metavar="TAG", default="", help="tag of every imported step (default: none)")
    p.add_argument("--num-experts", type=_positive, metavar="N",
                   help="experts per layer (logical); required where the source holds only ids (megatron "
                   "top-k indices, vllm-routed), else checked against the source")
    p.add_argument("--top-k", type=_positive, metavar="K",
                   help="routes per token, for the manifest where the source does not say (sglang stat, vllm-eplb)")
    p.add_argument("--layers", metavar="SPEC",
                   help="keep only these source layers, e.g. '1-26' (vLLM fills dense layers with expert 0 "
                   "at top-1, where they cannot be told from a collapsed router)")
    p.add_argument("--micro-batch-size", type=_positive, metavar="B",
                   help="megatron: tokens are [seq, batch] flattened; B splits them into sequences")
    p.add_argument("--physical-to-logical", metavar="FILE",
                   help="vllm-routed, vllm-eplb: physical->logical expert map [layers, physical] (.npy or .pt) "
                   "when the source holds physical slots and no map of its own")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Import, then print what was written and any notes (left-out layers, slot mapping, step numbering)."""
    from ..importers import ImportOptions, get, parse_layers
    from ..importers._base import OPTION_HELP, Progress, list_sources, write_import

    imp = get(args.format)
    given = {k for k in OPTION_HELP if getattr(args, k, None) is not None}
    unused = sorted(given - set(imp.options))
    if unused:
        raise CLIError(f"{', '.join(OPTION_HELP[k] for k in unused)} is not used by format {imp.name} "
                       f"(it reads: {', '.join(OPTION_HELP[k] for k in imp.options) or 'no options'})")
    run_name = args.run or Path(args.src).name.split(".")[0] or imp.name
    if "/" in run_name or "\\" in run_name or run_name.startswith("."):
        raise CLIError(f"--run {run_name!r}: a run name is one directory name, not starting with '.'")
    opts = ImportOptions(
        num_experts=args.num_experts, top_k=args.top_k,
        layers=parse_layers(args.layers) if args.layers else None,
        micro_batch_size=args.micro_batch_size,
        physical_to_logical=Path(args.physical_to_logical) if args.physical_to_logical else None,
        tag=args.tag,
    )
    files = list_sources(Path(args.src), imp.patterns)
    summary = write_import(imp, files, Path(args.dst), run_name, opts, Progress(len(files), quiet=args.quiet))
    sys.stdout.write(summary.text() + "\n")
    return 0
