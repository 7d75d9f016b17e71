"""A cervical spine CT phantom in Hounsfield units: anatomy, fractures and distractors, in 3-D.

Geometry is analytic (ellipses and planes in millimetres), rendered slice by slice on the pixel grid, so
any image size and slice spacing give the same patient. Axes follow DICOM's patient frame as an axial
image shows it: columns run to the patient's left (+x), rows to the back (+y, anterior at the top),
slices head to feet. Labels follow the competition's segmentations: 1..7 = C1..C7, 8 = T1, 0 = the rest.

    from cspine.phantom import PhantomConfig, render_study
    study = render_study(np.random.default_rng(0), PhantomConfig(image_size=160))
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

# Real training-set statistics (docs/competition.md): how many vertebrae a study has fractured, and
# how often each level is fractured; used so synthetic label distributions look like the real ones.
FRACTURED_COUNT_FREQ = np.array([1058, 623, 239, 64, 26, 7, 2], dtype=float)
LEVEL_PREVALENCE = np.array([7.2, 14.1, 3.6, 5.4, 8.0, 13.7, 19.5])
T1_LABEL = 8
T2_LABEL = 9  # the real masks label T1..T12 as 8..19; a third of the phantoms reach into T2

AIR, FAT, SKIN, MUSCLE, CORD, CSF, DISC, BLOOD, FLUID = (
    -1000.0,
    -100.0,
    10.0,
    50.0,
    30.0,
    8.0,
    80.0,
    40.0,
    35.0,
)


@dataclass(frozen=True)
class PhantomConfig:
    """What to render. None draws the value per study from a realistic range.

    Attributes:
        image_size: pixels per side (real scans: 512; the demo default keeps CPU runs short).
        n_slices: slices from the top of the scan to a little below T1's top; None draws them from
            ``slice_range`` (inclusive).
        head_mm: the head above the skull base that the scan covers, drawn from this range of mm; None
            draws 8-14 mm (a scan that starts at the skull base). Real scans start higher: 0.5-1 mm slices,
            350 of them on average, cover 250 mm or so, so a rehearsal at the real shape draws 60-140. A third of the
            studies go on into T2 at the same spacing (as real scans reach the upper thoracic spine).
        difficulty: 0 (wide, bright fractures, little noise) to 1 (sub-millimetre breaks, heavy noise).
        fractured: levels (1..7) to fracture; None draws count and levels from the real prevalences.
        overlap_probability: share of studies whose SliceThickness exceeds the position spacing.
    """

    image_size: int = 160
    n_slices: int | None = None
    slice_range: tuple[int, int] = (60, 120)
    head_mm: tuple[float, float] | None = None
    difficulty: float = 0.5
    fractured: tuple[int, ...] | None = None
    overlap_probability: float = 0.35


@dataclass
class Fracture:
    """One fracture plane through a vertebra (mm, patient frame relative to the scan's top centre)."""

    level: int  # 1..7
    site: str  # "body", "arch", "dens", "spinous", "lateral_mass"
    point: np.ndarray  # (x, y, depth) on the bone
    normal: np.ndarray  # unit normal of the break
    width: float  # gap width in mm
    radius: float  # extent of the break around `point`, mm
    displaced: bool
    drawn: float = 0.0  # voxels of gap actually drawn (coverage summed)


@dataclass
class PhantomStudy:
    """A rendered study.

    Attributes:
        hu: float32 [N, H, W], HU, head to feet; padding (−2048) outside the circular field of view.
        labels: uint8 [N, H, W], 1..7 = C1..C7, 8 = T1, 9 = T2 (the real masks' scheme), 0 elsewhere.
        fracture: float32 [N, H, W], fraction of each voxel covered by a fracture gap (0..1).
        spacing: (dz, dy, dx) mm between slice positions, rows, columns.
        slice_thickness: reconstructed thickness in mm (> dz for overlapping reconstructions).
        fractures: the fracture planes.
    """

    hu: np.ndarray
    labels: np.ndarray
    fracture: np.ndarray
    spacing: tuple[float, float, float]
    slice_thickness: float
    fractures: list[Fracture] = field(default_factory=list)

    @property
    def fractured_levels(self) -> tuple[int, ...]:
        """Levels with a fracture actually drawn (a planned break that missed the bone does not count)."""
        return tuple(sorted({f.level for f in self.fractures if f.drawn > 0}))

    def fracture_boxes(
        self, min_coverage: float = 0.5, min_pixels: int = 4, pad: int = 2
    ) -> list[tuple[int, int, int, int, int]]:
        """(slice index, x, y, width, height) in pixels for every slice where a fracture is visible.

        Visible means at least ``min_pixels`` pixels more than ``min_coverage`` covered by the gap: a slice
        the plane only grazes shows nothing a reader would box, and labelling it would be label noise.
        """
        boxes = []
        visible = (self.fracture > min_coverage).sum(axis=(1, 2)) >= min_pixels
        for k in np.flatnonzero(visible):
            rows, cols = np.nonzero(self.fracture[k] > min_coverage)
            h, w = self.fracture.shape[1:]
            y0, y1 = max(rows.min() - pad, 0), min(rows.max() + pad + 1, h)
            x0, x1 = max(cols.min() - pad, 0), min(cols.max() + pad + 1, w)
            boxes.append((int(k), int(x0), int(y0), int(x1 - x0), int(y1 - y0)))
        return boxes


@dataclass
class _Anatomy:
    """Per-study shape parameters (mm and HU)."""

    levels: list[tuple[int, float, float]]  # (label, top depth, bottom depth), C1..C7, T1, T2
    skull_depth: float
    extent: float  # the neck's shape is drawn over [0, extent] (skull base to a little below T1's top)
    scan_end: float  # where the scan stops: `extent`, or inside T2 for a third of the studies
    size: float
    neck: tuple[float, float]
    spine_y: float
    lordosis: float
    cortical: float
    cancellous: float
    blur: float


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0


def _ring(x, y, cx, cy, ax, ay, thickness):
    return _ellipse(x, y, cx, cy, ax, ay) & ~_ellipse(
        x, y, cx, cy, max(ax - thickness, 0.1), max(ay - thickness, 0.1)
    )


def _draw_anatomy(rng: np.random.Generator, head_mm: tuple[float, float] | None = None) -> _Anatomy:
    size = rng.uniform(0.9, 1.1)
    skull = rng.uniform(8, 14)
    if head_mm:  # from a generator of its own (seeded by the draw above): every other draw is unchanged
        skull = float(np.random.default_rng(int(skull * 1e9)).uniform(*head_mm))
    depth = skull
    levels = []
    heights = {1: 10.0, 2: 22.0, 3: 13.0, 4: 13.5, 5: 14.0, 6: 14.5, 7: 15.0, 8: 17.0, 9: 18.0}
    for label in range(1, T1_LABEL + 1):
        h = heights[label] * size * rng.uniform(0.95, 1.05)
        levels.append((label, depth, depth + h))
        depth += h + (0.0 if label == 1 else 4.5 * size)
    extent = levels[-1][1] + 12.0 * size  # stop a little below the top of T1
    # Drawn from a generator of its own so that every other draw, and so every other study, is unchanged.
    reach = rng.spawn(1)[0]
    levels.append((T2_LABEL, depth, depth + heights[T2_LABEL] * size))
    scan_end = depth + reach.uniform(6, 12) * size if reach.random() < 1 / 3 else extent
    return _Anatomy(
        levels=levels,
        skull_depth=skull,
        extent=extent,
        scan_end=scan_end,
        size=size,
        neck=(rng.uniform(52, 62) * size, rng.uniform(44, 52) * size),
        spine_y=rng.uniform(2, 8),
        lordosis=rng.uniform(2, 6),
        cortical=rng.uniform(700, 1300),
        cancellous=rng.uniform(200, 380),
        blur=rng.uniform(0.5, 0.8),
    )


class _SliceRenderer:
    """Draws one axial slice at a given depth (mm below the top of the scan)."""

    def __init__(self, anatomy: _Anatomy, x: np.ndarray, y: np.ndarray, pixel: float):
        self.a, self.x, self.y, self.px = anatomy, x, y, pixel

    def level_at(self, depth: float) -> tuple[int | None, float, int | None]:
        """(label, fraction through it 0..1, label of the disc's upper vertebra or None)."""
        for i, (label, top, bottom) in enumerate(self.a.levels):
            if top <= depth <= bottom:
                return label, (depth - top) / (bottom - top), None
            if i + 1 < len(self.a.levels) and bottom < depth < self.a.levels[i + 1][1]:
                return None, 0.0, label
        return None, 0.0, None

    def body_center(self, depth: float) -> float:
        c_top, c_bottom = self.a.levels[0][1], self.a.levels[6][2]
        t = np.clip((depth - c_top) / (c_bottom - c_top), 0, 1)
        return self.a.spine_y - self.a.lordosis * np.sin(np.pi * t)

    def dims(self, label: int) -> tuple[float, float]:
        s = self.a.size
        if label >= T1_LABEL:
            return (11.0 + 0.5 * (label - T1_LABEL)) * s, (8.0 + 0.5 * (label - T1_LABEL)) * s
        return (7.5 + 0.7 * max(label - 3, 0)) * s, (6.5 + 0.4 * max(label - 3, 0)) * s

    def render(self, depth: float) -> tuple[np.ndarray, np.ndarray]:
        x, y, a = self.x, self.y, self.a
        hu = np.full(x.shape, AIR, np.float32)
        labels = np.zeros(x.shape, np.uint8)
        yb = self.body_center(depth)
        label, frac, disc_above = self.level_at(depth)
        below_c6 = np.clip((depth - a.levels[5][1]) / max(a.extent - a.levels[5][1], 1), 0, 1)
        head = np.clip(1 - depth / a.skull_depth, 0, 1)
        nx = a.neck[0] + 40 * below_c6**1.5 + 12 * head
        ny = a.neck[1] + 10 * below_c6 + 14 * head
        body = _ellipse(x, y, 0, 0, nx, ny)
        hu[body] = SKIN
        hu[_ellipse(x, y, 0, 0, nx - 1.5, ny - 1.5)] = FAT
        hu[_ellipse(x, y, 0, 0, nx - 6, ny - 5)] = MUSCLE
        table = (y > ny + 6) & (y < ny + 11) & (np.abs(x) < 0.45 * a.extent + 60)
        hu[table] = -600.0
        hu[table & ((y < ny + 7) | (y > ny + 10))] = 150.0
        ubw, ubd = self.dims(label or disc_above or 3)
        hu[_ellipse(x, y, 0, yb - ubd - 11, 6.5, 5.5 + 3 * head)] = AIR  # pharynx / larynx / trachea
        for side in (-1, 1):
            hu[_ellipse(x, y, side * (ubw + 13), yb - 3, 3.2, 3.2)] = BLOOD  # carotids
            hu[_ellipse(x, y, side * (ubw + 17), yb - 1, 3.8, 3.0)] = BLOOD - 8  # jugulars
        canal_x, canal_y = 10.5 * a.size, 7.0 * a.size
        if label == 1:
            canal_x, canal_y = 12.5 * a.size, 9.0 * a.size
        cy = yb + ubd + 6.0
        if depth < a.skull_depth:
            self._skull_base(hu, depth, yb, cy, canal_x, canal_y)
        elif label == 1:
            self._atlas(hu, labels, frac, yb, cy, canal_x, canal_y)
        elif label is not None:
            self._vertebra(hu, labels, label, frac, yb, cy, canal_x, canal_y)
        elif disc_above is not None:
            bw, bd = self.dims(disc_above + 1 if disc_above + 1 <= T1_LABEL else disc_above)
            hu[_ellipse(x, y, 0, yb, bw, bd)] = DISC
        if label == 2 or (label == 1 and frac > 0.2):
            self._dens(hu, labels, depth, yb)
        if (label or 0) >= T1_LABEL or (disc_above or 0) >= 7:
            self._shoulder_girdle(hu, yb, nx)
        self._canal(hu, labels, cy, canal_x, canal_y)
        if depth < a.skull_depth + 30 and depth > a.skull_depth * 0.3:
            self._mandible(hu, yb, depth)
        return hu, labels

    def _bone(self, hu, labels, mask, label, shell=1.2, solid=False):
        """Fills a bone with a cortical shell and cancellous core (eroded in pixels)."""
        hu[mask] = self.a.cortical
        if label:
            labels[mask] = label
        if not solid:
            px = max(int(round(shell / self.px)), 1)
            core = cv2.erode(mask.astype(np.uint8), np.ones((2 * px + 1, 2 * px + 1), np.uint8)) > 0
            hu[core] = self.a.cancellous

    def _canal(self, hu, labels, cy, ax, ay):
        x, y = self.x, self.y
        canal = _ellipse(x, y, 0, cy, ax, ay)
        hu[canal] = CSF
        labels[canal] = 0
        hu[_ellipse(x, y, 0, cy, 5.0 * self.a.size, 3.8 * self.a.size)] = CORD

    def _vertebra(self, hu, labels, label, frac, yb, cy, canal_x, canal_y):
        x, y, s = self.x, self.y, self.a.size
        bw, bd = self.dims(label)
        body = _ellipse(x, y, 0, yb, bw, bd)
        endplate = frac < 0.06 or frac > 0.94
        self._bone(hu, labels, body, label, solid=endplate)
        if 0.3 < frac < 0.7 and not endplate:  # basivertebral vein: a normal channel, not a fracture
            channel = (np.abs(x) < 0.45) & (y > yb + 0.25 * bd) & (y < yb + bd - 0.8)
            hu[channel & body] = 110.0
        ring = _ring(x, y, 0, cy, canal_x + 2.6 * s, canal_y + 2.6 * s, 2.6 * s) & (y > yb + bd - 1.5)
        if 0.12 < frac < 0.88:
            self._bone(hu, labels, ring, label, solid=True)
        for side in (-1, 1):
            pillar = _ellipse(x, y, side * (canal_x + 3.8 * s), cy, 4.2 * s, 5.2 * s)
            self._bone(hu, labels, pillar, label)
            if frac > 0.82 and label < T1_LABEL:  # facet joint: a normal gap between articular processes
                offset = (frac - 0.82) / 0.18 * 6 - 3
                joint = (
                    np.abs((y - cy) * 0.85 + (x - side * (canal_x + 3.8 * s)) * 0.5 * side - offset) < 0.55
                )
                hu[joint & pillar] = 20.0
                labels[joint & pillar] = 0
            if label <= 6 and 0.25 < frac < 0.75:
                tp_x = side * (bw + 7.0 * s)
                process = _ellipse(x, y, tp_x, yb + 1.0, 5.5 * s, 2.6 * s)
                self._bone(hu, labels, process, label, solid=True)
                foramen = _ellipse(x, y, side * (bw + 5.6 * s), yb + 1.0, 2.1 * s, 1.8 * s)
                hu[foramen & process] = BLOOD
                labels[foramen & process] = 0
            elif label >= 7 and 0.3 < frac < 0.7:
                process = _ellipse(x, y, side * (bw + 10.0 * s), yb + 3.0, 8.0 * s, 2.8 * s)
                self._bone(hu, labels, process, label, solid=True)
        length = (8 + 2.5 * min(label, 7)) * s
        if 0.3 < frac < 0.85:
            spinous = (np.abs(x) < 2.3 * s) & (y > cy + canal_y) & (y < cy + canal_y + length)
            if label == 2:  # C2's spinous process is bifid
                spinous &= np.abs(x) > 0.6
            self._bone(hu, labels, spinous, label, solid=True)

    def _atlas(self, hu, labels, frac, yb, cy, canal_x, canal_y):
        x, y, s = self.x, self.y, self.a.size
        if 0.15 < frac < 0.85:  # a closed ring: both arches run into the lateral masses, as in a real atlas
            # (arches that stop short of the masses leave four gaps in every healthy C1 that look like breaks)
            anterior = _ring(x, y, 0, yb + 1.0 * s, 11.5 * s, 8.9 * s, 2.4 * s) & (y < yb + 1.0 * s)
            self._bone(hu, labels, anterior, 1, solid=True)  # ~1.4 mm in front of the dens: the joint space
            posterior = _ring(x, y, 0, cy, canal_x + 2.4 * s, canal_y + 2.4 * s, 2.4 * s) & (y > yb + 6.0 * s)
            self._bone(hu, labels, posterior, 1, solid=True)
        for side in (-1, 1):
            mass = _ellipse(x, y, side * 10.0 * s, yb + 3.0 * s, 5.5 * s, 7.0 * s)
            self._bone(hu, labels, mass, 1)
            if 0.3 < frac < 0.7:
                process = _ellipse(x, y, side * 18.0 * s, yb + 4.0 * s, 6.0 * s, 3.0 * s)
                self._bone(hu, labels, process, 1, solid=True)
                foramen = _ellipse(x, y, side * 16.5 * s, yb + 4.0 * s, 2.0 * s, 1.8 * s)
                hu[foramen & process] = BLOOD
                labels[foramen & process] = 0

    def _dens(self, hu, labels, depth, yb):
        c1_top, c1_bottom = self.a.levels[0][1], self.a.levels[0][2]
        if depth <= c1_bottom:
            radius = (
                4.6 * self.a.size * np.sqrt(np.clip((depth - c1_top) / (c1_bottom - c1_top) * 1.3, 0.2, 1))
            )
            dens = _ellipse(self.x, self.y, 0, yb + 0.5, radius, radius)
            self._bone(hu, labels, dens, 2)

    def _skull_base(self, hu, depth, yb, cy, canal_x, canal_y):
        x, y, s = self.x, self.y, self.a.size
        t = depth / self.a.skull_depth  # 0 at the top of the scan, 1 at the skull base
        occiput = _ellipse(x, y, 0, cy, canal_x + 22 * s * (1.2 - t), canal_y + 18 * s * (1.2 - t)) & (
            y > yb - 2
        )
        self._bone(hu, None, occiput, 0, shell=2.0)
        if t > 0.55:
            for side in (-1, 1):  # occipital condyles, resting on C1's lateral masses
                self._bone(hu, None, _ellipse(x, y, side * 10.0 * s, yb + 3.5 * s, 5.0 * s, 6.0 * s), 0)
        if t < 0.7:  # clivus, in front of the foramen magnum
            self._bone(hu, None, _ellipse(x, y, 0, yb - 4 * s, 7 * s, 4 * s), 0)

    def _mandible(self, hu, yb, depth):
        x, y = self.x, self.y
        cy = yb - 22
        bone = _ring(x, y, 0, cy, 36 * self.a.size, 28 * self.a.size, 4.5) & (y < cy + 4)
        fade = depth - self.a.skull_depth
        if fade > 20:
            bone &= y < cy - 20  # only the chin reaches the upper cervical levels
        self._bone(hu, None, bone, 0, shell=1.5)

    def _shoulder_girdle(self, hu, yb, nx):
        x, y = self.x, self.y
        for side in (-1, 1):
            clavicle = _ellipse(x, y, side * (0.62 * nx), yb - 18, 14.0, 4.5)
            self._bone(hu, None, clavicle, 0, shell=1.5)
            rib = _ring(x, y, 0, yb + 8, 0.8 * nx, 34.0, 4.0) & (np.abs(x) > 0.45 * nx) & (y < yb + 12)
            self._bone(hu, None, rib, 0, solid=True)


def _draw_fractures(
    rng: np.random.Generator,
    anatomy: _Anatomy,
    renderer: _SliceRenderer,
    levels: tuple[int, ...],
    difficulty: float,
) -> list[Fracture]:
    fractures = []
    s = anatomy.size
    for level in levels:
        _, top, bottom = anatomy.levels[level - 1]
        for _ in range(1 if rng.random() < 0.7 else 2):
            if level == 1:
                site = rng.choice(["arch", "lateral_mass"])
            elif level == 2:
                site = rng.choice(["dens", "body", "arch"], p=[0.45, 0.35, 0.2])
            else:
                site = rng.choice(["body", "arch", "spinous"], p=[0.55, 0.3, 0.15])
            depth = rng.uniform(top + 0.3 * (bottom - top), bottom - 0.3 * (bottom - top))
            yb = renderer.body_center(depth)
            bw, bd = renderer.dims(level)
            cy = yb + bd + 6.0
            normal = rng.normal(size=3)
            if site == "dens":
                c1_top, c1_bottom = anatomy.levels[0][1], anatomy.levels[0][2]
                depth = rng.uniform(c1_top + 0.5 * (c1_bottom - c1_top), c1_bottom + 3.0)
                point = np.array([rng.uniform(-1.5, 1.5), yb + 0.5, depth])
                normal[2] = 3.0 * np.sign(normal[2] or 1.0)  # transverse through the base of the dens
            elif site == "body":
                point = np.array([rng.uniform(-0.5, 0.5) * bw, yb + rng.uniform(-0.5, 0.5) * bd, depth])
                normal[2] *= 0.5
            elif site == "lateral_mass":
                side = rng.choice([-1, 1])
                point = np.array([side * 10.0 * s, yb + 3.0 * s, depth])
            elif site == "spinous":
                point = np.array([0.0, cy + 7.0 * s + rng.uniform(2, 8), depth])
                normal[2] *= 0.6
            else:
                angle = rng.uniform(0.15, 0.85) * np.pi
                rx, ry = (12.5 if level == 1 else 10.5) * s + 1.3, (9.0 if level == 1 else 7.0) * s + 1.3
                point = np.array([rx * np.cos(angle), cy + ry * np.sin(angle), depth])
                normal[2] *= 0.5
            normal /= np.linalg.norm(normal)
            width = float(np.interp(difficulty, [0, 1], [2.2, 0.6]) * rng.uniform(0.85, 1.15))
            fractures.append(
                Fracture(
                    level=level,
                    site=str(site),
                    point=point,
                    normal=normal,
                    width=width,
                    radius=float(rng.uniform(6, 12) * s),
                    displaced=bool(rng.random() < 0.3),
                )
            )
    return fractures


def _apply_fracture(
    hu: np.ndarray,
    labels: np.ndarray,
    coverage: np.ndarray,
    fracture: Fracture,
    x: np.ndarray,
    y: np.ndarray,
    depth: float,
    pixel: float,
) -> None:
    """Cuts one slice along a fracture plane, with partial-volume coverage for sub-pixel gaps."""
    n = fracture.normal
    px, py, pz = fracture.point
    dist = (x - px) * n[0] + (y - py) * n[1] + (depth - pz) * n[2]
    near = ((x - px) ** 2 + (y - py) ** 2 + (depth - pz) ** 2) <= fracture.radius**2
    bone = near & (labels == fracture.level)
    if not bone.any():
        return
    if fracture.displaced:
        shift = np.rint(np.array([n[1], n[0]]) / (np.hypot(n[0], n[1]) + 1e-9)).astype(int)
        moved = np.roll(np.roll(hu, shift[0], axis=0), shift[1], axis=1)
        side = bone & (dist > 0)
        hu[side] = moved[side]
    cover = np.clip((fracture.width / 2 + pixel / 2 - np.abs(dist)) / pixel, 0, 1) * bone
    cover = np.minimum(cover, 1.0).astype(np.float32)
    hu[:] = hu * (1 - cover) + FLUID * cover
    np.maximum(coverage, cover, out=coverage)
    fracture.drawn += float(cover.sum())


def draw_fractured_levels(rng: np.random.Generator) -> tuple[int, ...]:
    """Fractured levels (1..7) of one study: the count, then the levels, as in the real training set."""
    count = rng.choice(len(FRACTURED_COUNT_FREQ), p=FRACTURED_COUNT_FREQ / FRACTURED_COUNT_FREQ.sum())
    p = LEVEL_PREVALENCE / LEVEL_PREVALENCE.sum()
    return tuple(sorted(int(v) + 1 for v in rng.choice(7, size=count, replace=False, p=p)))


def render_study(rng: np.random.Generator, config: PhantomConfig = PhantomConfig()) -> PhantomStudy:
    """Renders one study: HU volume, vertebra labels, fracture coverage and geometry.

    Args:
        rng: the study's own generator (the same seed gives the same study).
        config: image size, slice count, difficulty and fractured levels.

    Returns:
        A `PhantomStudy`, head to feet.
    """
    anatomy = _draw_anatomy(rng, config.head_mm)
    n_neck = config.n_slices or int(rng.integers(config.slice_range[0], config.slice_range[1] + 1))
    size = config.image_size
    fov = rng.uniform(150, 190) * anatomy.size
    pixel = fov / size
    dz = anatomy.extent / n_neck
    n = int(round(anatomy.scan_end / dz))
    thickness = dz * (rng.uniform(1.25, 2.0) if rng.random() < config.overlap_probability else 1.0)
    coords = (np.arange(size, dtype=np.float32) - (size - 1) / 2) * pixel
    x, y = np.meshgrid(coords, coords + rng.uniform(-6, 6))
    renderer = _SliceRenderer(anatomy, x, y, pixel)

    levels = draw_fractured_levels(rng) if config.fractured is None else tuple(sorted(config.fractured))
    fractures = _draw_fractures(rng, anatomy, renderer, levels, config.difficulty)

    hu = np.empty((n, size, size), np.float32)
    labels = np.empty((n, size, size), np.uint8)
    coverage = np.zeros((n, size, size), np.float32)
    depths = (np.arange(n) + 0.5) * dz
    for k, depth in enumerate(depths):
        hu[k], labels[k] = renderer.render(depth)
        for fracture in fractures:
            if abs(depth - fracture.point[2]) <= fracture.radius:
                _apply_fracture(hu[k], labels[k], coverage[k], fracture, x, y, depth, pixel)

    if thickness > dz * 1.1 and n > 2:  # partial volume of overlapping thick slices
        weight = min((thickness - dz) / (2 * dz), 0.5) / 2
        hu[1:-1] = (1 - 2 * weight) * hu[1:-1] + weight * (hu[:-2] + hu[2:])
    for k in range(n):
        cv2.GaussianBlur(hu[k], (0, 0), anatomy.blur, dst=hu[k])
    noise = float(np.interp(config.difficulty, [0, 1], [8, 35]) * rng.uniform(0.8, 1.2))
    hu += rng.normal(0.0, noise, size=hu.shape).astype(np.float32)
    outside = (
        (np.arange(size) - (size - 1) / 2)[None, :] ** 2 + (np.arange(size) - (size - 1) / 2)[:, None] ** 2
    ) > (size / 2) ** 2
    hu[:, outside] = -2048.0
    return PhantomStudy(
        hu=hu,
        labels=labels,
        fracture=coverage,
        spacing=(dz, pixel, pixel),
        slice_thickness=thickness,
        fractures=fractures,
    )


__all__ = [
    "PhantomConfig",
    "PhantomStudy",
    "Fracture",
    "render_study",
    "draw_fractured_levels",
    "T1_LABEL",
    "T2_LABEL",
]
