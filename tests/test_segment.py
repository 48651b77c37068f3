"""Word segmentation: backends agree, spans tile the text, user words, clear errors."""
import numpy as np
import pytest

from megatron_cmbert.data.segment import Segmenter, segment_batch


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown segmenter 'pkuseg'.*rjieba, jieba"):
        Segmenter("pkuseg")


@pytest.mark.parametrize("backend", ["rjieba", "jieba"])
def test_spans_tile_the_text(backend):
    text = "我们在北京天安门广场吃了一碗面，Hello World 3.14元！\n第二行"
    spans = Segmenter(backend).spans(text)
    assert spans.dtype == np.int32 and spans.shape[1] == 2
    assert spans[0, 0] == 0 and spans[-1, 1] == len(text)
    np.testing.assert_array_equal(spans[1:, 0], spans[:-1, 1])  # contiguous, no gaps
    assert "".join(text[s:e] for s, e in spans) == text
    assert text[spans[0, 0]:spans[0, 1]] == "我们"


@pytest.mark.parametrize("backend", ["rjieba", "jieba"])
def test_user_words_are_kept_whole(backend):
    text = "模态注意力机制很强"
    plain = [text[s:e] for s, e in Segmenter(backend).spans(text)]
    assert "模态注意力机制" not in plain
    with_user = [text[s:e] for s, e in Segmenter(backend, user_words=["模态注意力机制"]).spans(text)]
    assert "模态注意力机制" in with_user
    # user words stay private to their Segmenter
    assert [text[s:e] for s, e in Segmenter(backend).spans(text)] == plain


def test_user_dict_file(tmp_path):
    path = tmp_path / "user.dict"
    path.write_text("模态注意力机制 10\n\n", encoding="utf-8")
    words = [w for w in map(lambda se: "模态注意力机制很强"[se[0]:se[1]],
                            Segmenter("rjieba", user_dict=str(path)).spans("模态注意力机制很强"))]
    assert words[0] == "模态注意力机制"
    path.write_text("词 x\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"user.dict:1: frequency 'x'"):
        Segmenter("rjieba", user_dict=str(path))


def test_segment_batch_matches_single_calls():
    texts = ["今天天气很好", "我爱自然语言处理"]
    batch = segment_batch(texts)
    seg = Segmenter()
    for text, spans in zip(texts, batch):
        np.testing.assert_array_equal(spans, seg.spans(text))


@pytest.mark.slow
def test_rjieba_agrees_with_jieba_on_peoples_daily_1998(peoples_daily_gold):
    """rjieba reproduces jieba on Chinese text; they may differ only on hyphenated
    Latin/digit runs. Check every sentence of the 1998 corpus (1.86M characters)."""
    fast, ref = Segmenter("rjieba"), Segmenter("jieba")
    differing = []
    for words in peoples_daily_gold:
        text = "".join(words)
        a, b = fast.spans(text), ref.spans(text)
        if not np.array_equal(a, b):
            differing.append(text)
    print(f"\n1998 corpus: {len(peoples_daily_gold)} sentences, {len(differing)} segmented differently")
    unexplained = [t for t in differing if "-" not in t and "－" not in t]
    assert not unexplained, f"rjieba and jieba disagree on: {unexplained[:3]}"
    assert len(differing) <= 0.001 * len(peoples_daily_gold)
