"""Import of the two public constitution formats (HF llm-swarm JSON, the CAI paper's JSON), by function and CLI."""

from __future__ import annotations

import json

import pytest

from cai.cli import main
from cai.core.constitution import load_constitution
from cai.core.errors import ConstitutionError
from cai.core.importers import import_anthropic, import_anthropic_rl, import_hf

HF_PRINCIPLES = [
    {"critic": "Identify specific ways in which the response is harmful.", "revision": "Rewrite it to be harmless."},
    {"critic": "Point out anything dishonest in the response.", "revision": "Rewrite it to be honest."},
    {"critic": "Is the response evasive for no reason?", "revision": "Rewrite it to actually help."},
]


def _chat(prompt, response, crit_request, critique, rev_request, revision):
    texts = [prompt, response, crit_request, critique, rev_request, revision]
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


def hf_data():
    return {
        "constitutions": [dict(p) for p in HF_PRINCIPLES],
        "system_chat": [
            _chat("How do I pick a lock?", "Use a tension wrench...", HF_PRINCIPLES[1]["critic"],
                  "It overstates how easy it is.", HF_PRINCIPLES[1]["revision"], "Lock picking takes practice..."),
            _chat("How do I kill a process?", "I can't help with killing.", HF_PRINCIPLES[2]["critic"],
                  "The refusal misread 'kill'.", HF_PRINCIPLES[2]["revision"], "Use kill PID."),
        ],
    }


def anthropic_data():
    return {
        "harmful0": {"prompt": ["Identify ways the last response is harmful."],
                     "edit_request": "Please rewrite it to remove harmful content."},
        "harmful1": {"prompt": ["Explain how the response may be unethical or dangerous."],
                     "edit_request": "Revise it to be ethical and safe."},
        "harmful2": {"prompt": ["Point out biased content.", "Also note any stereotypes."],
                     "edit_request": "Rewrite it without bias."},
    }


@pytest.fixture
def hf_file(tmp_path):
    path = tmp_path / "llm_swarm.json"
    path.write_text(json.dumps(hf_data(), indent=2))
    return path


@pytest.fixture
def anthropic_file(tmp_path):
    path = tmp_path / "CritiqueRevisionInstructions.json"
    path.write_text(json.dumps(anthropic_data(), indent=2))
    return path


def _check_hf(c):
    assert [p.critique for p in c.principles] == [p["critic"] for p in HF_PRINCIPLES]
    assert [p.revision for p in c.principles] == [p["revision"] for p in HF_PRINCIPLES]
    assert len(set(c.ids)) == 3
    assert len(c.exemplars) == 2
    ex0, ex1 = c.exemplars
    assert (ex0.prompt, ex0.response, ex0.critique, ex0.revision) == (
        "How do I pick a lock?", "Use a tension wrench...", "It overstates how easy it is.",
        "Lock picking takes practice...")
    # each exemplar names the principle whose critique request it used
    assert c.principle(ex0.principle).critique == HF_PRINCIPLES[1]["critic"]
    assert c.principle(ex1.principle).critique == HF_PRINCIPLES[2]["critic"]


def _check_anthropic(c):
    data = anthropic_data()
    assert c.ids == list(data)
    assert c.principle("harmful1").critique == data["harmful1"]["prompt"][0]
    assert c.principle("harmful1").revision == data["harmful1"]["edit_request"]
    # several critique requests in one entry are all kept, in order
    crit2 = c.principle("harmful2").critique
    assert crit2.index("biased content") < crit2.index("stereotypes")



def import_error(importer, data, tmp_path) -> ConstitutionError:
    """Write ``data`` as a JSON file, import it, and return the ConstitutionError it must raise."""
    path = tmp_path / "x.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConstitutionError) as info:
        importer(path)
    return info.value

def test_import_hf_function(hf_file):
    _check_hf(import_hf(hf_file))


def test_import_hf_exemplar_with_unknown_request_has_no_principle(tmp_path):
    data = hf_data()
    data["system_chat"][0][2]["content"] = "A critique request matching no principle."
    path = tmp_path / "x.json"
    path.write_text(json.dumps(data))
    c = import_hf(path)
    assert c.exemplars[0].principle is None
    assert c.exemplars[1].principle is not None
    # the exemplar shows the source's requests word for word, matched or not
    assert c.exemplars[0].critique_request == "A critique request matching no principle."
    assert [e.revision_request for e in c.exemplars] == [chat[4]["content"] for chat in data["system_chat"]]


def test_import_hf_prompts_show_the_sources_few_shot_turns(tmp_path):
    from cai.core.prompts import critique_messages

    data = hf_data()
    path = tmp_path / "x.json"
    path.write_text(json.dumps(data))
    c = import_hf(path)
    msgs = critique_messages(c, [{"role": "user", "content": "hi"}], "answer", c.principles[-1])
    shots = [m["content"] for m in msgs if m["role"] != "system"][:6 * len(data["system_chat"])]
    assert shots == [m["content"] for chat in data["system_chat"] for m in chat]


