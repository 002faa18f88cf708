"""Exercise 01's experiment: `python -m exercises 01`. Per layer of the default model, which
position receives the most attention over the lighthouse prompt, and a heat map."""

from pathlib import Path

import torch

from exercises import course


def main(impl, n_tokens: int = 128, out: Path = Path("results/exercises/01_attention_sinks.png")):
    m, tok = course.default_model()
    ids = course.prompt_ids(tok, n_tokens)
    received = impl.attention_received(m, torch.tensor([ids]))  # (n_layers, T)
    top = received.argmax(-1)
    print(f"{len(ids)} tokens of the lighthouse prompt; mean attention received over the rows that see a position\n")
    print("layer  most attended: position, token, attention   position 0   median position")
    for layer, (row, j) in enumerate(zip(received, top.tolist())):
        print(f"{layer:5d}  {j:20d}  {tok.decode([ids[j]])!r:8} {row[j]:9.3f}  {row[0]:11.3f}  {row.median():15.4f}")
    n0 = int((top == 0).sum())
    print(f"\nposition 0 receives the most attention in {n0} of {len(top)} layers;"
          f" in those layers on average {received[top == 0, 0].mean():.2f} of a row's attention,"
          f" {received[top == 0, 0].mean() / received[top == 0].median(-1).values.mean():.0f}x the median position")
    out.parent.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    shown = received[:, :48].clamp(min=1e-4).log10()
    im = ax.imshow(shown, aspect="auto", cmap="viridis")
    ax.set(xlabel="text position (first 48)", ylabel="layer", title="log10 mean attention received (SmolLM2-135M)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"heat map: {out}")
