"""Image data for `stats compute`: records read and every image decoded and checked up front,
pixels made by the model's own `AutoImageProcessor` one batch at a time.

Three layouts: a JSONL file of `{"image": path, "label": ...}` (paths relative to the file), an
image-folder tree (one sub-folder per class, sorted names), or a `datasets` save_to_disk
directory with an image column. Why decode everything first: a truncated JPEG met after an hour
of backward passes wastes the hour; decoding is cheap next to a backward pass, and the decoded
pixels are dropped at once (a batch re-reads its files), so memory does not grow with the data.

Why images must be RGB or L (grey): those are the modes a processor's mean/std describe; an
RGBA, CMYK, palette or 16-bit image would be converted with a guess (drop alpha onto black?),
so it is refused with its file, line and field, and the user converts it knowingly.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass, field

import torch

from tensormerge.errors import InputError
from tensormerge.stats_compute.data import _jsonl_records, is_saved_dataset, load_saved_dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
MODES = ("RGB", "L")
# A decompression bomb by its ratio, not only Pillow's pixel limit (89M pixels warn, 179M fail):
# a 291 KB PNG of 100M flat pixels passed it and cost 2.2 GB and 30 s. Refused: an image that
# decodes to more than BOMB_BYTES and more than BOMB_RATIO times its file (photographs compress
# 2-20x, so only a large flat image is caught, and that is not a training image).
BOMB_BYTES = 64 << 20
BOMB_RATIO = 256


@dataclass
class ImageExample:
    source: object  # a file path, or the encoded bytes of a dataset row
    label: int
    where: str  # "FILE:LINE field 'image'" for messages


@dataclass
class ImageBatch:
    """Pixels of consecutive images and their classes; `index` are their positions in the data."""

    pixel_values: torch.Tensor  # [B, C, H, W]
    labels: torch.Tensor  # [B]
    index: list[int] = field(default_factory=list)

    def to(self, device) -> ImageBatch:
        return ImageBatch(self.pixel_values.to(device), self.labels.to(device), self.index)

    def __len__(self) -> int:
        return self.pixel_values.shape[0]

    def one(self, i: int) -> ImageBatch:
        """Image i alone (images need no padding, so this is exactly the example)."""
        return ImageBatch(self.pixel_values[i:i + 1], self.labels[i:i + 1], [self.index[i]])

    def with_labels(self, labels: torch.Tensor) -> ImageBatch:
        return ImageBatch(self.pixel_values, labels, self.index)


class ImageInputs:
    """The forward's keyword arguments for an image batch, and the row masks of the Gram hooks:
    every patch and class token of every image counts (no padding); the text tower of a
    zero-shot CLIP counts the non-pad tokens of the class prompts, once per image."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, batch: ImageBatch, additive: bool = False) -> dict[str, torch.Tensor]:
        return {"pixel_values": batch.pixel_values}

    def gram_masks(self, batch: ImageBatch) -> dict[str, torch.Tensor | None]:
        masks = {"image": None}
        prompt_mask = getattr(self.model, "prompt_mask", None)
        if prompt_mask is not None:
            masks["text"] = prompt_mask.bool().repeat(len(batch), 1)
        return masks


def gram_side(key: str) -> str:
    """Which mask a layer's rows follow: a CLIP text tower's layers see the prompts."""
    return "text" if key.startswith("text_model.") or key.startswith("text_projection.") else "image"


