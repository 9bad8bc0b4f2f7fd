import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

from camouflage_train.models.attribute_encoder import AttributeEncoder
from camouflage_train.models.ip_adapter import (
    AdapterConfig,
    ComputeDtypeLinear,
    adapter_modules,
    cross_attention_keys,
    image_proj_to_original,
    initial_state_dict,
    install_ip_adapter,
    person_region_masks,
)
from camouflage_train.models.person_attention import BatchedPersonsAttnProcessor, batch_person_attention


@pytest.fixture
def unet(tiny_model_dir):
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    return unet.requires_grad_(False).eval()


def _unet_inputs(batch: int = 1):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch, 4, 32, 32, generator=g),
        torch.tensor([500] * batch),
        torch.randn(batch, 77, 32, generator=g),
    )


def test_install_uses_diffusers_processors_initialized_from_unet(unet):
    config = AdapterConfig(embed_dim=16, tokens_per_person=3, proj_mult=2)
    keys = cross_attention_keys(unet)
    assert [k for _, k in keys] == [1, 3, 5, 7, 9, 11]
    install_ip_adapter(unet.to(torch.bfloat16), initial_state_dict(unet, config))
    for name, _ in keys:
        processor = unet.attn_processors[name]
        attn = unet.get_submodule(name.removesuffix(".processor"))
        assert isinstance(processor, IPAdapterAttnProcessor2_0)
        assert processor.to_k_ip[0].weight.dtype == torch.float32 and processor.to_k_ip[0].weight.requires_grad
        torch.testing.assert_close(processor.to_k_ip[0].weight, attn.to_k.weight.float())
        torch.testing.assert_close(processor.to_v_ip[0].weight, attn.to_v.weight.float())
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    assert projection.num_tokens == 3 and projection.ff.net[0].proj.out_features == 32
    assert unet.config.encoder_hid_dim_type == "ip_image_proj"


def test_projection_round_trips_through_original_layout(unet):
    config = AdapterConfig(embed_dim=16, tokens_per_person=2)
    state = initial_state_dict(unet, config)
    assert set(state["image_proj"]) == {
        "proj.0.weight",
        "proj.0.bias",
        "proj.2.weight",
        "proj.2.bias",
        "norm.weight",
        "norm.bias",
    }
    install_ip_adapter(unet, state)
    loaded = unet.encoder_hid_proj.image_projection_layers[0].state_dict()
    assert image_proj_to_original(loaded).keys() == state["image_proj"].keys()
    for key, value in image_proj_to_original(loaded).items():
        torch.testing.assert_close(value, state["image_proj"][key])


def _forward(unet, embeds, masks):
    """The UNet's prediction for fixed latents, timestep and text (``_unet_inputs``) with these persons."""
    latents, t, text = _unet_inputs(embeds.shape[0])
    return unet(
        latents,
        t,
        encoder_hidden_states=text,
        added_cond_kwargs={"image_embeds": [embeds]},
        cross_attention_kwargs={"ip_adapter_masks": [masks]},
    ).sample


def _run(unet, embeds, masks, hook_module=None):
    captured = {}
    handle = None
    if hook_module is not None:
        handle = hook_module.register_forward_hook(lambda m, i, o: captured.__setitem__("out", o))
    with torch.no_grad():
        out = _forward(unet, embeds, masks)
    if handle:
        handle.remove()
    return out, captured.get("out")


def _face_only(schema):
    """The schema without ``body``: one slot per person, the attention mechanics these tests check."""
    return {**schema.to_config(), "body": None}


def test_with_bodies_each_person_acts_in_its_extent_and_at_its_face(schema):
    """Under a schema with ``body`` a person has two slots, [extent, face]: the first's region is its extent grown
    ``region_expand`` times, the second's its face box grown ``face_expand`` times; padded persons' slots are
    empty; the encoder reads the extent (another body, another embedding)."""
    from camouflage_train.models.conditioning import PersonBatch, conditioning_inputs

    encoder = AttributeEncoder(schema=schema.to_config(), embed_dim=8, width=16)
    face, body = [0.4, 0.1, 0.6, 0.3], [0.3, 0.05, 0.7, 0.95]
    records = [[{"box": face, "body": body, "age": 30, "gender": "male", "yaw": 0, "pitch": 0, "roll": 0}]]
    persons = PersonBatch.from_records(schema, records)
    embeds, masks = conditioning_inputs(encoder, persons, (20, 20), 1.0, face_expand=1.0)
    assert embeds.shape == (1, 2 * schema.max_persons, 8) and masks.shape == (1, 2 * schema.max_persons, 20, 20)
    torch.testing.assert_close(masks[0, 0], person_region_masks(persons.extents, persons.mask, (20, 20), 1.0)[0, 0])
    torch.testing.assert_close(masks[0, 1], person_region_masks(persons.boxes, persons.mask, (20, 20), 1.0)[0, 0])
    assert masks[0, 0].sum() > 4 * masks[0, 1].sum() > 0 and not masks[0, 2:].any()
    moved = PersonBatch.from_records(schema, [[{**records[0][0], "body": [0.2, 0.05, 0.7, 0.95]}]])
    assert not torch.allclose(encoder(*_inputs(moved))[0, :2], encoder(*_inputs(persons))[0, :2])


