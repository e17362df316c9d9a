"""`python -m autoclip`: AutoClip on a toy recurrent regression, against no clipping.

An LSTM learns to sum a sequence; every 25th batch is scaled 30x, so its gradients
spike. The loss is measured on clean held-out sequences. Both runs start from the same
weights and see the same batches.
"""

from __future__ import annotations

import torch

from autoclip import AutoClip, NoClip


def _train(clipper_name: str, steps: int = 300, seed: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    model = torch.nn.LSTM(1, 32, batch_first=True)
    head = torch.nn.Linear(32, 1)
    params = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=3e-3)
    clipper = AutoClip(params, p=10) if clipper_name == "autoclip" else NoClip(params)
    data = torch.Generator().manual_seed(seed + 1)
    clipped = 0
    for t in range(1, steps + 1):
        x = torch.randn(16, 20, 1, generator=data)
        if t % 25 == 0:  # an outlier batch: large inputs, large gradients
            x = x * 30
        y = x.sum(dim=1)
        optimizer.zero_grad()
        out, _ = model(x)
        loss = torch.nn.functional.mse_loss(head(out[:, -1]), y)
        loss.backward()
        info = clipper.step()
        clipped += info.clipped
        if not info.skip:
            optimizer.step()
    with torch.no_grad():
        x = torch.randn(256, 20, 1, generator=torch.Generator().manual_seed(seed + 2))
        out, _ = model(x)
        held_out = torch.nn.functional.mse_loss(head(out[:, -1]), x.sum(dim=1)).item()
    return {
        "held_out_loss": held_out,
        "clipped_fraction": clipped / steps,
        "threshold": info.threshold,
        "grad_norm": info.grad_norm,
    }


def main() -> None:
    torch.set_num_threads(1)
    print("AutoClip demo: LSTM on a toy sequence-sum task, 300 Adam steps, outlier batch every 25 steps")
    for name in ("noclip", "autoclip"):
        r = _train(name)
        label = "AutoClip p=10" if name == "autoclip" else "no clipping  "
        print(
            f"  {label}: held-out loss {r['held_out_loss']:.4f}, "
            f"clipped {100 * r['clipped_fraction']:.0f}% of steps, "
            f"final threshold {r['threshold']:.4g}, last grad norm {r['grad_norm']:.4g}"
        )


if __name__ == "__main__":
    main()
