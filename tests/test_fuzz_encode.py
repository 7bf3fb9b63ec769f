"""Fuzzing the prompt and target builders through a real processor (issue 8): any unicode question, 2-26 options of any
text, any answer; the prompt keeps every image token and every option, and the trained positions decode to the target."""
import unicodedata
import pytest
from hypothesis import given, settings, HealthCheck, strategies as st
from PIL import Image
from stl_nb.data import Sample, letter
from stl_nb.templates import chat, positive_prompt, negative_prompt, render_rationale, parse_rationale, Rationale
from stl_nb.models import VLM
import stl_nb.models as M

IMG = Image.new('RGB', (448, 448), 'white')
words = st.text(st.characters(exclude_categories=('Cs', 'Cc')), min_size=1, max_size=20).filter(str.strip)

@pytest.fixture
def qwen(qwen_dir): return VLM(None, M._load_processor(qwen_dir, 'qwen2_5_vl'), name='qwen processor')

@st.composite
def cases(draw):
    n = draw(st.integers(2, 26))
    choices = draw(st.lists(words, min_size=n, max_size=n, unique_by=lambda c: ' '.join(c.split())))
    ans = draw(st.integers(0, n - 1))
    return Sample('f', IMG, draw(words), choices, ans), draw(words), draw(words)

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(cases())
def test_any_text_any_option_count(qwen, case):
    s, cap, why = case
    target = render_rationale(Rationale(cap, why, s.answer), s.choices)
    b = qwen.encode([s.image], [chat(positive_prompt(s))], [target])
    ids, labels = b['input_ids'][0], b['labels'][0]
    assert int((ids == qwen.image_token_id).sum()) == 256                    # 448x448: every image token, never cut
    trained = labels != -100
    assert qwen.decode(labels[trained]) == unicodedata.normalize('NFC', target)   # Qwen's tokenizer normalises to NFC
    assert not trained[ids == qwen.image_token_id].any()
    assert parse_rationale(target, s.choices).answer == s.answer
    wrong = (s.answer + 1) % len(s.choices)
    assert f"({letter(wrong)})" in negative_prompt(s, wrong, show_answer=False)