def _inputs(persons):
    return persons.boxes, persons.continuous, persons.categorical, persons.extents


def test_region_mask_confines_a_person_to_its_region(unet, schema):
    config = AdapterConfig(embed_dim=16, tokens_per_person=2, region_masks=True, region_expand=1.5)
    install_ip_adapter(unet, initial_state_dict(unet, config))
    encoder = AttributeEncoder(schema=_face_only(schema), embed_dim=16, width=32)
    boxes = torch.tensor([[[0.0, 0.0, 0.3, 0.3], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    person_mask = torch.tensor([[True, False, False]])
    masks = person_region_masks(boxes, person_mask, (32, 32), config.region_expand)
    categorical = torch.zeros(1, 3, 1, dtype=torch.long)
    attn_name = cross_attention_keys(unet)[0][0].removesuffix(".processor")
    attn = unet.get_submodule(attn_name)
    outputs = []
    for value in (0.1, 0.9):
        embeds = encoder(boxes, torch.full((1, 3, 4), value), categorical)
        outputs.append(_run(unet, embeds, masks, attn)[1])
    diff = (outputs[0] - outputs[1]).abs()[0].amax(-1)  # [tokens]
    side = int(diff.numel() ** 0.5)
    diff = diff.reshape(side, side)
    region = int(0.3 * side)
    assert diff[:region, :region].min() > 0, "the person's attributes must change its own region"
    far = int(0.6 * side)  # the expanded box ends at 0.375; bicubic downsampling spreads two tokens more
    assert diff[far:, :].max() == 0 and diff[:, far:].max() == 0, "nothing may change outside the person's region"


def test_padded_persons_contribute_nothing(unet, tiny_model_dir, schema):
    config = AdapterConfig(embed_dim=16, tokens_per_person=2, region_masks=False)
    reference = _run_plain(tiny_model_dir)
    install_ip_adapter(unet, initial_state_dict(unet, config))
    encoder = AttributeEncoder(schema=_face_only(schema), embed_dim=16, width=32)
    boxes = torch.rand(1, 3, 4).sort(-1).values
    person_mask = torch.tensor([[True, False, False]])
    masks = person_region_masks(boxes, person_mask, (32, 32), None)
    cat = torch.zeros(1, 3, 1, dtype=torch.long)
    a = _run(unet, encoder(boxes, torch.full((1, 3, 4), 0.2), cat), masks)[0]
    other = torch.full((1, 3, 4), 0.2)
    other[:, 1:] = 0.8  # only the padded persons change
    b = _run(unet, encoder(boxes, other, cat), masks)[0]
    assert torch.equal(a, b)
    no_person = _run(unet, encoder(boxes, other, cat), torch.zeros_like(masks))[0]
    torch.testing.assert_close(no_person, reference, rtol=0, atol=1e-6)
    assert not torch.allclose(a, reference, atol=1e-4), "a real person must change the output"


def _run_plain(tiny_model_dir):
    plain = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").eval()
    latents, t, text = _unet_inputs()
    with torch.no_grad():
        return plain(latents, t, encoder_hidden_states=text).sample


def test_region_masks_shapes_and_padding():
    boxes = torch.tensor([[[0.25, 0.25, 0.75, 0.75], [0.0, 0.0, 0.5, 0.5]]])
    masks = person_region_masks(boxes, torch.tensor([[True, False]]), (8, 8), 1.0)
    assert masks.shape == (1, 2, 8, 8) and masks[0, 1].sum() == 0
    assert masks[0, 0].sum() == 16 and masks[0, 0, 2:6, 2:6].all()
    full = person_region_masks(boxes, torch.tensor([[True, False]]), (8, 8), None)
    assert full[0, 0].all() and full[0, 1].sum() == 0


def test_attribute_encoder_save_load_round_trip(tmp_path, schema):
    encoder = AttributeEncoder(schema=_face_only(schema), embed_dim=8, width=16, depth=3)
    encoder.save_pretrained(tmp_path / "enc")
    loaded = AttributeEncoder.from_pretrained(tmp_path / "enc")
    boxes, cont, cat = torch.rand(2, 3, 4), torch.rand(2, 3, 4), torch.randint(0, 2, (2, 3, 1))
    assert encoder(boxes, cont, cat).shape == (2, 3, 8)
    torch.testing.assert_close(loaded(boxes, cont, cat), encoder(boxes, cont, cat))
    with pytest.raises(ValueError, match="expected 4 continuous"):
        encoder(boxes, cont[..., :2], cat)


def test_adapter_computes_in_the_frozen_dtype_with_fp32_master_weights(unet):
    """A bf16 UNet runs with autocast off; to_k_ip/to_v_ip keep fp32 weights, get fp32 gradients, and keep
    nn.Linear's state-dict names; the output is close to the fp32 model's."""
    config = AdapterConfig(embed_dim=16, tokens_per_person=2)
    reference = copy.deepcopy(unet)
    install_ip_adapter(reference, initial_state_dict(reference, config))
    install_ip_adapter(unet.to(torch.bfloat16), initial_state_dict(unet, config))
    unet.load_state_dict(reference.state_dict())  # same adapter weights (the UNet's are cast to bf16)
    assert {k for k in unet.state_dict() if "to_k_ip" in k} == {k for k in reference.state_dict() if "to_k_ip" in k}
    sample, timestep, text = _unet_inputs(2)
    embeds = torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(1))
    kwargs = {"added_cond_kwargs": {"image_embeds": [embeds]}}
    expected = reference(sample, timestep, text, **kwargs).sample
    with torch.autocast("cpu", enabled=False):
        out = unet(sample.bfloat16(), timestep, text.bfloat16(), **kwargs).sample
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.05)
    out.float().square().mean().backward()
    layer = next(p for p in unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)).to_k_ip[0]
    assert isinstance(layer, ComputeDtypeLinear)
    assert layer.weight.dtype == torch.float32 and layer.weight.grad.dtype == torch.float32
    assert layer.weight.grad.abs().sum() > 0
    unet.to(torch.float32)  # the compute dtype follows the frozen weights
    assert unet(sample, timestep, text, **kwargs).sample.dtype == torch.float32


