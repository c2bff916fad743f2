"""`medcl info`: version, devices, methods and templates, without loading any weights."""

from __future__ import annotations

import json

from medcl_cli.cli import console
from medcl_cli.cli.options import JsonOpt


def info(as_json: JsonOpt = False) -> None:
    """Show the version, the device medcl would use, each method (stages, the data it needs, paper, the
    command that runs it) and the config templates with their paths, without loading any weights.

    Example: medcl info --json
    """
    from medcl_cli.catalog.info import collect_info

    data = collect_info()
    if as_json:
        console.result(json.dumps(data, indent=2))
        return
    console.result(f"medcl {data['version']}")
    for k, v in data["versions"].items():
        console.result(f"  {k:<10} {v}")
    console.result(f"device: {data['device']}")
    console.result("methods:")
    for name, m in data["methods"].items():
        console.result(f"  {name:<11} stages={','.join(m['stages'])}  needs: {m['needs']}")
        console.result(f"  {'':<11} {m['title']}" + (f" ({m['citation']})" if m["citation"] not in ("", "-") else ""))
        for line in m["usage"]:
            console.result(f"  {'':<11} {line}")
    console.result("templates (copy one, edit it, pass it with --config):")
    for name, t in data["template_details"].items():
        console.result(f"  {name:<11} {t['description']}")
        console.result(f"  {'':<11} {t['path']}")
