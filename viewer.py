"""
index.html for a sample folder: the RGB, the depth picture and a point cloud to turn with the mouse.

The page is one self-contained file that opens with a double click: the pictures are PNG data
URIs, the points base64 float32 xyz and uint8 rgb, drawn by the few lines of WebGL 1 below (no
library, no network). Drag turns the cloud about the origin (pointcloud centres it on its median),
the wheel zooms, a double click goes back to the first view: from `eye`, the camera that took the
picture, with its field of view.
"""
from __future__ import annotations

import base64
import html
import io
import math
import string

import numpy as np
from PIL import Image

from common import write_text

MAX_POINTS = 200_000  # more makes the page slow to open and to turn
MAX_SIDE = 1024  # the pictures are shown small; this keeps the page's size down

PAGE = string.Template("""<!doctype html>
<html><head><meta charset="utf-8"><title>$title</title>
<style>
body { margin: 0; height: 100vh; display: flex; background: #161616; color: #ddd; font: 14px sans-serif; }
#side { width: 28%; padding: 10px; box-sizing: border-box; overflow: auto; }
#side img { display: block; width: 100%; max-height: 40vh; object-fit: contain; object-position: left;
             margin-bottom: 8px; image-rendering: pixelated; }
canvas { flex: 1; min-width: 0; height: 100%; display: block; cursor: grab; }
</style></head><body>
<div id="side"><p>$title<br>$n points. Drag: rotate; wheel: zoom; double click: reset.</p>$pictures</div>
<canvas id="cloud"></canvas>
<script>
const bytes = s => Uint8Array.from(atob(s), c => c.charCodeAt(0));
const xyz = new Float32Array(bytes("$xyz").buffer), rgb = bytes("$rgb"), R = $radius, FOV = $fov;
const home = [$yaw, $pitch, $dist];  // the first view: yaw, pitch, distance
const cv = document.getElementById("cloud");
const gl = cv.getContext("webgl", {preserveDrawingBuffer: true});
// Eye space e = rot * p - (0, 0, dist); perspective with focal lengths k.xy, depth linear between
// z.x and z.y (near, far); a point is drawn about k.w (the points' spacing) wide, at least 1 px
// (z.z: half the canvas height in pixels).
const vs = `attribute vec3 p; attribute vec3 c; uniform mat3 rot; uniform vec4 k; uniform vec3 z;
  varying vec3 col;
  void main() {
    vec3 e = rot * p; e.z -= k.z;
    gl_Position = vec4(e.x * k.x, e.y * k.y, (2.0 * (-e.z - z.x) / (z.y - z.x) - 1.0) * -e.z, -e.z);
    gl_PointSize = clamp(k.w * k.y * z.z / -e.z, 1.0, 24.0);
    col = c;
  }`;
const fs = `precision mediump float; varying vec3 col; void main() { gl_FragColor = vec4(col, 1.0); }`;
const prog = gl.createProgram();
for (const [type, src] of [[gl.VERTEX_SHADER, vs], [gl.FRAGMENT_SHADER, fs]]) {
  const s = gl.createShader(type);
  gl.shaderSource(s, src);
  gl.compileShader(s);
  gl.attachShader(prog, s);
}
gl.linkProgram(prog);
gl.useProgram(prog);
function attribute(name, data, size, type, normalized) {
  gl.bindBuffer(gl.ARRAY_BUFFER, gl.createBuffer());
  gl.bufferData(gl.ARRAY_BUFFER, data, gl.STATIC_DRAW);
  const at = gl.getAttribLocation(prog, name);
  gl.enableVertexAttribArray(at);
  gl.vertexAttribPointer(at, size, type, normalized, 0, 0);
}
attribute("p", xyz, 3, gl.FLOAT, false);
attribute("c", rgb, 3, gl.UNSIGNED_BYTE, true);
const u = name => gl.getUniformLocation(prog, name);
const spacing = 2 * R / Math.sqrt(Math.max(xyz.length / 3, 1));
let [yaw, pitch, dist] = home;

function draw() {
  cv.width = cv.clientWidth * devicePixelRatio;
  cv.height = cv.clientHeight * devicePixelRatio;
  gl.viewport(0, 0, cv.width, cv.height);
  gl.clearColor(0.086, 0.086, 0.086, 1);
  gl.clear(gl.COLOR_BUFFER_BIT | gl.DEPTH_BUFFER_BIT);
  gl.enable(gl.DEPTH_TEST);
  const cy = Math.cos(yaw), sy = Math.sin(yaw), cp = Math.cos(pitch), sp = Math.sin(pitch);
  // rotation about x (pitch) after y (yaw), column-major
  gl.uniformMatrix3fv(u("rot"), false, [cy, sp * sy, -cp * sy, 0, cp, sp, sy, -sp * cy, cp * cy]);
  const f = 1 / Math.tan(0.5 * FOV * Math.PI / 180);  // FOV: the larger side's field of view
  const fx = f * Math.min(1, cv.height / cv.width), fy = f * Math.min(1, cv.width / cv.height);
  gl.uniform4f(u("k"), fx, fy, dist, spacing);
  gl.uniform3f(u("z"), 0.01 * R, dist + 20 * R, cv.height / 2);
  gl.drawArrays(gl.POINTS, 0, xyz.length / 3);
}
cv.addEventListener("pointerdown", e => cv.setPointerCapture(e.pointerId));
cv.addEventListener("pointermove", e => {
  if (!e.buttons) return;
  yaw += 0.01 * e.movementX;
  pitch = Math.max(-1.5, Math.min(1.5, pitch + 0.01 * e.movementY));
  draw();
});
cv.addEventListener("wheel", e => { e.preventDefault(); dist *= Math.exp(0.001 * e.deltaY); draw(); },
                    {passive: false});
cv.addEventListener("dblclick", () => { [yaw, pitch, dist] = home; draw(); });
window.addEventListener("resize", draw);
draw();
</script></body></html>
""")


