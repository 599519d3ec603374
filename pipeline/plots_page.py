"""An HTML template that makes ``dvc plots show`` / ``dvc plots diff`` pages render offline.

DVC's own page loads Vega, Vega-Lite and Vega-Embed from a CDN, so without a network it stays blank. This
writes ``.dvc/plots_template.html``, a page with those libraries inlined (the self-contained bundle that
``vl-convert-python`` ships, about 0.9 MB), and points DVC at it for this clone
(``dvc config --local plots.html_template plots_template.html``; DVC resolves the path inside ``.dvc/``).
``make setup`` runs it; run it by hand after a plain ``pip install -e .``:

    python -m pipeline.plots_page

Then ``dvc plots show`` writes ``dvc_plots/index.html``, which opens in any browser with no network.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import vl_convert

from dtl.io import REPO_ROOT, write_text

TEMPLATE_NAME = "plots_template.html"

# DVC fills {refresh_tag} and {plot_divs}; {scripts} (its CDN <script> tags) is left out on purpose.
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="UTF-8">
    <title>DVC plots</title>
    <script type="text/javascript">
BUNDLE
    </script>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def page() -> str:
    """The template's text: DVC's page layout with the plotting libraries inline instead of from a CDN."""
    return PAGE.replace("BUNDLE", vl_convert.javascript_bundle())


def install(repo: Path = REPO_ROOT) -> Path:
    """Write the template into ``repo/.dvc/`` and make it this clone's default for ``dvc plots``."""
    dvc_dir = repo / ".dvc"
    if not dvc_dir.is_dir():
        raise SystemExit(f"{repo}: not a DVC repository (no .dvc/ folder); run this in the project's clone")
    path = dvc_dir / TEMPLATE_NAME
    write_text(path, page())
    done = subprocess.run([sys.executable, "-m", "dvc", "config", "--local", "plots.html_template", TEMPLATE_NAME],
                          cwd=repo, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"dvc config --local plots.html_template failed: {done.stderr.strip()}")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO_ROOT, help="the clone to set up (default: this one)")
    args = parser.parse_args(argv)
    path = install(args.repo.resolve())
    print(f"wrote {path}; `dvc plots show` pages now render offline")


if __name__ == "__main__":
    main()
