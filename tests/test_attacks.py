"""The re-identification attackers, checked against what they promise: chance level for an attacker that sees
nothing, a false-accept rate that holds on impostors, no face pixel read by `appearance`, another photo of the same
identity for the other-view protocol, and an adaptive attacker that never scores an identity it trained on."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from camouflage_train.data.identities import (
    OTHER_VIEW_STREAM,
    SourceOtherViews,
    SyntheticOtherViews,
    celebahq_identities,
    other_view_key,
    read_identities,
)
from camouflage_train.data.identities import (
    main as identities_main,
)
from camouflage_train.data.synthetic import IDENTITY_ATTRIBUTES, draw_scene, draw_scene_identities
from camouflage_train.errors import DataError
from camouflage_train.metrics.attacks import (
    appearance_features,
    attribute_scores,
    hide_faces,
    impostor_threshold,
    own_columns,
    person_crop,
    rank1_hits,
    templates,
)
from camouflage_train.miniworld.scenes import face_schema
from camouflage_train.modules.privacy_attacks import PrivacyAttacks, _Person, _Reading
from camouflage_train.modules.reid_attacker import AdaptiveAttackerConfig, identity_folds


def test_an_attacker_that_sees_nothing_scores_chance():
    # Equal scores everywhere: a random pick among the 10 identities finds the right one a tenth of the time.
    hits = rank1_hits(np.zeros((7, 10)), np.arange(7))
    np.testing.assert_allclose(hits, 0.1)
    # A probe whose identity is not in the gallery, or whose own score is unknown, is a miss, not dropped.
    scores = np.eye(3)
    scores[1, 1] = np.nan
    # Exact: hits are 1, 1/k or 0 by definition, no arithmetic on the scores.
    np.testing.assert_array_equal(rank1_hits(scores, np.array([0, 1, -1])), [1.0, 0.0, 0.0])


def test_the_threshold_accepts_the_stated_share_of_impostors():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(400, 400))  # impostors N(0, 1); genuine pairs on the diagonal far above
    np.fill_diagonal(scores, 10.0)
    own = np.arange(400)
    for far in (0.01, 0.001):
        threshold = impostor_threshold(scores, own, far)
        impostors = scores[~np.eye(400, dtype=bool)]
        # At most the stated rate of impostors is accepted (above the threshold), and within sampling error of it.
        assert np.mean(impostors > threshold) <= far
        assert np.mean(impostors > threshold) == pytest.approx(far, rel=0.1)


def test_templates_average_each_identitys_first_references():
    e = np.eye(3)
    gallery = np.stack([e[0], e[1], e[2], np.full(3, np.nan)])  # a reference not seen (NaN) is skipped
    template, names = templates(gallery, ["a", "a", "b", "b"])
    assert names == ["a", "b"]
    np.testing.assert_allclose(template[0], (e[0] + e[1]) / np.sqrt(2))
    np.testing.assert_allclose(template[1], e[2])
    single, _ = templates(gallery, ["a", "a", "b", "b"], references=1)
    np.testing.assert_allclose(single[0], e[0])


@pytest.mark.parametrize("photo, crop_size", [(64, 32), (64, 48), (512, 224), (1024, 224), (160, 224)])
def test_the_no_face_attackers_read_no_face_pixel_at_any_size(photo, crop_size):
    """Whatever the face and crop sizes (the crop shrunk or enlarged), painting every face pixel another colour
    changes nothing the no-face crops hold: every face, the person's and a neighbour's, is hidden in the photo."""
    rng = np.random.default_rng(photo + crop_size)
    for _ in range(20):
        image = Image.fromarray(rng.integers(0, 256, size=(photo, photo, 3), dtype=np.uint8))
        w = rng.uniform(0.05, 0.5)
        x0, y0 = rng.uniform(0, 1 - w), rng.uniform(0, 0.5)
        box = np.array([x0, y0, x0 + w, y0 + w * 1.2])
        neighbour = np.clip(box + np.array([w * 1.1, 0.05, w * 1.1, 0.05]), 0, 1)  # beside it, inside its extent
        faces = np.stack([box, neighbour]) * photo
        painted = np.array(image)
        for fx0, fy0, fx1, fy1 in faces:  # every pixel the boxes touch
            painted[int(fy0) : int(np.ceil(fy1)), int(fx0) : int(np.ceil(fx1))] = rng.integers(0, 256, size=3)
        read = [person_crop(hide_faces(im, faces), box, crop_size) for im in (image, Image.fromarray(painted))]
        assert np.array_equal(np.asarray(read[0][0]), np.asarray(read[1][0]))  # the same pixels, computed twice
        # Exact: the same function on identical pixels (asserted just above), in the same process.
        np.testing.assert_array_equal(appearance_features(*read[0]), appearance_features(*read[1]))


def test_appearance_reads_the_clothes():
    image, persons = draw_scene(3, face_schema(), 64, min_persons=1, max_persons=1)
    box = persons[0]["box"]
    w, h = image.size
    base = appearance_features(*person_crop(hide_faces(image, np.array([box]) * w), box, 32))
    recoloured = image.copy()  # the body: below the face, wider than it
    width = (box[2] - box[0]) * w
    ImageDraw.Draw(recoloured).rectangle([box[0] * w - width, box[3] * h + 3, box[2] * w + width, h], fill=(0, 255, 0))
    changed = appearance_features(*person_crop(hide_faces(recoloured, np.array([box]) * w), box, 32))
    assert float(changed @ base) < 0.9


def test_the_crop_keeps_the_face_box_where_the_extent_puts_it():
    image = Image.new("RGB", (100, 100))
    crop, face = person_crop(image, (0.4, 0.2, 0.6, 0.4), 50, extent=(1.0, 0.5, 1.0, 1.5))
    assert crop.size == (50, 50)
    # Extent: 20 px face -> 20 px left and right, 10 px above, 30 px below: the face is the middle third across.
    np.testing.assert_allclose(face, (1 / 3, 1 / 6, 2 / 3, 1 / 2))


def test_other_views_show_the_same_identity_elsewhere():
    schema = face_schema()
    views = SyntheticOtherViews(schema, 64, views_per_identity=3, min_persons=3)
    name = f"{1_000_003:08d}.png"
    image, persons, appearances = draw_scene_identities(1_000_003, schema, 64, min_persons=3)
    drawn = views.views(name, 0)
    assert len(drawn) == 3 and len(persons) >= 3  # several people, each its own identity
    assert views.identity(name, 0) != views.identity(name, 1)
    for view in drawn:
        for key in IDENTITY_ATTRIBUTES:  # what a person keeps from photo to photo
            assert view.record[key] == persons[0][key]
        assert view.record["box"] != persons[0]["box"]  # elsewhere
        assert not np.array_equal(np.asarray(view.image), np.asarray(image))
    # The same call draws the same photos (seeded per scene, person and view), and each view is its own photo.
    again = views.views(name, 0)
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(drawn, again, strict=True))
    assert not np.array_equal(np.asarray(drawn[0].image), np.asarray(drawn[1].image))
    # The identity's colours are the ones it had in the scene: its clothes colour is in the view.
    clothes = np.array(appearances[0].clothes)
    pixels = np.asarray(drawn[0].image).reshape(-1, 3).astype(int)
    assert (np.abs(pixels - clothes).sum(axis=1) == 0).any()  # PIL fills with the exact colour (integers)


def test_scene_identities_do_not_change_the_scene():
    a, persons = draw_scene(11, face_schema(), 64)
    b, same, appearances = draw_scene_identities(11, face_schema(), 64)
    assert persons == same and len(appearances) == len(persons)
    assert np.array_equal(np.asarray(a), np.asarray(b))  # the same drawing calls, run twice


def test_attribute_attacker_puts_gender_before_age():
    probe = np.array([[30.0, 1.0]])
    gallery = np.array([[31.0, 0.0], [60.0, 1.0], [np.nan, np.nan]])  # nearer age, other gender; far age, same gender
    scores, names = attribute_scores(probe, gallery, ["x", "y", "z"])
    assert names == ["x", "y", "z"] and scores[0, 1] > scores[0, 0] and np.isnan(scores[0, 2])
    assert rank1_hits(scores, own_columns(["y"], names))[0] == 1.0  # a unique top: exactly one hit


def _people(n: int, dim: int, rng: np.random.Generator) -> list[_Person]:
    """n identities whose anonymized probes keep the colours around the face (``appearance``, ``context_no_face``:
    the gallery's, with a little noise) and lose the whole-crop features (``context``: fresh noise)."""
    noisy = lambda v, scale: (v + scale * rng.normal(size=dim)) / np.linalg.norm(v + scale * rng.normal(size=dim))  # noqa: E731
    people = []
    for i in range(n):
        kept, lost = rng.normal(size=dim), rng.normal(size=dim)
        gallery = {"context": lost, "context_no_face": kept, "appearance": kept}
        probe = {"context": rng.normal(size=dim), "context_no_face": noisy(kept, 0.3), "appearance": noisy(kept, 0.3)}
        unit = lambda f: _Reading({k: v / np.linalg.norm(v) for k, v in f.items()}, np.full(2, np.nan))  # noqa: E731
        person = _Person(f"{i:08d}.png", 0, f"id{i}", unit(gallery), views=[unit(gallery)])
        person.outputs["row"] = unit(probe)
        people.append(person)
    return people


def test_the_adaptive_attacker_learns_what_the_anonymizer_leaves():
    attacks = PrivacyAttacks(adaptive=AdaptiveAttackerConfig(steps=150, lr=3e-2), seed=0)
    attacks.persons = {(p.image, 0): p for p in _people(80, 16, np.random.default_rng(0))}
    result = attacks.results(["row"])["row"]
    # It starts at the whole-crop attacker, which the anonymizer defeats (chance 1/80), and learns on the other
    # fold's identities to trust the parts the anonymizer leaves, on identities it never trained on.
    assert result["attack/context/other_view/rank1"] < 0.1
    assert result["attack/adaptive/other_view/rank1"] > 0.8
    assert result["attack/worst/other_view/rank1"] >= result["attack/adaptive/other_view/rank1"]
    for fold in (0, 1):
        assert result[f"attack/adaptive/other_view/weight/context/fold{fold}"] < 0.5


def test_the_adaptive_attacker_never_scores_an_identity_it_trained_on(monkeypatch):
    from camouflage_train.modules import privacy_attacks

    trained_on = []
    real = privacy_attacks.train_attacker

    def spy(probe, gallery, groups, cfg, seed):
        trained_on.append(set(groups.tolist()))  # the identity codes whose pairs this attacker trains on
        return real(probe, gallery, groups, cfg, seed)

    monkeypatch.setattr(privacy_attacks, "train_attacker", spy)
    attacks = PrivacyAttacks(adaptive=AdaptiveAttackerConfig(steps=5), seed=0)
    people = _people(30, 8, np.random.default_rng(1))
    for i, person in enumerate(people):  # 15 identities of two persons each, in different images
        person.identity = f"id{i // 2}"
    attacks.persons = {(p.image, 0): p for p in people}
    result = attacks.results(["row"])["row"]
    identities = list(dict.fromkeys(p.identity for p in people))  # the codes' order: first seen
    for protocol, calls in (("same_image", trained_on[:2]), ("other_view", trained_on[2:])):
        scored = {}  # fold -> the identities it scores
        for person in people:
            fold = int(identity_folds([person.identity], 2, salt=protocol)[0])
            scored.setdefault(fold, set()).add(person.identity)
        for fold, codes in enumerate(calls):
            trained = {identities[c] for c in codes}
            assert trained and not trained & scored[fold]  # an attacker never scores an identity it trained on
            assert trained | scored[fold] == set(identities)  # and trains on every other one
        assert result[f"attack/adaptive/{protocol}/n"] == 30


def test_an_other_view_is_never_the_photo_the_person_was_anonymized_from():
    """Two persons of one identity in two evaluated photos a and b, each the other's only other photo: the
    identity's gallery holds both, so b is in the gallery of the person anonymized from b. The probes here are
    their own originals and the two photos are unrelated: only scoring a probe against its own photo would find it
    (rank-1 1.0); scored against its other photo only, it stays at chance (1/20)."""
    rng = np.random.default_rng(2)
    reading = lambda v, photo=None: _Reading({"context": v / np.linalg.norm(v)}, np.full(2, np.nan), photo)  # noqa: E731
    people = []
    for i in range(40):
        person = _Person(f"{i:08d}.png", 0, f"id{i // 2}", reading(rng.normal(size=8)))
        person.outputs["row"] = person.original
        people.append(person)
    for a, b in zip(people[0::2], people[1::2], strict=True):
        a.views = [reading(b.original.features["context"], b.image)]
        b.views = [reading(a.original.features["context"], a.image)]
    attacks = PrivacyAttacks(adaptive=None, seed=0)
    attacks.persons = {(p.image, 0): p for p in people}
    assert attacks.results(["row"])["row"]["attack/context/other_view/rank1"] < 0.25


def test_identity_sidecar_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "identities.jsonl"
    with pytest.raises(DataError, match=r"does not exist.*celebahq"):
        read_identities(path)
    path.write_text('{"image": "00000001.png", "identity": 7}\n{"image": "00000002.png"}\n')
    with pytest.raises(DataError, match=r"identities.jsonl:2: not an identity row"):
        read_identities(path)
    path.write_text('{"image": "00000001.png", "identity": 7}\n{"image": "00000002.png", "person": 1, "identity": 7}\n')
    assert read_identities(path) == {("00000001.png", 0): "7", ("00000002.png", 1): "7"}


def test_celebahq_identities_follow_the_published_mapping(tmp_path, capsys):
    (tmp_path / "map.txt").write_text(
        "idx         orig_idx    orig_file\n0 119613 119614.jpg\n1 99094 099095.jpg\n2 5 000006.jpg\n"
    )
    (tmp_path / "id.txt").write_text("000006.jpg 12\n099095.jpg 3\n119614.jpg 12\n")
    rows = celebahq_identities(tmp_path / "map.txt", tmp_path / "id.txt")
    assert rows == [
        {"image": "00000000.png", "person": 0, "identity": "12"},
        {"image": "00000001.png", "person": 0, "identity": "3"},
        {"image": "00000002.png", "person": 0, "identity": "12"},
    ]
    out = tmp_path / "identities.jsonl"
    args = ["celebahq", "--mapping", str(tmp_path / "map.txt"), "--celeba-identities", str(tmp_path / "id.txt")]
    assert identities_main([*args, "--out", str(out)]) == 0
    assert read_identities(out)[("00000002.png", 0)] == "12" and "2 identities" in capsys.readouterr().out


def test_source_other_views_are_the_other_photos_of_the_identity(tmp_path):
    from camouflage_train.data.sources import RawSample

    class Source:
        def __init__(self, names):
            self.names = names
            self.samples = [draw_scene(i, face_schema(), 32, max_persons=1) for i in range(3)]

        def __len__(self):
            return 3

        def name_of(self, index):
            return self.names[index]

        def __getitem__(self, index):
            image, persons = self.samples[index]
            return RawSample(image, persons, None, f"row {index}", f"{index:08d}.png")

    path = tmp_path / "identities.jsonl"
    rows = [{"image": f"{i:08d}.png", "identity": "a" if i < 2 else "b"} for i in range(3)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    source = Source([f"{i:08d}.png" for i in range(3)])
    views = SourceOtherViews(source, path)
    (view,) = views.views("00000000.png", 0)  # the other photo of "a", never the probe's own
    assert view.name == "00000001.png" and np.array_equal(np.asarray(view.image), np.asarray(source.samples[1][0]))
    assert views.views("00000002.png", 0) == []  # "b" has no other photo
    # A source whose names and samples disagree is refused, not read as someone else's photo.
    shuffled = SourceOtherViews(Source(["00000001.png", "00000000.png", "00000002.png"]), path)
    with pytest.raises(DataError, match="is named"):
        shuffled.views("00000000.png", 0)


def test_dataset_batches_name_each_persons_record(tmp_path):
    from camouflage_train.data.dataset import PersonImageDataset
    from camouflage_train.data.sources import RawSample

    schema = face_schema()
    persons = [
        {"box": [0.0, 0.0, 0.2, 0.2], "age": 30.0, "yaw": 0.0, "pitch": 0.0, "roll": 0.0, "gender": "male"},
        {"box": [0.5, 0.5, 0.7, 0.7], "age": 40.0, "yaw": 0.0, "pitch": 0.0, "roll": 0.0, "gender": "female"},
    ]

    class Source:
        skipped = None  # no rows left out up front

        def __len__(self):
            return 1

        def __getitem__(self, index):
            return RawSample(Image.new("RGB", (128, 64)), persons, None, "k", "00000000.png")

        def fingerprint(self):
            return {}

    # A centre crop of the 128x64 image keeps x in [32, 96): the first person is cut off, the second stays.
    item = PersonImageDataset(Source(), schema, 64, random_crop=False)[0]
    assert item["person_mask"].tolist()[:2] == [True, False] and item["person_index"].tolist()[:2] == [1, -1]
    assert torch.equal(item["person_index"][item["person_mask"]], torch.tensor([1]))


def test_other_view_streams_never_repeat_a_scenes_numbers():
    # numpy pads a seed key with zeros: a key [k, 0, 0, 0] would draw scene k's numbers.
    scenes = {tuple(np.random.default_rng(seed).integers(0, 2**62, size=2)) for seed in range(0, 12_000)}
    for scene in (0, 1, 2021, OTHER_VIEW_STREAM):
        for person in range(3):
            for view in range(3):
                draw = tuple(np.random.default_rng(other_view_key(scene, person, view)).integers(0, 2**62, size=2))
                assert draw not in scenes


def test_the_contrastive_loss_is_clips():
    from camouflage_train.models.losses import symmetric_info_nce

    # Nothing told apart: each row and column picks its pair among B at chance, log B; pairs far apart: about 0.
    assert float(symmetric_info_nce(torch.zeros(5, 5))) == pytest.approx(np.log(5), rel=1e-6)
    assert float(symmetric_info_nce(20.0 * torch.eye(5))) < 1e-6
    # A negative set very low (another pair of the same identity) is no competitor: the loss of 2 pairs, not 3.
    logits = torch.zeros(3, 3)
    logits[0, 1] = logits[1, 0] = -1e4
    assert float(symmetric_info_nce(logits)) == pytest.approx((2 * np.log(2) + np.log(3)) / 3, rel=1e-5)


def test_the_floor_guesses_where_the_face_pack_reads_nothing():
    """Four identities told apart by age; the first one's other photo shows no readable face: its person can only
    guess (1/4), the others are found. An unread probe guesses too, never hits or misses for sure."""
    people = []
    for i in range(4):
        attributes = np.array([30.0 + 10 * i, 1.0])
        original = _Reading({"context": np.eye(4)[i]}, attributes)
        view = _Reading({"context": np.eye(4)[i]}, attributes if i else np.full(2, np.nan))
        person = _Person(f"{i:08d}.png", 0, f"id{i}", original, views=[view])
        person.outputs["row"] = original
        people.append(person)
    attacks = PrivacyAttacks(adaptive=None)
    attacks.persons = {(p.image, 0): p for p in people}
    assert attacks.results(["row"])["row"]["attack/floor/other_view/rank1"] == pytest.approx((0.25 + 3) / 4)
    people[1].original.attributes = np.full(2, np.nan)  # now the second person's own age is not read either
    assert attacks.results(["row"])["row"]["attack/floor/other_view/rank1"] == pytest.approx((0.25 + 0.25 + 2) / 4)


def test_the_adaptive_attacker_refuses_parts_some_persons_lack():
    with pytest.raises(ValueError, match="face recogniser reads nothing"):
        PrivacyAttacks(adaptive=AdaptiveAttackerConfig(parts=("context", "face:buffalo_l")))