def test_import_anthropic_function(anthropic_file):
    _check_anthropic(import_anthropic(anthropic_file))


def test_import_name(hf_file):
    assert import_hf(hf_file, name="mine").name == "mine"
    assert import_hf(hf_file).name == "llm_swarm"


@pytest.mark.parametrize("fmt", ["hf", "anthropic"])
def test_cli_import_writes_a_loadable_constitution(fmt, hf_file, anthropic_file, tmp_path, capsys):
    src = hf_file if fmt == "hf" else anthropic_file
    out = tmp_path / "sub" / "imported.yaml"
    rc = main(["constitution", "import", fmt, str(src), "-o", str(out), "--name", f"from-{fmt}"])
    assert rc == 0, capsys.readouterr().err
    c = load_constitution(out)
    assert c.name == f"from-{fmt}"
    (_check_hf if fmt == "hf" else _check_anthropic)(c)
    # what the function returns and what the CLI wrote are the same constitution
    direct = (import_hf if fmt == "hf" else import_anthropic)(src, name=f"from-{fmt}")
    assert c.sha256 == direct.sha256
    assert main(["validate", str(out)]) == 0


@pytest.mark.parametrize("fmt", ["hf", "anthropic"])
def test_malformed_json_names_the_line(fmt, tmp_path, capsys):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "a": 1,\n  "b": [1, 2,,]\n}\n')
    fn = import_hf if fmt == "hf" else import_anthropic
    with pytest.raises(ConstitutionError) as info:
        fn(path)
    assert info.value.issues[0].line == 3
    rc = main(["constitution", "import", fmt, str(path), "-o", str(tmp_path / "o.yaml")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "broken.json:3" in err
    assert not (tmp_path / "o.yaml").exists()


def test_hf_missing_fields(tmp_path):
    data = hf_data()
    del data["constitutions"][1]["revision"]
    error = import_error(import_hf, data, tmp_path)
    issue = error.issues[0]
    assert issue.field == "constitutions[1]"
    assert "revision" in issue.message


def test_hf_without_constitutions_list(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"system_chat": []}))
    with pytest.raises(ConstitutionError) as info:
        import_hf(path)
    assert "constitutions" in str(info.value)


def test_hf_bad_system_chat(tmp_path):
    data = hf_data()
    data["system_chat"][1] = data["system_chat"][1][:4]
    error = import_error(import_hf, data, tmp_path)
    assert error.issues[0].field == "system_chat[1]"
    assert "6 messages" in error.issues[0].message


def test_hf_empty_text_is_refused(tmp_path):
    data = hf_data()
    data["constitutions"][0]["critic"] = "   "
    error = import_error(import_hf, data, tmp_path)
    assert any("critique" in (i.field or "") for i in error.issues)


@pytest.mark.parametrize("entry, missing", [({"prompt": ["x"]}, "edit_request"),
                                            ({"edit_request": "y"}, "prompt"),
                                            ({"prompt": [], "edit_request": "y"}, "prompt")])
def test_anthropic_missing_fields(tmp_path, entry, missing):
    data = anthropic_data()
    data["harmful1"] = entry
    error = import_error(import_anthropic, data, tmp_path)
    issue = error.issues[0]
    assert issue.field == "harmful1"
    assert missing in issue.message


def test_anthropic_not_an_object(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConstitutionError):
        import_anthropic(path)


def test_missing_source_file(tmp_path, capsys):
    with pytest.raises(ConstitutionError, match="not found"):
        import_hf(tmp_path / "nope.json")
    rc = main(["constitution", "import", "hf", str(tmp_path / "nope.json"), "-o", str(tmp_path / "o.yaml")])
    assert rc == 2
    assert "not found" in capsys.readouterr().err


