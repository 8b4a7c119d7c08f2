"""A tokenizer for the preflight's prompt checks that loads in a fraction of a second: the `tokenizers` library on
tokenizer.json and the chat template rendered with jinja2 as transformers 5 renders it, without importing
transformers (and with it torch, seconds of a failing start-up).

It only counts and checks: the run itself still uses transformers' tokenizer. It takes only directories that
transformers loads as tokenizer.json has them (`light_tokenizer` gives None for any other), and anything it meets
that it cannot reproduce exactly (a template error, an unusual value in a message) raises NotExact, so the caller
asks transformers instead of reporting a count that might differ.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

# tokenizer classes whose from_pretrained takes tokenizer.json as it is (a model's own class may rebuild its pipeline)
GENERIC = ("TokenizersBackend", "PreTrainedTokenizerFast")
# model types for which AutoTokenizer keeps a generic class (transformers 5 forces qwen2 to Qwen2Tokenizer and may
# send mistral to mistral_common)
KEEPS_GENERIC = ("llama", "qwen3")
SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# tokenizer_config.json keys that change neither encoding nor rendering; any other key: transformers decides
HARMLESS = {"backend", "tokenizer_class", "chat_template", "added_tokens_decoder", "model_max_length", "padding_side",
            "truncation_side", "model_input_names", "clean_up_tokenization_spaces", "is_local", "local_files_only",
            *SPECIAL}
TOKEN_FLAGS = ("content", "lstrip", "rstrip", "normalized", "single_word", "special")


class NotExact(Exception):
    """The light path cannot promise transformers' result here."""


def light_tokenizer(path: str | Path) -> "LightTokenizer | None":
    """The light tokenizer of a model directory, or None where only transformers gives the exact ids."""
    from importlib.metadata import version

    path = Path(path)
    files = {name: path / name for name in ("config.json", "tokenizer_config.json", "tokenizer.json")}
    if (version("transformers").split(".")[0] != "5" or not all(f.is_file() for f in files.values())
            or any((path / name).exists() for name in ("added_tokens.json", "special_tokens_map.json",
                                                       "additional_chat_templates"))):
        return None
    try:
        model, config, backend = (json.loads(f.read_text()) for f in files.values())
    except (OSError, ValueError):  # transformers reports a broken file in its own words
        return None
    if (model.get("model_type") not in KEEPS_GENERIC or config.get("tokenizer_class") not in GENERIC
            or not set(config) <= HARMLESS or backend.get("truncation") or backend.get("padding")
            or backend.get("post_processor") is None):
        return None
    added = {t["content"]: t for t in backend.get("added_tokens", [])}
    special = {k: v.get("content") if isinstance(v, dict) else v for k, v in config.items() if k in SPECIAL and v}
    if not all(isinstance(v, str) and v in added for v in special.values()):
        return None  # transformers would add the missing ones as new tokens
    for index, token in (config.get("added_tokens_decoder") or {}).items():
        known = added.get(token.get("content"))
        if known is None or known["id"] != int(index) or any(token.get(k) != known.get(k) for k in TOKEN_FLAGS):
            return None
    template = path / "chat_template.jinja"  # transformers prefers it to tokenizer_config's chat_template
    template = template.read_text() if template.is_file() else config.get("chat_template")
    if template is not None and not isinstance(template, str):
        return None  # named templates: transformers picks one
    try:
        compiled = _environment().from_string(template) if template else None
    except Exception:  # noqa: BLE001 - e.g. {% generation %}, a tag only transformers' environment knows
        return None
    from tokenizers import Tokenizer

    return LightTokenizer(Tokenizer.from_file(str(files["tokenizer.json"])), template, compiled, special)


class LightTokenizer:
    """The part of a transformers tokenizer that `trainer.data.load_prompts` uses."""

    def __init__(self, tokenizer, chat_template: str | None, compiled, special: dict[str, str]):
        self._tokenizer, self._compiled, self._special = tokenizer, compiled, special
        self.chat_template = chat_template
        bos = special.get("bos_token")
        self.bos_token_id = tokenizer.token_to_id(bos) if bos else None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        """transformers' apply_chat_template(tokenize=False) of one conversation: keys holding None dropped, plain
        copies, reasoning fields aliased, the named special tokens as variables."""
        if tokenize:
            raise NotExact("tokenize=True")
        chat = _alias_reasoning([_plain({k: v for k, v in m.items() if v is not None}) for m in messages])
        try:
            return self._compiled.render(messages=chat, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self._special)
        except Exception as e:  # noqa: BLE001 - transformers raises it, with its own message and type
            raise NotExact(f"the chat template raised {type(e).__name__}") from None


def _plain(value):
    """transformers' _plain_template_data for the JSON types prompt files hold; anything else: NotExact."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if type(value) is dict:
        return {_plain(k): _plain(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_plain(v) for v in value)
    raise NotExact(f"a {type(value).__name__} in a message")


def _alias_reasoning(chat: list[dict]) -> list[dict]:
    """transformers' _alias_reasoning_fields: reasoning under an older name is also given as the standard ones."""
    out = []
    for m in chat:
        reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if m.get(k) is not None), None)
        out.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
    return out


def _environment():
    """transformers' _cached_compile_jinja_template's environment, less the {% generation %} tracker (a template
    that uses it does not compile here)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class TemplateDict:  # `dict(...)` and `dict.fromkeys(...)`, nothing else of the type
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def check(name):  # transformers refuses underscore names on a namespace (its error, raised there)
        if isinstance(name, str) and name.startswith("_"):
            raise NotExact("an underscore name on a namespace")

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # jinja's signature trick: `namespace(self=...)` still works
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f),
                       dict=TemplateDict(), namespace=TemplateNamespace)
    return env
