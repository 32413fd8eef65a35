"""Gemma 3n end to end through the command line: info, eval, profile, search, pareto, export.

Every checkpoint is a tiny random Gemma 3n written by transformers in the test itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
from gemma3n_models import CONSUMERS, PRODUCERS, save_tiny_checkpoint  # noqa: E402

from mnm_search.cli import app  # noqa: E402
from mnm_search.families.gemma3n import Gemma3nFamily  # noqa: E402

runner = CliRunner()
FIXTURES = Path(__file__).parent / "fixtures"
FAST = ["--max-tokens", "512"]
TARGET_YAML = (
    "device: cpu\nphase: prefill\nseq_len: 16\nrepeats: 3\nwarmup: 1\n"
    "calibration: 8\nvalidation: 4\n"
)


def _invoke(args: list[str]):  # type: ignore[no-untyped-def]
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def _json(args: list[str]) -> dict:
    result = _invoke([*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(TARGET_YAML)
    return tmp_path


@pytest.fixture
def ckpt(workdir: Path) -> Path:
    return save_tiny_checkpoint(workdir / "gemma3n-tiny")


# ------------------------------------------------------------------------------ info, eval


def test_info_describes_the_search_space(ckpt: Path) -> None:
    data = _json(["info", ckpt])
    assert data["family"] == "gemma3n"
    assert data["n_layers"] == 6 and data["step"] == 64
    assert data["kv_producer_layers"] == PRODUCERS
    assert data["skippable_layers"] == [0, 1, *CONSUMERS]
    assert data["n_configs"] == {"mix_n_match": 4**6, "with_skips": 5**4 * 4**2}
    family = Gemma3nFamily.load(ckpt)
    stored = sum(p.numel() for p in family.model.parameters())
    assert data["params"] == family.param_count() == stored
    (name,) = [n for n, w in family.uniform_configs().items() if w == [64] * 6]
    assert data["params_uniform"][name] == family.param_count([64] * 6)
    assert data["fingerprint"] == family.fingerprint and data["kind"] == "universal"
    table = _invoke(["info", ckpt])
    assert table.exit_code == 0
    for row in ("KV producers", "skippable layers", "width step", "stored FFN widths"):
        assert row in table.output


def test_info_with_a_coarser_step(ckpt: Path) -> None:
    assert _json(["info", ckpt, "--step", "128"])["n_configs"]["mix_n_match"] == 2**6
    result = _invoke(["info", ckpt, "--step", "96"])
    assert result.exit_code == 1 and "step=96 does not divide" in result.output


def test_eval_matches_the_library(ckpt: Path) -> None:
    widths = [128, 64, 256, 192, 0, 64]
    data = _json(["eval", ckpt, "--widths", ",".join(map(str, widths)), *FAST])
    family = Gemma3nFamily.load(ckpt)
    eval_set = family.load_eval_set(None, max_tokens=512)
    logits = family.logits(eval_set.inputs, widths).float()
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), eval_set.targets.flatten())
    assert data["family"] == "gemma3n"
    assert data["widths"] == widths and data["skipped_layers"] == [4]
    assert data["loss"] == pytest.approx(expected.item(), abs=1e-5)
    assert data["params"] == family.param_count(widths)
    assert data["tokenizer"].startswith("bytes") and data["n_tokens"] == eval_set.n_tokens


def test_chunked_loss_equals_full_logits(ckpt: Path) -> None:
    """The chunked LM head + loss computes what transformers' logits give."""
    family = Gemma3nFamily.load(ckpt)
    widths = [256, 128, 64, 128, 0, 256]
    eval_set = family.load_eval_set(None, seq_len=family.eval_seq_len, max_tokens=512)
    logits = family.logits(eval_set.inputs, widths).float()
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), eval_set.targets.flatten())
    assert family.evaluate_loss(widths, eval_set, batch_size=2) == pytest.approx(
        expected.item(), abs=1e-5
    )


@pytest.mark.parametrize(
    ("widths", "message"),
    [
        ("100*6", "layer 0: width 100 is not a multiple of the step 64; use 64 or 128"),
        ("128,128,0,128,128,128", "layer 2 cannot be skipped: it produces the KV cache"),
        ("128*5", "give 5 entries, but the checkpoint has 6 layers"),
        ("S*6", "layer 0: width 'S' is not an integer"),
        ("512*6", "layer 0: width 512 is outside [0, 256]"),
    ],
)
def test_eval_bad_widths(ckpt: Path, widths: str, message: str) -> None:
    result = _invoke(["eval", ckpt, "--widths", widths])
    assert result.exit_code == 1
    assert message in " ".join(result.output.split())


def test_unsupported_family_lists_what_is_supported(workdir: Path) -> None:
    gpt2 = workdir / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    for command in (["info", gpt2], ["eval", gpt2], ["search", gpt2], ["profile", gpt2]):
        result = _invoke(command)
        assert result.exit_code == 1, command
        text = " ".join(result.output.split())
        assert "unsupported model family (model_type 'gpt2'" in text
        assert "gemma3n: Gemma 3n via transformers" in text and "matlm: native" in text
        assert "llama: dense or matformerized" in text


