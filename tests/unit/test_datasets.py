"""rlstream.producers.datasets: the built-in task's rows, JSONL loading and its errors, epoch order."""
from __future__ import annotations

import json
import re

import pytest
from factories import legacy_config

from rlstream.builtin.task import builtin_rows, exact_match_reward
from rlstream.core.errors import ConfigError
from rlstream.preflight import preflight
from rlstream.producers.datasets import epoch_order, load_jsonl, load_rows


def test_builtin_rows_deterministic_and_correct():
    rows = list(builtin_rows(500, seed=3))
    assert len(rows) == 500
    assert rows == list(builtin_rows(500, seed=3))
    assert rows != list(builtin_rows(500, seed=4))
    assert list(builtin_rows(10, seed=3)) == rows[:10]  # a prefix: max_rows does not reshuffle
    for row in rows:
        m = re.fullmatch(r"(\d)\+(\d)=", row["prompt"])
        assert m, row
        assert row["answer"] == str((int(m[1]) + int(m[2])) % 10)
    assert len({r["prompt"] for r in rows}) > 90  # covers (nearly) all 100 problems


def test_exact_match_reward():
    assert exact_match_reward("7", "7") == 1.0
    assert exact_match_reward(" 7<eos>", "7") == 1.0
    assert exact_match_reward("<pad>7<eos><eos>", "7") == 1.0
    assert exact_match_reward("8", "7") == 0.0
    assert exact_match_reward("", "7") == 0.0


def test_load_rows_builtin_uses_max_rows_and_seed():
    cfg = legacy_config(max_rows=50, seed=2)
    assert load_rows(cfg) == list(builtin_rows(50, 2))


ROWS = [
    {"prompt": "What is 2+2?", "answer": "4"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
    {"prompt_token_ids": [1, 2, 3], "answer": "x", "meta": {"id": 7}},
]


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_load_jsonl_all_row_kinds(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [json.dumps(ROWS[0]), "", "   ", json.dumps(ROWS[1]), json.dumps(ROWS[2])])
    assert load_jsonl(p, 100) == ROWS
    assert load_jsonl(str(p), 100) == ROWS
    assert load_rows(legacy_config(dataset=str(p))) == ROWS


def test_load_jsonl_max_rows(tmp_path):
    lines = [json.dumps({"prompt": f"p{i}"}) for i in range(10)] + ["{not json"]
    p = write_jsonl(tmp_path / "d.jsonl", lines)
    rows = load_jsonl(p, 4)
    assert [r["prompt"] for r in rows] == ["p0", "p1", "p2", "p3"]
    assert len(load_jsonl(p, 10)) == 10  # stops before the bad line 11
    assert load_rows(legacy_config(dataset=str(p), max_rows=3)) == rows[:3]


def test_rows_past_max_rows_are_counted_in_the_log(tmp_path, caplog):
    """Issue 22 item 2: rows past max_rows were dropped silently."""
    p = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"prompt": f"p{i}"}) for i in range(10)] + ["", "{not json"])
    with caplog.at_level("WARNING", logger="rlstream.producers.datasets"):
        assert len(load_jsonl(p, 4)) == 4
    assert caplog.messages == [f"dataset {p}: using its first 4 rows (max_rows); the 7 row(s) after them are not "
                               "used"]  # blank lines do not count; the rest is counted, not parsed
    caplog.clear()
    exact = write_jsonl(tmp_path / "e.jsonl", [json.dumps({"prompt": "a"})] * 3 + ["", " "])
    with caplog.at_level("WARNING", logger="rlstream.producers.datasets"):
        assert len(load_jsonl(exact, 3)) == 3
    assert caplog.messages == []  # exactly max_rows rows (and blank lines): nothing left out


def test_with_a_user_rollout_factory_any_json_object_is_a_row(tmp_path):
    """Issue 22 item 2: the factory decides what a row means; only a non-object is refused."""
    rows = [{"question": "hi", "ground_truth": "42"}, {"prompt": ["not", "a", "string"]}, {"prompt_token_ids": []},
            {"messages": "free text"}, {}]
    p = write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    with pytest.raises(ConfigError, match="a row needs one of prompt, messages, prompt_token_ids"):
        load_rows(legacy_config(dataset=str(p)))  # the built-in rollout needs a prompt
    cfg = legacy_config(dataset=str(p), rollout_fn_factory="my_rollout:make_rollout_fn")
    assert load_rows(cfg) == rows == load_jsonl(p, 100, any_object=True)
    bad = write_jsonl(tmp_path / "bad.jsonl", [json.dumps(rows[0]), "[1, 2]"])
    with pytest.raises(ConfigError, match=re.escape(f"{bad}:2: a row must be a JSON object, got list")):
        load_rows(cfg.model_copy(update={"dataset": str(bad)}))