@pytest.mark.parametrize("region_masks", [True, False])
def test_batched_person_attention_equals_the_stock_loop(tiny_model_dir, schema, region_masks):
    """The batched processor computes what diffusers' per-person loop computes (output and every adapter gradient),
    up to float summation order; parameter names and state dict are unchanged."""
    config = AdapterConfig(embed_dim=16, tokens_per_person=3, region_masks=region_masks)
    stock = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").requires_grad_(False).eval()
    install_ip_adapter(stock, initial_state_dict(stock, config), batched_persons=False)
    batched = copy.deepcopy(stock)
    assert batch_person_attention(batched) == len(cross_attention_keys(stock))
    assert all(type(p) is BatchedPersonsAttnProcessor for p in adapter_modules(batched)[1:])
    default = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    install_ip_adapter(default, initial_state_dict(default, config))  # batched unless asked otherwise
    assert all(type(p) is BatchedPersonsAttnProcessor for p in adapter_modules(default)[1:])
    assert batched.state_dict().keys() == stock.state_dict().keys()

    encoder = AttributeEncoder(schema=_face_only(schema), embed_dim=16, width=32)
    g = torch.Generator().manual_seed(1)
    boxes = torch.tensor([[[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.7], [0, 0, 0, 0]]] * 2)
    person_mask = torch.tensor([[True, True, False], [True, False, False]])
    masks = person_region_masks(boxes, person_mask, (32, 32), config.region_expand if region_masks else None)
    embeds = encoder(boxes, torch.rand(2, 3, 4, generator=g), torch.zeros(2, 3, 1, dtype=torch.long)).detach()

    def forward_backward(unet):
        unet.zero_grad()
        out = _forward(unet, embeds, masks)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}

    (expected, expected_grads), (got, got_grads) = forward_backward(stock), forward_backward(batched)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == expected_grads.keys() and len(got_grads) > 0
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    # Without masks the processor is the stock one (one softmax over all persons' tokens).
    latents, t, text = _unet_inputs(2)
    with torch.no_grad():
        plain = [
            u(latents, t, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [embeds]}).sample
            for u in (stock, batched)
        ]
    assert torch.equal(plain[0], plain[1])


