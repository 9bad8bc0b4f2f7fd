"""Turn a :class:`~camouflage_train.data.sources.RawSample` into training tensors.

Geometry (resize, crop) runs through torchvision's functional transforms on the image and the boxes
together, so boxes always match pixels; a horizontal flip goes through :meth:`AttributeSchema.mirror`,
the one place that knows which attributes change sign. Persons cut off by the crop or beyond
``max_persons`` are dropped and counted in ``persons_dropped`` (the module logs the sum); ``persons_left``
counts those of them still in the image (partly cut off, beyond ``max_persons``, or left out of the records
by the annotation): anonymization must not call such an image done.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from camouflage_train.data.images import BadSampleError
from camouflage_train.data.sampling import Draw, SampleKey, generator_for, split_key
from camouflage_train.data.schema import BODY_KEY, BOX_KEY, AttributeSchema, InvalidRecordError, keep_largest
from camouflage_train.data.sources import SampleSource

# Each kept person's index in its image's records, carried through the crop to the batch's ``person_index``
# (-1 on padding): what the person is called in records keyed by image and person (identities, other views).
RECORD_INDEX_KEY = "_record_index"
# The batch keys of the padded person arrays (:class:`~camouflage_train.data.schema.PersonArrays`).
PERSON_ARRAY_KEYS = ("boxes", "extents", "continuous", "categorical", "person_mask")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Skipped:
    """Returned instead of a sample that cannot be used; the collate function counts it by reason.

    Args:
        reason: a short label (``decode error``, ``too small``, ...).
        key: the sample's key, for the log.
    """

    reason: str
    key: str


def collate_skipping(items: list[dict[str, Any] | Skipped]) -> dict[str, Any]:
    """Collate the usable samples; ``batch["skipped"]`` maps reason -> count, ``batch["size"]`` is what is left.

    Args:
        items: the loader's samples, some of them :class:`Skipped`.
    """
    good = [item for item in items if not isinstance(item, Skipped)]
    seeds = [item.pop("sample_seed") for item in good if "sample_seed" in item]
    batch: dict[str, Any] = default_collate(good) if good else {}
    if seeds:
        batch["sample_seed"] = seeds  # a list: stays on the host, read without a device sync
    skipped = [item for item in items if isinstance(item, Skipped)]
    batch["skipped"] = dict(Counter(item.reason for item in skipped))
    batch["skipped_items"] = [(item.key, item.reason) for item in skipped]
    batch["size"] = len(good)
    return batch


@dataclass(frozen=True)
class CaptionBuilder:
    """Use the sample's own caption when it has one, else fill ``template`` from the person records.

    ``{people}`` in ``template`` becomes the persons, each formatted with ``person`` (any schema field).

    Args:
        template: the prompt; ``{people}`` is the persons' descriptions joined, ``{count}`` their number.
        person: one person's description, formatted with its record's fields.
        prefer_dataset_caption: use the sample's own caption when it has one.
    """

    template: str = "a photo of {people}"
    person: str = "a {age:.0f} year old {gender}"
    prefer_dataset_caption: bool = True

    def __call__(self, caption: str | None, persons: Sequence[Mapping[str, Any]]) -> str:
        if self.prefer_dataset_caption and isinstance(caption, str) and caption.strip():
            return caption
        people = ", ".join(self.person.format(**p) for p in persons) if persons else "nobody"
        return self.template.format(people=people, count=len(persons))


class PersonImageDataset(Dataset):
    """Square crops at ``resolution`` with padded person arrays and a caption.

    Args:
        source: the samples (:mod:`~camouflage_train.data.sources`).
        schema: the attribute schema.
        resolution: the square crop size in pixels.
        random_crop: crop at random (else centrally).
        flip_prob: probability of a horizontal flip (boxes and ``mirror`` attributes follow).
        min_visible: persons keeping less than this share of their box inside the crop are dropped.
        captions: how captions are made when a sample has none.
    """

    def __init__(
        self,
        source: SampleSource,
        schema: AttributeSchema,
        resolution: int,
        random_crop: bool = False,
        flip_prob: float = 0.0,
        min_visible: float = 0.5,
        captions: CaptionBuilder | None = None,
    ) -> None:
        if not 0.0 <= flip_prob <= 1.0 or not 0.0 < min_visible <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1] and min_visible in (0, 1], got {flip_prob}, {min_visible}")
        self.source, self.schema, self.resolution = source, schema, resolution
        self.random_crop, self.flip_prob, self.min_visible = random_crop, flip_prob, min_visible
        self.captions = captions or CaptionBuilder()
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | SampleKey) -> dict[str, Any] | Skipped:
        """A training sample, or :class:`Skipped` with the reason (logged once per reason per process).

        ``key`` is an index, or ``(index, sample_seed)`` from :class:`~camouflage_train.data.sampling.ResumableSampler`:
        then crop and flip come from their own streams of the seed (:class:`~camouflage_train.data.sampling.Draw`),
        and the item carries the seed for the training step's randomness.
        """
        index, seed = split_key(key)
        return self.prepare(lambda: self.source[index], seed, self._name(index))

    def prepare(self, read: Callable[[], Any], seed: int | None, where: str) -> dict[str, Any] | Skipped:
        """The training sample of the raw sample ``read()`` returns, or :class:`Skipped`: what ``__getitem__`` does
        for every dataset whose samples are read elsewhere (streamed shards) but transformed the same way.

        Args:
            read: returns the :class:`~camouflage_train.data.sources.RawSample` (may raise ``BadSampleError``).
            seed: the sample's seed (crop, flip and the training step's draws), or ``None``: the global RNG.
            where: the sample's name in a :class:`Skipped`.
        """
        flip = self.flip_prob > 0 and bool(torch.rand((), generator=generator_for(seed, Draw.FLIP)) < self.flip_prob)
        result = self._variants(read, where, (flip,), generator_for(seed, Draw.CROP))
        if isinstance(result, Skipped):
            return result
        return {**result[0], "sample_seed": seed} if seed is not None else result[0]

    def _name(self, index: int) -> str:
        name_of = getattr(self.source, "name_of", None)
        return name_of(index) if name_of is not None else f"index {index}"

    def variants(
        self, index: int, flips: tuple[bool, ...] = (False, True), generator: torch.Generator | None = None
    ) -> list[dict[str, Any]] | Skipped:
        """The sample once per entry of ``flips`` (the image is read once), or :class:`Skipped`.

        Args:
            index: the sample.
            flips: one variant per entry: mirrored or not.
            generator: the crop's random numbers (``None``: the global RNG).
        """
        return self._variants(lambda: self.source[index], self._name(index), flips, generator)

    def _variants(
        self, read: Callable[[], Any], where: str, flips: tuple[bool, ...], generator: torch.Generator | None
    ) -> list[dict[str, Any]] | Skipped:
        try:
            image, persons, dropped, sample = self._load(read(), generator)
            return [self._finish(image, persons, dropped, sample, flip) for flip in flips]
        except (BadSampleError, InvalidRecordError) as err:
            reason = err.reason if isinstance(err, BadSampleError) else f"person record: {err.reason}"
            if reason not in self._warned:
                self._warned.add(reason)
                log.warning("skipping unusable sample (%s): %s; further ones are only counted", reason, err)
            return Skipped(reason, where)

    def _load(
        self, sample: Any, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, list[dict[str, Any]], tuple[int, int], Any]:
        """Validate, resize and crop ``sample``; return the image, the persons kept, ``(dropped, left)`` (how many
        were dropped, and how many persons of the image are not kept but still in it, at least partly), the sample."""
        for i, person in enumerate(sample.persons):
            self.schema.validate(person, f"{sample.key}, person {i}")
        width, height = sample.image.size
        res = self.resolution
        scale = res / min(width, height)
        new_h, new_w = max(res, round(height * scale)), max(res, round(width * scale))
        if self.random_crop:
            top = int(torch.randint(0, new_h - res + 1, (), generator=generator).item())
            left = int(torch.randint(0, new_w - res + 1, (), generator=generator).item())
        else:
            top, left = (new_h - res) // 2, (new_w - res) // 2

        image = TF.to_image(sample.image)
        image = TF.crop(TF.resize(image, [new_h, new_w], antialias=True), top, left, res, res)
        persons, dropped, cut_off = [], 0, 0
        if sample.persons:
            px = torch.tensor([[width, height, width, height]], dtype=torch.float32)
            count = len(sample.persons)
            # Face boxes, then each person's extent (its body, or its face grown by the schema's margins, in the
            # uncropped image): one geometry for both, so a crop that cuts a face does not shrink its extent.
            given = [p[BOX_KEY] for p in sample.persons] + [self.schema.extent(p) for p in sample.persons]
            boxes = tv_tensors.BoundingBoxes(
                torch.tensor(given, dtype=torch.float32) * px, format="XYXY", canvas_size=(height, width)
            )
            boxes = TF.resize(boxes, [new_h, new_w])
            full_area = (boxes[:count, 2] - boxes[:count, 0]) * (boxes[:count, 3] - boxes[:count, 1])
            boxes = TF.clamp_bounding_boxes(TF.crop(boxes, top, left, res, res))
            faces, bodies = boxes[:count], boxes[count:]
            visible = (faces[:, 2] - faces[:, 0]).clamp(min=0) * (faces[:, 3] - faces[:, 1]).clamp(min=0)
            body_visible = (bodies[:, 2] - bodies[:, 0]).clamp(min=0) * (bodies[:, 3] - bodies[:, 1]).clamp(min=0)
            rows = zip(sample.persons, faces / res, bodies / res, visible, body_visible, full_area, strict=True)
            for index, (person, box, body, seen, body_seen, full) in enumerate(rows):
                if seen < self.min_visible * full or not (box[0] < box[2] and box[1] < box[3]):
                    dropped += 1
                    cut_off += not body_seen > 0  # wholly outside the crop, body and all: not in the image any more
                    continue
                moved = {**person, BOX_KEY: box.clamp(0.0, 1.0).tolist(), RECORD_INDEX_KEY: index}
                if self.schema.body is not None:  # the extent as it was before the crop, moved with the pixels
                    moved[BODY_KEY] = body.clamp(0.0, 1.0).tolist()
                persons.append(moved)
        kept = keep_largest(persons, self.schema.max_persons)
        dropped += len(persons) - len(kept)
        return image, kept, (dropped, dropped - cut_off + getattr(sample, "persons_not_recorded", 0)), sample

    def _finish(
        self, image: torch.Tensor, kept: list[dict[str, Any]], dropped: tuple[int, int], sample: Any, flip: bool
    ) -> dict[str, Any]:
        record_index = [int(p[RECORD_INDEX_KEY]) for p in kept]
        kept = [{k: v for k, v in p.items() if k != RECORD_INDEX_KEY} for p in kept]
        if flip:
            image = TF.horizontal_flip(image)
            kept = [self.schema.mirror(p) for p in kept]
        arrays = self.schema.to_arrays(kept, sample.key)
        person_index = torch.full((self.schema.max_persons,), -1, dtype=torch.long)
        person_index[: len(record_index)] = torch.tensor(record_index, dtype=torch.long)
        return {
            "pixel_values": TF.to_dtype(image, torch.float32, scale=True) * 2.0 - 1.0,
            "caption": self.captions(sample.caption, kept),
            "boxes": torch.from_numpy(arrays.boxes),
            "extents": torch.from_numpy(arrays.extents),
            "continuous": torch.from_numpy(arrays.continuous),
            "categorical": torch.from_numpy(arrays.categorical),
            "person_mask": torch.from_numpy(arrays.mask),
            "person_index": person_index,
            "persons_dropped": dropped[0],
            "persons_left": dropped[1],
            "key": sample.key,
            "name": sample.name,
        }
