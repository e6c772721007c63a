"""The attribute library of EXACT and how attributes are injected into a prompt.

EXACT appends the chosen attributes to the user's turn on a new line, ``Attributes: <A, B, C>``.
Small models may follow a short description better than a bare name, so ``describe=True`` (or
``style="described"``) renders ``Attributes: <Concise (short and to the point, no filler), ...>``
instead, ``style="instruction"`` a sentence, ``Answer in a way that is: concise, humor.``, and
``style="instruction-described"`` the sentence with the descriptions.
`attribute_messages` places the line in the user's turn (the paper) or in the system prompt.

    >>> lib = load_library()
    >>> inject("Summarize this post.", ["Concise", "Humor"], lib)
    'Summarize this post.\\nAttributes: <Concise, Humor>'
    >>> attribute_messages("Hi", ["Concise"], lib, style="instruction", placement="system")
    [{'role': 'system', 'content': 'Answer in a way that is: concise.'}, {'role': 'user', 'content': 'Hi'}]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

from prefsteer.errors import InputError

# how an attribute set is written: the paper's bare names first (EXACT's default)
RENDER_STYLES = ("names", "described", "instruction", "instruction-described")
# where it goes: appended to the user's turn (the paper), or as (the end of) the system prompt
PLACEMENTS = ("user", "system")


@dataclass(frozen=True)
class Attribute:
    name: str
    description: str


@dataclass(frozen=True)
class AttributeLibrary:
    name: str
    attributes: tuple[Attribute, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.attributes)

    def __len__(self) -> int:
        return len(self.attributes)

    def get(self, name: str) -> Attribute:
        """Look an attribute up by name, case-insensitively."""
        for a in self.attributes:
            if a.name.lower() == name.strip().lower():
                return a
        raise InputError(f"unknown attribute '{name}'; the library '{self.name}' has: "
                         f"{', '.join(self.names)}", field="attributes")

    def canonical(self, names: Iterable[str]) -> tuple[str, ...]:
        """Validate names against the library and return them with the library's spelling."""
        return tuple(self.get(n).name for n in names)

    def subset(self, names: Sequence[str]) -> "AttributeLibrary":
        return AttributeLibrary(f"{self.name}[{len(names)}]", tuple(self.get(n) for n in names))


def render(names: Sequence[str], library: AttributeLibrary | None = None, describe: bool = False,
           style: str | None = None) -> str:
    """The attribute line: ``Attributes: <A, B>`` (``style="names"``, the paper's), the same with
    each name's description (``"described"``, also ``describe=True``), or an instruction sentence,
    ``Answer in a way that is: a, b.`` (``"instruction"``, names in lower case), or that sentence
    with the descriptions instead of the names, ``Answer in a way that is short and to the point, no
    filler; funny, playful, with jokes or wit.`` (``"instruction-described"``)."""
    style = style or ("described" if describe else "names")
    if style not in RENDER_STYLES:
        raise ValueError(f"`style` (={style!r}) has to be one of {', '.join(RENDER_STYLES)}")
    if style == "instruction":
        return f"Answer in a way that is: {', '.join(n.lower() for n in names)}."
    if style == "instruction-described":
        if library is None:
            raise ValueError("`style='instruction-described'` needs the attribute library for the descriptions")
        return f"Answer in a way that is {'; '.join(library.get(n).description for n in names)}."
    if style == "described":
        if library is None:
            raise ValueError("`describe=True` needs the attribute library for the descriptions")
        items = [f"{a.name} ({a.description})" for a in (library.get(n) for n in names)]
    else:
        items = list(names)
    return f"Attributes: <{', '.join(items)}>"


def inject(prompt: str, names: Sequence[str], library: AttributeLibrary | None = None,
           describe: bool = False, style: str | None = None) -> str:
    """The user's turn with the attributes appended on a new line (unchanged when there are none)."""
    if not names:
        return prompt
    return f"{prompt}\n{render(names, library, describe, style)}"


