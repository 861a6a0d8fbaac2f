"""What a bundle provides against what each strategy needs (``runtime.strategies.capabilities``).

The declarations are checked against behaviour: a strategy run on inputs whose undeclared parts
are poisoned (NaN score maps, a projector and a probe that raise) must still select, so a
strategy cannot read something it does not declare. The negative control removes one
declaration and shows the poisoned run then fails.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from runtime.bundle.manifest import load_manifest
from runtime.errors import InputError
from runtime.prune import main
from runtime.strategies.capabilities import bundle_provides, refusal, strategy_table
from runtime.strategies.registry import (
    CLS_ATTN,
    KEYS,
    NEEDS,
    PROBE,
    PROBE_FINAL,
    PROJECTOR,
    QUESTION,
    TEXT_TOWER,
    Strategy,
    available,
    get_strategy,
)
from runtime.types import EncoderOutput, PruneInputs
from tests.strategy_fakes import linear_projector, make_encoded, make_probe


def _refuse(*_args, **_kwargs):
    raise AssertionError("read although the strategy does not declare it")


class Untouchable(np.ndarray):
    """An array whose values cannot be read through indexing, ufuncs, numpy functions or astype
    (its shape can); ``np.asarray`` sees through a subclass, so the values are NaN as well."""

    def __getitem__(self, item):
        _refuse()

    def astype(self, *args, **kwargs):
        _refuse()

    def __array_ufunc__(self, *args, **kwargs):
        _refuse()

    def __array_function__(self, *args, **kwargs):
        _refuse()


def nan(like: np.ndarray, _value: float) -> np.ndarray:
    return np.full(like.shape, np.nan, np.float32).view(Untouchable)


def poisoned_inputs(needs: frozenset[str]) -> PruneInputs:
    """Inputs where every part ``needs`` leaves out is unusable (untouchable NaN maps, raising callables)."""
    enc = make_encoded(n=36, d=12, f=23)  # 23 blocks: the default layer ranges fit
    encoded = EncoderOutput(enc.features,
                            enc.cls_attn if CLS_ATTN in needs else nan(enc.cls_attn, np.nan),
                            enc.keys if KEYS in needs else nan(enc.keys, np.nan))
    clip_image = (lambda x: np.asarray(x, np.float32)[:, :8]) if TEXT_TOWER in needs else _refuse
    clip_text = (lambda q: np.ones((1, 8), np.float32)) if TEXT_TOWER in needs else _refuse
    return PruneInputs(encoded, linear_projector(12, 16) if PROJECTOR in needs else _refuse,
                       make_probe(16) if PROBE in needs else None, "what is it?" if QUESTION in needs else None,
                       clip_text, clip_image)


def run_poisoned(strategy: Strategy, needs: frozenset[str], k: int = 9) -> np.ndarray:
    options = strategy.make_options(**({"layer": 2} if strategy.name == "dart" else {}))
    selection = strategy.run(poisoned_inputs(needs), k, options)
    if not np.isfinite(selection.tokens).all():
        raise AssertionError(f"{strategy.name}: tokens not finite")
    return selection.kept


@pytest.mark.parametrize("name", available())
def test_each_strategy_reads_only_what_it_declares(name: str) -> None:
    strategy = get_strategy(name)
    assert strategy.needs <= NEEDS
    kept = run_poisoned(strategy, strategy.needs)
    assert len(set(kept.tolist())) == len(kept) == (36 if strategy.keeps_all else 9)


@pytest.mark.parametrize(("name", "dropped"), [("visionzip", KEYS), ("entropy", CLS_ATTN), ("divprune", PROJECTOR),
                                               ("fastv", PROBE), ("cdpruner", TEXT_TOWER)])
def test_negative_control_an_undeclared_read_is_caught(name: str, dropped: str) -> None:
    strategy = get_strategy(name)
    with pytest.raises((AssertionError, ValueError, TypeError, AttributeError, InputError)):
        run_poisoned(strategy, strategy.needs - {dropped})


def _copy_with(bundle: Path, tmp_path: Path, edit) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    data = json.loads((out / "manifest.json").read_text())
    edit(data)
    (out / "manifest.json").write_text(json.dumps(data))
    return out


def test_bundle_without_language_model_runs_the_vision_strategies_only(tiny_bundle: Path) -> None:
    manifest = load_manifest(tiny_bundle)
    provided = bundle_provides(manifest)
    assert {CLS_ATTN, KEYS, PROJECTOR} <= provided and PROBE not in provided and PROBE_FINAL not in provided
    table = {row.name: row for row in strategy_table(manifest)}
    assert set(table) == set(available())
    for name in ("none", "uniform", "fastervlm", "entropy", "visionzip", "divprune"):
        assert table[name].runnable and table[name].reason is None
    for name in ("fastv", "entropyprune", "dart"):
        assert not table[name].runnable and "export.llm" in table[name].reason
        assert "\n" not in table[name].reason


@pytest.mark.llm
def test_bundle_with_language_model_runs_the_probe_strategies(tiny_llm_bundle: Path, tmp_path: Path) -> None:
    manifest = load_manifest(tiny_llm_bundle)
    assert {PROBE, PROBE_FINAL} <= bundle_provides(manifest)
    assert refusal(get_strategy("dart"), manifest) is None
    # a bundle exported before DART has the probe but no final-norm probe: only dart is refused
    old = load_manifest(_copy_with(tiny_llm_bundle, tmp_path, lambda d: d["llm"]["probe"].pop("final")))
    assert refusal(get_strategy("fastv"), old) is None
    assert "final-norm probe" in refusal(get_strategy("dart"), old)


def test_score_maps_come_from_the_manifest(tiny_bundle: Path, tmp_path: Path) -> None:
    def drop_keys(data: dict) -> None:
        data["io"]["vision"]["outputs"] = [o for o in data["io"]["vision"]["outputs"] if o["name"] != "keys"]

    manifest = load_manifest(_copy_with(tiny_bundle, tmp_path, drop_keys))
    assert KEYS not in bundle_provides(manifest) and CLS_ATTN in bundle_provides(manifest)
    assert "'keys' output" in refusal(get_strategy("visionzip"), manifest)
    assert refusal(get_strategy("entropy"), manifest) is None
    # a manifest from before ``io`` was recorded: every export returned both maps
    legacy = dataclasses.replace(manifest, data={k: v for k, v in manifest.data.items() if k != "io"})
    assert {CLS_ATTN, KEYS} <= bundle_provides(legacy)


def test_list_strategies_cli(tiny_bundle: Path, capsys) -> None:
    assert main(["--model", str(tiny_bundle), "--list-strategies"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == available()
    fastv = next(line for line in lines if line.startswith("fastv "))
    assert " no " in fastv and "export.llm" in fastv


def test_refused_strategy_is_one_line_before_sessions_load(tiny_bundle: Path, tmp_path: Path, photos,
                                                           capsys) -> None:
    photo_path = tmp_path / "chelsea.png"
    photos["chelsea"].save(photo_path)
    def drop_keys(data: dict) -> None:
        data["io"]["vision"]["outputs"] = [o for o in data["io"]["vision"]["outputs"] if o["name"] != "keys"]

    bundle = _copy_with(tiny_bundle, tmp_path, drop_keys)
    assert main([str(photo_path), "--model", str(bundle), "--strategy", "visionzip"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'keys' output" in err[0], err


@pytest.mark.llm
def test_chat_refuses_a_strategy_the_bundle_cannot_run(tiny_llm_bundle: Path, tmp_path: Path, photos,
                                                       capsys) -> None:
    """runtime.chat (and the server's Assistant) refuse in one line at start, and on a switch."""
    from runtime.assistant import Assistant
    from runtime.chat import main as chat
    from runtime.errors import BundleError
    from runtime.turn import Settings

    bundle = _copy_with(tiny_llm_bundle, tmp_path, lambda d: d.pop("text_tower"))
    photo = tmp_path / "chelsea.png"
    photos["chelsea"].save(photo)
    assert chat(["--model", str(bundle), "--image", str(photo), "--strategy", "cdpruner", "--prompt", "Hi?"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # a "loading" progress line, then the error
    errors = [line for line in err if "error" in line]
    assert errors == err[-1:] and "text tower" in err[-1] and "export.clip" in err[-1], err
    assert not any("Traceback" in line for line in err)
    assistant = Assistant.open(bundle, Settings(strategy="entropy"), n_ctx=512)
    try:
        with pytest.raises(BundleError, match="text tower"):
            assistant.update(strategy="cdpruner")
        assert assistant.settings.strategy == "entropy"  # the refused switch changed nothing
    finally:
        assistant.close()
