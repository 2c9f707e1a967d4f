"""The identifier bytes read and written by telepacs' own upper layer agree with pydicom's."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pynetdicom.dsutils import decode, encode

from dicom_node.identifiers import (
    ResponseKeys,
    encode_elements,
    identifier_of,
    read_raw_identifier,
    response_dataset,
    response_elements,
)


def _query(charset: str | None, name: str) -> Dataset:
    ds = Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientName = name
    ds.PatientID = ""
    ds.StudyDate = "20240101-20240131"
    ds.ModalitiesInStudy = ["CT", "MR"]
    ds.StudyInstanceUID = ["1.2.3", "1.2.45"]
    ds.AccessionNumber = "A1 "
    ds.RetrieveAETitle = " WS1"
    ds.NumberOfStudyRelatedInstances = ""
    ds.StudyDescription = "Chụp CT sọ não" if charset == "ISO_IR 192" else "head"
    ds.ReferencedStudySequence = Sequence()
    ds.add_new(0x00090010, "LO", "PRIVATE CREATOR")
    ds.add_new(0x00091001, "LO", "private value")
    return ds


QUERIES = [
    (None, "SMITH^J*"),
    ("ISO_IR 192", "Nguyễn^Văn*"),
    ("ISO_IR 100", "Müller^Hans"),
    ("ISO_IR 6", "DOE*"),
]


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
@pytest.mark.parametrize("charset,name", QUERIES)
def test_raw_identifier_reads_as_pydicom_does(charset, name, implicit):
    raw = encode(_query(charset, name), implicit, True)
    expected = identifier_of(decode(BytesIO(raw), implicit, True))
    got = read_raw_identifier(raw, implicit)
    assert got == expected
    assert got.values()["PatientName"] == name and "PRIVATE CREATOR" not in str(got)


def test_what_the_raw_reader_leaves_to_pydicom():
    iso2022 = _query(None, "YAMADA")
    iso2022.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    assert read_raw_identifier(encode(iso2022, False, True), False) is None
    with_item = _query(None, "X")
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    with_item.ReferencedStudySequence = Sequence([item])
    assert read_raw_identifier(encode(with_item, False, True), False) is None
    binary = _query(None, "X")
    binary.Rows = 512
    assert read_raw_identifier(encode(binary, False, True), False) is None
    with pytest.raises(ValueError):
        read_raw_identifier(encode(_query(None, "X"), False, True)[:-3], False)


ROW = {"PatientName": "Nguyễn^Văn A", "PatientID": "P1", "StudyInstanceUID": "1.2.3.4", "StudyDate": "20240105",
       "ModalitiesInStudy": "CT\\MR", "NumberOfStudyRelatedInstances": 144, "AccessionNumber": "",
       "Rows": 512, "StudyDescription": "Chụp CT"}


def _keys(charset: str | None) -> ResponseKeys:
    query = _query(charset, "X")
    query.Rows = None
    return ResponseKeys.of(identifier_of(query))


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
@pytest.mark.parametrize("charset", [None, "ISO_IR 192"])
def test_raw_response_decodes_like_pydicoms(charset, implicit):
    elements = response_elements(_keys(charset), "STUDY", ROW, "TELEPACS", "ISO_IR 192")
    raw = encode_elements(elements, implicit)
    assert raw is not None
    ours = decode(BytesIO(raw), implicit, True)
    theirs = decode(BytesIO(encode(response_dataset(elements), implicit, True)), implicit, True)
    assert [elem.tag for elem in ours] == [elem.tag for elem in theirs]
    for mine, reference in zip(ours, theirs):
        value = list(mine.value) if isinstance(mine.value, (MultiValue, Sequence)) else mine.value
        expected = list(reference.value) if isinstance(reference.value, (MultiValue, Sequence)) else reference.value
        assert (mine.VR, value) == (reference.VR, expected), mine.keyword
    assert str(ours.PatientName) == "Nguyễn^Văn A" and ours.Rows == 512 and ours.NumberOfStudyRelatedInstances == 144


def test_raw_response_declines_what_it_does_not_write():
    elements = response_elements(_keys(None), "STUDY", ROW, "TELEPACS", ["", "ISO 2022 IR 87"])
    assert encode_elements(elements, False) is None
    latin = response_elements(_keys(None), "STUDY", {"PatientName": "Nguyễn"}, "TELEPACS", "ISO_IR 100")
    assert encode_elements(latin, False) is None  # not writable in Latin-1: pydicom decides (the handler avoids it)