def test_inference_skips_the_person_attention_of_images_without_persons(tiny_model_dir, schema):
    """Under classifier-free guidance half the batch has no persons: without gradients their person attention is
    skipped (zeros), and the output is what the full computation gives."""
    config = AdapterConfig(embed_dim=16, tokens_per_person=3)
    stock = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet").requires_grad_(False).eval()
    install_ip_adapter(stock, initial_state_dict(stock, config), batched_persons=False)
    batched = copy.deepcopy(stock)
    batch_person_attention(batched)
    encoder = AttributeEncoder(schema=_face_only(schema), embed_dim=16, width=32)
    boxes = torch.tensor([[[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.7]]] * 2)
    person_mask = torch.tensor([[True, True], [False, False]])  # the second image: the CFG negative, no persons
    masks = person_region_masks(boxes, person_mask, (32, 32), config.region_expand)
    embeds = encoder(boxes, torch.rand(2, 2, 4), torch.zeros(2, 2, 1, dtype=torch.long)).detach()
    calls = []
    original = BatchedPersonsAttnProcessor._persons_attention

    def counting(self, query, persons, masks):
        calls.append(query.shape[0])
        return original(self, query, persons, masks)

    BatchedPersonsAttnProcessor._persons_attention = counting
    try:
        with torch.no_grad():
            skipped = _forward(batched, embeds, masks)
        assert calls and set(calls) == {1}  # only the image with persons went through the person attention
        calls.clear()
        full = _forward(batched, embeds, masks).detach()  # with gradients on: the whole batch
        assert calls and set(calls) == {2}
    finally:
        BatchedPersonsAttnProcessor._persons_attention = original
    with torch.no_grad():
        reference = _forward(stock, embeds, masks)
    torch.testing.assert_close(skipped, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(skipped, reference, rtol=1e-5, atol=1e-6)


def test_overlapping_regions_are_split_between_the_persons_nearest_centres():
    """region_overlap=nearest: the union is unchanged, no position belongs to two persons, and an overlap goes to
    the person whose centre (in units of its box) is nearer; padded persons stay empty."""
    from camouflage_train.models.ip_adapter import split_overlapping_regions

    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.5], [0.4, 0.1, 0.9, 0.5], [0.0, 0.0, 0.0, 0.0]]])
    person_mask = torch.tensor([[True, True, False]])
    masks = person_region_masks(boxes, person_mask, (32, 32), 1.0)
    split = split_overlapping_regions(masks, boxes)
    assert (masks.sum(dim=1) > 1).any()  # the boxes overlap
    # Exact on any CPU: 0/1 masks multiplied by a 0/1 one-hot, no rounding anywhere.
    assert torch.equal(split.amax(dim=1), masks.amax(dim=1)) and split.sum(dim=1).max() == 1
    assert split[0, 2].sum() == 0
    # x = 0.45 lies inside both boxes: 0.15 / 0.4 = 0.375 box widths from the first centre, 0.2 / 0.5 = 0.4 from
    # the second: it goes to the first person.
    column = int(0.45 * 32)
    assert split[0, 0, 8, column] == 1 and split[0, 1, 8, column] == 0
    with pytest.raises(ValueError, match="region_overlap"):
        AdapterConfig(region_overlap="max")


def test_covering_regions_hold_every_cell_a_box_touches():
    """``cover``: a cell is in the region exactly when the box overlaps it with a positive area (brute force over
    the cells), so a box smaller than a cell still has one; the default keeps the cells whose centre it holds."""
    boxes = torch.tensor([[[0.31, 0.02, 0.52, 0.9], [0.70, 0.70, 0.72, 0.71]]])
    mask = torch.tensor([[True, True]])
    covered = person_region_masks(boxes, mask, (8, 8), 1.0, cover=True)
    for p, (x0, y0, x1, y1) in enumerate(boxes[0].tolist()):
        for i in range(8):
            for j in range(8):
                overlap = max(0.0, min(x1, (j + 1) / 8) - max(x0, j / 8)) * max(
                    0.0, min(y1, (i + 1) / 8) - max(y0, i / 8)
                )
                assert bool(covered[0, p, i, j]) == (overlap > 0), (p, i, j)
    centred = person_region_masks(boxes, mask, (8, 8), 1.0)
    assert not centred[0, 1].any() and covered[0, 1].sum() == 1
    assert (centred <= covered).all()
