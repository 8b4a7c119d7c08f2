"""Prompt loading: both file formats, chat rendering, length filtering, clear errors, resumable order."""
import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from trainer.data import DataError, PromptSampler, load_prompts


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", "a", "b", "c", "user:", "assistant:"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    return fast


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_prompts_tokenized_and_filtered(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a b"}, {"prompt": "a b c a b c"}, {"prompt": "c"}])
    prompts = load_prompts(path, tokenizer, max_prompt_len=4)
    assert [p.index for p in prompts] == [0, 2]  # the 7-token prompt is dropped
    assert prompts[0].token_ids == [1, 4, 5] and prompts[1].token_ids == [1, 6]
    cut = load_prompts(path, tokenizer, max_prompt_len=4, overlong="truncate")
    assert cut[1].token_ids == [6, 4, 5, 6]  # keeps the end of the prompt


def test_parquet_messages_use_chat_template(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": "a c"}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    (prompt,) = load_prompts(tmp_path / "p.parquet", tokenizer, max_prompt_len=16)
    assert prompt.text == "user: a c assistant:"
    assert prompt.token_ids == [1, 7, 4, 6, 8]


def test_errors_name_the_file_and_problem(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"missing.jsonl: prompt file not found"):
        load_prompts(tmp_path / "missing.jsonl", tokenizer, 8)
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match=r"empty.jsonl: no prompts in file"):
        load_prompts(empty, tokenizer, 8)
    nocol = write_jsonl(tmp_path / "nocol.jsonl", [{"question": "a"}])
    with pytest.raises(DataError, match=r"nocol.jsonl: row has neither a 'prompt' nor a 'messages' column \(columns: question\)"):
        load_prompts(nocol, tokenizer, 8)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_prompts(bad, tokenizer, 8)
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "a b c a b c"}])
    with pytest.raises(DataError, match=r"all 1 prompts are longer than max_prompt_len=3"):
        load_prompts(long, tokenizer, 3)
    csv = tmp_path / "p.csv"
    csv.write_text("prompt\na\n")
    with pytest.raises(DataError, match=r"unsupported prompt file type '.csv'"):
        load_prompts(csv, tokenizer, 8)


def test_sampler_is_seeded_and_resumes_exactly(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a " * (i % 3 + 1)} for i in range(10)])
    prompts = load_prompts(path, tokenizer, 8)
    first = PromptSampler(prompts, seed=7)
    straight = [p.index for p in first.next_batch(25)]  # crosses two epoch boundaries
    assert sorted(straight[:10]) == list(range(10)) and straight[:10] != list(range(10))
    assert [p.index for p in PromptSampler(prompts, seed=7).next_batch(25)] == straight
    assert [p.index for p in PromptSampler(prompts, seed=8).next_batch(10)] != straight[:10]

    resumed = PromptSampler(prompts, seed=7)
    head = [p.index for p in resumed.next_batch(13)]
    saved = json.loads(json.dumps(resumed.state()))
    again = PromptSampler(prompts, seed=7)
    again.load_state(saved)
    assert head + [p.index for p in again.next_batch(12)] == straight
    with pytest.raises(DataError, match="data cursor does not match this dataset"):
        PromptSampler(prompts[:5], seed=7).load_state(saved)
