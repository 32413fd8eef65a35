"""Gemma 3n family adapter: loading, search space, slicing, skip rules, export, params, eval.

Every model is a tiny random `Gemma3nTextConfig` built here; nothing is downloaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")
from gemma3n_models import (  # noqa: E402
    CONSUMERS,
    FULL,
    PLE_WIDTH,
    PRODUCERS,
    SLIDING,
    input_ids,
    random_model,
    tiny_config,
)
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    Gemma3nForCausalLM,
    Gemma3nTextConfig,
)

from mnm_search.data import EvalSet  # noqa: E402
from mnm_search.errors import CheckpointError, ConfigError, ExportError, WidthsError  # noqa: E402
from mnm_search.families import detect_family  # noqa: E402
from mnm_search.families.gemma3n import Gemma3nFamily  # noqa: E402
from mnm_search.families.matformer_lab import read_matformer_lab_csv  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def model() -> Gemma3nForCausalLM:
    return random_model(tiny_config())


@pytest.fixture
def family(model: Gemma3nForCausalLM) -> Gemma3nFamily:
    return Gemma3nFamily(model=model)


@pytest.fixture
def checkpoint(tmp_path: Path, model: Gemma3nForCausalLM) -> Path:
    """A sharded CausalLM checkpoint as transformers writes it."""
    path = tmp_path / "gemma3n-tiny"
    model.save_pretrained(str(path), max_shard_size="200KB")
    return path


# ---------------------------------------------------------------------------------- loading


def test_load_matches_transformers(checkpoint: Path, model: Gemma3nForCausalLM) -> None:
    assert (checkpoint / "model.safetensors.index.json").is_file()  # really sharded
    family = Gemma3nFamily.load(checkpoint)
    ids = input_ids()
    reference = Gemma3nForCausalLM.from_pretrained(str(checkpoint), local_files_only=True).eval()
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        original = model(input_ids=ids).logits
    got = family.logits(ids)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(got, original, atol=1e-6)
    assert detect_family(checkpoint) == "gemma3n"
    assert family.dtype == torch.float32


def test_load_text_part_of_multimodal_checkpoint(tmp_path: Path, model: Gemma3nForCausalLM) -> None:
    """Gemma3nForConditionalGeneration layout: text weights under model.language_model.*,
    next to vision/audio tensors that must be ignored."""
    from safetensors.torch import save_file

    path = tmp_path / "gemma3n-multimodal"
    path.mkdir()
    tensors = {
        "model.language_model." + name.removeprefix("model."): t.contiguous()
        for name, t in model.state_dict().items()
        if name != "lm_head.weight"  # tied to the embeddings, not stored
    }
    tensors["model.vision_tower.timm_model.conv_stem.weight"] = torch.zeros(4, 3, 3, 3)
    tensors["model.embed_audio.embedding.weight"] = torch.zeros(8, 64)
    save_file(tensors, str(path / "model.safetensors"))
    config = {
        "model_type": "gemma3n",
        "architectures": ["Gemma3nForConditionalGeneration"],
        "text_config": model.config.to_dict(),
        "vision_config": {"model_type": "gemma3n_vision"},
        "audio_config": {"model_type": "gemma3n_audio"},
    }
    (path / "config.json").write_text(json.dumps(config))
    family = Gemma3nFamily.load(path)
    ids = input_ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert torch.allclose(family.logits(ids), expected, atol=1e-6)
    # An export frees the text weights while verifying and reads them back from this layout.
    family.export_hf([128, 0, 192, 256, 64, 0], tmp_path / "sliced")
    assert torch.allclose(family.logits(ids), expected, atol=1e-6)


def test_load_bfloat16(tmp_path: Path, checkpoint: Path) -> None:
    family = Gemma3nFamily.load(checkpoint, dtype="bfloat16")
    assert family.dtype == torch.bfloat16
    full = Gemma3nFamily.load(checkpoint)
    ids = input_ids()
    logits = family.logits(ids)
    assert torch.allclose(logits.float(), full.logits(ids), atol=0.2)
    family.export_hf([256] * 6, tmp_path / "bf16")  # read back as bfloat16, as loaded
    assert family.dtype == torch.bfloat16 and torch.equal(family.logits(ids), logits)
    info = json.loads((tmp_path / "bf16" / "mnm.json").read_text())
    assert info["verification"]["max_abs_logit_diff"] == 0.0


def test_missing_shard_is_a_clear_error(checkpoint: Path) -> None:
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (checkpoint / victim).unlink()
    with pytest.raises(CheckpointError, match=rf"incomplete.*missing \({re.escape(victim)}"):
        Gemma3nFamily.load(checkpoint)


def test_truncated_shard_is_a_clear_error(checkpoint: Path) -> None:
    shard = sorted(checkpoint.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        Gemma3nFamily.load(checkpoint)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "model_type 'gpt2'"),
        ({"hidden_size": 8}, "no model_type"),
    ],
)
def test_unsupported_family(tmp_path: Path, config: dict, message: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    for call in (detect_family, Gemma3nFamily.load):
        with pytest.raises(CheckpointError) as info:
            call(tmp_path)
        text = str(info.value)
        assert "unsupported model family" in text and message in text
        assert "mnm-matlm" in text and "gemma3n_text" in text  # lists what is supported


def test_detects_native_checkpoint(tiny_checkpoint: Path) -> None:
    assert detect_family(tiny_checkpoint) == "matlm"
    with pytest.raises(CheckpointError, match="is a matlm checkpoint, not Gemma 3n"):
        Gemma3nFamily.load(tiny_checkpoint)


# ------------------------------------------------------------------------------ search space


def test_search_space(family: Gemma3nFamily) -> None:
    assert family.n_layers == 6
    assert family.step == 64  # gcd(intermediate sizes, hidden size)
    assert family.kv_producer_layers == PRODUCERS
    assert family.kv_consumer_layers == CONSUMERS
    assert family.skippable_layers == [0, 1, 4, 5]
    assert family.allowed_widths(0) == [0, 64, 128, 192, 256]
    assert family.allowed_widths(2) == [64, 128, 192, 256]  # a producer: no 0
    assert family.n_configs == 5**4 * 4**2
    info = family.describe()
    assert info["params"] == family.param_count() and info["step"] == 64


def test_configurable_step(model: Gemma3nForCausalLM) -> None:
    assert Gemma3nFamily(model=model, step=128).allowed_widths(0) == [0, 128, 256]
    with pytest.raises(ConfigError, match="step=96 does not divide"):
        Gemma3nFamily(model=model, step=96)
    with pytest.raises(ConfigError, match="step must be a positive integer"):
        Gemma3nFamily(model=model, step=0)


@pytest.mark.parametrize(
    ("widths", "message"),
    [
        ([256] * 5, "got 5 widths, but the checkpoint has 6 layers"),
        ([256, 256, 0, 256, 256, 256], r"layer 2 cannot be skipped: .*layers 4 reuse"),
        ([256, 256, 256, 0, 256, 256], r"layer 3 cannot be skipped: .*layers 5 reuse"),
        ([100, 256, 256, 256, 256, 256], "layer 0: width 100 is not a multiple of the step 64"),
        ([256, 256, 256, 256, 256, 320], r"layer 5: width 320 is outside \[0, 256\]"),
        ([256, -64, 256, 256, 256, 256], "layer 1: width -64 is outside"),
        ([256, 256, 256, 128.0, 256, 256], "layer 3: width must be an integer"),
    ],
)
def test_bad_widths(family: Gemma3nFamily, widths: list, message: str) -> None:
    with pytest.raises(WidthsError, match=message):
        family.validate_widths(widths)


def test_not_multiple_suggests_neighbours(family: Gemma3nFamily) -> None:
    with pytest.raises(WidthsError, match="use 64 or 128"):
        family.validate_widths([100, 256, 256, 256, 256, 256])


def test_all_layers_skipped_without_kv_sharing() -> None:
    family = Gemma3nFamily(model=random_model(tiny_config(num_kv_shared_layers=0)))
    assert family.skippable_layers == list(range(6))
    with pytest.raises(WidthsError, match="keep at least one layer"):
        family.validate_widths([0] * 6)


# ---------------------------------------------------------------------------------- slicing


def masked_copy(model: Gemma3nForCausalLM, widths: list[int]) -> Gemma3nForCausalLM:
    """The full model with FFN neurons `w:` of each layer switched off (down columns zeroed)."""
    masked = random_model(model.config)
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer, width in zip(masked.model.layers, widths):
            layer.mlp.down_proj.weight[:, width:] = 0.0
    return masked


def test_dense_layers_slicing_equals_masking() -> None:
    """Without activation sparsity, a layer at width m computes exactly what the full layer
    computes with neurons m: masked (the MatFormer nesting property)."""
    model = random_model(tiny_config(activation_sparsity_pattern=[0.0] * 6))
    family = Gemma3nFamily(model=model)
    widths = [64, 128, 192, 256, 64, 128]
    ids = input_ids()
    with torch.no_grad():
        expected = masked_copy(model, widths)(input_ids=ids).logits
        full = model(input_ids=ids).logits
    got = family.logits(ids, widths)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, full, atol=1e-3)  # the slice really changed something


def test_sparse_layers_use_statistics_of_kept_neurons(family: Gemma3nFamily) -> None:
    """Gemma 3n's first layers keep only gate activations above mean + 1.645 std (the 95%
    Gaussian quantile), with mean and std taken over the layer's neurons. A slice computes
    those statistics over its m neurons, as Google's own sliced checkpoints (E2B) do, so it is
    NOT the full layer with neurons masked; what is exact is the formula on the kept neurons."""
    widths = [128, 256, 256, 256, 256, 256]
    sliced = family.sliced_model(widths).model.layers[0].mlp
    full = family.model.model.layers[0].mlp
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(3))
    m = 128
    gate = x @ full.gate_proj.weight[:m].T
    cutoff = gate.mean(-1, keepdim=True) + gate.std(-1, keepdim=True, unbiased=False) * 1.6448536
    hidden = torch.nn.functional.gelu(torch.relu(gate - cutoff), approximate="tanh")
    expected = (hidden * (x @ full.up_proj.weight[:m].T)) @ full.down_proj.weight[:, :m].T
    with torch.no_grad():
        got = sliced(x)
    assert torch.allclose(got, expected, atol=1e-5)
    # Masking neurons m: of the full layer gives another function (statistics over 256).
    full.down_proj.weight.data[:, m:] = 0.0
    with torch.no_grad():
        masked = full(x)
    assert not torch.allclose(got, masked, atol=1e-4)


def test_in_place_slices_share_memory(family: Gemma3nFamily) -> None:
    widths = [128, 0, 192, 256, 64, 0]
    view = family.sliced_model(widths)
    full_gate = family.model.model.layers[2].mlp.gate_proj.weight
    assert view.model.layers[1].mlp.gate_proj.weight.data_ptr() == full_gate.data_ptr()
    assert view.model.layers[1].mlp.gate_proj.weight.shape == (192, 64)
    assert family.sliced_model(widths) is view  # cached


def test_skip_rules_rebuild_the_config(family: Gemma3nFamily) -> None:
    widths = [128, 0, 192, 256, 64, 0]  # drop layer 1 (before the shared range) and 5 (consumer)
    config = family.sliced_config(widths)
    assert config.num_hidden_layers == 4
    assert config.num_kv_shared_layers == 1  # one of the two consumers dropped
    assert config.layer_types == [SLIDING, SLIDING, FULL, SLIDING]
    assert config.activation_sparsity_pattern == [0.95, 0.0, 0.0, 0.0]
    assert config.intermediate_size == [128, 192, 256, 64]
    view = family.sliced_model(widths)
    shared = [layer.self_attn.is_kv_shared_layer for layer in view.model.layers]
    assert shared == [False, False, False, True]  # old layer 4 still reuses old layer 2's KV
    # Dropping both consumers removes KV sharing altogether.
    assert family.sliced_config([256, 256, 256, 256, 0, 0]).num_kv_shared_layers == 0


def reference_state_dict(model: Gemma3nForCausalLM, widths: list[int]) -> dict[str, torch.Tensor]:
    """Independent slicer in the MatFormer Lab's style: rename layers, cut FFNs and PLE."""
    n_layers = len(widths)
    kept = [i for i, w in enumerate(widths) if w]
    out = {}
    for name, tensor in model.state_dict().items():
        match = re.match(r"model\.layers\.(\d+)\.(.+)", name)
        if match:
            old, rest = int(match[1]), match[2]
            if widths[old] == 0:
                continue
            width = widths[old]
            if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                tensor = tensor[:width, :]
            elif rest == "mlp.down_proj.weight":
                tensor = tensor[:, :width]
            name = f"model.layers.{kept.index(old)}.{rest}"
        elif name == "model.per_layer_model_projection.weight":
            tensor = tensor.reshape(n_layers, PLE_WIDTH, -1)[kept].reshape(-1, tensor.shape[1])
        elif name == "model.embed_tokens_per_layer.weight":
            tensor = tensor.reshape(tensor.shape[0], n_layers, PLE_WIDTH)[:, kept]
            tensor = tensor.reshape(tensor.shape[0], -1)
        out[name] = tensor.clone()
    return out


