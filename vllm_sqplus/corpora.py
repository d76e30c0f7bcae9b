"""Fixed texts for calibration and evaluation, disjoint by construction, shipped with every Python.

No model hub or data set is reachable on the machines this project runs on, so the texts come from
the running Python's own standard library (the same bytes on every machine with the same Python):

  calibration (default of `sqplus smooth`, and what the peers in benchmarks/peers are given):
      CALIB_CODE_FILES, 24 stdlib modules (Python code with English docstrings and comments),
      cut into blocks and interleaved so that every sample mixes several modules;
  held-out code (evaluation):
      EVAL_CODE_FILES, 12 other stdlib modules (benchmarks/accuracy.py has used them since session 1);
  held-out English (evaluation):
      the prose of the Python reference manual that pydoc ships (pydoc_data/topics.py), English text
      with a little inline code; never part of calibration;
  calibration prose (only in `--calib stdlib+prose`):
      CALIB_PROSE_FILES, the English documents IDLE and the interpreter ship (IDLE's help page as
      text, its change logs and notes, the licence): prose about Python that is not the reference
      manual, so the held-out English stays unseen.

HumanEval is never part of any of these, so calibrating on the default cannot leak into the
HumanEval score. The two file lists share no file (checked at import).
"""
from __future__ import annotations

import ast
import re
import sysconfig
from html.parser import HTMLParser
from pathlib import Path

from vllm_sqplus.errors import SqplusError

CALIB_CODE_FILES = (
    "email/_header_value_parser.py", "http/client.py", "http/server.py", "logging/__init__.py",
    "unittest/case.py", "asyncio/base_events.py", "pathlib.py", "tarfile.py", "zipfile.py",
    "configparser.py", "inspect.py", "typing.py", "dataclasses.py", "enum.py", "pickle.py",
    "subprocess.py", "threading.py", "collections/__init__.py", "datetime.py", "_pydecimal.py",
    "ipaddress.py", "urllib/request.py", "ast.py", "shutil.py",
)
EVAL_CODE_FILES = (
    "argparse.py", "textwrap.py", "difflib.py", "heapq.py", "functools.py", "fractions.py",
    "shlex.py", "string.py", "calendar.py", "csv.py", "json/decoder.py", "statistics.py",
)
EVAL_ENGLISH_FILE = "pydoc_data/topics.py"
CALIB_PROSE_FILES = (
    "idlelib/help.html", "idlelib/NEWS.txt", "idlelib/NEWS2x.txt", "idlelib/HISTORY.txt",
    "idlelib/README.txt", "idlelib/TODO.txt", "idlelib/extend.txt", "LICENSE.txt",
)
PROSE_EVERY = 4  # stdlib+prose: one prose block after every 3 code blocks (a quarter of the blocks)
_BLOCK_CHARS = 3000

assert not set(CALIB_CODE_FILES) & set(EVAL_CODE_FILES), "calibration and evaluation files overlap"
assert EVAL_ENGLISH_FILE not in CALIB_CODE_FILES + CALIB_PROSE_FILES


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _read(rel: str) -> str:
    path = stdlib_dir() / rel
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise SqplusError(f"standard-library file {path} is missing ({e.strerror}); this Python "
                          f"installation has no full standard library: pass --calib FILE") from None


def _blocks(text: str, size: int = _BLOCK_CHARS) -> list[str]:
    """Cut text at blank lines into blocks of about `size` characters (whole lines, in order)."""
    out, cur, n = [], [], 0
    for para in text.split("\n\n"):
        cur.append(para)
        n += len(para) + 2
        if n >= size:
            out.append("\n\n".join(cur))
            cur, n = [], 0
    if cur:
        out.append("\n\n".join(cur))
    return out


def _round_robin(per_file: list[list[str]]) -> list[str]:
    """Block i of every file, then block i+1 of every file that has one, ... (so samples mix files)."""
    return [blocks[i] for i in range(max(map(len, per_file))) for blocks in per_file if i < len(blocks)]


def calibration_texts() -> list[str]:
    """The default calibration texts: blocks of CALIB_CODE_FILES, round-robin over the files."""
    return _round_robin([_blocks(_read(f)) for f in CALIB_CODE_FILES])


class _HtmlText(HTMLParser):
    """The visible text of an HTML page: no tags, scripts or styles; block elements end lines."""

    _SKIP, _BLOCK = {"script", "style", "head"}, {"p", "div", "li", "dt", "dd", "pre", "tr", "br",
                                                  "h1", "h2", "h3", "h4", "h5", "h6", "table"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in self._SKIP
        if tag in self._BLOCK:
            self.parts.append("\n\n" if tag in ("p", "pre", "table") or tag[0] == "h" else "\n")

    def handle_endtag(self, tag):
        self._skip -= tag in self._SKIP and self._skip > 0

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def _prose(rel: str) -> str:
    text = _read(rel)
    if rel.endswith(".html"):
        parser = _HtmlText()
        parser.feed(text)
        text = "".join(parser.parts)
    lines = [" ".join(line.split()) for line in text.splitlines()]  # collapse HTML's runs of spaces
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def calibration_texts_with_prose(every: int = PROSE_EVERY) -> list[str]:
    """`--calib stdlib+prose`: calibration_texts() with a block of CALIB_PROSE_FILES (round-robin
    over the files) after every `every - 1` code blocks, while prose lasts; code only after that."""
    code = calibration_texts()
    prose = _round_robin([_blocks(_prose(f)) for f in CALIB_PROSE_FILES])
    out, pi = [], 0
    for i, block in enumerate(code):
        out.append(block)
        if (i + 1) % (every - 1) == 0 and pi < len(prose):
            out.append(prose[pi])
            pi += 1
    return out


def eval_code_text() -> str:
    """Held-out Python code: EVAL_CODE_FILES joined (never calibrated on)."""
    return "\n\n".join(_read(f) for f in EVAL_CODE_FILES)


def eval_english_text() -> str:
    """Held-out English: the reference-manual topics pydoc ships, in their stored order."""
    topics = None
    for node in ast.parse(_read(EVAL_ENGLISH_FILE)).body:  # `topics = {...}`: a literal, not run
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
    if not isinstance(topics, dict) or not topics:
        raise SqplusError(f"{EVAL_ENGLISH_FILE} holds no 'topics' dict")
    return "\n\n".join(topics[k] for k in sorted(topics))
