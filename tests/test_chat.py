"""Chat templates render exactly as transformers' apply_chat_template, and hostile ones are refused."""

from __future__ import annotations

import time

import pytest

from llmlab.common import LlmlabError
from llmlab.tokenizer.chat import CHATML, ChatTemplate
from tests.conftest import need

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "Unicode: café 日本 👍 <b>tags</b> \"quotes\"\n\nnew lines"}],
    [{"role": "assistant", "content": "I start."}, {"role": "user", "content": ""}],
]

# Templates with the features real ones use: loop.first/last, namespace, tojson, raise_exception.
EXTRA_TEMPLATES = [
    CHATML,
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
    "[{{ ns.n }}:{{ m['role'] }}] {{ m['content'] | tojson }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}",
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}"
    "{% endif %}{% if loop.last %}LAST {% endif %}{{ m.content | trim }}{{ eos_token }}{% endfor %}",
]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_smollm2_template_matches_transformers(smollm, add_generation_prompt):
    need("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    source = smollm.loaded.chat_template
    ours = ChatTemplate(source)
    for conv in CONVERSATIONS:
        expected, _ = render_jinja_template([conv], chat_template=source,
                                            add_generation_prompt=add_generation_prompt)
        assert ours.render(conv, add_generation_prompt=add_generation_prompt) == expected[0]


@pytest.mark.parametrize("source", EXTRA_TEMPLATES)
def test_feature_templates_match_transformers(source):
    need("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    specials = {"bos_token": "<s>", "eos_token": "</s>"}
    ours = ChatTemplate(source, specials)
    for conv in CONVERSATIONS:
        for agp in (False, True):
            expected, _ = render_jinja_template([conv], chat_template=source, add_generation_prompt=agp, **specials)
            assert ours.render(conv, add_generation_prompt=agp) == expected[0]


def test_smollm2_default_system_prompt(smollm):
    text = smollm.render_chat("Hello")
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


# Hostile templates, each with an effect that can be observed: MARK is replaced by a path in tmp_path.
# "file": the payload runs a shell command that creates MARK (CVE-2024-34359 style: reach Python internals
# through attribute chains); "leak": an underscore attribute reaches the output; "mutate": the caller's
# messages list is changed.
HOSTILE = [
    ("object-subclasses",
     "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == '_wrap_close' %}"
     "{{ c.__init__.__globals__['system']('touch MARK') }}{% endif %}{% endfor %}", "file"),
    ("self-builtins-import",
     "{{ self.__init__.__globals__['__builtins__']['__import__']('os').system('touch MARK') }}", "file"),
    ("cycler-os-popen", "{{ cycler.__init__.__globals__.os.popen('touch MARK').read() }}", "file"),
    ("messages-base-subclasses",
     "{% for c in messages.__class__.__base__.__subclasses__() %}{% if c.__name__ == '_wrap_close' %}"
     "{{ c.__init__.__globals__['popen']('touch MARK').read() }}{% endif %}{% endfor %}", "file"),
    ("namespace-underscore", "{% set x = namespace(_secret='MARK') %}{{ x }}", "leak"),
    ("messages-append", "{{ messages.append({'role': 'x', 'content': 'MARK'}) }}", "mutate"),
]


def _render_and_observe(render, source: str, effect: str, tmp_path) -> tuple[bool, Exception | None]:
    """Render one hostile template with ``render(source, messages)``: (did its effect happen, the error)."""
    mark = tmp_path / "pwned"
    messages = [dict(m) for m in CONVERSATIONS[0]]
    out, error = "", None
    try:
        out = render(source.replace("MARK", str(mark)), messages)
    except Exception as e:  # noqa: BLE001 - the caller asserts which
        error = e
    happened = {"file": mark.exists(), "leak": str(mark) in out, "mutate": messages != CONVERSATIONS[0]}[effect]
    return happened, error


@pytest.mark.parametrize("name,source,effect", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_templates_cannot_reach_python_internals(name, source, effect, tmp_path):
    happened, error = _render_and_observe(lambda src, msgs: ChatTemplate(src).render(msgs), source, effect, tmp_path)
    assert isinstance(error, LlmlabError) and "refused by the sandbox" in str(error), error
    assert not happened


@pytest.mark.parametrize("name,source,effect", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_negative_control_hostile_templates_act_without_our_sandbox(name, source, effect, tmp_path):
    """The same payloads are live: rendered as llama-cpp-python did (a plain Environment), or for the last
    two with Jinja's own sandbox (mutable, and Jinja's ``namespace``), their effect happens."""
    import jinja2
    from jinja2.sandbox import SandboxedEnvironment

    env = jinja2.Environment() if effect == "file" else SandboxedEnvironment()
    happened, error = _render_and_observe(lambda src, msgs: env.from_string(src).render(messages=msgs), source,
                                          effect, tmp_path)
    assert happened and error is None, error


def test_slow_template_is_stopped_quickly():
    source = "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"
    t0 = time.monotonic()
    with pytest.raises(LlmlabError, match="longer than"):
        ChatTemplate(source, timeout_s=0.5).render(CONVERSATIONS[0])
    assert time.monotonic() - t0 < 3


def test_huge_output_template_is_refused():
    with pytest.raises(LlmlabError, match="over-long"):
        ChatTemplate("{{ 'x' * 10000000000 }}").render(CONVERSATIONS[0])


def test_broken_templates_are_clear_errors():
    with pytest.raises(LlmlabError, match="does not parse"):
        ChatTemplate("{% for %}")
    with pytest.raises(LlmlabError, match="no tools"):
        ChatTemplate(EXTRA_TEMPLATES[2]).render([{"role": "tool", "content": "x"}])


def test_hostile_template_inside_a_gguf_is_refused(tmp_path):
    """End to end: a GGUF whose metadata carries an injection payload loads, but chat refuses it."""
    import torch

    from llmlab.api import LLM
    from llmlab.formats.gguf_model import write_model_gguf
    from llmlab.formats.load import load_model
    from llmlab.models import build_model, get_preset
    from llmlab.tokenizer.bpe import ByteBPE, bytes_to_unicode
    from llmlab.tokenizer.pretokenize import GGUF_PRE

    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    tok = ByteBPE(vocab, [], GGUF_PRE["gpt2"])
    cfg = get_preset("llama-tiny")
    cfg.vocab_size = 256
    torch.manual_seed(0)
    path = tmp_path / "evil.gguf"
    mark = tmp_path / "pwned"
    write_model_gguf(path, cfg, build_model(cfg).state_dict(), tok,
                     chat_template=HOSTILE[1][1].replace("MARK", str(mark)))
    llm = LLM(load_model(path))
    with pytest.raises(LlmlabError, match="refused by the sandbox"):
        llm.render_chat("hello")
    assert not mark.exists()
