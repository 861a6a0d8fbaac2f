"""Entropy Collapse Layer (EntropyPrune, method.md §2): M(l) of the visual tokens per LLM layer.

``python tools/ecl.py --model ALIAS_OR_PATH IMAGES... --out DIR [--prompt TEXT]``

Runs the Hugging Face LLaVA (PyTorch path) on each image with the LLaVA-1.5 prompt, takes the
hidden states of the image tokens after every decoder layer (``hidden_states[0]`` is the input
embeddings, ``hidden_states[l]`` the output of layer l), and computes the matrix entropy M(l)
(runtime.matrix_entropy, dual-Gram side). The ECL is the layer after the largest single drop
``M(l) − M(l+1)``. Writes ``ecl.csv`` (image, layer, M) and ``ecl.png`` (one curve per image, the
mean in black) and ``ecl.json``; prints the ECL per image and of the mean curve. The registry's
``entropyprune_layer`` (P) is the released code's choice (2 for LLaVA-1.5), not this tool's output.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import numpy as np

from runtime.atomic import write_atomic, write_json_atomic
from runtime.cli import OneLineParser, log, run_cli
from runtime.matrix_entropy import matrix_entropy
from runtime.preprocess import load_image

DEFAULT_PROMPT = "Describe the image."


def entropy_curve(hidden_states, image_mask) -> np.ndarray:
    """``[Lm+1]``: M of the image-token rows of every hidden state (layer 0 = embeddings)."""
    return np.array([matrix_entropy(h[0, image_mask].double().numpy()) for h in hidden_states])


def collapse_layer(curve: np.ndarray) -> int:
    """The layer after the largest single drop ``M(l) − M(l+1)``; e.g. [5, 4.9, 3, 2.9] -> 2."""
    if curve.ndim != 1 or curve.shape[0] < 2:
        raise ValueError(f"need an entropy curve of at least 2 layers, got shape {curve.shape}")
    return int(np.argmax(curve[:-1] - curve[1:])) + 1


def curves_for(model_arg: str, images: list[Path], prompt: str) -> dict[str, np.ndarray]:
    import torch
    from transformers import AutoProcessor

    from export.load import load_llava, resolve_model

    resolved = resolve_model(model_arg)
    model = load_llava(resolved.path)
    processor = AutoProcessor.from_pretrained(resolved.path)
    text = f"USER: <image>\n{prompt} ASSISTANT:"
    curves = {}
    for i, path in enumerate(images, 1):
        log(f"[{i}/{len(images)}] {path.name}")
        inputs = processor(images=load_image(path).convert("RGB"), text=text, return_tensors="pt")
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
        mask = inputs["input_ids"][0] == model.config.image_token_index
        curves[path.name] = entropy_curve(out.hidden_states, mask)
    return curves


def write_outputs(curves: dict[str, np.ndarray], out: Path) -> dict:
    mean = np.mean(list(curves.values()), axis=0)
    summary = {"ecl": {name: collapse_layer(c) for name, c in curves.items()}, "ecl_of_mean": collapse_layer(mean),
               "mean_curve": mean.tolist(), "curves": {k: v.tolist() for k, v in curves.items()}}
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["image", "layer", "matrix_entropy"])
    for name, curve in curves.items():
        writer.writerows([name, layer, f"{m:.6f}"] for layer, m in enumerate(curve))
    write_atomic(out / "ecl.csv", lambda f: f.write(rows.getvalue().encode()))
    write_json_atomic(out / "ecl.json", summary)
    write_atomic(out / "ecl.png", lambda f: _plot(curves, mean, summary["ecl_of_mean"], f))
    return summary


def _plot(curves: dict[str, np.ndarray], mean: np.ndarray, ecl: int, handle) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        ax.plot(range(len(curve)), curve, alpha=0.4, label=name)
    ax.plot(range(len(mean)), mean, color="black", linewidth=2, label="mean")
    ax.axvline(ecl, color="red", linestyle="--", label=f"ECL = {ecl}")
    ax.set(xlabel="LLM layer l (0 = input embeddings)", ylabel="matrix entropy M(l) of image tokens",
           title="Entropy collapse across language-model layers")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(handle, format="png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="tools/ecl.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="registry alias or local HF LLaVA checkpoint")
    parser.add_argument("images", nargs="+", type=Path, help="image files")
    parser.add_argument("--out", type=Path, required=True, help="directory for ecl.csv, ecl.json, ecl.png")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT,
                        help=f"question after <image> (default: {DEFAULT_PROMPT!r})")
    args = parser.parse_args(argv)

    def body() -> int:
        for path in args.images:
            load_image(path)  # one-line errors before the model loads
        summary = write_outputs(curves_for(args.model, args.images, args.prompt), args.out)
        for name, layer in summary["ecl"].items():
            print(f"{name}: ECL = layer {layer}")
        print(f"mean curve: ECL = layer {summary['ecl_of_mean']}; wrote {args.out}/ecl.png, ecl.csv, ecl.json")
        return 0

    return run_cli(body, "ecl")


if __name__ == "__main__":
    sys.exit(main())
