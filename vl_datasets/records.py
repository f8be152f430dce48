"""One record structure for every dataset: an edit request plus its generality and locality samples."""
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from utils.errors import UserError


@dataclass(frozen=True)
class Sample:
    """One query: a task prompt (before the backbone's chat template), its target answer (no leading
    space: the backbone adds one when needed) and an optional image path, opened lazily."""

    prompt: str
    target: str
    image: str | None = None


@dataclass(frozen=True)
class EditRecord:
    index: int
    edit: Sample            # reliability: the edit request itself
    text_rephrase: Sample   # T-Gen: rephrased prompt, same image
    image_rephrase: Sample  # M-Gen: same prompt, rephrased image
    text_loc: Sample        # T-Loc: unrelated text-only question
    image_loc: Sample       # M-Loc: unrelated image and question
    pred: str | None = None  # the unedited model's answer as given by the dataset

    def samples(self):
        """The five samples by metric name, in report order."""
        return {"rel": self.edit, "t_gen": self.text_rephrase, "m_gen": self.image_rephrase,
                "t_loc": self.text_loc, "m_loc": self.image_loc}


def open_image(path: str, check_only: bool = False) -> Image.Image | None:
    """Open an image as RGB; a missing or unreadable file is a UserError naming the path.
    ``check_only``: decode it (a JPEG at 1/8 scale, which still reads the whole stream) and return None."""
    try:
        with Image.open(path) as im:
            if not check_only:
                return im.convert("RGB")
            im.draft("RGB", (1, 1))
            im.load()
            return None
    except FileNotFoundError:
        raise UserError(f"image file missing: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:  # PIL raises all of these
        raise UserError(f"image unreadable: {path} ({e})") from None


def check_images(records, workers: int = 4) -> None:
    """Open and decode every distinct image of ``records`` once: the first bad one is a UserError
    naming it (images are opened lazily during a run, which would be too late)."""
    paths = sorted({s.image for r in records for s in r.samples().values() if s is not None and s.image})
    if len(paths) < 64:
        for p in paths:
            open_image(p, check_only=True)
        return
    from concurrent.futures import ThreadPoolExecutor   # PIL decodes without the GIL
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(lambda p: open_image(p, check_only=True), paths):
            pass
