"""Chat templates render as Hugging Face renders them, and only inside the sandbox."""

import pytest

from server.prompt import TemplateError, render, supports

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_chatml():
    out = render(CHATML, [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}])
    assert out == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_hf_helpers():
    t = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'bad' %}{{ raise_exception('no bad roles') }}"
         "{% endif %}{{ m['content'] | tojson }}{% endfor %}{{ strftime_now('%Y') | length }}")
    assert render(t, [{"role": "user", "content": "é"}], bos_token="<s>") == '<s>"é"4'
    with pytest.raises(TemplateError, match="no bad roles"):
        render(t, [{"role": "bad", "content": "x"}])


def test_tools_are_passed():
    t = "{% if tools %}{{ tools | length }} tools{% endif %}"
    assert render(t, [], tools=[{"type": "function"}]) == "1 tools"
    assert render(t, []) == ""


@pytest.mark.parametrize("template", [
    # CVE-2024-34359: a GGUF chat template that ran code through Python internals
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ messages.append(1) }}",
])
def test_sandbox_refuses(template):
    with pytest.raises(TemplateError):
        render(template, [{"role": "user", "content": "x"}])


def test_output_bounded():
    with pytest.raises(TemplateError, match="16 MiB"):
        render("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", [])


def test_syntax_error_is_a_clear_400():
    with pytest.raises(TemplateError, match="invalid chat template"):
        render("{{ .Prompt }}", [])  # an Ollama Go template is not Jinja


def test_fallback_when_missing():
    assert render(None, [{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")


def test_supports():
    assert not supports(CHATML, "tools")
    assert supports("{% if tools %}<tool_call>{% endif %}", "tools")
    assert supports("{% if enable_thinking %}<think>{% endif %}", "thinking")
