"""Sections that a later stage adds to a written release: ``saejax analyze`` is the one.

    <release>/<key>/            the section's files (plots), replaced as a whole
    <release>/suite.json        gains "<key>": the section's summary (replaced)
    <release>/README.md         gains the section between <!-- saejax:<key> --> and <!-- /saejax:<key> -->

Idempotent: annotating again replaces the section. A new ``saejax release`` writes the folder anew,
without the section, and the stage that adds it sees that and runs again (its ``is_complete``).
"""
from __future__ import annotations

import json
import os
import re
import shutil

from saejax.files import atomic_dir
from saejax.release.errors import ReleaseError


def _markers(key: str) -> tuple[str, str]:
    return f"<!-- saejax:{key} -->", f"<!-- /saejax:{key} -->"


def annotate(root: str, key: str, summary: dict, markdown: str, files: dict[str, str] = ()) -> None:
    """Add (or replace) section ``key`` of the release at ``root``: ``files`` (name -> source path)
    copied into ``<root>/<key>/``, ``summary`` as suite.json's ``key``, ``markdown`` as a README
    section. Each file is replaced through a temporary name."""
    suite_path, readme = os.path.join(root, "suite.json"), os.path.join(root, "README.md")
    if not os.path.isfile(suite_path):
        raise ReleaseError(f"{suite_path}: no release to annotate (run saejax release first)")
    if not re.fullmatch(r"[a-z_]+", key) or key == "saes":
        raise ReleaseError(f"annotation key {key!r} must be lowercase letters and '_', not 'saes'")
    out = os.path.join(root, key)
    with atomic_dir(out) as tmp:
        for name, src in dict(files).items():
            shutil.copyfile(src, os.path.join(tmp, name))
    with open(suite_path) as fh:
        suite = json.load(fh)
    suite[key] = summary
    _write(suite_path, json.dumps(suite, indent=1))
    text = open(readme).read() if os.path.isfile(readme) else ""
    begin, end = _markers(key)
    text = re.sub(rf"\n*{re.escape(begin)}.*?{re.escape(end)}\n?", "\n", text, flags=re.S).rstrip("\n")
    _write(readme, f"{text}\n\n{begin}\n{markdown.strip()}\n{end}\n")


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
