"""
The evaluation sets of evaluate.py, as datasets of items {"rgb": uint8 (H, W, 3), "depth": float32
(H, W) metres, "valid": bool (H, W) pixels to score, "name": str, "min_depth", "max_depth": the
range predictions are clipped to}:
- "scenes": held-out procedural scenes at the model's resolution (no download);
- "nyu", "kitti", "eth3d", "scannet", "diode": real sets in the Marigold evaluation layout, at
  their native resolution, with each dataset's depth range and crop;
- "manifest": your own images with depth, listed in a jsonl manifest (data.ManifestDataset).
"""
import math
import os

import numpy as np
import torch

from common import UserError, to_uint8
from data import ManifestDataset, load_image, read_depth
from scenes import TEST_OFFSET, render_scene

# -----------------------------------------------------------------------------
# The Marigold evaluation layout: a split file lists "rgb_rel_path depth_rel_path [extra...]" per line,
# relative to the dataset root (the extracted tar of Marigold's evaluation set). "split" is the file's path
# in the Marigold repository; we look for it in the root under that path or just its base name.

DATASETS: dict[str, dict] = {
    "nyu": dict(min_depth=1e-3, max_depth=10.0, fmt="nyu", crop="nyu_eigen",
                split="data_split/nyu_depth/labeled/filename_list_test.txt"),
    "kitti": dict(min_depth=1e-5, max_depth=80.0, fmt="kitti", crop="kitti_eigen",
                  split="data_split/kitti_depth/eigen_test_files_with_gt.txt"),
    "eth3d": dict(min_depth=1e-5, max_depth=math.inf, fmt="eth3d", crop=None,
                  split="data_split/eth3d_depth/eth3d_filename_list.txt"),
    "scannet": dict(min_depth=1e-3, max_depth=10.0, fmt="scannet", crop=None,
                    split="data_split/scannet_depth/scannet_val_sampled_list_800_1.txt"),
    "diode": dict(min_depth=0.6, max_depth=350.0, fmt="diode", crop=None,
                  split="data_split/diode_depth/diode_val_all_filename_list.txt"),
    "scenes": dict(min_depth=1e-5, max_depth=math.inf, fmt=None, crop=None, split=None),
}
KITTI_BENCHMARK_HW = (352, 1216)


def _kitti_benchmark_crop(arr: np.ndarray, name: str) -> np.ndarray:
    """KITTI's benchmark crop: the bottom 352 rows, the central 1216 columns."""
    H, W = arr.shape[:2]
    ch, cw = KITTI_BENCHMARK_HW
    if H < ch or W < cw:
        raise UserError(f"{name}: KITTI image is {W}x{H}, smaller than the {cw}x{ch} benchmark crop")
    top, left = H - ch, (W - cw) // 2
    return arr[top:top + ch, left:left + cw]


def _eval_region(crop: str | None, shape: tuple[int, int]) -> np.ndarray:
    """The part of the image a dataset's protocol evaluates (bool (H, W))."""
    H, W = shape
    region = np.zeros((H, W), dtype=bool)
    if crop == "nyu_eigen":
        region[45:471, 41:601] = True
    elif crop == "kitti_eigen":
        region[int(0.3324324 * H):int(0.91351351 * H), int(0.0359477 * W):int(0.96405229 * W)] = True
    else:
        region[:] = True
    return region


