import math

import numpy as np
import pytest

from camouflage_train.data.schema import AttributeSchema, InvalidRecordError, keep_largest
from tests.conftest import person


def test_to_arrays_pads_and_normalizes(schema):
    arrays = schema.to_arrays([person([0.1, 0.2, 0.3, 0.5], age=50, gender="male", yaw=-90)], "img.jpg")
    assert arrays.boxes.shape == (3, 4) and arrays.mask.tolist() == [True, False, False]
    np.testing.assert_allclose(arrays.boxes[0], [0.1, 0.2, 0.3, 0.5], rtol=1e-6)
    age, yaw = arrays.continuous[0, 0], arrays.continuous[0, 1]
    assert math.isclose(age, 0.5) and math.isclose(yaw, 0.0)
    assert arrays.categorical[0, 0] == 1  # male
    assert not arrays.boxes[1:].any() and not arrays.continuous[1:].any()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"age": 130}, "'age' = 130 is outside [0.0, 100.0]"),
        ({"age": float("nan")}, "'age' = nan"),
        ({"age": "old"}, "'age' must be a number"),
        ({"gender": "robot"}, "'gender' is 'robot'"),
        ({"gender": 5}, "'gender' is 5"),
        ({"box": [0.5, 0.1, 0.2, 0.4]}, "x0 < x1"),
        ({"box": [0.1, 0.1, 1.2, 0.4]}, "normalized to [0, 1]"),
        ({"box": [0.1, 0.1]}, "'box' must be 4 numbers"),
        ({"yaw": None}, "missing field(s) ['yaw']"),
        ({"body": [0.0, 0.0, 0.2, 0.9]}, "'body' [0.0, 0.0, 0.2, 0.9] must contain the face 'box'"),
        ({"body": [0.0, 0.0, 1.0]}, "'body' must be 4 numbers"),
        ({"body": [0.0, 0.0, 1.0, 1.5]}, "'body' [0.0, 0.0, 1.0, 1.5] must be normalized"),
    ],
)
def test_invalid_records_name_source_and_field(schema, change, message):
    record = {**person([0.1, 0.1, 0.3, 0.4]), **change}
    with pytest.raises(InvalidRecordError) as err:
        schema.validate(record, "data/persons.jsonl:7")
    assert "data/persons.jsonl:7" in str(err.value) and message in str(err.value)


def test_gender_accepts_index(schema):
    assert schema.to_arrays([person([0, 0, 1, 1], gender=0)], "x").categorical[0, 0] == 0


def test_mirror_flips_box_and_signed_angles(schema):
    record = person([0.1, 0.2, 0.3, 0.6], yaw=25.0)
    mirrored = schema.mirror(record)
    assert mirrored["box"] == pytest.approx([0.7, 0.2, 0.9, 0.6])
    assert mirrored["yaw"] == -25.0 and mirrored["roll"] == -3.0 and mirrored["pitch"] == -5.0
    assert schema.mirror(mirrored)["box"] == pytest.approx(record["box"])


def test_schema_config_errors():
    with pytest.raises(ValueError, match="symmetric"):
        AttributeSchema.from_config({"max_persons": 2, "continuous": {"yaw": {"low": 0, "high": 90, "mirror": True}}})
    with pytest.raises(ValueError, match="unknown keys"):
        AttributeSchema.from_config({"max_persons": 2, "attributes": {}})
    with pytest.raises(ValueError, match="at least two"):
        AttributeSchema.from_config({"max_persons": 2, "categorical": {"gender": ["x"]}})


def test_schema_config_round_trip(schema):
    assert AttributeSchema.from_config(schema.to_config()) == schema


def test_keep_largest_keeps_order():
    persons = [{"box": [0, 0, 0.1, 0.1]}, {"box": [0, 0, 0.5, 0.5]}, {"box": [0, 0, 0.3, 0.3]}]
    assert keep_largest(persons, 2) == [persons[1], persons[2]]


def test_a_persons_extent_is_its_body_else_its_face_grown_by_the_schema(schema):
    """The extent is the recorded body box; without one, the face box with the schema's margins (in face widths
    and heights) clipped to the image; under a face-only schema, the face box whatever the record holds."""
    face, body = [0.4, 0.2, 0.6, 0.4], [0.3, 0.1, 0.7, 0.95]
    assert schema.body is not None
    left, top, right, bottom = schema.body.from_face
    arrays = schema.to_arrays([{**person(face), "body": body}, person(face)], "x")
    np.testing.assert_allclose(arrays.extents[0], body, rtol=1e-6)
    grown = [0.4 - left * 0.2, 0.2 - top * 0.2, 0.6 + right * 0.2, 0.4 + bottom * 0.2]
    np.testing.assert_allclose(arrays.extents[1], np.clip(grown, 0.0, 1.0), rtol=1e-6, atol=1e-7)
    assert not arrays.extents[2].any()  # padding
    face_only = AttributeSchema.from_config({**schema.to_config(), "body": None})
    np.testing.assert_allclose(face_only.to_arrays([{**person(face), "body": body}], "x").extents[0], face, rtol=1e-6)
    assert "body" not in face_only.to_config()  # a face-only schema keeps the config (and cache keys) it had


def test_mirror_flips_the_body_with_the_face(schema):
    record = {**person([0.1, 0.2, 0.3, 0.6]), "body": [0.0, 0.1, 0.45, 1.0]}
    mirrored = schema.mirror(record)
    assert mirrored["body"] == pytest.approx([0.55, 0.1, 1.0, 1.0])
    schema.validate(mirrored, "mirrored")  # the mirrored body still contains the mirrored face


def test_body_config_errors(schema):
    with pytest.raises(ValueError, match=r"body\.from_face must be 4 margins"):
        AttributeSchema.from_config({**schema.to_config(), "body": {"from_face": [1.0, -0.5, 1.0, 2.0]}})
    with pytest.raises(ValueError, match="body must be"):
        AttributeSchema.from_config({**schema.to_config(), "body": {"margins": [1, 1, 1, 1]}})
    with pytest.raises(ValueError, match="must not be 'box' or 'body'"):
        AttributeSchema.from_config({"max_persons": 1, "continuous": {"body": {"low": 0, "high": 1}}})