BAD = {
    "not_json": ("{nope", "not JSON"),
    "list_row": ("[1, 2]", "a row must be a JSON object, got list"),
    "string_row": ('"hello"', "a row must be a JSON object, got str"),
    "no_prompt_key": ('{"question": "hi"}', "a row needs one of prompt, messages, prompt_token_ids"),
    "prompt_not_str": ('{"prompt": 5}', "'prompt' must be a string"),
    "ids_empty": ('{"prompt_token_ids": []}', "'prompt_token_ids' must be a non-empty list"),
    "ids_negative": ('{"prompt_token_ids": [1, -2]}', "'prompt_token_ids' must be a non-empty list"),
    "ids_float": ('{"prompt_token_ids": [1, 2.5]}', "'prompt_token_ids' must be a non-empty list"),
    "ids_str": ('{"prompt_token_ids": "1 2"}', "'prompt_token_ids' must be a non-empty list"),
    "messages_not_list": ('{"messages": "hi"}', "'messages' must be a list of {role, content} objects"),
    "messages_no_role": ('{"messages": [{"content": "hi"}]}', "'messages' must be a list"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_row_reported_with_file_and_line(tmp_path, case):
    line, needle = BAD[case]
    p = write_jsonl(tmp_path / "data.jsonl", [json.dumps(ROWS[0]), "", line, json.dumps(ROWS[2])])
    with pytest.raises(ConfigError) as info:
        load_jsonl(p, 100)
    msg = str(info.value)
    assert msg.startswith("dataset error: ")
    assert f"{p}:3" in msg  # blank lines still count
    assert needle in msg
    assert "\n" not in msg
    assert info.value.exit_code == 2


def test_a_token_id_row_with_no_room_under_max_seq_len_is_a_dataset_error(tmp_path):
    p = write_jsonl(tmp_path / "ids.jsonl", [json.dumps({"prompt_token_ids": [1, 2, 3]}),
                                              json.dumps({"prompt_token_ids": [1, 2, 3, 4]})])
    assert len(load_rows(legacy_config(dataset=str(p), max_seq_len=5))) == 2  # 4 ids leave room for 1 token
    with pytest.raises(ConfigError) as info:
        load_rows(legacy_config(dataset=str(p), max_seq_len=4))
    assert str(info.value) == (f"dataset error: {p}:2: 'prompt_token_ids' has 4 ids, which leaves no room to generate "
                               "under max_seq_len 4; shorten or drop the row, or raise max_seq_len")
    assert info.value.exit_code == 2
    with pytest.raises(ConfigError, match=re.escape(f"{p}:2")):
        preflight(legacy_config(dataset=str(p), max_seq_len=4))  # `rlstream up` reports it before starting anything


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_jsonl(tmp_path / "nope.jsonl", 10)
    assert "nope.jsonl" in str(info.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_rows(legacy_config(dataset=str(tmp_path / "nope.jsonl")))


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_jsonl(tmp_path, 10)


def test_empty_file(tmp_path):
    p = write_jsonl(tmp_path / "e.jsonl", ["", "  "])
    with pytest.raises(ConfigError, match="has no rows"):
        load_jsonl(p, 10)


@pytest.mark.parametrize("n", [0, 1, 2, 17, 1000])
def test_epoch_order_is_a_deterministic_permutation(n):
    for epoch in range(3):
        order = epoch_order(n, epoch, seed=5, shuffle=True)
        assert sorted(order) == list(range(n))
        assert order == epoch_order(n, epoch, seed=5, shuffle=True)
    assert epoch_order(n, 0, seed=5, shuffle=False) == list(range(n))


def test_epoch_order_varies_with_epoch_and_seed():
    base = epoch_order(1000, 0, seed=5, shuffle=True)
    assert base != list(range(1000))
    assert base != epoch_order(1000, 1, seed=5, shuffle=True)
    assert base != epoch_order(1000, 0, seed=6, shuffle=True)
    assert epoch_order(1000, 3, seed=5, shuffle=False) == list(range(1000))