class EvalDataset(torch.utils.data.Dataset):
    """A real evaluation set in the Marigold layout, at native resolution; "valid" is min < gt < max within
    the dataset's crop / mask, "name" the rgb path relative to root."""

    def __init__(self, name: str, root: str, split_file: str | None = None, n: int | None = None):
        if name not in DATASETS or name == "scenes":
            raise UserError(f"unknown evaluation dataset {name!r}; expected one of "
                            f"{', '.join(k for k in DATASETS if k != 'scenes')}")
        self.name, self.root, self.cfg = name, root, DATASETS[name]
        if root is None or not os.path.isdir(root):
            raise UserError(f"{root}: {name} evaluation data not found (expected the extracted Marigold "
                            f"evaluation set for {name} in this folder)")
        if split_file is None:
            candidates = [os.path.join(root, p) for p in (self.cfg["split"], os.path.basename(self.cfg["split"]))]
            split_file = next((c for c in candidates if os.path.isfile(c)), candidates[-1])
            if not os.path.isfile(split_file):
                raise UserError(f"{root}: no split file {os.path.basename(self.cfg['split'])} found (copy "
                                f"Marigold's {self.cfg['split']} into the root or pass the split file)")
        elif not os.path.isfile(split_file):
            raise UserError(f"{split_file}: split file not found")
        self.items = []
        with open(split_file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                fields = line.split()
                if not fields or fields[0].startswith("#"):
                    continue
                if len(fields) < 2:
                    raise UserError(f"{split_file}:{lineno}: expected 'rgb_path depth_path [...]', "
                                    f"got {line.strip()!r}")
                if fields[1] == "None":  # KITTI lists frames without ground truth this way
                    continue
                self.items.append((fields[0], fields[1]))
        self.items = self.items[:n]
        if not self.items:
            raise UserError(f"{split_file}: no samples listed")
        missing = [p for pair in self.items for p in pair if not os.path.isfile(os.path.join(root, p))]
        if missing:
            raise UserError(f"{root}: {len(missing)} files listed in {os.path.basename(split_file)} are "
                            f"missing, e.g. {missing[0]}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        rgb_rel, depth_rel = self.items[i]
        rgb = load_image(os.path.join(self.root, rgb_rel))
        depth_path = os.path.join(self.root, depth_rel)
        depth, valid = read_depth(depth_path, self.cfg["fmt"])
        if self.name == "kitti":
            rgb, depth, valid = (_kitti_benchmark_crop(a, depth_path) for a in (rgb, depth, valid))
        if rgb.shape[:2] != depth.shape:
            raise UserError(f"{depth_path}: depth is {depth.shape[1]}x{depth.shape[0]} but its image is "
                            f"{rgb.shape[1]}x{rgb.shape[0]}")
        lo, hi = self.cfg["min_depth"], self.cfg["max_depth"]
        valid = valid & (depth > lo) & (depth < hi) & _eval_region(self.cfg["crop"], depth.shape)
        return {"rgb": np.ascontiguousarray(rgb), "depth": np.ascontiguousarray(depth),
                "valid": np.ascontiguousarray(valid), "name": rgb_rel, "min_depth": lo, "max_depth": hi}


class SceneEvalDataset(torch.utils.data.Dataset):
    """Procedural scenes, plus "caption" and "scene" (the scene index) per item; valid = every non-sky
    pixel. Item i is scene `offset + i` of the split: TEST_OFFSET + offset + i for the held-out
    ("test") scenes, offset + i for the training ones."""

    def __init__(self, res: int, n: int = 100, offset: int = 0, split: str = "test"):
        if split not in ("test", "train"):
            raise ValueError(f"split must be 'test' or 'train', got {split!r}")
        self.res, self.n = res, n
        self.first = (TEST_OFFSET if split == "test" else 0) + offset

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        index = self.first + i
        s = render_scene(index, self.res)
        cfg = DATASETS["scenes"]
        return {"rgb": s["rgb"], "depth": s["depth"], "valid": s["valid"], "name": f"scene_{index}",
                "caption": s["caption"], "scene": index, "min_depth": cfg["min_depth"], "max_depth": cfg["max_depth"]}


class ManifestEval(torch.utils.data.Dataset):
    """A jsonl manifest, scored on the res x res centre crop data.ManifestDataset makes (letterboxing a square
    image is then the identity), not at the original resolution. Rows without depth have no valid pixel and
    are skipped. The depth range is open: (1e-5, inf)."""

    def __init__(self, path: str, res: int, n: int | None):
        self.ds = ManifestDataset(path, res)
        self.n = len(self.ds) if n is None else min(n, len(self.ds))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        item = self.ds[i]
        depth = item["depth"].float().numpy()
        valid = item["valid"].numpy().astype(bool) & np.isfinite(depth) & (depth > 0)
        return {"rgb": to_uint8(item["rgb"]), "depth": depth, "valid": valid,
                "name": str(item["index"]), "min_depth": 1e-5, "max_depth": math.inf}


def get_eval_dataset(name: str, root: str | None, n: int | None, res: int, offset: int = 0, split: str = "test"
                     ) -> torch.utils.data.Dataset:
    """The first n items (all if None; scenes: 100) of set `name`: scenes of `split` from `offset` at res, a
    manifest (root: the .jsonl file) cropped to res, or a real set read from root at its native resolution."""
    if name == "scenes":
        return SceneEvalDataset(res, 100 if n is None else n, offset, split)
    if name == "manifest":
        if root is None:
            raise UserError("--data manifest needs --root/--data-path path/to/manifest.jsonl (the same flag)")
        return ManifestEval(root, res, n)
    if name in DATASETS and root is None:
        raise UserError(f"evaluation on {name} needs the dataset root: --data-path (alias --root) "
                        f"the extracted Marigold evaluation set")
    return EvalDataset(name, root, None, n)
