"Shared pytest fixtures: the real processor files and M3CoT questions in ../shared/fixtures (never copied into the project)."
import os, shutil, sys
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get('STL_FIXTURES', REPO.parent/'shared'/'fixtures'))
# the installed `stl_run` command: beside this Python first (a venv not on PATH), else on PATH; None when not installed
STL_RUN = next((p for p in (Path(sys.executable).parent/'stl_run', shutil.which('stl_run')) if p and Path(p).exists()), None)

def fixture_dir(name):
    "Path of one fixture folder, or skip the test with the reason when it is absent."
    p = FIXTURES/name
    if not p.exists(): pytest.skip(f"fixture folder {p} is absent (set STL_FIXTURES to the shared/fixtures folder)")
    return p

@pytest.fixture
def llava_dir(): return fixture_dir('llava-1.5-7b-hf')

@pytest.fixture
def qwen_dir(): return fixture_dir('qwen2.5-vl-7b-instruct')

@pytest.fixture
def m3cot_dir(): return fixture_dir('m3cot-sample')


# ---------------------------------------------------------------- helpers shared by tests and chapters (06b, 08 import them)

class Crash(Exception):
    "The exception `crash_after` raises: a run killed in the middle, as far as the code under test can tell."

def crash_after(n):
    "An `on_batch` hook that raises `Crash` at the `n`-th batch (generation resumes from what was written before)."
    seen = []
    def f(new):
        seen.append(new)
        if len(seen) == n: raise Crash()
    return f

def written(s, w, caption=True):
    "A ground-truth negative for option `w` of world sample `s`: the caption, the reasoning up to the answer, why `w` is not it."
    from stl_nb.data import letter
    from stl_nb.templates import render_negative
    r = s.meta['reasoning']; body = r[:r.rfind('so the answer is')].strip()
    expl = f"{body} so the answer is {s.answer_text}, not {s.choices[w]}. option ({letter(w)}) {s.choices[w]} is wrong."
    return render_negative(s.meta['caption'], expl, caption_section=caption)