def png_uri(img: np.ndarray) -> str:
    """uint8 (H, W[, 3]) -> a PNG data URI, shrunk to at most MAX_SIDE pixels a side."""
    pic = Image.fromarray(img)
    pic.thumbnail((MAX_SIDE, MAX_SIDE))
    buf = io.BytesIO()
    pic.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def write(path: str, rgb: np.ndarray, depth_png: np.ndarray | None = None, xyz: np.ndarray | None = None,
          col: np.ndarray | None = None, title: str = "mofo sample", eye: np.ndarray | None = None,
          fov_deg: float = 50.0) -> None:
    """Write the page to `path` (atomically) from the RGB and depth pictures (uint8) and the cloud (N, 3)
    float32 / uint8, first seen from `eye` (default: in front, +Z, at three times the cloud's radius).
    Without a cloud it shows the pictures only."""
    if xyz is None:
        xyz, col = np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8)
    if len(xyz) > MAX_POINTS:  # seeded, so reruns give the same page
        keep = np.sort(np.random.default_rng(0).choice(len(xyz), MAX_POINTS, replace=False))
        xyz, col = xyz[keep], col[keep]
    # Frame the cloud by the radius holding 95 % of its points, so a few strays don't shrink it.
    radius = max(float(np.percentile(np.linalg.norm(xyz, axis=1), 95)) if len(xyz) else 1.0, 1e-6)
    # The view turns the cloud by pitch about x after yaw about y, which puts the eye at
    # dist * (-sin yaw cos pitch, sin pitch, cos yaw cos pitch).
    x, y, z = (0.0, 0.0, 3 * radius) if eye is None else (float(v) for v in eye)
    dist = max(math.sqrt(x * x + y * y + z * z), 1e-6)
    pictures = "".join(f'<img src="{png_uri(p)}" alt="{alt}">'
                       for p, alt in ((rgb, "RGB"), (depth_png, "depth")) if p is not None)
    write_text(path, PAGE.substitute(
        title=html.escape(title), pictures=pictures, n=f"{len(xyz):,}", radius=f"{radius:.6g}",
        fov=f"{fov_deg:g}", yaw=f"{math.atan2(-x, z):.6g}", pitch=f"{math.asin(y / dist):.6g}", dist=f"{dist:.6g}",
        xyz=base64.b64encode(np.ascontiguousarray(xyz, "<f4").tobytes()).decode("ascii"),
        rgb=base64.b64encode(np.ascontiguousarray(col, np.uint8).tobytes()).decode("ascii")))
