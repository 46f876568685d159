"""The chat template every model directory remask writes carries (data.CHAT_TEMPLATE), rendered as transformers
renders it (jinja2's sandbox, trim_blocks, lstrip_blocks), equals remask's own chat text byte for byte on random
conversations: chat_prompt for a prompt, format_record for a whole conversation, a leading system message joined
to the first user message. The files around it: tokenizer_config.json, chat_template.jinja, generation_config.json's
stop ids, in save_pretrained's directories and quantize.py's output. Where transformers is installed,
AutoTokenizer.apply_chat_template gives the same text."""
import functools
import json
import random
import shutil

import pytest

import data
from conftest import FIXTURES
from model import StableLM, owner

jinja2 = pytest.importorskip("jinja2")  # a test-only import: remask itself never renders the template
from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: E402

TINY = FIXTURES / "stablelm-tiny"
PIECES = ["word", "Ünïcödé", "中文", "🙂", "a  b", "line\nbreak", "tab\tbed", "x" * 30, "{{ not jinja }}",
          "<|user", "\u2028", "  ", "\n", "\t", "?!", "0123"]


@functools.cache
def compiled():
    """The template compiled the way transformers' apply_chat_template compiles it."""
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(data.CHAT_TEMPLATE)


def render(messages, add_generation_prompt):
    return compiled().render(messages=messages, add_generation_prompt=add_generation_prompt,
                             bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def text(rng):
    """Random content: spaces and newlines around it (stripped by the format), never empty once stripped."""
    core = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 6))).strip() or "ok"
    return rng.choice(["", " ", "\n", " \n\t"]) + core + rng.choice(["", " ", "\n\n", "\t"])


def conversation(rng):
    """[{role, content}]: an optional system message, then alternating user/assistant messages; ends with the user
    (a prompt) or the assistant (a whole conversation)."""
    n = rng.randint(1, 7)
    messages = [{"role": ("user", "assistant")[i % 2], "content": text(rng)} for i in range(n)]
    return ([{"role": "system", "content": text(rng)}] if rng.random() < 0.5 else []) + messages


def remask_text(messages):
    """remask's own text for messages: the system message joined to the first user message (system + "\\n\\n" +
    user), contents stripped; chat_prompt when the user speaks last, else format_record of the whole chat."""
    system = messages[0]["content"].strip() if messages[0]["role"] == "system" else None
    contents = [m["content"].strip() for m in messages[1 if system is not None else 0:]]
    if system:
        contents[0] = f"{system}\n\n{contents[0]}"
    turns = list(zip(contents[0::2], contents[1::2]))
    if len(contents) % 2:
        return data.chat_prompt(turns, contents[-1])
    return data.format_record(data.ChatRecord(turns))


def test_the_template_renders_remask_chat_text_byte_for_byte():
    rng = random.Random(0)
    for _ in range(400):
        messages = conversation(rng)
        generation = messages[-1]["role"] == "user"
        assert render(messages, add_generation_prompt=generation) == remask_text(messages), messages
    assert render([{"role": "user", "content": " Hi "}], True) == "<|user|>\nHi\n<|assistant|>\n"
    assert render([{"role": "user", "content": "Hi"}], False) == "<|user|>\nHi\n"  # no prompt asked for
    assert render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], True) == \
        "<|user|>\nBe brief.\n\nHi\n<|assistant|>\n"
    assert render([{"role": "system", "content": "  "}, {"role": "user", "content": "Hi"}], True) == \
        "<|user|>\nHi\n<|assistant|>\n"  # an empty system message adds nothing


@pytest.mark.parametrize("roles", [["assistant"], ["user", "user"], ["user", "system"], ["user", "tool"],
                                   ["system", "system", "user"]])
def test_the_template_refuses_what_the_format_cannot_say(roles):
    with pytest.raises(jinja2.exceptions.TemplateError, match="roles must alternate"):
        render([{"role": r, "content": "x"} for r in roles], True)


def test_model_directories_carry_the_chat_files(tmp_path):
    """save_pretrained(extra=tok.save), as remask saves a run's model and checkpoints: the template in both places,
    <|endoftext|> as eos and pad, the tags special, and generation stops where remask's does; the directory stays
    one a model writer may replace."""
    tok = data.embedded_tokenizer()
    StableLM.from_pretrained(TINY).save_pretrained(tmp_path / "m", extra=tok.save)
    m = tmp_path / "m"
    assert sorted(p.name for p in m.iterdir()) == [".remask-owner.json", "chat_template.jinja", "config.json",
                                                   "generation_config.json", "model.safetensors", "tokenizer.json",
                                                   "tokenizer_config.json"]
    assert owner(m)["remask"] == "model"
    config = json.loads((m / "tokenizer_config.json").read_text())
    assert config["chat_template"] == (m / "chat_template.jinja").read_text() == data.CHAT_TEMPLATE
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["eos_token"] == "<|endoftext|>"
    assert config["pad_token"] == "<|endoftext|>" and config["additional_special_tokens"] == list(data.TAGS)
    assert config["clean_up_tokenization_spaces"] is False
    generation = json.loads((m / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 0, "eos_token_id": [tok.eos_id, tok.user_id], "pad_token_id": 0}


def test_quantize_output_carries_the_chat_files(tmp_path):
    """quantize.py copies IN's tokenizer files unchanged and adds the chat files to them (IN's other
    tokenizer_config.json keys kept)."""
    import quantize
    src = tmp_path / "src"
    shutil.copytree(TINY, src)
    shutil.copy(FIXTURES / "gpt-neox-20b-tokenizer" / "tokenizer.json", src)
    (src / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096, "eos_token": "x"}))
    quantize.main([str(src), str(tmp_path / "q"), "--prompts", "1", "--prompt-len", "4"])
    q = tmp_path / "q"
    assert (q / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    config = json.loads((q / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 4096 and config["eos_token"] == "<|endoftext|>"
    assert (q / "chat_template.jinja").read_text() == config["chat_template"] == data.CHAT_TEMPLATE
    tok = data.load_tokenizer(q)
    assert json.loads((q / "generation_config.json").read_text())["eos_token_id"] == [tok.eos_id, tok.user_id]


def test_transformers_apply_chat_template_gives_remask_prompts(tmp_path):
    transformers = pytest.importorskip("transformers")
    data.load_tokenizer(FIXTURES / "gpt-neox-20b-tokenizer").save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    rng = random.Random(1)
    for _ in range(50):
        messages = conversation(rng)
        generation = messages[-1]["role"] == "user"
        assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation) == \
            remask_text(messages)
    assert hf.eos_token == "<|endoftext|>" and hf.convert_tokens_to_ids("<|user|>") == data.load_tokenizer(
        tmp_path).user_id
