import json

import pytest

from prefsteer.attributes import inject, load_library, render
from prefsteer.errors import InputError

TABLE4 = ["Base", "Formal", "Concise", "Vivid", "Modest", "Engineer", "Persuasive", "Emotion", "Humor",
          "Energy", "Code", "Easy", "Direct", "Social", "Western", "Eastern", "Respect", "Internet Slang",
          "Proverb", "Critical", "Vague", "Creative", "Analytic", "Empathetic", "Sycophant", "Old-fashioned",
          "Meritocratic", "Myopic", "Principled", "Hedonist", "Utilitarian", "Realist", "Pessimistic",
          "Storyteller", "Flexible", "Spontaneous", "Collectivist", "Individualistic", "Exclamatory",
          "Conspiracy", "Tech Industry Priority", "Eco-friendly"]


def test_builtin_library_is_exacts_table4():
    lib = load_library()
    assert list(lib.names) == TABLE4
    assert all(a.description for a in lib.attributes)


def test_injection_follows_the_paper_and_descriptions_are_optional():
    lib = load_library()
    assert inject("Q", ["Concise", "humor"], lib) == "Q\nAttributes: <Concise, humor>"
    assert inject("Q", [], lib) == "Q"
    assert render(["concise"], lib, describe=True) == "Attributes: <Concise (short and to the point, no filler)>"
    assert lib.canonical(["concise", " HUMOR "]) == ("Concise", "Humor")


def test_unknown_attribute_names_the_library():
    with pytest.raises(InputError, match="unknown attribute 'Grumpy'"):
        load_library().get("Grumpy")


@pytest.mark.parametrize("content, field", [
    ('{"attributes": []}', "attributes"),
    ('{"attributes": [{"name": "A"}]}', "attributes[0].description"),
    ('{"attributes": [{"name": " ", "description": "d"}]}', "attributes[0].name"),
    ('{"attributes": [{"name": "A, B", "description": "d"}]}', "attributes[0].name"),
    ('{"attributes": [{"name": "A", "description": "d"}, {"name": "a", "description": "e"}]}',
     "attributes[1].name"),
])
def test_user_library_is_validated(tmp_path, content, field):
    p = tmp_path / "lib.json"
    p.write_text(content)
    with pytest.raises(InputError) as e:
        load_library(p)
    assert e.value.file == str(p) and e.value.field == field


def test_user_library_malformed_json_names_the_line(tmp_path):
    p = tmp_path / "lib.json"
    p.write_text('{"attributes": [\n  {"name": "A",, }\n]}')
    with pytest.raises(InputError) as e:
        load_library(p)
    assert e.value.line == 2 and "malformed JSON" in str(e.value)


def test_user_library_as_a_bare_list(tmp_path):
    p = tmp_path / "mine.json"
    p.write_text(json.dumps([{"name": "Terse", "description": "very short"}]))
    lib = load_library(p)
    assert lib.names == ("Terse",) and lib.name == "mine"


def test_render_styles_and_placements():
    from prefsteer.attributes import attribute_messages

    lib = load_library()
    assert render(["Concise", "Formal"], lib, style="instruction") == "Answer in a way that is: concise, formal."
    assert render(["Concise"], lib, style="described") == render(["Concise"], lib, describe=True)
    user = attribute_messages("Q", ["Concise"], lib)
    assert user == [{"role": "user", "content": "Q\nAttributes: <Concise>"}]
    system = attribute_messages("Q", ["Concise"], lib, style="instruction", placement="system", system="Be kind.")
    assert system == [{"role": "system", "content": "Be kind.\nAnswer in a way that is: concise."},
                      {"role": "user", "content": "Q"}]
    # no attributes: the plain context whatever the placement
    assert attribute_messages("Q", [], lib, placement="system") == [{"role": "user", "content": "Q"}]
    with pytest.raises(ValueError, match="placement"):
        attribute_messages("Q", ["Concise"], lib, placement="assistant")
    with pytest.raises(ValueError, match="style"):
        render(["Concise"], lib, style="shouting")
