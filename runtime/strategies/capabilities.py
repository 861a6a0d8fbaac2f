"""Which strategies a bundle can run: what the bundle provides against what each strategy needs.

A strategy declares its ``needs`` when it registers (``runtime.strategies.registry``); a bundle's
manifest says what it provides:

- ``cls_attn`` / ``keys``: the score maps the vision graph returns, read from the manifest's
  ``io.vision.outputs`` (a bundle written before ``io`` existed provides both, as every export did);
- ``projector``: the multimodal projector (every bundle has one; DINOv2's is the identity);
- ``probe`` / ``probe_final``: the language-model probe and the final-norm probe export.llm writes
  (``llm.probe``, ``llm.probe.final``);
- ``text_tower``: the CLIP text tower export.clip writes beside the vision tower.

``question`` is not a bundle property (the caller gives it), so it never makes a strategy
unavailable here; :func:`runtime.pipeline.require_question` checks it per call.
:func:`refusal` turns the first missing need into one line naming the command that adds it.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.bundle.manifest import Manifest, source_model, text_tower_command
from runtime.strategies.registry import (
    CLS_ATTN,
    KEYS,
    PROBE,
    PROBE_FINAL,
    PROJECTOR,
    QUESTION,
    TEXT_TOWER,
    Strategy,
    available,
    get_strategy,
)

SCORE_MAPS = (CLS_ATTN, KEYS)  # vision-graph outputs besides the features


@dataclass(frozen=True)
class StrategyStatus:
    """One row of :func:`strategy_table`: whether the bundle runs ``name`` and, if not, why."""

    name: str
    needs: tuple[str, ...]  # sorted
    runnable: bool
    reason: str | None  # one line when not runnable


def bundle_provides(manifest: Manifest) -> frozenset[str]:
    """What ``manifest``'s bundle offers the strategies (see the module docstring)."""
    outputs = manifest.data.get("io", {}).get("vision", {}).get("outputs")
    names = {o.get("name") for o in outputs if isinstance(o, dict)} if isinstance(outputs, list) else set(SCORE_MAPS)
    provided = {m for m in SCORE_MAPS if m in names} | {PROJECTOR}
    if manifest.llm is not None:
        provided.add(PROBE)
        if manifest.llm.probe.final is not None:
            provided.add(PROBE_FINAL)
    if manifest.text_tower is not None:
        provided.add(TEXT_TOWER)
    return frozenset(provided)


def _remedy(need: str, manifest: Manifest) -> str:
    alias = source_model(manifest.data)
    if need in (PROBE, PROBE_FINAL):
        what = "the language-model probe" if need == PROBE else "the final-norm probe (probe_final.gguf)"
        return f"{what}: run python -m export.llm --model {alias} --out {manifest.root}"
    if need == TEXT_TOWER:
        return f"the CLIP text tower: run {text_tower_command(manifest.data, manifest.root)}"
    return f"the vision graph's {need!r} output, which this bundle's encoder does not return (re-export the bundle)"


def refusal(strategy: Strategy, manifest: Manifest, provides: frozenset[str] | None = None) -> str | None:
    """None when the bundle can run ``strategy``, else one line saying what is missing and how to add it."""
    provided = bundle_provides(manifest) if provides is None else provides
    missing = sorted(strategy.needs - provided - {QUESTION})
    if not missing:
        return None
    return f"strategy {strategy.name!r} needs {_remedy(missing[0], manifest)}"


def strategy_table(manifest: Manifest) -> list[StrategyStatus]:
    """Every registered strategy with whether ``manifest``'s bundle can run it (sorted by name)."""
    provided = bundle_provides(manifest)
    rows = []
    for name in available():
        strategy = get_strategy(name)
        reason = refusal(strategy, manifest, provided)
        rows.append(StrategyStatus(name, tuple(sorted(strategy.needs)), reason is None, reason))
    return rows


def format_table(rows: list[StrategyStatus]) -> str:
    """The table ``runtime.prune BUNDLE --list-strategies`` prints."""
    width = max(len(r.name) for r in rows)
    lines = []
    for r in rows:
        needs = ", ".join(r.needs) or "-"
        lines.append(f"{r.name:<{width}}  {'yes' if r.runnable else 'no ':<3}  needs: {needs}"
                     + ("" if r.runnable else f"  ({r.reason})"))
    return "\n".join(lines)
