"""The README's table of supported models says what the code and the tests do:
every listed model type is partitioned, every partitioned type is listed, and
each task the table marks "yes" is covered by the split-equals-monolithic test."""

from __future__ import annotations

import re

from conftest import DECODERS, FAMILIES as TESTED
from split.families import FAMILIES
from split.launch import ROOT


def table_rows() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    start = text.index("| family | model types | classification | causal-lm |")
    rows = []
    for line in text[start:].splitlines()[2:]:
        line = line.strip()
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_the_readme_table_lists_exactly_the_supported_model_types_and_their_tested_tasks():
    listed, causal = set(), set()
    for family, types, classification, causal_lm, *_ in table_rows():
        if family == "detected":
            continue
        names = set(re.findall(r"`([a-z0-9_]+)`", types))
        listed |= names
        assert classification == "yes"
        if causal_lm == "yes":
            causal |= names
    supported = {t for fam in FAMILIES for t in fam.model_types}
    assert listed == supported
    assert listed <= set(TESTED), "a listed model type has no equivalence test"
    assert causal <= set(DECODERS), "a type marked causal-lm has no causal-lm equivalence test"
    assert {t for fam in FAMILIES if "causal-lm" in fam.heads for t in fam.model_types} == causal
