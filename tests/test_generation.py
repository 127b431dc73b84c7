"""The encoder-decoder (SkillNet-NLG) learns a task and generates with the task's skills at every step."""

import warnings

import pytest
import torch
from transformers.cache_utils import EncoderDecoderCache

from skillnet import SkillNetConfig, SkillNetForConditionalGeneration


def _config(**overrides):
    return SkillNetConfig(**{**dict(
        skill_set="nlg", vocab_size=20, hidden_size=32, num_hidden_layers=2, num_decoder_layers=2,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=32, skill_layers="every:2",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1), **overrides})


def test_cached_decoding_equals_full_decoding():
    """Step by step with the key/value cache (as `generate` decodes) = the whole target in one call."""
    model = SkillNetForConditionalGeneration(_config()).eval()
    src, tgt = torch.randint(3, 20, (2, 7)), torch.randint(3, 20, (2, 5))
    full = model(input_ids=src, decoder_input_ids=tgt, task="summarization", use_cache=False).logits
    encoded = model.get_encoder()(input_ids=src, task="summarization")
    cache, steps = None, []
    for i in range(5):
        out = model(decoder_input_ids=tgt[:, i : i + 1], encoder_outputs=encoded, cache=cache,
                    use_cache=True, task="summarization")
        cache = out.past_key_values
        steps.append(out.logits)
    assert isinstance(cache, EncoderDecoderCache) and cache.get_seq_length() == 5
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_the_old_cache_name_is_honoured_with_a_deprecation_warning():
    """`past_key_values` (the cache's name before transformers 5.24) works as `cache` and warns, naming it,
    as transformers' own models do; `cache` does not warn."""
    model = SkillNetForConditionalGeneration(_config()).eval()
    src, tgt = torch.randint(3, 20, (2, 7)), torch.randint(3, 20, (2, 2))
    encoded = model.get_encoder()(input_ids=src, task="summarization")
    first, again = (model(decoder_input_ids=tgt[:, :1], encoder_outputs=encoded, use_cache=True, task="summarization")
                    for _ in range(2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = model(decoder_input_ids=tgt[:, 1:], encoder_outputs=encoded, cache=first.past_key_values,
                    use_cache=True, task="summarization")
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    with pytest.warns(FutureWarning, match="past_key_values"):
        old = model(decoder_input_ids=tgt[:, 1:], encoder_outputs=encoded, past_key_values=again.past_key_values,
                    use_cache=True, task="summarization")
    assert old.past_key_values.get_seq_length() == 2
    torch.testing.assert_close(old.logits, new.logits)


def test_learns_to_reverse_and_generates_it():
    """Two tasks on the same inputs: 'paraphrase' copies, 'dialogue' reverses; skills tell them apart. Greedy
    and beam search decode both; a batch mixing the tasks decodes each sample with its own skills."""
    torch.manual_seed(0)
    model = SkillNetForConditionalGeneration(_config())
    g = torch.Generator().manual_seed(0)
    src = torch.randint(3, 20, (16, 5), generator=g)
    eos = torch.full((16, 1), 2)
    targets = {"paraphrase": torch.cat([src, eos], 1), "dialogue": torch.cat([src.flip(1), eos], 1)}
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for step in range(300):
        task = ("paraphrase", "dialogue")[step % 2]
        loss = model(input_ids=src, labels=targets[task], task=task).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for task, target in targets.items():
        for beams in (1, 3):
            out = model.generate(src, task=task, max_new_tokens=8, num_beams=beams)
            assert out[:, 0].eq(1).all()
            accuracy = (out[:, 1:7] == target).float().mean().item()
            assert accuracy > 0.9, (task, beams, accuracy)
    tasks = ["paraphrase", "dialogue"] * 2
    for beams in (1, 2):
        mixed = model.generate(src[:4], task=tasks, max_new_tokens=8, num_beams=beams)
        for i, task in enumerate(tasks):
            alone = model.generate(src[i : i + 1], task=task, max_new_tokens=8, num_beams=beams)[0]
            torch.testing.assert_close(mixed[i][: alone.shape[0]], alone)


def test_generation_config_lengths_and_sampling():
    """`GenerationConfig` settings reach the decoding: `min_new_tokens` holds back the end token,
    `max_length` bounds the output, sampling is reproducible under a seed."""
    model = SkillNetForConditionalGeneration(_config()).eval()
    with torch.no_grad():
        model.lm_head.bias[2] = 50.0  # the end token always wins, unless held back
    src = torch.randint(3, 20, (2, 6))
    assert model.generate(src, task="dialogue").shape[1] == 2  # start token, end token
    held = model.generate(src, task="dialogue", min_new_tokens=4, max_new_tokens=10)
    assert held.shape[1] >= 5 and not held[:, 1:4].eq(2).any()
    assert model.generate(src, task="dialogue", min_new_tokens=20, max_length=7).shape[1] == 7
    torch.manual_seed(1)
    a = model.generate(src, task="dialogue", do_sample=True, top_k=5, min_new_tokens=5, max_new_tokens=5)
    torch.manual_seed(1)
    b = model.generate(src, task="dialogue", do_sample=True, top_k=5, min_new_tokens=5, max_new_tokens=5)
    assert torch.equal(a, b) and a.shape[1] == 6


def test_round_trip_through_auto_seq2seq(tmp_path):
    from transformers import AutoModelForSeq2SeqLM, GenerationConfig

    model = SkillNetForConditionalGeneration(_config()).eval()
    assert model.can_generate()
    model.generation_config.num_beams = 2
    model.save_pretrained(tmp_path)
    assert GenerationConfig.from_pretrained(tmp_path).num_beams == 2  # generation_config.json
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    assert isinstance(loaded, SkillNetForConditionalGeneration) and loaded.generation_config.num_beams == 2
    src = torch.randint(3, 20, (2, 6))
    assert torch.equal(loaded.generate(src, task="dialogue"), model.generate(src, task="dialogue"))


def test_a_medium_and_an_instruction_go_through_the_encoder_together():
    """OFA's encoder input: an image's patches, then the instruction's tokens, each with its modality
    embedding. The encoder's mask covers both (padded instruction tokens change nothing), the decoder reads
    the image through it, `generate` (greedy, cached) decodes what step-by-step argmax decodes, beam search
    runs, and training reaches the image front-end. Two media, or a modality the medium is not: one line."""
    from skillnet import load_config

    torch.manual_seed(0)
    config = load_config("tiny", num_decoder_layers=1, decoder_start_token_id=1, pad_token_id=0, eos_token_id=2,
                         bos_token_id=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = SkillNetForConditionalGeneration(config).eval()
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    ids = torch.randint(5, 500, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    encoder = model.get_encoder()
    x, joint_mask, modality = encoder.embed(None, ids, mask, None, pixels)
    image, image_mask, _ = encoder.embed(None, pixel_values=pixels)
    text, _, _ = encoder.embed(None, ids, mask)
    assert modality == "image" and torch.equal(x, torch.cat([image, text], dim=1))
    assert torch.equal(joint_mask, torch.cat([image_mask, mask], dim=1))

    start = torch.full((2, 3), 1)
    with_image = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, decoder_input_ids=start, task="image")
    text_only = model(input_ids=ids, attention_mask=mask, decoder_input_ids=start, task="image")
    other_padding = ids.clone()
    other_padding[1, 4:] = 7
    repadded = model(input_ids=other_padding, attention_mask=mask, pixel_values=pixels, decoder_input_ids=start,
                     task="image")
    assert not torch.allclose(with_image.logits, text_only.logits)
    assert torch.equal(with_image.logits, repadded.logits)

    generated = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, task="image",
                               max_new_tokens=4, do_sample=False)
    decoded = torch.full((2, 1), 1)
    for _ in range(4):
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, decoder_input_ids=decoded,
                       task="image", use_cache=False).logits
        decoded = torch.cat([decoded, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, decoded)
    beams = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, task="image", max_new_tokens=4,
                           num_beams=2, do_sample=False)
    assert beams.shape == (2, 5)

    loss = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=torch.randint(5, 500, (2, 3)),
                 task="image").loss
    loss.backward()
    assert model.skillnet.frontends["image"].patch.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pass the inputs of one modality"):
        encoder(input_ids=ids, pixel_values=pixels, pixel_values_videos=torch.zeros(2, 4, 3, 32, 32), task="image")
    with pytest.raises(ValueError, match="modality 'video' does not match the medium given with the text"):
        encoder(input_ids=ids, pixel_values=pixels, modality="video", task="image")
