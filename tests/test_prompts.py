"""Prompts for ``latentflow sample`` (pipelines/prompts.py): files, checks and the record beside the images."""

from __future__ import annotations

import json

import pytest

from pipelines.prompts import PromptError, gather_prompts, read_prompts_file, write_prompts_json


def test_a_text_file_gives_one_prompt_per_line_after_the_flags(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# digits\na thick seven leaning right\n\n  7, thin, upright  \n", encoding="utf-8")
    assert gather_prompts(["a zero"], path) == ["a zero", "a thick seven leaning right", "7, thin, upright"]


def test_a_json_file_is_a_list_of_strings_and_anything_else_is_refused_naming_it(tmp_path):
    good, bad = tmp_path / "p.json", tmp_path / "bad.json"
    good.write_text(json.dumps(["un sept épais", ""]), encoding="utf-8")
    assert read_prompts_file(good) == ["un sept épais", ""]  # "" is the null caption: allowed
    bad.write_text(json.dumps({"prompt": "x"}), encoding="utf-8")
    with pytest.raises(PromptError, match="bad.json: a .json prompts file holds a list of strings"):
        read_prompts_file(bad)


@pytest.mark.parametrize("content,message", [(b"\xff\xfe7", "not UTF-8 text"), (b"# only a comment\n", "holds none")])
def test_unusable_files_are_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    with pytest.raises(PromptError, match=f"prompts.txt.*{message}|{message}.*prompts.txt|--prompts .*{message}"):
        gather_prompts(None, path)
    with pytest.raises(PromptError, match="no such file"):
        gather_prompts(None, tmp_path / "missing.txt")


def test_no_prompt_and_an_overlong_prompt_are_refused():
    with pytest.raises(PromptError, match="at least one --prompt"):
        gather_prompts([], None)
    with pytest.raises(PromptError, match="prompt 1 is 1001 characters"):
        gather_prompts(["ok", "x" * 1001], None)


def test_prompts_json_says_which_folder_holds_which_prompt(tmp_path):
    path = write_prompts_json(tmp_path, ["a thick seven", "a thin one"], 3, {"guidance": 2.0})
    record = json.loads(path.read_text(encoding="utf-8"))
    assert record["prompts"][1] == {"index": 1, "prompt": "a thin one", "folder": "1"}
    assert (record["per_prompt"], record["guidance"]) == (3, 2.0)