def test_missing_shard_is_a_clear_error(ckpt: Path) -> None:
    shard = sorted(ckpt.glob("model-*.safetensors"))[1]
    shard.unlink()
    result = _invoke(["eval", ckpt, *FAST])
    assert result.exit_code == 1
    assert shard.name in result.output and "missing" in result.output.lower()


def test_native_only_options_are_refused(ckpt: Path, tiny_checkpoint: Path) -> None:
    result = _invoke(["info", tiny_checkpoint, "--step", "64"])
    assert result.exit_code == 1 and "--step (step=64) does not apply to native" in result.output
    result = _invoke(["search", ckpt, "--objectives", "loss,params", "--interpolate", "1"])
    assert result.exit_code == 1 and "--interpolate" in result.output
    assert "does not apply to Gemma 3n" in " ".join(result.output.split())
    result = _invoke(["export", ckpt, "--widths", "64*6", "--out", "x", "--format", "onnx"])
    assert result.exit_code == 1 and "exports as --format hf" in result.output
    assert not Path("x").exists()


# --------------------------------------------------------------- search, pareto and export


def test_search_with_matformer_lab_configs_then_pareto_and_export(ckpt: Path) -> None:
    lab = FIXTURES / "matformer_lab_tiny.csv"
    search = _json(
        [
            "search", ckpt, "--objectives", "loss,params", "--trials", "14", "--sampler", "tpe",
            "--allow-skip", "--lab-configs", lab, "--out", "res", *FAST,
        ]
    )  # fmt: skip
    assert search["n_complete"] == 14
    trials = __import__("pandas").read_csv("res/trials.csv")
    sources = list(trials["source"])
    assert sources[:3] == ["lab: Full", "lab: Half, consumers skipped", "lab: Mixed"]
    assert "uniform 64" in sources and "uniform 256" in sources
    assert trials.loc[2, "widths"] == "128,0,192,256,64,0"  # Mixed: layers 1 and 5 skipped
    family = Gemma3nFamily.load(ckpt)
    assert trials.loc[2, "params"] == family.param_count([128, 0, 192, 256, 64, 0])

    pareto = _json(["pareto", "res"])
    named = {row["name"]: row for row in pareto["named_configs"]}
    assert set(named) == {"Full", "Half, consumers skipped", "Mixed"}
    assert named["Full"]["params"] == family.param_count()
    assert Path("res/pareto.png").stat().st_size > 10_000

    best = min(pareto["front"], key=lambda row: row["loss"])
    report = _json(["export", "--from", "res", "--trial", best["trial"], "--out", "best", *FAST])
    assert report["verification"]["verified"] and report["trial"] == best["trial"]
    assert report["quality"]["loss"] == pytest.approx(best["loss"], abs=1e-5)
    config = json.loads(Path("best/config.json").read_text())
    kept = [w for w in best["widths"] if w]
    assert config["intermediate_size"] == kept and config["num_hidden_layers"] == len(kept)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained("best").eval()
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    assert torch.allclose(got, family.logits(ids, best["widths"]), atol=1e-5)

    front = _json(["export", "--from", "res", "--all-pareto", "--out", "front", *FAST])
    assert len(front["exports"]) == len(pareto["front"])
    summary = __import__("pandas").read_csv("front/front.csv")
    assert sorted(summary["trial"]) == sorted(row["trial"] for row in pareto["front"])


def test_search_with_memory_kl_and_disagreement(ckpt: Path) -> None:
    """Gemma 3n searches every objective: memory on a target, kl/disagreement against the
    full model (through its layer steps, with prefix caching)."""
    import pandas as pd

    from mnm_search.families import load_family
    from mnm_search.targets import load_target

    family = load_family(ckpt)
    try:
        family.layer_steps()
    except NotImplementedError:
        pytest.skip("Gemma 3n has no layer steps yet (the cached evaluator needs them)")
    search = _json(
        [
            "search", ckpt, "--objectives", "loss,memory,kl,disagreement", "--trials", "6",
            "--sampler", "random", "--target", "tiny.yaml", "--out", "res", "--max-tokens", "64",
        ]
    )  # fmt: skip
    assert search["n_complete"] == 6
    trials = pd.read_csv("res/trials.csv", dtype={"widths": str})
    assert (trials["state"] == "COMPLETE").all()
    assert "uniform" in set(trials["seed_kind"].dropna())
    target = load_target("tiny.yaml")
    for row in trials.itertuples():
        widths = [int(w) for w in row.widths.split(",")]
        assert row.memory_bytes == family.memory_bytes(widths, target).total
        assert row.kl >= -1e-6 and 0 <= row.disagreement <= 1
    at_full = trials[trials["widths"] == ",".join(map(str, family.full_widths()))]
    assert not at_full.empty and at_full["kl"].abs().max() < 1e-5
    assert (at_full["disagreement"] == 0).all()
    info = json.loads(Path("res/run.json").read_text())
    assert info["family"] == "gemma3n" and info["step"] == family.describe()["step"]


