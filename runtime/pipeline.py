"""One object from image to pruned LLM embeddings: preprocess → encode → prune → project.

Strategies come from the registry by name; the pipeline never names one. Defaults of the
entropy method come from the bundle's manifest (``pruning``) unless the caller overrides them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Hashable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from runtime.bundle.manifest import Manifest, load_manifest, repair_command
from runtime.clip_text import ClipSpace, open_clip_space
from runtime.encoder import Encoder
from runtime.errors import BundleError, InputError, SettingError
from runtime.llm.prompt_cache import ImageRows, check_positions
from runtime.preprocess import PreprocessConfig, load_image, preprocess
from runtime.projector import Projector
from runtime.scoring import layer_distributions, layer_entropy, layer_kl
from runtime.strategies.capabilities import refusal
from runtime.strategies.registry import TEXT_TOWER, Strategy, get_strategy
from runtime.types import EncoderOutput, ProbeOutput, PruneInputs, Selection

ProbeFn = Callable[..., ProbeOutput]  # (image rows [N, E], final=False) -> ProbeOutput


@dataclass(frozen=True)
class PrunedImage:
    """The result for one image: K embedding rows for the language model and how they were chosen."""

    embeddings: np.ndarray  # [K, E] float32, in the order they are fed to the LLM
    kept: np.ndarray  # [K] int64 patch index of each row
    counts: np.ndarray  # [K] int64 patches each row stands for
    assignment: np.ndarray  # [N] int64 row each patch went into (its own when kept), -1 when dropped
    strategy: str
    num_patches: int  # N
    report: Mapping[str, Any]  # layers, entropy, kl, k_s, k_d, ... (JSON-serialisable)
    timings_ms: Mapping[str, float] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return int(self.kept.shape[0])

    def image_rows(self, key: Hashable, positions: str = "packed") -> ImageRows:
        """The rows as the language model is fed them (method.md §6). ``packed``: consecutive.
        ``original``: each row at its kept patch's index (a merged row: the kept patch's), the
        text after the image at N; rows in ascending patch order (visionzip's are not: dominant
        tokens, then contextual ones). Reordered rows get the key ``(key, "patch order")``: row i
        is then another row than packed row i, so a KV cache never reuses one for the other.
        Strategy ``none`` gives the same positions either way."""
        if check_positions(positions) == "packed":
            return ImageRows(key, self.embeddings)
        order = np.argsort(self.kept, kind="stable")
        if not np.array_equal(order, np.arange(order.shape[0])):
            key = (key, "patch order")
        return ImageRows(key, self.embeddings[order], self.kept[order], self.num_patches)


class _Timer:
    """Accumulates wall time per stage in milliseconds."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = self.ms.get(name, 0.0) + 1000 * (time.perf_counter() - start)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            with self.stage(name):
                return fn(*args, **kwargs)

        return timed