# ------------------------------------------------------------------------------ records
@contextlib.contextmanager
def _quiet_bomb_warning():
    """BOMB_RATIO decides what is a bomb; Pillow's DecompressionBombWarning (a large photograph
    passes it) would print several lines of stderr."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk: length 0, type, CRC


def _png_whole(source) -> None:
    """Pillow's load() of a PNG stops once it has every pixel, so a file cut short after them
    (in the last IDAT's checksum or the IEND chunk) decodes without a word; verify() reads every
    chunk's CRC up to IEND, and the IEND chunk must be there whole. OSError if either fails."""
    from PIL import Image

    with _quiet_bomb_warning(), Image.open(source if isinstance(source, str) else io.BytesIO(source)) as im:
        im.verify()
    if isinstance(source, str):
        with open(source, "rb") as f:
            f.seek(max(0, os.path.getsize(source) - 4096))
            tail = f.read()
    else:
        tail = bytes(source[-4096:])
    if _PNG_END not in tail:
        raise OSError("truncated PNG file: no IEND chunk")


def _check_image(where: str, source) -> tuple[int, int]:
    """Decode the image fully (a truncated file fails here, not mid-run); its size, or a
    one-line error naming the record and the field."""
    from PIL import Image, UnidentifiedImageError

    try:
        with _quiet_bomb_warning(), Image.open(source if isinstance(source, str) else io.BytesIO(source)) as im:
            decoded = im.size[0] * im.size[1] * len(im.getbands())
            stored = os.path.getsize(source) if isinstance(source, str) else len(source)
            if decoded > BOMB_BYTES and decoded > BOMB_RATIO * stored:
                what = source if isinstance(source, str) else "image"
                raise InputError(f"{where}: {what}: {im.size[0]}x{im.size[1]} pixels ({decoded >> 20} MiB) from a "
                                 f"{stored} byte file, a decompression bomb? (resize it first)")
            im.load()
            mode, size, fmt = im.mode, im.size, im.format
        if fmt == "PNG":
            _png_whole(source)
    except FileNotFoundError:
        raise InputError(f"{where}: {source}: no such image file") from None
    except Image.DecompressionBombError:  # a small file that decodes to gigabytes
        raise InputError(f"{where}: {source if isinstance(source, str) else 'image'}: more than "
                         f"{2 * Image.MAX_IMAGE_PIXELS} pixels (Pillow's decompression-bomb limit)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        what = source if isinstance(source, str) else "the image bytes"
        text = str(e).lower()  # Pillow's words for a file cut short, then for one cut or damaged
        why = ("truncated" if "truncat" in text or "incomplete" in text else
               "truncated or corrupt" if "broken png" in text else e.__class__.__name__)
        raise InputError(f"{where}: {what}: not a readable image ({why})") from None
    if mode not in MODES:
        what = source if isinstance(source, str) else "image"
        raise InputError(f"{where}: {what}: mode {mode}, expected RGB or L (convert it first)")
    return size


def _jsonl_images(path: str, image_field: str, label_field: str):
    root = os.path.dirname(os.path.abspath(path))
    for where, rec in _jsonl_records(path):
        for name in (image_field, label_field):
            if rec.get(name) is None:
                raise InputError(f"{where}: missing field '{name}'")
        v = rec[image_field]
        if not isinstance(v, str) or not v:
            raise InputError(f"{where}: field '{image_field}' must be a file path, not {type(v).__name__}")
        yield f"{where} field '{image_field}'", os.path.join(root, v), rec[label_field], where, label_field


def _class_folders(path: str) -> list[str]:
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))
    if not classes:
        raise InputError(f"{path}: an image folder needs one sub-folder per class (found none)")
    return classes


def _folder_images(path: str, classes: list[str]):
    """Every image under each class folder, sub-folders included (torchvision's ImageFolder
    walks them too: a class split into sub-folders lost those images without a word)."""
    for c in classes:
        walk = []
        for d, dirs, files in os.walk(os.path.join(path, c)):
            dirs[:] = [x for x in dirs if not x.startswith(".")]
            walk.append((d, files))
        for d, files in sorted(walk):  # ImageFolder's order: folders by path, files by name
            for f in sorted(files):
                p = os.path.join(d, f)
                if os.path.isfile(p) and f.lower().endswith(IMAGE_EXTENSIONS):
                    yield p, p, c, f"{path}: folder '{c}'", "folder"


def _open_dataset(path: str, split: str | None, image_field: str, label_field: str):
    """(rows, class names of a ClassLabel column or None) of a save_to_disk directory."""
    root = path
    ds, path = load_saved_dataset(path, split)
    import datasets  # load_saved_dataset has said so where it is missing
    for name in (image_field, label_field):
        if name not in ds.column_names:
            raise InputError(f"{path}: missing field '{name}' (columns: {', '.join(ds.column_names)})")
    if isinstance(ds.features[image_field], datasets.Image):
        ds = ds.cast_column(image_field, datasets.Image(decode=False))  # our decoder names the row on failure
    feature = ds.features[label_field]
    classes = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    return _dataset_rows(ds, path, root, image_field, label_field, classes), classes


def _dataset_rows(ds, path: str, root: str, image_field: str, label_field: str, classes):
    for i, rec in enumerate(ds):
        where = f"{path} row {i}"
        v, lab = rec[image_field], rec[label_field]
        if v is None or lab is None:
            raise InputError(f"{where}: missing field '{image_field if v is None else label_field}'")
        if isinstance(v, dict):
            src = v.get("bytes") or (os.path.join(root, v["path"]) if v.get("path") else None)
        else:
            src = os.path.join(root, v) if isinstance(v, str) and v else None
        if not src:
            raise InputError(f"{where}: field '{image_field}' holds no image")
        yield f"{where} field '{image_field}'", src, lab, where, label_field


def read_images(path: str, image_field: str, label_field: str, max_examples: int | None, split: str | None):
    """[(where, source, raw label, record, label field)] and the class names the layout gives
    (folder names, a ClassLabel's names), or None."""
    if not os.path.exists(path):
        raise InputError(f"{path}: no such data file")
    classes = None
    if os.path.isdir(path) and is_saved_dataset(path):
        it, classes = _open_dataset(path, split, image_field, label_field)
    elif os.path.isdir(path):
        classes = _class_folders(path)
        it = _folder_images(path, classes)
    else:
        it = _jsonl_images(path, image_field, label_field)
    out = []
    for rec in it:
        if max_examples is not None and len(out) >= max_examples:
            break
        out.append(rec)
    if not out:
        raise InputError(f"{path}: holds no images")
    return out, classes


