"""The fixed texts of vllm_sqplus.corpora: calibration and evaluation disjoint, and the layout of
`--calib stdlib+prose` (the default code blocks, in order, with prose blocks between them)."""
import re

import pytest

from vllm_sqplus import corpora
from vllm_sqplus.calib import load_calibration_texts


# some distributions ship idlelib (and LICENSE.txt) in a package of their own
needs_prose = pytest.mark.skipif(not all((corpora.stdlib_dir() / f).is_file() for f in corpora.CALIB_PROSE_FILES),
                                 reason="this Python has no idlelib / LICENSE.txt")


@needs_prose
def test_prose_mix_keeps_the_code_and_interleaves_prose():
    code = corpora.calibration_texts()
    mixed = corpora.calibration_texts_with_prose()
    prose = [b for b in mixed if b not in set(code)]
    assert load_calibration_texts("stdlib+prose") == mixed
    assert [b for b in mixed if b in set(code)] == code            # every code block, in order
    every = corpora.PROSE_EVERY
    # while prose lasts, position every-1, 2*every-1, ... holds a prose block, the rest code
    for i, block in enumerate(mixed[: every * len(prose)]):
        assert (block in prose) == ((i + 1) % every == 0), i
    assert len(prose) > 40 and sum(map(len, prose)) > 150_000      # ~210 KB of documents, all used
    html = corpora._prose("idlelib/help.html")
    # tags gone, text kept (the page's own text has a literal "<same args>")
    assert "IDLE" in html and not re.search(r"</?(p|div|span|a|li|ul|dl|dt|dd|h\d|pre|table|br)[\s>/]", html)
    assert "  " not in html                                         # HTML's runs of spaces collapsed


@needs_prose
def test_calibration_never_contains_evaluation_text():
    calib = "\n".join(corpora.calibration_texts_with_prose())
    for text in (corpora.eval_code_text(), corpora.eval_english_text()):
        # 300 pieces of 300 characters spread over each held-out text: none is in the calibration
        step = max(1, len(text) // 300)
        pieces = [text[i:i + 300] for i in range(0, len(text) - 300, step)]
        assert len(pieces) >= 300 and not [p for p in pieces if p in calib]