def test_skipping_matches_an_independent_slicer(family: Gemma3nFamily) -> None:
    widths = [128, 0, 192, 256, 64, 0]
    reference = random_model(family.sliced_config(widths))
    reference.load_state_dict(reference_state_dict(family.model, widths))
    ids = input_ids()
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    got = family.logits(ids, widths)
    assert torch.allclose(got, expected, atol=1e-6)
    # Cutting the per-layer embeddings is necessary: transformers' default of taking the first
    # num_hidden_layers blocks would feed layer 2's embedding to layer 1 and so on.
    state = reference.state_dict()
    wrong = family.model.model.embed_tokens_per_layer.weight[:, : 4 * PLE_WIDTH]
    state["model.embed_tokens_per_layer.weight"] = wrong.clone()
    reference.load_state_dict(state)
    with torch.no_grad():
        assert not torch.allclose(reference(input_ids=ids).logits, got, atol=1e-4)


# ----------------------------------------------------------------------------------- export


def test_export_reloads_with_transformers(tmp_path: Path, checkpoint: Path) -> None:
    family = Gemma3nFamily.load(checkpoint)
    widths = [128, 0, 192, 256, 64, 0]
    out = family.export_hf(widths, tmp_path / "sliced", max_shard_size=60_000)
    names = sorted(p.name for p in out.iterdir())
    shards = [n for n in names if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", n)]
    assert len(shards) > 1 and "model.safetensors.index.json" in names
    assert {"config.json", "mnm.json"} <= set(names)
    assert "README.md" not in names  # the one model card is mnm_search.export's
    config = json.loads((out / "config.json").read_text())
    assert config["intermediate_size"] == [128, 192, 256, 64]
    assert config["num_hidden_layers"] == 4 and config["num_kv_shared_layers"] == 1
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    assert isinstance(reloaded, Gemma3nForCausalLM)
    ids = input_ids(length=20)
    with torch.no_grad():
        reloaded_logits = reloaded(input_ids=ids).logits
    assert (reloaded_logits - family.logits(ids, widths)).abs().max() <= 1e-5
    info = json.loads((out / "mnm.json").read_text())
    assert info["verification"]["verified"] and info["verification"]["max_abs_logit_diff"] <= 1e-5
    assert info["widths"] == widths and info["skipped_layers"] == [1, 5]
    assert info["source_fingerprint"] == family.fingerprint
    assert info["params"] == sum(p.numel() for p in reloaded.parameters())


def test_export_single_file_and_tokenizer_copied(tmp_path: Path, checkpoint: Path) -> None:
    (checkpoint / "tokenizer_config.json").write_text("{}")  # copied as-is
    family = Gemma3nFamily(model=Gemma3nFamily.load(checkpoint).model, path=checkpoint)
    out = family.export_hf([256] * 6, tmp_path / "full", verify=False)
    assert (out / "model.safetensors").is_file()
    assert not (out / "model.safetensors.index.json").exists()
    assert (out / "tokenizer_config.json").read_text() == "{}"


def _held_bytes(family: Gemma3nFamily) -> int:
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in family.model.state_dict(keep_vars=True).values()
    }
    return sum(storages.values())


