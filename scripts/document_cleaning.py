"""The document-cleaning autoencoder (``conv-doc-dae``) on rendered pages: train, then clean held-out pages.

The write-up trains on 144 scans of 258x540 pixels with batch 16, Adam 1e-3 and early stopping
(patience 5), the preset's defaults. Its scans cannot be fetched here, so
``scripts/make_documents.py`` renders the pages; the run is sized for a shared 2-core machine:

1. render ``--pages`` training pairs (seed 0) and ``--held`` held-out pairs (seed 1) of
   ``--height`` x ``--width`` pixels (default 130x270, half the write-up's size each way);
2. cut each page pair into ``--tile`` x ``--tile`` tiles (the network is fully convolutional, so the
   weights learnt on tiles clean a page of any size): a 130x270 page costs as much as 8.6 tiles of
   64x64 but gives one step in 16 of a batch, the tiles give 8, so an epoch of tiles takes the same
   time and makes 8 times the steps (a try on 144 whole pages, 9 steps an epoch, was after 3 epochs
   no closer to the clean pages than the noisy ones: validation RMSE 0.224);
3. ``npvae train --model conv-doc-dae --data tiles/noisy --target tiles/clean --epochs E``;
4. ``npvae evaluate best.npz --data held_tiles/noisy --target held_tiles/clean --split all``: every
   held-out tile, RMSE per pixel of the noisy input (before) and of the output (after) against the clean;
5. the same two RMSEs on the whole held-out pages, the trained weights loaded into a ``conv-doc-dae``
   of the page's size, and the picture: noisy / cleaned / clean side by side for ``--show`` pages.

Every command is printed before it runs. Usage (about 10 minutes on two shared cores)::

    PYTHONPATH=. python scripts/document_cleaning.py --work /tmp/doc --out docs/document_cleaning.png

A ``--work`` folder that already holds the pages or the run reuses them (delete it to start over).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work", required=True, help="folder for the pages, the tiles and the run (created)")
    p.add_argument("--out", default="runs/document_cleaning.png",
                   help="the picture to write (docs/document_cleaning.png for the committed one)")
    p.add_argument("--pages", type=int, default=144, help="training pages (the write-up's 144 scans)")
    p.add_argument("--held", type=int, default=48, help="held-out pages (another seed)")
    p.add_argument("--height", type=int, default=130, help="page height in pixels (the write-up's: 258)")
    p.add_argument("--width", type=int, default=270, help="page width in pixels (the write-up's: 540)")
    p.add_argument("--tile", type=int, default=64, help="side of the square training tiles (even)")
    p.add_argument("--epochs", type=int, default=12, help="at most this many epochs (patience 5 stops earlier)")
    p.add_argument("--show", type=int, default=4, help="held-out pages in the picture")
    args = p.parse_args(argv)
    for name in ("pages", "held", "epochs", "show"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.tile < 2 or args.tile % 2:
        p.error(f"--tile must be even and at least 2 (the network pools by 2), got {args.tile}")
    if args.height % 2 or args.width % 2:
        p.error(f"pages need an even height and width (the network pools by 2), got {args.height}x{args.width}")
    if args.tile > min(args.height, args.width):
        p.error(f"--tile {args.tile} does not fit in a {args.height}x{args.width} page")
    if args.show > args.held:
        p.error(f"--show {args.show} exceeds the {args.held} held-out pages")
    return args


def run(cmd: list[str]) -> str:
    """Run ``cmd``, echoing it and its output; returns the output."""
    print("$ " + shlex.join(cmd), flush=True)
    if cmd[0] == "npvae":  # the installed command, or this checkout's package when run with PYTHONPATH=.
        cmd = [sys.executable, "-c", "import sys; from npvae.cli import main; sys.exit(main())", *cmd[1:]]
    elif cmd[0] == "python":
        cmd = [sys.executable, *cmd[1:]]
    done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(done.stdout, end="", flush=True)
    if done.returncode:
        sys.exit(f"document_cleaning.py: {cmd[0]} exited with status {done.returncode}")
    return done.stdout


def npvae(*args: str) -> list[str]:
    return ["npvae", *args]


def render(folder: Path, n: int, seed: int, args) -> None:
    if (folder / "clean").is_dir() and len(list((folder / "clean").glob("*.png"))) == n:
        print(f"(reusing the {n} pages in {folder})")
        return
    run(["python", "scripts/make_documents.py", "--out", str(folder), "--n", str(n), "--seed", str(seed),
         "--height", str(args.height), "--width", str(args.width), "--force"])


def read_pages(folder: Path) -> tuple[list[str], np.ndarray]:
    """The page names in order and their pixels (N, H, W) in [0, 1]."""
    from npvae.data import read_png

    files = sorted(folder.glob("*.png"))
    return [f.name for f in files], np.stack([read_png(f) for f in files]).astype(np.float32) / 255.0


def cut_tiles(pages: Path, tiles: Path, tile: int) -> int:
    """Cut every noisy/clean page pair into non-overlapping tile x tile pairs (the last partial
    row and column of tiles are dropped); returns how many pairs were written."""
    from npvae.data import write_png

    count = 0
    for kind in ("noisy", "clean"):
        names, images = read_pages(pages / kind)
        count = 0
        for name, image in zip(names, images):
            h, w = image.shape
            for i in range(0, h - tile + 1, tile):
                for j in range(0, w - tile + 1, tile):
                    pixels = np.round(image[i:i + tile, j:j + tile] * 255).astype(np.uint8)
                    write_png(tiles / kind / f"{Path(name).stem}_{i:04d}_{j:04d}.png", pixels)
                    count += 1
    return count


def draw(noisy, cleaned, clean, path: Path) -> Path:
    """Rows of held-out pages: noisy | cleaned | clean, each page at one pixel per pixel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, h, w = noisy.shape
    gap, head, dpi = 6, 22, 100
    fig = plt.figure(figsize=((3 * w + 2 * gap) / dpi, (n * h + (n - 1) * gap + head) / dpi), dpi=dpi)
    height, width = n * h + (n - 1) * gap + head, 3 * w + 2 * gap
    for col, (images, title) in enumerate(((noisy, "noisy (input)"), (cleaned, "cleaned (conv-doc-dae)"),
                                           (clean, "clean (target)"))):
        for row in range(n):
            left, bottom = col * (w + gap) / width, (n - 1 - row) * (h + gap) / height
            ax = fig.add_axes((left, bottom, w / width, h / height))
            ax.imshow(images[row], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_axis_off()
        fig.text((col * (w + gap) + w / 2) / width, 1 - 0.5 * head / height, title, ha="center", va="center",
                 fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work).resolve()
    train_pages, held_pages = work / "train", work / "held"
    render(train_pages, args.pages, 0, args)
    render(held_pages, args.held, 1, args)
    train_tiles, held_tiles = work / "train_tiles", work / "held_tiles"
    for pages, tiles in ((train_pages, train_tiles), (held_pages, held_tiles)):
        if not (tiles / "clean").is_dir():
            print(f"cut {cut_tiles(pages, tiles, args.tile)} tiles of {args.tile}x{args.tile} from {pages}")
    best = work / "run" / "best.npz"
    if best.exists():
        print(f"(reusing the run in {best.parent})")
    else:
        run(npvae("train", "--model", "conv-doc-dae", "--data", str(train_tiles / "noisy"), "--target",
                  str(train_tiles / "clean"), "--epochs", str(args.epochs), "--no-progress", "--no-pictures",
                  "--out", str(best.parent)))
    text = run(npvae("evaluate", str(best), "--data", str(held_tiles / "noisy"), "--target", str(held_tiles / "clean"),
                     "--split", "all", "--json"))
    tiles = json.loads(text.strip().splitlines()[-1])

    from npvae.models import ConvDocumentDAE, load_model
    from npvae.study.cleaning import pixel_rmse

    trained, _ = load_model(best)
    model = ConvDocumentDAE(input_shape=(args.height, args.width))  # same weights, the page's size
    model.load_state_dict(trained.state_dict())
    _, noisy = read_pages(held_pages / "noisy")
    _, clean = read_pages(held_pages / "clean")
    cleaned = np.clip(model.reconstruct(noisy, batch_size=8), 0, 1)
    before, after = pixel_rmse(noisy, clean), pixel_rmse(cleaned, clean)
    print(f"held-out tiles ({tiles['examples']} of {args.tile}x{args.tile}): RMSE per pixel {tiles['rmse_input_target']:.4f} "
          f"before, {tiles['rmse_output_target']:.4f} after")
    print(f"held-out pages ({len(noisy)} of {args.height}x{args.width}, whole): RMSE per pixel {before:.4f} before, "
          f"{after:.4f} after")
    print(f"wrote {draw(noisy[:args.show], cleaned[:args.show], clean[:args.show], REPO / args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
