"""finetune/ merge and clean tools: keys, in/out JSON rules, caption/tag files, editable cleaning rules, errors."""

from __future__ import annotations

import json
import os

import pytest

from finetune import clean_captions_and_tags, merge_captions_to_metadata, merge_dd_tags_to_metadata
from finetune.clean_captions_and_tags import DEFAULT_RULES, clean_caption, clean_tags, load_rules
from finetune.image_files import list_images, load_all
from library.data.images import load_image
from library.errors import ConfigError, DatasetError
from tests.conftest import REPO_ROOT, run_cli
from tests.finetune_models import write_broken_image, write_solid_images


def write_text(path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def read_json(path) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture
def folder(tmp_path) -> str:
    """Three images; `a` and `b` have captions and tags, `c` has neither."""
    images = str(tmp_path / "train")
    write_solid_images(images, {"a": (255, 0, 0), "b": (0, 255, 0), "c": (0, 0, 255)})
    write_text(os.path.join(images, "a.caption"), "a red picture\nwith two lines\n")
    write_text(os.path.join(images, "b.caption"), "\ufeffa green picture\n")
    write_text(os.path.join(images, "a.txt"), "1girl, long_hair")
    write_text(os.path.join(images, "b.txt"), "rating:safe, 2girls, blue_eyes, smile")
    return images


def test_merge_captions_keys_by_stem_and_keeps_lines(folder, tmp_path):
    out = str(tmp_path / "meta_cap.json")
    merge_captions_to_metadata.main([folder, out])
    assert read_json(out) == {"a": {"caption": "a red picture\nwith two lines"}, "b": {"caption": "a green picture"}}


def test_merge_captions_full_path_keys_are_absolute_paths(folder, tmp_path):
    out = str(tmp_path / "meta_cap.json")
    merge_captions_to_metadata.main(["--full_path", folder, out])
    assert sorted(read_json(out)) == [os.path.abspath(os.path.join(folder, name)) for name in ("a.png", "b.png")]


def test_merge_tags_extends_in_json_and_leaves_it_unchanged(folder, tmp_path):
    cap = str(tmp_path / "meta_cap.json")
    merge_captions_to_metadata.main([folder, cap])
    before = read_json(cap)
    out = str(tmp_path / "meta_cap_dd.json")
    merge_dd_tags_to_metadata.main([folder, "--in_json", cap, out])
    assert read_json(cap) == before
    merged = read_json(out)
    assert merged["a"] == {"caption": "a red picture\nwith two lines", "tags": "1girl, long_hair"}
    assert merged["b"]["tags"] == "rating:safe, 2girls, blue_eyes, smile"


def test_merge_without_in_json_updates_the_output_file(folder, tmp_path):
    out = str(tmp_path / "meta.json")
    write_text(out, json.dumps({"other": {"caption": "kept"}}))
    merge_dd_tags_to_metadata.main([folder, out])
    assert read_json(out) == {"other": {"caption": "kept"}, "a": {"tags": "1girl, long_hair"},
                              "b": {"tags": "rating:safe, 2girls, blue_eyes, smile"}}


def test_merge_with_no_matching_text_files_writes_nothing(folder, tmp_path):
    out = tmp_path / "meta.json"
    with pytest.raises(DatasetError, match=r"\.nothing.*--caption_extension"):
        merge_captions_to_metadata.main([folder, str(out), "--caption_extension", ".nothing"])
    assert not out.exists()


def test_merge_missing_in_json_and_folder_are_errors(folder, tmp_path):
    with pytest.raises(DatasetError, match=r"--in_json: metadata file .*missing\.json does not exist"):
        merge_captions_to_metadata.main([folder, str(tmp_path / "o.json"), "--in_json", str(tmp_path / "missing.json")])
    with pytest.raises(DatasetError, match=r"train_data_dir .*nowhere does not exist"):
        merge_captions_to_metadata.main([str(tmp_path / "nowhere"), str(tmp_path / "o.json")])


def test_merge_recursive_keys_subfolder_images_by_relative_path(tmp_path):
    root = tmp_path / "train"
    write_solid_images(str(root / "sub"), {"x": (1, 2, 3)})
    write_text(root / "sub" / "x.caption", "nested")
    out = str(tmp_path / "m.json")
    merge_captions_to_metadata.main([str(root), out, "--recursive"])
    assert read_json(out) == {"sub/x": {"caption": "nested"}}


def test_images_sharing_a_stem_are_refused(tmp_path):
    write_solid_images(str(tmp_path), {"same": (0, 0, 0)})
    os.replace(tmp_path / "same.png", tmp_path / "same.jpg")
    write_solid_images(str(tmp_path), {"same": (0, 0, 0)})
    with pytest.raises(DatasetError, match=r"same\.jpg and .*same\.png"):
        merge_captions_to_metadata.main([str(tmp_path), str(tmp_path / "m.json")])


def test_list_images_skips_hidden_files_and_sorts(tmp_path):
    write_solid_images(str(tmp_path), {"b": (0, 0, 0), "a": (0, 0, 0), ".hidden": (0, 0, 0)})
    assert [os.path.basename(p) for p in list_images(str(tmp_path))] == ["a.png", "b.png"]


def test_default_rules_unify_girl_words_and_tidy_captions():
    rules = load_rules(DEFAULT_RULES)
    assert clean_caption("An anime girl and two Women  , in a womanly pose", rules) == "a girl and two girls, in a " \
        "womanly pose"
    assert clean_caption("a cartoon girl girl", rules) == "a girl"


def test_default_rules_clean_tags():
    rules = load_rules(DEFAULT_RULES)
    assert clean_tags("rating:safe, 1girl, long_hair, ^_^, smile, smile", rules) == "1girl, long hair, ^_^, smile"
    # several people: per-person hair and eye tags say nothing about who has them
    assert clean_tags("2girls, long_hair, blue_eyes, twintails, smile", rules) == "2girls, smile"


def test_clean_tool_writes_cleaned_json_and_keeps_input(folder, tmp_path):
    meta = str(tmp_path / "meta_cap_dd.json")
    merge_captions_to_metadata.main([folder, meta])
    merge_dd_tags_to_metadata.main([folder, meta])
    before = read_json(meta)
    out = str(tmp_path / "meta_clean.json")
    clean_captions_and_tags.main([meta, out])
    assert read_json(meta) == before
    assert read_json(out) == {
        "a": {"caption": "a red picture\nwith two lines", "tags": "1girl, long hair"},
        "b": {"caption": "a green picture", "tags": "2girls, smile"},
    }


def test_user_rules_file_replaces_the_defaults(tmp_path):
    rules_path = tmp_path / "rules.toml"
    write_text(rules_path, """
[tags]
underscores_to_spaces = false
remove = ["smile"]
[tags.replace]
1woman = "1girl"
[captions]
replace = [["photo", "picture"]]
tidy_spaces = false
""")
    meta = tmp_path / "m.json"
    write_text(meta, json.dumps({"k": {"caption": "a photo  of a photographer", "tags": "1woman, long_hair, smile"}}))
    clean_captions_and_tags.main([str(meta), str(meta), "--rules", str(rules_path)])
    assert read_json(meta) == {"k": {"caption": "a picture  of a photographer", "tags": "1girl, long_hair"}}


def test_rules_file_errors_name_the_key(tmp_path):
    rules_path = tmp_path / "rules.toml"
    write_text(rules_path, "[tags]\nremove_prefix = ['x']\n")
    with pytest.raises(ConfigError, match="unknown key 'remove_prefix' in \\[tags\\]; did you mean 'remove_prefixes'"):
        load_rules(str(rules_path))
    write_text(rules_path, "[captions]\nreplace = [['only one']]\n")
    with pytest.raises(ConfigError, match=r"\[captions\].replace .* pairs"):
        load_rules(str(rules_path))
    write_text(rules_path, "[captions]\nreplace = [['cat', 'dog'], ['dog', 'big cat']]\n")
    with pytest.raises(ConfigError, match="undo each other"):
        clean_caption("a cat", load_rules(str(rules_path)))


def test_tool_reports_user_error_in_one_line_with_exit_status_1(tmp_path):
    result = run_cli(
        [os.path.join(REPO_ROOT, "finetune", "merge_captions_to_metadata.py"), str(tmp_path / "nowhere"),
         str(tmp_path / "m.json")],
        tmp_path, launcher=False, timeout=60,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "ERROR" in errors[0] and "nowhere does not exist" in errors[0]
    assert "Traceback" not in result.stderr


def test_background_loading_keeps_order_and_reports_failures_as_values(tmp_path):
    paths = write_solid_images(str(tmp_path), {"a": (255, 0, 0), "b": (0, 255, 0)}, size=(4, 2))
    paths.insert(1, write_broken_image(str(tmp_path)))
    loaded = list(load_all(paths, load_image, workers=1))
    assert [item.path for item in loaded] == paths
    assert loaded[0].value[0, 0].tolist() == [255, 0, 0] and loaded[2].value.shape == (2, 4, 3)
    assert loaded[1].value is None and "Cannot decode image" in loaded[1].error