def attribute_messages(prompt: str, names: Sequence[str], library: AttributeLibrary | None = None, *,
                       style: str = "names", placement: str = "user",
                       system: str | None = None) -> list[dict[str, str]]:
    """The chat context of ``prompt`` with the attributes rendered in ``style``, either appended to
    the user's turn (``placement="user"``, the paper) or as the system prompt (after ``system`` on a
    new line, when one is given). No attributes: the plain context, the same for both placements."""
    return attribute_conversation([{"role": "user", "content": prompt}], names, library, style=style,
                                  placement=placement, system=system)


def attribute_conversation(messages: Sequence[dict[str, str]], names: Sequence[str],
                           library: AttributeLibrary | None = None, *, style: str = "names",
                           placement: str = "user", system: str | None = None) -> list[dict[str, str]]:
    """`attribute_messages` for a whole conversation (the service's chat): the attributes go into
    its last user turn (``placement="user"``) or at the end of its system prompt (``"system"``).
    ``system`` is the system prompt used when the conversation has none of its own."""
    if placement not in PLACEMENTS:
        raise ValueError(f"`placement` (={placement!r}) has to be one of {', '.join(PLACEMENTS)}")
    msgs = [dict(m) for m in messages]
    if not msgs or msgs[-1].get("role") != "user":
        raise ValueError("the conversation has to end with a user turn")
    if system and msgs[0].get("role") != "system":
        msgs.insert(0, {"role": "system", "content": system})
    if not names:
        return msgs
    if placement == "system":
        line = render(names, library, style=style)
        if msgs[0].get("role") == "system":
            head = msgs[0]["content"]
            msgs[0]["content"] = f"{head}\n{line}" if head else line
        else:
            msgs.insert(0, {"role": "system", "content": line})
    else:
        msgs[-1]["content"] = inject(msgs[-1]["content"], names, library, style=style)
    return msgs


def load_library(path: str | Path | None = None) -> AttributeLibrary:
    """Load the built-in library (EXACT's 42 attributes) or a user's JSON file, validated.

    A user file is either ``{"name": ..., "attributes": [{"name", "description"}, ...]}`` or a bare
    list of such objects.
    """
    if path is None:
        text = resources.files("prefsteer.resources").joinpath("attributes.json").read_text("utf-8")
        source = "prefsteer/resources/attributes.json"
    else:
        source = str(path)
        try:
            text = Path(path).read_text("utf-8")
        except OSError as e:
            raise InputError(f"cannot read the attribute library: {e.strerror}", file=source) from e
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"malformed JSON: {e.msg}", file=source, line=e.lineno) from e
    if isinstance(raw, list):
        raw = {"name": Path(source).stem, "attributes": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("attributes"), list):
        raise InputError("expected an object with an 'attributes' list", file=source, field="attributes")
    attrs, seen = [], set()
    for i, item in enumerate(raw["attributes"]):
        where = f"attributes[{i}]"
        if not isinstance(item, dict):
            raise InputError("expected an object with 'name' and 'description'", file=source, field=where)
        name, desc = item.get("name"), item.get("description")
        if not isinstance(name, str) or not name.strip():
            raise InputError("missing or empty", file=source, field=f"{where}.name")
        if not isinstance(desc, str) or not desc.strip():
            raise InputError("missing or empty", file=source, field=f"{where}.description")
        if any(c in name for c in "<>,\n"):
            raise InputError(f"'{name}' contains one of '<', '>', ',' or a newline, which would break "
                             "the 'Attributes: <...>' line", file=source, field=f"{where}.name")
        if name.strip().lower() in seen:
            raise InputError(f"duplicate attribute '{name}'", file=source, field=f"{where}.name")
        seen.add(name.strip().lower())
        attrs.append(Attribute(name.strip(), desc.strip()))
    if not attrs:
        raise InputError("the library has no attributes", file=source, field="attributes")
    return AttributeLibrary(str(raw.get("name") or Path(source).stem), tuple(attrs))
