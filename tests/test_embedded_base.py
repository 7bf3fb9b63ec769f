"""The shipped embedded base against chapter 04's criteria (the paper's regime: sees well, follows the format, answers what it
reasons, reasons weakly), measured afresh on 200 questions of the held-out draw, so that a rebuild that breaks one fails here.
The criteria the present base does not meet yet are strict xfails: a rebuild that meets one makes its xfail fail, so the
mark has to go."""
import json
from dataclasses import asdict
from functools import lru_cache
import pytest
from stl_nb.embedded import (EmbeddedConfig, BASE_CRITERIA, base_scores, check_base, criteria_draw, embedded_dir,
                             greedy_replies, _jsonable)
from stl_nb.models import load_vlm
from stl_nb.templates import positive_prompt

NOT_YET = {'follows the format: unparseable replies <= 1%':
               '3% on the held-out draw: next_to reasoning misreads a neighbour and reaches a value that is no option (chapter 04)'}

@lru_cache(1)
def shipped_scores() -> dict:
    "About 15 s on 2 cores."
    vlm = load_vlm('embedded')
    judged = criteria_draw(200)
    return base_scores(judged, greedy_replies(vlm, judged, lambda s: positive_prompt(s, style=vlm.style)))

@pytest.mark.parametrize('criterion', [pytest.param(w, marks=pytest.mark.xfail(strict=True, reason=NOT_YET[w])) if w in NOT_YET else w
                                       for w, _ in BASE_CRITERIA])
def test_shipped_base_criterion(criterion):
    scores = shipped_scores()
    assert check_base(scores)[criterion], f"{criterion}: {scores}"

def test_build_json_records_the_build():
    info = json.loads((embedded_dir()/'build.json').read_text())
    assert info['config'] == _jsonable(asdict(EmbeddedConfig())), "the shipped weights must come from the default config"
    assert info['criteria']['n'] >= 300
    assert {w for w, met in check_base(info['criteria']).items() if not met} == set(NOT_YET)
    assert info['machine'] and info['seconds'] > 0
    assert len(info['losses']) == EmbeddedConfig().steps == 8600

def test_assets_are_small():
    size = sum(p.stat().st_size for p in embedded_dir().rglob('*') if p.is_file())
    assert size <= 20e6, f"the embedded assets are {size/1e6:.1f} MB (at most 20 MB)"