def _label(rec_where: str, fld: str, raw, classes: list[str] | None, label2id: dict | None,
           num_labels: int) -> int:
    """A class index: an int in range, or a name (folder, ClassLabel, string) the head knows."""
    if isinstance(raw, str):
        if classes is not None and raw in classes and label2id is None:
            return classes.index(raw)
        if label2id and raw in label2id:
            return int(label2id[raw])
        if raw.isdigit():
            raw = int(raw)
        else:
            known = list(label2id) if label2id else classes or []
            raise InputError(f"{rec_where}: field '{fld}' is {raw!r}, not a class the model knows "
                             f"({', '.join(map(str, known[:8]))}{', ...' if len(known) > 8 else ''})")
    if not isinstance(raw, int) or isinstance(raw, bool) or not 0 <= raw < num_labels:
        raise InputError(f"{rec_where}: field '{fld}' is {raw!r}, expected a class index in [0, {num_labels})")
    return raw


def _parse_classes(spec: str) -> list[str]:
    if os.path.isfile(spec):
        try:
            with open(spec, encoding="utf-8") as f:
                names = [ln.strip() for ln in f if ln.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--classes {spec!r}: cannot read ({getattr(e, 'strerror', None) or 'not UTF-8 text'})"
                             ) from None
    else:
        names = [c.strip() for c in spec.split(",") if c.strip()]
    if len(names) < 2 or len(set(names)) != len(names):
        raise InputError(f"--classes {spec!r}: needs at least two distinct class names")
    return names


# ------------------------------------------------------------------------------ the data set
class ImageData:
    """Checked image examples and the processor that turns a batch of them into pixels."""

    def __init__(self, opts, loaded):
        from transformers import AutoImageProcessor

        label_field = getattr(opts, "label_field", None) or "label"
        records, classes = read_images(opts.data, opts.image_field, label_field, opts.max_examples, opts.split)
        cfg = loaded.config
        self.zero_shot = loaded.zero_shot
        if opts.classes:
            if not self.zero_shot:
                raise InputError(f"--classes: names the prompts of a zero-shot CLIPModel; {loaded.spec} is a "
                                 f"classifier with its own labels")
            classes = _parse_classes(opts.classes)
        if self.zero_shot:
            if classes is None:
                raw = {r[2] for r in records}
                if not all(isinstance(x, str) for x in raw):
                    raise InputError(f"{opts.data}: a zero-shot CLIP needs class names for its prompts: give "
                                     f"--classes (labels are indices)")
                classes = sorted(raw)
            label2id, num_labels = None, len(classes)
        else:
            label2id = {str(k): int(v) for k, v in (getattr(cfg, "label2id", None) or {}).items()}
            num_labels = int(getattr(cfg, "num_labels", 0) or len(label2id))
            classes = None  # a classifier's own label2id names its classes
        self.classes = classes
        vision_cfg = getattr(cfg, "vision_config", None) or cfg
        self.mode = "L" if getattr(vision_cfg, "num_channels", 3) == 1 else "RGB"
        self.examples = []
        for where, src, raw, rec_where, fld in records:
            lab = _label(rec_where, fld, raw, classes, label2id, num_labels)
            _check_image(where, src)
            self.examples.append(ImageExample(src, lab, where))
        self.processor = None
        last = None
        for d in loaded.tokenizer_dirs:
            try:
                self.processor = AutoImageProcessor.from_pretrained(d)
                break
            except Exception as e:  # no preprocessor_config.json: transformers raises various types
                last = e
        if self.processor is None:
            raise InputError(f"{loaded.spec}: no image processor (preprocessor_config.json) to turn the images "
                             f"into pixels [{last.__class__.__name__ if last else ''}]")
        self.path = opts.data

    def pixels(self, examples: list[ImageExample]) -> torch.Tensor:
        from PIL import Image

        images = []
        for e in examples:
            src = e.source if isinstance(e.source, str) else io.BytesIO(e.source)
            with _quiet_bomb_warning(), Image.open(src) as im:
                images.append(im.convert(self.mode))
        return torch.as_tensor(self.processor(images=images, return_tensors="pt")["pixel_values"])

    def batches(self, batch_size: int, start: int = 0):
        for b0 in range(start, len(self.examples), batch_size):
            chunk = self.examples[b0:b0 + batch_size]
            yield ImageBatch(self.pixels(chunk).float(), torch.tensor([e.label for e in chunk], dtype=torch.long),
                             list(range(b0, b0 + len(chunk))))

    def fingerprint(self) -> str:
        """The records and every image's bytes: what --resume compares."""
        from tensormerge.stats_compute.data import data_fingerprint

        h = hashlib.sha256(data_fingerprint(self.path).encode())
        for e in self.examples:
            h.update(json.dumps([e.label, e.where]).encode())
            if isinstance(e.source, str):
                with open(e.source, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
            else:
                h.update(e.source)
        h.update(json.dumps(self.classes).encode())
        return h.hexdigest()
