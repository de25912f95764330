"""What one image costs to read and preprocess, in time and memory (issue 22 section 2).

Writes a PNG strip (1 x LENGTH pixels, 20 KB on disk) and an ordinary 640 x 480 JPEG, then reads
each with `image_io.open_rgb` and applies the encoder's preprocessing (short side resized to 248,
centre crop 224, as timm's ViT-L/14 CLIP transform does), each in a fresh process so its peak
memory is its own. `--image-io FILE` loads another copy of image_io.py (e.g. one from an earlier
commit: `git show COMMIT:image_io.py > old.py`) to measure the code as it was.

    python3 bench/bench_image_read.py [--length 20000] [--image-io FILE]
"""
import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(path: str, image_io_file: str) -> dict:
    """In this process: read and preprocess `path` once -> seconds, output shape, peak RSS in MB."""
    sys.path.insert(0, REPO)
    from torchvision import transforms

    spec = importlib.util.spec_from_file_location("image_io", image_io_file)
    image_io = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(image_io)
    preprocess = transforms.Compose([transforms.Resize(248), transforms.CenterCrop(224), transforms.ToTensor()])
    start = time.perf_counter()
    x = preprocess(image_io.open_rgb(path))
    return {"seconds": round(time.perf_counter() - start, 3), "shape": list(x.shape),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=20000, help="the strip's long side in pixels (default 20000)")
    parser.add_argument("--image-io", default=os.path.join(REPO, "image_io.py"),
                        help="the image_io.py to measure (default: this repository's)")
    parser.add_argument("--one", nargs=1, metavar="FILE",
                        help="measure FILE in this process (default: none; both images, each in a fresh process)")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], os.path.abspath(args.image_io))))
        return

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        files = {f"strip 1x{args.length} PNG": os.path.join(folder, "strip.png"),
                 "640x480 JPEG": os.path.join(folder, "photo.jpg")}
        Image.fromarray(rng.integers(0, 256, (1, args.length), dtype=np.uint8)).save(files[f"strip 1x{args.length} PNG"])
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(files["640x480 JPEG"])
        for name, path in files.items():
            out = subprocess.run([sys.executable, __file__, "--image-io", args.image_io, "--one", path],
                                 capture_output=True, text=True, check=True).stdout
            print(f"{name}: {json.loads(out.strip().splitlines()[-1])}")


if __name__ == "__main__":
    main()
