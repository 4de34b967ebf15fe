"""The chat template a run formats its prompts with (`model.chat_template`), and the one its export carries.

- `tokenizer` (default): the tokenizer's own template when it has one, else HALOs-style prefixes
  (`model.human_prefix`, `human_suffix`, `assistant_prefix`, `assistant_suffix`, `system_prefix`).
- `prefixes`: the prefixes even when the tokenizer ships a template. Use it for base models whose tokenizer
  carries an instruct template (Llama-3 base: the header tokens of its template have untrained embeddings).
- a path to a `.jinja` file: that template, in Hugging Face's chat-template syntax (it must add the BOS token
  itself where the model expects one, as every HF template does).

The exported tokenizer (LATEST/hf) always carries the template the run used, so `apply_chat_template` on it
rebuilds the training prompts: a prefixes run exports `prefix_template`, a Jinja rendering of the same markers.
"""

from __future__ import annotations

import json
from pathlib import Path

from jinja2 import TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from feedbackalign.errors import ConfigError

CHOICES = ("tokenizer", "prefixes")  # or a path to a .jinja file


def select(tokenizer, choice: str) -> None:
    """Set `tokenizer.chat_template` to what `choice` selects (None: the prefixes)."""
    choice = str(choice)
    if choice == "prefixes":
        tokenizer.chat_template = None
    elif choice != "tokenizer":
        tokenizer.chat_template = read_template(choice)


def describe(tokenizer, choice: str) -> str:
    """Which format a tokenizer `select` prepared writes prompts in, in words (printed at the start of a run)."""
    choice = str(choice)
    if choice not in CHOICES:
        return f"the chat template in {choice}"
    if tokenizer.chat_template:
        return "the tokenizer's chat template (model.chat_template=prefixes for HALOs-style prefixes)"
    return "HALOs-style prefixes (model.human_prefix, model.assistant_prefix, ...)"


def read_template(path_text: str) -> str:
    """The text of a `.jinja` chat-template file, checked to compile; ConfigError naming the file otherwise."""
    path = Path(path_text).expanduser()
    if path.suffix != ".jinja" or not path.is_file():
        raise ConfigError(f"model.chat_template={path_text} is neither {' nor '.join(CHOICES)} nor an existing "
                          ".jinja file: give one of those")
    text = path.read_text(encoding="utf-8")
    try:  # the environment Hugging Face renders chat templates in
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(text)
    except TemplateSyntaxError as e:
        raise ConfigError(f"model.chat_template={path_text}, line {e.lineno}: {e.message}: fix the template") \
            from None
    return text


def resolved(choice: str) -> str:
    """The choice as a run directory records it: a template path made absolute, so eval.py finds it anywhere."""
    choice = str(choice)
    return choice if choice in CHOICES else str(Path(choice).expanduser().resolve())


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token first when it encodes text with special tokens (Llama, Mistral)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def prefix_template(fmt, bos: bool = False) -> str:
    """A Hugging Face chat template rendering exactly the prefixes `dataloader.format_prompt` writes: user =
    human_prefix + content + human_suffix, assistant = assistant_prefix + content + assistant_suffix, system =
    system_prefix + content + human_suffix; the generation prompt is assistant_prefix; `bos` puts bos_token
    first (as encoding the text with special tokens does). The markers are Jinja string literals, never
    template text, so HF's trim_blocks cannot drop a newline they start with."""
    def lit(text: str) -> str:  # JSON's escapes are ones Jinja's string literals decode
        return json.dumps(text, ensure_ascii=False)

    marks = {"user": (fmt.human_prefix, fmt.human_suffix), "assistant": (fmt.assistant_prefix, fmt.assistant_suffix),
             "system": (fmt.system_prefix, fmt.human_suffix)}
    branches = "".join(
        f"{'{% if' if k == 0 else '{% elif'} message['role'] == {lit(role)} %}}"
        f"{{{{ {lit(prefix)} + message['content'] + {lit(suffix)} }}}}"
        for k, (role, (prefix, suffix)) in enumerate(marks.items()))
    return ("{{ bos_token }}" if bos else "") + "{% for message in messages %}" + branches + \
        "{% else %}{{ raise_exception('roles are system, user and assistant') }}{% endif %}{% endfor %}" + \
        f"{{% if add_generation_prompt %}}{{{{ {lit(fmt.assistant_prefix)} }}}}{{% endif %}}"


def export_template(tokenizer, fmt) -> str:
    """The template an exported tokenizer carries: the one the run used, else the prefixes as a template."""
    return tokenizer.chat_template or prefix_template(fmt, adds_bos(tokenizer))
