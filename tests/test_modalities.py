"""Front-ends: shapes and masks for every modality, and clear errors for bad inputs."""

import pytest
import torch
from conftest import nlu_config

from skillnet import SkillNetForPreTraining, SkillNetModel


@pytest.fixture
def model(tiny_config):
    return SkillNetForPreTraining(tiny_config).eval()


def test_text_and_code_from_a_locally_trained_tokenizer(model, tokenizer):
    text = tokenizer(["a red circle", "a blue square on the left of a green circle"], padding=True, return_tensors="pt")
    out = model(**text, task="text")
    assert out.last_hidden_state.shape == (2, text["input_ids"].shape[1], 32)
    assert out.embeddings.shape == (2, 16)
    torch.testing.assert_close(out.embeddings.norm(dim=-1), torch.ones(2))
    code = tokenizer(["def add(a, b):\n    return a + b"], return_tensors="pt")
    code_out = model.skillnet(**code, modality="code", task="code")
    text_out = model.skillnet(**code, modality="text", task="code")
    assert code_out.modality == "code"
    assert not torch.allclose(code_out.last_hidden_state, text_out.last_hidden_state)  # modality-type embedding


def test_padding_does_not_change_the_unpadded_tokens(model, tokenizer):
    short = tokenizer(["a red circle"], return_tensors="pt")
    padded = tokenizer(["a red circle", "a blue square on the left of a green circle"], padding=True,
                       return_tensors="pt")
    n = short["input_ids"].shape[1]
    alone = model.skillnet(**short, task="text").last_hidden_state
    batched = model.skillnet(**padded, task="text").last_hidden_state[:1, :n]
    torch.testing.assert_close(alone, batched, rtol=1e-5, atol=1e-5)


def test_image_patches(model):
    out = model.skillnet(pixel_values=torch.randn(2, 3, 32, 32), task="image")
    assert out.last_hidden_state.shape == (2, 1 + (32 // 8) ** 2, 32)
    assert out.attention_mask.shape == (2, 17) and bool(out.attention_mask.all())


def test_audio_subsampling_and_mask(model):
    features = torch.randn(2, 16, 100)
    frame_mask = torch.ones(2, 100, dtype=torch.long)
    frame_mask[1, 40:] = 0
    out = model.skillnet(input_features=features, feature_attention_mask=frame_mask, task="audio")
    assert out.last_hidden_state.shape == (2, 1 + 25, 32)  # [CLS] + 100 frames / 4
    assert out.attention_mask[0].sum() == 26 and out.attention_mask[1].sum() == 1 + 10
    # masked frames do not influence the kept ones
    changed = features.clone()
    changed[1, :, 40:] = 99.0
    again = model.skillnet(input_features=changed, feature_attention_mask=frame_mask, task="audio")
    torch.testing.assert_close(again.last_hidden_state[1, :10], out.last_hidden_state[1, :10], rtol=1e-4, atol=1e-4)


def test_video_tubelets_and_time_positions(model):
    video = torch.randn(2, 4, 3, 32, 32)
    out = model.skillnet(pixel_values_videos=video, task="video")
    assert out.last_hidden_state.shape == (2, 1 + (4 // 2) * 16, 32)
    reversed_time = model.skillnet(pixel_values_videos=video.flip(1), task="video").pooler_output
    assert not torch.allclose(reversed_time, out.pooler_output)  # order of frames matters


def test_contrastive_embeddings_for_every_modality(model):
    inputs = {
        "image": dict(pixel_values=torch.randn(3, 3, 32, 32)),
        "audio": dict(input_features=torch.randn(3, 16, 64)),
        "video": dict(pixel_values_videos=torch.randn(3, 4, 3, 32, 32)),
        "text": dict(input_ids=torch.randint(7, 512, (3, 6))),
    }
    for task, kwargs in inputs.items():
        emb = model(**kwargs, task=task).embeddings
        assert emb.shape == (3, 16)
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(pixel_values=torch.randn(2, 3, 28, 28)), ValueError, r"pixel_values must be \(batch, 3, 32, 32\)"),
        (dict(pixel_values=torch.randint(0, 255, (2, 3, 32, 32))), TypeError, "pixel_values must be a floating-point"),
        (dict(pixel_values_videos=torch.randint(0, 255, (2, 4, 3, 32, 32), dtype=torch.int32)), TypeError,
         "must be a floating-point"),
        (dict(input_ids=torch.randn(2, 5)), TypeError, "input_ids must be an integer"),
        (dict(input_ids=torch.randint(0, 9, (5,))), ValueError, r"input_ids must have shape \(batch, tokens\)"),
        (dict(input_ids=torch.full((1, 3), 512)), ValueError, "outside the vocabulary"),
        (dict(input_features=torch.randn(2, 80, 50)), ValueError, "80 mel bins, the config says num_mel_bins=16"),
        (dict(pixel_values_videos=torch.randn(2, 5, 3, 32, 32)), ValueError, "pixel_values_videos must be"),
        (dict(pixel_values_videos=torch.randn(1, 4, 3, 32, 32), pixel_values=torch.randn(1, 3, 32, 32)), ValueError,
         "pass the inputs of one modality"),
        (dict(input_ids=torch.ones(1, 3, dtype=torch.long), modality="image"), ValueError, "does not match the inputs"),
    ],
)
def test_bad_inputs_are_named(model, kwargs, error, message):
    with pytest.raises(error, match=message):
        model.skillnet(**kwargs, task="image")


def test_modality_without_front_end():
    text_only = SkillNetModel(nlu_config())
    with pytest.raises(ValueError, match="no front-end for modality 'image'"):
        text_only(pixel_values=torch.randn(1, 3, 224, 224), task="text_classification")


def test_uint8_pixels_are_normalised_in_the_front_end(model, tiny_config):
    raw = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    mean = torch.tensor(tiny_config.image_mean).view(3, 1, 1)
    std = torch.tensor(tiny_config.image_std).view(3, 1, 1)
    normalised = (raw.float() / 255 - mean) / std
    a = model.skillnet(pixel_values=raw, task="image").last_hidden_state
    torch.testing.assert_close(a, model.skillnet(pixel_values=normalised, task="image").last_hidden_state)
    video = torch.randint(0, 256, (1, 4, 3, 32, 32), dtype=torch.uint8)
    b = model.skillnet(pixel_values_videos=video, task="video").last_hidden_state
    torch.testing.assert_close(b, model.skillnet(pixel_values_videos=(video.float() / 255 - mean) / std,
                                                 task="video").last_hidden_state)
