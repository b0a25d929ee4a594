"""Every code example in README.md and docs/*.md runs, so a documented example cannot go stale.

How a document's fenced blocks are treated (the convention for whoever writes docs):
- ```python blocks run in file order in one namespace per document (a block may use names an
  earlier block of the same document defined), in a fresh working folder in which the checkout's
  top-level folders are visible, as from the repository root; what they write stays there.
- ```toml blocks are recipes: each must load with refquant.load_recipe.
- ```bash / ```sh blocks: every `python3 -m refquant ...` line runs (refquant's command line, in
  this process) and must exit 0; any other command makes the test fail unless the block is marked.
- `<!-- file: NAME -->` on the line before a block writes the block to NAME in the working folder
  before the document's first block runs (a recipe a later command or Python block loads).
- `<!-- not run: REASON -->` on the line before a block skips it; the reason is in the document.
- Other blocks (```text, ```yaml, no language) are output, layouts or pseudo-code: not run.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import REPO

import refquant as rq
from refquant.cli import main

DOCUMENTS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
RUN_LANGUAGES = {"python", "toml", "bash", "sh"}
# Documents whose examples are known to fail until they are rewritten; strict: once they run, the
# entry must go.
PENDING: dict[str, str] = {}
FENCE = re.compile(r"^```(?P<language>[\w+-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
MARKER = re.compile(r"^<!--\s*(?P<kind>not run|file):\s*(?P<value>.+?)\s*-->$")
CHECKOUT_FOLDERS = ("refquant", "tests", "scripts", "benchmarks", "docs")


@dataclass
class Block:
    document: str
    line: int  # of the opening fence, 1-based
    language: str
    body: str
    not_run: str | None = None  # the reason given
    file: str | None = None


def code_blocks(document: str) -> list[Block]:
    """Every fenced block of `document` with the marker on the line before it, if any."""
    text = (REPO / document).read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[:match.start()].rstrip("\n").rpartition("\n")[2].strip()
        block = Block(document, line, match.group("language").lower(), match.group("body"))
        marker = MARKER.match(before)
        if marker and marker.group("kind") == "not run":
            block.not_run = marker.group("value")
        elif marker:
            block.file = marker.group("value")
        blocks.append(block)
    return blocks


def run_python(block: Block, namespace: dict) -> None:
    # Padded so that a traceback names the document's own line numbers.
    code = compile("\n" * block.line + block.body, str(REPO / block.document), "exec")
    exec(code, namespace)


def run_shell(block: Block) -> None:
    for offset, line in enumerate(block.body.splitlines(), start=1):
        words = shlex.split(line, comments=True)
        if not words:
            continue
        where = f"{block.document}:{block.line + offset}"
        if words[:3] != ["python3", "-m", "refquant"]:
            pytest.fail(f"{where}: `{line.strip()}` is not a refquant command, so this test cannot run it. "
                        "Put <!-- not run: REASON --> on the line before the block.")
        assert main(words[3:]) == 0, f"{where}: `{line.strip()}` failed"


def run_toml(block: Block, folder: Path) -> None:
    path = folder / (block.file or f"block_at_line_{block.line}.toml")
    if block.file is None:
        path.write_text(block.body, encoding="utf-8")
    recipe = rq.load_recipe(path)
    assert recipe.quant_cfg, f"{block.document}:{block.line}: the recipe has no rules"


@pytest.mark.parametrize("document", [
    pytest.param(d, marks=pytest.mark.xfail(reason=PENDING[d], strict=True)) if d in PENDING else d for d in DOCUMENTS
])
def test_every_code_example_in_the_document_runs(document, tmp_path, monkeypatch):
    blocks = code_blocks(document)
    for name in CHECKOUT_FOLDERS:
        (tmp_path / name).symlink_to(REPO / name, target_is_directory=True)
    for block in blocks:
        if block.file is not None:
            (tmp_path / block.file).write_text(block.body, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__doc_example__"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for block in blocks:
            if block.not_run is not None or block.language not in RUN_LANGUAGES:
                continue
            if block.language == "python":
                run_python(block, namespace)
            elif block.language == "toml":
                run_toml(block, tmp_path)
            else:
                run_shell(block)


def test_a_block_marked_not_run_gives_its_reason_and_is_a_block_that_would_run():
    """A marker is only for blocks this test would otherwise run, and it states why."""
    for document in DOCUMENTS:
        for block in code_blocks(document):
            if block.not_run is not None:
                assert block.language in RUN_LANGUAGES, f"{document}:{block.line}: a marker on a block that never runs"
                assert len(block.not_run) >= 8, f"{document}:{block.line}: say why the block is not run"
