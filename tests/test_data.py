"""Prompt loading: Verl's Parquet rows and OpenRLHF-style JSONL, chat rendering, what travels with each prompt,
length filtering, one-line errors naming file, row and key, resumable order."""
import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from trainer.loop.data import DataError, PromptSampler, load_prompts, render_prompt, tokenize_prompt


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


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def chat_ids(tokenizer, messages):
    """The chat template's rendering, tokenized as the tokenizer tokenizes text (its BOS once)."""
    return tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))["input_ids"]


def test_verl_parquet_rows_load_as_they_are(tmp_path, tokenizer):
    """Rows as Verl's GSM8K preprocessing writes them; a message-list prompt is rendered by the chat template,
    a string prompt is the text; data_source, ground truth and extra_info travel with the prompt."""
    messages = [{"role": "system", "content": "b"}, {"role": "user", "content": "a c"}]
    rows = [{"data_source": "openai/gsm8k", "prompt": messages, "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": "c"}, "extra_info": {"split": "train", "index": 0}},
            {"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": "b"}], "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": "a"}, "extra_info": {"split": "train", "index": 1}}]
    path = write_parquet(tmp_path / "train.parquet", rows)
    first, second = load_prompts(path, tokenizer, 16, "prompt", "reward_model.ground_truth")
    assert first.text == "system: b user: a c assistant:"
    assert first.token_ids == chat_ids(tokenizer, messages) == [1, 3, 5, 7, 4, 6, 8]  # "system:" is <unk> here
    assert second.token_ids == chat_ids(tokenizer, rows[1]["prompt"]) == [1, 7, 5, 8]
    assert (first.data_source, first.ground_truth, first.extra_info) == ("openai/gsm8k", "c", rows[0]["extra_info"])
    assert (second.index, second.ground_truth, second.where) == (1, "a", f"{path} row 1")

    text = write_parquet(tmp_path / "text.parquet", [{"prompt": "a b", "answer": 3}])
    (prompt,) = load_prompts(text, tokenizer, 16, label_key="answer")
    assert (prompt.text, prompt.token_ids, prompt.ground_truth) == ("a b", [1, 4, 5], 3)
    assert (prompt.data_source, prompt.extra_info) == ("text", {})  # no such columns: the file's name, nothing


def test_openrlhf_jsonl_input_and_label_keys(tmp_path, tokenizer):
    """OpenRLHF's layout: a text column and a label column named by keys; apply_chat_template renders the text
    as one user message, as OpenRLHF's --apply_chat_template does."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "a b", "label": "c"}, {"question": "c", "label": "a"}])
    prompts = load_prompts(path, tokenizer, 16, prompt_key="question", label_key="label", apply_chat_template=True,
                           size=1)
    assert [p.token_ids for p in prompts] == [chat_ids(tokenizer, [{"role": "user", "content": "a b"}])]
    assert prompts[0].token_ids == [1, 7, 4, 5, 8] and prompts[0].ground_truth == "c"
    plain = load_prompts(path, tokenizer, 16, prompt_key="question")
    assert [p.token_ids for p in plain] == [[1, 4, 5], [1, 6]] and plain[0].ground_truth is None


def test_chat_template_with_its_own_bos_keeps_one(tmp_path, tokenizer):
    path = write_parquet(tmp_path / "p.parquet", [{"prompt": [{"role": "user", "content": "a"}]}])
    default = tokenizer.chat_template
    tokenizer.chat_template = "{{ bos_token }}" + default
    try:
        (prompt,) = load_prompts(path, tokenizer, 16)
    finally:
        tokenizer.chat_template = default
    assert prompt.text == "<bos>user: a assistant:" and prompt.token_ids == [1, 7, 4, 8]


def test_tiny_world_verl_rows_give_the_ids_the_actor_was_trained_on(tiny_world):
    """The tiny task in Verl's layout (make_verl_data): the chat template renders the same ids as the raw prompt."""
    from transformers import AutoTokenizer

    from trainer.tiny.make_verl_data import verl_rows
    from trainer.tiny.task import read_prompts_jsonl

    tokenizer = AutoTokenizer.from_pretrained(tiny_world.actor_path)
    rows = read_prompts_jsonl(tiny_world.eval_prompts)[:16]
    for raw, verl in zip(rows, verl_rows(rows, "test")):
        assert tokenize_prompt(render_prompt(verl["prompt"], tokenizer, False, "", ""), tokenizer) == \
            tokenizer(raw["prompt"])["input_ids"]


def test_errors_name_the_file_and_problem(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"missing.jsonl: prompt file not found"):
        load_prompts(tmp_path / "missing.jsonl", tokenizer, 8)
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match=r"empty.jsonl: no prompts in file"):
        load_prompts(empty, tokenizer, 8)
    nocol = write_jsonl(tmp_path / "nocol.jsonl", [{"question": "a"}])
    with pytest.raises(DataError, match=r"nocol.jsonl row 0: no 'prompt' \(data.train.prompt_key; columns: question\)"):
        load_prompts(nocol, tokenizer, 8)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_prompts(bad, tokenizer, 8)
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "a b c a b c"}])
    with pytest.raises(DataError, match=r"all 1 prompts are longer than data.max_prompt_len=3"):
        load_prompts(long, tokenizer, 3)
    csv = tmp_path / "p.csv"
    csv.write_text("prompt\na\n")
    with pytest.raises(DataError, match=r"unsupported prompt file type '.csv'"):
        load_prompts(csv, tokenizer, 8)