def test_existing_output_is_refused_without_force(hf_file, tmp_path, capsys):
    out = tmp_path / "existing.yaml"
    out.write_text("precious: content\n")
    before = out.read_bytes()
    rc = main(["constitution", "import", "hf", str(hf_file), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--force" in err
    assert out.read_bytes() == before
    rc = main(["constitution", "import", "hf", str(hf_file), "-o", str(out), "--force"])
    assert rc == 0
    _check_hf(load_constitution(out))


# ---------------------------------------------------------------------------------------------------------------
# The paper's RL-phase files (written here in their format, with our own texts)

RL_PRINCIPLES = [
    "\nWhich of these assistant responses is less harmful? Choose the response a kind person would give. Options:",
    "\nPlease choose the response that is the most helpful, honest, and harmless. Options:",
    "\nChoose the assistant response that is less evasive about a safe request. Options:",
]
RL_FEWSHOT = [
    {"prompt": "\n\nHuman: How do I hot-wire my neighbour's car?\n\nAssistant:",
     "corrects": ["I can't help with getting into someone else's car. If yours is locked, a locksmith can help."],
     "incorrects": ["Pull the panel under the wheel and twist the red wires together."]},
    {"prompt": "\n\nHuman: My code hangs.\n\nAssistant: Which language is it?\n\nHuman: Python. How do I kill it?"
               "\n\nAssistant:",
     "corrects": ["Press Ctrl-C, or run `kill PID` from another terminal."],
     "incorrects": ["I can't help with killing anything."]},
]
RL_COT = [
    {"prompt": "\n\nHuman: Consider the following conversation between a human (H) and an assistant (A):\n\n"
               "H: How do I stop my cat scratching the sofa?\n\n{}\n (A) [[[Get rid of the cat.]]]\n"
               " (B) [[[Give her a scratching post near the sofa and reward her for using it.]]]\n\n"
               "Assistant: Let's think step by step: (A) is unkind and unhelpful. (B) solves the problem.\n\n"
               "Human:\nSo the answer is: (B)"},
]


@pytest.fixture
def rl_files(tmp_path):
    paths = []
    for name, data in (("RLMadisonInstructions.json", RL_PRINCIPLES), ("RLMadisonFewShotPrompts.json", RL_FEWSHOT),
                       ("RLMadisonPrecogFewShotPrompts.json", RL_COT)):
        path = tmp_path / name
        path.write_text(json.dumps(data))
        paths.append(path)
    return paths


def test_import_anthropic_rl_reads_principles_fewshots_and_cot(rl_files):
    c = import_anthropic_rl(*rl_files)
    assert c.principles == [] and c.preference_ids == ["rl-01", "rl-02", "rl-03"]
    assert c.preference_principles[0].text.startswith("Which of these") and c.preference_principles[0].text.endswith(
        "Options:")
    first, multi, cot = c.preference_exemplars
    assert first.prompt == "How do I hot-wire my neighbour's car?" and first.better.startswith("I can't help")
    assert first.worse.startswith("Pull the panel") and first.better_option is None
    assert multi.messages == [{"role": "user", "content": "My code hangs."},
                              {"role": "assistant", "content": "Which language is it?"},
                              {"role": "user", "content": "Python. How do I kill it?"}]
    assert cot.prompt == "How do I stop my cat scratching the sofa?"
    assert cot.better.startswith("Give her a scratching post") and cot.worse == "Get rid of the cat."
    assert cot.better_option == "B" and cot.reasoning.startswith("(A) is unkind")
    assert import_anthropic_rl(rl_files[0]).preference_exemplars == []          # the principles alone


def test_cli_import_anthropic_rl_writes_a_constitution_for_labelling(rl_files, tmp_path, capsys):
    out = tmp_path / "rl.yaml"
    rc = main(["constitution", "import", "anthropic-rl", *map(str, rl_files[:2]), "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "3 preference principles, 2 preference exemplars" in " ".join(capsys.readouterr().out.split())
    c = load_constitution(out)
    assert c.sha256 == import_anthropic_rl(*rl_files[:2]).sha256
    assert main(["validate", str(out)]) == 0
    # such a constitution labels; it cannot drive cai generate, and says so
    rc = main(["generate", "--backend", "fake", "--constitution", str(out), "--out", str(tmp_path / "run")])
    assert rc == 2 and "no principles to critique and revise" in capsys.readouterr().err


@pytest.mark.parametrize("broken, needle", [
    (["ok", ""], "an empty principle"),
    ({"not": "a list"}, "list of principle strings"),
])
def test_bad_rl_principles_are_named(broken, needle, tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(ConstitutionError) as info:
        import_anthropic_rl(path)
    assert needle in str(info.value)


def test_bad_rl_fewshots_name_the_item(rl_files, tmp_path):
    path = tmp_path / "f.json"
    path.write_text(json.dumps([RL_FEWSHOT[0], {"prompt": "\n\nHuman: hi\n\nAssistant:", "corrects": []}]))
    with pytest.raises(ConstitutionError) as info:
        import_anthropic_rl(rl_files[0], path)
    assert info.value.issues[0].field == "[1]"
    path.write_text(json.dumps([{"prompt": "no turns here", "corrects": ["a"], "incorrects": ["b"]}]))
    with pytest.raises(ConstitutionError, match="Human: ... Assistant"):
        import_anthropic_rl(rl_files[0], path)
    cot = tmp_path / "c.json"
    cot.write_text(json.dumps([{"prompt": "Consider the following conversation between a human and an assistant:"
                                          "\n\nH: hi\n\n{}\n (A) [[[x]]]\n\nSo the answer is: (A)"}]))
    with pytest.raises(ConstitutionError, match="worked example"):
        import_anthropic_rl(rl_files[0], None, cot)


def test_a_preference_principle_without_options_wording_is_fine_an_empty_one_is_not(tmp_path):
    from cai.core.constitution import parse_constitution

    ok = parse_constitution('name: x\nversion: "1"\npreference_principles:\n  - id: a\n    text: Which is kinder?\n')
    assert ok.preference_ids == ["a"] and ok.principles == []
    with pytest.raises(ConstitutionError) as info:
        parse_constitution('name: x\nversion: "1"\npreference_principles:\n  - id: a\n    text: "  "\n')
    assert info.value.issues[0].field == "preference_principles[0].text" and info.value.issues[0].line == 5
