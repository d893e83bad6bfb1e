"""Regenerate the measured sections of docs/RESULTS.md from the JSON files saved beside it.

Every table, interval and verdict in docs/RESULTS.md sits between a pair of markers

    <!-- generated:NAME:begin -->
    ...
    <!-- generated:NAME:end -->

and is written by this script from ``docs/<json>`` through the renderer of the tool that measured
it (``tools/reproduce.py`` or ``tools/smoothing_study.py``), so no number in those blocks is typed
by hand: change the JSON, rerun, and the text follows. The figure each tool draws is written to
``docs/`` under the section's name. ``--check`` renders in memory and exits 1 when the file
differs from what its JSON gives (the test suite runs it).

    python tools/render_results.py            # rewrite the blocks and the figures
    python tools/render_results.py --check    # is docs/RESULTS.md what its JSON says?
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Section:
    """One generated block: which tool renders it, from which JSON, and the figure it draws."""

    tool: str
    json_name: str
    figure: str
    figure_name: str
    caption: str


SECTIONS: dict[str, Section] = {
    "reproduce-mnist": Section("reproduce.py", "results-mnist.json", "fig2a.png", "fig2a-mnist.png",
                               "max singular value per layer, MNIST"),
    "smoothing-mnist": Section("smoothing_study.py", "smoothing-mnist.json", "certified_accuracy.png",
                               "certified-accuracy-mnist.png", "certified accuracy against radius, MNIST"),
    "smoothing-mnist-n10k": Section("smoothing_study.py", "smoothing-mnist-n10k.json", "certified_accuracy.png",
                                    "certified-accuracy-mnist-n10k.png",
                                    "certified accuracy against radius, MNIST, n = 10,000 on 500 images"),
    "sampler-mnist": Section("sampler_comparison.py", "sampler-mnist.json", "certified_accuracy_samplers.png",
                             "certified-accuracy-samplers-mnist.png",
                             "certified accuracy against radius, fp32 and int8 smoothing samplers, MNIST"),
    "baselines-mnist": Section("diagnose_baselines.py", "diagnose-baselines.json", "loss_curves.png",
                               "baselines-loss-curves-mnist.png",
                               "training loss per attention kind and learning rate, MNIST"),
    "mnist-certified": Section("mnist_certified.py", "mnist-certified.json", "certified_accuracy_vs_published.png",
                               "certified-accuracy-vs-published-mnist.png",
                               "certified accuracy against radius, ours and published, MNIST 1x28x28"),
    "reproduce-digits": Section("reproduce.py", "results-digits.json", "fig2a.png", "fig2a-digits.png",
                                "max singular value per layer, digits"),
}
_BLOCK = re.compile(r"(<!-- generated:(?P<name>[\w-]+):begin -->\n)(?P<body>.*?)(<!-- generated:(?P=name):end -->)",
                    re.DOTALL)


def _load_tool(file_name: str) -> ModuleType:
    """A script of tools/ as a module (tools/ is not a package)."""
    name = Path(file_name).stem
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / file_name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def render_section(name: str, docs: Path, draw: bool) -> str:
    """The block's markdown from its JSON; with ``draw``, its figure is written to ``docs``."""
    if name not in SECTIONS:
        raise ValueError(f"docs/RESULTS.md has a generated block {name!r} that this script does not know; "
                         f"known: {', '.join(SECTIONS)}")
    section = SECTIONS[name]
    source = docs / section.json_name
    if not source.is_file():
        raise ValueError(f"block {name!r} is rendered from {source}, which does not exist")
    results = json.loads(source.read_text())
    tool = _load_tool(section.tool)
    if draw:
        with tempfile.TemporaryDirectory() as folder:
            tool.write_reports(results, Path(folder))
            shutil.copyfile(Path(folder) / section.figure, docs / section.figure_name)
            text = (Path(folder) / "results.md").read_text()
    else:
        text = tool.render(tool._per_seed_layout(results) if hasattr(tool, "_per_seed_layout") else results)
    text = text.replace(f"`{section.figure}`", f"`{section.figure_name}`")
    return (f"Rendered by `tools/render_results.py` from `docs/{section.json_name}`.\n\n{text.rstrip()}\n\n"
            f"![{section.caption}]({section.figure_name})\n")


def render_document(document: str, docs: Path, draw: bool) -> str:
    """``document`` with every generated block replaced by what its JSON gives."""
    names = [m.group("name") for m in _BLOCK.finditer(document)]
    begins = re.findall(r"<!-- generated:([\w-]+):begin -->", document)
    if sorted(names) != sorted(begins):
        unmatched = sorted(set(begins) - set(names))
        raise ValueError(f"generated block(s) without an end marker: {', '.join(unmatched)}")
    return _BLOCK.sub(lambda m: m.group(1) + render_section(m.group("name"), docs, draw) + m.group(4), document)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "RESULTS.md",
                        help="the document whose generated blocks to render (its JSON files sit beside it)")
    parser.add_argument("--check", action="store_true",
                        help="render in memory, write nothing, exit 1 when the document differs")
    args = parser.parse_args(argv)
    try:
        document = args.doc.read_text()
        rendered = render_document(document, args.doc.parent, draw=not args.check)
    except (OSError, ValueError) as err:
        print(f"render_results: {err}", file=sys.stderr)
        return 2
    if args.check:
        if rendered != document:
            stale = [m.group("name") for m, n in zip(_BLOCK.finditer(document), _BLOCK.finditer(rendered))
                     if m.group("body") != n.group("body")]
            print(f"{args.doc}: generated block(s) differ from their JSON: {', '.join(stale)}; run "
                  "python tools/render_results.py", file=sys.stderr)
            return 1
        print(f"{args.doc}: every generated block matches its JSON")
        return 0
    args.doc.write_text(rendered)
    print(f"rendered {len(list(_BLOCK.finditer(rendered)))} block(s) into {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
