"""Training batches as a pure function of (seed, epoch, index), so a resumed run replays exactly the same data."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from medtune.config import DataCfg
from medtune.data.augment import Augmentation
from medtune.data.types import LoadedSample
from medtune.errors import ConfigError, DataError

# Random crops retried this many times to find one that overlaps the FOV (fundus corners are all background).
_CROP_TRIES = 10
# Box prompts are jittered by up to this fraction of the box side, like the noisy boxes SAM was trained with.
_BOX_JITTER = 0.05


def loss_region(fov: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Pixels the training loss sees: the FOV plus the annotated foreground, which is in view by definition (a dark
    lesion at the edge of an ultrasound fan must not be cut out of the loss by an imperfect derived FOV). Training
    only: evaluation uses the FOV alone, which is all ``predict`` has on an unlabelled image."""
    return fov | mask


def mask_box(mask: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
    """(x1, y1, x2, y2) float box of a [.., H, W] mask in pixel-edge coordinates; the whole image when empty.

    With ``rng`` each coordinate is jittered by up to 5 % of the box side (clamped to the image).
    """
    m = mask.reshape(mask.shape[-2:]) > 0.5
    h, w = m.shape
    rows = torch.nonzero(m.any(dim=1)).flatten()
    cols = torch.nonzero(m.any(dim=0)).flatten()
    if rows.numel() == 0:
        return torch.tensor([0.0, 0.0, float(w), float(h)])
    x1, x2 = float(cols[0]), float(cols[-1] + 1)
    y1, y2 = float(rows[0]), float(rows[-1] + 1)
    if rng is not None:
        jx, jy = _BOX_JITTER * (x2 - x1), _BOX_JITTER * (y2 - y1)
        dx1, dx2, dy1, dy2 = rng.uniform(-1.0, 1.0, size=4)
        x1, x2 = x1 + dx1 * jx, x2 + dx2 * jx
        y1, y2 = y1 + dy1 * jy, y2 + dy2 * jy
    x1, x2 = min(max(x1, 0.0), w - 1.0), max(min(x2, float(w)), 1.0)
    y1, y2 = min(max(y1, 0.0), h - 1.0), max(min(y2, float(h)), 1.0)
    return torch.tensor([x1, y1, max(x2, x1 + 1.0), max(y2, y1 + 1.0)], dtype=torch.float32)


def resize_square(image: torch.Tensor, labels: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole image(s) [..., C, H, W] and label maps [..., K, H, W] resized to size x size (bilinear with
    anti-aliasing / nearest), the ``whole_image`` sampling of images and of video clips."""
    image = F.interpolate(image.reshape(-1, *image.shape[-3:]), size=(size, size), mode="bilinear",
                          align_corners=False, antialias=True).reshape(*image.shape[:-2], size, size)
    labels = F.interpolate(labels.reshape(-1, *labels.shape[-3:]), size=(size, size),
                           mode="nearest-exact").reshape(*labels.shape[:-2], size, size)
    return image.clamp(0.0, 1.0), labels


class TrainPatchDataset(Dataset):
    """Patches (random_crop) or resized whole images (whole_image), augmented, keyed by ``(index, epoch)``.

    An item's "fov" is the training loss region, ``loss_region(fov, mask)``.
    """

    def __init__(self, samples: list[LoadedSample], cfg: DataCfg, seed: int):
        if not samples:
            raise DataError("TrainPatchDataset needs at least one training sample")
        self.samples = samples
        self.cfg = cfg
        self.seed = int(seed)
        self.patch = int(cfg.patch_size)
        self._augment = Augmentation(cfg.augment)

    def __len__(self) -> int:
        per_image = self.cfg.patches_per_image if self.cfg.sampling == "random_crop" else 1
        return len(self.samples) * per_image

    def _crop(self, ls: LoadedSample, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p = self.patch
        image, mask, fov = ls.image, ls.mask, ls.fov
        h, w = mask.shape
        if h < p or w < p:
            pad = ((0, max(0, p - h)), (0, max(0, p - w)))
            image = np.pad(image, ((0, 0), *pad))
            mask, fov = np.pad(mask, pad), np.pad(fov, pad)
            h, w = mask.shape
        for _ in range(_CROP_TRIES):
            y, x = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
            if fov[y:y + p, x:x + p].any():
                break
        crop_mask = mask[y:y + p, x:x + p]
        return image[:, y:y + p, x:x + p], crop_mask, loss_region(fov[y:y + p, x:x + p], crop_mask)

    def _resize_whole(self, ls: LoadedSample) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        labels = torch.from_numpy(np.stack([ls.mask, loss_region(ls.fov, ls.mask)]).astype(np.float32))
        image, labels = resize_square(torch.from_numpy(ls.image), labels, self.patch)
        return image, labels[:1], labels[1:]

    def __getitem__(self, key) -> dict[str, torch.Tensor]:
        index, epoch = (key, 0) if isinstance(key, (int, np.integer)) else key
        index, epoch = int(index), int(epoch)
        rng = np.random.default_rng([self.seed, epoch, index])
        ls = self.samples[index % len(self.samples)]
        if self.cfg.sampling == "random_crop":
            image_np, mask_np, fov_np = self._crop(ls, rng)
            image = torch.from_numpy(np.ascontiguousarray(image_np, dtype=np.float32))
            mask = torch.from_numpy(mask_np.astype(np.float32))[None]
            fov = torch.from_numpy(fov_np.astype(np.float32))[None]
        else:
            image, mask, fov = self._resize_whole(ls)
        image, mask, fov = self._augment(image, mask, fov, rng)
        image = image.float().clamp(0.0, 1.0).contiguous()
        mask = (mask > 0.5).float().contiguous()
        fov = (fov > 0.5).float().contiguous()
        return {"image": image, "mask": mask, "fov": fov, "box": mask_box(mask, rng)}


class StepBatchSampler:
    """Infinite ``batch_sampler``: for step s = start_step, ... yields this rank's keys ``(index, epoch)``.

    The global stream is one seeded permutation per epoch, concatenated; step s takes the next ``global_batch``
    keys of it and rank r keeps ``batch[r::world]``. Because it is indexed by step, resuming at ``start_step``
    replays exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, dataset_len: int, global_batch: int, seed: int, start_step: int = 0, rank: int = 0,
                 world: int = 1):
        if dataset_len < 1:
            raise ValueError(f"StepBatchSampler needs a non-empty dataset, got length {dataset_len}")
        if global_batch < 1:
            raise ValueError(f"global batch must be >= 1, got {global_batch}")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, world={world})")
        if global_batch % world:
            raise ConfigError(
                f"global batch {global_batch} is not divisible by the {world} processes; set data.batch_size to a "
                f"multiple of {world}"
            )
        self.dataset_len = int(dataset_len)
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self.start_step = int(start_step)
        self.rank = int(rank)
        self.world = int(world)
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.dataset_len)
            self._perm_epoch = epoch
        return self._perm

    def global_batch_at(self, step: int) -> list[tuple[int, int]]:
        """All ranks' keys for ``step``."""
        keys = []
        position = step * self.global_batch
        while len(keys) < self.global_batch:
            epoch, offset = divmod(position, self.dataset_len)
            take = min(self.global_batch - len(keys), self.dataset_len - offset)
            perm = self._permutation(epoch)
            keys += [(int(i), epoch) for i in perm[offset:offset + take]]
            position += take
        return keys

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            yield self.global_batch_at(step)[self.rank::self.world]
            step += 1


def whole_image_tensor(ls: LoadedSample) -> dict:
    """A loaded sample at full size for evaluation: image [C,H,W], mask and fov [1,H,W] float tensors, id."""
    return {
        "id": ls.id,
        "image": torch.from_numpy(np.ascontiguousarray(ls.image, dtype=np.float32)),
        "mask": torch.from_numpy(ls.mask.astype(np.float32))[None],
        "fov": torch.from_numpy(ls.fov.astype(np.float32))[None],
    }