class Pipeline:
    """``Pipeline(bundle).prune(image, tokens=64, strategy="entropy") -> PrunedImage``."""

    def __init__(self, bundle: str | Path | Manifest, provider: str | None = None,
                 threads: int | None = None, int8: bool = False) -> None:
        self.manifest = bundle if isinstance(bundle, Manifest) else load_manifest(bundle)
        self.preprocess_config = PreprocessConfig(**self.manifest.preprocess)
        geometry, repair = self.manifest.vision, repair_command(self.manifest.data, self.manifest.root, "export.clip")
        vision = self.manifest.path("vision_int8" if int8 else "vision")
        checks = {"vision": geometry, "repair": repair, "export_id": self.manifest.export_id}
        self.encoder = Encoder(vision, provider, threads, **checks)
        self.projector = Projector(self.manifest.path("projector"), provider, threads, **checks)
        self._clip_options = {"provider": provider, "threads": threads, "int8": int8}
        self._clip: ClipSpace | None = None  # opened when a strategy first needs it

    def clip_space(self) -> ClipSpace:
        """The bundle's CLIP text tower and image projection (loaded on first use); a bundle
        without them is a one-line error naming the command that adds them."""
        if self._clip is None:
            self._clip = open_clip_space(self.manifest, **self._clip_options)
        return self._clip

    @property
    def num_patches(self) -> int:
        return self.manifest.vision.num_patches

    def options_for(self, strategy: str, overrides: Mapping[str, Any]) -> Any:
        """The strategy's options: manifest defaults for fields it has, then the overrides."""
        chosen = get_strategy(strategy)
        fields = {f.name for f in dataclasses.fields(chosen.options)}
        defaults = {k: (tuple(v) if isinstance(v, list) else v)
                    for k, v in self.manifest.pruning.to_json().items() if k in fields}
        return chosen.make_options(**{**defaults, **{k: v for k, v in overrides.items() if v is not None}})

    def pixel_values(self, image: Image.Image | str | Path) -> np.ndarray:
        """``[3, S, S]`` float32 for an image or a path to one (LLaVA-1.5's single view; a LLaVA-NeXT
        bundle's images become tiles in :class:`runtime.anyres.pipeline.AnyresPipeline`)."""
        if self.manifest.anyres is not None:
            raise InputError(f"bundle {self.manifest.root} is LLaVA-NeXT: its images are cut into tiles, which "
                             "runtime.prune, runtime.chat, the server, tools/bench.py and tools/tiles_overlay.py "
                             "handle; this LLaVA-1.5 path does not")
        if not isinstance(image, Image.Image):
            image = load_image(image)
        return preprocess(image, self.preprocess_config)

    def prune(self, image: Image.Image | str | Path, tokens: int = 64, strategy: str = "entropy",
              probe: ProbeFn | None = None, question: str | None = None, **options: Any) -> PrunedImage:
        """Run every stage on one image; ``options`` are the strategy's keyword options."""
        timer = _Timer()
        with timer.stage("preprocess"):
            pixels = self.pixel_values(image)
        with timer.stage("encode"):
            encoded = self.encoder.encode(pixels)
        return self.prune_encoded(encoded, tokens, strategy, probe, question, timer=timer, **options)

    def prune_encoded(self, encoded: EncoderOutput, tokens: int, strategy: str = "entropy",
                      probe: ProbeFn | None = None, question: str | None = None, timer: _Timer | None = None,
                      **options: Any) -> PrunedImage:
        """Prune and project an already encoded image.

        ``question``: what the question-aware strategies (cdpruner, dart) prune for; they refuse to
        run without one. A probe strategy reads the question from the prompt ``probe`` was bound to.
        """
        timer = timer or _Timer()
        chosen = get_strategy(strategy)
        budget = self.check_budget(encoded.num_patches if chosen.keeps_all else tokens)
        opts = self.options_for(strategy, options)
        self.check_strategy(chosen)
        require_question(chosen, question)
        if chosen.needs_probe and probe is None:
            raise InputError(f"strategy {strategy!r} needs the language-model probe: run "
                             f"python -m export.llm --model ALIAS --out {self.manifest.root}")
        clip = self.clip_space() if TEXT_TOWER in chosen.needs else None
        inputs = PruneInputs(encoded, timer.wrap("project_all", self.projector),
                             timer.wrap("probe", probe) if probe else None, question,
                             timer.wrap("text_tower", clip.text) if clip else None,
                             timer.wrap("clip_image", clip.image) if clip else None)
        with timer.stage("prune"):
            selection = chosen.run(inputs, budget, opts)
        # nested stages ran inside "prune": report them separately, not twice
        timer.ms["prune"] -= sum(timer.ms.get(k, 0.0) for k in ("project_all", "probe", "text_tower", "clip_image"))
        with timer.stage("project"):
            embeddings = self.projector(selection.tokens)
        return PrunedImage(embeddings, selection.kept, selection.counts, selection.assignment_for(encoded.num_patches),
                           strategy, encoded.num_patches,
                           _with_curves(selection, encoded), dict(timer.ms))

    def check_strategy(self, strategy: Strategy) -> None:
        """A one-line BundleError when this bundle lacks what ``strategy`` needs (the probe, the text
        tower, a score map: ``runtime.strategies.capabilities``), naming the command that adds it."""
        reason = refusal(strategy, self.manifest)
        if reason:
            raise BundleError(reason)

    def check_budget(self, tokens: int) -> int:
        """``1 <= K <= N`` or a one-line InputError."""
        if not 1 <= tokens <= self.num_patches:
            raise SettingError("tokens", f"must be in 1..{self.num_patches} (the image has {self.num_patches} "
                                         f"patches), got {tokens}")
        return tokens


def require_question(strategy: Strategy, question: str | None) -> None:
    """A one-line SettingError (field ``question``) when ``strategy`` prunes for a question and
    ``question`` is missing or blank."""
    if strategy.needs_question and (question is None or not question.strip()):
        raise SettingError("question", f"is required by strategy {strategy.name!r}, which prunes for the question")


def _with_curves(selection: Selection, encoded: EncoderOutput) -> dict[str, Any]:
    """The strategy's report plus H(l)/KL(l) curves when the strategy did not compute them."""
    report = dict(selection.report)
    if "entropy" not in report or "kl" not in report:
        dist = layer_distributions(encoded.cls_attn)
        report.setdefault("entropy", [float(h) for h in layer_entropy(dist)])
        report.setdefault("kl", [float(k) for k in layer_kl(dist)])
    return report
