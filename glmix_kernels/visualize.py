"""Draw a GLMix block's slot-assignment maps over an image, as in the paper's figure.

    python -m glmix_kernels.visualize --model glnet_4g --checkpoint glnet_4g.pth \\
        --image cat.png --stage 2 --block 0 --out maps.png

Each panel is one slot's dispatch weight (softmax over slots) at every pixel, upsampled to the
image and laid over it. Without ``--checkpoint`` the weights are random (a smoke test); without
``--image`` a synthetic image is used. Needs matplotlib (``pip install glmix-kernels[plot]``).
"""

import argparse
import math

import torch
import torch.nn.functional as F

from .models import create_model, list_models, load_checkpoint

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)  # ImageNet statistics the models train on
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def load_image(path, size):
    """``(3, size, size)`` floats in [0, 1]: the file at ``path``, or a synthetic pattern if None."""
    if path is None:
        ramp = torch.linspace(0, 1, size)
        return torch.stack(
            [ramp[None].expand(size, size), ramp[:, None].expand(size, size), (ramp[None] - ramp[:, None]).abs()]
        )
    import matplotlib.image

    img = torch.as_tensor(matplotlib.image.imread(path)).float()
    if img.max() > 1:  # 8-bit formats come as 0..255
        img = img / 255
    img = img[..., :3] if img.dim() == 3 else img[..., None].expand(-1, -1, 3)
    return F.interpolate(
        img.permute(2, 0, 1)[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )[0].clamp(0, 1)


def slot_maps(model, image, stage, block):
    """Slot-assignment maps ``(S, size, size)`` of one block for one ``(3, size, size)`` image."""
    model.eval()
    maps = model.slot_assignment_maps(((image - _MEAN) / _STD)[None], stage, block)
    return F.interpolate(maps.float(), size=image.shape[1:], mode="nearest")[0]


def draw(image, maps, out, slots=None, title=""):
    """Writes a PNG: the image, then one panel per slot with its map over the image."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    chosen = list(range(maps.shape[0])) if slots is None else slots
    cols = min(8, len(chosen) + 1)
    rows = math.ceil((len(chosen) + 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    picture = image.permute(1, 2, 0).numpy()
    axes.flat[0].imshow(picture)
    axes.flat[0].set_title("image", fontsize=8)
    for ax, s in zip(axes.flat[1:], chosen):
        ax.imshow(picture)
        # Per-panel range: a slot that claims little of the image still shows where it looks.
        ax.imshow(maps[s].numpy(), cmap="jet", alpha=0.5, vmin=float(maps[s].min()), vmax=float(maps[s].max()))
        ax.set_title(f"slot {s}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m glmix_kernels.visualize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="glnet_4g", choices=list_models())
    parser.add_argument("--checkpoint", help="the authors' checkpoint file (default: random weights)")
    parser.add_argument("--image", help="an image file (default: a synthetic pattern)")
    parser.add_argument("--size", type=int, default=224, help="input resolution (default 224)")
    parser.add_argument("--stage", type=int, default=0)
    parser.add_argument("--block", type=int, default=0, help="index of a GLMix block within the stage")
    parser.add_argument("--slots", type=int, nargs="+", help="slots to draw (default: all)")
    parser.add_argument("--out", default="slot_maps.png")
    args = parser.parse_args(argv)

    model = create_model(args.model, backend="reference")
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    image = load_image(args.image, args.size)
    maps = slot_maps(model, image, args.stage, args.block)
    if args.slots and max(args.slots) >= maps.shape[0]:
        parser.error(f"--slots must be below {maps.shape[0]}, the block's number of slots")
    weights = args.checkpoint or "random weights"
    draw(image, maps, args.out, args.slots, f"{args.model} ({weights}), stage {args.stage} block {args.block}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