@pytest.mark.parametrize("row, kwargs, message", [
    ({"prompt": 5}, {}, "row 0: data.eval.prompt_key 'prompt' holds int 5; expected a string or a list of "
                        "{role, content} messages"),
    ({"prompt": [{"role": "user"}]}, {}, "row 0: data.eval.prompt_key 'prompt' holds list"),
    ({"prompt": "a", "reward_model": {"style": "rule"}}, {"label_key": "reward_model.ground_truth"},
     "row 0: no ground truth at data.eval.label_key 'reward_model.ground_truth', which trainer.reward_fn needs"),
    ({"prompt": "a", "extra_info": "x"}, {}, "row 0: extra_info holds str; expected a mapping"),
    ({"prompt": "a", "data_source": 7}, {}, "row 0: data_source holds int; expected a string"),
])
def test_bad_rows_name_file_row_and_key(tmp_path, tokenizer, row, kwargs, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DataError) as err:
        load_prompts(path, tokenizer, 8, what="data.eval", **kwargs)
    assert str(err.value).startswith(f"{path} {message}")


def test_messages_need_a_chat_template(tmp_path, tokenizer):
    path = write_parquet(tmp_path / "p.parquet", [{"prompt": [{"role": "user", "content": "a"}]}])
    default, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(DataError) as err:
            load_prompts(path, tokenizer, 8)
    finally:
        tokenizer.chat_template = default
    assert str(err.value) == (f"{path} row 0: data.train.prompt_key 'prompt' holds chat messages but the actor's "
                              "tokenizer has no chat template")


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


# every helper transformers gives a template, the special tokens, the generation prompt, reasoning under an old
# name, a key holding None (dropped)
RICH_TEMPLATE = """{{ bos_token }}{% set ns = namespace(turns=0) %}
{% for m in messages %}
  {% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}
  {% set ns.turns = ns.turns + 1 %}
  {% if m['role'] == 'system' %}: {% endif %}{{ m['content'] | trim }}
  {% if m.reasoning_content is defined %} reverse {{ m.reasoning_content }}{% endif %}
  {% if m.name is defined %} sort{% endif %}
  {% if not loop.last %} {{ eos_token }}{% endif %}
{% endfor %}
{% if add_generation_prompt %} = {{ ns.turns }} {{ (messages | length) | tojson }}
{{- ' ' ~ (dict(a=1) | length) }}{% endif %}"""


def test_light_tokenizer_gives_transformers_text_and_ids(tiny_world, tmp_path):
    """The preflight's light tokenizer (tokenizers + jinja2, no transformers) renders and tokenizes the tiny
    world's Verl prompts (chat messages) and plain strings as transformers does; a template that uses every helper
    transformers gives it too."""
    import shutil

    from transformers import AutoTokenizer

    from trainer.loop.light_tokenizer import light_tokenizer
    from trainer.tiny.make_verl_data import verl_rows
    from trainer.tiny.task import read_prompts_jsonl

    rich = tmp_path / "rich"
    shutil.copytree(tiny_world.actor_path, rich, ignore=shutil.ignore_patterns("*.safetensors"))
    (rich / "chat_template.jinja").write_text(RICH_TEMPLATE)
    raws = read_prompts_jsonl(tiny_world.eval_prompts)[:32]
    for path in (tiny_world.actor_path, rich):
        light, full = light_tokenizer(path), AutoTokenizer.from_pretrained(path)
        assert light is not None and light.bos_token_id == full.bos_token_id
        for raw, verl in zip(raws, verl_rows(raws, "test")):
            turns = [{"role": "system", "content": " sort ", "name": None},
                     {"role": "user", "content": raw["prompt"], "thinking": "0 1", "reasoning_content": None}]
            chats = [verl["prompt"], turns]
            for value, template in [(c, False) for c in chats] + [(raw["prompt"], True), (raw["prompt"], False)]:
                text = render_prompt(value, full, template, "", "")
                assert render_prompt(value, light, template, "", "") == text
                assert tokenize_prompt(text, light) == tokenize_prompt(text, full)
        assert light(raws[0]["prompt"], add_special_tokens=False) == {"input_ids": full(raws[0]["prompt"],
                                                                      add_special_tokens=False)["input_ids"]}
    text = render_prompt(verl["prompt"], light, False, "", "")
    assert text.startswith("<bos>") and text.endswith(" = 1 1 1")  # the rich template did render its helpers


def test_light_tokenizer_leaves_what_it_cannot_reproduce_to_transformers(tiny_world, tmp_path):
    """No tokenizer.json, a tokenizer_config key that changes encoding, a template only transformers compiles:
    no light tokenizer. A template that raises: NotExact (transformers raises its own error)."""
    import shutil

    from trainer.loop.light_tokenizer import NotExact, light_tokenizer

    def variant(name, edit):
        path = tmp_path / name
        shutil.copytree(tiny_world.actor_path, path, ignore=shutil.ignore_patterns("*.safetensors"))
        edit(path)
        return path

    assert light_tokenizer(variant("plain", lambda p: None)) is not None
    assert light_tokenizer(variant("no_json", lambda p: (p / "tokenizer.json").unlink())) is None

    def add_bos(path):
        config = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))

    assert light_tokenizer(variant("add_bos", add_bos)) is None
    tracked = "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    assert light_tokenizer(variant("tracked", lambda p: (p / "chat_template.jinja").write_text(tracked))) is None
    raising = light_tokenizer(variant("raising", lambda p: (p / "chat_template.jinja").write_text(RICH_TEMPLATE)))
    with pytest.raises(NotExact):
        raising.apply_chat_template([{"role": "tool", "content": "0"}], add_generation_prompt=True)
