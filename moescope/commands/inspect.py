"""`moescope inspect`: which routers moescope finds in a model, and how it would hook them."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

EXAMPLES = """examples:
  moescope inspect hf:mixtral                 a transformers family, default config, built on the meta device
  moescope inspect ./my-checkpoint            a HF checkpoint folder (reads config.json only, no weights)
  moescope inspect reference                  the bundled reference MoE
  moescope inspect mypkg.models:build_model   any callable returning an nn.Module
"""


def register(sub: Any) -> None:
    """Add the `inspect` command."""
    p = sub.add_parser(
        "inspect",
        help="list the MoE routers moescope finds in a model and how each is hooked",
        description="Build the model without weights (meta device) where possible and list every router moescope "
        "recognises: layer, module path, family, experts, top-k and how ids/weights are read.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL_OR_CHECKPOINT", help="hf:<model_type>, a checkpoint folder or config.json, "
                   "'reference', or module:callable")
    p.add_argument("--format", choices=["table", "json"], default="table", help="output format (default: table)")
    p.set_defaults(func=run)


def load_model(spec: str) -> Any:
    """Build the model named by `spec` (see `moescope inspect --help`), without real weights where possible."""
    from ..errors import CLIError

    try:
        import torch
    except ImportError:
        raise CLIError("inspect needs torch: pip install 'moescope[torch]'") from None
    if spec == "reference" or spec.startswith("reference:"):
        from ..reference.model import MoEConfig, MoEModel

        return MoEModel(MoEConfig())
    path = Path(spec)
    if spec.startswith("hf:") or path.exists():
        try:
            import transformers
        except ImportError:
            raise CLIError("inspecting a transformers model needs: pip install 'moescope[hf]'") from None
        if spec.startswith("hf:"):
            try:
                config = transformers.AutoConfig.for_model(spec[3:])
            except ValueError:
                raise CLIError(f"unknown transformers model_type {spec[3:]!r}") from None
        else:
            cfg_path = path if path.is_file() else path / "config.json"
            if not cfg_path.is_file():
                raise CLIError(f"{spec}: no config.json found")
            try:
                config = transformers.AutoConfig.from_pretrained(str(cfg_path.parent if cfg_path.name == "config.json"
                                                                     else cfg_path))
            except (OSError, ValueError) as e:
                raise CLIError(f"{cfg_path}: cannot read config ({e})") from None
        with torch.device("meta"):
            for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForSeq2SeqLM, transformers.AutoModel):
                try:
                    return auto.from_config(config)
                except ValueError:
                    continue
        raise CLIError(f"transformers has no model class for {type(config).__name__}")
    if ":" in spec:
        mod_name, attr = spec.split(":", 1)
        try:
            obj = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise CLIError(f"cannot import {spec}: {e}") from None
        if callable(obj) and not isinstance(obj, torch.nn.Module):
            try:
                obj = obj()
            except Exception as e:  # noqa: BLE001 - a user's builder failing is their input's error, one line
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise CLIError(f"{spec}: calling it failed ({type(e).__name__}: {first})", 2) from None
        if not isinstance(obj, torch.nn.Module):
            raise CLIError(f"{spec}: gave a {type(obj).__name__}, not a torch.nn.Module", 2)
        return obj
    raise CLIError(f"{spec}: not a path, 'hf:<model_type>', 'reference' or module:callable")


def inspect_model(model: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """(routers found, router-like modules with no spec) for a model."""
    from ..capture import adapters as A
    from ..capture.recorder import find_routers

    found = find_routers(model)
    rows = [
        {
            **li.to_manifest(),
            "class": type(model.get_submodule(li.module)).__name__,
            "hooked": A.describe(li.spec),
        }
        for li in found
    ]
    hooked = {li.module for li in found}
    suspicious = sorted(
        {
            type(m).__name__
            for name, m in model.named_modules()
            if name not in hooked
            and any(w in type(m).__name__.lower() for w in ("router", "gate", "gating"))
            and not any(name.startswith(h + ".") for h in hooked)
        }
    )
    return rows, suspicious


def run(args: argparse.Namespace) -> int:
    """Print the routers of a model."""
    model = load_model(args.model)
    rows, suspicious = inspect_model(model)
    if args.format == "json":
        print(json.dumps({"model": type(model).__name__, "routers": rows, "unrecognised": suspicious}, indent=2))
        return 0 if rows else 1
    print(f"{type(model).__name__}: {len(rows)} router(s) found")
    if rows:
        hdr = ("layer", "module", "class", "family", "E", "k", "how")
        table = [(str(r["layer"]), r["module"], r["class"], r["family"], str(r["n_experts"]), str(r["top_k"]),
                  r["hooked"]) for r in rows]
        widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(hdr)]
        print("  ".join(h.ljust(w) for h, w in zip(hdr, widths)))
        for t in table:
            print("  ".join(c.ljust(w) for c, w in zip(t, widths)))
    if suspicious:
        print(f"router-like modules with no spec: {', '.join(suspicious)} — register them with "
              "moescope.register_router(...)")
    if not rows:
        print("no router recognised: see README 'Custom routers' for moescope.register_router")
        return 1
    return 0
