import pytest

from archive.keys import InvalidUID, object_key, parse_object_key, validate_uid


@pytest.mark.parametrize("uid", ["1.2.840.10008.5.1.4.1.1.2", "2.25.1234", "1", "1.2.3.0.4", "1.2.840.0123"])
def test_valid_uids_pass(uid):
    assert validate_uid(uid) == uid


def test_trailing_padding_is_stripped():
    assert validate_uid("1.2.3\x00") == "1.2.3"
    assert validate_uid("1.2.3 ") == "1.2.3"


@pytest.mark.parametrize(
    "uid",
    ["", "../../etc/passwd", "1.2.abc", "1..2", ".1.2", "1.2.", "1/2", "1.2.3\\4", "1." + "2" * 63, None, "١.٢"],
)
def test_invalid_uids_are_refused(uid):
    with pytest.raises(InvalidUID):
        validate_uid(uid)


def test_64_characters_is_the_limit():
    uid64 = "1." + "2" * 62
    assert len(uid64) == 64
    assert validate_uid(uid64) == uid64
    with pytest.raises(InvalidUID, match="65 characters"):
        validate_uid(uid64 + "3")


def test_object_key_layout_and_inverse():
    key = object_key("1.2", "1.2.3", "1.2.3.4")
    assert key == "1.2/1.2.3/1.2.3.4.dcm"
    assert parse_object_key(key) == ("1.2", "1.2.3", "1.2.3.4")


def test_object_key_refuses_path_escape():
    with pytest.raises(InvalidUID):
        object_key("1.2", "../../etc", "1.2.3")
    with pytest.raises(InvalidUID):
        parse_object_key("../x/1.2.dcm")