def test_lab_config_that_skips_needs_allow_skip(ckpt: Path) -> None:
    lab = FIXTURES / "matformer_lab_tiny.csv"
    result = _invoke(
        ["search", ckpt, "--objectives", "loss,params", "--trials", "3", "--lab-configs", lab]
    )
    assert result.exit_code == 1
    assert "'lab: Half, consumers skipped'" in result.output and "--allow-skip" in result.output


def test_lab_config_for_another_model_is_refused(ckpt: Path) -> None:
    result = _invoke(
        [
            "search", ckpt, "--objectives", "loss,params", "--trials", "3", "--allow-skip",
            "--lab-configs", FIXTURES / "matformer_lab_e4b.csv",
        ]
    )  # fmt: skip
    assert result.exit_code == 1
    assert "but the checkpoint has 6 layers" in " ".join(result.output.split())


def test_export_of_a_checkpoint_other_than_the_searched_one(ckpt: Path, workdir: Path) -> None:
    _json(["search", ckpt, "--objectives", "loss,params", "--trials", "3", "--out", "res", *FAST])
    other = save_tiny_checkpoint(workdir / "other", seed=1)
    result = _invoke(["export", other, "--from", "res", "--trial", "0", "--out", "x"])
    assert result.exit_code == 1 and "its widths and losses do not apply" in result.output


def test_profile_then_latency_search_eval_and_export(ckpt: Path) -> None:
    result = _invoke(["profile", ckpt, "--target", "tiny.yaml", "--quick", "--out", "p.json"])
    assert result.exit_code == 0, result.output
    profile = json.loads(Path("p.json").read_text())
    assert profile["checkpoint"]["family"] == "gemma3n"
    assert profile["latency_model"]["measured_widths"] == [64, 128, 192, 256]
    widths = "128,128,256,256,0,64"
    evaluated = _json(["eval", ckpt, "--widths", widths, "--profile", "p.json", *FAST])
    assert evaluated["latency_ms"] > 0
    search = _json(
        [
            "search", ckpt, "--profile", "p.json", "--trials", "8", "--sampler", "random",
            "--allow-skip", "--out", "res", *FAST,
        ]
    )  # fmt: skip
    assert all(row["latency_ms"] > 0 for row in search["pareto"])
    trial = search["pareto"][0]["trial"]
    report = _json(["export", "--from", "res", "--trial", trial, "--out", "fast", *FAST])
    latency = report["latency"]
    assert latency["predicted_ms"] == pytest.approx(search["pareto"][0]["latency_ms"], rel=1e-3)
    # Timed on the profile's target, next to the full model.
    assert latency["target"]["seq_len"] == 16 and latency["repeats"] == 3
    assert 0 < latency["measured_p10_ms"] <= latency["measured_ms"] <= latency["measured_p90_ms"]
    assert latency["full_model_measured_ms"] > 0
    assert latency["speedup_vs_full"] == pytest.approx(
        latency["full_model_measured_ms"] / latency["measured_ms"], rel=1e-3
    )
    assert latency["error_pct"] == pytest.approx(
        100 * (latency["predicted_ms"] - latency["measured_ms"]) / latency["measured_ms"],
        abs=0.01,
    )
    assert json.loads(Path("fast/mnm.json").read_text())["latency"] == latency
    other = save_tiny_checkpoint(Path("other"), seed=2)
    refused = _invoke(["eval", other, "--profile", "p.json", *FAST])
    assert refused.exit_code == 1 and "profile this checkpoint" in refused.output


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (None, "measured on cpu-prefill"),  # no profile: the default target, in float32
        ("tiny.yaml", "measured on tiny"),
        ("bf16.yaml", "latency not measured: target 'bf16' "),
    ],
)
def test_export_measures_latency_on_a_target_the_model_runs_as_is(
    ckpt: Path, target: str | None, expected: str
) -> None:
    Path("bf16.yaml").write_text(TARGET_YAML + "dtype: bfloat16\n")
    option = ["--target", target] if target else []
    args = ["export", ckpt, "--widths", "128*6", "--out", "x", *FAST, *option]
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    assert expected in " ".join(result.output.split())
    latency = json.loads(Path("x/mnm.json").read_text())["latency"]
    card = Path("x/README.md").read_text()
    assert "| validation loss |" in card and "tokens of bundled validation text" in card
    assert card.count("# Gemma 3n Mix'n'Match submodel") == 1 and "| layers kept | 6 of 6" in card
    if target == "bf16.yaml":
        # The model is never converted to be timed: the reason names its own dtype.
        assert latency["measured_ms"] is None and "float32" in latency["not_measured"]
        assert "| measured latency | not measured: target 'bf16'" in card
    else:
        assert latency["measured_ms"] > 0 and latency["speedup_vs_full"] > 0
        assert latency["predicted_ms"] is None  # no profile was given
        assert f"| target | {latency['target']['name']}: " in card
        assert f"| measured latency | {latency['measured_ms']:.3f} ms" in card