def _record_held_bytes_during_verification(
    family: Gemma3nFamily, monkeypatch: pytest.MonkeyPatch
) -> list[int]:
    held: list[int] = []
    verify = family._verify_export

    def recording(*args: object, **kwargs: object) -> object:
        held.append(_held_bytes(family))
        return verify(*args, **kwargs)

    monkeypatch.setattr(family, "_verify_export", recording)
    return held


def test_export_frees_the_loaded_weights_while_verifying(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reload must not sit next to the source: a full-width E4B export would hold two."""
    family = Gemma3nFamily.load(checkpoint)
    before = {n: t.clone() for n, t in family.model.state_dict().items()}
    widths = [128, 0, 192, 256, 64, 0]
    view = family.sliced_model(widths)  # a view built before the export stays usable after it
    ids = input_ids(length=12)
    expected = family.logits(ids, widths)
    held = _record_held_bytes_during_verification(family, monkeypatch)
    family.export_hf([256] * 6, tmp_path / "full")
    assert held == [0]
    assert _held_bytes(family) == sum(t.numel() * t.element_size() for t in before.values()) - (
        family.model.lm_head.weight.numel() * family.model.lm_head.weight.element_size()
    )  # read back in full (the tied LM head shares the embedding's storage)
    for name, tensor in family.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    with torch.inference_mode():
        assert torch.equal(view(input_ids=ids).logits, expected)
    assert torch.equal(family.logits(ids, widths), expected)


def test_export_keeps_in_memory_weights_while_verifying(
    tmp_path: Path, family: Gemma3nFamily, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights that did not come from `load` cannot be read back, so they are kept."""
    held = _record_held_bytes_during_verification(family, monkeypatch)
    family.export_hf([256] * 6, tmp_path / "full")
    assert held == [_held_bytes(family)] and held[0] > 0


def test_export_keeps_weights_of_a_checkpoint_changed_on_disk(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    family = Gemma3nFamily.load(checkpoint)
    before = {n: t.clone() for n, t in family.model.state_dict().items()}
    (checkpoint / "config.json").write_text((checkpoint / "config.json").read_text() + "\n")
    held = _record_held_bytes_during_verification(family, monkeypatch)
    with pytest.warns(UserWarning, match="changed on disk"):
        family.export_hf([256] * 6, tmp_path / "full")
    assert held[0] > 0
    for name, tensor in family.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_weights_that_cannot_be_read_back_are_refused_later(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    family = Gemma3nFamily.load(checkpoint)
    verify = family._verify_export

    def delete_source(*args: object, **kwargs: object) -> object:
        for shard in checkpoint.glob("*.safetensors"):
            shard.unlink()
        return verify(*args, **kwargs)

    monkeypatch.setattr(family, "_verify_export", delete_source)
    with pytest.raises(CheckpointError):
        family.export_hf([256] * 6, tmp_path / "full")
    assert not (tmp_path / "full").exists()
    with pytest.raises(CheckpointError, match=r"freed during an export.*load the checkpoint again"):
        family.logits(input_ids(length=4))
    with pytest.raises(CheckpointError, match="load the checkpoint again"):
        family.export_hf([256] * 6, tmp_path / "again", verify=False)


def test_export_cuts_the_ple_table_in_row_chunks(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dropping layers must not copy the whole cut PLE table at once (~4 GB for E4B)."""
    from mnm_search.families import gemma3n

    family = Gemma3nFamily.load(checkpoint)
    table = family.model.model.embed_tokens_per_layer.weight
    monkeypatch.setattr(gemma3n, "_COPY_CHUNK_BYTES", table[0].numel() * table.element_size() * 7)
    cut_rows: list[int] = []
    cut = family._kept_ple_blocks

    def recording(rows: torch.Tensor, plan: object) -> torch.Tensor:
        cut_rows.append(rows.shape[0])
        return cut(rows, plan)

    monkeypatch.setattr(family, "_kept_ple_blocks", recording)
    family.export_hf([128, 0, 192, 256, 64, 0], tmp_path / "sliced", verify=False)
    assert max(cut_rows) == 7 and sum(cut_rows) == table.shape[0]
    with safe_open(str(tmp_path / "sliced" / "model.safetensors"), framework="pt") as handle:
        written = handle.get_tensor("model.embed_tokens_per_layer.weight")
    blocks = table.unflatten(1, (6, PLE_WIDTH))[:, [0, 2, 3, 4]]
    assert torch.equal(written, blocks.flatten(1))


def test_failed_verification_writes_nothing(
    tmp_path: Path, family: Gemma3nFamily, monkeypatch: pytest.MonkeyPatch
) -> None:
    widths = [128, 0, 192, 256, 64, 0]
    family.sliced_model(widths)  # the in-place reference is built from the true weights
    source = family._source

    def corrupted(name: str, plan: object) -> torch.Tensor:
        tensor = source(name, plan)
        return tensor + 0.5 if name.endswith("mlp.down_proj.weight") else tensor

    monkeypatch.setattr(family, "_source", corrupted)
    with pytest.raises(ExportError, match="verification failed"):
        family.export_hf(widths, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    assert not list(tmp_path.iterdir())  # no temporary directory left behind


def test_export_refuses_existing_directory(tmp_path: Path, family: Gemma3nFamily) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        family.export_hf([256] * 6, tmp_path / "out", verify=False)
    family.export_hf([256] * 6, tmp_path / "out", verify=False, overwrite=True)
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize("size", ["lots", 0, "-1MB"])
def test_bad_shard_size(tmp_path: Path, family: Gemma3nFamily, size: object) -> None:
    with pytest.raises(ConfigError, match="max_shard_size"):
        family.export_hf([256] * 6, tmp_path / "out", max_shard_size=size)


# ------------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "widths",
    [
        [256] * 6,
        [64] * 6,
        [128, 0, 192, 256, 64, 0],
        [0, 0, 64, 64, 0, 0],
        [256, 256, 128, 128, 256, 0],
    ],
)
def test_param_count_is_exact(family: Gemma3nFamily, widths: list[int]) -> None:
    with torch.device("meta"):
        sliced = Gemma3nForCausalLM(family.sliced_config(widths))
    assert family.param_count(widths) == sum(p.numel() for p in sliced.parameters())
    effective = sliced.num_parameters(exclude_embeddings=True)
    assert family.effective_param_count(widths) == effective


def e4b_family(step: int | None = None) -> Gemma3nFamily:
    """The real E4B architecture (transformers' defaults) on the meta device: shapes only."""
    layer_types = ([SLIDING] * 4 + [FULL]) * 7  # as in google/gemma-3n-E4B's config.json
    with torch.device("meta"):
        model = Gemma3nForCausalLM(Gemma3nTextConfig(layer_types=layer_types))
    return Gemma3nFamily(model=model, step=step)


def test_e4b_search_space_and_published_parameter_counts() -> None:
    family = e4b_family()
    assert family.step == 2048 and family.kv_producer_layers == [18, 19]
    e2b = [8192] * 20 + [0] * 5 + [8192] * 10
    assert family.sliced_config(e2b).num_kv_shared_layers == 10
    # MatFormer Lab reports 1,905,495,648 effective parameters for E2B. That count was made
    # with transformers 4.53, whose KV-sharing layers still held (unused) k/v projections and
    # k-norm: 10 such layers x (2 x 2048 x 512 + 256). transformers 5 no longer builds them.
    consumer = family.model.model.layers[34].self_attn
    unused_kv = 0 if hasattr(consumer, "k_proj") else 10 * (2 * 2048 * 2 * 256 + 256)
    assert family.effective_param_count(e2b) + unused_kv == 1_905_495_648


def test_matformer_lab_configs_on_e4b() -> None:
    configs = {c.name: c for c in read_matformer_lab_csv(FIXTURES / "matformer_lab_e4b.csv")}
    family = e4b_family()
    for name in ("Main model", "Config for official E2B Model", "Example: global layers wider"):
        family.validate_widths(configs[name].widths(family.n_layers))
    e2b = configs["Config for official E2B Model"].widths(35)
    assert family.effective_param_count(e2b) == pytest.approx(1.91e9, rel=0.02)
    half_steps = configs["Example: half-steps"].widths(35)  # 7168 = 3.5 x 2048
    with pytest.raises(WidthsError, match="not a multiple of the step 2048"):
        family.validate_widths(half_steps)
    e4b_family(step=1024).validate_widths(half_steps)


def test_matformer_lab_configs_on_tiny_model(family: Gemma3nFamily) -> None:
    configs = read_matformer_lab_csv(FIXTURES / "matformer_lab_tiny.csv")
    for config in configs:
        widths = family.validate_widths(config.widths(family.n_layers))
        assert family.logits(input_ids(), widths).isfinite().all()


# ------------------------------------------------------------------------------- evaluation


def test_byte_fallback_and_loss(family: Gemma3nFamily, eval_text_file: Path) -> None:
    assert family.tokenizer is None
    assert family.encode("Az").tolist() == [65, 122]
    eval_set = family.load_eval_set(eval_text_file, seq_len=16, max_tokens=64)
    widths = [128, 0, 192, 256, 64, 0]
    loss = family.evaluate_loss(widths, eval_set, batch_size=3)
    logits = family.logits(eval_set.inputs, widths)
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), eval_set.targets.flatten())
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_checkpoint_tokenizer_is_used(tmp_path: Path, checkpoint: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 7, "world": 9}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(
        str(checkpoint)
    )
    family = Gemma3nFamily.load(checkpoint)
    assert family.tokenizer is not None
    assert family.encode("hello world hello").tolist() == [7, 9, 7]


def _save_long_word_tokenizer(checkpoint: Path) -> None:
    """A tokenizer whose every token covers 40 bytes of text (5x the first read's guess)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "a" * 40: 7, "b" * 40: 9}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(
        str(checkpoint)
    )


def _spy_encode(family: Gemma3nFamily, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the length of every text `family` tokenizes."""
    lengths: list[int] = []
    encode = family.encode

    def spy(text: str) -> torch.Tensor:
        lengths.append(len(text))
        return encode(text)

    monkeypatch.setattr(family, "encode", spy)
    return lengths


def test_eval_reads_and_tokenizes_only_what_max_tokens_needs(
    tmp_path: Path, family: Gemma3nFamily, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = "".join(
        f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(60_000)
    )
    path = tmp_path / "big.txt"  # ~3.5 MB
    path.write_text(text)
    lengths = _spy_encode(family, monkeypatch)
    eval_set = family.load_eval_set(path, seq_len=16, max_tokens=64)
    assert eval_set.inputs.shape == (4, 16)
    assert lengths and max(lengths) <= 2_000  # 68 tokens needed; never the whole file
    whole = torch.tensor(list(text.encode()))[: 4 * 17].view(4, 17)
    assert torch.equal(eval_set.inputs, whole[:, :-1]) and torch.equal(
        eval_set.targets, whole[:, 1:]
    )


def test_eval_reads_more_while_long_tokens_fall_short(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _save_long_word_tokenizer(checkpoint)
    family = Gemma3nFamily.load(checkpoint)
    words = ["a" * 40 if i % 3 else "b" * 40 for i in range(5_000)]
    data = tmp_path / "data"
    data.mkdir()  # a directory of files, read in order
    (data / "1.txt").write_text(" ".join(words[:2_000]))
    (data / "2.txt").write_text(" ".join(words[2_000:]))
    expected = family.encode(" ".join(words[:2_000]) + "\n" + " ".join(words[2_000:]))
    lengths = _spy_encode(family, monkeypatch)
    eval_set = family.load_eval_set(data, seq_len=16, max_tokens=64)
    assert len(lengths) > 1  # the first read held too few tokens, so it read more
    assert max(lengths) < 41 * 400  # but not everything (5,000 words)
    windows = expected[: 4 * 17].view(4, 17)
    assert torch.equal(eval_set.inputs, windows[:, :-1])
    assert torch.equal(eval_set.targets, windows[:, 1:])


def test_eval_of_a_short_file_uses_the_windows_it_has(tmp_path: Path, checkpoint: Path) -> None:
    _save_long_word_tokenizer(checkpoint)
    family = Gemma3nFamily.load(checkpoint)
    path = tmp_path / "short.txt"
    path.write_text(" ".join(["a" * 40] * 40))  # 40 tokens: two windows of 17
    eval_set = family.load_eval_set(path, seq_len=16, max_tokens=10_000)
    assert eval_set.inputs.shape == (2, 16)


def test_export_writes_strict_json_for_non_finite_measurements(
    tmp_path: Path, family: Gemma3nFamily
) -> None:
    metadata = {
        "quality": {"loss": float("nan"), "perplexity": float("inf"), "eval_tokens": 64},
        "latency": {"target": {"name": "cpu"}, "measured_ms": float("nan"), "predicted_ms": 2.0},
    }
    out = family.export_hf(
        [128, 0, 192, 256, 64, 0], tmp_path / "nan", max_shard_size=60_000, metadata=metadata
    )

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not strict JSON")

    info = json.loads((out / "mnm.json").read_text(), parse_constant=refuse)
    assert info["quality"]["loss"] is None and info["latency"]["measured_ms"] is None
    index = json.loads((out / "model.safetensors.index.json").read_text(), parse_constant=refuse)
    assert index["weight_map"]


# ------------------------------------------- the Family interface: caching, decoding, memory


def _loss(family: Gemma3nFamily, eval_set: EvalSet, widths: list[int]) -> float:
    """The plain reference: full-vocabulary logits of the sliced model + cross-entropy."""
    logits = family.logits(eval_set.inputs, widths).float()
    return torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), eval_set.targets.flatten()
    ).item()


# Full, narrow, mixed, producers only, dropped regular and dropped consumer layers, one
# consumer kept while the other is dropped, every skippable layer dropped.
EVAL_CONFIGS = [
    [256] * 6,
    [64] * 6,
    [128, 0, 192, 256, 64, 0],
    [0, 0, 64, 64, 0, 0],
    [256, 256, 128, 128, 256, 0],
    [0, 64, 256, 64, 0, 192],
    [192, 128, 64, 256, 128, 64],
    [64, 0, 256, 192, 256, 256],
    [128, 0, 192, 256, 64, 64],  # shares a 5-layer prefix with the third
    [256, 256, 128, 128, 0, 256],
]


@pytest.mark.parametrize("siblings", ["always", "auto"])
def test_cached_evaluator_matches_the_plain_forward(
    family: Gemma3nFamily, eval_text_file: Path, siblings: str
) -> None:
    from mnm_search.evaluator import CachedEvaluator

    eval_set = family.load_eval_set(eval_text_file, seq_len=16, max_tokens=112)  # 7 windows
    space = family.search_space(allow_skip=True)
    evaluator = CachedEvaluator(
        family,
        eval_set,
        batch_size=3,  # a ragged last batch
        layer_widths=space.choices,
        agreement=True,
        siblings=siblings,
        cache_mb=0.5 if siblings == "auto" else 64,  # "auto": evictions and few siblings
    )
    plain = {tuple(w): family.evaluate_loss(w, eval_set) for w in EVAL_CONFIGS}
    for widths in EVAL_CONFIGS[:3]:
        assert plain[tuple(widths)] == pytest.approx(_loss(family, eval_set, widths), rel=1e-6)
    for widths in EVAL_CONFIGS + EVAL_CONFIGS[2::-1]:  # the repeats come from the cache
        quality = evaluator.evaluate(widths)
        assert quality.loss == pytest.approx(plain[tuple(widths)], rel=1e-6, abs=0), widths
        assert quality.kl is not None and quality.kl >= -1e-6
        if widths == family.full_widths():
            assert abs(quality.kl) < 1e-7 and quality.agreement == 1.0
        else:
            assert quality.kl > 1e-4 and 0 <= quality.agreement < 1
    assert evaluator.stats.prefix_hits > 0
    if siblings == "auto":
        assert evaluator.stats.evictions > 0


def test_layer_steps_state_follows_kv_sharing(family: Gemma3nFamily) -> None:
    steps = family.layer_steps()
    state = steps.embed(input_ids())
    assert state["streams"].shape == (4, 2, 16, 64)  # altup_num_inputs streams
    assert state["kv"] == {}
    for layer, width in enumerate([128, 0, 192, 256]):
        outputs = steps.layer(layer, state, [0, width] if layer not in PRODUCERS else [width])
        if layer not in PRODUCERS:
            assert outputs[0] is state  # a dropped layer passes the state through
        state = outputs[width]
    assert set(state["kv"]) == {SLIDING, FULL}  # the producers (2 and 3) stored their K/V
    keys, values = state["kv"][FULL]
    assert keys.shape == values.shape == (2, 1, 16, 32)
    consumer = steps.layer(4, state, [64, 128])
    assert consumer[64]["kv"] == state["kv"] and consumer[128]["kv"] == state["kv"]


def test_replay_steps_without_shared_kv_states(
    family: Gemma3nFamily, eval_text_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers 4.x shares KV through its cache object: exact, uncached fallback."""
    import mnm_search.families.gemma3n as gemma3n
    from mnm_search.evaluator import CachedEvaluator

    monkeypatch.setattr(gemma3n, "_LAYER_TAKES_SHARED_KV", False)
    eval_set = family.load_eval_set(eval_text_file, seq_len=16, max_tokens=64)
    evaluator = CachedEvaluator(family, eval_set, layer_widths=family.search_space().choices)
    for widths in EVAL_CONFIGS[:3]:
        plain = family.evaluate_loss(widths, eval_set)
        assert evaluator.evaluate(widths).loss == pytest.approx(plain, rel=1e-6)


@pytest.mark.parametrize("widths", [None, [128, 0, 192, 256, 0, 64], [64, 64, 64, 64, 0, 0]])
def test_decoder_matches_the_full_forward(family: Gemma3nFamily, widths: list[int] | None) -> None:
    ids = input_ids(batch=2, length=21)  # longer than the sliding window (8)
    full = family.logits(ids, widths).float()
    decoder = family.decoder(widths)
    assert decoder.length == 0
    parts = [decoder.prefill(ids[:, :5])]
    parts += [decoder.step(ids[:, t : t + 1]) for t in range(5, 17)]
    parts.append(decoder.step(ids[:, 17:]))  # several tokens at once
    assert decoder.length == 21
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)
    decoder.rollback(12)  # speculative decoding: forget rejected tokens, continue
    assert decoder.length == 12
    assert torch.allclose(decoder.step(ids[:, 12:15]), full[:, 12:15], atol=1e-5)
    with pytest.raises(ConfigError, match="cannot roll the cache back"):
        decoder.rollback(16)
    decoder.prefill(ids[:, :3])  # a new prompt resets the cache
    assert decoder.length == 3


def test_memory_bytes_by_hand(family: Gemma3nFamily) -> None:
    from mnm_search.targets import HardwareTarget

    widths = [128, 0, 192, 256, 64, 0]  # kept 0 (S), 2 (S, producer), 3 (F, producer), 4
    target = HardwareTarget(name="p", phase="prefill", seq_len=16, batch=2)  # float32
    memory = family.memory_bytes(widths, target)
    assert memory.weights == family.param_count(widths) * 4
    # K/V of layers 0, 2 (sliding: 8 of the 16 positions) and 3 (full: 16); layer 4 reuses
    # layer 2's, layers 1 and 5 are dropped: 2 (K, V) x batch 2 x 1 KV head x head_dim 32.
    assert memory.kv_cache == 2 * 2 * 1 * 32 * (8 + 8 + 16) * 4
    streams = (2 * 4 + 1) * 2 * 16 * 64  # 4 AltUp streams and their predictions, 1 normed
    per_layer = 2 * 16 * 4 * 16  # 4 kept layers x PLE width 16
    ffn = 3 * 2 * 16 * 256  # gate, up, product at the widest kept FFN (256)
    assert ffn > 2 * 16 * (2 + 2) * 32 + 2 * 2 * 16 * 16  # attention is smaller here
    assert ffn > 2 * 2 * 16 * 300  # so is the soft-capped head
    assert memory.activations == (streams + per_layer + ffn) * 4
    assert memory.total == memory.weights + memory.kv_cache + memory.activations
    decode = HardwareTarget(
        name="d", phase="decode", context_len=20, seq_len=1, batch=3, dtype="bfloat16"
    )
    memory = family.memory_bytes([64] * 6, decode)
    assert memory.kv_cache == 2 * 3 * 1 * 32 * (8 + 21 + 8 + 21) * 2  # layers 0-3 only
    # Decode: the head (2 x 3 x 300 soft-capped logits) is the largest intermediate.
    assert memory.activations == ((2 * 4 + 1) * 3 * 64 + 3 * 6 * 16 + 2 * 3 * 300) * 2
    # Dropping a consumer frees no KV cache; dropping a regular layer frees its own.
    assert family.memory_bytes([64] * 5 + [0], decode).kv_cache == memory.kv_cache
    assert family.memory_bytes([0] + [64] * 5, decode).kv_cache < memory.kv_cache


def test_family_interface(family: Gemma3nFamily, checkpoint: Path) -> None:
    from mnm_search.families import load_family
    from mnm_search.families.base import Family

    assert isinstance(family, Family) and family.is_universal and family.eval_batch_size == 4
    for widths in EVAL_CONFIGS:
        text = family.format_widths(widths)
        assert family.parse_widths(text) == widths
    assert family.format_widths([256] * 6) == "256*6"
    assert family.format_widths([128, 0, 0, 256, 256, 64]) == "128,0*2,256*2,64"
    assert family.uniform_configs()["64"] == [64] * 6
    seeds = family.seed_configs(family.search_space())
    assert [s.label for s in seeds[:4]] == [
        "uniform 64",
        "uniform 128",
        "uniform 192",
        "uniform 256",
    ]
    with pytest.raises(ConfigError, match="interpolate"):
        family.search_space(interpolate=1)
    loaded = load_family(checkpoint, dtype=None)  # None: as stored
    assert isinstance(loaded, Gemma3nFamily) and loaded.dtype == torch.float32
    assert Gemma3nFamily.load(checkpoint, weights=False, dtype=None).has_weights is False
    assert loaded.load_eval_set(None, max_tokens=600).inputs.shape[1] == loaded.eval_seq_len


def test_module_and_sliced_module(family: Gemma3nFamily) -> None:
    ids = input_ids()
    widths = [128, 0, 192, 256, 64, 0]
    module = family.module()
    assert isinstance(module, torch.nn.Module)
    assert torch.equal(module(ids, widths), family.logits(ids, widths))
    assert torch.equal(module(ids), family.logits(ids))
    sliced = family.sliced_module(widths)
    with torch.no_grad():
        got = sliced(ids)
    assert torch.allclose(got, family.logits(ids, widths), atol=1e-5)
    loaded = {t.untyped_storage().data_ptr() for t in family.model.parameters()}
    assert all(p.untyped_storage().data_ptr() not in loaded for p in sliced.parameters())
    ple = sliced.model.model.embed_tokens_per_layer.weight
    assert ple.shape == (300, 4 * PLE_WIDTH) and ple.is_contiguous()
    n = family.param_count(widths)
    assert sum(p.numel() for p in sliced.parameters()) == n
