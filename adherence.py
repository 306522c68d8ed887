"""
Prompt adherence of a generated image to a procedural scene's caption, scored with the scene's
ground truth (scenes.sample_scene(i).objects) and plain numpy colour tests, no learned model.

For every object of the caption whose colour can be told apart from floors and skies (CHECKED),
the test asks: are there at least `min_pixels` pixels of that colour? A pixel is of colour c when
c is the nearest of the 12 caption colours to it up to a brightness factor (shading), within
`tol`. For every relation of the caption between two checked objects ("a left of b" and so on) it
asks: are both colours present, and are their pixel centroids in that order (left of / right of:
column; in front of / behind: row, the nearer object standing lower in the picture)?

White, gray, pink and brown are not checked: floors (tiles, checkers, sand, wood) and skies carry
those colours, so their pixels are no evidence of the object (measured on ground-truth renders:
`python adherence.py`). The scorer is validated on the renders themselves (the "oracle" rate,
high) and against other scenes' captions (the mismatched rate, low); a model's rate means
something only beside the rate of its images scored against other scenes' captions.
"""
import numpy as np

import scenes

NAMES = list(scenes.COLOURS)
PALETTE = np.array([scenes.COLOURS[c] for c in NAMES])                    # (12, 3) sRGB in 0..1
CHECKED = ("red", "orange", "yellow", "green", "blue", "purple", "cyan", "black")
SCALE_RANGE = (0.3, 1.2)   # brightness factors a shaded surface can show (shadow .. sunlit + highlight)


def colour_labels(rgb: np.ndarray, tol: float = 0.1) -> np.ndarray:
    """uint8 (H, W, 3) -> (H, W) int: the index into NAMES of each pixel's colour, -1 for none.

    Pixel p is compared with s * c for every palette colour c, s the least-squares brightness
    factor clipped to SCALE_RANGE; the nearest wins if its distance (sRGB, 0..1) is below tol."""
    p = rgb.reshape(-1, 3).astype(np.float64) / 255.0
    s = np.clip(p @ PALETTE.T / (PALETTE * PALETTE).sum(1), *SCALE_RANGE)  # (P, 12)
    dist = np.linalg.norm(p[:, None, :] - s[..., None] * PALETTE[None], axis=-1)
    label = dist.argmin(1)
    return np.where(dist.min(1) < tol, label, -1).reshape(rgb.shape[:2])


def min_pixels(shape: tuple[int, int]) -> int:
    """Pixels a colour needs to count as present: 2 at 32 x 32, growing with the image area."""
    return max(2, round(2 * shape[0] * shape[1] / 1024))


def caption_tests(objects: list[scenes.Primitive]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """The checks a caption implies: (colours of its checked objects, [(colour a, relation, colour b)])
    for the caption's relations between consecutive objects (scenes._caption's order)."""
    colours = [o.colour for o in objects if o.colour in CHECKED]
    relations = [(a.colour, scenes._relation(a, b), b.colour) for a, b in zip(objects, objects[1:])
                 if a.colour in CHECKED and b.colour in CHECKED]
    return colours, relations


def score_image(rgb: np.ndarray, objects: list[scenes.Primitive], tol: float = 0.1) -> dict[str, int]:
    """Adherence of one image to the caption of a scene with these objects. Returns counts:
    {"colours": checked objects, "colours_ok": those present, "relations": checked relations,
    "relations_ok": those satisfied}."""
    colours, relations = caption_tests(objects)
    labels = colour_labels(rgb, tol)
    need, centroid = min_pixels(labels.shape), {}
    for c in colours:
        rows, cols = np.nonzero(labels == NAMES.index(c))
        if rows.size >= need:
            centroid[c] = (rows.mean(), cols.mean())
    ok = 0
    for a, rel, b in relations:
        if a in centroid and b in centroid:
            (ra, ca), (rb, cb) = centroid[a], centroid[b]
            ok += {"left of": ca < cb, "right of": ca > cb, "in front of": ra > rb, "behind": ra < rb}[rel]
    return {"colours": len(colours), "colours_ok": len(centroid), "relations": len(relations),
            "relations_ok": int(ok)}


def rates(counts: list[dict[str, int]]) -> dict[str, float]:
    """Pooled rates over images: colour (present / checked), relation (satisfied / checked) and
    adherence (both kinds of test together), plus the number of tests."""
    tot = {k: sum(c[k] for c in counts) for k in ("colours", "colours_ok", "relations", "relations_ok")}
    n = tot["colours"] + tot["relations"]
    return {"colour": tot["colours_ok"] / max(tot["colours"], 1),
            "relation": tot["relations_ok"] / max(tot["relations"], 1),
            "adherence": (tot["colours_ok"] + tot["relations_ok"]) / max(n, 1),
            "n_colour_tests": tot["colours"], "n_relation_tests": tot["relations"]}


def mismatched(i: int, n: int) -> int:
    """The scene whose caption image i is scored against for the random-caption baseline."""
    return (i + 1) % n if n > 1 else i


def score_set(images: list[np.ndarray], objects: list[list[scenes.Primitive]], tol: float = 0.1
              ) -> dict[str, dict[str, float]]:
    """Rates of images[i] against objects[i] ("matched") and against the next scene's objects
    ("mismatched": the random-caption baseline; the pairing is a fixed derangement)."""
    n = len(images)
    return {"matched": rates([score_image(im, ob, tol) for im, ob in zip(images, objects)]),
            "mismatched": rates([score_image(im, objects[mismatched(i, n)], tol) for i, im in enumerate(images)])}


def oracle(indices: list[int], res: int, tol: float = 0.1) -> dict[str, dict[str, float]]:
    """score_set on the ground-truth renders of scenes `indices` at res: the scorer's ceiling
    (matched) and its floor (mismatched)."""
    sc = [scenes.sample_scene(i) for i in indices]
    return score_set([scenes.render(s, res)["rgb"] for s in sc], [s.objects for s in sc], tol)


if __name__ == "__main__":  # validate the scorer on held-out renders, per colour
    import argparse

    ap = argparse.ArgumentParser(description="Scorer check on ground-truth renders of held-out scenes.")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--res", type=int, default=32)
    args = ap.parse_args()
    idx = [scenes.TEST_OFFSET + i for i in range(args.n)]
    sc = [scenes.sample_scene(i) for i in idx]
    labels = [colour_labels(scenes.render(s, args.res)["rgb"]) for s in sc]
    need = min_pixels((args.res, args.res))
    print(f"{'colour':<8}{'in caption: found':>20}{'not in caption: found':>24}")
    for k, c in enumerate(NAMES):
        found = [(lab == k).sum() >= need for lab in labels]
        has = [c in {o.colour for o in s.objects} for s in sc]
        tp, fp = sum(f and h for f, h in zip(found, has)), sum(f and not h for f, h in zip(found, has))
        mark = "" if c in CHECKED else "  (not checked)"
        print(f"{c:<8}{f'{tp}/{sum(has)}':>20}{f'{fp}/{len(has) - sum(has)}':>24}{mark}")
    print(oracle(idx, args.res))
