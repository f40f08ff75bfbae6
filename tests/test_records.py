"""@frozen: a frozen dataclass like any other, only cheaper to make."""
import dataclasses
import pickle

import pytest

from devastator.records import frozen


@frozen
class Entry:
    seq: int
    body: bytes
    kind: str = "msg"
    tags: list = dataclasses.field(default_factory=list)


def test_it_is_made_positionally_and_by_keyword_with_defaults():
    assert Entry(1, b"x") == Entry(seq=1, body=b"x", kind="msg", tags=[])
    assert Entry(1, b"x", "copy").kind == "copy"
    assert repr(Entry(2, b"y")) == "Entry(seq=2, body=b'y', kind='msg', tags=[])"


def test_each_instance_gets_its_own_factory_value():
    first, second = Entry(1, b""), Entry(2, b"")
    assert first.tags == [] and first.tags is not second.tags
    given = ["a"]
    assert Entry(1, b"", tags=given).tags is given


def test_missing_and_unknown_arguments_are_refused_as_by_any_function():
    with pytest.raises(TypeError, match="body"):
        Entry(1)
    with pytest.raises(TypeError, match="colour"):
        Entry(1, b"", colour="red")


def test_it_cannot_be_changed_after_it_is_made():
    entry = Entry(1, b"x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.seq = 2
    assert not hasattr(entry, "__dict__")  # slots


@frozen
class Point:
    x: int
    y: int = 0


def test_it_stays_a_dataclass_hash_replace_fields_pickle():
    assert hash(Point(1, 2)) == hash(Point(1, 2))
    assert dataclasses.replace(Point(1, 2), y=5) == Point(1, 5)
    assert [field.name for field in dataclasses.fields(Point)] == ["x", "y"]
    assert pickle.loads(pickle.dumps(Point(3, 4))) == Point(3, 4)


def test_what_its_init_cannot_do_is_refused_when_the_class_is_made():
    with pytest.raises(TypeError, match="__post_init__"):
        @frozen
        class Checked:
            x: int

            def __post_init__(self):
                pass

    with pytest.raises(TypeError, match="plain fields"):
        @frozen
        class KeywordOnly:
            x: int = dataclasses.field(kw_only=True)

    with pytest.raises(TypeError, match="plain fields"):
        @frozen
        class Hidden:
            x: int = dataclasses.field(init=False, default=0)

    with pytest.raises(TypeError, match="plain fields"):
        @frozen
        class Initialised:
            x: int
            scale: dataclasses.InitVar[int] = 1
